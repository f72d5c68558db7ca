"""Tiny random models of every supported family, built with transformers from configs (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import transformers

VOCAB = 320  # holds the byte-level test tokenizer (256 bytes + merges + specials)

CONFIGS = {  # family -> (config class, tiny settings)
    "llama": (transformers.LlamaConfig, dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, rope_theta=500000.0)),
    "mistral": (transformers.MistralConfig, dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)),
    "gpt2": (transformers.GPT2Config, dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    "gpt_neox": (transformers.GPTNeoXConfig, dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, rotary_pct=0.5)),
    "opt": (transformers.OPTConfig, dict(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, pad_token_id=1)),
    "gpt_bigcode": (transformers.GPTBigCodeConfig, dict(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, multi_query=True)),
    # each family at its own quirks
    "gemma": (transformers.GemmaConfig, dict(  # head_dim != hidden / heads, √d embeddings, (1 + w) RMSNorm, GeGLU
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=24, max_position_embeddings=128)),
    "phi": (transformers.PhiConfig, dict(  # partial rotary, parallel block on one LayerNorm, biases, biased head
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, partial_rotary_factor=0.5, qk_layernorm=True)),
    "phi3": (transformers.Phi3Config, dict(  # fused qkv_proj and gate_up_proj
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0)),
    "qwen3": (transformers.Qwen3Config, dict(  # per-head RMSNorm on q and k
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128)),
    "olmo2": (transformers.Olmo2Config, dict(  # q/k RMSNorm over the whole projection, norms after attn and MLP
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0)),
    "stablelm": (transformers.StableLmConfig, dict(  # partial rotary, qkv bias, per-head q/k LayerNorm, parallel
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, partial_rotary_factor=0.25, use_qkv_bias=True,
        qk_layernorm=True, use_parallel_residual=True)),
    "gptj": (transformers.GPTJConfig, dict(  # interleaved rotary over rotary_dim, parallel block, biased head
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, rotary_dim=8)),
    "falcon": (transformers.FalconConfig, dict(  # old decoder architecture, MHA: fused qkv per head, parallel
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=False,
        new_decoder_architecture=False, parallel_attn=True, bias=True, max_position_embeddings=128)),
    "falcon_new": (transformers.FalconConfig, dict(  # new architecture: GQA, qkv per KV group, two LayerNorms
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True, num_ln_in_parallel_attn=2, max_position_embeddings=128)),
}
FAMILIES = list(CONFIGS)
# the KV heads each tiny model starts with (BigCode is natively multi-query; Mistral, Qwen2/3, Falcon-new GQA)
KV_HEADS = {"llama": 4, "mistral": 2, "qwen2": 2, "gpt2": 4, "gpt_neox": 4, "opt": 4, "gpt_bigcode": 1, "gemma": 4,
            "phi": 4, "phi3": 4, "qwen3": 2, "olmo2": 4, "stablelm": 4, "gptj": 4, "falcon": 4, "falcon_new": 2}


def build(family: str, seed: int = 0, **overrides):
    """A random HF model of `family` (fp32, eval mode) with non-trivial norms and biases."""
    config_class, settings = CONFIGS[family]
    config = config_class(**{**settings, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # random norms and biases, so a wrong mapping of either shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


TEXT = (
    "Once upon a time there was a little model with many heads. It shared its keys and values between groups "
    "of heads, and decoding became fast. The quick brown fox jumps over the lazy dog. "
) * 20


def train_tokenizer(text: str = TEXT):
    """A byte-level BPE with at most VOCAB - 8 entries, learned from `text`, wrapped as a transformers fast
    tokenizer (another text gives another tokenizer of the same kind)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([text], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def save(model, path, tokenizer=None) -> str:
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)
