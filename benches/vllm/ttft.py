"""Time to first token on vLLM (CPU) for one long prompt: kvd hit vs recompute vs vLLM's
ExampleConnector (safetensors on local disk), measured in the same run on the same machine.

    python benches/vllm/ttft.py --socket /run/kvd/kvd.sock [--tokens 2048] [--repeat 3] [--json]

Needs a running kvd (``--spawn`` starts one from ``$KVD_BIN_DIR``/target) and the vLLM venv
(``scripts/vllm-env.sh``); builds a random Llama large enough for prefill to take seconds.
Each mode runs in fresh engine processes with vLLM's own prefix cache off: a "store" engine
computes the prompt once (saving its KV), then a new engine times the prompt ``--repeat``
times (``max_tokens=1``, so each timing is prefill + one token). ``vllm-local`` is vLLM's own
in-memory prefix cache hitting in the same engine: the floor, with nothing to copy. Reports
the median TTFT per mode and the ratios, plus kvd's load rate (from the connector's log) next
to a single-thread memcpy of the same size measured in the same run; nothing is judged
pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "python" / "tools"
sys.path.insert(0, str(TOOLS))
from tiny_model import build  # noqa: E402

from kvd_spawn import kvd_socket  # noqa: E402


def engine(spec: dict, log: Path) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="4")
    try:
        p = subprocess.run(
            [sys.executable, str(TOOLS / "engine_run.py"), f.name],
            capture_output=True, text=True, env=env, timeout=1800,
        )
    finally:
        os.unlink(f.name)
    with open(log, "a") as out:
        out.write(p.stdout + p.stderr)
    line = next((l for l in p.stdout.splitlines() if l.startswith("KVD-RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise SystemExit(f"engine failed ({p.returncode}); see {log}")
    return json.loads(line.removeprefix("KVD-RESULT "))


def load_rates(log: Path) -> list[tuple[float, float]]:
    """(bytes, GB/s) of every load the kvd connector logged."""
    import re

    pat = re.compile(r"kvd: loaded \d+ blocks \(([\d.]+) MiB\) for request \S+ in [\d.]+ ms \(([\d.]+) GB/s\)")
    return [(float(m[1]) * 2**20, float(m[2])) for m in pat.finditer(log.read_text())]


def progress(msg: str) -> None:
    print(f"[ttft] {msg}", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", help="kvd control socket (default $KVD_SOCKET)")
    ap.add_argument("--spawn", action="store_true", help="start a private kvd for the run")
    ap.add_argument("--tokens", type=int, default=2048, help="prompt length")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per mode (median reported)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--model-dir", default=str(Path.home() / ".cache" / "kvd" / "models"))
    ap.add_argument("--json", action="store_true", help="print one JSON object per mode")
    args = ap.parse_args()

    with kvd_socket(args.spawn, args.socket, 2 << 30) as socket:
        return run(args, socket)


def run(args: argparse.Namespace, socket: str) -> int:
    work = Path(tempfile.mkdtemp(prefix="kvd-ttft-", dir="/tmp"))
    log = work / "engines.log"
    try:
        progress(f"building a random Llama (hidden {args.hidden}, {args.layers} layers) …")
        model = build(
            str(Path(args.model_dir) / f"bench-llama-h{args.hidden}-l{args.layers}"),
            hidden=args.hidden, layers=args.layers, heads=args.hidden // 64,
            kv_heads=max(1, args.hidden // 128), vocab=4096, max_pos=args.tokens + 64,
        )
        import random

        rnd = random.Random(11)
        prompt = [rnd.randrange(4, 4096) for _ in range(args.tokens)]
        warm = [rnd.randrange(4, 4096) for _ in range(64)]
        base = {
            "model": model, "max_tokens": 1, "block_size": 32, "sequential": True,
            "prefix_caching": False, "max_model_len": args.tokens + 64,
            "max_num_batched_tokens": args.tokens + 64,
        }
        timed = [warm] + [prompt] * args.repeat
        modes = {}

        progress("recompute: no connector …")
        r = engine({**base, "prompts": timed, "connector": None}, log)
        modes["recompute"] = r

        progress("kvd: store engine, then a fresh engine timing hits …")
        kv_extra = {"socket": socket}
        engine({**base, "prompts": [prompt], "connector": "kvd", "extra": kv_extra}, log)
        modes["kvd"] = engine({**base, "prompts": timed, "connector": "kvd", "extra": kv_extra}, log)

        progress("vLLM's own prefix cache (the floor: nothing to copy) …")
        local = engine({**base, "prefix_caching": True, "prompts": [warm, prompt] + [prompt] * args.repeat,
                        "connector": None}, log)
        local["outputs"] = local["outputs"][:1] + local["outputs"][2:]
        modes["vllm-local"] = local

        progress("ExampleConnector: store engine, then a fresh engine timing loads …")
        ex_dir = work / "example-store"
        ex_dir.mkdir()
        ex_extra = {"shared_storage_path": str(ex_dir)}
        engine({**base, "prompts": [prompt], "connector": "example", "extra": ex_extra}, log)
        modes["example"] = engine(
            {**base, "prompts": timed, "connector": "example", "extra": ex_extra}, log
        )
        summary = {}
        for name, res in modes.items():
            outs = res["outputs"][1:]
            summary[name] = {
                "ttft_s": statistics.median(o["ttft_s"] for o in outs),
                "cached_tokens": outs[-1]["num_cached_tokens"],
                "runs": [round(o["ttft_s"], 4) for o in outs],
            }
        # kvd's own load path: the connector logs bytes and time of every load; compare with a
        # single-thread memcpy of the same size, measured now.
        loads = load_rates(log)
        if loads:
            import numpy as np

            nbytes = int(loads[-1][0])
            a = np.ones(nbytes, dtype=np.uint8)
            b = np.empty_like(a)
            times = []
            for _ in range(7):
                t = time.perf_counter()
                np.copyto(b, a)
                times.append(time.perf_counter() - t)
            memcpy = nbytes / statistics.median(times) / 1e9
            kvd_gbps = statistics.median(r for _, r in loads)
            summary["kvd"]["load_gbps"] = kvd_gbps
            summary["kvd"]["load_bytes"] = nbytes
            summary["kvd"]["memcpy_gbps"] = memcpy
            summary["kvd"]["load_vs_memcpy"] = kvd_gbps / memcpy
        rec = summary["recompute"]["ttft_s"]
        ex = summary["example"]["ttft_s"]
        for name, s in summary.items():
            s["speedup_vs_recompute"] = rec / s["ttft_s"]
            s["speedup_vs_example"] = ex / s["ttft_s"]
        if summary["kvd"]["cached_tokens"] == 0:
            raise SystemExit(f"kvd served no hit (see {log}): the comparison would be meaningless")
        first = modes["recompute"]["outputs"][1]["tokens"]
        for name in ("kvd", "example"):
            if modes[name]["outputs"][1]["tokens"] != first:
                progress(f"warning: {name}'s first token differs from recompute's")
        if args.json:
            for name, s in summary.items():
                print(json.dumps({"bench": "vllm_ttft", "mode": name, "prompt_tokens": args.tokens,
                                  "hidden": args.hidden, "layers": args.layers, **s}))
        else:
            print(f"TTFT, {args.tokens}-token prompt, random Llama h{args.hidden} x{args.layers} "
                  f"(median of {args.repeat}):")
            print(f"{'mode':<10} {'ttft':>9} {'cached':>7} {'vs recompute':>13} {'vs example':>11}")
            for name, s in summary.items():
                print(f"{name:<10} {s['ttft_s']*1000:>7.1f}ms {s['cached_tokens']:>7} "
                      f"{s['speedup_vs_recompute']:>12.2f}x {s['speedup_vs_example']:>10.2f}x")
            k = summary["kvd"]
            if "load_gbps" in k:
                print(f"kvd load path: {k['load_bytes'] / 2**20:.1f} MiB at {k['load_gbps']:.2f} GB/s "
                      f"= {k['load_vs_memcpy']:.2f}x single-thread memcpy ({k['memcpy_gbps']:.2f} GB/s)")
        return 0
    finally:
        shutil.rmtree(work / "example-store", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
