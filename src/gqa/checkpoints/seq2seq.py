"""Encoder–decoder checkpoints at the edges: T5 (v1.0, v1.1 / Flan-T5), mT5, UMT5 and BART folders in and
out, and gqa's own format for what no HF class can hold.

Each family is one declarative description: its architectures, how its config.json maps to
`Seq2SeqConfig` (`read`) and back (`write`), and its tensor names against gqa's (templates with {i} for the
layer and {p} for weight / bias). transformers has no encoder–decoder class with a KV-head count for these
layouts (T5Gemma has one, with RoPE and other norms: not a lossless home for a T5), so a model with fewer KV
heads than query heads in any attention is written in gqa's own format (architecture `GQASeq2SeqLM`: the
gqa config, gqa's tensor names); at G = H it is written back as its HF class, exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from ..errors import GQAError
from ..seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from . import files
from .families import template_regex

NATIVE_SEQ2SEQ = "GQASeq2SeqLM"
ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


@dataclass(frozen=True)
class Seq2SeqFamily:
    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    read: Callable[[dict], dict]  # config.json -> Seq2SeqConfig fields
    write: Callable[[Seq2SeqConfig, dict], dict]  # (config, the source's config.json) -> config.json
    tensors: Callable[[Seq2SeqConfig], tuple[tuple[str, str], ...]]  # (HF template, gqa template) pairs
    ignore: tuple[str, ...] = ()  # HF names that duplicate a tied tensor

    def rules(self, config: Seq2SeqConfig):
        return [(template_regex(hf), hf, ours) for hf, ours in self.tensors(config)]

    def import_tensor(self, name: str, tensor: torch.Tensor, config: Seq2SeqConfig) -> dict[str, torch.Tensor]:
        if any(re.fullmatch(p, name) for p in self.ignore):
            return {}
        for regex, _, ours in self.rules(config):
            m = regex.fullmatch(name)
            if m:
                if ours == "output.bias":
                    tensor = tensor.reshape(-1)  # BART's final_logits_bias is [1, vocab]
                return {ours.format(**m.groupdict()): tensor.contiguous()}
        raise GQAError(f"{self.name}: tensor {name} has no place in gqa's encoder–decoder")

    def export_state(self, state: dict[str, torch.Tensor], config: Seq2SeqConfig) -> dict[str, torch.Tensor]:
        out = {}
        for name, tensor in state.items():
            if name == "output.weight" and config.tie_embeddings:
                continue
            for _, hf, ours in self.rules(config):
                m = template_regex(ours).fullmatch(name)
                if m:
                    out[hf.format(**m.groupdict())] = tensor.reshape(1, -1) if ours == "output.bias" else tensor
                    break
            else:
                raise GQAError(f"{self.name} has no place for gqa tensor {name}")
        return out

    def file_name(self, name: str, config: Seq2SeqConfig) -> str:
        """The name a gqa tensor has in this family's files."""
        for _, hf, ours in self.rules(config):
            m = template_regex(ours).fullmatch(name)
            if m:
                return hf.format(**m.groupdict())
        return name

    def can_express(self, config: Seq2SeqConfig) -> bool:
        heads = config.encoder_kv_heads + config.self_kv_heads + config.cross_kv_heads
        return all(g == config.n_heads for g in heads)


# ------------------------------------------------------------------------------------------------ T5

def mt5_scales_tied_output() -> bool:
    """Whether the installed transformers scales a tied mT5's decoder output by d_model^-0.5 before the head.

    transformers 4 did, for every T5 class, whenever `tie_word_embeddings` was true; transformers 5's MT5
    never does (its T5 and UMT5 read `scale_decoder_outputs`, defaulting to the tie flag). A tied mT5 folder
    is therefore a different model in the two: gqa reads it as the installed one runs it."""
    import transformers

    return int(transformers.__version__.split(".")[0]) < 5


def output_scaled(hf: dict, kind: str) -> bool:
    """Whether a T5-layout folder's decoder output is scaled by d_model^-0.5 before the head (T5 v1.0)."""
    tie = hf.get("tie_word_embeddings", True)
    if kind == "mt5":
        return tie and mt5_scales_tied_output()
    return hf.get("scale_decoder_outputs", tie)


