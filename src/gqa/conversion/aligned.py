"""`aligned`: merge a group's K/V heads by fitting what is shared to calibration activations.

Mean pooling averages the heads' projection weights as they are. But each head's K and V sit in a basis of
their own: attention has exact symmetries that change the weights and not the function (see `heads`), so
two heads computing nearly the same thing can have very different weights, and their average computes
neither. This method first uses those symmetries, then fits, both against the statistics of the layer's
real inputs x on calibration text (Σ = E[x xᵀ], with a constant 1 appended where the model has biases):

- Grouping: query heads are permuted so that heads whose keys and values are alike share a KV head
  (`grouping="similarity"`; `"contiguous"` keeps h // r). An expanded GQA source is handled the same way.
- Keys, per RoPE frequency pair: the pair of a head's key is a complex linear function of x, k_h = w_hᴴx,
  and the only freedom that commutes with RoPE is a complex scalar per head and pair (a scaled 2x2
  rotation). So the group's shared key is the best rank-1 fit k_h ≈ c_h·k̃ of the heads' keys over the
  calibration inputs, each head weighted by its query energy E|q_h|² in that pair (what the scores see),
  and c_h is folded into the head's query. Dims RoPE leaves alone (no rotary embedding, partial rotary)
  get the real version: a shared key subspace fitted to the heads' score maps W_kᵀW_q, queries refitted.
- Values: any invertible map per head commutes with attention, so the shared value subspace and each
  head's new W_o are a reduced-rank fit of the heads' value-to-output maps W_vᵀW_oᵀ, whitened by Σ.

All fits are closed-form (SVDs in float64): no gradient steps. With G = H every fit is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import GQAError
from .heads import AttentionWeights, RopeLayout, as_complex

GROUPINGS = ("similarity", "contiguous")


@dataclass
class InputStats:
    """What the fits need of a layer's inputs: Σ = E[x̃ x̃ᵀ] over calibration tokens, x̃ = [x, 1] when biased."""
    covariance: torch.Tensor  # [n, n] float64
    tokens: int

    @classmethod
    def of(cls, inputs: torch.Tensor, with_bias: bool) -> InputStats:
        x = inputs.reshape(-1, inputs.shape[-1]).double()
        if with_bias:
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        return cls(x.T @ x / len(x), len(x))

    def whitener(self) -> torch.Tensor:
        """L with Σ ≈ L Lᵀ (lower), damped so that directions the calibration never excited stay finite."""
        n = self.covariance.shape[0]
        damp = 1e-6 * self.covariance.diagonal().mean().clamp(min=1e-12)
        return torch.linalg.cholesky(self.covariance + damp * torch.eye(n, dtype=torch.float64))


def augmented(weight: torch.Tensor, bias: torch.Tensor | None, with_bias: bool) -> torch.Tensor:
    """[rows, n] weights with the bias as a last column (x̃ = [x, 1]), in float64."""
    w = weight.double()
    if not with_bias:
        return w
    b = torch.zeros(len(w), dtype=torch.float64) if bias is None else bias.double()
    return torch.cat([w, b[:, None]], dim=1)


def merge(attn: AttentionWeights, n_kv_heads: int, stats: InputStats, rope: RopeLayout,
          grouping: str = "similarity") -> tuple[AttentionWeights, dict]:
    """This layer's attention with `n_kv_heads` KV heads, and a record of what was chosen (the groups)."""
    if grouping not in GROUPINGS:
        raise GQAError(f"unknown grouping {grouping!r}; choose one of {', '.join(GROUPINGS)}")
    with_bias = attn.bq is not None or attn.bk is not None or attn.bv is not None
    mha = attn.expanded()
    L = stats.whitener()
    heads = Heads.of(mha, L, rope, with_bias)
    r = mha.n_heads // n_kv_heads
    order = list(range(mha.n_heads))
    if grouping == "similarity" and 1 < r < mha.n_heads:
        order = similar_groups(heads.pair_costs(), r)
    groups = [order[j * r:(j + 1) * r] for j in range(n_kv_heads)]
    fitted = [(*fit_keys(heads, g, L, rope), *fit_values(heads, g, L)) for g in groups]
    return assemble(attn, fitted, with_bias), {"groups": groups}


