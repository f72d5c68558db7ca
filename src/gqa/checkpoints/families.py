"""Hugging Face families: how each names its tensors and configures itself, mapped onto `ModelConfig`.

Each family is a table of name rules (HF template <-> gqa template) plus, where the family fuses Q, K and V
into one tensor, the layout of that tensor:
- "blocks": rows [all Q heads | all K heads | all V heads]  (GPT-2 `c_attn`, GPT-BigCode multi-query)
- "per_head": rows [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]      (GPT-NeoX `query_key_value`, GPT-BigCode MHA)
GPT-2 stores its linear layers as Conv1D, [in, out]: those tensors are transposed at this edge.
Defaults below are the ones transformers uses when a config.json leaves a field out.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..errors import GQAError
from ..model import ModelConfig

# gqa's activation -> the HF names of the same function (the first is what gqa writes where the source
# config had none); one table for both directions
HF_ACTIVATIONS = {
    "silu": ("silu", "swish"),
    "relu": ("relu",),
    "gelu": ("gelu",),
    "gelu_tanh": ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"),
}
ACTIVATION_NAMES = {hf: ours for ours, names in HF_ACTIVATIONS.items() for hf in names}


def activation(name: str) -> str:
    """The gqa activation an HF `hidden_act` / `activation_function` names."""
    if name not in ACTIVATION_NAMES:
        raise GQAError(f"activation {name!r} is not supported; supported: {sorted(ACTIVATION_NAMES)}")
    return ACTIVATION_NAMES[name]


def hf_activation(ours: str, source_name: str | None) -> str:
    """The HF name to write for gqa's activation: the source config's own name when it means the same function."""
    return source_name if ACTIVATION_NAMES.get(source_name) == ours else HF_ACTIVATIONS[ours][0]


def rope_settings(hf: dict, default_theta: float = 10000.0) -> tuple[float, dict | None, float]:
    """(theta, scaling, partial_rotary_factor) from either transformers 5's `rope_parameters` or 4's fields."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", default_theta))
    partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        scaling = hf.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            return float(theta), dict(scaling), partial
        return float(theta), None, partial
    return float(theta), params, partial