def t5_read(hf: dict, kind: str = "t5") -> dict:
    projection = hf.get("feed_forward_proj", "relu")
    gated = hf.get("is_gated_act", projection.startswith("gated-"))
    act = hf.get("dense_act_fn") or projection.split("-")[-1]
    if act not in ACTIVATIONS:
        raise GQAError(f"T5 activation {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    heads, tie = hf["num_heads"], hf.get("tie_word_embeddings", True)
    pad = hf.get("pad_token_id", 0)
    return dict(
        vocab_size=hf["vocab_size"], dim=hf["d_model"], n_heads=heads, head_dim=hf["d_kv"], hidden_dim=hf["d_ff"],
        n_encoder_layers=hf["num_layers"], n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        encoder_kv_heads=heads, self_kv_heads=heads, cross_kv_heads=heads, max_positions=hf.get("n_positions", 512),
        positions="relative", relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        bias_in_every_layer=kind == "umt5", norm="rms", norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        block="pre_norm", mlp="gated" if gated else "plain", activation=ACTIVATIONS[act], attention_scale=1.0,
        tie_embeddings=tie, output_scale=hf["d_model"] ** -0.5 if output_scaled(hf, kind) else 1.0,
        decoder_start_token_id=hf.get("decoder_start_token_id", pad), pad_token_id=pad,
        eos_token_id=hf.get("eos_token_id", 1))


def t5_write(config: Seq2SeqConfig, base: dict, kind: str = "t5") -> dict:
    # The head is written explicitly: whether it is tied, and whether the decoder's output is scaled by
    # d_model^-0.5 before it (T5 v1.0). transformers' T5 and UMT5 derive the scale from tie_word_embeddings
    # unless scale_decoder_outputs says otherwise, so a tied head without the scale needs both fields; its
    # MT5 has no such field (see `mt5_scales_tied_output`), and what it cannot hold the read-back refuses.
    out = {**base, "vocab_size": config.vocab_size, "d_model": config.dim, "num_heads": config.n_heads,
           "d_kv": config.head_dim, "d_ff": config.hidden_dim, "num_layers": config.n_encoder_layers,
           "num_decoder_layers": config.n_decoder_layers, "tie_word_embeddings": config.tie_embeddings,
           "n_positions": config.max_positions}
    if kind == "mt5":
        out.pop("scale_decoder_outputs", None)
    else:
        out["scale_decoder_outputs"] = config.output_scale != 1.0
    return out


def t5_tensors(config: Seq2SeqConfig) -> tuple[tuple[str, str], ...]:
    def attention(hf: str, ours: str):
        return tuple((f"{hf}.{x}.weight", f"{ours}.w{x}.weight") for x in "qkvo")

    mlp = {"wi": "up"} if config.mlp == "plain" else {"wi_0": "gate", "wi_1": "up"}

    def stack(name: str, parts: list[tuple[int, str, str]]):
        rules = [(f"{name}.final_layer_norm.weight", f"{name}.norm.weight")]
        bias = f"{name}.block.{{i}}.layer.0.SelfAttention.relative_attention_bias.weight"
        rules += [(bias, f"{name}.biases.{{i}}.weight")] if config.bias_in_every_layer else \
            [(bias.replace("{i}", "0"), f"{name}.biases.0.weight")]
        for index, module, ours in parts:
            block = f"{name}.block.{{i}}.layer.{index}"
            norm = {"attention": "attention_norm", "cross": "cross_norm", "mlp": "mlp_norm"}[ours]
            rules.append((f"{block}.layer_norm.weight", f"{name}.layers.{{i}}.{norm}.weight"))
            if ours == "mlp":
                rules += [(f"{block}.DenseReluDense.{hf}.weight", f"{name}.layers.{{i}}.mlp.{g}.weight")
                          for hf, g in {**mlp, "wo": "down"}.items()]
            else:
                rules += attention(f"{block}.{module}", f"{name}.layers.{{i}}.{ours}")
        return rules

    return (("shared.weight", "tok_embeddings.weight"), ("lm_head.weight", "output.weight"),
            *stack("encoder", [(0, "SelfAttention", "attention"), (1, "", "mlp")]),
            *stack("decoder", [(0, "SelfAttention", "attention"), (1, "EncDecAttention", "cross"), (2, "", "mlp")]))


def t5_family(kind: str, architecture: str) -> Seq2SeqFamily:
    """T5 (v1.0, v1.1 / Flan-T5), mT5 and UMT5 share one layout; they differ in the position bias (UMT5's is
    per layer) and in how config.json says the head is scaled, and each is written back as its own class."""
    return Seq2SeqFamily(kind, (architecture,), (kind,), partial(t5_read, kind=kind), partial(t5_write, kind=kind),
                         t5_tensors, ignore=(r"(encoder|decoder)\.embed_tokens\.weight",))


T5 = t5_family("t5", "T5ForConditionalGeneration")
MT5 = t5_family("mt5", "MT5ForConditionalGeneration")
UMT5 = t5_family("umt5", "UMT5ForConditionalGeneration")


# ------------------------------------------------------------------------------------------------ BART

def bart_read(hf: dict) -> dict:
    if hf.get("normalize_before") or hf.get("add_final_layer_norm"):
        raise GQAError("BART with normalize_before / add_final_layer_norm (mBART's pre-norm layout) is not supported")
    heads = hf["encoder_attention_heads"]
    if hf.get("decoder_attention_heads", heads) != heads or hf.get("decoder_ffn_dim") != hf.get("encoder_ffn_dim"):
        raise GQAError("BART whose encoder and decoder differ in heads or MLP width is not supported")
    act = hf.get("activation_function", "gelu")
    if act not in ACTIVATIONS:
        raise GQAError(f"BART activation {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    dim = hf["d_model"]
    return dict(
        vocab_size=hf["vocab_size"], dim=dim, n_heads=heads, head_dim=dim // heads, hidden_dim=hf["encoder_ffn_dim"],
        n_encoder_layers=hf["encoder_layers"], n_decoder_layers=hf["decoder_layers"], encoder_kv_heads=heads,
        self_kv_heads=heads, cross_kv_heads=heads, max_positions=hf.get("max_position_embeddings", 1024),
        positions="learned", position_offset=2, norm="layer", norm_eps=1e-5, block="post_norm", mlp="plain",
        activation=ACTIVATIONS[act], attention_scale=None, qkv_bias=True, out_bias=True, mlp_bias=True,
        embedding_scale=math.sqrt(dim) if hf.get("scale_embedding") else 1.0, embedding_norm=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), output_bias=True,
        decoder_start_token_id=hf.get("decoder_start_token_id", 2), pad_token_id=hf.get("pad_token_id", 1),
        eos_token_id=hf.get("eos_token_id", 2))


def bart_write(config: Seq2SeqConfig, base: dict) -> dict:
    return {**base, "vocab_size": config.vocab_size, "d_model": config.dim, "encoder_attention_heads": config.n_heads,
            "decoder_attention_heads": config.n_heads, "encoder_ffn_dim": config.hidden_dim,
            "decoder_ffn_dim": config.hidden_dim, "encoder_layers": config.n_encoder_layers,
            "decoder_layers": config.n_decoder_layers}


def bart_tensors(config: Seq2SeqConfig) -> tuple[tuple[str, str], ...]:
    def layer(hf: str, ours: str, names: dict[str, str]):
        return tuple((f"model.{hf}.layers.{{i}}.{h}.{{p}}", f"{ours}.layers.{{i}}.{g}.{{p}}") for h, g in names.items())

    common = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
              "self_attn.out_proj": "attention.wo", "self_attn_layer_norm": "attention_norm", "fc1": "mlp.up",
              "fc2": "mlp.down", "final_layer_norm": "mlp_norm"}
    cross = {"encoder_attn.q_proj": "cross.wq", "encoder_attn.k_proj": "cross.wk", "encoder_attn.v_proj": "cross.wv",
             "encoder_attn.out_proj": "cross.wo", "encoder_attn_layer_norm": "cross_norm"}
    outer = [("model.shared.weight", "tok_embeddings.weight"), ("lm_head.weight", "output.weight"),
             ("final_logits_bias", "output.bias")]
    for stack in ("encoder", "decoder"):
        outer += [(f"model.{stack}.embed_positions.weight", f"{stack}.pos_embeddings.weight"),
                  (f"model.{stack}.layernorm_embedding.{{p}}", f"{stack}.embedding_norm.{{p}}")]
    return (*outer, *layer("encoder", "encoder", common), *layer("decoder", "decoder", {**common, **cross}))


