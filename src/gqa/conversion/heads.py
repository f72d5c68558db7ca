"""One layer's attention, head by head, and the exact symmetries a merge may use.

`AttentionWeights` holds a layer's projections in gqa's layout: wq [H·D, d], wk and wv [G·D, d], wo [d, H·D],
with optional biases. The transforms below change the weights but not the layer's output, whatever the
input (tests check each against the model's logits):

- `expanded`: K/V repeated so that every query head has its own (G -> H, the MHA twin of a GQA layer);
- `permuted`: query heads reordered, W_o's columns with them (and, in an expanded layer, their K/V);
- `transform_values`: any invertible D x D map per head on V, its inverse folded into W_o;
- `rotate_keys`: per head and RoPE frequency pair, a complex scalar c (a scaled 2x2 rotation) on the key
  and conj(c)^-1 on the query, the only maps that commute with the rotary embedding;
- `balanced`: those maps chosen to give each KV head and the query heads reading it the least total weight
  norm (K against Q, V against W_o).

`RopeLayout` says which dims of a head RoPE pairs up (rotate-half: i and i + R/2; interleaved: 2i and
2i + 1) and which it leaves alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..model import PER_HEAD_QK_NORMS, ModelConfig

PARTS = ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "qn", "qnb", "kn", "knb")
NAMES = {"wq": "wq.weight", "wk": "wk.weight", "wv": "wv.weight", "wo": "wo.weight",
         "bq": "wq.bias", "bk": "wk.bias", "bv": "wv.bias", "bo": "wo.bias",
         "qn": "q_norm.weight", "qnb": "q_norm.bias", "kn": "k_norm.weight", "knb": "k_norm.bias"}


@dataclass(frozen=True)
class RopeLayout:
    head_dim: int
    rotary_dim: int  # 0 for models without rotary embeddings (learned positions)
    interleaved: bool = False  # GPT-J pairs dims (2i, 2i + 1); Llama, NeoX and the rest (i, i + R/2)

    @classmethod
    def of(cls, config: ModelConfig) -> RopeLayout:
        return cls(config.head_dim, config.rotary_dim if config.positions == "rope" else 0,
                   config.rope_style == "interleaved")

    @property
    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Within a head, the dims (a_i, b_i) RoPE rotates together: x_a + j·x_b turns by the pair's angle."""
        half = self.rotary_dim // 2
        if self.interleaved:
            return torch.arange(half) * 2, torch.arange(half) * 2 + 1
        return torch.arange(half), torch.arange(half) + half

    @property
    def free(self) -> torch.Tensor:
        """Dims RoPE leaves alone (all of them without rotary embeddings)."""
        return torch.arange(self.rotary_dim, self.head_dim)


