"""Calibration: text the source model reads while it is converted, so that merges fit its real activations.

The converter never holds the model. `Stream` keeps only the residual stream of the calibration blocks
([blocks, T, d]) and one layer's weights at a time: the layer's attention inputs are read off the stream
for the merge, then the layer (the source's own, or the converted one) advances the stream to the next.
Memory is one layer's weights plus the stream, whatever the model's size.

Calibration text comes from the training side of the data's document-hash split (`gqa.data`), so the
validation split of the same source, which `gqa eval --data` scores, is text no merge has seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data import prepare
from ..errors import GQAError
from ..model import Block, ModelConfig, Transformer

CHUNK_TOKENS = 8192  # blocks run through a layer this many tokens at a time (bounds the attention scores)


def calibration_blocks(source, tokenizer, n_tokens: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """[blocks, seq_len + 1] token blocks, ⌈n_tokens / seq_len⌉ of them, drawn (seeded) from the training
    split of `source` (a file, folder or bundled corpus name, as `--data` takes it)."""
    check_calib_tokens(n_tokens)
    data = prepare(source, tokenizer, seq_len, length_option="--calib-seq-len")
    return data.train[drawn_blocks(len(data.train), n_tokens, seq_len, seed, source)]


def check_calib_tokens(n_tokens: int) -> None:
    if n_tokens < 1:
        raise GQAError(f"--calib-tokens must be >= 1, got {n_tokens}")


def drawn_blocks(available: int, n_tokens: int, seq_len: int, seed: int, source) -> torch.Tensor:
    """Indices of ⌈n_tokens / seq_len⌉ of `available` training blocks of `source`, drawn (seeded)."""
    needed = math.ceil(n_tokens / seq_len)
    if available < needed:
        raise GQAError(f"{source} holds {available * seq_len:,} calibration tokens (its training split, in blocks "
                       f"of {seq_len}); --calib-tokens {n_tokens:,} needs more text or a smaller number")
    return torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:needed]


class Float32Linear(nn.Module):
    """nn.Linear over a weight stored in bf16 / fp16, computed in float32: the weight is upcast for each call,
    so a layer computes in float32 while holding its weights as stored (at 7B geometry a whole layer in
    float32 is 0.8 GB, twice the stored layer)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight, self.bias = weight, bias  # plain attributes: the stored tensors, not copies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.float(), None if self.bias is None else self.bias.float())


def build_block(config: ModelConfig, layer: int, state: dict[str, torch.Tensor]) -> Block:
    """Layer `layer` as a float32 module over the given gqa tensors: built on the meta device, the tensors
    assigned; linear layers stored in another dtype read through `Float32Linear`, the small rest (norms)
    copied to float32."""
    with torch.device("meta"):
        block = Block(config, layer)
    prefix = f"layers.{layer}."
    tensors = {k[len(prefix):]: v.detach() for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = block.load_state_dict(tensors, assign=True, strict=False)
    if missing or unexpected:
        raise GQAError(f"layer {layer}: tensors missing {missing} or unexpected {unexpected} for its config")
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.dtype != torch.float32:
                setattr(parent, name, Float32Linear(child.weight.data, None if child.bias is None else child.bias.data))
    return block.float().requires_grad_(False).eval()


@dataclass
class Stream:
    """The residual stream of the calibration blocks entering the next layer, and their rotary tables."""
    hidden: torch.Tensor  # [blocks, T, d] float32
    rope: tuple | None
    targets: torch.Tensor  # [blocks, T]: the next token at each position (for losses)

    @classmethod
    def start(cls, config: ModelConfig, embeddings: dict[str, torch.Tensor], blocks: torch.Tensor) -> Stream:
        """Embed the blocks with the source's embedding tensors (gqa names)."""
        with torch.device("meta"):
            model = Transformer(config)
        for name in ("tok_embeddings", "pos_embeddings"):
            if hasattr(model, name):
                getattr(model, name).weight = torch.nn.Parameter(embeddings[f"{name}.weight"].float(), requires_grad=False)
        model.reset_rope()
        inputs = blocks[:, :-1]
        positions = torch.arange(inputs.shape[1])[None]
        with torch.no_grad():
            hidden = model.embed(inputs, positions.expand_as(inputs))
        return cls(hidden, model.rope(positions, torch.float32), blocks[:, 1:])

    def chunks(self) -> Iterator[slice]:
        per_chunk = max(1, CHUNK_TOKENS // self.hidden.shape[1])
        for start in range(0, len(self.hidden), per_chunk):
            yield slice(start, start + per_chunk)

    @torch.no_grad()
    def attention_inputs(self, block: Block) -> torch.Tensor:
        """What the layer's attention reads of the stream (after its norm, where it has one first): [blocks, T, d]."""
        return torch.cat([block.attention_input(self.hidden[c]) for c in self.chunks()])

    @torch.no_grad()
    def attention_outputs(self, block: Block, inputs: torch.Tensor) -> torch.Tensor:
        return torch.cat([block.attention(inputs[c], rope=self.rope) for c in self.chunks()])

    @torch.no_grad()
    def advance(self, block: Block) -> None:
        """Run the stream through `block`."""
        for c in self.chunks():
            self.hidden[c] = block(self.hidden[c], rope=self.rope)

    def advanced(self, block: Block) -> torch.Tensor:
        self.advance(block)
        return self.hidden
