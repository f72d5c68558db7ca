"""A plain-PyTorch static-cache decoder: the peer `gqa bench generate` compiles with torch.compile.

This is how most hand-written inference loops (gpt-fast, nanoGPT-style servers) decode a Llama: one
[B, G, T, D] cache per layer written in place with `index_copy_` at the step's position, SDPA over the whole
cache with a causal mask row, and the decode step compiled with `mode="reduce-overhead"` (CUDA graphs).
Every sequence of the batch is at the same position. It reads the weights of a gqa `Transformer` (no copy),
so both decode the same model.

`expand_kv=True` re-expands K/V to all H query heads with `repeat_interleave` before attention, as gpt-fast
does: each step then reads H heads' worth of cache, which is why such loops realise much less than the
MHA -> GQA roofline ratio (shared/ANCHORS.md). `expand_kv=False` passes the G heads with `enable_gqa=True`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import GQAError
from .model import Transformer, apply_rope, rope_cos_sin


class StaticCache(nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, positions, k)
        self.v.index_copy_(2, positions, v)
        return self.k, self.v


class PlainDecoder(nn.Module):
    def __init__(self, model: Transformer, batch: int, max_len: int, expand_kv: bool = True):
        super().__init__()
        c = model.config
        if (c.norm, c.positions, c.mlp, c.activation, c.block, c.rope_style) != (
                "rms", "rope", "gated", "silu", "sequential", "half") or c.sliding_window or c.qk_norm or \
                c.qkv_bias or c.out_bias or c.mlp_bias or c.output_bias or c.rotary_dim != c.head_dim or \
                c.norm_weight_offset or c.embedding_multiplier != 1.0:
            raise GQAError("the plain decoder covers Llama-style models only (RMSNorm, full RoPE, SwiGLU, no biases)")
        if max_len > c.max_positions:
            raise GQAError(f"a cache of {max_len} tokens exceeds the model's {c.max_positions} positions")
        self.model, self.config, self.expand_kv = model, c, expand_kv
        self.caches = nn.ModuleList(
            StaticCache(batch, g, max_len, c.head_dim, model.dtype, model.device) for g in c.n_kv_heads)
        cos, sin = rope_cos_sin(model.inv_freq, torch.arange(max_len, device=model.device)[None], model.dtype)
        self.register_buffer("cos", cos[0, 0], persistent=False)  # [max_len, head_dim], indexed by position
        self.register_buffer("sin", sin[0, 0], persistent=False)
        self.register_buffer("causal", torch.ones(max_len, max_len, dtype=torch.bool, device=model.device).tril(),
                             persistent=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, vocab] for tokens [B, S] at cache positions [S] (the same for every sequence)."""
        m, c = self.model, self.config
        batch, seq = tokens.shape
        cos, sin = self.cos[positions], self.sin[positions]
        mask = self.causal[positions][None, None]  # [1, 1, S, T]: each new token sees the cache up to itself
        x = m.tok_embeddings(tokens)
        for block, cache in zip(m.layers, self.caches):
            a = block.attention
            h = block.attention_norm(x)
            q = F.linear(h, a.wq.weight).view(batch, seq, c.n_heads, c.head_dim).transpose(1, 2)
            k = F.linear(h, a.wk.weight).view(batch, seq, a.n_kv_heads, c.head_dim).transpose(1, 2)
            v = F.linear(h, a.wv.weight).view(batch, seq, a.n_kv_heads, c.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k, v = cache.update(positions, k, v)
            if self.expand_kv:
                group = c.n_heads // a.n_kv_heads
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=not self.expand_kv)
            x = x + F.linear(y.transpose(1, 2).reshape(batch, seq, c.n_heads * c.head_dim), a.wo.weight)
            x = x + block.mlp(block.mlp_norm(x))
        return m.output(m.norm(x))
