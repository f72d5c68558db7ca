"""One decoder-only Transformer for every supported family, MHA, GQA and MQA alike.

The config's fields say how a family differs (norm, positions and rotary layout, MLP, block layout, q/k
norms, biases, tied embeddings, scales); `n_kv_heads` is a list with one entry per layer, so a model may
group its heads differently in every layer. Hugging Face parameter names live only in `gqa.checkpoints`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend_quantized, attention, build_mask, check_heads
from .cache import KVCache, PagedKVCache, QuantizedKVCache, kv_bytes_per_token
from .errors import GQAError
from .gguf_layout import llama_cpp_pairs_adjacent
from .kernels import decode_kernel_available, gqa_decode
from .kv_formats import KVStorage, kv_storage, rotate

BLOCKS = ("sequential", "parallel", "parallel_shared", "post_norm")
ROPE_STYLES = ("half", "interleaved")
QK_NORMS = (None, "rms_head", "rms_all", "layer_head", "layer_per_head")
PER_HEAD_QK_NORMS = ("rms_all", "layer_per_head")  # whose weights have an entry per head's channel (merged with K)

ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: list[int]  # one entry per layer; each divides n_heads
    head_dim: int
    hidden_dim: int  # MLP inner width
    max_positions: int
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-5
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + w), in fp32; w is stored as the checkpoint has it
    embedding_multiplier: float = 1.0  # Gemma multiplies the embeddings by √dim
    positions: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    rotary_dim: int | None = None  # partial rotary (NeoX, Phi, StableLM, GPT-J) rotates the first rotary_dim dims
    rope_style: str = "half"  # which dims turn together: "half" (i, i + R/2: Llama, NeoX) | "interleaved" (2i, 2i+1: GPT-J)
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear" | "llama3", ...}
    position_offset: int = 0  # OPT's learned position table starts at row 2
    mlp: str = "gated"  # "gated": down(act(gate(x)) * up(x)); "plain": down(act(up(x)))
    activation: str = "silu"
    block: str = "sequential"  # see Block: "sequential" | "parallel" | "parallel_shared" | "post_norm"
    qk_norm: str | None = None  # norms on q and k before RoPE: "rms_head" | "rms_all" | "layer_head" | "layer_per_head"
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    output_bias: bool = False  # a bias on the LM head (Phi, GPT-J)
    tie_embeddings: bool = False
    sliding_window: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # nothing the maths reads; kept for the record
    attention_scale: ClassVar[float | None] = None  # decoders score q·k / √head_dim (encoder–decoders may not)

    def __post_init__(self) -> None:
        if isinstance(self.n_kv_heads, int):
            self.n_kv_heads = [self.n_kv_heads] * self.n_layers
        self.n_kv_heads = [int(g) for g in self.n_kv_heads]
        if len(self.n_kv_heads) != self.n_layers:
            raise GQAError(
                f"n_kv_heads has {len(self.n_kv_heads)} entries but the model has {self.n_layers} layers"
            )
        for g in self.n_kv_heads:
            check_heads(self.n_heads, g)
        if self.norm not in ("rms", "layer"):
            raise GQAError(f"unknown norm {self.norm!r}; expected 'rms' or 'layer'")
        if self.positions not in ("rope", "learned"):
            raise GQAError(f"unknown position encoding {self.positions!r}; expected 'rope' or 'learned'")
        if self.mlp not in ("gated", "plain"):
            raise GQAError(f"unknown MLP type {self.mlp!r}; expected 'gated' or 'plain'")
        if self.activation not in ACTIVATIONS:
            raise GQAError(f"unknown activation {self.activation!r}; supported: {sorted(ACTIVATIONS)}")
        for name, value, allowed in (("block", self.block, BLOCKS), ("rope_style", self.rope_style, ROPE_STYLES),
                                     ("qk_norm", self.qk_norm, QK_NORMS)):
            if value not in allowed:
                raise GQAError(f"unknown {name} {value!r}; expected one of {', '.join(map(str, allowed))}")
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        if "parallel_residual" in d:  # gqa 0.1 wrote the block layout as one flag
            d["block"] = "parallel" if d.pop("parallel_residual") else "sequential"
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise GQAError(f"unknown gqa config fields {unknown}")
        return cls(**d)

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        return kv_bytes_per_token(self.n_kv_heads, self.head_dim, bytes_per_element)


# ---------------------------------------------------------------------------------------------- rotary

def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with Llama 3 / linear scaling where configured."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise GQAError(f"rope scaling {kind!r} is not supported; supported: default, linear, llama3")


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, interleaved: bool = False):
    """cos, sin [B, 1, S, rotary_dim] for positions [B, S]: each frequency twice, in the layout its pairs have
    (rotate-half: [f_0 … f_R/2, f_0 … f_R/2]; interleaved: [f_0, f_0, f_1, f_1, …])."""
    freqs = positions[..., None].float() * inv_freq
    emb = (freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1))[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first rotary_dim dims of x [..., D] (the rest pass through), pairs as `rope_cos_sin` lays them."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    if interleaved:
        rotated = torch.stack((-x_rot[..., 1::2], x_rot[..., ::2]), dim=-1).flatten(-2)
    else:
        half = rot // 2
        rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    x_rot = x_rot * cos + rotated * sin
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot


# ---------------------------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma: scale by (1 + w) in fp32, then round
            return (h * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


class PerHeadLayerNorm(nn.Module):
    """StableLM's q/k norm: a LayerNorm without bias over each head's dims, with weights of its own per head
    (kept flat, [heads · D], like every per-head tensor in gqa)."""

    def __init__(self, n_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.eps, self.n_heads = eps, n_heads
        self.weight = nn.Parameter(torch.ones(n_heads * head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, H, T, D]
        weight = self.weight.view(self.n_heads, -1)[None, :, None, :]
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * weight.to(x.dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    if config.norm == "rms":
        return RMSNorm(dim or config.dim, config.norm_eps, config.norm_weight_offset)
    return nn.LayerNorm(dim or config.dim, eps=config.norm_eps)


def make_qk_norm(config: ModelConfig, n_heads: int) -> nn.Module:
    """The norm q (n_heads = H) or k (n_heads = G) goes through before RoPE, as `config.qk_norm` says."""
    D = config.head_dim
    if config.qk_norm == "rms_head":  # Qwen3: over each head's dims, one weight for all heads
        return RMSNorm(D, config.norm_eps)
    if config.qk_norm == "rms_all":  # OLMo-2: over the whole projection, a weight per channel of every head
        return RMSNorm(n_heads * D, config.norm_eps)
    if config.qk_norm == "layer_head":  # Phi: a LayerNorm over each head's dims, shared
        return nn.LayerNorm(D, eps=config.norm_eps)
    return PerHeadLayerNorm(n_heads, D, config.norm_eps)


class Attention(nn.Module):
    """Self-attention of H query heads over `n_kv_heads` KV heads (default: the config's for `layer`), in both
    model shapes: RoPE and q/k norms where the config has them, scores scaled by `config.attention_scale`
    (None: 1/√head_dim), K/V stored as `kv_storage` says (a quantized cache's format, or the model's dtype)."""

    def __init__(self, config: ModelConfig, layer: int, n_kv_heads: int | None = None):
        super().__init__()
        self.layer = layer
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads[layer] if n_kv_heads is None else n_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.attention_scale
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=config.out_bias)
        self.qk_norm = config.qk_norm
        self.kv_storage: KVStorage | None = None  # set by Transformer.set_kv_cache_dtype: what forward stores K/V as
        if config.qk_norm:
            self.q_norm = make_qk_norm(config, self.n_heads)
            self.k_norm = make_qk_norm(config, self.n_kv_heads)

    def project(self, x: torch.Tensor, w: nn.Linear, n_heads: int, norm: nn.Module | None) -> torch.Tensor:
        """x [B, S, d] -> [B, heads, S, D], through the q/k norm where the model has one."""
        batch, seq, _ = x.shape
        h = w(x)
        if self.qk_norm == "rms_all" and norm is not None:  # over the whole projection, before the heads split
            h = norm(h)
        h = h.view(batch, seq, n_heads, self.head_dim).transpose(1, 2)
        return norm(h) if norm is not None and self.qk_norm != "rms_all" else h

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [B, G, T, D] of `source` [B, T, d] (before RoPE): what a cross-attention cache holds."""
        return (self.project(source, self.wk, self.n_kv_heads, getattr(self, "k_norm", None)),
                self.project(source, self.wv, self.n_kv_heads, None))

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """Heads [B, H, S, D] back to the residual stream [B, S, d]."""
        return self.wo(y.transpose(1, 2).reshape(y.shape[0], y.shape[2], self.n_heads * self.head_dim))

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x's queries [B, S, d] against given K and V [B, G, T, D] (cross-attention: K and V of the encoder's
        output, computed once per source); mask [B or 1, H or 1, S, T], added to the scores."""
        q = self.queries(x)
        return self.output(attention(q, k, v, None if mask is None else mask.to(q.dtype), scale=self.scale))

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x, self.wq, self.n_heads, getattr(self, "q_norm", None))

    def forward(self, x, *, rope=None, mask=None, is_causal=True, cache: KVCache | PagedKVCache | None = None, slots=None,
                kv_lengths=None):
        q = self.queries(x)
        k, v = self.keys_values(x)
        return self.attend_new(q, k, v, rope=rope, mask=mask, is_causal=is_causal, cache=cache, slots=slots,
                               kv_lengths=kv_lengths)

    def attend_new(self, q, k, v, *, rope, mask, is_causal, cache, slots, kv_lengths=None) -> torch.Tensor:
        """Self-attention of the new tokens' q, k, v [B, heads, S, D]: RoPE, then K and V into the cache (as its
        storage holds them) and attention over it; `kv_lengths`: the decode kernel runs this step."""
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        storage = cache.storage if isinstance(cache, QuantizedKVCache) else self.kv_storage if cache is None else None
        if storage is not None and storage.format.kind != "float" or isinstance(cache, QuantizedKVCache):
            return self.output(self.attend_stored(q, k, v, storage=storage, mask=mask, is_causal=is_causal, cache=cache,
                                                  slots=slots))
        if storage is not None:  # a float format other than the model's: K and V as that cache would hold them
            k, v = storage.format.roundtrip(k), storage.format.roundtrip(v)
        fast = kv_lengths is not None  # the model decided once per forward that the kernel runs this step
        if isinstance(cache, PagedKVCache) and fast:
            # CUDA decode over pages: the kernel follows the block table; nothing is gathered
            cache.write(self.layer, k, v, slots, gather=False)
            y = gqa_decode(q[:, :, 0], cache.keys[self.layer], cache.values[self.layer], kv_lengths,
                           block_table=cache.block_table, scale=self.scale)[:, :, None]
        else:
            if cache is not None:
                k, v = cache.write(self.layer, k, v, slots)
                if k.dtype != q.dtype:  # a float cache in another dtype than the model's (--kv-cache-dtype float16)
                    k, v = k.to(q.dtype), v.to(q.dtype)
            if fast:  # CUDA decode: the Triton kernel reads each KV head once for its query group
                y = gqa_decode(q[:, :, 0], k, v, kv_lengths, scale=self.scale)[:, :, None]
            else:
                y = attention(q, k, v, mask, scale=self.scale, is_causal=is_causal)
        return self.output(y)

    def attend_stored(self, q, k, v, *, storage: KVStorage, mask, is_causal, cache, slots) -> torch.Tensor:
        """Attention over K and V as a quantized cache stores them (`gqa.kv_formats`): Q, K and V rotated
        where the format rotates (K after RoPE), then K and V stored in the cache, or, without one,
        quantized and dequantized in place (so a full forward scores as cached decoding does); the output
        rotated back."""
        q, (k, v) = storage.stored_queries(q), storage.stored_keys_values(k, v)
        if cache is not None:
            cache.write(self.layer, k, v, slots)
            y = attend_quantized(q, cache, self.layer, mask, scale=self.scale)
        else:
            fmt = storage.format
            y = attention(q, fmt.roundtrip(k), fmt.roundtrip(v), mask, scale=self.scale, is_causal=is_causal)
        return rotate(y, storage.v_rotation)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.activation]
        if config.mlp == "gated":
            self.gate = nn.Linear(config.dim, config.hidden_dim, bias=config.mlp_bias)
        else:
            self.gate = None
        self.up = nn.Linear(config.dim, config.hidden_dim, bias=config.mlp_bias)
        self.down = nn.Linear(config.hidden_dim, config.dim, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    """One layer, in the layout `config.block` names:
    - sequential:      h = x + attn(n₁(x));  out = h + mlp(n₂(h))          (Llama, GPT-2, OPT, ...)
    - parallel:        out = x + attn(n₁(x)) + mlp(n₂(x))                 (GPT-NeoX, Falcon-40B)
    - parallel_shared: out = x + attn(n₁(x)) + mlp(n₁(x))                 (Phi, GPT-J, Falcon-7B)
    - post_norm:       h = x + n₁(attn(x));  out = h + n₂(mlp(h))          (OLMo-2)
    """

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layout = config.block
        self.attention_norm = make_norm(config)
        self.attention = Attention(config, layer)
        if config.block != "parallel_shared":
            self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)

    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the attention reads of the residual stream x."""
        return x if self.layout == "post_norm" else self.attention_norm(x)

    def forward(self, x, *, rope=None, mask=None, is_causal=True, cache=None, slots=None, kv_lengths=None):
        """The defaults: a full causal pass over x without a cache (what calibration and the transfer run)."""
        a = self.attention_input(x)
        h = self.attention(a, rope=rope, mask=mask, is_causal=is_causal, cache=cache, slots=slots, kv_lengths=kv_lengths)
        if self.layout == "sequential":
            x = x + h
            return x + self.mlp(self.mlp_norm(x))
        if self.layout == "parallel":
            return x + h + self.mlp(self.mlp_norm(x))
        if self.layout == "parallel_shared":
            return x + h + self.mlp(a)
        x = x + self.attention_norm(h)  # post_norm
        return x + self.mlp_norm(self.mlp(x))


