"""The serving benchmark, in vLLM's own engine: what fewer KV heads buy where models are served.

For a source model and its conversions, at one fixed KV-cache memory: the KV capacity in tokens as vLLM
allocates it, the most sequences that fit at 2k and 8k tokens of context, and, at (concurrency, context)
points, the time per output token and output tokens/s of decoding, the models taking turns round by round
(`gqa.runtimes.vllm_worker`, task "serve"), as the median and range of the rounds. Each model's figures
stand next to the source's: the realised speed-up beside the KV-bytes ratio. Where a decode step is bound
by reading the KV cache the two approach each other; where it is bound by the weights or by arithmetic,
the speed-up stays near 1 and what GQA buys is the capacity.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from .errors import GQAError

CONTEXTS = (2048, 8192)  # the contexts whose largest concurrency is reported


def parse_points(text: str) -> list[tuple[int, int]]:
    """'1x2048,8x2048' -> [(1, 2048), (8, 2048)]: (concurrency, context) pairs."""
    points = []
    for part in (p for p in text.split(",") if p.strip()):
        try:
            concurrency, context = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise GQAError(f"--points takes CONCURRENCYxCONTEXT pairs like 8x2048, got {part!r}") from None
        if concurrency < 1 or context < 2:
            raise GQAError(f"--points: concurrency must be >= 1 and context >= 2, got {part!r}")
        points.append((concurrency, context))
    if not points:
        raise GQAError("--points names no point")
    return points


def serve_job(models: list[str], *, points: list[tuple[int, int]], kv_cache_gb: float, new_tokens: int,
              rounds: int, dtype: str, enforce_eager: bool, seed: int = 0) -> dict:
    """The worker job for `models` (checked: same vocabulary, every point within their positions)."""
    from .checkpoints import read_model_config

    configs = [read_model_config(m)[0] for m in models]
    if len({c.vocab_size for c in configs}) > 1:
        raise GQAError("the models have different vocabularies; compare a model with its own conversions")
    longest = max(context for _, context in points)
    positions = min(c.max_positions for c in configs)
    if longest > positions:
        raise GQAError(f"--points asks for {longest} tokens of context, but a model has {positions} positions")
    if any(context <= new_tokens for _, context in points):
        raise GQAError(f"every point's context must exceed --new-tokens {new_tokens} (the prompt is the rest)")
    engine = {"dtype": dtype, "kv_cache_memory_bytes": int(kv_cache_gb * 1024**3), "max_model_len": longest,
              "enforce_eager": enforce_eager, "seed": seed, "trust_remote_code": True, "enable_prefix_caching": True}
    return {"task": "serve", "models": [str(m) for m in models], "engine": engine, "points": points,
            "new_tokens": new_tokens, "rounds": rounds, "seed": seed, "vocab_size": configs[0].vocab_size}


def kv_bytes_per_token(path: str, dtype: str) -> int:
    from .checkpoints import read_model_config

    element = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    return read_model_config(path)[0].kv_bytes_per_token(element)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(result: dict, dtype: str) -> dict:
    """Per model: capacity, largest concurrency at 2k / 8k, and per point the decode speed with its spread,
    each next to the first model's (the source): realised speed-up and KV-bytes ratio."""
    models = result["models"]
    source = models[0]["model"]
    kv = {m["model"]: kv_bytes_per_token(m["model"], dtype) for m in models}
    rows = []
    for m in models:
        blocks_per_sequence = {ctx: math.ceil(ctx / m["block_size"]) for ctx in CONTEXTS}
        rows.append({"model": m["model"], "kv_bytes_per_token": kv[m["model"]], "kv_tokens": m["kv_tokens"],
                     "capacity_vs_source": m["kv_tokens"] / models[0]["kv_tokens"],
                     "kv_bytes_ratio_vs_source": kv[source] / kv[m["model"]],
                     "max_concurrency": {str(ctx): m["kv_blocks"] // n for ctx, n in blocks_per_sequence.items()},
                     "start_seconds": m["start_seconds"]})
    points = []
    for p in result["points"]:
        tpot = {path: [r["tpot_s"] for r in rounds] for path, rounds in p["rounds"].items()}
        entry = {"concurrency": p["concurrency"], "context": p["context"], "new_tokens": p["new_tokens"], "models": {}}
        for path, values in tpot.items():
            median = statistics.median(values)
            entry["models"][path] = {
                "tpot_ms": spread([v * 1e3 for v in values]),
                "output_tokens_per_s": p["concurrency"] / median,
                "speedup_vs_source": statistics.median(tpot[source]) / median,
                "kv_bytes_ratio_vs_source": kv[source] / kv[path],
                "wall_s": spread([r["wall_s"] for r in p["rounds"][path]]),
                "preemptions": sum(r["preemptions"] for r in p["rounds"][path]),
            }
        points.append(entry)
    return {"models": rows, "points": points}


def bench_serve(models: list[str], *, points: list[tuple[int, int]], kv_cache_gb: float = 2.0, new_tokens: int = 32,
                rounds: int = 5, dtype: str = "float32", enforce_eager: bool = False,
                log: str | Path | None = None) -> dict:
    """Run the serving benchmark (see the module docstring); returns the raw rounds and their summary."""
    from .runtimes.vllm_runtime import run_job

    job = serve_job(models, points=points, kv_cache_gb=kv_cache_gb, new_tokens=new_tokens, rounds=rounds,
                    dtype=dtype, enforce_eager=enforce_eager)
    result = run_job(job, log=log)
    return {"job": job, "raw": result, "versions": result["versions"], "summary": summarize(result, dtype)}


def table(summary: dict, names: dict[str, str] | None = None) -> str:
    """The summary as Markdown: capacity per model, then the decode speed per point."""
    names = names or {}

    def name(path):
        return names.get(path, Path(path).name)

    lines = ["| model | KV bytes/token | KV capacity (tokens) | × source | KV-bytes ratio | max concurrency 2k | "
             "max concurrency 8k |", "|---|---|---|---|---|---|---|"]
    for m in summary["models"]:
        lines.append(f"| {name(m['model'])} | {m['kv_bytes_per_token']:,} | {m['kv_tokens']:,} | "
                     f"{m['capacity_vs_source']:.2f} | {m['kv_bytes_ratio_vs_source']:.2f} | "
                     f"{m['max_concurrency']['2048']} | {m['max_concurrency']['8192']} |")
    lines += ["", "| concurrency × context | model | time per output token, ms (median, range) | output tok/s | "
              "speed-up vs source | KV-bytes ratio |", "|---|---|---|---|---|---|"]
    for p in summary["points"]:
        for path, r in p["models"].items():
            t = r["tpot_ms"]
            lines.append(f"| {p['concurrency']} × {p['context']} | {name(path)} | {t['median']:.1f} "
                         f"({t['min']:.1f}–{t['max']:.1f}) | {r['output_tokens_per_s']:.1f} | "
                         f"{r['speedup_vs_source']:.2f} | {r['kv_bytes_ratio_vs_source']:.2f} |")
    return "\n".join(lines)