@dataclass
class Family:
    name: str
    architectures: tuple[str, ...]
    model_type: str
    rules: list[tuple[str, str]]  # (hf template, gqa template); "{i}" is the layer, "{p}" weight|bias
    to_config: Callable[[dict], ModelConfig]
    to_hf_config: Callable[[ModelConfig, dict], dict]
    fused_qkv: str | None = None  # hf template of a fused qkv tensor
    fused_layout: str = "blocks"
    conv1d: bool = False  # [in, out] storage of linear weights (GPT-2)
    aliases: tuple[tuple[str, str], ...] = ()  # (old prefix, current prefix) of names older writers used
    ignore: tuple[str, ...] = ()  # regexes of HF buffers that carry no weights
    compiled: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        for hf, ours in self.rules:
            self.compiled.append((template_regex(hf), hf, ours, template_regex(ours)))
        self.fused_regex = template_regex(self.fused_qkv) if self.fused_qkv else None

    def can_express(self, config: ModelConfig) -> bool:
        """Whether this HF family can hold the model's KV-head layout."""
        return all(g == config.n_heads for g in config.n_kv_heads)

    def qkv_layout(self, config: ModelConfig) -> str:
        """How the fused qkv tensor orders its rows for a model with this config."""
        return self.fused_layout

    # -- import ------------------------------------------------------------------------------------------

    def canonical_name(self, name: str) -> str:
        for old, new in self.aliases:
            if name.startswith(old):
                return new + name[len(old):]
        return name

    def import_tensor(self, name: str, tensor: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor]:
        """One HF tensor -> the gqa tensors it holds (three for a fused qkv tensor, none for a buffer)."""
        name = self.canonical_name(name)
        if any(re.fullmatch(pattern, name) for pattern in self.ignore):
            return {}
        for regex, _hf, ours, _ in self.compiled:
            m = regex.fullmatch(name)
            if m:
                if self.conv1d and tensor.dim() == 2 and not ours.startswith(("tok_", "pos_", "output")):
                    tensor = tensor.t()
                return {ours.format(**m.groupdict()): tensor.contiguous()}
        m = self.fused_regex.fullmatch(name) if self.fused_regex else None
        if m:
            layer, part = int(m["i"]), m["p"]
            if self.conv1d and part == "weight":
                tensor = tensor.t()
            q, k, v = split_qkv(tensor, config, layer, self.qkv_layout(config))
            base = f"layers.{layer}.attention"
            return {f"{base}.wq.{part}": q, f"{base}.wk.{part}": k, f"{base}.wv.{part}": v}
        raise GQAError(f"unexpected tensor {name!r} in a {self.name} checkpoint")

    # -- export ------------------------------------------------------------------------------------------

    def export_state(self, state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        """gqa tensors -> HF tensors (the reverse of import_tensor); tied output weights are left out."""
        out = {}
        for name, tensor in state.items():
            if name == "output.weight" and config.tie_embeddings:
                continue
            m = re.fullmatch(r"layers\.(\d+)\.attention\.w([qkv])\.(weight|bias)", name)
            if m and self.fused_qkv:
                if m[2] == "q":
                    layer, part = int(m[1]), m[3]
                    base = f"layers.{layer}.attention"
                    qkv = [state[f"{base}.w{x}.{part}"] for x in "qkv"]
                    fused = join_qkv(*qkv, config, layer, self.qkv_layout(config))
                    if self.conv1d and part == "weight":
                        fused = fused.t()
                    out[self.fused_qkv.format(i=layer, p=part)] = fused.contiguous()
                continue
            for _, hf, ours, ours_regex in self.compiled:
                m = ours_regex.fullmatch(name)
                if m:
                    if self.conv1d and tensor.dim() == 2 and not ours.startswith(("tok_", "pos_", "output")):
                        tensor = tensor.t()
                    out[hf.format(**m.groupdict())] = tensor.contiguous()
                    break
            else:
                raise GQAError(f"the {self.name} format has no place for tensor {name!r}")
        return out


def template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern)


def split_qkv(t: torch.Tensor, config: ModelConfig, layer: int, layout: str):
    """A fused [rows, ...] qkv tensor -> (q, k, v) with rows ordered head by head."""
    H, G, D = config.n_heads, config.n_kv_heads[layer], config.head_dim
    if layout == "blocks":
        return tuple(x.contiguous() for x in t.split([H * D, G * D, G * D], dim=0))
    if G != H:
        raise GQAError(f"a per-head fused qkv tensor needs as many KV heads as query heads, got {G} of {H}")
    t = t.reshape(H, 3, D, *t.shape[1:])
    return tuple(t[:, j].reshape(H * D, *t.shape[3:]).contiguous() for j in range(3))


def join_qkv(q, k, v, config: ModelConfig, layer: int, layout: str) -> torch.Tensor:
    if layout == "blocks":
        return torch.cat([q, k, v], dim=0)
    H, D = config.n_heads, config.head_dim
    if k.shape[0] != H * D:
        raise GQAError("a per-head fused qkv tensor needs as many KV heads as query heads")
    parts = [x.reshape(H, D, *x.shape[1:]) for x in (q, k, v)]
    return torch.stack(parts, dim=1).reshape(3 * H * D, *q.shape[1:])


def _set(base: dict, **fields) -> dict:
    out = dict(base)
    out.update(fields)
    return out


# ------------------------------------------------------------------------------------------- Llama-style

LLAMA_RULES = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.layers.{i}.self_attn.q_proj.{p}", "layers.{i}.attention.wq.{p}"),
    ("model.layers.{i}.self_attn.k_proj.{p}", "layers.{i}.attention.wk.{p}"),
    ("model.layers.{i}.self_attn.v_proj.{p}", "layers.{i}.attention.wv.{p}"),
    ("model.layers.{i}.self_attn.o_proj.{p}", "layers.{i}.attention.wo.{p}"),
    ("model.layers.{i}.mlp.gate_proj.{p}", "layers.{i}.mlp.gate.{p}"),
    ("model.layers.{i}.mlp.up_proj.{p}", "layers.{i}.mlp.up.{p}"),
    ("model.layers.{i}.mlp.down_proj.{p}", "layers.{i}.mlp.down.{p}"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
]


