"""Encoder–decoder checkpoints at the edges: T5 (v1.0, v1.1 / Flan-T5), mT5, UMT5 and BART folders in and
out, and gqa's own format for what no HF class can hold.

Each family is one declarative description in the decoder families' idiom (`families.Description`): its
config keys (`Key`, `Derived`, constants) onto `Seq2SeqConfig`, its tensor templates ({i} the layer, {p}
weight / bias, a condition where a rule is the one written only for some configs), what it refuses.
transformers has no encoder–decoder class with a KV-head count for these layouts (T5Gemma has one, with
RoPE and other norms: not a lossless home for a T5), so a model with fewer KV heads than query heads in any
attention is written in gqa's own format (architecture `GQASeq2SeqLM`: the gqa config, gqa's tensor
names); at G = H it is written back as its HF class, exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import GQAError
from ..seq2seq import Seq2SeqConfig
from . import files
from .families import Derived, Description, Key, act_key, activation, hf_activation

NATIVE_SEQ2SEQ = "GQASeq2SeqLM"


@dataclass
class Seq2SeqFamily(Description):
    """An encoder–decoder family. BART's final_logits_bias is [1, vocab] in its files, [vocab] in gqa."""

    def to_config(self, hf: dict) -> Seq2SeqConfig:
        return Seq2SeqConfig(**self.read_keys(hf))

    def to_hf_config(self, config: Seq2SeqConfig, base: dict) -> dict:
        out = self.write_keys(config, base)
        if self.write_extra:
            self.write_extra(config, base, out)
        return out

    def import_tensor(self, name: str, tensor: torch.Tensor, config: Seq2SeqConfig) -> dict[str, torch.Tensor]:
        if self.ignored(name):
            return {}
        if rule := self.import_rule(name):
            ours, fields = rule
            tensor = tensor.reshape(-1) if ours == "output.bias" else tensor
            return {ours.format(**fields): tensor.contiguous()}
        raise GQAError(f"{self.name}: tensor {name} has no place in gqa's encoder–decoder")

    def export_state(self, state: dict[str, torch.Tensor], config: Seq2SeqConfig) -> dict[str, torch.Tensor]:
        out = {}
        for name, tensor in state.items():
            if name == "output.weight" and config.tie_embeddings:
                continue
            if self.export_rule(name, config) is None:
                raise GQAError(f"{self.name} has no place for gqa tensor {name}")
            out[self.file_name(name, config)] = tensor.reshape(1, -1) if name == "output.bias" else tensor
        return out

    def can_express(self, config: Seq2SeqConfig) -> bool:
        heads = config.encoder_kv_heads + config.self_kv_heads + config.cross_kv_heads
        return all(g == config.n_heads for g in heads)

# ------------------------------------------------------------------------------------------------ T5

def t5_rules(stack: str, parts: dict[int, str]) -> tuple[tuple, ...]:
    """One T5 stack's tensors: `parts` says what each block's layer.N is (attention, cross or mlp)."""
    module = {"attention": "SelfAttention", "cross": "EncDecAttention"}
    norm = {"attention": "attention_norm", "cross": "cross_norm", "mlp": "mlp_norm"}
    rules = [(f"{stack}.final_layer_norm.weight", f"{stack}.norm.weight"),
             # T5 keeps the table in the first block of each stack (biases.0), UMT5 in every block
             (f"{stack}.block.{{i}}.layer.0.SelfAttention.relative_attention_bias.weight", f"{stack}.biases.{{i}}.weight")]
    for index, ours in parts.items():
        hf, layer = f"{stack}.block.{{i}}.layer.{index}", f"{stack}.layers.{{i}}"
        rules.append((f"{hf}.layer_norm.weight", f"{layer}.{norm[ours]}.weight"))
        if ours == "mlp":
            rules += [(f"{hf}.DenseReluDense.wi.weight", f"{layer}.mlp.up.weight", lambda c: c.mlp == "plain"),
                      (f"{hf}.DenseReluDense.wi_0.weight", f"{layer}.mlp.gate.weight"),
                      (f"{hf}.DenseReluDense.wi_1.weight", f"{layer}.mlp.up.weight", lambda c: c.mlp == "gated"),
                      (f"{hf}.DenseReluDense.wo.weight", f"{layer}.mlp.down.weight")]
        else:
            rules += [(f"{hf}.{module[ours]}.{x}.weight", f"{layer}.{ours}.w{x}.weight") for x in "qkvo"]
    return tuple(rules)


