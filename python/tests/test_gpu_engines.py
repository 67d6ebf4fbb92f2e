"""Daemon-driven transfers between engine processes and kvd (``tools/gpu_engine.py``):
1000 rounds saved by one process and loaded bit for bit by another, and engines killed
mid-transfer while kvd stays healthy.

``cpu``: CPU caches in sealed memfds, kvd's ``host`` stand-in backend (runs everywhere, CI too).
``cuda``: CUDA caches shared through IPC handles, kvd's CUDA backend; skipped, saying why,
unless torch sees a GPU and the kvd binary was built with ``--features cuda`` (the GPU
verification in scripts/gpu-verify.sh runs it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import kvd  # noqa: E402
from conftest import Daemon, bin_path  # noqa: E402

ENGINE = Path(__file__).resolve().parents[1] / "tools" / "gpu_engine.py"


def backend_for(device: str) -> str:
    if device == "cpu":
        return "host"
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch")
    probe = subprocess.run(
        [str(bin_path("kvd")), "--check-config", "--set", "gpu.backend=cuda"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip("this kvd was built without the cuda feature")
    return "cuda"


@pytest.fixture(params=["cpu", "cuda"])
def engine_daemon(request, tmp_sock_dir):
    backend = backend_for(request.param)
    d = Daemon(
        tmp_sock_dir / "kvd.sock",
        [f"gpu.backend={backend}", "dram.arena_bytes=256 MiB", "dram.max_namespaces=2"],
    )
    d.start()
    yield request.param, d
    d.stop()


def engine(d: Daemon, device: str, mode: str, *args: str) -> list[str]:
    return [sys.executable, str(ENGINE), "--socket", str(d.socket), "--device", device, "--mode", mode, *args]


def run_engine(d: Daemon, device: str, mode: str, *args: str) -> dict:
    out = subprocess.run(engine(d, device, mode, *args), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def gpu_stats(d: Daemon) -> dict:
    return kvd.Client(str(d.socket), name="pytest-stats").stats()["gpu"]


def test_a_thousand_rounds_saved_by_one_process_load_bit_for_bit_in_another(engine_daemon):
    device, d = engine_daemon
    common = ("--seed", "3", "--rounds", "1000", "--blocks", "4")
    saved = run_engine(d, device, "save", *common)
    assert saved["blocks"] == 4000, saved
    loaded = run_engine(d, device, "load", *common)
    assert loaded["mismatches"] == 0 and loaded["blocks"] == 4000, loaded
    stats = gpu_stats(d)
    assert stats["saved_blocks"] >= 4000 and stats["loaded_blocks"] >= 4000, stats
    assert stats["copy_errors"] == 0 and stats["attachments"] == 0, stats


def test_engines_killed_mid_transfer_leave_kvd_healthy(engine_daemon):
    device, d = engine_daemon
    for i in range(3):
        p = subprocess.Popen(
            engine(d, device, "churn", "--seed", str(10 + i), "--rounds", "100000", "--blocks", "8"),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.1 * i)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        deadline = time.monotonic() + 15
        while gpu_stats(d)["attachments"] != 0:
            assert time.monotonic() < deadline, "the killed engine's mappings were not dropped"
            time.sleep(0.05)
    # Still healthy: a fresh engine round-trips, and the daemon logged no failure.
    again = run_engine(d, device, "churn", "--seed", "99", "--rounds", "20")
    assert again["mismatches"] == 0, again
    log = d.log.read_text()
    assert "panicked" not in log and "CUDA_ERROR" not in log, log[-4000:]
