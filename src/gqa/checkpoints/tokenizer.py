"""The tokenizer that travels with a model folder, read with transformers (local files only)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import GQAError
from .files import model_dir

TOKENIZER_MARKERS = ("tokenizer.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: str | os.PathLike):
    path = model_dir(path)
    if not any((path / name).is_file() for name in TOKENIZER_MARKERS):
        raise GQAError(f"{path} has no tokenizer files (tokenizer.json, vocab.json + merges.txt or tokenizer.model)")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception:
        # gqa's own folders carry a config.json transformers does not know; the tokenizer files are standard
        if not (Path(path) / "tokenizer.json").is_file():
            raise GQAError(f"cannot read the tokenizer in {path}") from None
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    tokenizer.model_max_length = 1 << 60  # we window long texts ourselves; silence the length warning
    return tokenizer
