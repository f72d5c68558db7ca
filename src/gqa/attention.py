"""Head-group maths and the attention function.

H query heads share G key/value heads. Grouping is contiguous everywhere in gqa (as in transformers'
`repeat_kv`, torch SDPA `enable_gqa`, vLLM and FlashInfer): query head h reads KV head h // (H // G).
A different grouping is realised at conversion time by permuting query heads, never at run time.

Nothing here repeats K/V up to H heads. Prefill goes through SDPA with `enable_gqa=True`; short query
blocks (decode) fold the H // G query heads of a group into the rows of one matmul against their KV
head, so every K/V element is read once per group: the reason GQA decodes faster in the first place.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import GQAError

# Query blocks up to this length take the grouped-matmul path; longer ones (prefill) take SDPA.
DECODE_MAX_QUERY_LEN = 16


def check_heads(n_heads: int, n_kv_heads: int) -> None:
    """Raise GQAError unless n_kv_heads is a positive divisor of n_heads."""
    if n_kv_heads < 1 or n_heads < 1:
        raise GQAError(f"head counts must be positive, got {n_heads} query heads and {n_kv_heads} KV heads")
    if n_kv_heads > n_heads:
        raise GQAError(f"{n_kv_heads} KV heads is more than the {n_heads} query heads; G must divide H")
    if n_heads % n_kv_heads:
        raise GQAError(f"{n_kv_heads} KV heads does not divide {n_heads} query heads; choose one of {divisors(n_heads)}")


def check_regroup(n_kv_heads_now: int, n_kv_heads: int, n_heads: int, where: str = "") -> None:
    """A conversion merges whole groups: the G asked for must divide the G a layer has now."""
    if n_kv_heads < 1:
        raise GQAError(f"{where}the number of KV heads must be >= 1, got {n_kv_heads}")
    if n_kv_heads_now % n_kv_heads:
        raise GQAError(f"{where}{n_kv_heads} KV heads does not divide the current {n_kv_heads_now} (of {n_heads} query "
                       f"heads); choose one of {divisors(n_kv_heads_now)}")


def divisors(n: int) -> list[int]:
    return [g for g in range(1, n + 1) if n % g == 0]


def heads_name(n_heads: int, n_kv_heads) -> str:
    """"MHA", "GQA-g" or "MQA" for G KV heads of H query heads; for one G per layer, each name once, joined
    by "+" ("GQA-2+MQA")."""
    layers = [n_kv_heads] if isinstance(n_kv_heads, int) else n_kv_heads
    return "+".join(sorted({"MHA" if g == n_heads else "MQA" if g == 1 else f"GQA-{g}" for g in layers}))


def kv_head_of(query_head: int, n_heads: int, n_kv_heads: int) -> int:
    """The KV head that query head `query_head` reads (contiguous grouping)."""
    check_heads(n_heads, n_kv_heads)
    return query_head // (n_heads // n_kv_heads)


def build_mask(
    query_positions: torch.Tensor,
    key_valid: torch.Tensor,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Boolean mask [B, 1, S, T]: True where query s may attend to key t.

    query_positions: [B, S] absolute position of each query (its slot in the cache).
    key_valid: [B, T] True for keys that hold a real token (padding and unwritten cache slots are False).
    Keys are addressed by slot index t, which equals their absolute position.
    """
    key_index = torch.arange(key_valid.shape[-1], device=key_valid.device)
    allowed = key_index[None, None, :] <= query_positions[:, :, None]  # causal
    if sliding_window is not None:
        allowed &= key_index[None, None, :] > query_positions[:, :, None] - sliding_window
    allowed &= key_valid[:, None, :]
    # A padding query may have no key at all; let it see its own slot so softmax stays finite.
    own = key_index[None, None, :] == query_positions[:, :, None]
    allowed |= own & ~allowed.any(-1, keepdim=True)
    return allowed[:, None]


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention with the query group folded into the rows: q [B, H, S, D], k/v [B, G, T, D] -> [B, H, S, D]
    (mask as `attention` takes it).

    q is viewed as [B, G, (H/G)·S, D], so one matmul per KV head serves its whole group and K/V are
    never copied. Softmax runs in fp32.
    """
    batch, n_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    q = q.reshape(batch, n_kv_heads, group * q_len, head_dim)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = scores.view(batch, n_kv_heads, group, q_len, kv_len)
    if mask is not None and mask.dtype == torch.bool:  # [B, 1, S, T] -> broadcast over (G, H/G)
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    elif mask is not None:  # additive, [B or 1, H or 1, S, T]: a per-head bias splits into (G, H/G)
        heads = (n_kv_heads, group) if mask.shape[1] == n_heads else (1, 1)
        scores = scores + mask.float().view(mask.shape[0], *heads, mask.shape[2], kv_len)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs.view(batch, n_kv_heads, group * q_len, kv_len), v)
    return out.view(batch, n_heads, q_len, v.shape[-1])


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """Grouped attention: q [B, H, S, D], k/v [B, G, T, D], mask [B, 1, S, T] bool (True = attend), or a
    float mask [B or 1, H or 1, S, T] added to the scores (T5's position bias with its padding).

    `is_causal` (only without a mask, S == T) lets SDPA pick its fastest causal kernel.
    """
    n_heads, n_kv_heads = q.shape[1], k.shape[1]  # checked once, when the model was built (ModelConfig)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if q.shape[2] <= DECODE_MAX_QUERY_LEN and not is_causal:
        return grouped_attention(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, scale=scale,
        enable_gqa=n_kv_heads != n_heads,
    )


KV_TILE_VALUES = 2**21  # K or V values converted at a time by `attend_quantized` (8 MB of float32), over the batch


def kv_tile(batch: int, n_kv_heads: int, head_dim: int) -> int:
    """Cache slots per tile: about KV_TILE_VALUES values over the batch's sequences and KV heads, a power of
    two in 256..4096. Fewer, longer tiles pay the per-tile cost of small ops less often (one sequence, 8k
    slots: 2.3 ms a layer in tiles of 512, 1.0 ms in 4096, on the 2-core CPU); past a few MB the converted tile
    no longer stays in cache (8 sequences: 1024 is best)."""
    slots = KV_TILE_VALUES // max(1, batch * n_kv_heads * head_dim)
    return 1 << max(8, min(12, slots.bit_length() - 1))



def attend_quantized(q: torch.Tensor, cache, layer: int, mask: torch.Tensor | None, scale: float | None = None,
                     tile: int | None = None, n_keys: int | None = None) -> torch.Tensor:
    """Attention of q [B, H, S, D] over a `QuantizedKVCache` layer, reading it as the runtimes do: dequantized
    where it is read. Decode (S ≤ DECODE_MAX_QUERY_LEN) reads the written slots `tile` at a time, twice: the
    scores of every slot (a [B, H, S, T] row of numbers, small), one softmax, then the weighted values; the
    codes of a tile are converted to float32 once per pass and scaled through the scores and the
    probabilities, never value by value (`KVFormat.affine`), so no more than a tile of K or V is ever in
    float. A prefill block reads the written slots of this one layer and runs as `attention` does.
    mask: [B, 1, S, max_len] bool, or a float mask [B or 1, H or 1, S, max_len] added to the scores (an
    encoder–decoder's position bias and padding). n_keys: the slots to read (default: those written before
    these queries, and theirs; a cross-attention cache: all of them)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    written = n_keys or int(cache.lengths.max()) + q.shape[2]  # slots past every sequence's end hold nothing yet
    if q.shape[2] > DECODE_MAX_QUERY_LEN:
        k, v = cache.read(layer, 0, written)
        return attention(q, k.to(q.dtype), v.to(q.dtype), None if mask is None else mask[..., :written], scale)
    batch, n_heads, q_len, head_dim = q.shape
    n_kv_heads = next(iter(cache.keys[layer].values())).shape[1]
    tile = tile or kv_tile(batch, n_kv_heads, head_dim)
    rows = n_heads // n_kv_heads * q_len
    qg = q.float().reshape(batch, n_kv_heads, rows, head_dim)
    scores = torch.empty(batch, n_kv_heads, rows, written, device=q.device)
    for start in range(0, written, tile):
        end = min(start + tile, written)
        scores[..., start:end] = affine_scores(qg, *cache.read_affine(layer, start, end))
    scores *= scale
    if mask is not None and mask.dtype != torch.bool:  # added to the scores: [B, H, S, T] -> [B, G, (H/G)·S, T]
        scores += mask[..., :written].expand(batch, n_heads, q_len, written).reshape(batch, n_kv_heads, rows, written)
    elif mask is not None:  # [B, 1, S, T] -> the rows of each group: (H/G) copies of the S queries
        allowed = mask[..., :written].expand(batch, n_heads // n_kv_heads, q_len, written)
        scores.masked_fill_(~allowed.reshape(batch, 1, rows, written), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.zeros(batch, n_kv_heads, rows, head_dim, device=q.device)
    for start in range(0, written, tile):
        end = min(start + tile, written)
        out += affine_values(probs[..., start:end], *cache.read_affine(layer, start, end, values=True))
    return out.reshape(batch, n_heads, q_len, head_dim).to(q.dtype)


def affine_scores(q: torch.Tensor, c: torch.Tensor, d: torch.Tensor | None, m: torch.Tensor | None) -> torch.Tensor:
    """q [B, G, R, D] against keys stored as c·d + m per block (c [B, G, n, T, D/n], d and m [B, G, n, T]):
    Σ_blocks d·(q_b · c_b) + m·Σ q_b, scores [B, G, R, T]."""
    n = c.shape[2]
    qb = q.unflatten(-1, (n, -1)).transpose(2, 3)  # [B, G, n, R, D/n]
    partial = torch.matmul(qb, c.transpose(-1, -2))  # [B, G, n, R, T]
    if d is None:
        return partial.sum(2)
    scores = (partial * d.unsqueeze(3)).sum(2)
    if m is not None:
        scores += torch.matmul(qb.sum(-1).transpose(2, 3), m)  # [B, G, R, n] @ [B, G, n, T]
    return scores


def affine_values(p: torch.Tensor, c: torch.Tensor, d: torch.Tensor | None, m: torch.Tensor | None) -> torch.Tensor:
    """Probabilities p [B, G, R, T] times values stored as c·d + m per block: [B, G, R, D]."""
    if d is None:
        return torch.matmul(p.unsqueeze(2), c).transpose(2, 3).flatten(-2)
    weighted = p.unsqueeze(2) * d.unsqueeze(3)  # [B, G, n, R, T]: each block's scale folded into p
    out = torch.matmul(weighted, c)  # [B, G, n, R, D/n]
    if m is not None:
        out = out + torch.matmul(p.unsqueeze(2), m.unsqueeze(-1))  # Σ_t p·m, the same for a block's dims
    return out.transpose(2, 3).flatten(-2)