@dataclass
class AttentionWeights:
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    bo: torch.Tensor | None = None
    qn: torch.Tensor | None = None  # q/k norm weights and biases, where the model has them
    qnb: torch.Tensor | None = None
    kn: torch.Tensor | None = None
    knb: torch.Tensor | None = None
    head_dim: int = 0
    norms_per_head: bool = False  # q/k norm weights with an entry per head's channel (they move with the heads)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], layer: int, config: ModelConfig) -> AttentionWeights:
        prefix = f"layers.{layer}.attention."
        return cls(**{part: state.get(prefix + name) for part, name in NAMES.items()}, head_dim=config.head_dim,
                   norms_per_head=config.qk_norm in PER_HEAD_QK_NORMS)

    def query_parts(self) -> tuple[str, ...]:
        """The tensors that have a slice per query head (they move with it), besides W_o's columns."""
        return ("wq", "bq", "qn", "qnb") if self.norms_per_head else ("wq", "bq")

    def kv_parts(self) -> tuple[str, ...]:
        """The tensors that have a slice per KV head (a merge pools them)."""
        return ("wk", "wv", "bk", "bv", "kn", "knb") if self.norms_per_head else ("wk", "wv", "bk", "bv")

    def to_state(self, layer: int) -> dict[str, torch.Tensor]:
        prefix = f"layers.{layer}.attention."
        return {prefix + name: getattr(self, part).contiguous() for part, name in NAMES.items()
                if getattr(self, part) is not None}

    @property
    def n_heads(self) -> int:
        return self.wq.shape[0] // self.head_dim

    @property
    def n_kv_heads(self) -> int:
        return self.wk.shape[0] // self.head_dim

    def to(self, dtype: torch.dtype) -> AttentionWeights:
        return replace(self, **{p: None if getattr(self, p) is None else getattr(self, p).to(dtype) for p in PARTS})

    # -- per-head views ----------------------------------------------------------------------------------

    def heads(self, part: str) -> torch.Tensor | None:
        """A projection or bias split by head: [heads, D, ...] (wo: [H, d, D], its columns by head)."""
        t = getattr(self, part)
        if t is None:
            return None
        if part == "wo":
            return t.reshape(t.shape[0], self.n_heads, self.head_dim).permute(1, 0, 2)
        return t.reshape(-1, self.head_dim, *t.shape[1:])

    def with_heads(self, **parts: torch.Tensor | None) -> AttentionWeights:
        """A copy with the named parts replaced from their per-head form (see `heads`)."""
        flat = {}
        for part, t in parts.items():
            if t is None:
                flat[part] = None
            elif part == "wo":
                flat[part] = t.permute(1, 0, 2).reshape(t.shape[1], -1)
            else:
                flat[part] = t.reshape(-1, *t.shape[2:])
        return replace(self, **flat)

    # -- exact symmetries --------------------------------------------------------------------------------

    def expanded(self) -> AttentionWeights:
        """Every query head with its own K/V head (copies): the same layer, written as MHA."""
        group = self.n_heads // self.n_kv_heads
        kv = {p: None if getattr(self, p) is None else self.heads(p).repeat_interleave(group, dim=0)
              for p in self.kv_parts()}
        return self.with_heads(**kv)

    def permuted(self, order: list[int]) -> AttentionWeights:
        """Query head i of the result is query head order[i] of this layer (K/V move too when G = H)."""
        index = torch.as_tensor(order)
        parts = (*self.query_parts(), "wo") + (self.kv_parts() if self.n_kv_heads == self.n_heads else ())
        return self.with_heads(**{p: None if getattr(self, p) is None else self.heads(p)[index] for p in parts})

    def transform_values(self, maps: torch.Tensor) -> AttentionWeights:
        """V_h -> V_h · M_h for maps [G, D, D] (invertible), with M_h⁻¹ folded into W_o of the heads reading V_h."""
        group = self.n_heads // self.n_kv_heads
        wv = torch.einsum("gdn,gde->gen", self.heads("wv"), maps)  # rows of W_v are the value dims
        bv = None if self.bv is None else torch.einsum("gd,gde->ge", self.heads("bv"), maps)
        inverse = torch.linalg.inv(maps.double()).to(maps.dtype).repeat_interleave(group, dim=0)
        wo = torch.einsum("hod,hed->hoe", self.heads("wo"), inverse)  # o = v M⁻¹ W_oᵀ: W_o,h -> W_o,h M_h⁻ᵀ
        return self.with_heads(wv=wv, bv=bv, wo=wo)

    def rotate_keys(self, scalars: torch.Tensor, rope: RopeLayout) -> AttentionWeights:
        """Per KV head g and rotary pair i, key pair k -> c·k (complex) and, for every query head reading g,
        query pair q -> q / conj(c): q·conj(k) and hence every score is unchanged. scalars: complex [G, pairs]."""
        group = self.n_heads // self.n_kv_heads
        a, b = rope.pairs
        wk, bk = rotate_pairs(self.heads("wk"), scalars, a, b), rotate_pairs(self.heads("bk"), scalars, a, b)
        inverse = (1 / scalars.conj()).repeat_interleave(group, dim=0)
        wq, bq = rotate_pairs(self.heads("wq"), inverse, a, b), rotate_pairs(self.heads("bq"), inverse, a, b)
        return self.with_heads(wq=wq, bq=bq, wk=wk, bk=bk)

    def balanced(self, rope: RopeLayout) -> AttentionWeights:
        """Per KV head, its K rescaled against its query heads' Q and its V against their W_o to the least
        total norm; every output unchanged. What a fit or a training run leaves can be lopsided: `aligned`'s
        shared K/V come out in the whitened basis of its calibration inputs, and where those are nearly
        low-rank (the small T5 of paper-t5: 99.99 % of the energy in 11-22 of 256 dims) K is 10⁴ times larger
        than Q. Adam's steps are the same size for both factors, so the small one's are huge relative to it
        and uptraining jumps away (aligned G = 4 on paper-t5: 292 perplexity after α = 0.05, mean pooling
        256, balanced 255). K is left as it is where a q/k norm follows the projections (it does not commute
        with rescaling its input)."""
        r = self.n_heads // self.n_kv_heads

        def rows(w: str, b: str) -> torch.Tensor:  # [heads, D, n (+1 bias column)] in float64
            bias = self.heads(b)
            w = self.heads(w).double()
            return w if bias is None else torch.cat([w, bias.double()[..., None]], -1)

        q, k, v = rows("wq", "bq"), rows("wk", "bk"), rows("wv", "bv")
        o = self.heads("wo").double()
        norms = any(getattr(self, p) is not None for p in ("qn", "kn"))
        for g in range(self.n_kv_heads):
            group = slice(g * r, (g + 1) * r)
            if not norms:
                k[g], q[group] = balanced_keys(k[g], q[group], rope)
            v[g], o[group] = balanced_values(v[g], o[group])

        def split(t: torch.Tensor, w: str, b: str) -> dict:
            cast = t.to(getattr(self, w).dtype)
            return {w: cast[..., :-1], b: cast[..., -1]} if getattr(self, b) is not None else {w: cast}

        return self.with_heads(**split(q, "wq", "bq"), **split(k, "wk", "bk"), **split(v, "wv", "bv"),
                               wo=o.to(self.wo.dtype))


