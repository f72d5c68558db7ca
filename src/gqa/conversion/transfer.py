"""Layer-wise attention transfer: train each converted layer's attention to reproduce the source layer's.

A merge (any method) leaves each layer's attention computing something close to, but not the same as, the
source's. Transfer trains only that attention (W_q, the shared W_k / W_v, W_o, their biases; everything
else frozen) to reproduce the source attention's output on the calibration blocks (LoLCATs' attention
transfer, here for GQA): a regression per layer, independent of the other layers, so it streams with one
layer in memory and takes CPU-minutes, not the GPU-weeks of uptraining.

The inputs a layer trains on are the source model's own activations (`inputs="original"`), or those of the
converted layers below it (`inputs="converted"`), so a layer can also correct what the layers before it
changed. The loss is the mean squared error relative to the target's mean square; Adam with a short
warm-up and cosine decay, its step size relative to each projection's weight scale; batches drawn from a
generator seeded by (seed, layer), so a layer's result does not depend on the others or on where an
interrupted run resumed. A layer whose error did not go down keeps its merge. Matmuls run in bf16 where
this CPU (or GPU) does that faster, in fp32 elsewhere.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from ..errors import GQAError
from ..model import Attention, ModelConfig
from .heads import NAMES, AttentionWeights

INPUTS = ("original", "converted")


@dataclass(frozen=True)
class TransferSettings:
    steps: int
    # relative: each tensor's Adam step size is lr x the RMS of its projection's weights. On SmolLM2 -> MQA
    # (layer 11, 300 steps) the error left was 0.222 at 0.005, 0.186 at 0.015, 0.165 at 0.04.
    lr: float = 0.04
    batch_blocks: int = 4
    inputs: str = "original"
    seed: int = 0
    precision: str = "auto"  # matmuls in "float32", "bfloat16" (autocast), or "auto": bf16 where it is faster here

    def check(self) -> None:
        if self.steps < 0:
            raise GQAError(f"--transfer-steps must be >= 0, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise GQAError(f"--transfer-lr must be a finite number > 0, got {self.lr}")
        if self.inputs not in INPUTS:
            raise GQAError(f"--transfer-inputs must be one of {', '.join(INPUTS)}, got {self.inputs!r}")
        if self.precision not in ("auto", "float32", "bfloat16"):
            raise GQAError(f"transfer precision must be auto, float32 or bfloat16, got {self.precision!r}")


def attention_module(config: ModelConfig, layer: int, weights: AttentionWeights) -> Attention:
    """An Attention module holding `weights` (float32, trainable), with as many KV heads as they have."""
    n_kv = [weights.n_kv_heads if i == layer else g for i, g in enumerate(config.n_kv_heads)]
    with torch.device("meta"):
        module = Attention(replace(config, n_kv_heads=n_kv), layer)
    return load_weights(module, weights)


def load_weights(module: torch.nn.Module, weights: AttentionWeights) -> torch.nn.Module:
    """`module` (built on the meta device) holding a float32, trainable copy of `weights`."""
    state = {name: getattr(weights, part).float().clone() for part, name in NAMES.items()
             if getattr(weights, part) is not None}
    module.load_state_dict(state, assign=True, strict=True)
    return module


def weights_of(module: Attention, like: AttentionWeights) -> AttentionWeights:
    params = dict(module.named_parameters())
    return AttentionWeights(**{part: params[name].detach().to(like.wq.dtype) if name in params else None
                               for part, name in NAMES.items()}, head_dim=like.head_dim)


def transfer_layer(config: ModelConfig, layer: int, weights: AttentionWeights, inputs: torch.Tensor,
                   targets: torch.Tensor, *, rope, settings: TransferSettings,
                   progress: bool = True) -> tuple[AttentionWeights, dict]:
    """Train one layer's attention on (inputs, targets) [blocks, T, d]; returns the weights and the relative
    error before and after (on all calibration blocks)."""
    module = attention_module(config, layer, weights)
    trained = fit_to_targets(module, lambda m, blocks: m(inputs[blocks], rope=rope), targets,
                             settings, key=layer, desc=f"transfer layer {layer}", progress=progress)
    return (weights, trained) if trained.get("kept") else (weights_of(module, weights), trained)


def fit_to_targets(module: torch.nn.Module, forward, targets: torch.Tensor, settings: TransferSettings, *,
                   key: int, desc: str, progress: bool = True) -> dict:
    """Train `module` (in place) so that `forward(module, blocks)` (blocks: an index into the calibration
    blocks) gives `targets[blocks]`; returns the relative error before and after on every block, with
    `kept: "merge"` (and the module's weights not to be used) where training did not lower it. `key`
    seeds the batch draw (a layer's own)."""
    scale = targets.pow(2).mean()
    before = relative_error(module, forward, targets, scale)
    if settings.steps == 0:
        return {"relative_error_before": before, "relative_error_after": before}
    optimizer = torch.optim.Adam(relative_groups(module, settings.lr))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: ramped_cosine(s, settings.steps))
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + key)
    batch = min(settings.batch_blocks, len(targets))
    bf16 = matmul_precision(settings.precision) == "bfloat16"
    for _ in tqdm(range(settings.steps), desc=desc, unit="step", disable=not progress, leave=False):
        index = torch.randint(len(targets), (batch,), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = forward(module, index)
        loss = (out.float() - targets[index]).pow(2).mean() / scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    after = relative_error(module, forward, targets, scale)
    if after >= before:  # training never leaves a layer worse on its calibration than the merge it started from
        return {"relative_error_before": before, "relative_error_after": before, "kept": "merge"}
    return {"relative_error_before": before, "relative_error_after": after}


def ramped_cosine(step: int, steps: int) -> float:
    """The conversion stages' step-size factor: a linear ramp over the first 5 % of the steps, times a cosine
    from 1 to 0 over all of them (the layer-wise transfer and the joint stage)."""
    return min(1.0, (step + 1) / max(1, steps // 20)) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))


def relative_groups(module: torch.nn.Module, lr: float) -> list[dict]:
    """One Adam group per tensor with a step size relative to its projection's weight scale: the same setting
    then suits a model whose weights are ~0.2 (SmolLM2) and one whose weights are ~0.02 (a fresh init)."""
    weights = {name.rsplit(".", 1)[0]: p.detach().pow(2).mean().sqrt() for name, p in module.named_parameters()
               if name.endswith("weight")}
    return [{"params": [p], "lr": lr * float(weights[name.rsplit(".", 1)[0]])} for name, p in module.named_parameters()]


@functools.cache
def matmul_precision(choice: str) -> str:
    """float32 or bfloat16 for the training matmuls: "auto" times both on this CPU (a few ms) and takes bf16
    only where it is clearly faster (CPUs with native bf16 dot products); elsewhere it is emulated and slow."""
    if choice != "auto":
        return choice
    a, b = torch.randn(1024, 512), torch.randn(512, 512)

    def seconds(dtype):
        x, y = a.to(dtype), b.to(dtype)
        x @ y
        start = time.perf_counter()
        for _ in range(10):
            x @ y
        return time.perf_counter() - start

    return "bfloat16" if seconds(torch.bfloat16) < 0.7 * seconds(torch.float32) else "float32"


@torch.no_grad()
def relative_error(module: torch.nn.Module, forward, targets: torch.Tensor, scale) -> float:
    total = 0.0
    for start in range(0, len(targets), 8):
        out = forward(module, slice(start, start + 8))
        total += float((out - targets[start:start + 8]).pow(2).sum())
    return total / (float(scale) * targets.numel())
