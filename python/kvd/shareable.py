"""KV-cache memory kvd can map itself, for daemon-driven transfers on the CPU.

With ``copy_path = "daemon"`` the connector hands kvd its KV buffers once and kvd copies
pages itself. CUDA tensors are shared through CUDA IPC handles (torch's ``_share_cuda_``).
CPU tensors can be shared only when they live in a memfd sealed against shrinking, so the
owner can never pull pages from under a copy: ``empty`` allocates such a tensor, and
``share_of`` finds the memfd behind a tensor allocated here. ``share`` turns a list of KV page
buffers (CUDA, or CPU from ``empty``) into what ``Client.gpu_attach`` takes. This is how the daemon's
``host`` GPU backend (a stand-in for a GPU, used in CI) sees an engine's cache.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class _Region:
    start: int
    length: int
    fd: int
    map: mmap.mmap


_lock = threading.Lock()
_regions: list[_Region] = []


def empty(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """A zeroed CPU tensor in its own sealed memfd, shareable with kvd. The memory lives as
    long as the process (KV caches do)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    length = max(mmap.PAGESIZE, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
    fd = os.memfd_create("kvd-kv-cache", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, length)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    m = mmap.mmap(fd, length)
    flat = torch.frombuffer(m, dtype=torch.uint8)
    region = _Region(flat.data_ptr(), length, fd, m)
    with _lock:
        _regions.append(region)
    return flat[:nbytes].view(dtype).view(shape)


def share_of(t: torch.Tensor) -> tuple[int, int, int] | None:
    """``(fd, length, offset of t's first byte)`` when ``t`` lies in memory from ``empty``."""
    ptr = t.data_ptr()
    with _lock:
        for r in _regions:
            if r.start <= ptr < r.start + r.length:
                return r.fd, r.length, ptr - r.start
    return None


CUDA_IPC_HANDLE_BYTES = 64
"""``sizeof(cudaIpcMemHandle_t)``: what kvd's CUDA backend opens."""

_TORCH_CUDA_MALLOC = ord("c")
_TORCH_EXPANDABLE_SEGMENT = ord("e")


def cuda_ipc_handle(shared: bytes) -> bytes:
    """The ``cudaIpcMemHandle_t`` inside the handle torch's ``_share_cuda_`` returns.

    Older torch returns the 64-byte handle itself; torch 2.x a versioned one: a version byte
    (2 up to torch 2.12, 3 from 2.13), a type byte (``c`` for a ``cudaMalloc`` segment, the
    64-byte handle follows; ``e`` for an expandable segment, which has no CUDA IPC handle)
    and the payload. Raises ValueError, saying what to do, for anything else."""
    if len(shared) == CUDA_IPC_HANDLE_BYTES:
        return shared
    if len(shared) >= 2 and shared[1] == _TORCH_EXPANDABLE_SEGMENT:
        raise ValueError(
            "the KV cache lives in a torch expandable segment, which has no CUDA IPC handle: "
            "start the engine with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False for "
            "daemon-driven copies"
        )
    if len(shared) == 2 + CUDA_IPC_HANDLE_BYTES and shared[1] == _TORCH_CUDA_MALLOC:
        return shared[2:]
    raise ValueError(
        f"unknown torch CUDA IPC handle: {len(shared)} bytes starting {shared[:2].hex()} "
        f"(kvd reads a raw {CUDA_IPC_HANDLE_BYTES}-byte handle or torch's versioned 'c' handle)"
    )


def share(pages: list[torch.Tensor]) -> tuple[list[tuple[Any, ...]], list[tuple[int, int, int, int, int]]]:
    """What ``Client.gpu_attach`` needs to map ``pages`` (``[num_blocks, page]`` uint8 views)
    in kvd: one share per distinct allocation and ``(share, offset, stride, page, pages)`` per
    layer; raises ValueError when a buffer cannot be shared."""
    shares: list[tuple[Any, ...]] = []
    index: dict[Any, int] = {}
    layers = []
    for p in pages:
        if p.device.type == "cuda":
            storage = p.untyped_storage()
            # (device, handle, size, offset of the storage in the allocation, ...)
            shared = storage._share_cuda_()
            handle, storage_offset = cuda_ipc_handle(bytes(shared[1])), int(shared[3])
            key: Any = ("cuda", handle)
            offset = storage_offset + (p.data_ptr() - storage.data_ptr())
            entry: tuple[Any, ...] = ("cuda_ipc", handle)
        elif p.device.type == "cpu":
            found = share_of(p)
            if found is None:
                raise ValueError("CPU KV tensors not allocated with kvd.shareable.empty")
            fd, length, offset = found
            key = ("fd", fd)
            entry = ("fd", fd, length)
        else:
            raise ValueError(f"{p.device.type} tensors cannot be shared with kvd")
        if key not in index:
            index[key] = len(shares)
            shares.append(entry)
        layers.append((index[key], offset, p.stride(0), p.shape[1], p.shape[0]))
    return shares, layers
