"""KvdConnector's scheduler and worker halves against a real kvd, with vLLM's objects faked.

These run in a second: the engine-level proof (real vLLM, real model) is in e2e/.
"""

from __future__ import annotations

import hashlib
import logging
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

import kvd  # noqa: E402
from kvd.connector import KEY_SCHEME_KVD, KvdConnector, KvdConnectorMetadata  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402

BLOCK = 32
LAYERS = 2
NUM_BLOCKS = 16
PAGE = 2 * BLOCK * 128 * 2  # kv_heads × block × 2·head_size × bf16


def vllm_config(socket, algo="sha256", **extra):
    tc = SimpleNamespace(
        kv_connector_extra_config={"socket": str(socket), "retry_s": 0.2, **extra},
        kv_load_failure_policy="recompute",
        is_kv_producer=True,
    )
    return SimpleNamespace(
        kv_transfer_config=tc,
        cache_config=SimpleNamespace(block_size=BLOCK, cache_dtype="auto", prefix_caching_hash_algo=algo),
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        device_config=SimpleNamespace(device_type="cpu"),
        model_config=SimpleNamespace(model="/models/tiny", served_model_name="tiny", dtype=torch.bfloat16),
    )


def kv_cache_config():
    spec = SimpleNamespace(page_size_bytes=PAGE, dtype=torch.bfloat16, block_size=BLOCK)
    group = SimpleNamespace(kv_cache_spec=spec, layer_names=[f"layer.{i}" for i in range(LAYERS)])
    return SimpleNamespace(
        num_blocks=NUM_BLOCKS,
        kv_cache_groups=[group],
        kv_cache_layout=None,
        hash_block_size=None,
        prefix_cacheable_group_ids=(0,),
    )


def pair(socket, **kw):
    """A scheduler-role and a worker-role connector (kvd's key chain unless ``algo`` given)."""
    algo = kw.pop("algo", None)
    if algo is None:
        algo = "sha256"
        kw.setdefault("hash", "kvd")
    cfg = vllm_config(socket, algo=algo, **kw)
    sched = KvdConnector(cfg, KVConnectorRole.SCHEDULER, kv_cache_config())
    worker = KvdConnector(cfg, KVConnectorRole.WORKER, kv_cache_config())
    return sched, worker


def engine_cache(seed=None, shared=False):
    """Like vLLM CPU: per-layer [num_blocks, kv_heads, block, 2·head] views of one allocation,
    here interleaved per block so every layer view is strided. ``shared``: in memory kvd can
    map (``kvd.shareable``), for daemon-driven copies."""
    shape = (NUM_BLOCKS, LAYERS, 2, BLOCK, 128)
    alloc = kvd.shareable.empty(shape, torch.bfloat16) if shared else torch.zeros(shape, dtype=torch.bfloat16)
    if seed is not None:
        alloc.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16))
    return alloc, {f"layer.{i}": alloc[:, i] for i in range(LAYERS)}


def request(req_id, tokens, salt=None, hashes=None, mm=None, lora=None):
    return SimpleNamespace(
        request_id=req_id,
        all_token_ids=list(tokens),
        prompt_token_ids=list(tokens),
        num_tokens=len(tokens),
        cache_salt=salt,
        lora_request=None if lora is None else SimpleNamespace(lora_name=lora),
        mm_features=mm or [],
        prompt_embeds=None,
        block_hashes=hashes or [],
    )


def blocks(ids):
    return SimpleNamespace(get_block_ids=lambda: (list(ids),))


def step(new=(), cached=None, scheduled=None):
    """A SchedulerOutput: ``new`` is [(req_id, block_ids, num_computed_tokens)]."""
    cached = cached or []
    return SimpleNamespace(
        scheduled_new_reqs=[
            SimpleNamespace(req_id=r, block_ids=(list(b),), num_computed_tokens=c) for r, b, c in new
        ],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[r for r, _, _ in cached],
            resumed_req_ids=set(),
            new_block_ids=[(list(b),) if b else None for _, b, _ in cached],
            num_computed_tokens=[c for _, _, c in cached],
        ),
        num_scheduled_tokens=scheduled or {},
        scheduled_spec_decode_tokens={},
    )


