"""One encoder–decoder Transformer (T5 v1.0 / v1.1 / Flan-T5, mT5, UMT5, BART), MHA, GQA and MQA alike.

The GQA paper's own setting: an encoder reads the source once; the decoder's self-attention keeps a cache
that grows by one token per step, and its cross-attention reads a cache of the encoder's keys and values
computed once per source. Each of the three attentions has its own KV-head count per layer
(`encoder_kv_heads`, `self_kv_heads`, `cross_kv_heads`): the paper groups the decoder's two and leaves the
encoder alone, whose queries are all computed at once, so that memory bandwidth is not its bottleneck.

It is built from the decoder-only model's modules (`gqa.model`): its `Attention` (as `SelfAttention`, and
as `CrossAttention` over a cache of the encoder's K and V filled once per source), `MLP`, norms, and the
`TokenModel` base that holds the tied head and the KV cache's storage (`set_kv_cache_dtype`: both decoder
caches then hold llama.cpp's or vLLM's formats, as a decoder's does). What is its own is the block layout
and the position scheme: T5's relative position bias (a learned scalar per head and distance bucket, added
to the scores; in the first layer only and shared by the others, or in every layer for UMT5), or BART's
learned absolute positions (offset 2).
Hugging Face parameter names live only in `gqa.checkpoints.seq2seq`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend_quantized, check_heads
from .cache import KVCache, QuantizedKVCache, kv_bytes_per_token
from .errors import GQAError
from .kv_formats import rotate
from .model import ACTIVATIONS, MLP, Attention, TokenModel, make_norm

POSITIONS = ("relative", "learned")
BLOCKS = ("pre_norm", "post_norm")


@dataclass
class Seq2SeqConfig:
    vocab_size: int
    dim: int
    n_heads: int
    head_dim: int
    hidden_dim: int
    n_encoder_layers: int
    n_decoder_layers: int
    encoder_kv_heads: list[int]
    self_kv_heads: list[int]  # the decoder's self-attention
    cross_kv_heads: list[int]  # the decoder's cross-attention
    max_positions: int = 512  # learned positions: the table's size; relative: what the model was trained on
    positions: str = "relative"  # "relative" (T5: a bias per head and distance bucket) | "learned" (BART)
    relative_buckets: int = 32
    relative_max_distance: int = 128
    bias_in_every_layer: bool = False  # UMT5; T5 keeps the bias table in the first layer of each stack
    norm: str = "rms"  # "rms" (T5's scale-only LayerNorm) | "layer" (BART)
    norm_eps: float = 1e-6
    block: str = "pre_norm"  # "pre_norm" (T5: x + f(norm(x)), a final norm) | "post_norm" (BART: norm(x + f(x)))
    mlp: str = "plain"  # "plain": wo(act(wi x)) (T5 v1.0, BART) | "gated": wo(act(wi_0 x) * wi_1 x) (T5 v1.1)
    activation: str = "relu"
    attention_scale: float | None = 1.0  # T5 folds 1/√d into its init: no scaling; None: 1/√head_dim (BART)
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    embedding_scale: float = 1.0  # BART's scale_embedding: √dim
    embedding_norm: bool = False  # BART: a LayerNorm on the embeddings of each stack
    position_offset: int = 0  # BART's learned table starts at row 2
    tie_embeddings: bool = True
    output_scale: float = 1.0  # T5 v1.0 (tied head): the decoder's output × dim^-0.5 before the head
    output_bias: bool = False  # BART's final_logits_bias
    decoder_start_token_id: int = 0
    pad_token_id: int = 0
    eos_token_id: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # nothing the maths reads; kept for the record
    # what the decoder's modules (`gqa.model`) read and no encoder–decoder layout has
    qk_norm: ClassVar[str | None] = None
    norm_weight_offset: ClassVar[float] = 0.0

    def __post_init__(self) -> None:
        for name, layers in (("encoder_kv_heads", self.n_encoder_layers), ("self_kv_heads", self.n_decoder_layers),
                             ("cross_kv_heads", self.n_decoder_layers)):
            value = getattr(self, name)
            value = [value] * layers if isinstance(value, int) else [int(g) for g in value]
            if len(value) != layers:
                raise GQAError(f"{name} has {len(value)} entries but the stack has {layers} layers")
            for g in value:
                check_heads(self.n_heads, g)
            setattr(self, name, value)
        for name, value, allowed in (("positions", self.positions, POSITIONS), ("block", self.block, BLOCKS),
                                     ("norm", self.norm, ("rms", "layer")), ("mlp", self.mlp, ("plain", "gated")),
                                     ("activation", self.activation, tuple(ACTIVATIONS))):
            if value not in allowed:
                raise GQAError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Seq2SeqConfig:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise GQAError(f"unknown gqa seq2seq config fields {unknown}")
        return cls(**d)

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        """Bytes the decoder's self-attention cache grows by per generated token."""
        return kv_bytes_per_token(self.self_kv_heads, self.head_dim, bytes_per_element)

    def kv_bytes_per_source_token(self, bytes_per_element: int) -> int:
        """Bytes of the cross-attention cache per source token (computed once per source)."""
        return kv_bytes_per_token(self.cross_kv_heads, self.head_dim, bytes_per_element)


