"""A stand-in inference engine for daemon-driven transfer tests: a paged KV cache shared with
kvd (CUDA tensors through IPC handles with ``--device cuda``; a ``kvd.shareable`` memfd with
``--device cpu``, which a kvd with the ``host`` backend maps), pages filled with content that
any process can regenerate from (seed, round, block), and kvd asked to save and load them.

Modes:
  save   each of ``--rounds`` rounds fills ``--blocks`` random pages and has kvd save them
  load   the same rounds' blocks loaded by kvd into other random pages, every byte compared
  churn  save then load in one process, round after round; prints ``ready`` after the first
         (for tests that kill it mid-transfer)
Prints one JSON line: rounds, blocks, mismatches, seconds. Every loop is bounded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time

import torch

import kvd
from kvd import shareable


def key(seed: int, rnd: int, j: int) -> bytes:
    return hashlib.blake2b(f"{seed}/{rnd}/{j}".encode(), digest_size=32).digest()


def content(seed: int, rnd: int, j: int, shape: tuple[int, int], device: str) -> torch.Tensor:
    """The block's pages (``[layers, page]``), the same in every process."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + rnd * 1009 + j) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=g)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--mode", choices=["save", "load", "churn"], required=True)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--blocks", type=int, default=4, help="blocks per round")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--page", type=int, default=16384, help="bytes of one layer's page")
    ap.add_argument("--pages", type=int, default=64, help="pages per layer buffer")
    a = ap.parse_args()

    shape = (a.layers, a.pages, a.page)
    if a.device == "cuda":
        kv = torch.zeros(shape, dtype=torch.uint8, device="cuda")
    else:
        kv = shareable.empty(shape, torch.uint8)
    client = kvd.Client(a.socket, name=f"gpu-engine-{a.mode}")
    ns = client.open_namespace("gpu-engine", "uint8", f"L{a.layers}x{a.page}", 16)
    shares, layers = shareable.share([kv[layer] for layer in range(a.layers)])
    att = client.gpu_attach(ns, shares, layers)
    rng = random.Random(a.seed * 7 + {"save": 1, "load": 2, "churn": 3}[a.mode])
    mismatches, moved, t0 = 0, 0, time.perf_counter()

    def sync() -> None:
        if a.device == "cuda":
            torch.cuda.synchronize()

    def save(rnd: int) -> None:
        pages = rng.sample(range(a.pages), a.blocks)
        for j, p in enumerate(pages):
            kv[:, p] = content(a.seed, rnd, j, (a.layers, a.page), a.device)
        sync()
        stored = client.gpu_save(att, [key(a.seed, rnd, j) for j in range(a.blocks)], pages)
        if not all(stored):
            raise SystemExit(f"round {rnd}: kvd stored {stored}")

    def load(rnd: int) -> int:
        pages = rng.sample(range(a.pages), a.blocks)
        codes = client.gpu_load(att, [key(a.seed, rnd, j) for j in range(a.blocks)], pages)
        if codes != [kvd.LOADED] * a.blocks:
            raise SystemExit(f"round {rnd}: load codes {codes}")
        bad = 0
        for j, p in enumerate(pages):
            if not torch.equal(kv[:, p], content(a.seed, rnd, j, (a.layers, a.page), a.device)):
                bad += 1
        return bad

    for rnd in range(a.rounds):
        if a.mode in ("save", "churn"):
            save(rnd)
        if a.mode in ("load", "churn"):
            mismatches += load(rnd)
        moved += a.blocks
        if a.mode == "churn" and rnd == 0:
            print("ready", flush=True)
    print(
        json.dumps(
            {
                "mode": a.mode,
                "device": a.device,
                "rounds": a.rounds,
                "blocks": moved,
                "mismatches": mismatches,
                "seconds": round(time.perf_counter() - t0, 3),
            }
        ),
        flush=True,
    )
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
