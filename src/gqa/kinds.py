"""The one place that knows a model's kind: decoder-only or encoder–decoder.

Everything above the checkpoint edge asks `kind_of(...)` (a config, a model, a config.json dict or a model
folder) and then the kind, instead of branching: how its model is built, how it generates and checks its
generation lengths, what its logits of a batch are, how its model card names it. It imports
only rooms below it (models, generation, data, checkpoints). The checkpoint edge (`gqa.checkpoints`) reads
the folder to tell the kinds apart (`checkpoints.seq2seq.is_seq2seq`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .model import ModelConfig, Transformer
from .seq2seq import Seq2SeqConfig, Seq2SeqTransformer


@dataclass(frozen=True)
class ModelKind:
    name: str
    model_class: type
    gguf: bool  # whether `export --format gguf` writes it (llama.cpp runs decoder-only models)
    auto_class: str  # the transformers Auto class that loads its HF folders
    pipeline_tag: str  # the Hub's task name for it
    layers_format: str  # how `gqa info`'s keys name its layers (the model card's summary)

    @property
    def is_encoder_decoder(self) -> bool:
        return self is ENCODER_DECODER

    def build(self, config) -> Transformer | Seq2SeqTransformer:
        return self.model_class(config)

    def generate(self, model, sequences: list[list[int]], **options) -> list[list[int]]:
        """Continue each prompt (an encoder–decoder: each source) with the decoder (`gqa.generate`)."""
        from .generate import generate, generate_seq2seq

        return (generate_seq2seq if self.is_encoder_decoder else generate)(model, sequences, **options)

    def prefill(self, model, sequences: list[list[int]], max_new_tokens: int, **options):
        """(next-token logits [B, vocab], step: tokens [B] -> the next logits) after reading each prompt (an
        encoder–decoder: after encoding each source), with a cache for `max_new_tokens` more."""
        from .generate import prefill, prefill_seq2seq

        return (prefill_seq2seq if self.is_encoder_decoder else prefill)(model, sequences, max_new_tokens, **options)

    def check_generation_lengths(self, config, sequences: list[list[int]], max_new_tokens: int) -> None:
        from .generate import check_generation_lengths
        from .seq2seq import check_source_lengths

        (check_source_lengths if self.is_encoder_decoder else check_generation_lengths)(config, sequences,
                                                                                        max_new_tokens)

    def completion_line(self, prompt: str, completion: str) -> str:
        """How `gqa generate` prints a result: a decoder continues the prompt, an encoder–decoder answers it."""
        return f"{prompt} -> {completion}" if self.is_encoder_decoder else prompt + completion

    def default_seq_len(self, config, data, *, evaluating: bool = False) -> int:
        """`--seq-len` when none is given: the model's positions, at most 1024 (an encoder–decoder's examples
        within its learned positions: `seq2seq_data.default_seq_len`; at most 512 where `gqa eval` scores them)."""
        from .seq2seq_data import default_seq_len, is_pairs

        return default_seq_len(config, is_pairs(data), 512 if evaluating else 1024) if self.is_encoder_decoder \
            else min(1024, config.max_positions)

    def check_seq_len(self, config, seq_len: int, data) -> None:
        """Windows (or an encoder–decoder's examples) of `seq_len` tokens within the model's positions."""
        from .errors import GQAError
        from .seq2seq_data import check_seq_len, is_pairs

        if self.is_encoder_decoder:
            return check_seq_len(config, seq_len, is_pairs(data))
        if seq_len > config.max_positions:
            raise GQAError(f"--seq-len {seq_len} exceeds the model's {config.max_positions} positions")

    def calibration_seq_len(self, config, seq_len: int | None) -> int:
        """--calib-seq-len checked (default: 512 within the model's positions): a decoder's blocks need 2 tokens,
        an encoder–decoder's span-corrupted text a few spans (16), and learned positions room for the eos."""
        from .errors import GQAError
        from .seq2seq_data import check_seq_len, default_seq_len

        if self.is_encoder_decoder:
            low, why, seq_len = 16, " (span corruption needs a few spans)", seq_len or default_seq_len(config, False)
        else:
            low, why, seq_len = 2, "", seq_len or min(512, config.max_positions)
        if not low <= seq_len <= config.max_positions:
            raise GQAError(f"--calib-seq-len must be in [{low}, {config.max_positions}]{why}, got {seq_len}")
        if self.is_encoder_decoder:
            check_seq_len(config, seq_len, pairs=False, option="--calib-seq-len")
        return seq_len

    def check_reference(self, model: str, config, reference: str, seq_len: int, data) -> None:
        """`gqa eval --reference`: the same kind, vocabulary and tokenizer, and room for the examples or windows."""
        from .checkpoints import check_reference, checked_config

        if self.is_encoder_decoder:
            self.check_seq_len(checked_config(reference), seq_len, data)
        check_reference(model, config, reference, "reference", None if self.is_encoder_decoder else seq_len)

    def eval_data(self, source: str, tokenizer, seq_len: int, max_tokens: int | None, vocab_size: int):
        """What `gqa eval` scores, its token ids checked: a decoder's token stream (`data.eval_tokens`), an
        encoder–decoder's examples (`seq2seq_data.eval_examples`)."""
        from .data import check_token_ids, eval_tokens
        from .seq2seq_data import eval_examples

        if self.is_encoder_decoder:
            data = eval_examples(source, tokenizer, seq_len, max_tokens)
            check_token_ids(torch.tensor([data.max_id()]), vocab_size, source)
        else:
            data = eval_tokens(source, tokenizer, max_tokens)
            check_token_ids(data, vocab_size, source)
        return data

    def score(self, model, data, *, reference, seq_len: int, batch_size: int, max_tokens: int | None) -> tuple:
        """(`gqa eval`'s scores, what they were scored over): windows of the token stream, or each example's
        target tokens (scored whole: --max-tokens is reached within the first examples that hold it)."""
        from .evaluate import compare_examples, perplexity

        if not self.is_encoder_decoder:
            return perplexity(model, data, seq_len=seq_len, batch_size=batch_size, reference=reference), "tokens"
        result = compare_examples(model, data, teacher=reference, batch_size=batch_size)
        result["examples"] = len(data)
        n = f"{len(data):,} example{'s' if len(data) > 1 else ''}"
        whole = f" (examples are scored whole: --max-tokens {max_tokens:,} is reached within the first {n})" \
            if max_tokens and result["tokens"] != max_tokens else ""
        return result, f"target tokens of {n}{whole}"

    def prepare_data(self, source, tokenizer, seq_len: int, val_fraction: float, seed: int):
        """Training and validation data: a decoder's packed blocks, an encoder–decoder's examples (pairs, or
        span-corrupted text)."""
        from .data import prepare
        from .seq2seq_data import prepare_seq2seq

        return prepare_seq2seq(source, tokenizer, seq_len, val_fraction, seed) if self.is_encoder_decoder else \
            prepare(source, tokenizer, seq_len, val_fraction)

    def check_token_ids(self, data, vocab_size: int, source: str) -> None:
        import torch

        from .data import check_token_ids

        ids = torch.tensor([max(data.train.max_id(), data.val.max_id())]) if self.is_encoder_decoder else \
            torch.cat([data.train.flatten(), data.val.flatten()])
        check_token_ids(ids, vocab_size, source)

    def batch_inputs(self, blocks, index) -> Any:
        """The model inputs of calibration blocks `index`: a decoder's tokens [N, T + 1] but the last; an
        encoder–decoder's (input ids, decoder ids), of its (input ids, decoder ids) blocks."""
        return tuple(b[index] for b in blocks) if self.is_encoder_decoder else blocks[index, :-1]

    def n_blocks(self, blocks) -> int:
        return len(blocks[0]) if self.is_encoder_decoder else len(blocks)

    def logits(self, model, batch) -> torch.Tensor:
        """Next-token logits of a batch (`batch_inputs`)."""
        return model(*batch) if self.is_encoder_decoder else model(batch)

    def attention_modules(self, student, teacher) -> dict[str, torch.nn.Module]:
        """Name prefix -> attention module the joint stage trains: every layer's (a decoder); an encoder–decoder's
        decoder self- and cross-attention, and its encoder's where it was grouped."""
        if not self.is_encoder_decoder:
            return {f"layers.{i}.attention": layer.attention for i, layer in enumerate(student.layers)}
        modules = {}
        if student.config.encoder_kv_heads != teacher.config.encoder_kv_heads:
            modules.update({f"encoder.layers.{i}.attention": b.attention for i, b in enumerate(student.encoder.layers)})
        for i, block in enumerate(student.decoder.layers):
            modules.update({f"decoder.layers.{i}.attention": block.attention, f"decoder.layers.{i}.cross": block.cross})
        return modules


DECODER = ModelKind(name="decoder", model_class=Transformer, gguf=True, auto_class="AutoModelForCausalLM",
                    pipeline_tag="text-generation", layers_format="{layers} layers")
ENCODER_DECODER = ModelKind(name="encoder-decoder", model_class=Seq2SeqTransformer, gguf=False,
                            auto_class="AutoModelForSeq2SeqLM", pipeline_tag="text2text-generation",
                            layers_format="{encoder_layers} + {decoder_layers} layers")


def kind_of(thing: Any) -> ModelKind:
    """The kind of a config, a model, a config.json dict or a model folder (its config.json)."""
    if isinstance(thing, (Seq2SeqConfig, Seq2SeqTransformer)):
        return ENCODER_DECODER
    if isinstance(thing, (ModelConfig, Transformer)):
        return DECODER
    from .checkpoints import files
    from .checkpoints.seq2seq import is_seq2seq
    from .errors import GQAError

    if isinstance(thing, (str, os.PathLike)):
        try:
            thing = files.read_config(thing)
        except GQAError:  # no readable config.json: the decoder path says what is wrong with the folder
            return DECODER
    if isinstance(thing, dict):
        return ENCODER_DECODER if is_seq2seq(thing) else DECODER
    raise TypeError(f"no model kind for {type(thing).__name__}")
