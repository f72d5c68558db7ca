"""The tokenizer that travels with a model folder, read with transformers (local files only)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import GQAError, warn
from .files import model_dir, read_config

TOKENIZER_MARKERS = ("tokenizer.json", "vocab.json", "tokenizer.model")


def warn_without_tokenizer(src) -> None:
    """A conversion's source without tokenizer files converts, but its output cannot be read as text: say so."""
    if not any((Path(src) / name).is_file() for name in TOKENIZER_MARKERS):
        warn(f"{src} has no tokenizer files ({', '.join(TOKENIZER_MARKERS)}); the converted model cannot be "
             f"evaluated or generated from until they are copied next to it")


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
    return with_model_eos(tokenizer, path)


def model_eos(path: Path) -> list[int]:
    """The end-of-sequence ids config.json gives the model, wherever its format keeps them ([] if none)."""
    try:
        hf = read_config(path)
    except GQAError:
        return []
    for fields in (hf, hf.get("gqa_config"), hf.get("hf_config")):
        eos = fields.get("eos_token_id") if isinstance(fields, dict) else None
        ids = eos if isinstance(eos, list) else [eos]
        if ids and all(isinstance(i, int) for i in ids):
            return ids
    return []


warned_eos: set[str] = set()


def with_model_eos(tokenizer, path: Path):
    """The tokenizer of an encoder–decoder, ending sequences as the model does: every input and target ends
    with eos, so where config.json's eos_token_id differs from the tokenizer's, gqa scores, trains and stops
    generating with config.json's (the id the model was trained to end with), and says so once per folder.
    (A decoder-only model reads eos only between documents; its tokenizer's is kept.)"""
    from .seq2seq import is_seq2seq

    ids = model_eos(path)
    if not ids or tokenizer.eos_token_id in ids or not is_seq2seq(read_config(path)):
        return tokenizer
    usable = 0 <= ids[0] < len(tokenizer)
    if str(path) not in warned_eos:
        warned_eos.add(str(path))
        used = f"gqa uses {ids[0]} (what the model ends sequences with)" if usable else \
            f"that is not a token of the tokenizer, so gqa uses {tokenizer.eos_token_id}"
        warn(f"{path}: its tokenizer ends sequences with token id {tokenizer.eos_token_id}, but config.json's "
             f"eos_token_id is {ids[0]}; {used}: correct whichever is wrong")
    if usable:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(ids[0])
    return tokenizer


# text that exercises what tokenizers differ in: case, digits, accents, other scripts, emoji, code, spacing
PROBE = "The Quick brown fox, 1234 naïve Ünïcödé; 東京 😀 def f(x):\n\treturn x**2  # done.\n\n"
SPECIAL = ("bos", "eos", "pad", "unk")


def tokenizer_difference(a, b) -> str | None:
    """How tokenizer `b` reads text differently from `a` (None when they agree): the vocabulary itself, the
    special ids, and the ids a probe text encodes to (which also covers merges and normalisation)."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        tokens = va.keys() | vb.keys()
        differing = sum(1 for tok in tokens if va.get(tok) != vb.get(tok))
        return f"its vocabulary differs in {differing:,} of {len(tokens):,} entries"
    for name in SPECIAL:
        ia, ib = getattr(a, f"{name}_token_id"), getattr(b, f"{name}_token_id")
        if ia != ib:
            return f"its {name} token id is {ib}, not {ia}"
    if a(PROBE)["input_ids"] != b(PROBE)["input_ids"]:
        return "it encodes the same text into other ids (other merges or normalisation)"
    return None


def check_same_tokenizer(model: str | os.PathLike, other: str | os.PathLike, role: str) -> None:
    """Refuse a reference or teacher whose tokenizer is not the model's: their predictions are over different
    tokens, so agreement, KL and distillation between them measure nothing (a matching vocabulary size does
    not make two tokenizers the same). An `other` without tokenizer files cannot be checked, so it is refused."""
    if not any((Path(other) / name).is_file() for name in TOKENIZER_MARKERS):
        raise GQAError(f"the {role} {other} has no tokenizer files, so gqa cannot check that it reads text as {model} "
                       f"does; copy its tokenizer files next to its weights")
    why = tokenizer_difference(load_tokenizer(model), load_tokenizer(other))
    if why:
        raise GQAError(f"the {role} {other} does not share the tokenizer of {model}: {why}; comparing or distilling "
                       f"predictions needs the same tokenizer")
