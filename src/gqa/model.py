"""One decoder-only Transformer for every supported family, MHA, GQA and MQA alike.

The config's fields say how a family differs (norm, positions, MLP, residual layout, biases, tied
embeddings); `n_kv_heads` is a list with one entry per layer, so a model may group its heads differently
in every layer. Hugging Face parameter names live only in `gqa.checkpoints`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention, build_mask, check_heads
from .cache import KVCache, PagedKVCache, kv_bytes_per_token
from .errors import GQAError
from .kernels import decode_kernel_available, gqa_decode

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
    positions: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    rotary_dim: int | None = None  # partial rotary (GPT-NeoX) rotates only the first rotary_dim dims
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear" | "llama3", ...}
    position_offset: int = 0  # OPT's learned position table starts at row 2
    mlp: str = "gated"  # "gated": down(act(gate(x)) * up(x)); "plain": down(act(up(x)))
    activation: str = "silu"
    parallel_residual: bool = False  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # nothing the maths reads; kept for the record

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
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
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


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin [B, 1, S, rotary_dim] for positions [B, S] (rotate-half layout, as in HF)."""
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    x_rot = x_rot * cos + rotated * sin
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot


# ---------------------------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rms":
        return RMSNorm(config.dim, config.norm_eps)
    return nn.LayerNorm(config.dim, eps=config.norm_eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads[layer]
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=config.out_bias)

    def forward(self, x, rope, mask, is_causal, cache: KVCache | PagedKVCache | None, slots, kv_lengths=None):
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        fast = kv_lengths is not None  # the model decided once per forward that the kernel runs this step
        if isinstance(cache, PagedKVCache) and fast:
            # CUDA decode over pages: the kernel follows the block table; nothing is gathered
            cache.write(self.layer, k, v, slots, gather=False)
            y = gqa_decode(q[:, :, 0], cache.keys[self.layer], cache.values[self.layer], kv_lengths,
                           block_table=cache.block_table)[:, :, None]
        else:
            if cache is not None:
                k, v = cache.write(self.layer, k, v, slots)
            if fast:  # CUDA decode: the Triton kernel reads each KV head once for its query group
                y = gqa_decode(q[:, :, 0], k, v, kv_lengths)[:, :, None]
            else:
                y = attention(q, k, v, mask, is_causal=is_causal)
        return self.wo(y.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))


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
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.attention_norm = make_norm(config)
        self.attention = Attention(config, layer)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, is_causal, cache, slots, kv_lengths=None):
        h = self.attention(self.attention_norm(x), rope, mask, is_causal, cache, slots, kv_lengths)
        if self.parallel_residual:
            return x + h + self.mlp(self.mlp_norm(x))
        x = x + h
        return x + self.mlp(self.mlp_norm(x))


# ---------------------------------------------------------------------------------------------- model

class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        if config.positions == "learned":
            self.pos_embeddings = nn.Embedding(config.max_positions + config.position_offset, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("inv_freq", None, persistent=False)
        self.reset_rope()
        # Where the model came from (set by gqa.checkpoints.load): the HF config dict and folder.
        self.hf_config: dict[str, Any] | None = None
        self.source_dir = None

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def reset_rope(self) -> None:
        """(Re)compute the rotary table on the weights' device; needed after building on the meta device."""
        if self.config.positions == "rope":
            self.inv_freq = rope_inv_freq(self.config).to(self.tok_embeddings.weight.device)

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights count once

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

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        element = torch.empty((), dtype=dtype or self.dtype).element_size()
        return self.config.kv_bytes_per_token(element)

    def new_cache(
        self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
        num_pages: int | None = None, page_size: int = 16,
    ) -> KVCache | PagedKVCache:
        """A static cache of max_len slots per sequence, or, with num_pages, a paged cache of that many
        pages shared by the batch (each sequence reserves pages with `cache.reserve`)."""
        if max_len > self.config.max_positions:
            raise GQAError(f"a cache of {max_len} tokens exceeds the model's {self.config.max_positions} positions")
        dtype = dtype or self.dtype
        if num_pages is not None:
            return PagedKVCache.allocate(self.config.n_kv_heads, self.config.head_dim, batch_size, max_len,
                                         num_pages, page_size, dtype, self.device)
        return KVCache.allocate(self.config.n_kv_heads, self.config.head_dim, batch_size, max_len, dtype, self.device)

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

        x = self.tok_embeddings(input_ids)
        rope = None
        if config.positions == "learned":
            x = x + self.pos_embeddings(positions + config.position_offset)
        else:
            rope = rope_cos_sin(self.inv_freq, positions, x.dtype)
        # decode steps (one new token against a cache) take the Triton kernel where it runs for real
        use_kernel = cache is not None and seq == 1 and config.sliding_window is None and decode_kernel_available(x)
        kernel_lengths = kv_lengths if use_kernel else None
        for block in self.layers:
            x = block(x, rope, mask, is_causal, cache, slots, kernel_lengths)
        logits = self.output(self.norm(x))
        if cache is not None:
            cache.lengths += n_new
        return logits
