"""Runs one vLLM (CPU) engine over token-id prompts and prints the results as JSON.

Used by the end-to-end tests and the vLLM benchmark, each run in a fresh process (as a real
engine restart would be):

    python engine_run.py SPEC.json

SPEC: {"model": dir, "prompts": [[ids…]…], "max_tokens": n, "block_size": 32,
       "connector": null | "kvd" | "example", "extra": {…kv_connector_extra_config…},
       "sequential": bool, "max_model_len": n, "prefix_caching": bool,
       "barrier": path, "executor": null | "mp"}
"executor": "mp" runs the model in a separate worker process (the connector's worker role
then lives in another process than its scheduler role).
With "barrier" (sequential only), before prompt i ≥ 1 the runner creates ``<barrier>.<i>.ready``
and waits (at most 120 s) for ``<barrier>.<i>.go``, so a test can stop or start kvd between
prompts of one engine.
Prints one JSON object: {"outputs": [{"tokens": […], "num_cached_tokens": n, "ttft_s": t}…],
"startup_s": t}. With "sequential", prompts run one by one and ttft_s is measured per prompt
(max_tokens=1 makes it a pure prefill time).
"""

from __future__ import annotations

import json
import os
import sys
import time


def wait_for_go(barrier: str, i: int) -> None:
    open(f"{barrier}.{i}.ready", "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(f"{barrier}.{i}.go"):
        if time.monotonic() > deadline:
            raise SystemExit(f"engine_run: nobody released barrier {i}")
        time.sleep(0.05)


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kv = None
    if spec.get("connector") == "kvd":
        kv = KVTransferConfig(
            kv_connector="KvdConnector",
            kv_connector_module_path="kvd.connector",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config=spec.get("extra", {}),
        )
    elif spec.get("connector") == "example":
        kv = KVTransferConfig(
            kv_connector="ExampleConnector",
            kv_role="kv_both",
            kv_connector_extra_config=spec.get("extra", {}),
        )
    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        tokenizer=spec["model"],
        dtype="bfloat16",
        enforce_eager=True,
        block_size=spec.get("block_size", 32),
        max_model_len=spec.get("max_model_len", 2048),
        max_num_batched_tokens=spec.get("max_num_batched_tokens", 8192),
        enable_prefix_caching=spec.get("prefix_caching", True),
        kv_transfer_config=kv,
        distributed_executor_backend=spec.get("executor"),
        seed=0,
    )
    startup = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 8), ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    results = []
    if spec.get("sequential"):
        for i, p in enumerate(prompts):
            if spec.get("barrier") and i > 0:
                wait_for_go(spec["barrier"], i)
            t = time.perf_counter()
            o = llm.generate([p], sp, use_tqdm=False)[0]
            results.append((o, time.perf_counter() - t))
    else:
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        results = [(o, time.perf_counter() - t) for o in outs]
    print(
        "KVD-RESULT "
        + json.dumps(
            {
                "startup_s": startup,
                "outputs": [
                    {
                        "tokens": list(o.outputs[0].token_ids),
                        "num_cached_tokens": o.num_cached_tokens,
                        "ttft_s": dt,
                    }
                    for o, dt in results
                ],
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
