"""Starts a private kvd for a benchmark run, or uses the one the caller names.

Shared by the vLLM-level benchmarks so each can run against a live daemon (``--socket``,
``$KVD_SOCKET``) or one of its own (``--spawn``, binaries from ``$KVD_BIN_DIR``, default the
workspace's ``target/release``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def kvd_socket(spawn: bool, socket: str | None, arena_bytes: int) -> Iterator[str]:
    """Yields the control socket to use; a spawned daemon is stopped (SIGTERM) afterwards."""
    socket = socket or os.environ.get("KVD_SOCKET")
    if not spawn:
        if not socket:
            raise SystemExit("no kvd: pass --socket, set KVD_SOCKET, or use --spawn")
        yield socket
        return
    work = Path(tempfile.mkdtemp(prefix="kvd-bench-", dir="/tmp"))
    socket = str(work / "kvd.sock")
    bindir = Path(os.environ.get("KVD_BIN_DIR", ROOT / "target" / "release"))
    with open(work / "kvd.log", "w") as log:
        daemon = subprocess.Popen(
            [str(bindir / "kvd"), "--socket", socket, "--set", f"dram.arena_bytes={arena_bytes}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(socket):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"kvd did not start; see {work / 'kvd.log'}")
            time.sleep(0.05)
        yield socket
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
