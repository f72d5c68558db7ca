"""Triton GQA decode attention: each KV head is read once for its whole query group.

One program per (sequence, KV head, KV split). The H/G query heads that share the KV head form the rows
(the M dimension) of one tile, padded to 16 for the tensor cores, so each K/V tile loaded from memory
serves the whole group: the cache is read once per step, which is what makes GQA decode faster.
Online softmax in fp32 with exp2; the keys are split across programs (flash-decoding) so that small
batches still fill the GPU, and a second, small kernel merges the splits' partial results.

The cache is either contiguous, [batch, G, max_len, head_dim] (gqa.cache.KVCache), or paged,
[num_pages, G, page_size, head_dim] with a block table [batch, max_pages] of page indices.
`lengths[b]` is the number of valid keys of sequence b (ragged batches). No host synchronisation:
the grid depends only on shapes, so a CUDA graph can capture it.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    Q, K, V, Lengths, BlockTable, PartialOut, PartialMax, PartialSum,
    scale_log2,
    stride_qb, stride_qh,
    stride_kb, stride_kg, stride_kt,
    stride_vb, stride_vg, stride_vt,
    stride_tb,
    stride_ob, stride_oh, stride_os,
    stride_mb, stride_mh,
    split_len,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    b = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(Lengths + b)
    start = split * split_len
    end = tl.minimum(start + split_len, length)

    rows = tl.arange(0, GROUP_PAD)  # query heads of the group, padded
    dims = tl.arange(0, BLOCK_D)
    heads = g * GROUP + rows
    row_ok = rows < GROUP
    dim_ok = dims < HEAD_DIM
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    running_max = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    for tile in range(start, end, BLOCK_N):
        keys = tile + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        if PAGED:
            page = tl.load(BlockTable + b * stride_tb + keys // PAGE_SIZE, mask=key_ok, other=0)
            slot_k = page * stride_kb + (keys % PAGE_SIZE) * stride_kt
            slot_v = page * stride_vb + (keys % PAGE_SIZE) * stride_vt
        else:
            slot_k = b * stride_kb + keys * stride_kt
            slot_v = b * stride_vb + keys * stride_vt
        k = tl.load(K + g * stride_kg + slot_k[:, None] + dims[None, :], mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        v = tl.load(V + g * stride_vg + slot_v[:, None] + dims[None, :], mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale_log2  # [GROUP_PAD, BLOCK_N], in log2 units
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp2(running_max - new_max)
        p = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        running_max = new_max

    out_ptr = PartialOut + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + dims[None, :]
    tl.store(out_ptr, acc, mask=row_ok[:, None] & dim_ok[None, :])
    stat = b * stride_mb + heads * stride_mh + split
    tl.store(PartialMax + stat, running_max, mask=row_ok)
    tl.store(PartialSum + stat, running_sum, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    PartialOut, PartialMax, PartialSum, Out,
    stride_ob, stride_oh, stride_os,
    stride_mb, stride_mh,
    stride_fb, stride_fh,
    num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    split_ok = splits < num_splits
    m = tl.load(PartialMax + b * stride_mb + h * stride_mh + splits, mask=split_ok, other=float("-inf"))
    s = tl.load(PartialSum + b * stride_mb + h * stride_mh + splits, mask=split_ok, other=0.0)
    top = tl.max(m, axis=0)
    weight = tl.where(m > float("-inf"), tl.exp2(m - top), 0.0)  # empty splits (past the length) weigh nothing
    acc = tl.load(PartialOut + b * stride_ob + h * stride_oh + splits[:, None] * stride_os + dims[None, :],
                  mask=split_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(s * weight, axis=0)
    tl.store(Out + b * stride_fb + h * stride_fh + dims, out.to(Out.dtype.element_ty), mask=dims < HEAD_DIM)


def num_splits_for(batch: int, n_kv_heads: int, max_len: int, block_n: int, device: torch.device) -> int:
    """Enough splits to give the GPU about four waves of programs, each split at least a few tiles long."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4  # the interpreter: a handful, so tests exercise the merge
    wanted = math.ceil(4 * sms / max(1, batch * n_kv_heads))
    most = max(1, math.ceil(max_len / (4 * block_n)))
    return max(1, min(wanted, most, 64))


def gqa_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    block_table: torch.Tensor | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Decode attention for one new query per sequence.

    q [B, H, D]; contiguous cache k/v [B, G, T, D], or paged k/v [pages, G, page_size, D] with
    block_table [B, max_pages]; lengths [B] valid keys per sequence (>= 1). Returns [B, H, D] in q's dtype.
    """
    batch, n_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[1]
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_kv_heads} KV heads do not divide {n_heads} query heads")
    group = n_heads // n_kv_heads
    paged = block_table is not None
    if paged:
        page_size = k_cache.shape[2]
        max_len = block_table.shape[1] * page_size
    else:
        page_size = 1
        max_len = k_cache.shape[2]
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("the last dimension of q, k and v must be contiguous")
    block_n = block_n or (64 if head_dim > 64 else 128)
    splits = num_splits or num_splits_for(batch, n_kv_heads, max_len, block_n, q.device)
    split_len = triton.cdiv(triton.cdiv(max_len, splits), block_n) * block_n
    splits = triton.cdiv(max_len, split_len)
    scale = (1.0 / math.sqrt(head_dim)) if scale is None else scale

    partial = torch.empty(batch, n_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    partial_max = torch.empty(batch, n_heads, splits, dtype=torch.float32, device=q.device)
    partial_sum = torch.empty_like(partial_max)
    out = torch.empty(batch, n_heads, head_dim, dtype=q.dtype, device=q.device)
    lengths = lengths.to(torch.int32)
    table = block_table.to(torch.int32) if paged else lengths  # any pointer when not paged
    block_d = triton.next_power_of_2(head_dim)
    # Triton 3.9's interpreter computes bf16 dots wrongly (values read as the wrong type); upcast there.
    # On a GPU the dots take bf16/fp16 operands on the tensor cores with fp32 accumulation.
    dot_fp32 = q.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    _decode_split_kernel[(batch, n_kv_heads, splits)](
        Q=q, K=k_cache, V=v_cache, Lengths=lengths, BlockTable=table, PartialOut=partial, PartialMax=partial_max,
        PartialSum=partial_sum, scale_log2=scale * LOG2E,
        stride_qb=q.stride(0), stride_qh=q.stride(1),
        stride_kb=k_cache.stride(0), stride_kg=k_cache.stride(1), stride_kt=k_cache.stride(2),
        stride_vb=v_cache.stride(0), stride_vg=v_cache.stride(1), stride_vt=v_cache.stride(2),
        stride_tb=table.stride(0) if paged else 0,
        stride_ob=partial.stride(0), stride_oh=partial.stride(1), stride_os=partial.stride(2),
        stride_mb=partial_max.stride(0), stride_mh=partial_max.stride(1),
        split_len=split_len,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_N=block_n, PAGED=paged, PAGE_SIZE=page_size, DOT_FP32=dot_fp32,
        num_warps=4, num_stages=2,
    )
    _merge_splits_kernel[(batch, n_heads)](
        PartialOut=partial, PartialMax=partial_max, PartialSum=partial_sum, Out=out,
        stride_ob=partial.stride(0), stride_oh=partial.stride(1), stride_os=partial.stride(2),
        stride_mb=partial_max.stride(0), stride_mh=partial_max.stride(1),
        stride_fb=out.stride(0), stride_fh=out.stride(1),
        num_splits=splits,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(splits)),
        num_warps=2,
    )
    return out