def run_worker(worker, meta):
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(None)
    worker.wait_for_save()
    worker.clear_connector_metadata()
    return worker.get_block_ids_with_load_errors()


def load_hit(sched, worker, req, ids, hit_tokens):
    """One engine step in which ``req`` finds ``hit_tokens`` in kvd and loads them into blocks
    ``ids``; returns the block ids that failed to load."""
    rid = req.request_id
    assert sched.get_num_new_matched_tokens(req, 0) == (hit_tokens, False)
    sched.update_state_after_alloc(req, blocks(ids), hit_tokens)
    meta = sched.build_connector_meta(step(new=[(rid, ids, hit_tokens)], scheduled={rid: 4}))
    return run_worker(worker, meta)


def fresh_engine(socket, shared=False, **kw):
    """A new connector pair with an empty (zeroed) engine cache registered."""
    sched, worker = pair(socket, **kw)
    dst, caches = engine_cache(shared=shared)
    worker.register_kv_caches(caches)
    return sched, worker, dst


def store(daemon, tokens, ids, seed=1, **kw):
    """Runs one prefill of ``tokens`` through a fresh connector pair; returns the cache."""
    salt = kw.pop("tenant_salt", None)
    lora = kw.pop("lora", None)
    shared = kw.pop("shared", False)
    sched, worker = pair(daemon.socket, **kw)
    alloc, caches = engine_cache(seed, shared=shared)
    worker.register_kv_caches(caches)
    req = request("a", tokens, salt=salt, lora=lora)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    sched.update_state_after_alloc(req, blocks(ids), 0)
    meta = sched.build_connector_meta(step(new=[("a", ids, 0)], scheduled={"a": len(tokens)}))
    assert not meta.loads
    assert run_worker(worker, meta) == set()
    return alloc


def test_prefill_saves_full_blocks_and_a_new_engine_loads_them(daemon):
    tokens = list(range(100, 200))  # 100 tokens: 3 full blocks
    src = store(daemon, tokens, [3, 4, 5, 6])
    sched, worker = pair(daemon.socket)
    dst, caches = engine_cache()
    worker.register_kv_caches(caches)
    req = request("b", tokens)
    assert sched.get_num_new_matched_tokens(req, 0) == (96, False)
    sched.update_state_after_alloc(req, blocks([7, 8, 9, 10]), 96)
    meta = sched.build_connector_meta(step(new=[("b", [7, 8, 9, 10], 96)], scheduled={"b": 4}))
    assert isinstance(meta, KvdConnectorMetadata)
    assert [t.block_ids for t in meta.loads] == [[7, 8, 9]] and not meta.saves
    assert run_worker(worker, meta) == set()
    for s, d in [(3, 7), (4, 8), (5, 9)]:
        assert torch.equal(src[s], dst[d])
    assert not dst[10].any()


def test_hits_are_block_aligned_leave_a_token_and_start_after_local_hits(daemon):
    tokens = list(range(96))
    store(daemon, tokens + [7, 7, 7, 7], [0, 1, 2, 3])
    sched, _ = pair(daemon.socket)
    # Exactly three blocks of prompt: the last block must be computed, so only two are hits.
    assert sched.get_num_new_matched_tokens(request("x", tokens), 0) == (64, False)
    # vLLM already holds the first block locally: only what lies beyond is reported.
    req = request("y", tokens + [1, 2, 3])
    assert sched.get_num_new_matched_tokens(req, 32) == (64, False)
    sched.update_state_after_alloc(req, blocks([9, 10, 11, 12]), 64)
    meta = sched.build_connector_meta(step(new=[("y", [9, 10, 11, 12], 96)], scheduled={"y": 3}))
    assert [t.block_ids for t in meta.loads] == [[10, 11]]
    # A prompt diverging in block 2 hits only the shared first block.
    other = tokens[:40] + [999] * 60
    assert sched.get_num_new_matched_tokens(request("z", other), 0) == (32, False)