# older transformers saved the rotary table as a buffer; it is recomputed from the config
LLAMA_BUFFERS = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq")


def llama_like_config(hf: dict, family: str) -> ModelConfig:
    n_heads = hf["num_attention_heads"]
    n_kv = hf.get("num_key_value_heads") or n_heads
    dim = hf["hidden_size"]
    theta, scaling, partial = rope_settings(hf)
    head_dim = hf.get("head_dim") or dim // n_heads
    sliding = None
    if family == "mistral":
        sliding = hf.get("sliding_window")
    if family == "qwen2" and hf.get("use_sliding_window", False):
        raise GQAError("Qwen2 checkpoints with use_sliding_window=true are not supported")
    bias = hf.get("attention_bias", False)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=[n_kv] * hf["num_hidden_layers"],
        head_dim=head_dim,
        hidden_dim=hf["intermediate_size"],
        max_positions=hf.get("max_position_embeddings", 2048),
        norm="rms",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        positions="rope",
        rope_theta=theta,
        rotary_dim=int(head_dim * partial),
        rope_scaling=scaling,
        mlp="gated",
        activation=activation(hf.get("hidden_act", "silu")),
        qkv_bias=True if family == "qwen2" else bias,
        out_bias=False if family == "qwen2" else bias,
        mlp_bias=hf.get("mlp_bias", False),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        sliding_window=sliding,
    )


def llama_like_hf_config(config: ModelConfig, base: dict, model_type: str, arch: str) -> dict:
    if len(set(config.n_kv_heads)) != 1:
        raise GQAError("a Llama-style HF config holds one KV-head count; per-layer counts need block_configs")
    if config.qkv_bias != config.out_bias and model_type != "qwen2":
        raise GQAError(f"{arch} cannot hold q/k/v biases without an output bias")
    out = _set(
        base,
        architectures=[arch],
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads[0],
        head_dim=config.head_dim,
        max_position_embeddings=config.max_positions,
        rms_norm_eps=config.norm_eps,
        hidden_act=hf_activation(config.activation, base.get("hidden_act")),
        tie_word_embeddings=config.tie_embeddings,
        mlp_bias=config.mlp_bias,
    )
    if model_type != "qwen2":
        out["attention_bias"] = config.qkv_bias
    params = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling:
        params.update(config.rope_scaling)
    if "rope_parameters" in base or "rope_theta" not in base:
        out["rope_parameters"] = params
        out.pop("rope_scaling", None)
        out.pop("rope_theta", None)
    else:
        out["rope_theta"] = config.rope_theta
        out["rope_scaling"] = config.rope_scaling
    if model_type == "mistral":
        out["sliding_window"] = config.sliding_window
    return out


class LlamaLikeFamily(Family):
    def can_express(self, config: ModelConfig) -> bool:
        return len(set(config.n_kv_heads)) == 1  # any uniform G: num_key_value_heads


def llama_like(name: str, arch: str) -> Family:
    return LlamaLikeFamily(
        name=name,
        architectures=(arch,),
        model_type=name,
        rules=LLAMA_RULES,
        to_config=lambda hf: llama_like_config(hf, name),
        to_hf_config=lambda c, base: llama_like_hf_config(c, base, name, arch),
        ignore=LLAMA_BUFFERS,
    )


# ----------------------------------------------------------------------------------- GPT-2 and BigCode