BART = Seq2SeqFamily("bart", ("BartForConditionalGeneration",), ("bart",), bart_read, bart_write, bart_tensors,
                     ignore=(r"model\.(encoder|decoder)\.embed_tokens\.weight",))

SEQ2SEQ_FAMILIES = [T5, MT5, UMT5, BART]
BY_ARCHITECTURE = {a: f for f in SEQ2SEQ_FAMILIES for a in f.architectures}


# ------------------------------------------------------------------------------------------------ folders

def is_seq2seq(hf: dict) -> bool:
    archs = hf.get("architectures") or []
    return NATIVE_SEQ2SEQ in archs or any(a in BY_ARCHITECTURE for a in archs) or (
        not archs and any(hf.get("model_type") in f.model_types for f in SEQ2SEQ_FAMILIES))


def seq2seq_family(hf: dict) -> Seq2SeqFamily | None:
    """The family of an encoder–decoder config.json; None for gqa's own format. By model_type first, as
    transformers' Auto classes choose the model class; by architecture where there is no model_type."""
    archs = hf.get("architectures") or []
    if NATIVE_SEQ2SEQ in archs:
        return None
    by_type = next((f for f in SEQ2SEQ_FAMILIES if hf.get("model_type") in f.model_types), None)
    return by_type or next(BY_ARCHITECTURE[a] for a in archs if a in BY_ARCHITECTURE)


