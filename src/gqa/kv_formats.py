"""How a KV cache stores its values: the model's dtype, llama.cpp's block formats, vLLM's fp8.

Runtimes offer fewer KV bytes without touching the weights, and it stacks with fewer KV heads; gqa stores
its cache in the same formats, value for value as the runtimes define them, so that what it measures is
what a user gets there:

- llama.cpp's `q8_0`, `q4_0`, `q4_1`, `q5_0`, `q5_1`, `iq4_nl` (`-ctk/-ctv`): blocks of 32 consecutive values of one
  head's row, each with an fp16 scale d (and an fp16 minimum m for the `_1` kinds) and a 4-, 5- or 8-bit
  code per value: x ≈ d·q (`_0`) or d·q + m (`_1`). The codes are computed exactly as ggml's reference
  quantizers (`quantize_row_*_ref`, and the `gguf` package's `gguf.quants`, which tests compare against):
  the scale from the block's largest magnitude (or its range), its reciprocal in fp32, codes by
  truncation after an offset (round-half-away-from-zero for q8_0), the scale stored as fp16 afterwards.
  The bytes per value are the format's own (q8_0 34 / 32, q4_0 18 / 32, ...). `iq4_nl` (18 / 32): each
  value's nearest of 16 fixed non-uniform levels, the block's scale refitted by weighted least squares
  (`quantize_row_iq4_nl_ref`, which llama.cpp's CPU cache calls; `gguf.quants` has no quantizer for it,
  so the tests compare with llama.cpp's own C).
- llama.cpp rotates Q and K (after RoPE), and V, by an orthonormal Walsh–Hadamard matrix before a quantized
  cache, wherever the head size is a multiple of 64 (`attn_rot_k` / `attn_rot_v` in its
  `src/llama-kv-cache.cpp`; `LLAMA_ATTN_ROT_DISABLE=1` turns it off): K in blocks of the largest power of
  two ≥ 64 dividing the head size, V in blocks of 64, and the attention output is rotated back. Scores
  are unchanged by the rotation; what changes is which values share a block, and outliers are spread, so
  the quantization error is smaller. `rotation=False` is the unrotated variant.
- vLLM's `fp8_e4m3` / `fp8_e5m2` (`kv_cache_dtype="fp8"`): each value divided by a per-tensor scale (1.0 by
  default, as vLLM's) and cast to 8-bit floating point, saturating at the format's largest finite value,
  rounded to nearest as vLLM's CUDA kernels do; `fp8_e4m3_cpu` / `fp8_e5m2_cpu` round toward zero, as
  vLLM's CPU build does (`csrc/cpu/cpu_attn_fp8.hpp`).

A cache of one of these formats stores the codes (`QuantizedKVCache`), and attention dequantizes the
part of it each step reads, tile by tile (`gqa.attention.attend_quantized`); a full forward without a
cache (perplexity) quantizes K and V exactly as the cache would store them (`roundtrip`), so the two agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from .errors import GQAError

BLOCK = 32  # values per llama.cpp block (QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0 = 32)


def roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), exactly: floor(|x|) + floor(2·frac(|x|)), as `gguf.quants.np_roundf`
    (adding 0.5 before flooring rounds 0.49999997 up in float32)."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def reciprocal(d: torch.Tensor) -> torch.Tensor:
    """1 / d in float32, 0 where d is 0 (a block of zeros)."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def signed_max(blocks: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude in each block, its sign kept (the first one on ties, as ggml)."""
    return blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes [..., 32] in 0..15 -> bytes [..., 16]: value j in the low nibble, value j + 16 in the high one."""
    return (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.cat([packed & 15, packed >> 4], dim=-1)


def pack_high_bits(q: torch.Tensor) -> torch.Tensor:
    """The fifth bit of 32 codes -> 4 bytes, value j at bit j (little-endian `qh` of q5_0 / q5_1)."""
    bits = ((q >> 4) & 1).view(*q.shape[:-1], 4, 8).to(torch.uint8)
    return (bits << torch.arange(8, dtype=torch.uint8, device=q.device)).sum(-1, dtype=torch.uint8)


def unpack_high_bits(qh: torch.Tensor) -> torch.Tensor:
    bits = (qh[..., None] >> torch.arange(8, dtype=torch.uint8, device=qh.device)) & 1
    return bits.reshape(*qh.shape[:-1], 32) << 4


# ------------------------------------------------------------------------------------------------ formats

@dataclass(frozen=True)
class KVFormat:
    """A KV storage format: `quantize` maps float values [..., D] to named code tensors, `dequantize` back;
    `fields` says their trailing shapes and dtypes (what a cache allocates), `bytes_per_value` what they
    cost. Float formats (the model's dtype) store values as they are."""
    name: str
    kind: str  # "float" | "llama" (a llama.cpp block format) | "fp8" (vLLM's)
    bytes_per_value: float
    runtime: str  # where users meet it: the flag that gives it

    @property
    def quantized(self) -> bool:
        return self.kind != "float"

    @property
    def dtype(self) -> torch.dtype:
        """What a float format stores its values as."""
        return FLOATS[self.name]

    def check_head_dim(self, head_dim: int) -> None:
        if self.kind == "llama" and head_dim % BLOCK:
            raise GQAError(f"--kv-cache-dtype {self.name} stores blocks of {BLOCK} values of a head; this model's heads "
                           f"are {head_dim} wide (llama.cpp refuses it too)")

    def check_device(self, device: torch.device | str) -> None:
        """fp8 needs float8 tensors on the device (torch has none on MPS, for one): refused up front, not mid-run."""
        if self.kind == "fp8" and not fp8_on(str(device), self.name.removesuffix("_cpu")):
            raise GQAError(f"--kv-cache-dtype {self.name}: torch {torch.__version__} has no float8 tensors on "
                           f"{device}; use a llama.cpp format (q8_0 stores 1.06 bytes a value) or the model's dtype")

    def fields(self, head_dim: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape per token, dtype) of the code tensors, blocked: [blocks, per block] (fp8: one block
        of the whole head)."""
        blocks = head_dim // BLOCK
        if self.kind == "fp8":
            return {"values": ((1, head_dim), FP8[self.name.removesuffix("_cpu")][0])}
        out = {"scale": ((blocks,), torch.float16)}
        if self.name.endswith("_1"):
            out["min"] = ((blocks,), torch.float16)
        out["codes"] = ((blocks, BLOCK), torch.int8) if self.name == "q8_0" else ((blocks, BLOCK // 2), torch.uint8)
        if self.name.startswith("q5"):
            out["high"] = ((blocks, 4), torch.uint8)
        return out

    def quantize(self, x: torch.Tensor, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Codes of float values x [..., D], shaped as `fields` says (checked finite: a NaN has no code)."""
        if not bool(torch.isfinite(x).all()):
            raise GQAError(f"cannot store NaN or Inf in a {self.name} KV cache")
        if self.kind == "fp8":
            dtype, largest = FP8[self.name.removesuffix("_cpu")]
            x = (x.float() / scale).clamp(-largest, largest)
            values = truncated_fp8(x, dtype) if self.name.endswith("_cpu") else x.to(dtype)
            return {"values": values.unsqueeze(-2)}
        return QUANTIZERS[self.name](x.float().reshape(*x.shape[:-1], -1, BLOCK))

    def dequantize(self, codes: dict[str, torch.Tensor], scale: float = 1.0) -> torch.Tensor:
        """Float32 values [..., D] of codes."""
        if self.kind == "fp8":
            return codes["values"].float().squeeze(-2) * scale
        values = DEQUANTIZERS[self.name](codes)
        return values.reshape(*values.shape[:-2], -1)

    def affine(self, codes: dict[str, torch.Tensor], out: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Codes held block-major, [..., blocks, T, ...] (as `QuantizedKVCache` holds them), as value = c·d + m
        per block: (c [..., blocks, T, per block] float32, d and m [..., blocks, T] float32 or None where 1 or
        0). Attention takes its dot products with the small integer codes and applies d and m to the few
        scores and probabilities instead of to every value (`gqa.attention.attend_quantized`). `out`: a float32
        buffer of c's shape to convert into (a fresh tensor of megabytes is page-faulted in on every call)."""
        integers = codes["values"] if self.kind == "fp8" else \
            codes["codes"] if self.name == "q8_0" else blockwise(codes, self.name)
        c = integers.float() if out is None else out.copy_(integers)
        if self.kind == "fp8":
            return c, None, None
        d = codes["scale"].float()
        if self.name.endswith("_1"):
            return c, d, codes["min"].float()
        offset = {"q8_0": 0, "q4_0": 8, "q5_0": 16, "iq4_nl": 0}[self.name]
        return c, d, d * -offset if offset else None

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """x as the cache returns it after storing it, in x's dtype."""
        if self.kind == "float":
            return x.to(FLOATS[self.name]).to(x.dtype)
        return self.dequantize(self.quantize(x)).to(x.dtype)


def q8_0(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    d = blocks.abs().amax(-1, keepdim=True) / 127
    codes = roundf(blocks * reciprocal(d)).to(torch.int8)
    return {"scale": d[..., 0].half(), "codes": codes}


def q4_0(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    d = signed_max(blocks) / -8
    q = torch.trunc(blocks * reciprocal(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return {"scale": d[..., 0].half(), "codes": pack_nibbles(q)}


def q5_0(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    d = signed_max(blocks) / -16
    q = torch.trunc(blocks * reciprocal(d) + 16.5).clamp(0, 31).to(torch.uint8)
    return {"scale": d[..., 0].half(), "codes": pack_nibbles(q & 15), "high": pack_high_bits(q)}


IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml's kvalues_iq4nl


def iq4_nl(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """ggml's `quantize_row_iq4_nl_ref` (what llama.cpp's CPU cache stores): each value's nearest of 16 fixed
    non-uniform levels at the scale max/-127, then the scale refitted by least squares weighted by x²,
    Σx³q / Σx²q², summed in order as C does (float32 sums, value by value). ggml leaves a block of near-zero
    values (|x| < 1e-15) scale 0 with its codes unset; here they are level 1's."""
    levels = iq4_nl_levels(blocks.device, torch.float32)
    d = signed_max(blocks) / -127.0
    tiny = blocks.abs().amax(-1, keepdim=True) < 1e-15
    index = nearest_level(levels, blocks * reciprocal(d))
    q, w = levels[index], blocks * blocks
    sum_qx, sum_q2 = torch.zeros_like(d[..., 0]), torch.zeros_like(d[..., 0])
    for j in range(BLOCK):
        wq = w[..., j] * q[..., j]
        sum_qx = sum_qx + wq * blocks[..., j]
        sum_q2 = sum_q2 + wq * q[..., j]
    scale = torch.where(sum_q2 > 0, sum_qx / torch.where(sum_q2 > 0, sum_q2, 1.0), 0.0)
    scale = torch.where(tiny[..., 0], 0.0, scale)
    return {"scale": scale.half(), "codes": pack_nibbles(torch.where(tiny, 8, index).to(torch.uint8))}


@lru_cache(maxsize=None)
def iq4_nl_levels(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The 16 levels as a tensor, made once per device (`blockwise` looks codes up in it on every tile)."""
    return torch.tensor(IQ4_NL_VALUES, dtype=dtype, device=device)


def nearest_level(levels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """ggml's best_index_int8: the index of the level nearest x, the upper one on a tie."""
    upper = torch.searchsorted(levels, x.contiguous(), right=True).clamp(1, len(levels) - 1)
    index = torch.where(x - levels[upper - 1] < levels[upper] - x, upper - 1, upper)
    return torch.where(x <= levels[0], 0, torch.where(x >= levels[-1], len(levels) - 1, index))


def with_min(levels: int):
    """q4_1 / q5_1: codes over the block's range [min, max] in `levels` steps."""
    def quantize(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
        d = (high - low) / levels
        q = torch.trunc((blocks - low) * reciprocal(d) + 0.5).clamp(0, levels).to(torch.uint8)
        out = {"scale": d[..., 0].half(), "min": low[..., 0].half(), "codes": pack_nibbles(q & 15)}
        if levels == 31:
            out["high"] = pack_high_bits(q)
        return out
    return quantize


def blockwise(codes: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Integer codes [..., blocks, 32] of a 4- or 5-bit format, the fifth bit joined (iq4_nl: its levels)."""
    q = unpack_nibbles(codes["codes"])
    if name == "iq4_nl":
        return iq4_nl_levels(q.device, torch.int8)[q.long()]
    return q | unpack_high_bits(codes["high"]) if name.startswith("q5") else q


def dequantize_0(offset: int, name: str):
    def dequantize(codes: dict[str, torch.Tensor]) -> torch.Tensor:
        q = codes["codes"].float() if name == "q8_0" else blockwise(codes, name).float() - offset
        return q * codes["scale"].float()[..., None]
    return dequantize


def dequantize_1(name: str):
    def dequantize(codes: dict[str, torch.Tensor]) -> torch.Tensor:
        return blockwise(codes, name).float() * codes["scale"].float()[..., None] + codes["min"].float()[..., None]
    return dequantize


@lru_cache(maxsize=None)
def fp8_on(device: str, name: str) -> bool:
    """Whether float32 -> `name` -> float32 runs on `device`."""
    try:
        torch.ones(2, device=device).to(FP8[name][0]).float()
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def truncated_fp8(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (finite, within range) to 8-bit floats rounded toward zero, as vLLM's CPU build stores its fp8 cache
    (`float_to_fp8e4m3_scalar`: the float32 bits of x·2^(bias − 127) cut to the 8-bit format's; its CUDA
    kernels round to nearest instead). Scaling by 2^(bias − 127) makes float32's own subnormals the 8-bit
    format's, so they are cut the same way."""
    e4m3 = dtype == torch.float8_e4m3fn
    bits = (x * 2.0 ** (-120 if e4m3 else -112)).view(torch.int32)
    payload = (bits >> (20 if e4m3 else 21)) & 0x7F
    if e4m3:
        payload = payload.clamp(max=0x7E)  # 0x7F is NaN in e4m3
    return (((bits >> 24) & 0x80) | payload).to(torch.uint8).view(dtype)


QUANTIZERS = {"q8_0": q8_0, "q4_0": q4_0, "q5_0": q5_0, "q4_1": with_min(15), "q5_1": with_min(31), "iq4_nl": iq4_nl}
DEQUANTIZERS = {"q8_0": dequantize_0(0, "q8_0"), "q4_0": dequantize_0(8, "q4_0"), "q5_0": dequantize_0(16, "q5_0"),
                "q4_1": dequantize_1("q4_1"), "q5_1": dequantize_1("q5_1"), "iq4_nl": dequantize_0(0, "iq4_nl")}
FP8 = {"fp8_e4m3": (torch.float8_e4m3fn, 448.0), "fp8_e5m2": (torch.float8_e5m2, 57344.0)}

FORMATS = {
    "q8_0": KVFormat("q8_0", "llama", 34 / 32, "llama.cpp -ctk q8_0 -ctv q8_0 -fa on"),
    "q5_1": KVFormat("q5_1", "llama", 24 / 32, "llama.cpp -ctk q5_1 -ctv q5_1 -fa on"),
    "q5_0": KVFormat("q5_0", "llama", 22 / 32, "llama.cpp -ctk q5_0 -ctv q5_0 -fa on"),
    "q4_1": KVFormat("q4_1", "llama", 20 / 32, "llama.cpp -ctk q4_1 -ctv q4_1 -fa on"),
    "q4_0": KVFormat("q4_0", "llama", 18 / 32, "llama.cpp -ctk q4_0 -ctv q4_0 -fa on"),
    "iq4_nl": KVFormat("iq4_nl", "llama", 18 / 32, "llama.cpp -ctk iq4_nl -ctv iq4_nl -fa on"),
    "fp8_e4m3": KVFormat("fp8_e4m3", "fp8", 1.0, 'vLLM kv_cache_dtype="fp8" (or "fp8_e4m3")'),
    "fp8_e5m2": KVFormat("fp8_e5m2", "fp8", 1.0, 'vLLM kv_cache_dtype="fp8_e5m2"'),
    # vLLM's CPU build stores the same formats rounded toward zero, where its CUDA kernels round to nearest
    "fp8_e4m3_cpu": KVFormat("fp8_e4m3_cpu", "fp8", 1.0, 'vLLM\'s CPU build, kv_cache_dtype="fp8"'),
    "fp8_e5m2_cpu": KVFormat("fp8_e5m2_cpu", "fp8", 1.0, 'vLLM\'s CPU build, kv_cache_dtype="fp8_e5m2"'),
}
FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp8": "fp8_e4m3", "fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
           "f16": "float16"}


def kv_format(name: str | None, model_dtype: torch.dtype = torch.float32) -> KVFormat:
    """The format called `name` (None: the model's own dtype)."""
    if name is None:
        name = str(model_dtype).removeprefix("torch.")
    name = ALIASES.get(name, name)
    if name in FORMATS:
        return FORMATS[name]
    if name in FLOATS:
        return KVFormat(name, "float", torch.empty((), dtype=FLOATS[name]).element_size(), "the model's dtype")
    raise GQAError(f"unknown KV cache dtype {name!r}; choose one of {', '.join([*FLOATS, *FORMATS])}")


def names() -> list[str]:
    return [*FLOATS, *FORMATS]


# ------------------------------------------------------------------------------------------------ rotation

@lru_cache(maxsize=None)
def hadamard(n: int) -> torch.Tensor:
    """llama.cpp's orthonormal Walsh–Hadamard matrix of order n (Sylvester's construction; H·H = I)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def rotation_sizes(fmt: KVFormat, head_dim: int, enabled: bool = True) -> tuple[int | None, int | None]:
    """(K's rotation block, V's) where llama.cpp rotates (its quantized types, head size a multiple of 64)."""
    if not enabled or fmt.kind != "llama" or head_dim % 64:
        return None, None
    k = 64
    while head_dim % (k * 2) == 0:
        k *= 2
    return k, 64


def rotate(x: torch.Tensor, n: int | None) -> torch.Tensor:
    """x [..., D] times the order-n Hadamard matrix in consecutive blocks of n (its own inverse)."""
    if n is None:
        return x
    h = hadamard(n).to(device=x.device, dtype=x.dtype)
    return (x.unflatten(-1, (-1, n)) @ h).flatten(-2)


# ------------------------------------------------------------------------------------------------ storage

@dataclass(frozen=True)
class KVStorage:
    """How one model's KV cache stores K and V: a format, and llama.cpp's rotations where they apply."""
    format: KVFormat
    k_rotation: int | None = None
    v_rotation: int | None = None
    key_order: torch.Tensor | None = None  # the order llama.cpp holds Q/K dims in (None: the model's own)

    def order_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Q or K [..., D] in the dim order llama.cpp holds them in: its `llama` / `deci` models take RoPE over
        adjacent pairs (the converter reorders HF's rotate-half rows), so a block of 32 values holds other
        dims than in HF's order. Scores are unchanged; which values share a quantization block is not."""
        return x if self.key_order is None else x[..., self.key_order.to(x.device)]

    @property
    def query_format(self) -> KVFormat | None:
        """llama.cpp's attention over a quantized K takes the dot products in 8-bit integers: each query is
        quantized to q8_0 blocks first (its CPU flash attention, `q_to_vec_dot`; q8_1 for the _1 kinds, whose
        codes are q8_0's; CUDA's vector kernels likewise). Scores are then those of the dequantized q8_0 query."""
        return FORMATS["q8_0"] if self.format.kind == "llama" else None

    def stored_queries(self, q: torch.Tensor) -> torch.Tensor:
        """Q as attention over this storage's K takes it: in K's dim order and rotation, and quantized where
        the runtime quantizes its queries (`query_format`)."""
        q = rotate(self.order_keys(q), self.k_rotation)
        return q if self.query_format is None else self.query_format.roundtrip(q)

    def stored_keys_values(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as the cache holds them before quantizing: K in llama.cpp's dim order, both rotated."""
        return rotate(self.order_keys(k), self.k_rotation), rotate(v, self.v_rotation)

    @property
    def name(self) -> str:
        rotated = self.k_rotation is not None or self.v_rotation is not None
        unrotated = self.format.kind == "llama" and not rotated
        return self.format.name + (" (Hadamard-rotated)" if rotated else " (unrotated)" if unrotated else "")

    def bytes_per_token(self, n_kv_heads: list[int], head_dim: int) -> int:
        """KV bytes a token adds over all layers (K and V)."""
        return round(sum(2 * g * head_dim for g in n_kv_heads) * self.format.bytes_per_value)


def kv_storage(name: str | None, head_dim: int, model_dtype: torch.dtype = torch.float32,
               rotation: bool = True, pairs_adjacent: bool = False) -> KVStorage:
    """The storage `--kv-cache-dtype name` asks for, checked against the head size; `rotation=False`:
    llama.cpp's formats without its Hadamard rotation (`LLAMA_ATTN_ROT_DISABLE=1`); `pairs_adjacent`: a
    model whose rotate-half RoPE llama.cpp runs over adjacent pairs (`llama_cpp_pairs_adjacent`)."""
    fmt = kv_format(name, model_dtype)
    fmt.check_head_dim(head_dim)
    order = None
    if fmt.kind == "llama" and pairs_adjacent:
        order = torch.stack([torch.arange(head_dim // 2), torch.arange(head_dim // 2) + head_dim // 2], -1).flatten()
    return KVStorage(fmt, *rotation_sizes(fmt, head_dim, rotation), key_order=order)
