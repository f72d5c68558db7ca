"""How a group's K/V projection is built from the heads it replaces.

A K or V projection of G heads is a [G·head_dim, dim] weight (and a [G·head_dim] bias). Going from G_old
to G_new heads (G_new divides G_old), new head j replaces the contiguous old heads
j·r … j·r + r − 1 with r = G_old / G_new, matching the contiguous query grouping everywhere else.

- mean:   the mean of the group's heads (the GQA paper's choice). Pooling weights commutes with RoPE,
          since every head is rotated the same way, so it is exact to pool before the rotation.
- first:  the group's first head (the paper's baseline).
- random: a fresh draw with the model's own init scale (normal(0, std) weights, zero biases).

Because each old KV head of a grouped model stands for the same number of query heads, pooling a grouped
model's heads equals pooling the heads of its MHA twin: conversion composes (MHA -> GQA-4 -> MQA is
MHA -> MQA).
"""

from __future__ import annotations

import zlib

import torch

from ..errors import GQAError
from .heads import NAMES, AttentionWeights
from .interface import Layer, Method, NoSettings

METHODS = ("mean", "first", "random")


def merge(attn: AttentionWeights, n_kv_heads: int, method: str, layer: int, seed: int = 0,
          init_std: float = 0.02) -> AttentionWeights:
    """A layer's attention with its K/V projections pooled to `n_kv_heads` heads; Q and O unchanged."""
    pooled = {}
    for part in attn.kv_parts():
        tensor = getattr(attn, part)
        if tensor is not None:
            how = "mean" if method == "random" and part in ("kn", "knb") else method  # a K norm is pooled, not drawn
            pooled[part] = pool_heads(tensor, attn.n_kv_heads, n_kv_heads, how,
                                      name=f"layers.{layer}.attention.{NAMES[part]}", seed=seed, init_std=init_std)
    return AttentionWeights(**{**attn.__dict__, **pooled})


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so `random` gives the same weights whatever order tensors are visited in."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def pool_heads(
    tensor: torch.Tensor,
    old_heads: int,
    new_heads: int,
    method: str,
    *,
    name: str = "",
    seed: int = 0,
    init_std: float = 0.02,
) -> torch.Tensor:
    """[old_heads·head_dim, ...] -> [new_heads·head_dim, ...], per `method` (see the module docstring)."""
    if method not in METHODS:
        raise GQAError(f"unknown pooling {method!r}; choose one of {', '.join(METHODS)}")
    if tensor.shape[0] % old_heads:  # new_heads divides old_heads: `target_kv_heads` checked it for every layer
        raise GQAError(f"{name}: {tensor.shape[0]} rows do not split into {old_heads} heads")
    head_dim = tensor.shape[0] // old_heads
    ratio = old_heads // new_heads
    rest = tensor.shape[1:]
    grouped = tensor.reshape(new_heads, ratio, head_dim, *rest)
    if method == "mean":
        # accumulate in float64: the mean of r equal values is then exactly that value, for any dtype
        out = grouped.double().mean(dim=1).to(tensor.dtype)
    elif method == "first":
        out = grouped[:, 0]
    else:
        shape = (new_heads, head_dim, *rest)
        if tensor.dim() == 1:  # a bias
            out = torch.zeros(shape, dtype=tensor.dtype)
        else:
            generator = torch.Generator().manual_seed(tensor_seed(seed, name))
            out = (torch.randn(shape, generator=generator) * init_std).to(tensor.dtype)
    return out.reshape(new_heads * head_dim, *rest).contiguous()


def merge_with(method: str):
    def merge_layer(attn: AttentionWeights, n_kv_heads: int, layer: Layer, settings: NoSettings):
        return merge(attn, n_kv_heads, method, layer.index, layer.seed, layer.init_std), {}
    return merge_layer


MEAN = Method("mean", "each group's K/V projection is the mean of its heads (the GQA paper's)", merge_with("mean"))
FIRST = Method("first", "each group keeps its first head's K/V projection (the paper's baseline)", merge_with("first"))
RANDOM = Method("random", "fresh K/V projections drawn at the model's init scale (--seed)", merge_with("random"))
