"""What a conversion method is: the interface every method module implements (registered in `methods`).

A method turns one layer's attention (`heads.AttentionWeights`) into the same attention with fewer KV
heads. Each lives in a module of its own and is described there by a `Method`: its name, a one-line
summary, the dataclass of its own settings (the CLI offers each field as an option, `convert()` takes it
as a keyword argument), whether it needs calibration text, and its `merge`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import GQAError
from .heads import AttentionWeights, RopeLayout

CALIB_TOKENS = 65536
CALIB_DATA = "general"  # the bundled mix of prose, verse, code, technical documentation and dialogue (gqa.corpus)


@dataclass(frozen=True)
class CalibrationSettings:
    """The calibration text a conversion reads: its source, how many tokens, in blocks of what length."""
    data: str
    tokens: int = CALIB_TOKENS
    seq_len: int = 512

    def check(self) -> None:
        if self.tokens < self.seq_len:
            raise GQAError(f"--calib-tokens {self.tokens} is less than one block of --calib-seq-len {self.seq_len}")

    @property
    def tokens_used(self) -> int:
        """What the calibration reads: whole blocks, ⌈tokens / seq_len⌉ of them."""
        return math.ceil(self.tokens / self.seq_len) * self.seq_len

    def record(self) -> dict:
        """As conversion.json records it: the settings and the tokens read."""
        return {**asdict(self), "tokens_used": self.tokens_used}


@dataclass(frozen=True)
class Calibration:
    """A layer's calibration inputs, for methods that fit to activations.

    Self-attention reads one input for its queries, keys and values; cross-attention (encoder–decoders)
    reads its queries from the decoder and its keys and values from the encoder, given as `queries`."""
    x: torch.Tensor  # what the layer's keys and values read on the calibration blocks [blocks, T, d]
    # the source layer's attention probabilities [B, H, S, T] for query inputs [B, S, d] and key inputs [B, T, d]
    # (its positions, mask and scale included)
    probabilities: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    queries: torch.Tensor | None = None  # what the queries read, where not x [blocks, S, d]


@dataclass(frozen=True)
class Layer:
    """What a merge may know about the layer besides its weights."""
    index: int
    rope: RopeLayout
    seed: int
    init_std: float  # the source's initializer range (fresh draws use it)
    calibration: Calibration | None = None  # given to methods with `calibrated=True`


@dataclass(frozen=True)
class NoSettings:
    """A method without options of its own."""


def setting(default, help: str, choices: tuple | None = None):
    """A settings field with what the CLI says about it."""
    return field(default=default, metadata={"help": help, "choices": choices})


def field_names(settings: type) -> set[str]:
    return {f.name for f in dataclasses.fields(settings)}


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    merge: Callable[[AttentionWeights, int, Layer, Any], tuple[AttentionWeights, dict]]  # -> (merged, record)
    settings: type = NoSettings  # a frozen dataclass; field metadata "help" and "choices" shape the CLI option
    calibrated: bool = False

    def make_settings(self, options: dict, owners: Callable[[str], list[str]]) -> Any:
        """The method's settings from option values (None: not given, the default), refusing any it lacks;
        owners(name) -> the methods that have that option (for the message)."""
        given = {k: v for k, v in options.items() if v is not None}
        for name in given:
            if name not in field_names(self.settings):
                whose = f"an option of --method {' / '.join(owners(name))}" if owners(name) else "not an option of any method"
                raise GQAError(f"--{name.replace('_', '-')} is {whose}; --method {self.name} does not use it")
        return self.settings(**given)