def read_seq2seq_config(path, hf: dict) -> tuple[Seq2SeqConfig, Seq2SeqFamily | None]:
    family = seq2seq_family(hf)
    try:
        fields = Seq2SeqConfig.from_dict(hf["gqa_config"]).to_dict() if family is None else family.read(hf)
    except KeyError as e:
        where = Path(path) / "config.json" if Path(path).is_dir() else path
        raise GQAError(f"{where} lacks the field {e.args[0]!r}") from None
    config = Seq2SeqConfig(**fields)
    # a folder's weights may untie a head its config calls tied; a config.json alone (`gqa pretrain --config`) has none
    if family is not None and config.tie_embeddings and Path(path).is_dir() and head_differs(path, family, config):
        config = replace(config, tie_embeddings=False)
    return config, family


def head_differs(path, family: Seq2SeqFamily, config: Seq2SeqConfig) -> bool:
    """Whether the folder holds an output head that is not its embedding matrix.

    transformers 5 writes `tie_word_embeddings: true` for every T5, Flan-T5's untied head included, and
    unties on load where the file holds both tensors with different values; gqa follows the same rule, so
    a folder saved by either transformers 4 or 5 reads as the model transformers runs."""
    names = {ours: hf for hf, ours in family.tensors(config)}
    embedding, head = names["tok_embeddings.weight"], names["output.weight"]
    index = files.tensor_index(path)
    if head not in index or embedding not in index:
        return False
    tensors = files.read_tensors(index, [embedding, head])
    return not torch.equal(tensors[embedding], tensors[head])


def expected_shapes(config: Seq2SeqConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Seq2SeqTransformer(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def headers(path):
    """(name, a meta tensor of its shape) for every tensor of a folder: checks read no weights."""
    for name, (shape, _) in files.tensor_shapes(path).items():
        yield name, torch.empty(shape, device="meta")


def check_seq2seq_layout(path, config: Seq2SeqConfig, family: Seq2SeqFamily | None) -> None:
    """The folder's tensors against its config, from the safetensors headers alone."""
    import_state(path, config, family, read=headers)


def import_state(path, config: Seq2SeqConfig, family: Seq2SeqFamily | None, read=None) -> dict[str, torch.Tensor]:
    """gqa tensors of a folder (checked against the config: nothing missing, nothing unexpected, shapes)."""
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}  # gqa name -> the file's: what errors name
    for name, tensor in (read or files.iter_tensors)(path):
        if tensor.device.type != "meta":
            files.check_finite(path, name, tensor)
        imported = family.import_tensor(name, tensor, config) if family else {name: tensor}
        state.update(imported)
        origin.update({k: name for k in imported})
    if config.tie_embeddings:
        state.setdefault("output.weight", state.get("tok_embeddings.weight"))
    expected = expected_shapes(config)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        missing = [family.file_name(n, config) if family else n for n in missing]  # as the file would name them
        raise GQAError(f"{path}: the checkpoint misses {missing[:3]} / has unexpected "
                       f"{[origin.get(n, n) for n in unexpected[:3]]} for its config")
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            shape = tuple(tensor.shape)
            if name == "output.bias":  # BART's final_logits_bias is [1, vocab] in the file
                shape, expected[name] = (1, *shape), (1, *expected[name])
            raise GQAError(f"{path}: tensor {origin.get(name, name)} has shape {shape}, but config.json implies "
                           f"{expected[name]}")
    return state


def model_from_state(config: Seq2SeqConfig, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                     device=None) -> Seq2SeqTransformer:
    """The model over gqa tensors (built on the meta device, the tensors assigned, the head tied), in eval mode."""
    with torch.device("meta"):
        model = Seq2SeqTransformer(config)
    dtype = dtype or state["tok_embeddings.weight"].dtype
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True, strict=True)
    model.tie_weights()
    return model.eval()


