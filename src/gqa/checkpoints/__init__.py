"""The edges of the house: Hugging Face folders in, Hugging Face (or gqa's own) folders out.

`load` reads config.json + safetensors (single file or shards) of any supported family into one
`Transformer`; `save` writes a model back as the same HF architecture when that architecture can hold its
KV-head layout, as GPT-BigCode for a GPT-2 model with one KV head, and otherwise in gqa's own format
(architecture `GQAForCausalLM`: our config and our tensor names), which `load` reads too.
"""

from __future__ import annotations

import collections
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import GQAError
from ..model import ModelConfig, Transformer
from . import files
from .families import BIGCODE, BY_ARCHITECTURE, GPT2, Family, family_for

NATIVE_ARCHITECTURE = "GQAForCausalLM"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise GQAError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def is_native(hf: dict) -> bool:
    return NATIVE_ARCHITECTURE in (hf.get("architectures") or [])


def read_model_config(path: str | os.PathLike) -> tuple[ModelConfig, Family | None, dict]:
    """(ModelConfig, family or None for gqa's own format, raw config.json) of a model folder."""
    hf = files.read_config(path)
    try:
        if is_native(hf):
            return ModelConfig.from_dict(hf["gqa_config"]), None, hf
        family = family_for(hf, str(path))
        return family.to_config(hf), family, hf
    except KeyError as e:
        raise GQAError(f"{Path(path) / 'config.json'} lacks the field {e.args[0]!r}") from None
    except TypeError as e:
        raise GQAError(f"{Path(path) / 'config.json'} has an invalid field: {e}") from None


def import_tensors(path, config: ModelConfig, family: Family | None) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, tensor in files.iter_tensors(path):
        state.update(family.import_tensor(name, tensor, config) if family else {name: tensor})
    return state


def load(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Transformer:
    """Load a model folder (any supported HF family, or gqa's own format) as a `gqa` Transformer.

    dtype: None keeps the checkpoint's dtype; otherwise "float32", "bfloat16", "float16" or a torch dtype.
    """
    dtype = parse_dtype(dtype)
    config, family, hf = read_model_config(path)
    with torch.device("meta"):
        model = Transformer(config)
    state = import_tensors(path, config, family)
    if config.tie_embeddings and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"misses {missing[:3]}" if missing else f"has unexpected {unexpected[:3]}"
        raise GQAError(f"{path}: the checkpoint {what} for its config ({len(missing)} missing, {len(unexpected)} unexpected)")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise GQAError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the config implies {tuple(expected[name].shape)}"
            )
    dtype = dtype or state["tok_embeddings.weight"].dtype
    state = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    model.reset_rope()
    model.eval()
    model.hf_config = hf.get("hf_config") if family is None else hf
    model.source_dir = Path(path)
    return model


def target_family(model: Transformer, format: str = "auto") -> Family | None:
    """The HF family `save` writes for this model, or None for gqa's own format."""
    if format not in ("auto", "hf", "native"):
        raise GQAError(f"unknown format {format!r}; choose auto, hf or native")
    if format == "native":
        return None
    source = None
    if model.hf_config:
        source = next((BY_ARCHITECTURE[a] for a in model.hf_config.get("architectures") or [] if a in BY_ARCHITECTURE), None)
    candidates = [source] if source else []
    if source is GPT2:
        candidates.append(BIGCODE)  # GPT-2 with one KV head is GPT-BigCode
    for family in candidates:
        if family.can_express(model.config):
            return family
    if format == "hf":
        name = source.name if source else "no HF family"
        raise GQAError(f"{name} cannot express KV heads {model.config.n_kv_heads}; save with format='native'")
    return None


def save(
    model: Transformer,
    dest: str | os.PathLike,
    format: str = "auto",
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
    shard_bytes: int = files.SHARD_BYTES,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write `model` to folder `dest` atomically; returns the path. Tokenizer files travel with it."""
    dtype = parse_dtype(dtype) or model.dtype
    family = target_family(model, format)
    state = {k: v.detach().to("cpu", dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    base = dict(model.hf_config or {})
    for key in ("_name_or_path", "torch_dtype", "dtype", "transformers_version"):
        base.pop(key, None)
    if family is None:
        state.pop("output.weight", None) if model.config.tie_embeddings else None
        config_json = {
            "architectures": [NATIVE_ARCHITECTURE],
            "model_type": "gqa",
            "gqa_version": __version__,
            "gqa_config": model.config.to_dict(),
            "hf_config": base or None,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }
    else:
        state = family.export_state(state, model.config)
        config_json = family.to_hf_config(model.config, base)
        config_json["torch_dtype"] = str(dtype).removeprefix("torch.")
    with files.atomic_dir(dest, overwrite=overwrite) as tmp:
        writer = files.ShardWriter(tmp, shard_bytes)
        for name, tensor in state.items():
            writer.add(name, tensor)
        writer.close()
        files.write_json(tmp / "config.json", config_json)
        files.copy_tokenizer(model.source_dir, tmp)
        for name, obj in (extra_files or {}).items():
            files.write_json(tmp / name, obj)
    return Path(dest)


SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What `gqa info` prints: architecture, heads per layer, parameters, KV bytes per token. Reads no weights."""
    config, family, hf = read_model_config(path)
    shapes = files.tensor_shapes(path)
    ignore = family.ignore if family else ()
    kept = {n: s for n, s in shapes.items() if not any(re.fullmatch(p, n) for p in ignore)}
    params = sum(math.prod(shape) for shape, _ in kept.values())
    dtypes = collections.Counter()
    for shape, dtype in kept.values():
        dtypes[dtype] += math.prod(shape)
    storage = dtypes.most_common(1)[0][0] if dtypes else "F32"
    element = SAFETENSORS_BYTES.get(storage, 4)
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
        "attention": attention_kind(config),
        "vocab_size": config.vocab_size,
        "max_positions": config.max_positions,
        "parameters": params,
        "dtype": storage,
        "kv_bytes_per_token": kv,
        "kv_bytes_per_token_if_mha": mha,
        "kv_reduction": mha / kv,
    }


def attention_kind(config: ModelConfig) -> str:
    kinds = set()
    for g in config.n_kv_heads:
        kinds.add("MHA" if g == config.n_heads else "MQA" if g == 1 else f"GQA-{g}")
    return "+".join(sorted(kinds)) if len(kinds) > 1 else kinds.pop()