GPT2_RULES = [
    ("transformer.wte.weight", "tok_embeddings.weight"),
    ("transformer.wpe.weight", "pos_embeddings.weight"),
    ("transformer.h.{i}.ln_1.{p}", "layers.{i}.attention_norm.{p}"),
    ("transformer.h.{i}.attn.c_proj.{p}", "layers.{i}.attention.wo.{p}"),
    ("transformer.h.{i}.ln_2.{p}", "layers.{i}.mlp_norm.{p}"),
    ("transformer.h.{i}.mlp.c_fc.{p}", "layers.{i}.mlp.up.{p}"),
    ("transformer.h.{i}.mlp.c_proj.{p}", "layers.{i}.mlp.down.{p}"),
    ("transformer.ln_f.{p}", "norm.{p}"),
    ("lm_head.weight", "output.weight"),
]


def gpt2_config(hf: dict, multi_query: bool | None = None) -> ModelConfig:
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise GQAError("GPT-2 checkpoints with scale_attn_by_inverse_layer_idx=true are not supported")
    if not hf.get("scale_attn_weights", True):
        raise GQAError("GPT-2 checkpoints with scale_attn_weights=false are not supported")
    dim, n_heads = hf["n_embd"], hf["n_head"]
    n_kv = 1 if multi_query else n_heads
    default_act = "gelu_pytorch_tanh" if multi_query is not None else "gelu_new"
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=dim,
        n_layers=hf["n_layer"],
        n_heads=n_heads,
        n_kv_heads=[n_kv] * hf["n_layer"],
        head_dim=dim // n_heads,
        hidden_dim=hf.get("n_inner") or 4 * dim,
        max_positions=hf.get("n_positions", 1024),
        norm="layer",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        positions="learned",
        mlp="plain",
        activation=activation(hf.get("activation_function", default_act)),
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def gpt2_hf_config(config: ModelConfig, base: dict, model_type: str, arch: str) -> dict:
    out = _set(
        base,
        architectures=[arch],
        model_type=model_type,
        vocab_size=config.vocab_size,
        n_embd=config.dim,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        n_inner=config.hidden_dim,
        n_positions=config.max_positions,
        layer_norm_epsilon=config.norm_eps,
        activation_function=hf_activation(config.activation, base.get("activation_function", "gelu_new")),
        tie_word_embeddings=config.tie_embeddings,
    )
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
        out.pop(key, None)  # aliases some writers add; the GPT-2 names above are the ones read
    if model_type == "gpt_bigcode":
        out["multi_query"] = config.n_kv_heads[0] == 1
        out.pop("num_key_value_heads", None)
    return out


GPT2_ALIASES = tuple((p, "transformer." + p) for p in ("wte.", "wpe.", "h.", "ln_f."))

GPT2 = Family(
    name="gpt2",
    architectures=("GPT2LMHeadModel",),
    model_type="gpt2",
    rules=GPT2_RULES,
    to_config=gpt2_config,
    to_hf_config=lambda c, base: gpt2_hf_config(c, base, "gpt2", "GPT2LMHeadModel"),
    fused_qkv="transformer.h.{i}.attn.c_attn.{p}",
    fused_layout="blocks",
    conv1d=True,
    aliases=GPT2_ALIASES,
    ignore=(r"transformer\.h\.\d+\.attn\.(masked_)?bias",),
)


class BigCodeFamily(Family):
    """GPT-2 with multi-query attention: c_attn is [Q | K | V] when multi_query, per-head otherwise."""

    def qkv_layout(self, config):
        return "blocks" if config.n_kv_heads[0] == 1 else "per_head"

    def can_express(self, config):
        return all(g == 1 for g in config.n_kv_heads) or all(g == config.n_heads for g in config.n_kv_heads)


BIGCODE = BigCodeFamily(
    name="gpt_bigcode",
    architectures=("GPTBigCodeForCausalLM",),
    model_type="gpt_bigcode",
    rules=GPT2_RULES,
    to_config=lambda hf: gpt2_config(hf, multi_query=hf.get("multi_query", True)),
    to_hf_config=lambda c, base: gpt2_hf_config(c, base, "gpt_bigcode", "GPTBigCodeForCausalLM"),
    fused_qkv="transformer.h.{i}.attn.c_attn.{p}",
    aliases=GPT2_ALIASES,
    ignore=(r"transformer\.h\.\d+\.attn\.(masked_)?bias",),
)

