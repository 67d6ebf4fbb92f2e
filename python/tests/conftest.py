"""Fixtures: a real kvd daemon on a private socket, started and stopped by the tests.

The binaries come from ``$KVD_BIN_DIR`` (set by scripts/test.sh), else the workspace's
``target/debug``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bin_path(name: str) -> Path:
    d = os.environ.get("KVD_BIN_DIR")
    candidates = [Path(d)] if d else []
    target = os.environ.get("CARGO_TARGET_DIR")
    if target:
        candidates.append(Path(target) / "debug")
    candidates.append(ROOT / "target" / "debug")
    for c in candidates:
        if (c / name).exists():
            return c / name
    raise RuntimeError(f"{name} not built: run `cargo build --bins` or set KVD_BIN_DIR")


class Daemon:
    """A kvd process; ``stop()``/``kill()`` and ``start()`` again on the same socket."""

    def __init__(self, socket: Path, sets: list[str]):
        self.socket = socket
        self.sets = sets
        self.proc: subprocess.Popen | None = None
        self.log = socket.with_suffix(".log")

    def start(self) -> "Daemon":
        args = [str(bin_path("kvd")), "--socket", str(self.socket)]
        for s in ["dram.arena_bytes=64 MiB", "dram.max_namespaces=8", "ring.spin_us=20", *self.sets]:
            args += ["--set", s]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvd exited with {self.proc.returncode}: {self.log.read_text()}")
            if self.socket.exists():
                try:
                    import kvd

                    kvd.Client(str(self.socket), timeout_s=5)
                    return self
                except kvd.KvdError:
                    pass
            time.sleep(0.02)
        raise RuntimeError("kvd did not come up within 30 s")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        if self.socket.exists():
            self.socket.unlink()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def ctl(self, *args: str) -> str:
        return subprocess.run(
            [str(bin_path("kvd-ctl")), "--socket", str(self.socket), *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout


@pytest.fixture
def tmp_sock_dir():
    # Unix socket paths are limited to ~108 bytes: keep them short.
    d = tempfile.mkdtemp(prefix="kvdpy-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(tmp_sock_dir):
    d = Daemon(tmp_sock_dir / "kvd.sock", [])
    d.start()
    yield d
    d.stop()


@pytest.fixture
def gpu_daemon(tmp_sock_dir):
    """A kvd with the host stand-in GPU backend: daemon-driven transfers work on the CPU."""
    d = Daemon(tmp_sock_dir / "kvd.sock", ["gpu.backend=host", "gpu.pin_arenas=false"])
    d.start()
    yield d
    d.stop()


@pytest.fixture
def client(daemon):
    import kvd

    # An admin: the tests look at namespaces other clients (the connector) opened.
    return kvd.Client(str(daemon.socket), name="pytest", admin=True)
