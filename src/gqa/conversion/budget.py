"""`--kv-budget F`: how many KV heads each layer keeps, chosen from measured sensitivities.

Layers differ in how much merging their heads costs. For every layer and every smaller KV-head count it
could have (a divisor of its current count), the sensitivity is the increase of the model's loss on the
calibration blocks when only that layer is merged (by the conversion's own method, without transfer).
All of them are measured in one pass over the layers: the source's residual stream advances layer by
layer, and each merged variant branches off it at its layer and is carried through the remaining source
layers, so every layer's weights are read once. The choice is then a small multiple-choice knapsack:
minimise the summed sensitivities subject to the KV bytes (proportional to the summed KV-head counts)
staying within F of the source's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..attention import divisors
from ..errors import GQAError
from ..model import ModelConfig, make_norm
from .calibration import Stream, build_block


def check_budget(fraction: float, current: list[int]) -> int:
    """The KV heads the budget allows in all (summed over layers), checked against one per layer."""
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise GQAError(f"--kv-budget must be a fraction in (0, 1], got {fraction}")
    allowed = math.floor(fraction * sum(current) + 1e-9)
    if allowed < len(current):
        raise GQAError(f"--kv-budget {fraction:g} allows {allowed} KV heads in all, fewer than one per layer "
                       f"({len(current)} layers, {sum(current)} KV heads now); the smallest budget is "
                       f"{len(current) / sum(current):.4g}")
    return allowed


def choose(sensitivity: list[dict[int, float]], current: list[int], allowed: int) -> list[int]:
    """Per-layer KV heads minimising the summed loss increases with at most `allowed` heads in all (exact DP).
    sensitivity[l][g]: loss increase of layer l at g heads (its current count costs 0)."""
    best = {0: (0.0, [])}  # heads used so far -> (cost, choice)
    for layer, g_now in enumerate(current):
        options = {**sensitivity[layer], g_now: 0.0}
        nxt: dict[int, tuple[float, list[int]]] = {}
        for used, (cost, picks) in best.items():
            for g, extra in options.items():
                if used + g <= allowed and (used + g not in nxt or cost + extra < nxt[used + g][0]):
                    nxt[used + g] = (cost + extra, picks + [g])
        best = nxt
    return min(best.values(), key=lambda v: (v[0], -sum(v[1])))[1]


@torch.no_grad()
def lm_loss(hidden: torch.Tensor, targets: torch.Tensor, norm, output: torch.Tensor) -> float:
    """Mean next-token loss of hidden states [blocks, T, d] through the final norm and the output head."""
    total = 0.0
    for start in range(0, len(hidden), 4):
        logits = norm(hidden[start:start + 4]) @ output.T
        total += float(F.cross_entropy(logits.flatten(0, 1), targets[start:start + 4].flatten(), reduction="sum"))
    return total / targets.numel()


def measure_layer(config: ModelConfig, layer: int, state: dict, stream: Stream, branches: dict, merge: Callable):
    """Advance the stream and every branch through one layer, and start this layer's branches (merged to
    each smaller G). A function of its own so that the layer's tensors are released before the next is read."""
    block = build_block(config, layer, state)
    inputs = stream.attention_inputs(block)
    for key, hidden in branches.items():  # variants merged below this layer read it as the source has it
        branches[key] = Stream(hidden, stream.rope, stream.targets).advanced(block)
    for g in divisors(config.n_kv_heads[layer])[:-1]:
        merged = merge(layer, state, inputs, g, block)
        n_kv = [g if i == layer else n for i, n in enumerate(config.n_kv_heads)]
        variant = build_block(replace(config, n_kv_heads=n_kv), layer, merged)
        branches[(layer, g)] = Stream(stream.hidden.clone(), stream.rope, stream.targets).advanced(variant)
    stream.advance(block)


@torch.no_grad()
def measure(config: ModelConfig, read_layer: Callable[[int], dict], stream: Stream, head: dict[str, torch.Tensor],
            merge: Callable, progress: Callable = iter) -> dict:
    """Loss increase of every single-layer merge. read_layer(l) -> that layer's gqa tensors;
    merge(l, state, inputs, g, block) -> the layer's state with its attention merged to g KV heads."""
    branches: dict[tuple[int, int], torch.Tensor] = {}
    for layer in progress(range(config.n_layers)):
        measure_layer(config, layer, read_layer(layer), stream, branches, merge)
    with torch.device("meta"):
        norm = make_norm(config)
    norm.load_state_dict({k.removeprefix("norm."): v.float() for k, v in head.items() if k.startswith("norm.")},
                         assign=True)
    output = head["tok_embeddings.weight" if config.tie_embeddings else "output.weight"].float()
    base = lm_loss(stream.hidden, stream.targets, norm, output)
    increase = [{} for _ in range(config.n_layers)]
    for (layer, g), hidden in branches.items():
        increase[layer][g] = lm_loss(hidden, stream.targets, norm, output) - base
    return {"loss": base, "increase": increase}
