"""The binding against a real daemon: keys, namespaces, one-copy put/get, page gather/scatter."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import kvd

# Pinned in kvd-proto (key.rs, namespace.rs): the binding must agree with the Rust chain.
VECTOR_0_31 = "4eb758d1374dcbc450bc111b4133f83c28cd3cb1e47cfa865914a603ae318955"
VECTOR_32_63 = "0c9de6d791e9c86a1741b00af691a2c77df9fa71314a24fc11f14a7cfa092eac"
NS_VECTOR = "d4b38c19e63b7d9b7cbbc8414df9109d"


def ns_of(client, **kw):
    args = dict(model="tiny-llama", dtype="bfloat16", layout="LBHNC", block_tokens=32)
    args.update(kw)
    return client.open_namespace(**args)


def test_key_chain_matches_rust_vectors_and_blake3():
    keys = kvd.chain_keys(list(range(64)), 32)
    assert [k.hex() for k in keys] == [VECTOR_0_31, VECTOR_32_63]
    assert kvd.chain_key(None, list(range(32))) == keys[0]
    assert kvd.chain_key(keys[0], list(range(32, 64))) == keys[1]
    # Continuing a chain from a parent gives the same keys as hashing it whole.
    assert kvd.chain_keys(list(range(32, 64)), 32, parent=keys[0]) == keys[1:]
    # A trailing partial block has no key; extra bytes change the first key only.
    assert len(kvd.chain_keys(list(range(70)), 32)) == 2
    salted = kvd.chain_keys(list(range(64)), 32, first_extra=b"salt")
    assert salted[0] != keys[0] and salted[0] == kvd.chain_key(None, list(range(32)), b"salt")
    blake3 = pytest.importorskip("blake3")
    h = blake3.blake3(derive_key_context="kvd block chain v1")
    h.update(bytes(32) + (32).to_bytes(4, "little"))
    h.update(b"".join(t.to_bytes(4, "little") for t in range(32)))
    h.update((0).to_bytes(4, "little"))
    assert h.digest() == keys[0]


def test_namespace_id_vector_and_validation():
    assert kvd.namespace_id("tiny-llama", "bfloat16", "LBHNC", 32).hex() == NS_VECTOR
    with pytest.raises(ValueError, match="tp_rank"):
        kvd.namespace_id("m", "bf16", "L", 32, tp_rank=1, tp_size=1)
    with pytest.raises(ValueError, match="block_tokens"):
        kvd.namespace_id("m", "bf16", "L", 0)


def test_unavailable_when_nothing_listens(tmp_sock_dir):
    with pytest.raises(kvd.KvdUnavailable, match="not running"):
        kvd.Client(str(tmp_sock_dir / "nobody.sock"))


def test_put_get_round_trip_through_buffers(client):
    ns = ns_of(client)
    assert ns.id.hex() == NS_VECTOR and ns.id_hex == NS_VECTOR and ns.arena_bytes > 0
    data = np.random.default_rng(1).integers(0, 256, 64 * 1024, dtype=np.uint8)
    keys = kvd.chain_keys(list(range(96)), 32)
    assert client.put(ns, keys[0], data) is True
    assert client.put(ns, keys[0], data) is False  # already held: nothing written
    assert client.put(ns, keys[1], bytearray(b"abc" * 1000)) is True
    assert client.put(ns, keys[2], memoryview(b"xyz")) is True
    assert client.get(ns, keys[0]) == data.tobytes()
    out = bytearray(100_000)
    assert client.get_into(ns, keys[1], out) == 3000 and out[:3000] == b"abc" * 1000
    small = bytearray(10)
    with pytest.raises(ValueError, match="holds 10 bytes"):
        client.get_into(ns, keys[1], small)
    with pytest.raises(ValueError, match="writable"):
        client.get_into(ns, keys[1], b"readonly")
    assert client.get(ns, bytes(32)) is None
    assert client.get_into(ns, bytes(32), out) is None
    with pytest.raises(ValueError, match="32 bytes"):
        client.get(ns, b"short")
    assert kvd.checksum(data) == kvd.checksum(data.tobytes())


def test_lookup_pin_delete_and_stats(client):
    ns = ns_of(client)
    keys = kvd.chain_keys(list(range(32 * 4)), 32)
    for k in keys[:3]:
        client.put(ns, k, b"x" * 4096)
    prefix, tiers = client.lookup(ns, keys)
    assert prefix == 3 and tiers["dram"] == 3 and tiers["s3"] == 0
    assert client.lookup(ns, keys[1:])[0] == 2
    assert client.pin(ns, keys) == 3
    assert client.unpin(ns, keys) == 3
    assert client.delete(ns, keys[1:2]) == 1
    assert client.lookup(ns, keys)[0] == 1
    s = client.stats()
    assert s["namespaces"][0]["id"] == NS_VECTOR
    assert s["namespaces"][0]["blocks"] == 2
    assert any(c["name"] == "pytest" for c in s["clients"])


def test_namespaces_are_isolated_and_bound_to_their_client(daemon, client):
    a = ns_of(client)
    b = ns_of(client, tenant="other")
    key = kvd.chain_keys(list(range(32)), 32)[0]
    client.put(a, key, b"tenant-a")
    assert client.get(b, key) is None
    other = kvd.Client(str(daemon.socket))
    with pytest.raises(ValueError, match="another Client"):
        other.get(a, key)
    assert other.get(ns_of(other), key) == b"tenant-a"


def layered_cache(num_blocks=8, layers=3, page=4096, seed=0):
    """A vLLM-CPU-like cache: one allocation, layers interleaved per block, so each layer's
    ``[num_blocks, page]`` view is strided (block stride = layers × page)."""
    rng = np.random.default_rng(seed)
    alloc = rng.integers(0, 256, (num_blocks, layers, page), dtype=np.uint8)
    return alloc, [alloc[:, i, :] for i in range(layers)]


def test_save_and_load_blocks_gather_and_scatter_pages(client):
    ns = ns_of(client)
    alloc, views = layered_cache()
    keys = kvd.chain_keys(list(range(32 * 3)), 32)
    assert client.save_blocks(ns, keys, [5, 1, 6], views) == [True, True, True]
    assert client.save_blocks(ns, keys, [5, 1, 6], views) == [False, False, False]
    # The stored block is the concatenation of the layer pages.
    assert client.get(ns, keys[0]) == alloc[5].tobytes()
    dst_alloc = np.zeros_like(alloc)
    dst = [dst_alloc[:, i, :] for i in range(3)]
    extra = kvd.chain_keys(list(range(32 * 4)), 32)[3]
    codes = client.load_blocks(ns, [*keys, extra], [0, 2, 7, 3], dst)
    assert codes == [kvd.LOADED, kvd.LOADED, kvd.LOADED, kvd.MISSING]
    assert (dst_alloc[0] == alloc[5]).all() and (dst_alloc[2] == alloc[1]).all()
    assert (dst_alloc[7] == alloc[6]).all() and not dst_alloc[3].any()
    # Pages of another size are refused, not half-copied.
    _, other = layered_cache(page=2048)
    assert client.load_blocks(ns, keys[:1], [0], other) == [kvd.BAD_SIZE]


def test_bad_layer_buffers_raise_before_touching_memory(client):
    ns = ns_of(client)
    alloc, views = layered_cache()
    keys = kvd.chain_keys(list(range(32)), 32)
    with pytest.raises(ValueError, match="out of range"):
        client.save_blocks(ns, keys, [8], views)
    with pytest.raises(ValueError, match="1 keys but 2 block ids"):
        client.save_blocks(ns, keys, [0, 1], views)
    ro = [np.frombuffer(bytes(8 * 4096), dtype=np.uint8).reshape(8, 4096)]
    with pytest.raises(ValueError, match="read-only"):
        client.load_blocks(ns, keys, [0], ro)
    with pytest.raises(ValueError, match="contiguous"):
        client.save_blocks(ns, keys, [0], [alloc[:, :, ::2]])
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        client.save_blocks(ns, keys, [0], [np.zeros(4096, dtype=np.uint8)])
    with pytest.raises(ValueError, match="at least one layer"):
        client.save_blocks(ns, keys, [0], [])
    with pytest.raises(ValueError, match="byte"):
        client.save_blocks(ns, keys, [0], [np.zeros((8, 16), dtype=np.float32)])


def test_corrupted_block_is_detected_not_loaded(client):
    ns = ns_of(client)
    alloc, views = layered_cache(seed=3)
    key = kvd.chain_keys(list(range(32)), 32)
    client.save_blocks(ns, key, [0], views)
    # The daemon seals checksums when its ring is idle; wait until this block is sealed.
    import time

    deadline = time.monotonic() + 10
    while True:
        if client._testing_corrupt(ns, key[0]):
            break
        assert time.monotonic() < deadline, "block was never checksummed"
        time.sleep(0.01)
    assert client._testing_corrupt(ns, key[0], 4097) is True
    dst_alloc = np.zeros_like(alloc)
    dst = [dst_alloc[:, i, :] for i in range(3)]
    assert client.load_blocks(ns, key, [1], dst) == [kvd.CORRUPT]
    assert not dst_alloc.any()
    with pytest.raises(kvd.KvdError, match="checksum"):
        client.get(ns, key[0])
    # Without verification the damaged bytes come through (that is what verify is for).
    assert client.load_blocks(ns, key, [1], dst, verify=False) == [kvd.LOADED]
    assert (dst_alloc[1] != alloc[0]).sum() == 1
    assert client._testing_corrupt(ns, bytes(32)) is None


def test_daemon_death_raises_unavailable(daemon, client):
    ns = ns_of(client)
    daemon.kill()
    with pytest.raises(kvd.KvdUnavailable):
        for _ in range(3):
            client.lookup(ns, kvd.chain_keys(list(range(32)), 32))
            client.put(ns, bytes(32), b"x")


def test_threads_share_a_client(client):
    ns = ns_of(client)
    errors = []

    def work(t):
        try:
            for i in range(200):
                key = kvd.chain_key(None, [t, i])
                client.put(ns, key, bytes([t]) * 1024)
                assert client.get(ns, key) == bytes([t]) * 1024
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors


def test_link_degrades_and_recovers(daemon, caplog):
    from kvd._link import Link

    now = [0.0]
    link = Link(str(daemon.socket), "link-test", retry_s=5.0, clock=lambda: now[0])
    desc = dict(model="m", dtype="bf16", layout="L", block_tokens=32)
    assert link.namespace(**desc) is not None
    daemon.kill()
    client, ns = link.namespace(**desc)
    with pytest.raises(kvd.KvdUnavailable) as e:
        for _ in range(3):
            client.lookup(ns, [bytes(32)])
    link.failed(e.value)
    assert link.namespace(**desc) is None and not link.up
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1
    daemon.start()
    assert link.namespace(**desc) is None  # not due for a retry yet
    now[0] = 6.0
    assert link.namespace(**desc) is not None and link.up
    assert any("is back" in r.getMessage() for r in caplog.records)
