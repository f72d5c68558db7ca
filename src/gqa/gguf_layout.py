"""What llama.cpp's GGUF architectures can hold, and how they lay out a decoder: a question of the config
alone, asked by the GGUF writer (checkpoints.gguf), `gqa info` and the model's llama.cpp KV formats (whose
keys are rotated in llama.cpp's order of RoPE dims)."""

from __future__ import annotations


def gguf_support(config) -> str | None:
    """Why llama.cpp's llama / deci architectures cannot hold this model (None when they can)."""
    llama_style = (config.norm, config.positions, config.mlp, config.block, config.rope_style, config.qk_norm,
                   config.norm_weight_offset, config.embedding_multiplier, config.output_bias, config.activation,
                   config.out_bias, config.mlp_bias, config.sliding_window) == \
        ("rms", "rope", "gated", "sequential", "half", None, 0.0, 1.0, False, "silu", False, False, None)
    if not llama_style:
        return "gqa writes GGUF for Llama-style models (use llama.cpp's convert_hf_to_gguf.py on an HF export)"
    if config.qkv_bias and len(set(config.n_kv_heads)) > 1:
        return "llama.cpp's per-layer architecture (deci) has no q/k/v biases"
    if config.rotary_dim != config.head_dim:
        return "partial rotary is not written to GGUF"
    kind = (config.rope_scaling or {}).get("rope_type", (config.rope_scaling or {}).get("type", "default"))
    if kind not in ("default", "linear"):
        return f"rope scaling {kind!r} is not written to GGUF"
    return None


def gguf_architecture(config) -> str:
    """llama.cpp's name for the model: `deci` with per-layer KV heads, `qwen2` with q/k/v biases (its RoPE
    pairs dims as HF does), `llama` otherwise (its RoPE pairs adjacent dims: Q/K rows are reordered)."""
    if len(set(config.n_kv_heads)) > 1:
        return "deci"
    return "qwen2" if config.qkv_bias else "llama"


def llama_cpp_pairs_adjacent(config) -> bool:
    """Whether llama.cpp runs this decoder's rotate-half RoPE over adjacent pairs, holding Q/K in that order:
    what gqa exports as GGUF `llama` / `deci` (Llama, Mistral and what shares their layout), as llama.cpp's
    own converter does; `qwen2` and the other NEOX-style architectures keep HF's order, as do models
    without RoPE."""
    if config.positions != "rope" or config.rope_style != "half" or gguf_support(config) is not None:
        return False
    return gguf_architecture(config) in ("llama", "deci")