# ---------------------------------------------------------------------------------------------- positions

def relative_buckets(relative: torch.Tensor, bidirectional: bool, buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position (key − query): exact for small distances, logarithmic up to
    max_distance; the encoder tells left from right, the decoder sees only the past."""
    out = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        out += (relative > 0).long() * buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    exact = buckets // 2
    large = exact + (torch.log(relative.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (buckets - exact)).long()
    large = torch.clamp(large, max=buckets - 1)
    return out + torch.where(relative < exact, relative, large)


class RelativeBias(nn.Module):
    """A learned scalar per head and distance bucket, added to the attention scores."""

    def __init__(self, config: Seq2SeqConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional, self.config = bidirectional, config
        self.weight = nn.Parameter(torch.zeros(config.relative_buckets, config.n_heads))

    def forward(self, query_positions: torch.Tensor, key_length: int) -> torch.Tensor:
        """[1, H, S, T] for queries at positions [S] against keys 0 .. key_length - 1."""
        relative = torch.arange(key_length, device=self.weight.device)[None, :] - query_positions[:, None]
        bucket = relative_buckets(relative, self.bidirectional, self.config.relative_buckets,
                                  self.config.relative_max_distance)
        # contiguous: a sum with the padding mask takes this layout, and SDPA copies a strided mask every call
        return F.embedding(bucket, self.weight).permute(2, 0, 1).contiguous()[None]


def check_positions(config: Seq2SeqConfig, length: int, what: str) -> None:
    """Learned positions (BART) end at the table's size: refuse a longer source or target in one line, where
    the table lookup would fail (T5's relative position bias has no end)."""
    if config.positions == "learned" and length > config.max_positions:
        raise GQAError(f"{what} of {length} tokens is longer than the model's {config.max_positions} learned positions")


def additive_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where attention is allowed, the dtype's most negative number where not (finite: a fully masked
    padding row stays finite, as in transformers)."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, torch.finfo(dtype).min)


# ---------------------------------------------------------------------------------------------- layers

class SelfAttention(Attention):
    """`Attention` as an encoder–decoder calls it: no RoPE (positions are in the mask: T5's bias, or in the
    embeddings: BART's), the decoder's cache where there is one. K and V are projected before Q, the order
    these models' gradients have always been summed in (so training stays bit for bit what it was)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None = None, slots=None) -> torch.Tensor:
        k, v = self.keys_values(x)
        return self.attend_new(self.queries(x), k, v, rope=None, mask=mask, is_causal=False, cache=cache, slots=slots)


class CrossAttention(Attention):
    """The decoder's attention over the encoder's output: `Attention` whose keys and values come from a cache
    filled once per source (`Encoded.cross`): float (K, V), or a quantized cache holding every source slot."""

    def forward(self, x: torch.Tensor, cross, mask: torch.Tensor) -> torch.Tensor:
        if not isinstance(cross, QuantizedKVCache):
            return self.attend(x, *cross, mask)
        storage = cross.storage
        y = attend_quantized(storage.stored_queries(self.queries(x)), cross, self.layer, mask, scale=self.scale,
                             n_keys=cross.max_len)
        return self.output(rotate(y, storage.v_rotation))


def residual(config: Seq2SeqConfig, norm: nn.Module, x: torch.Tensor, f) -> torch.Tensor:
    """x + f(norm(x)) (pre-norm, T5) or norm(x + f(x)) (post-norm, BART)."""
    if config.block == "pre_norm":
        return x + f(norm(x))
    return norm(x + f(x))


class EncoderBlock(nn.Module):
    def __init__(self, config: Seq2SeqConfig, layer: int):
        super().__init__()
        self.config = config
        self.attention_norm = make_norm(config)
        self.attention = SelfAttention(config, layer, n_kv_heads=config.encoder_kv_heads[layer])
        self.mlp_norm, self.mlp = make_norm(config), MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = residual(self.config, self.attention_norm, x,
                     lambda h: self.attention(h, mask))
        return residual(self.config, self.mlp_norm, x, self.mlp)


class DecoderBlock(nn.Module):
    def __init__(self, config: Seq2SeqConfig, layer: int):
        super().__init__()
        self.config, self.layer = config, layer
        self.attention_norm = make_norm(config)
        self.attention = SelfAttention(config, layer, n_kv_heads=config.self_kv_heads[layer])
        self.cross_norm = make_norm(config)
        self.cross = CrossAttention(config, layer, n_kv_heads=config.cross_kv_heads[layer])
        self.mlp_norm, self.mlp = make_norm(config), MLP(config)

    def forward(self, x, self_mask, cross, cross_mask, cache: KVCache | QuantizedKVCache | None, slots) -> torch.Tensor:
        x = residual(self.config, self.attention_norm, x, lambda h: self.attention(h, self_mask, cache, slots))
        x = residual(self.config, self.cross_norm, x, lambda h: self.cross(h, cross, cross_mask))
        return residual(self.config, self.mlp_norm, x, self.mlp)


class Stack(nn.Module):
    """Embeddings, positions and the blocks of the encoder or of the decoder (the token table is shared)."""

    def __init__(self, config: Seq2SeqConfig, block, n_layers: int, bidirectional: bool):
        super().__init__()
        self.config = config
        if config.positions == "learned":
            self.pos_embeddings = nn.Embedding(config.max_positions + config.position_offset, config.dim)
        else:
            self.biases = nn.ModuleList(RelativeBias(config, bidirectional)
                                        for _ in range(n_layers if config.bias_in_every_layer else 1))
        if config.embedding_norm:
            self.embedding_norm = make_norm(config)
        self.layers = nn.ModuleList(block(config, i) for i in range(n_layers))
        if config.block == "pre_norm":
            self.norm = make_norm(config)

    def embed(self, tokens: nn.Embedding, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = tokens(ids)
        if self.config.embedding_scale != 1.0:
            x = x * self.config.embedding_scale
        if self.config.positions == "learned":
            x = x + self.pos_embeddings(positions + self.config.position_offset)
        return self.embedding_norm(x) if self.config.embedding_norm else x

    def position_bias(self, layer: int, query_positions: torch.Tensor, key_length: int):
        if self.config.positions != "relative":
            return None
        return self.biases[layer if self.config.bias_in_every_layer else 0](query_positions, key_length)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) if self.config.block == "pre_norm" else x


@dataclass
class Encoded:
    """A batch of sources once encoded: what the decoder reads at every step."""
    hidden: torch.Tensor  # [B, S, d]
    mask: torch.Tensor  # [B, S] bool: real source tokens
    # the cross-attention cache: per decoder layer (K, V) [B, G, S, D], or one quantized cache of every layer
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | QuantizedKVCache

    def cross(self, layer: int):
        """What decoder layer `layer`'s cross-attention reads."""
        return self.cross_kv if isinstance(self.cross_kv, QuantizedKVCache) else self.cross_kv[layer]

    def bytes(self) -> int:
        if isinstance(self.cross_kv, QuantizedKVCache):
            return sum(t.numel() * t.element_size() for side in (self.cross_kv.keys, self.cross_kv.values)
                       for layer in side for t in layer.values())
        return sum(t.numel() * t.element_size() for kv in self.cross_kv for t in kv)


class Seq2SeqTransformer(TokenModel):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.encoder = Stack(config, EncoderBlock, config.n_encoder_layers, bidirectional=True)
        self.decoder = Stack(config, DecoderBlock, config.n_decoder_layers, bidirectional=False)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=config.output_bias)
        self.tie_weights()
        self.hf_config: dict[str, Any] | None = None
        self.source_dir = None

    def cached_attentions(self) -> list[Attention]:
        """The decoder's self- and cross-attention: their caches store K and V as `set_kv_cache_dtype` says (the
        encoder keeps no cache)."""
        return [module for block in self.decoder.layers for module in (block.attention, block.cross)]

    @property
    def cache_kv_heads(self) -> list[int]:
        return self.config.self_kv_heads

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: matrices decay, norms, biases and the position-bias tables do not."""
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2 and ".biases." not in n]
        rest = [p for n, p in self.named_parameters() if p.dim() < 2 or ".biases." in n]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per source token, roughly: 6 per parameter (every token passes the encoder, and the
        targets, shorter, the decoder) plus attention over seq_len."""
        c = self.config
        return 6 * self.num_parameters() + 12 * (c.n_encoder_layers + 2 * c.n_decoder_layers) * c.n_heads * c.head_dim * seq_len

    def init_weights(self, std: float = 0.02) -> None:
        """Training from scratch: N(0, std) matrices and tables, residual projections scaled by 1/√(2L), unit
        norms, zero biases."""
        layers = self.config.n_encoder_layers + self.config.n_decoder_layers
        for name, p in self.named_parameters():
            if name.endswith("bias") and p.dim() == 1:
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * layers))
            else:
                nn.init.normal_(p, std=std)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Encoded:
        """Run the encoder over sources [B, S] (mask: 1 = token) and fill every layer's cross-attention cache."""
        batch, seq = input_ids.shape
        check_positions(self.config, seq, "a source")
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        positions = torch.arange(seq, device=input_ids.device)
        x = self.encoder.embed(self.tok_embeddings, input_ids, positions[None].expand(batch, -1))
        pad = additive_mask(valid[:, None, None, :], x.dtype)

        def scores_mask(layer: int) -> torch.Tensor:  # the padding, plus T5's position bias: [B, H or 1, S, S]
            bias = self.encoder.position_bias(layer, positions, seq)
            return pad if bias is None else pad + bias.to(pad.dtype)

        shared = None if self.config.bias_in_every_layer else scores_mask(0)  # made once, not once per layer
        for i, block in enumerate(self.encoder.layers):
            x = block(x, scores_mask(i) if shared is None else shared)
        hidden = self.encoder.finish(x)
        return Encoded(hidden, valid, self.cross_cache(hidden))

    def cross_cache(self, hidden: torch.Tensor):
        """Every decoder layer's cross-attention K and V of the encoded sources [B, S, d], as the storage
        `set_kv_cache_dtype` chose holds them: float (K, V) per layer, or one quantized cache, all S slots written."""
        kv = [block.cross.keys_values(hidden) for block in self.decoder.layers]
        storage = self.kv_cache_storage
        if storage is None:
            return kv
        if not storage.format.quantized:
            return [(storage.format.roundtrip(k), storage.format.roundtrip(v)) for k, v in kv]
        batch, seq = hidden.shape[:2]
        cache = QuantizedKVCache.allocate(storage, self.config.cross_kv_heads, self.config.head_dim, batch, seq,
                                          self.device)
        slots = torch.arange(seq, device=hidden.device).expand(batch, -1)
        for layer, (k, v) in enumerate(kv):
            cache.write(layer, *storage.stored_keys_values(k, v), slots)
        return cache

    def decode(self, decoder_ids: torch.Tensor, encoded: Encoded, decoder_mask: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] of decoder tokens [B, T] given the encoded sources. With a cache, the tokens
        come after `cache.lengths` earlier ones (all sequences at the same step) and the cache advances."""
        batch, seq = decoder_ids.shape
        device = decoder_ids.device
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):  # a CUDA graph reads no host
            check_positions(self.config, seq + (0 if cache is None else int(cache.lengths[0])), "a target")
        # every sequence is at the same step: its positions follow the cache's length, read on the device
        positions = torch.arange(seq, device=device) + (0 if cache is None else cache.lengths[:1])
        total = seq if cache is None else cache.max_len
        keys = torch.arange(total, device=device)
        allowed = keys[None, :] <= positions[:, None]  # causal, and only slots written so far
        if decoder_mask is not None and cache is None:
            allowed = allowed[None] & decoder_mask.bool()[:, None, :]
        x = self.decoder.embed(self.tok_embeddings, decoder_ids, positions[None].expand(batch, -1))
        self_mask = additive_mask(allowed.reshape(-1, 1, seq, total) if allowed.dim() == 3 else allowed[None, None],
                                  x.dtype)
        cross_mask = additive_mask(encoded.mask[:, None, None, :], x.dtype)
        slots = positions[None].expand(batch, -1)
        shared = None if self.config.bias_in_every_layer else self.decoder.position_bias(0, positions, total)
        for i, block in enumerate(self.decoder.layers):
            bias = self.decoder.position_bias(i, positions, total) if self.config.bias_in_every_layer else shared
            mask = self_mask if bias is None else self_mask + bias.to(x.dtype)
            x = block(x, mask, encoded.cross(i), cross_mask, cache, slots)
        x = self.decoder.finish(x)
        if cache is not None:
            cache.lengths += seq
        return self.output(x * self.config.output_scale if self.config.output_scale != 1.0 else x)

    def forward(self, input_ids: torch.Tensor, decoder_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits [B, T, vocab] of decoder tokens given sources (as transformers' forward)."""
        return self.decode(decoder_ids, self.encode(input_ids, attention_mask), decoder_mask)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """The decoder's self-attention cache: G heads per layer, max_len generated tokens."""
        return self.allocate_cache(self.config.self_kv_heads, batch_size, max_len, dtype)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for labels [B, T]: the start token, then the labels but the last (-100 -> pad)."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)


# ---------------------------------------------------------------------------------------------- generation

def check_source_lengths(config: Seq2SeqConfig, sources: list[list[int]], max_new_tokens: int) -> None:
    """Sources and the tokens to generate within learned positions (from the config: before a model runs)."""
    check_positions(config, max(len(s) for s in sources), "a source")
    if config.positions == "learned" and max_new_tokens > config.max_positions:
        raise GQAError(f"--max-new-tokens {max_new_tokens} is more than the model's {config.max_positions} learned "
                       f"positions (the decoder's); pass {config.max_positions} or less")