T5_RULES = (("shared.weight", "tok_embeddings.weight"), ("lm_head.weight", "output.weight"),
            *t5_rules("encoder", {0: "attention", 1: "mlp"}), *t5_rules("decoder", {0: "attention", 1: "cross", 2: "mlp"}))
KV_HEADS = Derived(lambda got: got["n_heads"])  # every HF encoder–decoder layout has G = H

T5_CONFIG = dict(
    vocab_size=Key("vocab_size"), dim=Key("d_model"), n_heads=Key("num_heads"), head_dim=Key("d_kv"),
    hidden_dim=Key("d_ff"), n_encoder_layers=Key("num_layers"),
    n_decoder_layers=Key("num_decoder_layers", lambda got: got["n_encoder_layers"]),
    encoder_kv_heads=KV_HEADS, self_kv_heads=KV_HEADS, cross_kv_heads=KV_HEADS,
    max_positions=Key("n_positions", 512), positions="relative",
    relative_buckets=Key("relative_attention_num_buckets", 32),
    relative_max_distance=Key("relative_attention_max_distance", 128), norm="rms",
    norm_eps=Key("layer_norm_epsilon", 1e-6), block="pre_norm", attention_scale=1.0,
    tie_embeddings=Key("tie_word_embeddings", True), pad_token_id=Key("pad_token_id", 0),
    decoder_start_token_id=Key("decoder_start_token_id", lambda got: got["pad_token_id"]),
    eos_token_id=Key("eos_token_id", 1),
)


def mt5_scales_tied_output() -> bool:
    """Whether the installed transformers scales a tied mT5's decoder output by d_model^-0.5 before the head.

    transformers 4 did, for every T5 class, whenever `tie_word_embeddings` was true; transformers 5's MT5
    never does (its T5 and UMT5 read `scale_decoder_outputs`, defaulting to the tie flag). A tied mT5 folder
    is therefore a different model in the two: gqa reads it as the installed one runs it."""
    import transformers

    return int(transformers.__version__.split(".")[0]) < 5


def t5_config(config: Seq2SeqConfig):
    """transformers' `T5Config` of a T5-layout model gqa built (trained from scratch, or a benchmark's)."""
    import transformers

    projection = ("gated-" if config.mlp == "gated" else "") + hf_activation(config.activation, None)
    return transformers.T5Config(
        vocab_size=config.vocab_size, d_model=config.dim, d_kv=config.head_dim, d_ff=config.hidden_dim,
        num_layers=config.n_encoder_layers, num_decoder_layers=config.n_decoder_layers, num_heads=config.n_heads,
        feed_forward_proj=projection, tie_word_embeddings=config.tie_embeddings,
        pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id,
        decoder_start_token_id=config.decoder_start_token_id, architectures=["T5ForConditionalGeneration"])


@dataclass
class T5Family(Seq2SeqFamily):
    """T5's `feed_forward_proj` ("gated-gelu") holds two fields, and whether the decoder's output is scaled by
    d_model^-0.5 before the head (T5 v1.0) is said differently by each class: both are read whole here."""

    def to_config(self, hf: dict) -> Seq2SeqConfig:
        config = super().to_config(hf)
        projection = hf.get("feed_forward_proj", "relu")
        gated = hf.get("is_gated_act", projection.startswith("gated-"))
        tie = config.tie_embeddings
        scaled = tie and mt5_scales_tied_output() if self.model_type == "mt5" else hf.get("scale_decoder_outputs", tie)
        return replace(config, mlp="gated" if gated else "plain",
                       activation=activation(hf.get("dense_act_fn") or projection.split("-")[-1]),
                       output_scale=config.dim ** -0.5 if scaled else 1.0)