@dataclass
class Heads:
    """The expanded layer's heads as the fits see them, in float64, x̃-augmented where the model has biases."""
    wq: torch.Tensor  # [H, D, n]
    wk: torch.Tensor  # [H, D, n]
    query_energy: torch.Tensor  # [H, pairs]: E|q_h|² in each rotary pair
    key_columns: torch.Tensor  # [pairs, n, H] complex: sqrt(E|q_h|²) · Lᵀ w_h, the weighted whitened keys
    value_left: torch.Tensor  # [H, n, D]: Lᵀ W_v,hᵀ
    value_right: torch.Tensor  # [H, D, d_out]: W_o,hᵀ

    @classmethod
    def of(cls, mha: AttentionWeights, L: torch.Tensor, rope: RopeLayout, with_bias: bool) -> Heads:
        H, D = mha.n_heads, mha.head_dim
        wq = augmented(mha.wq, mha.bq, with_bias).reshape(H, D, -1)
        wk = augmented(mha.wk, mha.bk, with_bias).reshape(H, D, -1)
        wv = augmented(mha.wv, mha.bv, with_bias).reshape(H, D, -1)
        a, b = rope.pairs
        energy = (wq[:, a] @ L).pow(2).sum(-1) + (wq[:, b] @ L).pow(2).sum(-1)  # E|q|² = ||Lᵀ w_q||²
        energy = energy.clamp(min=1e-12 * float(energy.max()) if energy.numel() else 0.0)
        keys = as_complex(wk, a, b) @ L.to(torch.complex128)  # [H, pairs, n]: (Lᵀ w_h)ᵀ
        key_columns = (energy.sqrt()[..., None] * keys).permute(1, 2, 0)
        value_left = torch.einsum("hdn,nm->hmd", wv, L)
        return cls(wq, wk, energy, key_columns, value_left, mha.heads("wo").double().transpose(1, 2))

    def pair_costs(self) -> torch.Tensor:
        """[H, H]: what is lost when heads a and b share a KV head: the residual of the best shared rank-1 key
        per rotary pair plus that of the best shared rank-D value subspace, each relative to its total."""
        gram = torch.einsum("pnh,pnk->phk", self.key_columns.conj(), self.key_columns)  # [pairs, H, H]
        diag = gram.diagonal(dim1=1, dim2=2).real
        tr = diag[:, :, None] + diag[:, None, :]  # smaller eigenvalue of each 2x2 Gram: (tr - √(tr² - 4 det)) / 2
        det = diag[:, :, None] * diag[:, None, :] - gram.abs().pow(2)
        key = ((tr - (tr.pow(2) - 4 * det).clamp(min=0).sqrt()) / 2).sum(0) / diag.sum().clamp(min=1e-30)
        factors = whitened_factors(self.value_left, self.value_right)[0]  # [H, n, D]
        H, n, D = factors.shape
        flat = factors.permute(1, 0, 2).reshape(n, H * D)
        gram_v = (flat.T @ flat).reshape(H, D, H, D)
        value = torch.zeros(H, H, dtype=torch.float64)
        for i in range(H):
            for j in range(i + 1, H):
                block = torch.cat([torch.cat([gram_v[i, :, i], gram_v[i, :, j]], 1),
                                   torch.cat([gram_v[j, :, i], gram_v[j, :, j]], 1)], 0)
                value[i, j] = value[j, i] = torch.linalg.eigvalsh(block)[:D].clamp(min=0).sum()
        return key + value / flat.pow(2).sum().clamp(min=1e-30)


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


def fit_keys(heads: Heads, group: list[int], L: torch.Tensor, rope: RopeLayout):
    """The shared key rows of a group [D, n] and its heads' query rows adjusted to it [r, D, n]."""
    index = torch.as_tensor(group)
    wq, wk = heads.wq[index].clone(), heads.wk[index]
    key = torch.zeros(wk.shape[1:], dtype=torch.float64)
    a, b = rope.pairs
    if len(a):
        u, s, vh = torch.linalg.svd(heads.key_columns[:, :, index], full_matrices=False)
        # column h ≈ s₀ u₀ vh[0, h]: head h's whitened key ≈ c_h · κ u₀, with c_h κ = s₀ vh[0, h] / √e_h
        coef = s[:, :1] * vh[:, 0, :] / heads.query_energy[index].T.sqrt()  # [pairs, r]
        kappa = coef.abs().pow(2).mean(1, keepdim=True).sqrt().clamp(min=1e-30)
        shared = torch.linalg.solve_triangular(L.T.to(torch.complex128), u[:, :, 0].T, upper=True).T * kappa
        key[a], key[b] = shared.real, shared.imag
        q = torch.complex(wq[:, a], wq[:, b]) * (coef / kappa).T.conj()[..., None]  # q -> q · conj(c_h)
        wq[:, a], wq[:, b] = q.real, q.imag
    free = rope.free
    if len(free):  # dims without rotation: a shared subspace for the score maps W_kᵀ W_q, weighted by Σ twice
        left = torch.einsum("hkn,nm->hmk", wk[:, free], L)  # Lᵀ W_k,hᵀ
        right = torch.einsum("hkn,nm->hkm", wq[:, free], L)  # W_q,h L
        basis, coefs = reduced_rank(left, right, len(free))
        key[free] = torch.linalg.solve_triangular(L.T, basis, upper=True).T
        wq[:, free] = torch.linalg.solve_triangular(L, coefs, upper=False, left=False)  # C_h L⁻¹
    return key, wq


def fit_values(heads: Heads, group: list[int], L: torch.Tensor):
    """The shared value rows of a group [D, n] and its heads' W_o refitted to them [r, d_out, D]."""
    index = torch.as_tensor(group)
    basis, coefs = reduced_rank(heads.value_left[index], heads.value_right[index], heads.value_left.shape[-1])
    value = torch.linalg.solve_triangular(L.T, basis, upper=True).T  # (L⁻ᵀ B)ᵀ
    return value, coefs.transpose(1, 2)


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
    return AttentionWeights(wq=wq, wk=wk, wv=wv, wo=wo, bq=bq, bk=bk, bv=bv, bo=attn.bo, head_dim=attn.head_dim)