def test_lookup_is_pure(daemon, client):
    tokens = list(range(100))
    store(daemon, tokens, [0, 1, 2, 3])
    sched, _ = pair(daemon.socket)
    before = client.stats()["namespaces"][0]["blocks"]
    req = request("p", tokens)
    assert sched.get_num_new_matched_tokens(req, 0) == sched.get_num_new_matched_tokens(req, 0)
    # Nothing is loaded unless vLLM allocated blocks for the hit.
    sched.update_state_after_alloc(req, blocks([1, 2, 3, 4]), 0)
    meta = sched.build_connector_meta(step(new=[("p", [1, 2, 3, 4], 0)], scheduled={"p": 100}))
    assert not meta.loads
    assert client.stats()["namespaces"][0]["blocks"] == before


def test_chunked_prefill_and_decode_save_each_block_once(daemon):
    sched, worker = pair(daemon.socket)
    _, caches = engine_cache(5)
    worker.register_kv_caches(caches)
    tokens = list(range(500, 600))
    req = request("c", tokens)
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, blocks([0, 1]), 0)
    m1 = sched.build_connector_meta(step(new=[("c", [0, 1], 0)], scheduled={"c": 50}))
    assert [t.block_ids for t in m1.saves] == [[0]]
    m2 = sched.build_connector_meta(step(cached=[("c", [2, 3], 50)], scheduled={"c": 50}))
    assert [t.block_ids for t in m2.saves] == [[1, 2]]
    # Decode: generated tokens complete block 3 at 128 tokens.
    req.all_token_ids += list(range(28))
    req.num_tokens = len(req.all_token_ids)
    m3 = sched.build_connector_meta(step(cached=[("c", None, 100)], scheduled={"c": 27}))
    assert not m3.saves
    m4 = sched.build_connector_meta(step(cached=[("c", None, 127)], scheduled={"c": 1}))
    assert [t.block_ids for t in m4.saves] == [[3]]
    assert m4.saves[0].keys == kvd.chain_keys(req.all_token_ids[:128], BLOCK)[3:]
    for m in (m1, m2, m4):
        run_worker(worker, m)
    assert worker._stats["saved_blocks"] == 4
    assert sched.request_finished(req, [0, 1, 2, 3]) == (False, None)


def test_corrupt_block_is_reported_deleted_and_recomputable(daemon, client):
    tokens = list(range(100))
    store(daemon, tokens, [0, 1, 2, 3])
    sched, worker, dst = fresh_engine(daemon.socket)
    g = sched._geo
    ns = client.open_namespace(g.model, g.dtype, g.layout, g.block_tokens)
    keys = kvd.chain_keys(tokens, BLOCK)
    wait_sealed(client, ns, keys[1])
    assert client._testing_corrupt(ns, keys[1], 100) is True
    assert load_hit(sched, worker, request("r", tokens), [5, 6, 7, 8], 96) == {6}
    assert not dst[6].any()
    assert client.lookup(ns, keys)[0] == 1  # the damaged copy is gone


def wait_sealed(client, ns, key):
    import time

    deadline = time.monotonic() + 10
    while not client._testing_corrupt(ns, key):
        assert time.monotonic() < deadline, "block never checksummed"
        time.sleep(0.01)


def test_kvd_down_means_no_hits_one_warning_and_failed_loads(daemon, caplog):
    tokens = list(range(100))
    store(daemon, tokens, [0, 1, 2, 3])
    sched, worker = pair(daemon.socket)
    worker.register_kv_caches(engine_cache()[1])
    req = request("d", tokens)
    assert sched.get_num_new_matched_tokens(req, 0) == (96, False)
    sched.update_state_after_alloc(req, blocks([1, 2, 3, 4]), 96)
    meta = sched.build_connector_meta(step(new=[("d", [1, 2, 3, 4], 96)], scheduled={"d": 4}))
    daemon.kill()
    with caplog.at_level(logging.WARNING):
        assert run_worker(worker, meta) == {1, 2, 3}
        for i in range(3):
            assert sched.get_num_new_matched_tokens(request(f"e{i}", tokens), 0) == (0, False)
    unavailable = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(unavailable) == 2  # one per connector role, not one per call


def test_staging_copy_path_matches_direct(daemon):
    tokens = list(range(300, 400))
    src = store(daemon, tokens, [3, 4, 5, 6], copy_path="staging")
    # The direct path reads what the staged path wrote, and the staged path reads it back too.
    sched, worker, dst = fresh_engine(daemon.socket)
    assert load_hit(sched, worker, request("s", tokens), [0, 1, 2, 3], 96) == set()
    assert torch.equal(src[3:6], dst[0:3])
    sched2, worker2, dst2 = fresh_engine(daemon.socket, copy_path="staging")
    assert load_hit(sched2, worker2, request("s2", tokens), [9, 10, 11, 12], 96) == set()
    assert torch.equal(src[3:6], dst2[9:12])