def load_seq2seq(path, hf: dict, dtype: torch.dtype | None, device) -> Seq2SeqTransformer:
    config, family = read_seq2seq_config(path, hf)
    model = model_from_state(config, import_state(path, config, family), dtype, device)
    model.hf_config = hf.get("hf_config") if family is None else hf
    model.source_dir = Path(path)
    return model


def seq2seq_config_json(config: Seq2SeqConfig, hf_config: dict | None, family: Seq2SeqFamily | None,
                        dtype: torch.dtype) -> dict:
    from ..version import __version__

    base = {k: v for k, v in (hf_config or {}).items() if k not in ("_name_or_path", "torch_dtype", "dtype",
                                                                     "transformers_version")}
    dtype_name = str(dtype).removeprefix("torch.")
    if family is None:
        return {"architectures": [NATIVE_SEQ2SEQ], "model_type": "gqa-seq2seq", "gqa_version": __version__,
                "gqa_config": config.to_dict(), "hf_config": base or None, "torch_dtype": dtype_name}
    written = family.write(config, base)
    # what a reader of this config.json builds must be this model: checked by reading it back
    read = Seq2SeqConfig(**family.read(written))
    if read != config:
        differ = [k for k, v in config.to_dict().items() if read.to_dict().get(k) != v]
        raise GQAError(f"{family.name}'s config.json cannot express this model ({', '.join(differ)} would read back "
                       f"differently); write gqa's own format (--format native)")
    return {**written, "torch_dtype": dtype_name}


def target_seq2seq_family(config: Seq2SeqConfig, hf_config: dict | None, format: str) -> Seq2SeqFamily | None:
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


def save_seq2seq_state(state: dict[str, torch.Tensor], config: Seq2SeqConfig, hf_config: dict | None,
                       family: Seq2SeqFamily | None, dest, dtype: torch.dtype, source_dir=None, overwrite: bool = False,
                       extra_files: dict | None = None, card=None) -> Path:
    """Write gqa tensors as `family`'s folder (None: gqa's own format), atomically, tokenizer beside them, and
    the model card `card(folder)` writes."""
    state = {k: v.detach().to("cpu", dtype) if v.is_floating_point() else v for k, v in state.items()}
    if family is not None:
        tensors = family.export_state(state, config)
    else:
        tensors = {k: v for k, v in state.items() if not (k == "output.weight" and config.tie_embeddings)}
    with files.atomic_dir(dest, overwrite=overwrite) as tmp:
        writer = files.ShardWriter(tmp)
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.close()
        files.copy_tokenizer(source_dir, tmp)
        for name, obj in (extra_files or {}).items():
            files.write_json(tmp / name, obj)
        files.write_json(tmp / "config.json", seq2seq_config_json(config, hf_config, family, dtype))
        if card:
            card(tmp)
    return Path(dest)


def save_seq2seq(model: Seq2SeqTransformer, dest, format: str = "auto", overwrite: bool = False,
                 dtype: torch.dtype | None = None, card=None) -> Path:
    family = target_seq2seq_family(model.config, model.hf_config, format)
    return save_seq2seq_state(model.state_dict(), model.config, model.hf_config, family, dest, dtype or model.dtype,
                              source_dir=model.source_dir, overwrite=overwrite, card=card)
