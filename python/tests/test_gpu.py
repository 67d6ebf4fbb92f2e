"""Daemon-driven transfers through the binding: KV buffers shared with kvd once (sealed memfds
from ``kvd.shareable``, what the daemon's ``host`` GPU backend maps the way the CUDA backend
maps IPC handles), pages copied by kvd, bit for bit, against the same blocks through the ring."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

import kvd  # noqa: E402
from kvd import shareable  # noqa: E402

NUM_BLOCKS, LAYERS, PAGE = 8, 3, 4096


def ns_of(client):
    return client.open_namespace("tiny-llama", "bfloat16", "LBHNC", 32)


def cache(seed=None):
    """A vLLM-CPU-like cache in shareable memory: layers interleaved per block."""
    alloc = shareable.empty((NUM_BLOCKS, LAYERS, PAGE), torch.uint8)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        alloc.copy_(torch.randint(0, 256, alloc.shape, generator=g, dtype=torch.uint8))
    return alloc


def attach(client, ns, alloc):
    fd, length, offset = shareable.share_of(alloc)
    layers = [(0, offset + i * PAGE, LAYERS * PAGE, PAGE, NUM_BLOCKS) for i in range(LAYERS)]
    return client.gpu_attach(ns, [("fd", fd, length)], layers)


def test_kvd_copies_pages_between_engines_and_the_arena(gpu_daemon):
    client = kvd.Client(str(gpu_daemon.socket), name="pytest-gpu")
    ns = ns_of(client)
    src, dst = cache(seed=3), cache()
    a, b = attach(client, ns, src), attach(client, ns, dst)
    assert a.block_bytes == LAYERS * PAGE and a.id != b.id
    keys = kvd.chain_keys(list(range(32 * 3)), 32)
    assert client.gpu_save(a, keys, [5, 1, 6]) == [True, True, True]
    assert client.gpu_save(a, keys, [5, 1, 6]) == [False, False, False]
    # The stored block is the layers' pages back to back, as save_blocks stores it.
    assert client.get(ns, keys[0]) == src[5].numpy().tobytes()
    extra = kvd.chain_keys(list(range(32 * 4)), 32)[3]
    codes = client.gpu_load(b, [*keys, extra], [0, 2, 7, 3])
    assert codes == [kvd.LOADED, kvd.LOADED, kvd.LOADED, kvd.MISSING]
    assert torch.equal(dst[0], src[5]) and torch.equal(dst[2], src[1]) and torch.equal(dst[7], src[6])
    assert not dst[3].any()
    # Layer-wise: only layer 1 of page 4.
    assert client.gpu_load(b, keys[:1], [4], first_layer=1, layers=1) == [kvd.LOADED]
    assert torch.equal(dst[4, 1], src[5, 1]) and not dst[4, 0].any() and not dst[4, 2].any()
    with pytest.raises(ValueError, match="give `layers`"):
        client.gpu_load(b, keys[:1], [4], first_layer=1)
    status = gpu_daemon.ctl("status")
    assert "gpu    host" in status and "attached 2" in status, status
    assert client.gpu_detach(a) and not client.gpu_detach(a)
    with pytest.raises(kvd.KvdError, match="not held by this connection"):
        client.gpu_save(a, keys, [5, 1, 6])
    other = kvd.Client(str(gpu_daemon.socket), name="pytest-gpu-2")
    with pytest.raises(ValueError, match="another Client"):
        other.gpu_save(b, keys, [0, 1, 2])


def test_bad_shares_raise_clearly(gpu_daemon):
    client = kvd.Client(str(gpu_daemon.socket), name="pytest-gpu")
    ns = ns_of(client)
    with pytest.raises(ValueError, match="share kind"):
        client.gpu_attach(ns, [("pipe", 3, 10)], [(0, 0, 10, 10, 1)])
    with pytest.raises(ValueError, match="64 bytes"):
        client.gpu_attach(ns, [("cuda_ipc", b"short")], [(0, 0, 10, 10, 1)])
    r, w = os.pipe()
    try:
        with pytest.raises(kvd.KvdError, match="cannot map shared allocation 0"):
            client.gpu_attach(ns, [("fd", r, 4096)], [(0, 0, 4096, 4096, 1)])
    finally:
        os.close(r)
        os.close(w)
    # The connection goes on.
    assert attach(client, ns, cache()).block_bytes == LAYERS * PAGE


def test_a_daemon_without_gpu_backend_says_unsupported(client):
    ns = ns_of(client)
    with pytest.raises(kvd.KvdUnsupported, match="gpu.backend"):
        attach(client, ns, cache())


def test_torch_cuda_ipc_handles_are_unwrapped_to_the_driver_handle():
    raw = bytes(range(64))
    assert shareable.cuda_ipc_handle(raw) == raw
    for version in (2, 3):
        assert shareable.cuda_ipc_handle(bytes([version, ord("c")]) + raw) == raw
    with pytest.raises(ValueError, match="expandable_segments:False"):
        shareable.cuda_ipc_handle(bytes([2, ord("e")]) + bytes(40))
    for bad in (b"", bytes(65), bytes([2, ord("x")]) + raw):
        with pytest.raises(ValueError, match="unknown torch CUDA IPC handle"):
            shareable.cuda_ipc_handle(bad)
