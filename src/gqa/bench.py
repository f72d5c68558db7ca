"""Speed and memory measurements. Timing lives here and in benchmarks/, never in tests."""

from __future__ import annotations

import statistics
import time

import torch

from .model import Transformer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode_tokens_per_s(
    model: Transformer, batch_size: int = 8, context: int = 384, new_tokens: int = 32, repeats: int = 3, seed: int = 0
) -> float:
    """Greedy decode throughput (tokens/s over the batch) after a prefill of `context` random tokens.

    Only the decode steps are timed: each reads every weight and the whole KV cache once, which is where
    G KV heads instead of H pay off. The median of `repeats` runs.
    """
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch_size, context), generator=generator).to(model.device)
    rates = []
    for _ in range(repeats):
        cache = model.new_cache(batch_size, context + new_tokens)
        token = model(prompt, cache=cache)[:, -1:].argmax(-1)
        synchronize(model.device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = model(token, cache=cache)[:, -1:].argmax(-1)
        synchronize(model.device)
        rates.append(batch_size * new_tokens / (time.perf_counter() - start))
    return statistics.median(rates)