# --------------------------------------------------------------------------------------------- GPT-NeoX

NEOX_RULES = [
    ("gpt_neox.embed_in.weight", "tok_embeddings.weight"),
    ("gpt_neox.layers.{i}.input_layernorm.{p}", "layers.{i}.attention_norm.{p}"),
    ("gpt_neox.layers.{i}.post_attention_layernorm.{p}", "layers.{i}.mlp_norm.{p}"),
    ("gpt_neox.layers.{i}.attention.dense.{p}", "layers.{i}.attention.wo.{p}"),
    ("gpt_neox.layers.{i}.mlp.dense_h_to_4h.{p}", "layers.{i}.mlp.up.{p}"),
    ("gpt_neox.layers.{i}.mlp.dense_4h_to_h.{p}", "layers.{i}.mlp.down.{p}"),
    ("gpt_neox.final_layer_norm.{p}", "norm.{p}"),
    ("embed_out.weight", "output.weight"),
]
NEOX_ALIASES = (("lm_head.", "embed_out."),)  # transformers 5 names the head lm_head


def neox_config(hf: dict) -> ModelConfig:
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = dim // n_heads
    theta, scaling, partial = rope_settings(hf, default_theta=hf.get("rotary_emb_base", 10000.0))
    if "rope_parameters" not in hf or "partial_rotary_factor" not in (hf.get("rope_parameters") or {}):
        partial = hf.get("rotary_pct", 0.25 if "rope_parameters" not in hf else partial)
    bias = hf.get("attention_bias", True)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=[n_heads] * hf["num_hidden_layers"],
        head_dim=head_dim,
        hidden_dim=hf["intermediate_size"],
        max_positions=hf.get("max_position_embeddings", 2048),
        norm="layer",
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        positions="rope",
        rope_theta=theta,
        rotary_dim=int(head_dim * partial),
        rope_scaling=scaling,
        mlp="plain",
        activation=activation(hf.get("hidden_act", "gelu")),
        parallel_residual=hf.get("use_parallel_residual", True),
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


def neox_hf_config(config: ModelConfig, base: dict) -> dict:
    out = _set(
        base,
        architectures=["GPTNeoXForCausalLM"],
        model_type="gpt_neox",
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        intermediate_size=config.hidden_dim,
        max_position_embeddings=config.max_positions,
        layer_norm_eps=config.norm_eps,
        hidden_act=hf_activation(config.activation, base.get("hidden_act")),
        use_parallel_residual=config.parallel_residual,
        attention_bias=config.qkv_bias,
        tie_word_embeddings=config.tie_embeddings,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": config.rope_theta,
            "partial_rotary_factor": config.rotary_dim / config.head_dim,
        },
        rotary_pct=config.rotary_dim / config.head_dim,
        rotary_emb_base=config.rope_theta,
    )
    return out


NEOX = Family(
    name="gpt_neox",
    architectures=("GPTNeoXForCausalLM",),
    model_type="gpt_neox",
    rules=NEOX_RULES,
    to_config=neox_config,
    to_hf_config=neox_hf_config,
    fused_qkv="gpt_neox.layers.{i}.attention.query_key_value.{p}",
    fused_layout="per_head",
    aliases=NEOX_ALIASES,
    ignore=(r"gpt_neox\.layers\.\d+\.attention\.(masked_bias|bias|rotary_emb\.inv_freq)",),
)

# ------------------------------------------------------------------------------------------------- OPT

