"""KV events from a real daemon, read by a real ZMQ subscriber and decoded two ways: by vLLM's
own decoder (msgspec with ``vllm.distributed.kv_events.KVEventBatch``) and by a plain msgpack
decoder checking every field. Both topologies vLLM supports: kvd connecting to a subscriber
that binds (llm-d's), and kvd binding an ipc:// endpoint. Everything on 127.0.0.1 or ipc.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

import kvd

zmq = pytest.importorskip("zmq")
msgpack = pytest.importorskip("msgpack")
msgspec = pytest.importorskip("msgspec")

from conftest import Daemon  # noqa: E402

BLOCK = 4
POD = "10.0.0.7:8000"
MODEL = "tiny-llama"
END_SEQ = (-1).to_bytes(8, "big", signed=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def h(key: bytes) -> int:
    """The u64 an event carries for a key: its last 8 bytes, big-endian."""
    return int.from_bytes(key[24:], "big")


WARMUP = "events-warmup"


class Sub:
    """A SUB socket that keeps every message as (topic, seq, payload), except the warm-up
    model's (see ``handshake``)."""

    def __init__(self, ctx, *, bind: str | None = None, connect: str | None = None):
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"kv@")
        self.sock.setsockopt(zmq.LINGER, 0)
        if bind:
            self.sock.bind(bind)
        else:
            self.sock.connect(connect)
        self.got: list[tuple[bytes, int, bytes]] = []

    def until(self, pred, timeout_s: float = 10.0):
        """Receives until ``pred(all events so far, plain-decoded)`` holds; returns them."""
        deadline = time.monotonic() + timeout_s
        while True:
            evs = [e for _, _, p in self.got for e in msgpack.unpackb(p, raw=False)[1]]
            if pred(evs):
                return evs
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; events so far: {evs}"
            if self.sock.poll(int(min(left, 0.2) * 1000)):
                self.take()

    def take(self) -> bytes:
        """Receives one message (keeping it unless it is the warm-up model's); its topic."""
        topic, seq, payload = self.sock.recv_multipart()
        assert len(seq) == 8
        if not topic.endswith(f"@{WARMUP}".encode()):
            self.got.append((topic, int.from_bytes(seq, "big"), payload))
        return topic


def handshake(c, sub: Sub, timeout_s: float = 30.0) -> None:
    """ZMQ drops what a PUB sends before the subscription reaches it: store blocks of a
    warm-up model until one of their events arrives, so the stream is known to flow."""
    ns = c.open_namespace(model=WARMUP, dtype="bfloat16", layout="LBHNC", block_tokens=BLOCK)
    deadline = time.monotonic() + timeout_s
    i = 0
    while True:
        toks = [90_000 + i] * BLOCK
        key = kvd.chain_keys(toks, BLOCK)[0]
        c.lineage(ns, None, [key], toks)
        c.put(ns, key, b"w" * 4096)
        i += 1
        while sub.sock.poll(200):
            if sub.take().endswith(f"@{WARMUP}".encode()):
                return
        assert time.monotonic() < deadline, "no KV event arrived"


def stats(d: Daemon) -> dict:
    return json.loads(d.ctl("status", "--json"))


def wait_connected(d: Daemon) -> None:
    deadline = time.monotonic() + 10
    while "connected to the subscriber" not in d.log.read_text():
        assert time.monotonic() < deadline, d.log.read_text()
        time.sleep(0.05)


def disk_sets(tmp: Path) -> list[str]:
    return [
        f"disk.path={tmp / 'disk'}",
        "disk.capacity_bytes=64MiB",
        "disk.region_bytes=16MiB",
        "dram.max_block_bytes=1MiB",
        "disk.admission=always",
        "disk.demote_watermark=1.0",
    ]


def events_sets(tmp: Path, port: int) -> list[str]:
    """Map-form events to a subscriber bound on ``port``, and a disk tier."""
    return [f"events.endpoint=tcp://127.0.0.1:{port}", f"events.pod={POD}", *disk_sets(tmp)]


