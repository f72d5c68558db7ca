"""Runs jobs in vLLM's own engine, for `gqa.runtimes.vllm_runtime`: started with the Python that has vLLM, which is
often not gqa's (vLLM's CPU build pins its own torch and transformers), so it imports only the standard
library and vLLM, never gqa.

    python vllm_worker.py JOB.json RESULT.json

A job is JSON: {"task": "generate" | "serve", "models": [folder, ...], "engine": {LLM keyword arguments}, ...}.
- generate: each model in turn, one engine at a time: greedy tokens and their log-probabilities for
  "prompts" (lists of token ids), and the KV capacity vLLM allocated.
- serve: one engine per model, all alive together, so the models take turns round by round on the same
  machine state: at each (concurrency, context) point, `concurrency` requests of `context - new_tokens`
  prompt tokens each generate `new_tokens` tokens. A warm-up round puts the prompts in vLLM's prefix cache
  (where they fit), so timed rounds are mostly decode; the time per output token is read off the request
  that started decoding last, after every prompt of the round was prefilled, so no prefill is in it.

Engines run in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, the uni-process executor): a spawned
engine core and worker would each import vLLM again (~10 s apiece on a small CPU).
"""

import gc
import json
import os
import random
import sys
import time
import traceback

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def engine(path, settings):
    from vllm import LLM

    return LLM(path, distributed_executor_backend="uni", disable_log_stats=False, **settings)


def capacity(llm):
    """KV-cache tokens the engine allocated, and its block size."""
    cache = llm.llm_engine.vllm_config.cache_config
    return {"kv_blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
            "kv_tokens": cache.num_gpu_blocks * cache.block_size}


def generate(job):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0, ignore_eos=True, logprobs=1)
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    results = []
    for path in job["models"]:
        try:
            llm = engine(path, job["engine"])
            outs = llm.generate(prompts, params, use_tqdm=False)
            results.append({"model": path, **capacity(llm),
                            "tokens": [list(o.outputs[0].token_ids) for o in outs],
                            "logprobs": [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                                         for o in outs]})
            del llm
        except Exception as e:  # one model vLLM cannot load must not hide the others' results
            results.append({"model": path, "error": f"{type(e).__name__}: {' '.join(str(e).split())}"[:2000]})
        gc.collect()
    return {"results": results}


def timed_round(llm, prompts, params):
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    last = max(outs, key=lambda o: o.metrics.first_token_ts)  # decoding only after every prefill
    m = last.metrics
    tpot = (m.last_token_ts - m.first_token_ts) / max(1, m.num_generation_tokens - 1)
    return {"wall_s": wall, "tpot_s": tpot, "preemptions": sum(o.metrics.num_preemptions for o in outs),
            "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}


def serve(job):
    from vllm import SamplingParams

    rng = random.Random(job.get("seed", 0))
    engines = {}
    for path in job["models"]:
        start = time.perf_counter()
        engines[path] = engine(path, job["engine"])
        engines[path].start_seconds = time.perf_counter() - start
    vocab, n = job["vocab_size"], job["new_tokens"]
    pools = {}  # context -> prompts: a point takes the first `concurrency`, so points of one context share them
    points = []
    for concurrency, context in job["points"]:
        pool = pools.setdefault(context, [])
        while len(pool) < concurrency:
            pool.append({"prompt_token_ids": [rng.randrange(16, vocab) for _ in range(context - n)]})
        prompts = pool[:concurrency]
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        rounds = {path: [] for path in engines}
        for llm in engines.values():  # warm-up: fills the prefix cache, compiles what is compiled lazily
            timed_round(llm, prompts, params)
        order = list(engines)
        for r in range(job["rounds"]):
            for path in order if r % 2 == 0 else order[::-1]:  # turns alternate, so no model always goes first
                rounds[path].append(timed_round(engines[path], prompts, params))
        points.append({"concurrency": concurrency, "context": context, "new_tokens": n, "rounds": rounds})
        print(f"point {concurrency} x {context}: done", file=sys.stderr, flush=True)
    models = [{"model": path, "start_seconds": llm.start_seconds, **capacity(llm)} for path, llm in engines.items()]
    return {"models": models, "points": points}


def versions():
    import platform

    import torch
    import transformers
    import vllm

    return {"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def main():
    job_file, result_file = sys.argv[1], sys.argv[2]
    with open(job_file) as f:
        job = json.load(f)
    try:
        result = {"generate": generate, "serve": serve}[job["task"]](job)
        result["versions"] = versions()
    except Exception as e:
        result = {"error": f"{type(e).__name__}: {' '.join(str(e).split())}"[:2000], "traceback": traceback.format_exc()}
    with open(result_file + ".partial", "w") as f:
        json.dump(result, f)
    os.replace(result_file + ".partial", result_file)


if __name__ == "__main__":  # vLLM may spawn processes that import this module: work only when run
    main()