def write_output_scale(config: Seq2SeqConfig, base: dict, out: dict) -> None:
    # The head is written explicitly: transformers' T5 and UMT5 derive the scale from tie_word_embeddings
    # unless scale_decoder_outputs says otherwise, so a tied head without the scale needs both fields; its
    # MT5 has no such field (see `mt5_scales_tied_output`), and what it cannot hold the read-back refuses.
    out["scale_decoder_outputs"] = config.output_scale != 1.0


T5_LIKE = dict(tensors=T5_RULES, config=T5_CONFIG, ignore=(r"(encoder|decoder)\.embed_tokens\.weight",))
T5 = T5Family(name="t5", architectures=("T5ForConditionalGeneration",), model_type="t5",
              write_extra=write_output_scale, **T5_LIKE)
MT5 = T5Family(name="mt5", architectures=("MT5ForConditionalGeneration",), model_type="mt5",
               write_extra=lambda config, base, out: out.pop("scale_decoder_outputs", None), **T5_LIKE)
UMT5 = T5Family(name="umt5", architectures=("UMT5ForConditionalGeneration",), model_type="umt5",
                write_extra=write_output_scale, **{**T5_LIKE, "config": {**T5_CONFIG, "bias_in_every_layer": True}})


# ------------------------------------------------------------------------------------------------ BART

def bart_rules(stack: str, names: dict[str, str]) -> tuple[tuple, ...]:
    return ((f"model.{stack}.embed_positions.weight", f"{stack}.pos_embeddings.weight"),
            (f"model.{stack}.layernorm_embedding.{{p}}", f"{stack}.embedding_norm.{{p}}"),
            *((f"model.{stack}.layers.{{i}}.{hf}.{{p}}", f"{stack}.layers.{{i}}.{ours}.{{p}}") for hf, ours in names.items()))


BART_LAYER = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
              "self_attn.out_proj": "attention.wo", "self_attn_layer_norm": "attention_norm", "fc1": "mlp.up",
              "fc2": "mlp.down", "final_layer_norm": "mlp_norm"}
BART_CROSS = {"encoder_attn.q_proj": "cross.wq", "encoder_attn.k_proj": "cross.wk", "encoder_attn.v_proj": "cross.wv",
              "encoder_attn.out_proj": "cross.wo", "encoder_attn_layer_norm": "cross_norm"}


@dataclass
class BartFamily(Seq2SeqFamily):
    """BART's `scale_embedding` flag means √d_model."""

    def to_config(self, hf: dict) -> Seq2SeqConfig:
        config = super().to_config(hf)
        return replace(config, embedding_scale=math.sqrt(config.dim) if hf.get("scale_embedding") else 1.0)


