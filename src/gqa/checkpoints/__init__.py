"""The edges of the house: Hugging Face folders in, Hugging Face (or gqa's own) folders out.

`load` reads config.json + safetensors (single file or shards) of any supported family into one
`Transformer`; `save` writes a model back as the same HF architecture when that architecture can hold its
KV-head layout, as GPT-BigCode for a GPT-2 model with one KV head, and otherwise in gqa's own format
(architecture `GQAForCausalLM`: our config and our tensor names), which `load` reads too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import GQAError
from ..model import ModelConfig, Transformer
from ..seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from ..version import __version__
from . import files
from .families import BY_ARCHITECTURE, MQA_FORM, PER_LAYER, Family, family_for, stack_heads
from .seq2seq import NATIVE_SEQ2SEQ, is_seq2seq, read_seq2seq_config
from .seq2seq import target_family as target_seq2seq_family

NATIVE_ARCHITECTURE = "GQAForCausalLM"
# the two model shapes, by config class: the model built from it, and gqa's own format's names for it
SHAPES = {ModelConfig: (Transformer, NATIVE_ARCHITECTURE, "gqa"),
          Seq2SeqConfig: (Seq2SeqTransformer, NATIVE_SEQ2SEQ, "gqa-seq2seq")}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise GQAError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def architecture_name(config, family) -> str:
    """What a folder of this model written as `family` (None: gqa's own format) calls its architecture."""
    return family.architectures[0] if family is not None else SHAPES[type(config)][1]


def is_native(hf: dict) -> bool:
    return NATIVE_ARCHITECTURE in (hf.get("architectures") or [])


def read_model_config(path: str | os.PathLike, hf: dict | None = None) -> tuple[ModelConfig, Family | None, dict]:
    """(ModelConfig, family or None for gqa's own format, raw config.json) of a decoder-only model folder
    (`hf`: its config.json where the caller has read it)."""
    hf = files.read_config(path) if hf is None else hf
    if is_seq2seq(hf):
        raise GQAError(f"{path} is an encoder–decoder model ({(hf.get('architectures') or [hf.get('model_type')])[0]});"
                       f" this needs a decoder-only model")
    try:
        if is_native(hf):
            return ModelConfig.from_dict(hf["gqa_config"]), None, hf
        family = family_for(hf, str(path))
        return family.to_config(hf), family, hf
    except KeyError as e:
        raise GQAError(f"{Path(path) / 'config.json'} lacks the field {e.args[0]!r}") from None
    except TypeError as e:
        raise GQAError(f"{Path(path) / 'config.json'} has an invalid field: {e}") from None


def checked_config(path: str | os.PathLike):
    """A folder's config, checked against its weights' headers (no weight is read): a `ModelConfig`, or for an
    encoder–decoder a `Seq2SeqConfig` (both have the vocab_size and max_positions that checks read)."""
    return read_checked(path)[0]


def read_checked(path: str | os.PathLike) -> tuple[Any, Family | None, dict]:
    """(config, family or None for gqa's own format, raw config.json) of a model folder of either shape, its
    tensors checked against the config from the safetensors headers alone (`check_layout`)."""
    hf = files.read_config(path)
    config, family = read_seq2seq_config(path, hf) if is_seq2seq(hf) else read_model_config(path, hf)[:2]
    check_layout(path, config, family)
    return config, family, hf


def check_reference(model: str | os.PathLike, config: ModelConfig, reference: str | os.PathLike, role: str,
                    seq_len: int | None = None) -> None:
    """A reference (`gqa eval --reference`) or teacher (`--teacher`) of the model folder `model` must predict
    over the same tokens (vocabulary and tokenizer) and read windows of `seq_len` tokens. Reads no weights."""
    from .tokenizer import check_same_tokenizer

    ref = checked_config(reference)
    if type(ref) is not type(config):
        kind = "an encoder–decoder" if type(ref).__name__.startswith("Seq2Seq") else "a decoder-only"
        raise GQAError(f"the {role} {reference} is {kind} model and {model} is not")
    if ref.vocab_size != config.vocab_size:
        raise GQAError(f"the {role} {reference} has a vocabulary of {ref.vocab_size:,} entries, {model} one of "
                       f"{config.vocab_size:,}: they do not share a tokenizer")
    if seq_len is not None and seq_len > ref.max_positions:
        raise GQAError(f"windows of {seq_len} tokens (--seq-len) exceed the {role}'s {ref.max_positions} positions; "
                       f"pass --seq-len {ref.max_positions} or less")
    check_same_tokenizer(model, reference, role)


def export_tensors(state: dict[str, torch.Tensor], config: ModelConfig, family: Family | None) -> dict[str, torch.Tensor]:
    """gqa tensors -> the tensors of `family`'s files (gqa's own names when None); tied heads are not stored."""
    if family is not None:
        return family.export_state(state, config)
    return {k: v for k, v in state.items() if not (k == "output.weight" and config.tie_embeddings)}


def import_tensors(path, config, family) -> dict[str, torch.Tensor]:
    """A folder's tensors under gqa's names (per-head pieces joined, a tied head set to the embeddings),
    checked finite; its layout is `check_layout`'s to check first."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in files.iter_tensors(path):
        files.check_finite(path, name, tensor)
        state.update(family.import_tensor(name, tensor, config) if family else {name: tensor})
    state = stack_heads(state)
    if config.tie_embeddings and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every gqa tensor a model with this config holds, and its shape (from a model built on the meta device)."""
    with torch.device("meta"):
        model = SHAPES[type(config)][0](config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_layout(path, config, family, shapes: dict | None = None) -> None:
    """Check a folder's tensors against its config from the safetensors headers alone (`shapes`: as
    `files.tensor_shapes` read them), before any weight is read: every tensor the config implies is there,
    with the shape it implies, and nothing else is."""
    expected = expected_shapes(config)
    found: dict[str, tuple[int, ...]] = {}
    origin: dict[str, tuple[str, tuple, int]] = {}  # gqa name -> (the file's tensor, its shape, parts it gave)
    for name, (shape, _) in (shapes or files.tensor_shapes(path)).items():
        placeholder = torch.empty(shape, device="meta")
        try:
            imported = family.import_tensor(name, placeholder, config) if family else {name: placeholder}
        except RuntimeError as e:  # a fused tensor that cannot be split the way the config says
            raise GQAError(f"{path}: tensor {name} of shape {tuple(shape)} does not fit config.json "
                           f"({files.one_line(e)})") from None
        found.update({k: tuple(v.shape) for k, v in imported.items()})
        origin.update({k.split("#")[0]: (name, tuple(shape), len(imported)) for k in imported})
    found.update(stack_shapes(found))
    if config.tie_embeddings and "tok_embeddings.weight" in found:
        found.setdefault("output.weight", found["tok_embeddings.weight"])
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:  # named as the files name them
        what = f"misses {[family.file_name(n, config) if family else n for n in missing[:3]]}" if missing else \
            f"has unexpected {[origin[n][0] if n in origin else n for n in unexpected[:3]]}"
        raise GQAError(f"{path}: the checkpoint {what} for its config ({len(missing)} missing, {len(unexpected)} unexpected)")
    for name, shape in found.items():
        if shape != expected[name]:
            raise GQAError(shape_error(path, origin.get(name, (name, shape, 1)), name, shape, expected[name]))


def shape_error(path, origin: tuple[str, tuple, int], name: str, shape: tuple, expected: tuple) -> str:
    """A tensor whose shape config.json does not imply, named and shaped as the file holds it (a fused tensor
    by the part of it that disagrees; a transposed one, GPT-2's Conv1D, in its own layout)."""
    file_name, file_shape, parts = origin
    if parts > 1:
        part = name.removesuffix(".weight").removesuffix(".bias").rsplit(".", 1)[-1]
        return (f"{path}: tensor {file_name} of shape {file_shape} does not fit config.json: its {part} part has shape "
                f"{shape}, where config.json implies {expected}")
    if file_shape != shape and file_shape == shape[::-1]:
        expected = expected[::-1]
    return f"{path}: tensor {file_name} has shape {file_shape}, but config.json implies {expected}"


def stack_shapes(found: dict[str, tuple]) -> dict[str, tuple]:
    """Shapes of per-head pieces (`name#h`, see `stack_heads`) joined: [heads · D]."""
    pieces = [k for k in found if "#" in k]
    joined = {}
    for name in {k.split("#")[0] for k in pieces}:
        parts = [found.pop(k) for k in pieces if k.split("#")[0] == name]
        joined[name] = (sum(p[0] for p in parts),)
    return joined


def load(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    kv_cache_dtype: str | None = None,
    kv_rotation: bool = True,
) -> Transformer:
    """Load a model folder (any supported HF family, or gqa's own format) as a `gqa` Transformer (an
    encoder–decoder folder as a `gqa.seq2seq.Seq2SeqTransformer`).

    dtype: None keeps the checkpoint's dtype; otherwise "float32", "bfloat16", "float16" or a torch dtype.
    kv_cache_dtype: what its KV cache stores ("q8_0", "q4_0", "fp8_e4m3", ...: `Transformer.set_kv_cache_dtype`).
    """
    dtype = parse_dtype(dtype)
    config, family, hf = read_checked(path)
    state = import_tensors(path, config, family)
    model = model_from_state(config, state, dtype, device)
    model.hf_config = hf.get("hf_config") if family is None else hf
    model.source_dir = Path(path)
    if kv_cache_dtype is not None:
        model.set_kv_cache_dtype(kv_cache_dtype, kv_rotation)
    return model


def model_from_state(config, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None, device=None):
    """The model over gqa tensors (built on the meta device, the tensors assigned, the head tied), in eval mode;
    dtype None: the embeddings'."""
    with torch.device("meta"):
        model = SHAPES[type(config)][0](config)
    dtype = dtype or state["tok_embeddings.weight"].dtype
    state = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    model.reset_rope()
    return model.eval()


def target_family(config, hf_config: dict | None, format: str = "auto"):
    """The HF family a model with this config is written as, or None for gqa's own format (an encoder–decoder:
    `seq2seq.target_family`).

    The source's own architecture when its config.json can hold the model (KV-head layout included);
    otherwise the family's form for what it cannot hold (GPT-2 with one KV head is GPT-BigCode; a Llama-style
    model with per-layer KV heads is Nemotron-NAS block_configs) where that can.
    """
    if format not in ("auto", "hf", "native"):
        raise GQAError(f"unknown format {format!r}; choose auto, hf or native")
    if isinstance(config, Seq2SeqConfig):
        return target_seq2seq_family(config, hf_config, format)
    if format == "native":
        return None
    source = None
    if hf_config:
        archs = hf_config.get("architectures") or []
        source = next((BY_ARCHITECTURE[a] for a in archs if a in BY_ARCHITECTURE), None)
    candidates = [source] if source else []
    if source is not None:
        candidates += [f for f in (MQA_FORM.get(source.name), PER_LAYER.get(source.name)) if f is not None]
    for family in candidates:
        if family.can_express(config):
            return family
    if format == "hf":
        name = source.name if source else "no HF family"
        per_layer = PER_LAYER.get(source.name) if source else None
        hint = ""
        if per_layer is not None:
            hint = (f" in one KV-head count; the HF form of per-layer KV heads, DeciLMForCausalLM block_configs, "
                    f"cannot hold this model either: {per_layer.why_not(config)}")
        raise GQAError(f"{name} cannot express KV heads {config.n_kv_heads}{hint}; "
                       f"write gqa's own format instead (--format native)")
    return None


def config_json(config, hf_config: dict | None, family, dtype: torch.dtype) -> dict:
    """The config.json of a folder written as `family` (None: gqa's own format), checked: what a reader of it
    builds is this model."""
    base = {k: v for k, v in (hf_config or {}).items() if k not in ("_name_or_path", "torch_dtype", "dtype",
                                                                     "transformers_version")}
    dtype_name = str(dtype).removeprefix("torch.")
    if family is None:
        _, architecture, model_type = SHAPES[type(config)]
        return {"architectures": [architecture], "model_type": model_type, "gqa_version": __version__,
                "gqa_config": config.to_dict(), "hf_config": base or None, "torch_dtype": dtype_name}
    written = family.to_hf_config(config, base)
    if differ := family.read_back_differs(config, written):
        raise GQAError(f"{family.name}'s config.json cannot express this model ({', '.join(differ)} would read back "
                       f"differently); write gqa's own format (--format native)")
    return {**written, "torch_dtype": dtype_name}


def save(
    model: Transformer | Seq2SeqTransformer,
    dest: str | os.PathLike,
    format: str = "auto",
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
    shard_bytes: int = files.SHARD_BYTES,
    extra_files: dict[str, Any] | None = None,
    card: Callable[[Path], None] | None = None,
) -> Path:
    """Write `model` to folder `dest` atomically; returns the path. Tokenizer files travel with it. `card`, if
    given, writes the model card into the finished folder before it is renamed (`gqa.card.write_card`)."""
    family = target_family(model.config, model.hf_config, format)
    return save_state(model.state_dict(), model.config, model.hf_config, family,
                      dest, parse_dtype(dtype) or model.dtype, source_dir=model.source_dir, overwrite=overwrite,
                      shard_bytes=shard_bytes, extra_files=extra_files, card=card)


def save_state(state: dict[str, torch.Tensor], config, hf_config: dict | None, family, dest, dtype: torch.dtype, *,
               source_dir=None, overwrite: bool = False, shard_bytes: int = files.SHARD_BYTES,
               extra_files: dict[str, Any] | None = None, card: Callable[[Path], None] | None = None) -> Path:
    """Write gqa tensors as `family`'s folder (None: gqa's own format) in `dtype`, atomically: shards,
    config.json, the tokenizer from `source_dir`, the family's runtime code, `extra_files` (JSON) and the
    model card `card(folder)` writes."""
    state = {k: v.detach().to("cpu", dtype) if v.is_floating_point() else v for k, v in state.items()}
    tensors = export_tensors(state, config, family)
    config_file = config_json(config, hf_config, family, dtype)  # a config the family cannot hold stops here
    with files.atomic_dir(dest, overwrite=overwrite) as tmp:
        writer = files.ShardWriter(tmp, shard_bytes)
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.close()
        files.write_json(tmp / "config.json", config_file)
        files.copy_tokenizer(source_dir, tmp)
        files.write_remote_code(family, tmp)
        for name, obj in (extra_files or {}).items():
            files.write_json(tmp / name, obj)
        if card:
            card(tmp)
    return Path(dest)


def config_file(path: Path):
    """A model config for `gqa pretrain`: an HF config.json (the model is that architecture) or a gqa ModelConfig."""
    if not path.is_file():
        raise GQAError(f"no model config at {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GQAError(f"{path} is not valid JSON: {e}") from None
    try:
        if isinstance(raw, dict) and is_seq2seq(raw):
            return read_seq2seq_config(path, raw)[0], raw
        if "architectures" in raw or "model_type" in raw:
            return family_for(raw, str(path)).to_config(raw), raw
        return ModelConfig.from_dict(raw), None
    except (KeyError, TypeError) as e:
        raise GQAError(f"{path} is not a usable model config: {e}") from None
