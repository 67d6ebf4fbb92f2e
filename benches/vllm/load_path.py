"""The connector's copy path alone: engine-shaped pages in and out of kvd, beside memcpy.

    python benches/vllm/load_path.py --spawn [--blocks 64] [--layers 12] [--page-kib 64] [--json]

A block is ``--layers`` pages of ``--page-kib`` KiB; the engine cache is one numpy allocation,
block-major, so each layer is a strided ``[blocks, page]`` view (the shape vLLM hands the
connector). Times ``save_blocks`` (into fresh keys) and ``load_blocks`` with and without
checksum verification, and a single-thread ``numpy.copyto`` of the same bytes between two
touched buffers in the same run; prints GB/s and the ratio to memcpy (median of ``--rounds``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

import kvd
from kvd_spawn import kvd_socket


def timed(rounds: int, f) -> float:
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", help="kvd control socket (default $KVD_SOCKET)")
    ap.add_argument("--spawn", action="store_true", help="start a private kvd for the run")
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--page-kib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    nb, nl, page = args.blocks, args.layers, args.page_kib * 1024
    nbytes = nb * nl * page
    arena = max(256 << 20, 3 * nbytes)  # LRU evicts the older rounds of saves
    with kvd_socket(args.spawn, args.socket, arena) as socket:
        return run(args, socket, nb, nl, page, nbytes)


def run(args: argparse.Namespace, socket: str, nb: int, nl: int, page: int, nbytes: int) -> int:
    c = kvd.Client(socket, name="load-path-bench")
    ns = c.open_namespace("load-path-bench", "uint8", f"L{nl}x{page}", 32)
    src = np.random.default_rng(0).integers(0, 256, (nb, nl, page), dtype=np.uint8)
    dst = np.ones_like(src)
    src_layers = [src[:, i] for i in range(nl)]
    dst_layers = [dst[:, i] for i in range(nl)]
    ids = list(range(nb))
    rnd = [0]

    def save():
        rnd[0] += 1
        keys = kvd.chain_keys(list(range(nb * 32)), 32, first_extra=str(rnd[0]).encode())
        assert all(c.save_blocks(ns, keys, ids, src_layers))

    keys = kvd.chain_keys(list(range(nb * 32)), 32)
    c.save_blocks(ns, keys, ids, src_layers)
    deadline = time.monotonic() + 30
    while not c._testing_corrupt(ns, keys[-1]):  # wait until the daemon sealed checksums
        if time.monotonic() > deadline:
            raise SystemExit("blocks were never checksummed")
        time.sleep(0.01)

    def load(verify):
        codes = c.load_blocks(ns, keys, ids, dst_layers, verify=verify)
        assert all(x == kvd.LOADED for x in codes)

    flat_a, flat_b = np.ones(nbytes, dtype=np.uint8), np.zeros(nbytes, dtype=np.uint8)
    memcpy = nbytes / timed(args.rounds, lambda: np.copyto(flat_b, flat_a)) / 1e9
    rows = {
        "load": nbytes / timed(args.rounds, lambda: load(False)) / 1e9,
        "load+verify": nbytes / timed(args.rounds, lambda: load(True)) / 1e9,
    }
    assert (dst == src).all()
    # Saves go to fresh keys each round (LRU evicts older rounds), so they come last.
    rows["save"] = nbytes / timed(args.rounds, save) / 1e9
    for op, g in rows.items():
        rec = {"bench": "connector_copy_path", "op": op, "bytes": nbytes, "layers": nl,
               "page_bytes": page, "gbps": g, "memcpy_gbps": memcpy, "ratio": g / memcpy}
        if args.json:
            print(json.dumps(rec))
        else:
            print(f"{op:<12} {nbytes / 2**20:7.1f} MiB  {g:6.2f} GB/s  "
                  f"= {g / memcpy:.2f}x memcpy ({memcpy:.2f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