BART = BartFamily(
    name="bart", architectures=("BartForConditionalGeneration",), model_type="bart",
    tensors=(("model.shared.weight", "tok_embeddings.weight"), ("lm_head.weight", "output.weight"),
             ("final_logits_bias", "output.bias"), *bart_rules("encoder", BART_LAYER),
             *bart_rules("decoder", {**BART_LAYER, **BART_CROSS})),
    config=dict(
        vocab_size=Key("vocab_size"), dim=Key("d_model"), n_heads=Key("encoder_attention_heads"),
        head_dim=Derived(lambda got: got["dim"] // got["n_heads"]), hidden_dim=Key("encoder_ffn_dim"),
        n_encoder_layers=Key("encoder_layers"), n_decoder_layers=Key("decoder_layers"),
        encoder_kv_heads=KV_HEADS, self_kv_heads=KV_HEADS, cross_kv_heads=KV_HEADS,
        max_positions=Key("max_position_embeddings", 1024), positions="learned", position_offset=2, norm="layer",
        norm_eps=1e-5, block="post_norm", mlp="plain", activation=act_key("activation_function", "gelu"),
        attention_scale=None, qkv_bias=True, out_bias=True, mlp_bias=True, embedding_norm=True,
        tie_embeddings=Key("tie_word_embeddings", True), output_bias=True,
        decoder_start_token_id=Key("decoder_start_token_id", 2), pad_token_id=Key("pad_token_id", 1),
        eos_token_id=Key("eos_token_id", 2)),
    ignore=(r"model\.(encoder|decoder)\.embed_tokens\.weight",),
    refuse=((lambda hf: hf.get("normalize_before") or hf.get("add_final_layer_norm"),
             "BART with normalize_before / add_final_layer_norm (mBART's pre-norm layout)"),
            (lambda hf: hf.get("decoder_attention_heads", hf.get("encoder_attention_heads")) !=
             hf.get("encoder_attention_heads") or hf.get("decoder_ffn_dim") != hf.get("encoder_ffn_dim"),
             "BART whose encoder and decoder differ in heads or MLP width")),
    write_extra=lambda config, base, out: out.update(decoder_attention_heads=config.n_heads,
                                                     decoder_ffn_dim=config.hidden_dim),
)

SEQ2SEQ_FAMILIES = [T5, MT5, UMT5, BART]
BY_ARCHITECTURE = {a: f for f in SEQ2SEQ_FAMILIES for a in f.architectures}


# ------------------------------------------------------------------------------------------------ folders

def is_seq2seq(hf: dict) -> bool:
    archs = hf.get("architectures") or []
    return NATIVE_SEQ2SEQ in archs or any(a in BY_ARCHITECTURE for a in archs) or (
        not archs and any(hf.get("model_type") == f.model_type for f in SEQ2SEQ_FAMILIES))


def seq2seq_family(hf: dict) -> Seq2SeqFamily | None:
    """The family of an encoder–decoder config.json; None for gqa's own format. By model_type first, as
    transformers' Auto classes choose the model class; by architecture where there is no model_type."""
    archs = hf.get("architectures") or []
    if NATIVE_SEQ2SEQ in archs:
        return None
    by_type = next((f for f in SEQ2SEQ_FAMILIES if hf.get("model_type") == f.model_type), None)
    return by_type or next(BY_ARCHITECTURE[a] for a in archs if a in BY_ARCHITECTURE)


def read_seq2seq_config(path, hf: dict) -> tuple[Seq2SeqConfig, Seq2SeqFamily | None]:
    family = seq2seq_family(hf)
    try:
        config = Seq2SeqConfig.from_dict(hf["gqa_config"]) if family is None else family.to_config(hf)
    except KeyError as e:
        where = Path(path) / "config.json" if Path(path).is_dir() else path
        raise GQAError(f"{where} lacks the field {e.args[0]!r}") from None
    # a folder's weights may untie a head its config calls tied; a config.json alone (`gqa pretrain --config`) has none
    if family is not None and config.tie_embeddings and Path(path).is_dir() and head_differs(path, family, config):
        config = replace(config, tie_embeddings=False)
    return config, family


def head_differs(path, family: Seq2SeqFamily, config: Seq2SeqConfig) -> bool:
    """Whether the folder holds an output head that is not its embedding matrix.

    transformers 5 writes `tie_word_embeddings: true` for every T5, Flan-T5's untied head included, and
    unties on load where the file holds both tensors with different values; gqa follows the same rule, so
    a folder saved by either transformers 4 or 5 reads as the model transformers runs."""
    embedding, head = (family.file_name(name, config) for name in ("tok_embeddings.weight", "output.weight"))
    index = files.tensor_index(path)
    if head not in index or embedding not in index:
        return False
    tensors = files.read_tensors(index, [embedding, head])
    return not torch.equal(tensors[embedding], tensors[head])


def target_family(config: Seq2SeqConfig, hf_config: dict | None, format: str) -> Seq2SeqFamily | None:
    """The HF family a model is written as (its source's, at G = H), or None for gqa's own format."""
    if format == "native" or not hf_config:
        return None
    family = seq2seq_family(hf_config) if is_seq2seq(hf_config) else None
    if family is not None and family.can_express(config):
        return family
    if format == "hf":
        raise GQAError(f"{family.name if family else 'no HF family'} cannot hold fewer KV heads than query heads: "
                       f"transformers has no encoder–decoder class with a KV-head count for this layout; write "
                       f"gqa's own format (--format native)")
    return None
