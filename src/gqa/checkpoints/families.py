"""Hugging Face families, each one declarative description, mapped onto `ModelConfig` and gqa's tensor names.

A `Family` says everything gqa needs to read and write a family's folders:
- `config`: for each ModelConfig field, the config.json key it lives under (`Key`, with the default
  transformers assumes when the key is absent), or the value every model of the family has;
- `rope`: how the rotary settings are stored (rope_parameters / rope_theta + partial_rotary_factor, NeoX's
  rotary_pct, GPT-J's rotary_dim);
- `tensors`: HF name template <-> gqa name template ("{i}" the layer, "{p}" weight|bias, "{h}" a head whose
  tensors the family stores one by one); a rule with a condition is the one written when it holds;
- `fused`: tensors holding several projections at once, and the layout of their rows;
- `refuse`: configurations gqa does not implement, each with its reason.
Everything the conversion methods need of a family (which dims RoPE pairs, which norms touch K) is in the
ModelConfig the description produces. Adding a family is adding a description.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

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


# ------------------------------------------------------------------------------------------ the description

REQUIRED = object()


@dataclass(frozen=True)
class Key:
    """A ModelConfig field kept in config.json under `name`; `default` (a value, or a function of the fields
    read so far) where the key is absent or null; `read` / `write` convert between the two spellings."""
    name: str
    default: Any = REQUIRED
    read: Callable[[Any], Any] | None = None
    write: Callable[[Any, dict], Any] | None = None


@dataclass(frozen=True)
class Derived:
    """A ModelConfig field computed from the fields read so far (not stored in config.json)."""
    compute: Callable[[dict], Any]


def kv_key(name: str) -> Key:
    """A KV-head count: an int in config.json, one entry per layer in ModelConfig (default: G = H)."""
    return Key(name, lambda got: got["n_heads"], write=lambda v, base: v[0])


def act_key(name: str, default: str) -> Key:
    return Key(name, default, read=activation, write=lambda v, base, name=name: hf_activation(v, base.get(name)))


@dataclass(frozen=True)
class Rope:
    """How a family stores its rotary settings: `style` "parameters" (transformers 5's rope_parameters, or 4's
    rope_theta / rope_scaling / partial_rotary_factor), "neox" (also rotary_pct / rotary_emb_base), "gptj"
    (an absolute rotary_dim, theta fixed)."""
    style: str = "parameters"
    partial: float = 1.0  # the family's default fraction of head_dim that rotates
    layout: str = "half"  # ModelConfig.rope_style


@dataclass(frozen=True)
class Fused:
    """One HF tensor holding several gqa projections of a layer, rows in `layout`: "blocks" (each part whole,
    one after the other: [Q | K | V] or [gate | up]), "per_head" ([q_h k_h v_h] per head), "per_group"
    ([q x H/G, k, v] per KV group: Falcon's new decoder architecture)."""
    hf: str
    parts: tuple[str, ...]  # gqa names under layers.{i}. of the parts, in order
    layout: str | Callable[[ModelConfig], str] = "blocks"

    def layout_for(self, config: ModelConfig) -> str:
        return self.layout(config) if callable(self.layout) else self.layout


@dataclass
class Description:
    """What a family of either model shape says: how config.json is recognised (`architectures`, `model_type`),
    its keys (`config`: one entry per field of the shape's config class), its tensors (`tensors`) and what it
    refuses. `Family` (decoders) and `checkpoints.seq2seq.Seq2SeqFamily` add what their shape needs."""
    name: str
    architectures: tuple[str, ...]
    model_type: str
    tensors: tuple[tuple, ...]  # (hf template, gqa template[, condition(config) for writing])
    config: dict[str, Any]  # config field -> Key | Derived | constant
    ignore: tuple[str, ...] = ()  # regexes of HF buffers (or tied duplicates) that carry no weights of their own
    refuse: tuple[tuple[Callable[[dict], bool], str], ...] = ()  # (config.json -> unsupported?, why)
    write_extra: Callable[[Any, dict, dict], None] | None = None  # config.json fields beyond `config`

    def __post_init__(self) -> None:
        self.rules = [(template_regex(r[0]), r[0], r[1], template_regex(r[1]), r[2] if len(r) > 2 else None)
                      for r in self.tensors]

    def read_keys(self, hf: dict) -> dict[str, Any]:
        """The config fields config.json holds (refused configurations raise first)."""
        for unsupported, why in self.refuse:
            if unsupported(hf):
                raise GQAError(f"{self.name}: {why} is not supported")
        got: dict[str, Any] = {}
        for name, rule in self.config.items():
            got[name] = (read_key(rule, hf, got) if isinstance(rule, Key) else
                         rule.compute(got) if isinstance(rule, Derived) else rule)
        return got

    def write_keys(self, config, base: dict) -> dict:
        """`base` (the source's config.json) with this family's names and every `Key` written from `config`."""
        out = dict(base, architectures=[self.architectures[0]], model_type=self.model_type)
        for name, rule in self.config.items():
            if isinstance(rule, Key):
                value = getattr(config, name)
                out[rule.name] = rule.write(value, base) if rule.write else value
        return out

    def ignored(self, name: str) -> bool:
        return any(re.fullmatch(pattern, name) for pattern in self.ignore)

    def import_rule(self, name: str) -> tuple[str, dict] | None:
        """(gqa template, its fields) of the rule an HF tensor name matches."""
        for regex, _hf, ours, _, _ in self.rules:
            m = regex.fullmatch(name)
            if m:
                return ours, m.groupdict()
        return None

    def read_back_differs(self, config, written: dict) -> list[str]:
        """The model's fields a reader of `written` (this family's config.json for `config`) would build
        differently; `extra` (how a layout was read, e.g. Falcon's old or new block) is not the model."""
        read = self.to_config(written).to_dict()
        return [k for k, v in config.to_dict().items() if k != "extra" and read.get(k) != v]

    def file_name(self, name: str, config) -> str:
        """The name a gqa tensor has in this family's files (its own where no one file tensor holds it alone:
        no rule, or a per-head template)."""
        rule = self.export_rule(name, config)
        try:
            return rule[0].format(**rule[1]) if rule else name
        except KeyError:
            return name

    def export_rule(self, name: str, config) -> tuple[str, dict] | None:
        """(HF template, its fields) a gqa tensor is written under: the first rule whose condition holds."""
        for _, hf, _ours, ours_regex, when in self.rules:
            m = ours_regex.fullmatch(name)
            if m and (when is None or when(config)):
                return hf, m.groupdict()
        return None


@dataclass
class Family(Description):
    """A decoder family: the description, its rotary settings and fused tensors, and where it is served."""
    rope: Rope | None = field(default_factory=Rope)
    fused: tuple[Fused, ...] = ()
    conv1d: bool = False  # [in, out] storage of linear weights (GPT-2)
    aliases: tuple[tuple[str, str], ...] = ()  # (old prefix, current prefix) of names older writers used
    remote_code: tuple[str, ...] = ()  # gqa's modules (gqa/runtimes/NAME/) a runtime loads with trust_remote_code
    vllm_refuse: tuple[tuple[Callable[[dict], bool], str], ...] = ()  # (config.json -> vLLM cannot load it?, why)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.fused_rules = [(template_regex(f.hf), f) for f in self.fused]

    # -- config ------------------------------------------------------------------------------------------

    def to_config(self, hf: dict) -> ModelConfig:
        got = self.read_keys(hf)
        if isinstance(got.get("n_kv_heads"), int):
            got["n_kv_heads"] = [got["n_kv_heads"]] * got["n_layers"]
        if self.rope is not None:
            got.update(read_rope(self.rope, hf, got["head_dim"]))
        return ModelConfig(**got)

    def to_hf_config(self, config: ModelConfig, base: dict) -> dict:
        out = self.write_keys(config, base)
        if self.rope is not None:
            write_rope(self.rope, config, base, out)
        if self.write_extra:
            self.write_extra(config, base, out)
        return out

    def can_express(self, config: ModelConfig) -> bool:
        """Whether this family's config.json holds the model: written and read back, it is the same model
        (KV heads, biases, norms, rotary layout: whatever the family has no key for comes back different)."""
        try:
            return not self.read_back_differs(config, self.to_hf_config(config, {}))
        except (GQAError, KeyError, TypeError, ValueError):
            return False

    # -- tensors -----------------------------------------------------------------------------------------

    def canonical_name(self, name: str) -> str:
        for old, new in self.aliases:
            if name.startswith(old):
                return new + name[len(old):]
        return name

    def import_tensor(self, name: str, tensor: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor]:
        """One HF tensor -> the gqa tensors it holds (several for a fused one, none for a buffer). A tensor the
        family stores per head comes back as `name#h`: `stack_heads` joins them."""
        name = self.canonical_name(name)
        if self.ignored(name):
            return {}
        if rule := self.import_rule(name):
            ours, fields = rule
            if self.conv1d and tensor.dim() == 2 and ours.startswith("layers."):
                tensor = tensor.t()
            head = f"#{fields['h']}" if "h" in fields else ""
            return {ours.format(**fields) + head: tensor.contiguous()}
        for regex, fused in self.fused_rules:
            m = regex.fullmatch(name)
            if m:
                layer, part = int(m["i"]), m["p"]
                if self.conv1d and part == "weight":
                    tensor = tensor.t()
                pieces = split_fused(tensor, fused, config, layer)
                return {f"layers.{layer}.{p}.{part}": t for p, t in zip(fused.parts, pieces)}
        raise GQAError(f"unexpected tensor {name!r} in a {self.name} checkpoint")

    def export_state(self, state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        """gqa tensors -> HF tensors (the reverse of import_tensor); tied output weights are left out."""
        out: dict[str, torch.Tensor] = {}
        fused_parts = {part: f for f in self.fused for part in f.parts}
        for name, tensor in state.items():
            if name == "output.weight" and config.tie_embeddings:
                continue
            m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)
            if m and m[2] in fused_parts:
                fused = fused_parts[m[2]]
                if m[2] == fused.parts[0]:  # the first part writes the whole fused tensor
                    layer, part = int(m[1]), m[3]
                    joined = join_fused([state[f"layers.{layer}.{p}.{part}"] for p in fused.parts], fused, config, layer)
                    out[fused.hf.format(i=layer, p=part)] = (joined.t() if self.conv1d and part == "weight"
                                                             else joined).contiguous()
                continue
            out.update(self.export_tensor(name, tensor, config))
        return out

    def export_tensor(self, name: str, tensor: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor]:
        if rule := self.export_rule(name, config):
            hf, fields = rule
            if self.conv1d and tensor.dim() == 2 and name.startswith("layers."):
                tensor = tensor.t()
            if "{h}" in hf:  # stored one head at a time
                heads = tensor.reshape(-1, config.head_dim)
                return {hf.format(h=h, **fields): t.contiguous() for h, t in enumerate(heads)}
            return {hf.format(**fields): tensor.contiguous()}
        raise GQAError(f"the {self.name} format has no place for tensor {name!r}")


def stack_heads(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Join `name#h` pieces (a family's per-head tensors) into one flat [heads · D] tensor under `name`."""
    pieces = {k: v for k, v in state.items() if "#" in k}
    if not pieces:
        return state
    out = {k: v for k, v in state.items() if "#" not in k}
    for name in {k.split("#")[0] for k in pieces}:
        heads = sorted((int(k.split("#")[1]), v) for k, v in pieces.items() if k.split("#")[0] == name)
        out[name] = torch.cat([v for _, v in heads])
    return out


def template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern.replace(r"\{h\}", r"(?P<h>\d+)"))


def read_key(rule: Key, hf: dict, got: dict) -> Any:
    value = hf.get(rule.name)
    if value is None:
        if rule.default is REQUIRED:
            raise KeyError(rule.name)
        return rule.default(got) if callable(rule.default) else rule.default
    return rule.read(value) if rule.read else value


# ------------------------------------------------------------------------------------------ rotary settings

def rope_settings(hf: dict, default_theta: float = 10000.0) -> tuple[float, dict | None, float | None]:
    """(theta, scaling, partial_rotary_factor or None) from transformers 5's `rope_parameters` or 4's fields."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", default_theta))
    partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor"))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        scaling = hf.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            return float(theta), dict(scaling), partial
        return float(theta), None, partial
    return float(theta), params, partial


def read_rope(rope: Rope, hf: dict, head_dim: int) -> dict:
    if rope.style == "gptj":
        return {"rope_theta": 10000.0, "rope_scaling": None, "rotary_dim": hf.get("rotary_dim") or head_dim,
                "rope_style": rope.layout}
    theta, scaling, partial = rope_settings(hf, hf.get("rotary_emb_base", 10000.0))
    if rope.style == "neox" and partial is None:
        partial = hf.get("rotary_pct")
    partial = rope.partial if partial is None else partial
    return {"rope_theta": theta, "rope_scaling": scaling, "rotary_dim": int(head_dim * partial),
            "rope_style": rope.layout}


def write_rope(rope: Rope, config: ModelConfig, base: dict, out: dict) -> None:
    if rope.style == "gptj":
        out["rotary_dim"] = config.rotary_dim
        return
    partial = config.rotary_dim / config.head_dim
    params = {"rope_type": "default", "rope_theta": config.rope_theta, **(config.rope_scaling or {})}
    if partial != 1.0 or "partial_rotary_factor" in (base.get("rope_parameters") or {}):
        params["partial_rotary_factor"] = partial
    if "rope_parameters" in base or "rope_theta" not in base:
        out["rope_parameters"] = params
        for key in ("rope_scaling", "rope_theta", "partial_rotary_factor"):
            out.pop(key, None)
    else:
        out["rope_theta"] = config.rope_theta
        out["rope_scaling"] = config.rope_scaling
        if "partial_rotary_factor" in base or partial != 1.0:
            out["partial_rotary_factor"] = partial
    if rope.style == "neox":
        out["rotary_pct"], out["rotary_emb_base"] = partial, config.rope_theta


# ------------------------------------------------------------------------------------------ fused layouts

def part_rows(part: str, config: ModelConfig, layer: int) -> int:
    """Rows of one part of a fused tensor: q -> H·D, k and v -> G·D, an MLP part -> hidden_dim."""
    if part.endswith("wq"):
        return config.n_heads * config.head_dim
    if part.endswith(("wk", "wv")):
        return config.n_kv_heads[layer] * config.head_dim
    return config.hidden_dim


def split_fused(t: torch.Tensor, fused: Fused, config: ModelConfig, layer: int) -> list[torch.Tensor]:
    """A fused [rows, ...] tensor -> its parts, each with rows ordered head by head."""
    layout = fused.layout_for(config)
    if layout == "blocks":
        return [x.contiguous() for x in t.split([part_rows(p, config, layer) for p in fused.parts], dim=0)]
    H, G, D = config.n_heads, config.n_kv_heads[layer], config.head_dim
    if layout == "per_head":
        if G != H:
            raise GQAError(f"a per-head fused qkv tensor needs as many KV heads as query heads, got {G} of {H}")
        t = t.reshape(H, 3, D, *t.shape[1:])
        return [t[:, j].reshape(H * D, *t.shape[3:]).contiguous() for j in range(3)]
    r = H // G  # per_group: [q x r, k, v] for each KV group
    t = t.reshape(G, r + 2, D, *t.shape[1:])
    rest = t.shape[3:]
    return [t[:, :r].reshape(H * D, *rest).contiguous(), t[:, r].reshape(G * D, *rest).contiguous(),
            t[:, r + 1].reshape(G * D, *rest).contiguous()]


def join_fused(parts: list[torch.Tensor], fused: Fused, config: ModelConfig, layer: int) -> torch.Tensor:
    layout = fused.layout_for(config)
    if layout == "blocks":
        return torch.cat(parts, dim=0)
    q, k, v = parts
    H, G, D = config.n_heads, config.n_kv_heads[layer], config.head_dim
    rest = q.shape[1:]
    if layout == "per_head":
        if k.shape[0] != H * D:
            raise GQAError("a per-head fused qkv tensor needs as many KV heads as query heads")
        return torch.stack([x.reshape(H, D, *rest) for x in (q, k, v)], dim=1).reshape(3 * H * D, *rest)
    r = H // G
    return torch.cat([q.reshape(G, r, D, *rest), k.reshape(G, 1, D, *rest), v.reshape(G, 1, D, *rest)],
                     dim=1).reshape((r + 2) * G * D, *rest)


# ------------------------------------------------------------------------------------------ the families

def layer_rules(prefix: str, names: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Per-layer rules from {hf suffix: gqa suffix} under `prefix` (the HF layer prefix, with {i})."""
    return tuple((f"{prefix}.{hf}", f"layers.{{i}}.{ours}") for hf, ours in names.items())


LLAMA_LAYER = {
    "self_attn.q_proj.{p}": "attention.wq.{p}", "self_attn.k_proj.{p}": "attention.wk.{p}",
    "self_attn.v_proj.{p}": "attention.wv.{p}", "self_attn.o_proj.{p}": "attention.wo.{p}",
    "mlp.gate_proj.{p}": "mlp.gate.{p}", "mlp.up_proj.{p}": "mlp.up.{p}", "mlp.down_proj.{p}": "mlp.down.{p}",
    "input_layernorm.{p}": "attention_norm.{p}", "post_attention_layernorm.{p}": "mlp_norm.{p}",
}
LLAMA_OUTER = (("model.embed_tokens.weight", "tok_embeddings.weight"), ("model.norm.{p}", "norm.{p}"),
               ("lm_head.{p}", "output.{p}"))
LLAMA_RULES = (*LLAMA_OUTER, *layer_rules("model.layers.{i}", LLAMA_LAYER))
QK_NORM_RULES = layer_rules("model.layers.{i}", {"self_attn.q_norm.{p}": "attention.q_norm.{p}",
                                                 "self_attn.k_norm.{p}": "attention.k_norm.{p}"})
# older transformers saved the rotary table as a buffer; it is recomputed from the config
LLAMA_BUFFERS = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq")


def llama_config(**changes) -> dict[str, Any]:
    """The config of a Llama-style family (changes: its own keys, defaults and constants)."""
    base = dict(
        vocab_size=Key("vocab_size"), dim=Key("hidden_size"), n_layers=Key("num_hidden_layers"),
        n_heads=Key("num_attention_heads"), n_kv_heads=kv_key("num_key_value_heads"),
        head_dim=Key("head_dim", lambda got: got["dim"] // got["n_heads"]), hidden_dim=Key("intermediate_size"),
        max_positions=Key("max_position_embeddings", 2048), norm="rms", norm_eps=Key("rms_norm_eps", 1e-6),
        positions="rope", mlp="gated", activation=act_key("hidden_act", "silu"),
        qkv_bias=Key("attention_bias", False), out_bias=Key("attention_bias", False), mlp_bias=Key("mlp_bias", False),
        tie_embeddings=Key("tie_word_embeddings", False),
    )
    return {**base, **changes}


def llama_like(name: str, arch: str, **options) -> Family:
    options.setdefault("config", llama_config())
    return Family(name=name, architectures=(arch,), model_type=name, tensors=LLAMA_RULES, ignore=LLAMA_BUFFERS,
                  **options)


LLAMA = llama_like("llama", "LlamaForCausalLM")
MISTRAL = llama_like("mistral", "MistralForCausalLM", config=llama_config(sliding_window=Key("sliding_window", None)))
QWEN2 = llama_like("qwen2", "Qwen2ForCausalLM", config=llama_config(qkv_bias=True, out_bias=False),
                   refuse=((lambda hf: hf.get("use_sliding_window", False), "Qwen2 with use_sliding_window=true"),))
GEMMA = llama_like("gemma", "GemmaForCausalLM", config=llama_config(
    head_dim=Key("head_dim", 256), max_positions=Key("max_position_embeddings", 8192),
    activation=act_key("hidden_act", "gelu_pytorch_tanh"), tie_embeddings=Key("tie_word_embeddings", True),
    norm_weight_offset=1.0, embedding_multiplier=Derived(lambda got: got["dim"] ** 0.5),
))
QWEN3 = Family(
    name="qwen3", architectures=("Qwen3ForCausalLM",), model_type="qwen3", tensors=(*LLAMA_RULES, *QK_NORM_RULES),
    ignore=LLAMA_BUFFERS,
    config=llama_config(head_dim=Key("head_dim", 128), max_positions=Key("max_position_embeddings", 32768),
                        qk_norm="rms_head"),
    refuse=((lambda hf: hf.get("use_sliding_window", False), "Qwen3 with use_sliding_window=true"),),
)
OLMO2 = Family(
    name="olmo2", architectures=("Olmo2ForCausalLM",), model_type="olmo2", ignore=LLAMA_BUFFERS,
    tensors=(*LLAMA_OUTER, *QK_NORM_RULES, *layer_rules("model.layers.{i}", {
        **{k: v for k, v in LLAMA_LAYER.items() if "layernorm" not in k},
        "post_attention_layernorm.{p}": "attention_norm.{p}", "post_feedforward_layernorm.{p}": "mlp_norm.{p}"})),
    config=llama_config(norm_eps=Key("rms_norm_eps", 1e-5), block="post_norm", qk_norm="rms_all"),
)
PHI3 = Family(
    name="phi3", architectures=("Phi3ForCausalLM",), model_type="phi3", ignore=LLAMA_BUFFERS,
    tensors=(*LLAMA_OUTER, *layer_rules("model.layers.{i}", {
        "self_attn.o_proj.{p}": "attention.wo.{p}", "mlp.down_proj.{p}": "mlp.down.{p}",
        "input_layernorm.{p}": "attention_norm.{p}", "post_attention_layernorm.{p}": "mlp_norm.{p}"})),
    fused=(Fused("model.layers.{i}.self_attn.qkv_proj.{p}", ("attention.wq", "attention.wk", "attention.wv")),
           Fused("model.layers.{i}.mlp.gate_up_proj.{p}", ("mlp.gate", "mlp.up"))),
    config=llama_config(norm_eps=Key("rms_norm_eps", 1e-5), max_positions=Key("max_position_embeddings", 4096),
                        qkv_bias=False, out_bias=False, mlp_bias=False, sliding_window=Key("sliding_window", None)),
    refuse=((lambda hf: (hf.get("rope_parameters") or hf.get("rope_scaling") or {}).get("rope_type", "default")
             not in ("default", None), "Phi-3 with longrope scaling (the 128k-context variants)"),),
)
PHI = Family(
    name="phi", architectures=("PhiForCausalLM",), model_type="phi", ignore=LLAMA_BUFFERS,
    rope=Rope(partial=0.5),
    tensors=(("model.embed_tokens.weight", "tok_embeddings.weight"), ("model.final_layernorm.{p}", "norm.{p}"),
             ("lm_head.{p}", "output.{p}"), *layer_rules("model.layers.{i}", {
                 "self_attn.q_proj.{p}": "attention.wq.{p}", "self_attn.k_proj.{p}": "attention.wk.{p}",
                 "self_attn.v_proj.{p}": "attention.wv.{p}", "self_attn.dense.{p}": "attention.wo.{p}",
                 "self_attn.q_layernorm.{p}": "attention.q_norm.{p}", "self_attn.k_layernorm.{p}": "attention.k_norm.{p}",
                 "mlp.fc1.{p}": "mlp.up.{p}", "mlp.fc2.{p}": "mlp.down.{p}", "input_layernorm.{p}": "attention_norm.{p}"})),
    config=llama_config(norm="layer", norm_eps=Key("layer_norm_eps", 1e-5), mlp="plain",
                        activation=act_key("hidden_act", "gelu_new"), block="parallel_shared", qkv_bias=True,
                        out_bias=True, mlp_bias=True, output_bias=True,
                        qk_norm=Key("qk_layernorm", None, read=lambda on: "layer_head" if on else None,
                                    write=lambda v, base: v is not None)),
)
STABLELM = Family(
    name="stablelm", architectures=("StableLmForCausalLM",), model_type="stablelm", ignore=LLAMA_BUFFERS,
    rope=Rope(partial=0.25),
    tensors=(*LLAMA_OUTER, *layer_rules("model.layers.{i}", {
        **LLAMA_LAYER, "self_attn.q_layernorm.norms.{h}.weight": "attention.q_norm.weight",
        "self_attn.k_layernorm.norms.{h}.weight": "attention.k_norm.weight"})),
    config=llama_config(norm="layer", norm_eps=Key("layer_norm_eps", 1e-5),
                        max_positions=Key("max_position_embeddings", 4096), qkv_bias=Key("use_qkv_bias", False),
                        out_bias=False, mlp_bias=False,
                        block=Key("use_parallel_residual", "sequential",
                                  read=lambda on: "parallel_shared" if on else "sequential",
                                  write=lambda v, base: v == "parallel_shared"),
                        qk_norm=Key("qk_layernorm", None, read=lambda on: "layer_per_head" if on else None,
                                    write=lambda v, base: v is not None)),
    vllm_refuse=((lambda hf: hf.get("qk_layernorm", False), "vLLM's StableLM has no per-head q/k LayerNorm"),
                 (lambda hf: hf.get("use_parallel_residual", False), "vLLM's StableLM has no parallel residual")),
)
GPTJ = Family(
    name="gptj", architectures=("GPTJForCausalLM",), model_type="gptj", rope=Rope(style="gptj", layout="interleaved"),
    tensors=(("transformer.wte.weight", "tok_embeddings.weight"), ("transformer.ln_f.{p}", "norm.{p}"),
             ("lm_head.{p}", "output.{p}"), *layer_rules("transformer.h.{i}", {
                 "attn.q_proj.{p}": "attention.wq.{p}", "attn.k_proj.{p}": "attention.wk.{p}",
                 "attn.v_proj.{p}": "attention.wv.{p}", "attn.out_proj.{p}": "attention.wo.{p}",
                 "mlp.fc_in.{p}": "mlp.up.{p}", "mlp.fc_out.{p}": "mlp.down.{p}", "ln_1.{p}": "attention_norm.{p}"})),
    config=dict(vocab_size=Key("vocab_size"), dim=Key("n_embd"), n_layers=Key("n_layer"), n_heads=Key("n_head"),
                n_kv_heads=Derived(lambda got: got["n_heads"]), head_dim=Derived(lambda got: got["dim"] // got["n_heads"]),
                hidden_dim=Key("n_inner", lambda got: 4 * got["dim"]), max_positions=Key("n_positions", 2048),
                norm="layer", norm_eps=Key("layer_norm_epsilon", 1e-5), positions="rope", mlp="plain",
                activation=act_key("activation_function", "gelu_new"), block="parallel_shared", mlp_bias=True,
                output_bias=True, tie_embeddings=Key("tie_word_embeddings", False)),
    ignore=(r"transformer\.h\.\d+\.attn\.(masked_bias|bias|embed_positions)",),
)


def falcon_layout(config: ModelConfig) -> str:
    g = set(config.n_kv_heads)
    if g == {config.n_heads}:
        return "per_head" if config.extra.get("falcon_new_arch") is False else "per_group"
    return "blocks" if g == {1} and not config.extra.get("falcon_new_arch") else "per_group"


def falcon_new_arch(config: ModelConfig) -> bool:
    """Falcon's new decoder architecture holds any G; the old one only MQA (blocks) or MHA (per head)."""
    if config.extra.get("falcon_new_arch"):
        return True
    return not ({config.n_heads} == set(config.n_kv_heads) or {1} == set(config.n_kv_heads))


def falcon_extra(config: ModelConfig, base: dict, out: dict) -> None:
    new = falcon_new_arch(config)
    out.update(new_decoder_architecture=new, multi_query=set(config.n_kv_heads) == {1} and not new,
               num_kv_heads=config.n_kv_heads[0], parallel_attn=config.block != "sequential",
               num_ln_in_parallel_attn=(2 if config.block == "parallel" else 1) if new else None,
               bias=config.qkv_bias, alibi=False, ffn_hidden_size=config.hidden_dim)
    for key in ("num_key_value_heads", "intermediate_size"):
        out.pop(key, None)


def falcon_kv(got: dict, hf: dict) -> int:
    if hf.get("new_decoder_architecture"):
        return hf.get("num_kv_heads") or got["n_heads"]
    return 1 if hf.get("multi_query", True) else got["n_heads"]


def falcon_block(hf: dict) -> str:
    if not hf.get("parallel_attn", True):
        return "sequential"
    two = hf.get("new_decoder_architecture") and (hf.get("num_ln_in_parallel_attn") or 2) == 2
    return "parallel" if two else "parallel_shared"


class FalconFamily(Family):
    """Falcon's layout flags decide its KV heads, fused layout and block; they are read from the whole config."""

    def to_config(self, hf: dict) -> ModelConfig:
        config = super().to_config(hf)
        n_kv = falcon_kv({"n_heads": config.n_heads}, hf)
        return replace(config, n_kv_heads=[n_kv] * config.n_layers, block=falcon_block(hf),
                       extra={"falcon_new_arch": bool(hf.get("new_decoder_architecture"))})


FALCON = FalconFamily(
    name="falcon", architectures=("FalconForCausalLM",), model_type="falcon",
    tensors=(("transformer.word_embeddings.weight", "tok_embeddings.weight"), ("transformer.ln_f.{p}", "norm.{p}"),
             ("lm_head.{p}", "output.{p}"), *layer_rules("transformer.h.{i}", {
                 "self_attention.dense.{p}": "attention.wo.{p}", "mlp.dense_h_to_4h.{p}": "mlp.up.{p}",
                 "mlp.dense_4h_to_h.{p}": "mlp.down.{p}"}),
             ("transformer.h.{i}.ln_attn.{p}", "layers.{i}.attention_norm.{p}", lambda c: c.block == "parallel"),
             ("transformer.h.{i}.ln_mlp.{p}", "layers.{i}.mlp_norm.{p}", lambda c: c.block == "parallel"),
             ("transformer.h.{i}.input_layernorm.{p}", "layers.{i}.attention_norm.{p}"),
             ("transformer.h.{i}.post_attention_layernorm.{p}", "layers.{i}.mlp_norm.{p}")),
    fused=(Fused("transformer.h.{i}.self_attention.query_key_value.{p}", ("attention.wq", "attention.wk", "attention.wv"),
                 falcon_layout),),
    config=dict(vocab_size=Key("vocab_size"), dim=Key("hidden_size"), n_layers=Key("num_hidden_layers"),
                n_heads=Key("num_attention_heads"), n_kv_heads=Derived(lambda got: got["n_heads"]),
                head_dim=Derived(lambda got: got["dim"] // got["n_heads"]),
                hidden_dim=Key("ffn_hidden_size", lambda got: 4 * got["dim"]),
                max_positions=Key("max_position_embeddings", 2048), norm="layer",
                norm_eps=Key("layer_norm_epsilon", 1e-5), positions="rope", mlp="plain",
                activation=act_key("activation", "gelu"), qkv_bias=Key("bias", False), out_bias=Key("bias", False),
                mlp_bias=Key("bias", False), tie_embeddings=Key("tie_word_embeddings", True)),
    write_extra=falcon_extra,
    refuse=((lambda hf: hf.get("alibi", False), "Falcon with ALiBi positions (alibi=true)"),
            (lambda hf: hf.get("new_decoder_architecture") and not hf.get("parallel_attn", True),
             "Falcon's new decoder architecture without parallel attention")),
)

# ----------------------------------------------------------------------------------- GPT-2 and BigCode

GPT2_RULES = (("transformer.wte.weight", "tok_embeddings.weight"), ("transformer.wpe.weight", "pos_embeddings.weight"),
              ("transformer.ln_f.{p}", "norm.{p}"), ("lm_head.weight", "output.weight"),
              *layer_rules("transformer.h.{i}", {"ln_1.{p}": "attention_norm.{p}", "attn.c_proj.{p}": "attention.wo.{p}",
                                                 "ln_2.{p}": "mlp_norm.{p}", "mlp.c_fc.{p}": "mlp.up.{p}",
                                                 "mlp.c_proj.{p}": "mlp.down.{p}"}))
GPT2_ALIASES = tuple((p, "transformer." + p) for p in ("wte.", "wpe.", "h.", "ln_f."))
GPT2_BUFFERS = (r"transformer\.h\.\d+\.attn\.(masked_)?bias",)


def gpt2_config(multi_query: bool = False) -> dict[str, Any]:
    return dict(
        vocab_size=Key("vocab_size"), dim=Key("n_embd"), n_layers=Key("n_layer"), n_heads=Key("n_head"),
        n_kv_heads=Derived(lambda got: 1 if multi_query else got["n_heads"]),
        head_dim=Derived(lambda got: got["dim"] // got["n_heads"]), hidden_dim=Key("n_inner", lambda got: 4 * got["dim"]),
        max_positions=Key("n_positions", 1024), norm="layer", norm_eps=Key("layer_norm_epsilon", 1e-5),
        positions="learned", mlp="plain",
        activation=act_key("activation_function", "gelu_pytorch_tanh" if multi_query else "gelu_new"),
        qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=Key("tie_word_embeddings", True),
    )


def gpt2_extra(config: ModelConfig, base: dict, out: dict) -> None:
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
                "num_key_value_heads"):
        out.pop(key, None)  # aliases some writers add; the GPT-2 names are the ones read
    if out["model_type"] == "gpt_bigcode":
        out["multi_query"] = config.n_kv_heads[0] == 1


GPT2_REFUSE = ((lambda hf: hf.get("scale_attn_by_inverse_layer_idx", False), "GPT-2 with scale_attn_by_inverse_layer_idx=true"),
               (lambda hf: not hf.get("scale_attn_weights", True), "GPT-2 with scale_attn_weights=false"))
GPT2 = Family(
    name="gpt2", architectures=("GPT2LMHeadModel",), model_type="gpt2", tensors=GPT2_RULES, config=gpt2_config(),
    rope=None, fused=(Fused("transformer.h.{i}.attn.c_attn.{p}", ("attention.wq", "attention.wk", "attention.wv")),),
    conv1d=True, aliases=GPT2_ALIASES, ignore=GPT2_BUFFERS, refuse=GPT2_REFUSE, write_extra=gpt2_extra,
)


class BigCodeFamily(Family):
    """GPT-2 with multi-query attention: c_attn is [Q | K | V] when multi_query, per head otherwise."""

    def to_config(self, hf: dict) -> ModelConfig:
        config = super().to_config(hf)
        return replace(config, n_kv_heads=[1 if hf.get("multi_query", True) else config.n_heads] * config.n_layers)


BIGCODE = BigCodeFamily(
    name="gpt_bigcode", architectures=("GPTBigCodeForCausalLM",), model_type="gpt_bigcode", tensors=GPT2_RULES,
    config=gpt2_config(multi_query=True), rope=None,
    fused=(Fused("transformer.h.{i}.attn.c_attn.{p}", ("attention.wq", "attention.wk", "attention.wv"),
                 lambda c: "blocks" if c.n_kv_heads[0] == 1 else "per_head"),),
    aliases=GPT2_ALIASES, ignore=GPT2_BUFFERS, refuse=GPT2_REFUSE, write_extra=gpt2_extra,
)

# --------------------------------------------------------------------------------------------- GPT-NeoX, OPT

NEOX = Family(
    name="gpt_neox", architectures=("GPTNeoXForCausalLM",), model_type="gpt_neox", rope=Rope(style="neox", partial=0.25),
    tensors=(("gpt_neox.embed_in.weight", "tok_embeddings.weight"), ("gpt_neox.final_layer_norm.{p}", "norm.{p}"),
             ("embed_out.weight", "output.weight"), *layer_rules("gpt_neox.layers.{i}", {
                 "input_layernorm.{p}": "attention_norm.{p}", "post_attention_layernorm.{p}": "mlp_norm.{p}",
                 "attention.dense.{p}": "attention.wo.{p}", "mlp.dense_h_to_4h.{p}": "mlp.up.{p}",
                 "mlp.dense_4h_to_h.{p}": "mlp.down.{p}"})),
    fused=(Fused("gpt_neox.layers.{i}.attention.query_key_value.{p}", ("attention.wq", "attention.wk", "attention.wv"),
                 "per_head"),),
    config=dict(vocab_size=Key("vocab_size"), dim=Key("hidden_size"), n_layers=Key("num_hidden_layers"),
                n_heads=Key("num_attention_heads"), n_kv_heads=Derived(lambda got: got["n_heads"]),
                head_dim=Derived(lambda got: got["dim"] // got["n_heads"]), hidden_dim=Key("intermediate_size"),
                max_positions=Key("max_position_embeddings", 2048), norm="layer", norm_eps=Key("layer_norm_eps", 1e-5),
                positions="rope", mlp="plain", activation=act_key("hidden_act", "gelu"),
                block=Key("use_parallel_residual", "parallel", read=lambda on: "parallel" if on else "sequential",
                          write=lambda v, base: v == "parallel"),
                qkv_bias=Key("attention_bias", True), out_bias=Key("attention_bias", True), mlp_bias=True,
                tie_embeddings=Key("tie_word_embeddings", False)),
    aliases=(("lm_head.", "embed_out."),),  # transformers 5 names the head lm_head
    ignore=(r"gpt_neox\.layers\.\d+\.attention\.(masked_bias|bias|rotary_emb\.inv_freq)",),
)

OPT = Family(
    name="opt", architectures=("OPTForCausalLM",), model_type="opt", rope=None,
    tensors=(("model.decoder.embed_tokens.weight", "tok_embeddings.weight"),
             ("model.decoder.embed_positions.weight", "pos_embeddings.weight"),
             ("model.decoder.final_layer_norm.{p}", "norm.{p}"), ("lm_head.weight", "output.weight"),
             *layer_rules("model.decoder.layers.{i}", {
                 "self_attn.q_proj.{p}": "attention.wq.{p}", "self_attn.k_proj.{p}": "attention.wk.{p}",
                 "self_attn.v_proj.{p}": "attention.wv.{p}", "self_attn.out_proj.{p}": "attention.wo.{p}",
                 "self_attn_layer_norm.{p}": "attention_norm.{p}", "final_layer_norm.{p}": "mlp_norm.{p}",
                 "fc1.{p}": "mlp.up.{p}", "fc2.{p}": "mlp.down.{p}"})),
    config=dict(vocab_size=Key("vocab_size"), dim=Key("hidden_size"), n_layers=Key("num_hidden_layers"),
                n_heads=Key("num_attention_heads"), n_kv_heads=Derived(lambda got: got["n_heads"]),
                head_dim=Derived(lambda got: got["dim"] // got["n_heads"]), hidden_dim=Key("ffn_dim"),
                max_positions=Key("max_position_embeddings", 2048), norm="layer", norm_eps=1e-5, positions="learned",
                position_offset=2, mlp="plain", activation=act_key("activation_function", "relu"),
                qkv_bias=Key("enable_bias", True), out_bias=Key("enable_bias", True), mlp_bias=Key("enable_bias", True),
                tie_embeddings=Key("tie_word_embeddings", True)),
    aliases=(("decoder.", "model.decoder."),),
    write_extra=lambda config, base, out: out.update(word_embed_proj_dim=config.dim, do_layer_norm_before=True),
    refuse=((lambda hf: not hf.get("do_layer_norm_before", True), "OPT with do_layer_norm_before=false (post-norm, opt-350m)"),
            (lambda hf: hf.get("word_embed_proj_dim", hf["hidden_size"]) != hf["hidden_size"],
             "OPT with word_embed_proj_dim != hidden_size"),
            (lambda hf: hf.get("_remove_final_layer_norm", False) or not hf.get("layer_norm_elementwise_affine", True),
             "OPT without an affine final layer norm")),
)

# ------------------------------------------------------------------------- Nemotron-NAS (DeciLM) per layer

def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def ffn_mult_to_hidden(ffn_mult: float, dim: int) -> int:
    """DeciLM's rule for the MLP width of a block (as vLLM, TensorRT-LLM and llama.cpp apply it)."""
    return find_multiple(int(2 * ffn_mult * dim / 3), 256)


class DeciLMFamily(Family):
    """Llama with a KV-head count per layer, in `block_configs` (`attention.n_heads_in_group`)."""

    def to_config(self, hf: dict) -> ModelConfig:
        blocks = hf.get("block_configs")
        if not isinstance(blocks, list) or len(blocks) != hf["num_hidden_layers"]:
            raise GQAError("DeciLM config needs block_configs with one entry per layer")
        n_heads, dim = hf["num_attention_heads"], hf["hidden_size"]
        n_kv, widths = [], set()
        for i, block in enumerate(blocks):
            attn, ffn = block.get("attention", {}), block.get("ffn", {})
            if any(part.get(flag) for part in (attn, ffn) for flag in ("no_op", "replace_with_linear", "sparsify")) \
                    or attn.get("window_length"):
                raise GQAError(f"DeciLM block {i}: no-op, linear-replacement, windowed or sparse blocks are not supported")
            group = attn.get("n_heads_in_group")
            if not group or n_heads % group:
                raise GQAError(f"DeciLM block {i}: n_heads_in_group {group} does not divide {n_heads} heads")
            n_kv.append(n_heads // group)
            widths.add(ffn_mult_to_hidden(ffn["ffn_mult"], dim))
        if len(widths) != 1:
            raise GQAError("DeciLM checkpoints whose MLP width varies by layer are not supported")
        return replace(LLAMA.to_config(dict(hf, num_key_value_heads=n_heads, intermediate_size=widths.pop())),
                       n_kv_heads=n_kv)

    def to_hf_config(self, config: ModelConfig, base: dict) -> dict:
        if self.why_not(config):
            raise GQAError(f"DeciLM block_configs cannot hold this model: {self.why_not(config)}")
        ffn_mult = config.hidden_dim * 3 / (2 * config.dim)
        out = LLAMA.to_hf_config(replace(config, n_kv_heads=[config.n_heads] * config.n_layers), base)
        for key in ("num_key_value_heads", "intermediate_size", "auto_map"):  # auto_map names remote code not ours
            out.pop(key, None)
        out.update(architectures=["DeciLMForCausalLM"], model_type="nemotron-nas", auto_map=DECILM_AUTO_MAP, block_configs=[
            {"attention": {"n_heads_in_group": config.n_heads // g, "no_op": False, "replace_with_linear": False},
             "ffn": {"ffn_mult": ffn_mult, "no_op": False, "replace_with_linear": False}}
            for g in config.n_kv_heads])
        return out

    def can_express(self, config: ModelConfig) -> bool:
        return self.why_not(config) is None

    def why_not(self, config: ModelConfig) -> str | None:
        """Why block_configs cannot hold this model (None when they can)."""
        ffn_mult = config.hidden_dim * 3 / (2 * config.dim)
        checks = [
            ((config.norm, config.positions, config.mlp, config.block, config.rope_style, config.qk_norm,
              config.norm_weight_offset, config.embedding_multiplier, config.output_bias) ==
             ("rms", "rope", "gated", "sequential", "half", None, 0.0, 1.0, False),
             "it is not a Llama-style model (RMSNorm, rotary, gated MLP, pre-norm blocks, no q/k norms)"),
            (config.qkv_bias == config.out_bias, "its q/k/v biases come without an output bias"),
            (config.sliding_window is None, "it uses a sliding window"),
            (config.rotary_dim == config.head_dim, "it rotates only part of each head"),
            (ffn_mult_to_hidden(ffn_mult, config.dim) == config.hidden_dim,
             f"its MLP width {config.hidden_dim} is not a multiple of 256"),
        ]
        return next((reason for ok, reason in checks if not ok), None)


# neither transformers nor vLLM ships a config class for nemotron-nas (nor transformers a model): gqa's own
DECILM_AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig",
                   "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
DECILM = DeciLMFamily(name="decilm", architectures=("DeciLMForCausalLM",), model_type="nemotron-nas",
                      tensors=LLAMA_RULES, config={}, ignore=LLAMA_BUFFERS,
                      remote_code=("configuration_decilm.py", "modeling_decilm.py"))

# ------------------------------------------------------------------------------------------------ index

FAMILIES: list[Family] = [LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA, PHI, PHI3, OLMO2, STABLELM, GPTJ, FALCON, GPT2, NEOX,
                          OPT, BIGCODE, DECILM]
BY_ARCHITECTURE = {arch: fam for fam in FAMILIES for arch in fam.architectures}
PER_LAYER = {"llama": DECILM, "mistral": DECILM, "qwen2": DECILM}  # where per-layer KV heads go, by source family
MQA_FORM = {"gpt2": BIGCODE}  # where a model of G = 1 goes when its source family has no KV-head count


def family_for(hf: dict, where: str) -> Family:
    archs = hf.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise GQAError(f"{where}: config.json's \"architectures\" must be a list of class names, "
                       f"like [\"LlamaForCausalLM\"]; got {json.dumps(archs)}")
    for arch in archs:
        if arch in BY_ARCHITECTURE:
            return BY_ARCHITECTURE[arch]
    for fam in FAMILIES:  # configs written without `architectures` still carry model_type
        if not archs and hf.get("model_type") == fam.model_type:
            return fam
    found = ", ".join(archs) or hf.get("model_type") or "none named"
    supported = ", ".join(sorted(BY_ARCHITECTURE) + ["GQAForCausalLM (gqa's own format)"])
    raise GQAError(f"{where}: architecture {found} is not supported; supported: {supported}")
