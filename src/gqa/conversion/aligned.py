"""`aligned`: merge a group's K/V heads by fitting what is shared to calibration activations.

Mean pooling averages the heads' projection weights as they are. But each head's K and V sit in a basis of
their own: attention has exact symmetries that change the weights and not the function (see `heads`), so
two heads computing nearly the same thing can have very different weights, and their average computes
neither. This method uses those symmetries, then fits what the group shares to the layer's real inputs x
on calibration text (x̃ = [x, 1] where the model has biases), measured the way attention uses them:

- Grouping: query heads are permuted so that heads whose keys and values are alike share a KV head
  (`grouping="similarity"`; `"contiguous"` keeps h // r). A GQA source is first expanded (exactly) to MHA.
- Values: any invertible map per head commutes with attention, so the shared value subspace and each
  head's new W_o are a reduced-rank fit of the heads' value-to-output maps W_vᵀW_oᵀ. What values meet is
  the attended input P_h x̃ (attention rows average tokens), so the fit is whitened by E[(P_h x̃)(P_h x̃)ᵀ],
  pooled over the group's heads, not by E[x̃x̃ᵀ].
- Keys, per RoPE frequency pair: the pair of a head's key is a complex linear function of x̃, and the only
  freedom that commutes with RoPE is a complex scalar per head and pair (a scaled 2x2 rotation). So the
  group's shared key is the best rank-1 fit k_h ≈ c_h·k̃ of the heads' keys, each head weighted by its query
  energy E|q_h|² in that pair, and c_h is folded into the head's query. Softmax ignores a score shift shared
  by all the keys a query attends to, so key errors are measured by the spread of the attended keys around
  their attention-weighted mean: Σ_t Σ_u p_tu (x̃_u − x̄_t)(x̃_u − x̄_t)ᵀ, with x̄_t = (P x̃)_t.
  Dims RoPE leaves alone (no rotary embedding, or partial rotary) get the real version: a shared key
  subspace fitted to the heads' score maps W_kᵀW_q, queries refitted.

The fitted shared K/V come out in the whitened basis, so their weights can be thousands of times larger
than their queries / W_o; the conversion balances what it writes (`AttentionWeights.balanced`).

All fits are closed-form (SVDs in float64) on second moments accumulated over the calibration blocks: no
gradient steps. With G = H every fit is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..errors import GQAError
from ..model import apply_rope
from .heads import AttentionWeights, RopeLayout, as_complex
from .interface import Layer, Method, setting

GROUPINGS = ("similarity", "contiguous")
QUERY_ROWS = 128  # query positions per block the attention-weighted moments are estimated from
MOMENT_BLOCKS = 64  # calibration blocks they are estimated from (enough for d x d moments; the rest is time)
CHUNK_BLOCKS = 4
HEAD_CHUNK = 8  # heads whose float64 copies are made at once where a step reads every head


def whitener(covariance: torch.Tensor) -> torch.Tensor:
    """L with Σ ≈ L Lᵀ (lower), damped so that directions the calibration never excited stay finite.

    A moment estimated from fewer tokens than it has dimensions is only semi-definite, and the key metric (a
    difference of moments) can come out slightly indefinite in float64 round-off (seen on a 7B-geometry
    layer with 1,024 calibration tokens); the damping grows tenfold until the factorization holds."""
    symmetric = covariance.T.clone()  # (Σ + Σᵀ) / 2 in one d x d copy (at 7B geometry each is 134 MB)
    symmetric += covariance
    symmetric *= 0.5
    scale = symmetric.diagonal().abs().mean().clamp(min=1e-12)
    damped = 0.0
    for exponent in range(-6, 1):
        symmetric.diagonal().add_(10.0**exponent * scale - damped)
        damped = 10.0**exponent * scale
        L, info = torch.linalg.cholesky_ex(symmetric)
        if info == 0:
            return L
    raise GQAError("the calibration activations of a layer are degenerate (their second moment is not "
                   "positive semi-definite); use more or other calibration text (--calib, --calib-tokens)")


@dataclass
class LayerInputs:
    """A layer's attention inputs on the calibration blocks, and what the fits measure with them."""
    x: torch.Tensor  # what keys and values read [blocks, T, d]
    with_bias: bool
    probabilities: Callable  # (query inputs, key inputs) -> the source layer's probabilities (`Calibration`)
    queries: torch.Tensor | None = None  # what queries read, where not x (cross-attention) [blocks, S, d]

    def blocks(self, limit: int | None = None, queries: bool = False):
        source = self.x if not queries or self.queries is None else self.queries
        for start in range(0, min(len(source), limit or len(source)), CHUNK_BLOCKS):
            x = source[start:start + CHUNK_BLOCKS].float()
            if self.with_bias:
                x = torch.cat([x, torch.ones(*x.shape[:2], 1)], dim=-1)
            yield x

    def covariance(self, queries: bool = False) -> torch.Tensor:
        """E[x̃ x̃ᵀ] over every calibration token (of what the queries read, with `queries`)."""
        source = self.queries if queries and self.queries is not None else self.x
        total = sum(x.flatten(0, 1).double().T @ x.flatten(0, 1).double() for x in self.blocks(queries=queries))
        return total / (source.shape[0] * source.shape[1])

    @torch.no_grad()
    def sampled_attention(self) -> list[torch.Tensor]:
        """The source layer's attention probabilities at QUERY_ROWS sampled query positions, per chunk of the
        first MOMENT_BLOCKS blocks: [B, H, rows, T]. The groups' moments are then accumulated one group at a
        time from these (holding every group's two d x d float64 moments at once is 2 GB at 7B geometry)."""
        S, d = (self.x if self.queries is None else self.queries).shape[1], self.x.shape[-1]
        rows = torch.unique(torch.linspace(0, S - 1, min(S, QUERY_ROWS)).round().long())
        return [self.probabilities(q[..., :d], x[..., :d])[:, :, rows]
                for q, x in zip(self.blocks(MOMENT_BLOCKS, queries=True), self.blocks(MOMENT_BLOCKS))]

    @torch.no_grad()
    def attention_moments(self, probs: list[torch.Tensor], group: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A group's (value metric, key metric): E[(P x̃)(P x̃)ᵀ] and the attention-weighted spread of keys around
        each query's attended mean, pooled over the group's heads (see the module docstring)."""
        n = self.x.shape[-1] + self.with_bias
        value, key = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
        for x, p in zip(self.blocks(MOMENT_BLOCKS), probs):
            p = p[:, group]  # [B, r, rows, T]
            px = (p @ x[:, None]).flatten(0, 2).double()  # attended inputs [B·r·rows, n]
            received = p.sum((1, 2)).double()  # [B, T]: attention each token received
            x = x.flatten(0, 1).double()
            # accumulated in place: no d x d temporaries (134 MB each at 7B geometry)
            value.addmm_(px.T, px)
            key.addmm_(x.T, received.flatten()[:, None] * x).addmm_(px.T, px, alpha=-1)
        count = sum(p.shape[0] * p.shape[2] for p in probs)
        return value / count, key / count


def attention_probs(module, x: torch.Tensor, rope) -> torch.Tensor:
    """The source layer's causal attention probabilities on x [B, T, d]: [B, H, T, T] (q/k norms included)."""
    q = module.project(x, module.wq, module.n_heads, getattr(module, "q_norm", None))
    k = module.project(x, module.wk, module.n_kv_heads, getattr(module, "k_norm", None))
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k = k.repeat_interleave(module.n_heads // module.n_kv_heads, dim=1)  # calibration only, never on a hot path
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
    return F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def self_attention_probabilities(module, rope) -> Callable:
    """`Calibration.probabilities` of a decoder layer's causal self-attention (queries and keys read the same
    input, so the query inputs are the key inputs)."""
    return lambda queries, keys: attention_probs(module, keys, rope)


def merge(attn: AttentionWeights, n_kv_heads: int, inputs: LayerInputs, rope: RopeLayout,
          grouping: str = "similarity") -> tuple[AttentionWeights, dict]:
    """This layer's attention with `n_kv_heads` KV heads, and a record of what was chosen (the groups)."""
    if grouping not in GROUPINGS:
        raise GQAError(f"unknown grouping {grouping!r}; choose one of {', '.join(GROUPINGS)}")
    mha = attn.expanded()
    L = whitener(inputs.covariance())
    L_query = L if inputs.queries is None else whitener(inputs.covariance(queries=True))
    heads = Heads(mha, L_query, L, rope, inputs.with_bias)
    r = mha.n_heads // n_kv_heads
    order = list(range(mha.n_heads))
    if grouping == "similarity" and 1 < r < mha.n_heads:
        order = similar_groups(heads.pair_costs(), r)
    groups = [order[j * r:(j + 1) * r] for j in range(n_kv_heads)]
    probs = inputs.sampled_attention()
    fitted = [fit_group(heads, group, inputs, probs, attn.wq.dtype) for group in groups]
    merged = assemble(attn, fitted, inputs.with_bias)
    return merged_norms(merged, mha, groups), {"groups": groups}


def fit_group(heads: Heads, group: list[int], inputs: LayerInputs, probs, dtype: torch.dtype) -> tuple:
    """A group's shared key, its queries, shared value and outputs, in the weights' dtype. Each d x d float64
    moment is dropped as soon as its fit is done: at 7B geometry each is 134 MB."""
    value_metric, key_metric = inputs.attention_moments(probs, group)
    L_key = whitener(key_metric)
    del key_metric
    key, queries = fit_keys(heads, group, L_key)
    del L_key
    value, outputs = fit_values(heads, group, whitener(value_metric))
    return tuple(t.to(dtype) for t in (key, queries, value, outputs))


class Heads:
    """The expanded layer's heads as the fits see them: float64 and x̃-augmented (with the bias as a last
    column) where the model has biases, made for the heads a fit asks for. Only the stored weights are held:
    float64 copies of every head at once are 0.5 GB per layer at 7B geometry. L: the whitener of what the
    queries read; L_kv: of what keys and values read (the same for self-attention)."""

    def __init__(self, mha: AttentionWeights, L: torch.Tensor, L_kv: torch.Tensor, rope: RopeLayout, with_bias: bool):
        self.mha, self.with_bias, self.rope_layout, self.L, self.L_kv = mha, with_bias, rope, L, L_kv
        self.n_heads, self.head_dim = mha.n_heads, mha.head_dim
        a, b = rope.pairs
        energy = torch.cat([(w[:, a] @ L).pow(2).sum(-1) + (w[:, b] @ L).pow(2).sum(-1)  # E|q|² = ||Lᵀ w_q||²
                            for w in map(self.wq, self.chunks())])
        self.query_energy = energy.clamp(min=1e-12 * float(energy.max()) if energy.numel() else 0.0)  # [H, pairs]

    def chunks(self) -> list[list[int]]:
        return [list(range(h, min(h + HEAD_CHUNK, self.n_heads))) for h in range(0, self.n_heads, HEAD_CHUNK)]

    def rows(self, part: str, index) -> torch.Tensor:
        """Projection `part` (wq, wk, wv) of the heads in `index`: [r, D, n]."""
        index = torch.as_tensor(index).reshape(-1)
        weight = self.mha.heads(part)[index].double()
        if not self.with_bias:
            return weight
        bias = self.mha.heads("b" + part[1])
        bias = torch.zeros(weight.shape[:2], dtype=torch.float64) if bias is None else bias[index].double()
        return torch.cat([weight, bias[..., None]], dim=-1)

    def wq(self, index) -> torch.Tensor:
        return self.rows("wq", index)

    def wk(self, index) -> torch.Tensor:
        return self.rows("wk", index)

    def wv(self, index) -> torch.Tensor:
        return self.rows("wv", index)

    def wo_t(self, index) -> torch.Tensor:
        """W_o,hᵀ of the heads in `index`: [r, D, d_out]."""
        return self.mha.heads("wo")[torch.as_tensor(index).reshape(-1)].double().transpose(1, 2)

    def key_columns(self, index, L_key: torch.Tensor) -> torch.Tensor:
        """[pairs, n, r] complex: √(E|q_h|²) · L_keyᵀ w_h for the heads in `index`, per rotary pair."""
        a, b = self.rope_layout.pairs
        keys = as_complex(self.wk(index), a, b) @ L_key.to(torch.complex128)  # [r, pairs, n]
        return (self.query_energy[index].sqrt()[..., None] * keys).permute(1, 2, 0)

    def pair_costs(self) -> torch.Tensor:
        """[H, H]: what is lost when heads a and b share a KV head: the residual of the best shared rank-1 key
        per rotary pair plus that of the best shared rank-D value subspace, each relative to its total.
        Made HEAD_CHUNK heads at a time: only the stacked results are whole-layer size."""
        H, D, L = self.n_heads, self.head_dim, self.L_kv
        columns = torch.cat([self.key_columns(heads, L) for heads in self.chunks()], dim=-1)
        gram = torch.einsum("pnh,pnk->phk", columns.conj(), columns)  # [pairs, H, H]
        del columns
        diag = gram.diagonal(dim1=1, dim2=2).real
        tr = diag[:, :, None] + diag[:, None, :]  # smaller eigenvalue of each 2x2 Gram: (tr - √(tr² - 4 det)) / 2
        det = diag[:, :, None] * diag[:, None, :] - gram.abs().pow(2)
        key = ((tr - (tr.pow(2) - 4 * det).clamp(min=0).sqrt()) / 2).sum(0) / diag.sum().clamp(min=1e-30)
        flat = torch.cat([whitened_factors(torch.einsum("hdn,nm->hmd", self.wv(heads), L), self.wo_t(heads))[0]
                          .permute(1, 0, 2).flatten(1) for heads in self.chunks()], dim=1)  # [n, H·D]: by head
        gram_v = (flat.T @ flat).reshape(H, D, H, D)
        del flat
        value = torch.zeros(H, H, dtype=torch.float64)
        for i in range(H):
            for j in range(i + 1, H):
                block = torch.cat([torch.cat([gram_v[i, :, i], gram_v[i, :, j]], 1),
                                   torch.cat([gram_v[j, :, i], gram_v[j, :, j]], 1)], 0)
                value[i, j] = value[j, i] = torch.linalg.eigvalsh(block)[:D].clamp(min=0).sum()
        total = gram_v.reshape(H * D, H * D).diagonal().sum()  # Σ of the factors' squares
        return key + value / total.clamp(min=1e-30)


def similar_groups(cost: torch.Tensor, r: int) -> list[int]:
    """Query heads ordered so that consecutive runs of r form groups of low total pairwise cost: greedy
    seeding, then swaps between groups while any lowers the total (deterministic)."""
    left = list(range(cost.shape[0]))
    groups = []
    while left:
        group = [left.pop(0)]
        while len(group) < r:
            best = min(left, key=lambda h: sum(float(cost[h, g]) for g in group))
            group.append(best)
            left.remove(best)
        groups.append(group)

    def total(g: list[int]) -> float:
        return sum(float(cost[a, b]) for i, a in enumerate(g) for b in g[i + 1:])

    improved = True
    while improved:
        improved = False
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                for x in range(r):
                    for y in range(r):
                        gi = groups[i][:x] + [groups[j][y]] + groups[i][x + 1:]
                        gj = groups[j][:y] + [groups[i][x]] + groups[j][y + 1:]
                        if total(gi) + total(gj) < total(groups[i]) + total(groups[j]) - 1e-12:
                            groups[i], groups[j], improved = gi, gj, True
    return [h for g in sorted(groups, key=min) for h in sorted(g)]


def whitened_factors(left: torch.Tensor, right: torch.Tensor):
    """For maps A_h = left_h right_h (left [r, m, k], right [r, k, n']): right_hᵀ = q_h t_h (QR), so
    A_h = (left_h t_hᵀ) q_hᵀ with q_h orthonormal: returns (left_h t_hᵀ [r, m, k], q_h [r, n', k])."""
    q, t = torch.linalg.qr(right.transpose(1, 2))
    return torch.einsum("hmk,hjk->hmj", left, t), q


def reduced_rank(left: torch.Tensor, right: torch.Tensor, rank: int):
    """The best shared basis for maps A_h = left_h right_h: B [m, rank] (orthonormal columns) and C_h
    [rank, n'] minimising Σ_h ||A_h − B C_h||² (one SVD of the stacked factors, [m, r·k])."""
    factors, q = whitened_factors(left, right)
    r, m, k = factors.shape
    u, s, vh = torch.linalg.svd(factors.permute(1, 0, 2).reshape(m, r * k), full_matrices=False)
    mix = (s[:rank, None] * vh[:rank]).reshape(rank, r, k).permute(1, 0, 2)  # [r, rank, k]
    return u[:, :rank], torch.einsum("hak,hnk->han", mix, q)


def fit_keys(heads: Heads, group: list[int], L_key: torch.Tensor):
    """The shared key rows of a group [D, n] and its heads' query rows adjusted to it [r, D, n]."""
    wq, wk = heads.wq(group), heads.wk(group)
    key = torch.zeros(wk.shape[1:], dtype=torch.float64)
    a, b = heads.rope_layout.pairs
    if len(a):
        u, s, vh = torch.linalg.svd(heads.key_columns(group, L_key), full_matrices=False)
        # column h ≈ s₀ u₀ vh[0, h]: head h's whitened key ≈ c_h · κ u₀, with c_h κ = s₀ vh[0, h] / √e_h
        coef = s[:, :1] * vh[:, 0, :] / heads.query_energy[group].T.sqrt()  # [pairs, r]
        kappa = coef.abs().pow(2).mean(1, keepdim=True).sqrt().clamp(min=1e-30)
        shared = torch.linalg.solve_triangular(L_key.T.to(torch.complex128), u[:, :, 0].T, upper=True).T * kappa
        key[a], key[b] = shared.real, shared.imag
        q = torch.complex(wq[:, a], wq[:, b]) * (coef / kappa).T.conj()[..., None]  # q -> q · conj(c_h)
        wq[:, a], wq[:, b] = q.real, q.imag
    free = heads.rope_layout.free
    if len(free):  # dims without rotation: a shared subspace for the score maps W_kᵀ W_q
        left = torch.einsum("hkn,nm->hmk", wk[:, free], L_key)  # L_keyᵀ W_k,hᵀ
        right = torch.einsum("hkn,nm->hkm", wq[:, free], heads.L)  # W_q,h L_query
        basis, coefs = reduced_rank(left, right, len(free))
        key[free] = torch.linalg.solve_triangular(L_key.T, basis, upper=True).T
        wq[:, free] = torch.linalg.solve_triangular(heads.L, coefs, upper=False, left=False)  # C_h L_query⁻¹
    return key, wq


def fit_values(heads: Heads, group: list[int], L_value: torch.Tensor):
    """The shared value rows of a group [D, n] and its heads' W_o refitted to them [r, d_out, D]."""
    left = torch.einsum("hdn,nm->hmd", heads.wv(group), L_value)  # L_valueᵀ W_v,hᵀ
    basis, coefs = reduced_rank(left, heads.wo_t(group), heads.head_dim)
    value = torch.linalg.solve_triangular(L_value.T, basis, upper=True).T  # (L⁻ᵀ B)ᵀ
    return value, coefs.transpose(1, 2)


def merged_norms(merged: AttentionWeights, mha: AttentionWeights, groups: list[list[int]]) -> AttentionWeights:
    """q/k norms of the merged layer. A norm shared by all heads stays; per-head q norms follow their heads;
    per-head k norms are the mean over the group (the norm does not commute with the fits, so models with
    q/k norms are merged approximately: `transfer` is what makes them close)."""
    if not mha.norms_per_head:
        return replace(merged, qn=mha.qn, qnb=mha.qnb, kn=mha.kn, knb=mha.knb)
    order = torch.as_tensor([h for g in groups for h in g])
    parts = {p: None if getattr(mha, p) is None else mha.heads(p)[order] for p in ("qn", "qnb")}
    for p in ("kn", "knb"):
        heads = mha.heads(p)
        parts[p] = None if heads is None else torch.stack([heads[torch.as_tensor(g)].mean(0) for g in groups])
    return merged.with_heads(**parts)


def assemble(attn: AttentionWeights, fitted: list[tuple], with_bias: bool) -> AttentionWeights:
    """The merged layer: query heads in group order, one K/V head per group, W_o refitted."""
    keys, queries, values, outputs = zip(*fitted)

    def rows(parts, bias_part):
        flat = torch.cat([p.reshape(-1, p.shape[-1]) for p in parts])
        if not with_bias:
            return flat.to(attn.wq.dtype), None
        bias = flat[:, -1].to(attn.wq.dtype) if getattr(attn, bias_part) is not None else None
        return flat[:, :-1].to(attn.wq.dtype), bias

    wq, bq = rows(queries, "bq")
    wk, bk = rows(keys, "bk")
    wv, bv = rows(values, "bv")
    wo = torch.cat(outputs)  # [H, d_out, D]
    wo = wo.permute(1, 0, 2).reshape(wo.shape[1], -1).to(attn.wq.dtype)
    return AttentionWeights(wq=wq, wk=wk, wv=wv, wo=wo, bq=bq, bk=bk, bv=bv, bo=attn.bo, head_dim=attn.head_dim,
                            norms_per_head=attn.norms_per_head)


@dataclass(frozen=True)
class AlignedSettings:
    grouping: str = setting("similarity", "which query heads share a KV head: similarity (of their keys and "
                                          "values) or contiguous (h // r)", GROUPINGS)


def merge_layer(attn: AttentionWeights, n_kv_heads: int, layer: Layer, settings: AlignedSettings):
    c = layer.calibration
    with_bias = any(t is not None for t in (attn.bq, attn.bk, attn.bv))
    return merge(attn, n_kv_heads, LayerInputs(c.x, with_bias, c.probabilities, c.queries), layer.rope,
                 settings.grouping)


ALIGNED = Method("aligned", "exact symmetries, then shared K/V fitted to calibration activations (--calib text, "
                            "default general)", merge_layer, AlignedSettings, calibrated=True)
