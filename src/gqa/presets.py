"""Named model shapes, in one place (as gpt-fast's `transformer_configs`): the geometries the benchmarks and
experiments build with random or freshly trained weights. `preset(name, **changes)` is its config, a
`ModelConfig` (decoders) or a `Seq2SeqConfig` (encoder–decoders), with `changes` to its fields."""

from __future__ import annotations

from .errors import GQAError
from .model import ModelConfig
from .seq2seq import Seq2SeqConfig

T5_SENTINELS = 32  # the paper T5's tokenizer: the demo tokenizer's 4096 ids, <extra_id_0..31> and a <pad>

DECODERS = {
    # TinyLlama-1.1B's geometry with multi-head attention: `gqa bench generate / capacity`
    "llama-1b": dict(vocab_size=32000, dim=2048, n_layers=24, n_heads=16, n_kv_heads=16, head_dim=128,
                     hidden_dim=5632, max_positions=4096),
    # GPT-2-small's geometry on the demo tokenizer: `benchmarks/train_throughput.py`
    "llama-125m": dict(vocab_size=4096, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, head_dim=64, hidden_dim=3072,
                       max_positions=1024, tie_embeddings=True),
    # `--quick` harness checks (heads of 32: one block of the decode kernel)
    "llama-tiny": dict(vocab_size=320, dim=128, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=32, hidden_dim=128,
                       max_positions=4096),
    # `gqa experiment paper` (a decoder) and its --quick
    "paper-llama": dict(vocab_size=4096, dim=512, n_layers=12, n_heads=8, n_kv_heads=8, head_dim=64, hidden_dim=2048,
                        max_positions=512, tie_embeddings=True),
    "paper-llama-quick": dict(vocab_size=4096, dim=32, n_layers=2, n_heads=8, n_kv_heads=8, head_dim=4, hidden_dim=64,
                              max_positions=64, tie_embeddings=True),
}
PAPER_T5 = dict(vocab_size=4096 + T5_SENTINELS + 1, dim=512, n_heads=8, head_dim=64, hidden_dim=2048,
                n_encoder_layers=6, n_decoder_layers=6, encoder_kv_heads=8, self_kv_heads=8, cross_kv_heads=8,
                max_positions=512, pad_token_id=4096 + T5_SENTINELS, decoder_start_token_id=4096 + T5_SENTINELS,
                eos_token_id=0)
T5_BASE = dict(vocab_size=32128, dim=768, n_heads=12, head_dim=64, hidden_dim=2048, n_encoder_layers=12,
               n_decoder_layers=12, encoder_kv_heads=12, self_kv_heads=12, cross_kv_heads=12, mlp="gated",
               activation="gelu_tanh", tie_embeddings=False, output_scale=1.0, eos_token_id=1)
ENCODER_DECODERS = {
    # T5-base (v1.1 / Flan-T5 layout): 12 + 12 layers, d_model 768, 12 heads of 64, gated-GELU 2048
    "t5-base": T5_BASE,
    "t5-tiny": dict(T5_BASE, vocab_size=512, dim=64, n_heads=4, head_dim=16, hidden_dim=128, n_encoder_layers=2,
                    n_decoder_layers=2, encoder_kv_heads=4, self_kv_heads=4, cross_kv_heads=4),
    # `gqa experiment paper-t5` (T5 v1.0's layout, pre-trained with span corruption) and its --quick
    "paper-t5": PAPER_T5,
    "paper-t5-quick": dict(PAPER_T5, dim=32, n_heads=8, head_dim=4, hidden_dim=64, n_encoder_layers=2,
                           n_decoder_layers=2, max_positions=64),
}


def preset_fields(name: str) -> dict:
    """A preset's config fields (a copy)."""
    if name not in DECODERS and name not in ENCODER_DECODERS:
        raise GQAError(f"unknown model preset {name!r}; known: {', '.join([*DECODERS, *ENCODER_DECODERS])}")
    return dict(DECODERS.get(name) or ENCODER_DECODERS[name])


def preset(name: str, **changes) -> ModelConfig | Seq2SeqConfig:
    config_class = ModelConfig if name in DECODERS else Seq2SeqConfig
    return config_class(**{**preset_fields(name), **changes})