def flowing(d: Daemon, sub: Sub):
    """Once events flow to ``sub``: a client and its namespace of MODEL."""
    wait_connected(d)
    c = kvd.Client(str(d.socket), name="events")
    handshake(c, sub)
    return c, c.open_namespace(model=MODEL, dtype="bfloat16", layout="LBHNC", block_tokens=BLOCK)


def test_map_events_to_a_binding_subscriber_decode_with_vllms_own_decoder(tmp_sock_dir):
    from vllm.distributed.kv_events import (
        AllBlocksCleared,
        BlockRemoved,
        BlockStored,
        KVEventBatch,
    )

    port, replay_port = free_port(), free_port()
    ctx = zmq.Context()
    sub = Sub(ctx, bind=f"tcp://127.0.0.1:{port}")
    d = Daemon(
        tmp_sock_dir / "kvd.sock",
        [f"events.replay_endpoint=tcp://127.0.0.1:{replay_port}", *events_sets(tmp_sock_dir, port)],
    )
    d.start()
    try:
        c, ns = flowing(d, sub)
        assert ns.events is True
        tokens = list(range(1000, 1000 + 3 * BLOCK))
        keys = kvd.chain_keys(tokens, BLOCK)
        assert c.lineage(ns, None, keys, tokens) == 3
        with pytest.raises(kvd.KvdError, match="tokens"):
            c.lineage(ns, None, keys, tokens[:-1])
        for i, k in enumerate(keys):
            assert c.put(ns, k, bytes([i]) * 8192)
        # A block the engine never described is stored but not announced.
        stray = kvd.chain_keys(list(range(BLOCK)), BLOCK)[0]
        assert c.put(ns, stray, b"s" * 8192)

        def stored(medium, n):
            return lambda evs: sum(
                len(e["block_hashes"]) for e in evs if e["type"] == "BlockStored" and e["medium"] == medium
            ) >= n

        sub.until(stored("CPU", 3))
        assert c.delete(ns, keys[2:]) == 1
        sub.until(lambda evs: any(e["type"] == "BlockRemoved" for e in evs))
        d.ctl("drain")
        sub.until(stored("DISK", 2))
        d.ctl("evict", "--all")
        evs = sub.until(lambda evs: sum(e["type"] == "BlockRemoved" for e in evs) >= 2)

        # Every message: the topic, consecutive sequence numbers from 0.
        assert {t for t, _, _ in sub.got} == {f"kv@{POD}@{MODEL}".encode()}
        seqs = [s for _, s, _ in sub.got]
        assert seqs == sorted(set(seqs)), seqs  # increasing; the warm-up model's are left out

        # vLLM's own decoder accepts every payload.
        decoded = [msgspec.msgpack.decode(p, type=KVEventBatch) for _, _, p in sub.got]
        vev = [e for b in decoded for e in b.events]
        assert all(b.data_parallel_rank == 0 and b.ts > 1e9 for b in decoded)
        assert not any(isinstance(e, AllBlocksCleared) for e in vev)
        first = vev[0]
        assert isinstance(first, BlockStored)
        assert first.block_hashes == [h(k) for k in keys]
        assert first.parent_block_hash is None
        assert first.token_ids == tokens
        assert first.block_size == BLOCK and first.medium == "CPU"
        assert first.lora_name is None and first.lora_id is None and first.group_idx == 0
        removed = [e for e in vev if isinstance(e, BlockRemoved)]
        assert removed[0].block_hashes == [h(keys[2])] and removed[0].medium == "CPU"
        assert sorted(removed[1].block_hashes) == sorted([h(keys[0]), h(keys[1]), h(stray)])
        disk = [e for e in vev if isinstance(e, BlockStored) and e.medium == "DISK"]
        # Disk writes complete in any order: each announced block carries its own tokens and
        # its chain parent, whichever event it comes in.
        on_disk = {}
        for e in disk:
            parent = e.parent_block_hash
            for i, x in enumerate(e.block_hashes):
                on_disk[x] = (parent, e.token_ids[i * BLOCK : (i + 1) * BLOCK])
                parent = x
        assert on_disk == {
            h(keys[0]): (None, tokens[:BLOCK]),
            h(keys[1]): (h(keys[0]), tokens[BLOCK : 2 * BLOCK]),
        }, on_disk

        # The plain decoder sees exactly vLLM's field names, nothing else.
        raw = msgpack.unpackb(sub.got[0][2], raw=False)
        assert len(raw) == 3 and raw[2] == 0
        assert raw[1][0] == {
            "type": "BlockStored",
            "block_hashes": [h(k) for k in keys],
            "parent_block_hash": None,
            "token_ids": tokens,
            "block_size": BLOCK,
            "lora_id": None,
            "medium": "CPU",
            "lora_name": None,
            "extra_keys": None,
            "group_idx": 0,
        }
        assert set(evs[-1]) == {"type", "block_hashes", "medium", "group_idx"}

        # Replay from the first sequence number: every batch again, then the end marker.
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://127.0.0.1:{replay_port}")
        # A malformed request is ignored (and named in the status), the next one served.
        dealer.send_multipart([b"", b"not-a-seq"])
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        replayed = []
        while True:
            assert dealer.poll(10_000), "replay did not answer"
            empty, topic, seq, payload = dealer.recv_multipart()
            assert empty == b""
            if seq == END_SEQ:
                break
            replayed.append((topic, int.from_bytes(seq, "big"), payload))
        replayed = [r for r in replayed if not r[0].endswith(f"@{WARMUP}".encode())]
        assert replayed[-len(sub.got) :] == sub.got
        dealer.close()

        s = stats(d)["events"]
        assert s["topic_prefix"] == f"kv@{POD}@" and s["form"] == "map"
        # The stray block went unannounced twice: stored in DRAM, then drained to disk.
        assert s["skipped_no_lineage"] == 2 and s["next_seq"] > seqs[-1]
        assert s["lineage_blocks"] >= 3  # and the warm-up blocks
        assert "8-byte sequence number" in s["last_error"]
        assert "events tcp://127.0.0.1" in d.ctl("status")
    finally:
        d.stop()
        sub.sock.close()
        ctx.term()