def test_daemon_copy_path_matches_direct(gpu_daemon, caplog):
    """kvd copies the pages itself (host stand-in backend): what it saved loads through the
    direct path bit for bit, and what the direct path saved it loads back."""
    caplog.set_level(logging.INFO, logger="vllm.kvd_connector")
    tokens = list(range(500, 600))
    src = store(gpu_daemon, tokens, [3, 4, 5, 6], seed=4, shared=True, copy_path="daemon")
    assert any("daemon copy" in r.getMessage() for r in caplog.records)
    assert any("KV buffers attached" in r.getMessage() for r in caplog.records)
    sched, worker, dst = fresh_engine(gpu_daemon.socket)
    assert load_hit(sched, worker, request("d", tokens), [0, 1, 2, 3], 96) == set()
    assert torch.equal(src[3:6], dst[0:3])
    other = list(range(700, 800))
    src2 = store(gpu_daemon, other, [1, 2, 3, 4], seed=5)
    sched2, worker2, dst2 = fresh_engine(gpu_daemon.socket, shared=True, copy_path="daemon")
    assert load_hit(sched2, worker2, request("d2", other), [9, 10, 11, 12], 96) == set()
    assert torch.equal(src2[1:4], dst2[9:12])
    gpu = kvd.Client(str(gpu_daemon.socket)).stats()["gpu"]
    assert gpu["saved_blocks"] == 3 and gpu["loaded_blocks"] == 3, gpu


def test_layerwise_daemon_loads_fill_each_layer_before_its_wait_returns(gpu_daemon):
    tokens = list(range(900, 1000))
    src = store(gpu_daemon, tokens, [3, 4, 5, 6], seed=8, shared=True, copy_path="daemon")
    sched, worker, dst = fresh_engine(gpu_daemon.socket, shared=True, copy_path="daemon", layerwise=True)
    req, ids = request("lw", tokens), [0, 1, 2, 3]
    assert sched.get_num_new_matched_tokens(req, 0) == (96, False)
    sched.update_state_after_alloc(req, blocks(ids), 96)
    worker.bind_connector_metadata(sched.build_connector_meta(step(new=[("lw", ids, 96)], scheduled={"lw": 4})))
    worker.start_load_kv(None)
    for i in range(LAYERS):
        worker.wait_for_layer_load(f"layer.{i}")
        assert torch.equal(src[3:6, i], dst[0:3, i]), f"layer {i} not loaded when its wait returned"
    worker.wait_for_save()
    worker.clear_connector_metadata()
    assert worker.get_block_ids_with_load_errors() == set()
    assert torch.equal(src[3:6], dst[0:3])
    stats = kvd.Client(str(gpu_daemon.socket), admin=True).stats()
    assert all(n["pinned"] == 0 for n in stats["namespaces"]), stats["namespaces"]
    assert stats["gpu"]["loaded_blocks"] == 3  # one request per layer, each block counted once


def test_daemon_copy_path_falls_back_when_kvd_cannot(daemon, caplog):
    """Without a GPU backend in kvd (or with unshareable buffers) the connector copies."""
    tokens = list(range(800, 900))
    src = store(daemon, tokens, [3, 4, 5, 6], seed=6, shared=True, copy_path="daemon")
    assert sum("daemon-driven copies unavailable" in r.getMessage() for r in caplog.records) == 1
    sched, worker, dst = fresh_engine(daemon.socket, copy_path="daemon")
    assert any("cannot be shared with kvd" in r.getMessage() for r in caplog.records)
    assert load_hit(sched, worker, request("f", tokens), [0, 1, 2, 3], 96) == set()
    assert torch.equal(src[3:6], dst[0:3])