OPT_RULES = [
    ("model.decoder.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.decoder.embed_positions.weight", "pos_embeddings.weight"),
    ("model.decoder.layers.{i}.self_attn.q_proj.{p}", "layers.{i}.attention.wq.{p}"),
    ("model.decoder.layers.{i}.self_attn.k_proj.{p}", "layers.{i}.attention.wk.{p}"),
    ("model.decoder.layers.{i}.self_attn.v_proj.{p}", "layers.{i}.attention.wv.{p}"),
    ("model.decoder.layers.{i}.self_attn.out_proj.{p}", "layers.{i}.attention.wo.{p}"),
    ("model.decoder.layers.{i}.self_attn_layer_norm.{p}", "layers.{i}.attention_norm.{p}"),
    ("model.decoder.layers.{i}.final_layer_norm.{p}", "layers.{i}.mlp_norm.{p}"),
    ("model.decoder.layers.{i}.fc1.{p}", "layers.{i}.mlp.up.{p}"),
    ("model.decoder.layers.{i}.fc2.{p}", "layers.{i}.mlp.down.{p}"),
    ("model.decoder.final_layer_norm.{p}", "norm.{p}"),
    ("lm_head.weight", "output.weight"),
]


def opt_config(hf: dict) -> ModelConfig:
    if not hf.get("do_layer_norm_before", True):
        raise GQAError("OPT checkpoints with do_layer_norm_before=false (post-norm, e.g. opt-350m) are not supported")
    dim = hf["hidden_size"]
    if hf.get("word_embed_proj_dim", dim) != dim:
        raise GQAError("OPT checkpoints with word_embed_proj_dim != hidden_size are not supported")
    if hf.get("_remove_final_layer_norm", False) or not hf.get("layer_norm_elementwise_affine", True):
        raise GQAError("OPT checkpoints without an affine final layer norm are not supported")
    n_heads = hf["num_attention_heads"]
    bias = hf.get("enable_bias", True)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=[n_heads] * hf["num_hidden_layers"],
        head_dim=dim // n_heads,
        hidden_dim=hf["ffn_dim"],
        max_positions=hf.get("max_position_embeddings", 2048),
        norm="layer",
        norm_eps=1e-5,
        positions="learned",
        position_offset=2,
        mlp="plain",
        activation=activation(hf.get("activation_function", "relu")),
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=bias,
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def opt_hf_config(config: ModelConfig, base: dict) -> dict:
    return _set(
        base,
        architectures=["OPTForCausalLM"],
        model_type="opt",
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        word_embed_proj_dim=config.dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        ffn_dim=config.hidden_dim,
        max_position_embeddings=config.max_positions,
        activation_function=hf_activation(config.activation, base.get("activation_function")),
        enable_bias=config.qkv_bias,
        do_layer_norm_before=True,
        tie_word_embeddings=config.tie_embeddings,
    )


OPT = Family(
    name="opt",
    architectures=("OPTForCausalLM",),
    model_type="opt",
    rules=OPT_RULES,
    to_config=opt_config,
    to_hf_config=opt_hf_config,
    aliases=(("decoder.", "model.decoder."),),
)

# ------------------------------------------------------------------------------------------------ index

LLAMA = llama_like("llama", "LlamaForCausalLM")
MISTRAL = llama_like("mistral", "MistralForCausalLM")
QWEN2 = llama_like("qwen2", "Qwen2ForCausalLM")

# ------------------------------------------------------------------------- Nemotron-NAS (DeciLM) per layer

def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def ffn_mult_to_hidden(ffn_mult: float, dim: int) -> int:
    """DeciLM's rule for the MLP width of a block (as vLLM, TensorRT-LLM and llama.cpp apply it)."""
    return find_multiple(int(2 * ffn_mult * dim / 3), 256)