class OldBlockStored(msgspec.Struct, array_like=True, omit_defaults=True, tag="BlockStored"):
    """vLLM's positional events (before 0.28), rebuilt here as their decoder."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None = None
    extra_keys: list | None = None
    group_idx: int | None = None


class OldBlockRemoved(msgspec.Struct, array_like=True, omit_defaults=True, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None
    group_idx: int | None = None


class OldAllBlocksCleared(msgspec.Struct, array_like=True, omit_defaults=True, tag="AllBlocksCleared"):
    pass


class OldBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[OldBlockStored | OldBlockRemoved | OldAllBlocksCleared]
    data_parallel_rank: int | None = None


def test_array_events_on_a_bound_ipc_endpoint_and_a_resync_after_lost_changes(tmp_sock_dir):
    ep = f"ipc://{tmp_sock_dir / 'events.ipc'}"
    d = Daemon(
        tmp_sock_dir / "kvd.sock",
        [
            f"events.endpoint={ep}",
            "events.form=array",
            "events.medium_dram=cpu-pinned",
            "events.dp_rank=2",
            # Long rounds and a small journal: a burst of puts overflows it.
            "events.publish_interval_ms=2500",
            "index.journal_changes=1024",
        ],
    )
    d.start()
    ctx = zmq.Context()
    sub = Sub(ctx, connect=ep)
    try:
        c = kvd.Client(str(d.socket), name="events")
        handshake(c, sub)
        ns = c.open_namespace(model=MODEL, dtype="bfloat16", layout="LBHNC", block_tokens=BLOCK, lora="ad1")
        tokens = list(range(7, 7 + 2 * BLOCK))
        keys = kvd.chain_keys(tokens, BLOCK)
        c.lineage(ns, None, keys, tokens)
        for k in keys:
            c.put(ns, k, b"k" * 4096)

        def arrays(evs):
            return any(e[0] == "BlockStored" for e in evs)

        evs = sub.until(arrays)
        assert evs[0] == ["BlockStored", [h(k) for k in keys], None, tokens, BLOCK, None, "cpu-pinned", "ad1", None, 0]
        batch = msgspec.msgpack.decode(sub.got[0][2], type=OldBatch)
        assert batch.data_parallel_rank == 2
        assert batch.events[0].block_hashes == [h(k) for k in keys]
        assert batch.events[0].lora_name == "ad1"

        # 2100 blocks overflow the 1024-change journal (in one round, or the bigger half of two): kvd clears the model's
        # topic and announces everything it holds again.
        many = list(range(50_000, 50_000 + 2100 * BLOCK))
        more = kvd.chain_keys(many, BLOCK)
        for i in range(0, len(more), 200):
            parent = more[i - 1] if i else None
            c.lineage(ns, parent, more[i : i + 200], many[i * BLOCK : (i + 200) * BLOCK])
        for k in more:
            c.put(ns, k, b"m" * 4096)
        total = len(keys) + len(more)

        def resynced(evs):
            if not any(e[0] == "AllBlocksCleared" for e in evs):
                return False
            last = max(i for i, e in enumerate(evs) if e[0] == "AllBlocksCleared")
            return sum(len(e[1]) for e in evs[last:] if e[0] == "BlockStored") >= total

        evs = sub.until(resynced, timeout_s=30)
        last = max(i for i, e in enumerate(evs) if e[0] == "AllBlocksCleared")
        after = {x for e in evs[last:] if e[0] == "BlockStored" for x in e[1]}
        assert after == {h(k) for k in keys + more}
        for _, _, p in sub.got:
            msgspec.msgpack.decode(p, type=OldBatch)
        assert stats(d)["events"]["resyncs"] >= 1
        assert "clearing and re-announcing" in d.log.read_text()
    finally:
        d.stop()
        sub.sock.close()
        ctx.term()


def test_sigterm_writes_dram_to_disk_then_withdraws_the_dram_copies(tmp_sock_dir):
    """On SIGTERM the shutdown drain's disk copies are announced (medium DISK) and every DRAM
    copy is withdrawn (BlockRemoved, medium CPU): the router must not send requests for a
    DRAM tier that is gone, and may keep counting on the disk copies a restart serves."""
    port = free_port()
    ctx = zmq.Context()
    sub = Sub(ctx, bind=f"tcp://127.0.0.1:{port}")
    d = Daemon(tmp_sock_dir / "kvd.sock", events_sets(tmp_sock_dir, port))
    d.start()
    try:
        c, ns = flowing(d, sub)
        tokens = list(range(5000, 5000 + 4 * BLOCK))
        keys = kvd.chain_keys(tokens, BLOCK)
        c.lineage(ns, None, keys, tokens)
        for i, k in enumerate(keys):
            assert c.put(ns, k, bytes([i]) * 8192)
        sub.until(lambda evs: sum(len(e["block_hashes"]) for e in evs if e["medium"] == "CPU") >= 4)
        d.stop()
        assert d.proc.returncode == 0
        evs = sub.until(
            lambda evs: {h(k) for k in keys}
            <= {x for e in evs if e["type"] == "BlockRemoved" and e["medium"] == "CPU" for x in e["block_hashes"]}
        )
        on_disk = [x for e in evs if e["type"] == "BlockStored" and e["medium"] == "DISK" for x in e["block_hashes"]]
        assert sorted(on_disk) == sorted(h(k) for k in keys)
        # The disk copies were announced before the DRAM copies were withdrawn, and nothing
        # told the router to forget the disk copies.
        kinds = [(e["type"], e["medium"]) for e in evs]
        assert kinds.index(("BlockStored", "DISK")) < kinds.index(("BlockRemoved", "CPU"))
        assert ("BlockRemoved", "DISK") not in kinds
        assert not any(e["type"] == "AllBlocksCleared" for e in evs)
        assert "DRAM copies withdrawn at shutdown" in d.log.read_text()
    finally:
        d.stop()
        sub.sock.close()
        ctx.term()