# ---------------------------------------------------------------------------------------------- model

class TokenModel(nn.Module):
    """What every gqa model (decoder-only or encoder–decoder) answers the same way: where its weights are,
    in which dtype, how many; its tied head; how its KV cache stores K and V. A model names the attentions
    whose K/V a generated token adds to a cache (`cached_attentions`) and their KV heads per layer
    (`cache_kv_heads`)."""

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights count once

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def reset_rope(self) -> None:
        """(Re)compute the tables a model computes rather than stores, after it was built on the meta device
        (a decoder's rotary table; an encoder–decoder has none)."""

    def allocate_cache(self, n_kv_heads: list[int], batch_size: int, max_len: int,
                       dtype: torch.dtype | None = None) -> KVCache | QuantizedKVCache:
        """A static cache of `n_kv_heads` per layer, storing what `set_kv_cache_dtype` chose unless `dtype`
        names a float dtype."""
        storage = self.kv_cache_storage if dtype is None else None
        if storage is not None and storage.format.quantized:
            return QuantizedKVCache.allocate(storage, n_kv_heads, self.config.head_dim, batch_size, max_len,
                                             self.device)
        dtype = dtype or (storage.format.dtype if storage is not None else self.dtype)
        return KVCache.allocate(n_kv_heads, self.config.head_dim, batch_size, max_len, dtype, self.device)

    def set_kv_cache_dtype(self, name: str | None, rotation: bool = True) -> None:
        """Store K and V as `name` says (`gqa.kv_formats`: the model's dtype, a float dtype, llama.cpp's q8_0 /
        q5_1 / q5_0 / q4_1 / q4_0 / iq4_nl, vLLM's fp8_e4m3 / fp8_e5m2; None: the model's dtype, unchanged). Caches
        this model makes hold that format, and a forward without a cache quantizes K and V as they would
        (`rotation=False`: llama.cpp's formats without its Hadamard rotation)."""
        storage = None if name is None else kv_storage(
            name, self.config.head_dim, self.dtype, rotation, pairs_adjacent=llama_cpp_pairs_adjacent(self.config))
        if storage is not None:
            storage.format.check_device(self.device)
        self.use_kv_storage(storage)

    def use_kv_storage(self, storage: KVStorage | None) -> None:
        for module in self.cached_attentions():
            module.kv_storage = storage

    @contextlib.contextmanager
    def storing_kv_as(self, name: str | None, rotation: bool = True):
        """`set_kv_cache_dtype` for the duration of a with-block."""
        before = self.kv_cache_storage
        self.set_kv_cache_dtype(name, rotation)
        try:
            yield self
        finally:
            self.use_kv_storage(before)

    @property
    def kv_cache_storage(self) -> KVStorage | None:
        return self.cached_attentions()[0].kv_storage

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """KV bytes a token adds: in `dtype`, else as the model's cache stores it (`set_kv_cache_dtype`)."""
        storage = self.kv_cache_storage
        if dtype is None and storage is not None:
            return storage.bytes_per_token(self.cache_kv_heads, self.config.head_dim)
        element = torch.empty((), dtype=dtype or self.dtype).element_size()
        return self.config.kv_bytes_per_token(element)


