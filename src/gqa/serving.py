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

from .bench import spread
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
    import torch

    from .checkpoints import read_model_config

    element = getattr(torch, dtype).itemsize
    return read_model_config(path)[0].kv_bytes_per_token(element)


def summarize(result: dict, dtype: str) -> dict:
    """Per model: capacity, largest concurrency at 2k / 8k; per point, the decode speed (time per output token,
    of the request that started decoding last) and the end-to-end rate of the whole batch (output tokens
    over the round's wall time, prefill included), each with its spread and next to the first model's (the
    source): realised speed-ups beside the KV-bytes ratio. Decode rates are given only where every request
    of the point fits in the cache at once: beyond that vLLM queues the rest, and the last request decodes
    beside fewer others."""
    models = result["models"]
    source = models[0]["model"]
    kv = {m["model"]: kv_bytes_per_token(m["model"], dtype) for m in models}
    blocks = {m["model"]: m["kv_blocks"] for m in models}
    block_size = {m["model"]: m["block_size"] for m in models}
    rows = []
    for m in models:
        rows.append({"model": m["model"], "kv_bytes_per_token": kv[m["model"]], "kv_tokens": m["kv_tokens"],
                     "capacity_vs_source": m["kv_tokens"] / models[0]["kv_tokens"],
                     "kv_bytes_ratio_vs_source": kv[source] / kv[m["model"]],
                     "max_concurrency": {str(ctx): m["kv_blocks"] // math.ceil(ctx / m["block_size"]) for ctx in CONTEXTS},
                     "start_seconds": m["start_seconds"]})
    points = []
    for p in result["points"]:
        rounds = p["rounds"]
        tpot = {path: statistics.median(r["tpot_s"] for r in rs) for path, rs in rounds.items()}
        wall = {path: statistics.median(r["wall_s"] for r in rs) for path, rs in rounds.items()}
        entry = {"concurrency": p["concurrency"], "context": p["context"], "new_tokens": p["new_tokens"], "models": {}}
        for path, rs in rounds.items():
            fits = p["concurrency"] <= blocks[path] // math.ceil(p["context"] / block_size[path])
            both_fit = fits and p["concurrency"] <= blocks[source] // math.ceil(p["context"] / block_size[source])
            entry["models"][path] = {
                "fits": fits,
                "tpot_ms": spread([r["tpot_s"] * 1e3 for r in rs]),
                "decode_tokens_per_s": p["concurrency"] / tpot[path] if fits else None,
                "decode_speedup_vs_source": tpot[source] / tpot[path] if both_fit else None,
                "wall_s": spread([r["wall_s"] for r in rs]),
                "end_to_end_tokens_per_s": p["concurrency"] * p["new_tokens"] / wall[path],
                "end_to_end_speedup_vs_source": wall[source] / wall[path],
                "kv_bytes_ratio_vs_source": kv[source] / kv[path],
                "preemptions": sum(r["preemptions"] for r in rs),
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
    lines += ["", "| concurrency × context | model | all at once | time per output token, ms: median (range) | "
              "decode tok/s | decode speed-up | batch wall s: median (range) | end-to-end tok/s | end-to-end "
              "speed-up | KV-bytes ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in summary["points"]:
        for path, r in p["models"].items():
            t, w = r["tpot_ms"], r["wall_s"]
            decode = f"{r['decode_tokens_per_s']:.1f}" if r["decode_tokens_per_s"] else "—"
            speedup = f"{r['decode_speedup_vs_source']:.2f}" if r["decode_speedup_vs_source"] else "—"
            lines.append(f"| {p['concurrency']} × {p['context']} | {name(path)} | {'yes' if r['fits'] else 'no'} | "
                         f"{t['median']:.1f} ({t['min']:.1f}–{t['max']:.1f}) | {decode} | {speedup} | "
                         f"{w['median']:.1f} ({w['min']:.1f}–{w['max']:.1f}) | {r['end_to_end_tokens_per_s']:.1f} | "
                         f"{r['end_to_end_speedup_vs_source']:.2f} | {r['kv_bytes_ratio_vs_source']:.2f} |")
    return "\n".join(lines)