def decilm_config(hf: dict) -> ModelConfig:
    blocks = hf.get("block_configs")
    if not isinstance(blocks, list) or len(blocks) != hf["num_hidden_layers"]:
        raise GQAError("DeciLM config needs block_configs with one entry per layer")
    n_heads, dim = hf["num_attention_heads"], hf["hidden_size"]
    n_kv, widths = [], set()
    for i, block in enumerate(blocks):
        attn, ffn = block.get("attention", {}), block.get("ffn", {})
        if attn.get("no_op") or attn.get("replace_with_linear") or ffn.get("no_op") or ffn.get("replace_with_linear"):
            raise GQAError(f"DeciLM block {i}: no-op or linear-replacement blocks are not supported")
        if attn.get("window_length") or attn.get("sparsify") or ffn.get("sparsify"):
            raise GQAError(f"DeciLM block {i}: windowed or sparse blocks are not supported")
        group = attn.get("n_heads_in_group")
        if not group or n_heads % group:
            raise GQAError(f"DeciLM block {i}: n_heads_in_group {group} does not divide {n_heads} heads")
        n_kv.append(n_heads // group)
        widths.add(ffn_mult_to_hidden(ffn["ffn_mult"], dim))
    if len(widths) != 1:
        raise GQAError("DeciLM checkpoints whose MLP width varies by layer are not supported")
    base = dict(hf, num_key_value_heads=n_heads, intermediate_size=widths.pop())
    return replace(llama_like_config(base, "llama"), n_kv_heads=n_kv)


def decilm_hf_config(config: ModelConfig, base: dict) -> dict:
    ffn_mult = config.hidden_dim * 3 / (2 * config.dim)
    if ffn_mult_to_hidden(ffn_mult, config.dim) != config.hidden_dim:
        raise GQAError(f"DeciLM block_configs cannot express an MLP width of {config.hidden_dim} (not a multiple of 256)")
    out = llama_like_hf_config(replace(config, n_kv_heads=[config.n_heads] * config.n_layers), base, "nemotron-nas",
                               "DeciLMForCausalLM")
    out.pop("num_key_value_heads", None)
    out.pop("intermediate_size", None)
    out.pop("auto_map", None)  # the remote code it names is not ours to point at
    out["block_configs"] = [
        {
            "attention": {"n_heads_in_group": config.n_heads // g, "no_op": False, "replace_with_linear": False},
            "ffn": {"ffn_mult": ffn_mult, "no_op": False, "replace_with_linear": False},
        }
        for g in config.n_kv_heads
    ]
    return out


class DeciLMFamily(Family):
    def can_express(self, config: ModelConfig) -> bool:
        return self.why_not(config) is None

    def why_not(self, config: ModelConfig) -> str | None:
        """Why block_configs cannot hold this model (None when they can)."""
        ffn_mult = config.hidden_dim * 3 / (2 * config.dim)
        checks = [
            (config.norm == "rms" and config.positions == "rope" and config.mlp == "gated",
             "it is not a Llama-style model (RMSNorm, rotary, gated MLP)"),
            (config.qkv_bias == config.out_bias, "its q/k/v biases come without an output bias"),
            (config.sliding_window is None, "it uses a sliding window"),
            (config.rotary_dim == config.head_dim, "it rotates only part of each head"),
            (ffn_mult_to_hidden(ffn_mult, config.dim) == config.hidden_dim,
             f"its MLP width {config.hidden_dim} is not a multiple of 256"),
        ]
        return next((reason for ok, reason in checks if not ok), None)


DECILM = DeciLMFamily(
    name="decilm",
    architectures=("DeciLMForCausalLM",),
    model_type="nemotron-nas",
    rules=LLAMA_RULES,
    to_config=decilm_config,
    to_hf_config=decilm_hf_config,
    ignore=LLAMA_BUFFERS,
)

FAMILIES: list[Family] = [LLAMA, MISTRAL, QWEN2, GPT2, NEOX, OPT, BIGCODE, DECILM]
BY_ARCHITECTURE = {arch: fam for fam in FAMILIES for arch in fam.architectures}


def family_for(hf: dict, where: str) -> Family:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in BY_ARCHITECTURE:
            return BY_ARCHITECTURE[arch]
    for fam in FAMILIES:  # configs written without `architectures` still carry model_type
        if not archs and hf.get("model_type") == fam.model_type:
            return fam
    found = ", ".join(archs) or hf.get("model_type") or "none named"
    supported = ", ".join(sorted(BY_ARCHITECTURE) + ["GQAForCausalLM (gqa's own format)"])
    raise GQAError(f"{where}: architecture {found} is not supported; supported: {supported}")