def least_norm_factors(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factorization of left @ right ([m, k] @ [k, n], m, n >= k) of least ||left||² + ||right||²:
    both factors take the square roots of the product's singular values."""
    u_left, r_left = torch.linalg.qr(left)
    u_right, r_right = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)
    root = s.sqrt()
    return (u_left @ u) * root, ((u_right @ vh.T) * root).T


def balanced_keys(key: torch.Tensor, queries: torch.Tensor, rope: RopeLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """A KV head's key rows [D, n] and its query heads' rows [r, D, n'], rescaled with the scores unchanged:
    a real factor per rotary pair (`rotate_keys`), any invertible map on the dims RoPE leaves alone."""
    key, queries = key.clone(), queries.clone()
    a, b = rope.pairs
    if len(a):
        key_norm = (key[a].pow(2) + key[b].pow(2)).sum(-1).sqrt()  # [pairs]
        query_norm = (queries[:, a].pow(2) + queries[:, b].pow(2)).sum((0, 2)).sqrt()
        usable = (key_norm > 0) & (query_norm > 0)
        scale = torch.where(usable, query_norm / key_norm.where(usable, 1.0), 1.0).sqrt()[:, None]
        key[a], key[b] = key[a] * scale, key[b] * scale
        queries[:, a], queries[:, b] = queries[:, a] / scale, queries[:, b] / scale
    free = rope.free
    if len(free):
        r, _, n = queries.shape
        stacked = queries[:, free].permute(1, 0, 2).reshape(len(free), r * n)
        key_t, stacked = least_norm_factors(key[free].T, stacked)
        key[free], queries[:, free] = key_t.T, stacked.reshape(len(free), r, n).permute(1, 0, 2)
    return key, queries


def balanced_values(value: torch.Tensor, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A KV head's value rows [D, n] and its query heads' W_o [r, d_out, D] under one invertible map on the
    value, its inverse folded into every W_o reading it (`transform_values`): outputs unchanged."""
    r, d_out, D = outputs.shape
    stacked, value = least_norm_factors(outputs.reshape(r * d_out, D), value)
    return value, stacked.reshape(r, d_out, D)


def as_complex(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows a and b of each head ([heads, D, ...]) as one complex row per pair: [heads, pairs, ...]."""
    return torch.complex(t[:, a].double(), t[:, b].double())


def rotate_pairs(t: torch.Tensor | None, scalars: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """Multiply pair i of head h (as x_a + j·x_b) by scalars[h, i]; other dims unchanged."""
    if t is None:
        return None
    z = as_complex(t, a, b) * scalars.reshape(*scalars.shape, *([1] * (t.dim() - 2)))
    out = t.clone()
    out[:, a], out[:, b] = z.real.to(t.dtype), z.imag.to(t.dtype)
    return out