def test_kvd_refusing_the_buffers_is_asked_once_then_the_connector_copies(gpu_daemon, caplog, monkeypatch):
    import os

    tokens = list(range(1000, 1100))
    sched, worker = pair(gpu_daemon.socket, copy_path="daemon")
    r, w = os.pipe()
    try:
        # A descriptor kvd cannot map stands in for buffers it refuses.
        monkeypatch.setattr(kvd.shareable, "share", lambda pages: ([("fd", r, 4096)], [(0, 0, 4096, 4096, 1)]))
        alloc, caches = engine_cache(seed=9)
        worker.register_kv_caches(caches)
        monkeypatch.undo()
        for rid in ("a", "b"):
            req = request(rid, tokens)
            sched.get_num_new_matched_tokens(req, 0)
            sched.update_state_after_alloc(req, blocks([3, 4, 5, 6]), 0)
            meta = sched.build_connector_meta(step(new=[(rid, [3, 4, 5, 6], 0)], scheduled={rid: 100}))
            assert run_worker(worker, meta) == set()
    finally:
        os.close(r)
        os.close(w)
    refusals = [x for x in caplog.records if "kvd refused the KV buffers" in x.getMessage()]
    assert len(refusals) == 1, [x.getMessage() for x in caplog.records]
    # The connector's own copies stored the blocks.
    s2, w2, dst = fresh_engine(gpu_daemon.socket)
    assert load_hit(s2, w2, request("c", tokens), [0, 1, 2, 3], 96) == set()
    assert torch.equal(alloc[3:6], dst[0:3])


def test_cache_salt_isolates_requests(daemon, client):
    tokens = list(range(100))
    store(daemon, tokens, [0, 1, 2, 3], tenant_salt="alice")
    tenants = [n["tenant"] for n in client.stats()["namespaces"]]
    salted = [t for t in tenants if "salt=" in t]
    assert len(salted) == 1 and not any("alice" in t for t in tenants)  # only a digest
    sched, _ = pair(daemon.socket)
    assert sched.get_num_new_matched_tokens(request("n", tokens), 0) == (0, False)
    assert sched.get_num_new_matched_tokens(request("b", tokens, salt="bob"), 0) == (0, False)
    assert sched.get_num_new_matched_tokens(request("a", tokens, salt="alice"), 0) == (96, False)


def test_salt_digests_are_keyed_by_the_salt_key_file(daemon, client, tmp_path):
    key_a, key_b = tmp_path / "a", tmp_path / "b"
    key_a.write_bytes(b"0123456789abcdef-a\n")
    key_b.write_bytes(b"0123456789abcdef-b")
    tokens = list(range(100))
    store(daemon, tokens, [0, 1, 2, 3], tenant_salt="alice", salt_key_file=str(key_a))
    plain = hashlib.sha256(b"alice").hexdigest()[:32]
    tenants = [n["tenant"] for n in client.stats()["namespaces"] if "salt=" in n["tenant"]]
    assert len(tenants) == 1 and plain not in tenants[0]
    same, _ = pair(daemon.socket, salt_key_file=str(key_a))
    other, _ = pair(daemon.socket, salt_key_file=str(key_b))
    assert same.get_num_new_matched_tokens(request("s", tokens, salt="alice"), 0) == (96, False)
    assert other.get_num_new_matched_tokens(request("o", tokens, salt="alice"), 0) == (0, False)
    short = tmp_path / "short"
    short.write_bytes(b"tiny")
    with pytest.raises(ValueError, match="at least 16"):
        pair(daemon.socket, salt_key_file=str(short))


def test_lora_adapters_have_their_own_blocks(daemon):
    tokens = list(range(100))
    src = store(daemon, tokens, [0, 1, 2, 3], lora="sql-adapter")
    sched, worker, dst = fresh_engine(daemon.socket)
    assert sched.get_num_new_matched_tokens(request("n", tokens), 0) == (0, False)
    assert load_hit(sched, worker, request("l", tokens, lora="sql-adapter"), [4, 5, 6, 7], 96) == set()
    assert torch.equal(src[0:3], dst[4:7])