class Transformer(TokenModel):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        if config.positions == "learned":
            self.pos_embeddings = nn.Embedding(config.max_positions + config.position_offset, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=config.output_bias)
        self.tie_weights()
        self.register_buffer("inv_freq", None, persistent=False)
        self.reset_rope()
        # Where the model came from (set by gqa.checkpoints.load): the HF config dict and folder.
        self.hf_config: dict[str, Any] | None = None
        self.source_dir = None

    def cached_attentions(self) -> list[Attention]:
        return [block.attention for block in self.layers]

    @property
    def cache_kv_heads(self) -> list[int]:
        return self.config.n_kv_heads

    def reset_rope(self) -> None:
        """(Re)compute the rotary table on the weights' device; needed after building on the meta device."""
        if self.config.positions == "rope":
            self.inv_freq = rope_inv_freq(self.config).to(self.tok_embeddings.weight.device)

    def init_weights(self, std: float = 0.02) -> None:
        """GPT-2-style initialisation for training from scratch: N(0, std), residual projections scaled by 1/√(2L)."""
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("attention.wo.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=residual_std)
            else:
                nn.init.normal_(p, std=std)

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: matrices decay, norms and biases do not."""
        params = list(self.parameters())
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 per parameter plus attention over seq_len (PaLM's count)."""
        c = self.config
        return 6 * self.num_parameters() + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len

    def new_cache(
        self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
        num_pages: int | None = None, page_size: int = 16,
    ) -> KVCache | PagedKVCache | QuantizedKVCache:
        """A static cache of max_len slots per sequence, or, with num_pages, a paged cache of that many
        pages shared by the batch (each sequence reserves pages with `cache.reserve`). It stores what the
        model's KV cache dtype says (`set_kv_cache_dtype`), unless `dtype` names a float dtype."""
        if max_len > self.config.max_positions:
            raise GQAError(f"a cache of {max_len} tokens exceeds the model's {self.config.max_positions} positions")
        if num_pages is None:
            return self.allocate_cache(self.config.n_kv_heads, batch_size, max_len, dtype)
        storage = self.kv_cache_storage if dtype is None else None
        if storage is not None and storage.format.quantized:
            raise GQAError(f"a paged cache holds float values; --kv-cache-dtype {storage.format.name} takes the "
                           f"static cache (no page size)")
        dtype = dtype or (storage.format.dtype if storage is not None else self.dtype)
        return PagedKVCache.allocate(self.config.n_kv_heads, self.config.head_dim, batch_size, max_len,
                                     num_pages=num_pages, page_size=page_size, dtype=dtype, device=self.device)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The residual stream entering the first block: token (and, where learned, position) embeddings."""
        x = self.tok_embeddings(input_ids)
        if self.config.embedding_multiplier != 1.0:  # Gemma: √dim, rounded to the weights' dtype as HF does
            x = x * torch.tensor(self.config.embedding_multiplier, dtype=x.dtype)
        if self.config.positions == "learned":
            x = x + self.pos_embeddings(positions + self.config.position_offset)
        return x

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """What `apply_rope` takes after x at `positions` [B, S]: (cos, sin[, interleaved]), or None."""
        if self.config.positions != "rope":
            return None
        interleaved = self.config.rope_style == "interleaved"
        cos, sin = rope_cos_sin(self.inv_freq, positions, dtype, interleaved)
        return (cos, sin, True) if interleaved else (cos, sin)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | PagedKVCache | None = None,
    ) -> torch.Tensor:
        """Logits [B, S, vocab].

        Without a cache: a full causal pass; attention_mask [B, S] (1 = token, 0 = padding) may pad on
        either side, and positions count real tokens only.
        With a cache: the new tokens of each sequence are appended after `cache.lengths[b]` tokens; a
        mask marks shorter sequences' padding, which must come after their real tokens (right padding).
        The cache's lengths advance by each sequence's number of real tokens.
        """
        batch, seq = input_ids.shape
        config = self.config
        if cache is None and seq > config.max_positions:
            raise GQAError(f"input of {seq} tokens is longer than the model's {config.max_positions} positions")
        device = input_ids.device
        steps = torch.arange(seq, device=device)
        real = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.bool)
        if cache is None:
            slots = steps.expand(batch, seq)
            kv_lengths = None
            positions = slots if real is None else (real.long().cumsum(-1) - 1).clamp(min=0)
            key_valid = real
        else:
            if cache.batch_size != batch:
                raise GQAError(f"the cache holds {cache.batch_size} sequences but the input has {batch}")
            slots = cache.lengths[:, None] + steps
            positions = slots
            n_new = seq if real is None else real.sum(-1)
            kv_lengths = cache.lengths + n_new
            key_valid = torch.arange(cache.max_len, device=device) < kv_lengths[:, None]

        is_causal = cache is None and real is None and config.sliding_window is None
        mask = None
        if not is_causal:
            if key_valid is None:
                key_valid = torch.ones(batch, seq, dtype=torch.bool, device=device)
            mask = build_mask(slots, key_valid, config.sliding_window)

        x = self.embed(input_ids, positions)
        rope = self.rope(positions, x.dtype)
        # decode steps (one new token against a cache) take the Triton kernel where it runs for real
        use_kernel = cache is not None and seq == 1 and config.sliding_window is None and decode_kernel_available(x)
        kernel_lengths = kv_lengths if use_kernel else None
        for block in self.layers:
            x = block(x, rope=rope, mask=mask, is_causal=is_causal, cache=cache, slots=slots, kv_lengths=kernel_lengths)
        logits = self.output(self.norm(x))
        if cache is not None:
            cache.lengths += n_new
        return logits
