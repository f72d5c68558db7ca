"""What `gqa info` prints about a model folder, and what its model card is built from: architecture, heads per
layer, parameters, KV bytes per token, whether vLLM and llama.cpp serve it. Reads no weights. It sits above
the checkpoint and runtime rooms, asking both."""

from __future__ import annotations

import os
from typing import Any

from .attention import heads_name
from .checkpoints import files, read_checked
from .gguf_layout import gguf_support
from .kinds import kind_of
from .kv_formats import kv_format, names
from .model import ModelConfig
from .runtimes.vllm_runtime import vllm_support
from .seq2seq import Seq2SeqConfig


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What `gqa info` prints: architecture, heads per layer, parameters, KV bytes per token, whether vLLM
    serves it. Reads no weights."""
    config, family, hf = read_checked(path)  # a config that disagrees with the weights describes nothing
    if kind_of(config).is_encoder_decoder:
        return describe_seq2seq(path, config, family, hf)
    params, storage, element = files.stored_parameters(path, family.ignore if family else ())
    kv = config.kv_bytes_per_token(element)
    mha = config.n_layers * 2 * config.n_heads * config.head_dim * element
    return {
        "path": str(path),
        "architecture": (hf.get("architectures") or [hf.get("model_type")])[0],
        "family": family.name if family else "gqa",
        "layers": config.n_layers,
        "hidden_size": config.dim,
        "query_heads": config.n_heads,
        "kv_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "attention": heads_name(config.n_heads, config.n_kv_heads),
        "vocab_size": config.vocab_size,
        "max_positions": config.max_positions,
        "parameters": params,
        "dtype": storage,
        "kv_bytes_per_token": kv,
        "kv_bytes_per_token_if_mha": mha,
        "kv_reduction": mha / kv,
        "kv_bytes_per_token_by_cache_dtype": kv_bytes_by_cache_dtype(config),
        "vllm": vllm_support(path, hf, family, config),
        "llama_cpp": llama_cpp_support(config),
    }


def kv_bytes_by_cache_dtype(config: ModelConfig) -> dict[str, int]:
    """KV bytes per token with each cache dtype the model's head size takes (`--kv-cache-dtype`)."""
    formats = [kv_format(name) for name in names()]
    return {f.name: round(config.kv_bytes_per_token(1) * f.bytes_per_value) for f in formats
            if not (f.kind == "llama" and config.head_dim % 32)}


def llama_cpp_support(config: ModelConfig) -> str:
    """Whether `gqa export --format gguf` writes the model for llama.cpp, and why not."""
    why = gguf_support(config)
    return f"no: {why}" if why else "yes: gqa export MODEL FILE.gguf --format gguf"


def describe_seq2seq(path, config: Seq2SeqConfig, family, hf: dict) -> dict:
    """What `gqa info` prints for an encoder–decoder: heads of each attention kind, and the KV bytes per
    generated token (the decoder's self-attention cache) and per source token (its cross-attention cache)."""
    params, storage, element = files.stored_parameters(path, family.ignore if family else ())
    mha = 2 * config.n_decoder_layers * config.n_heads * config.head_dim * element

    def kind(heads):
        return heads_name(config.n_heads, heads)

    return {
        "path": str(path), "architecture": (hf.get("architectures") or [hf.get("model_type")])[0],
        "family": family.name if family else "gqa", "encoder_layers": config.n_encoder_layers,
        "decoder_layers": config.n_decoder_layers, "hidden_size": config.dim, "query_heads": config.n_heads,
        "encoder_kv_heads": config.encoder_kv_heads, "decoder_self_kv_heads": config.self_kv_heads,
        "cross_kv_heads": config.cross_kv_heads, "head_dim": config.head_dim,
        "attention": f"encoder {kind(config.encoder_kv_heads)}, decoder self {kind(config.self_kv_heads)}, "
                     f"cross {kind(config.cross_kv_heads)}",
        "positions": "relative bias" if config.positions == "relative" else "learned",
        "vocab_size": config.vocab_size, "parameters": params, "dtype": storage,
        "kv_bytes_per_token": config.kv_bytes_per_token(element),
        "kv_bytes_per_source_token": config.kv_bytes_per_source_token(element),
        "kv_bytes_per_token_if_mha": mha, "kv_reduction": mha / config.kv_bytes_per_token(element),
        "vllm": "no: gqa serves encoder–decoder outputs itself (gqa.load, generate, eval, bench)",
        "llama_cpp": "no: gqa writes GGUF for decoder-only Llama-style models",
    }