def test_key_schemes(daemon):
    sched, _ = pair(daemon.socket, algo="sha256")
    assert sched._scheme == "vllm-sha256"
    hashes = [bytes([i]) * 32 for i in range(3)]
    req = request("h", list(range(100)), hashes=hashes)
    sched.get_num_new_matched_tokens(req, 0)
    assert sched._reqs["h"].keys == hashes
    xx, _ = pair(daemon.socket, algo="xxhash")
    assert xx._scheme == KEY_SCHEME_KVD
    assert pair(daemon.socket, hash="kvd")[0]._scheme == KEY_SCHEME_KVD
    with pytest.raises(ValueError, match="hash='vllm' needs"):
        pair(daemon.socket, algo="xxhash", hash="vllm")
    with pytest.raises(ValueError, match="hash must be"):
        pair(daemon.socket, hash="md5")
    # Multimodal prompts are not cached under kvd's token-only chain.
    kv, _ = pair(daemon.socket, hash="kvd")
    assert kv.get_num_new_matched_tokens(request("m", list(range(100)), mm=["img"]), 0) == (0, False)


def test_bad_config_and_oversized_namespaces_are_clear_errors_not_crashes(daemon, caplog):
    with pytest.raises(ValueError, match="verify_checksums must be true or false"):
        pair(daemon.socket, verify_checksums="maybe")
    assert pair(daemon.socket, verify_checksums="false")[1]._verify is False
    sched, _ = pair(daemon.socket, model="m" * 300)  # longer than a namespace field may be
    with caplog.at_level(logging.WARNING):
        assert sched.get_num_new_matched_tokens(request("big", list(range(100))), 0) == (0, False)
    assert any("refused namespace" in r.getMessage() for r in caplog.records)


def test_mismatched_pages_disable_the_worker(daemon, caplog):
    _, worker = pair(daemon.socket)
    wrong = torch.zeros((NUM_BLOCKS, 2, BLOCK, 64), dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING):
        worker.register_kv_caches({"layer.0": wrong, "layer.1": wrong})
    assert not worker._active()
    assert any("disabled" in r.getMessage() for r in caplog.records)


def test_two_argument_constructor_of_older_vllm(daemon):
    """vLLM before 0.12 builds connectors with (vllm_config, role): no kv_cache_config."""
    cfg = vllm_config(daemon.socket, hash="kvd")
    sched = KvdConnector(cfg, KVConnectorRole.SCHEDULER)
    worker = KvdConnector(cfg, KVConnectorRole.WORKER)
    src, caches = engine_cache(9)
    worker.register_kv_caches(caches)
    assert worker._active()
    tokens = list(range(700, 800))
    req = request("o", tokens)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    sched.update_state_after_alloc(req, blocks([0, 1, 2, 3]), 0)
    run_worker(worker, sched.build_connector_meta(step(new=[("o", [0, 1, 2, 3], 0)], scheduled={"o": 100})))
    sched2 = KvdConnector(cfg, KVConnectorRole.SCHEDULER)
    assert sched2.get_num_new_matched_tokens(request("o2", tokens), 0) == (96, False)


def wait_stopped(pid):
    """Waits (at most 5 s) until every thread of ``pid`` is stopped: SIGSTOP takes effect
    asynchronously, and a thread inside a system call runs on until it returns (a lookup
    sent right after the signal was still answered on a 6.18 kernel)."""
    import glob
    import time

    deadline = time.monotonic() + 5
    states = []
    while time.monotonic() < deadline:
        states = []
        for t in glob.glob(f"/proc/{pid}/task/*/stat"):
            try:
                with open(t) as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except OSError:
                pass  # a thread that just ended
        if states and all(s in "Tt" for s in states):
            return
        time.sleep(0.005)
    raise AssertionError(f"kvd (pid {pid}) did not stop within 5 s: {states}")


def test_stopped_daemon_does_not_hang_the_scheduler(daemon, caplog):
    import signal
    import time

    tokens = list(range(100))
    store(daemon, tokens, [0, 1, 2, 3])
    sched, _ = pair(daemon.socket, timeout_s=0.5)
    assert sched.get_num_new_matched_tokens(request("t", tokens), 0) == (96, False)
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        wait_stopped(daemon.proc.pid)
        start = time.monotonic()
        with caplog.at_level(logging.WARNING):
            assert sched.get_num_new_matched_tokens(request("t2", tokens), 0) == (0, False)
        assert time.monotonic() - start < 3
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    assert any("unavailable" in r.getMessage() for r in caplog.records)
    time.sleep(0.3)  # past retry_s: the link reconnects and hits again
    assert sched.get_num_new_matched_tokens(request("t3", tokens), 0) == (96, False)
