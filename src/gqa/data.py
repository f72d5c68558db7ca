"""Text sources -> documents -> tokens -> packed fixed-length blocks, with a validation split that never overlaps.

Sources: a text file (documents are its paragraphs), a folder of text files, JSON Lines with a `text`
field, a `datasets` dataset saved with `save_to_disk` (a `text` column), or a bundled corpus by name
(see `gqa.corpus`). Each document goes to validation or training by a hash of its text, so the split is
stable whatever the order, and a document repeated in the corpus lands on one side only. Each side is
tokenized with the model's tokenizer (an end-of-text token between documents), concatenated and cut into
non-overlapping blocks of seq_len + 1 tokens (inputs are the first seq_len, targets the last seq_len).
Training order is a fresh permutation of the blocks per epoch, drawn from the seed, so the sample at any
global index is known without replaying the run: resuming needs only the step.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import GQAError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}


def read_documents(source: str | os.PathLike) -> list[str]:
    """The documents of a data source (see the module docstring)."""
    from . import corpus

    name = str(source)
    if name in corpus.NAMES:
        return corpus.documents(name)
    path = Path(source)
    if not path.exists():
        known = ", ".join(corpus.NAMES)
        raise GQAError(f"no data at {path} (and it is not a bundled corpus: {known})")
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            docs = read_saved_dataset(path)
        else:
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                           and not p.name.startswith("."))
            docs = [d for f in files for d in paragraphs(read_text(f))]
    elif path.suffix.lower() in (".jsonl", ".json"):
        docs = read_jsonl(path)
    else:
        docs = paragraphs(read_text(path))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise GQAError(f"{path} holds no text")
    return docs


def check_source(source: str | os.PathLike) -> None:
    """What can be said of a data source without reading it: a bundled corpus, or a file or folder that exists."""
    from . import corpus

    if str(source) not in corpus.NAMES and not Path(source).exists():
        raise GQAError(f"no data at {source} (and it is not a bundled corpus: {', '.join(corpus.NAMES)})")


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GQAError(f"{path} is not UTF-8 text") from None


def paragraphs(text: str) -> list[str]:
    """Split a text into documents at blank lines (a file with none is one document per line)."""
    parts = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
    if len(parts) == 1:
        parts = [p.strip() for p in text.splitlines()]
    return [p for p in parts if p]


def jsonl_rows(path: Path):
    """(line number, parsed value) of each non-blank line of a JSON Lines file; a line that is not JSON is
    refused with its number."""
    for i, line in enumerate(read_text(path).splitlines()):
        if not line.strip():
            continue
        try:
            yield i + 1, json.loads(line)
        except json.JSONDecodeError:
            raise GQAError(f"{path}:{i + 1} is not valid JSON") from None


def read_jsonl(path: Path) -> list[str]:
    docs = []
    for i, row in jsonl_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise GQAError(f"{path}:{i} has no string field 'text'")
        docs.append(row["text"])
    return docs


def read_saved_dataset(path: Path) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise GQAError(f"{path} is a `datasets` folder; reading it needs: pip install datasets") from None
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        data = data["train"] if "train" in data else next(iter(data.values()))
    if "text" not in data.column_names:
        raise GQAError(f"{path} has no 'text' column (columns: {data.column_names})")
    return list(data["text"])


def is_validation(doc: str, val_fraction: float) -> bool:
    digest = hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def tokenize(docs: list[str], tokenizer) -> torch.Tensor:
    """All documents as one stream, an end-of-text token after each (where the tokenizer has one)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for start in range(0, len(docs), 1024):
        for row in tokenizer(docs[start : start + 1024], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            if eos is not None:
                ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def check_token_ids(tokens: torch.Tensor, vocab_size: int, source: str) -> None:
    """Refuse token ids the model has no embedding for: the tokenizer does not belong to the model."""
    if tokens.numel() and int(tokens.max()) >= vocab_size:
        raise GQAError(f"{source}: the tokenizer produced token id {int(tokens.max())}, but the model's vocabulary "
                       f"has {vocab_size} entries; use the tokenizer that belongs to the model")


def eval_tokens(source, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """What `gqa eval` scores a decoder on: a text file whole, or a bundled corpus's held-out documents (the
    split training never sees); `max_tokens`: the first max_tokens + 1 (a window's first token is context)."""
    from . import corpus

    if str(source) in corpus.NAMES:
        tokens = tokenize([d for d in corpus.documents(str(source)) if is_validation(d, 0.05)], tokenizer)
    else:
        if not Path(source).is_file():
            raise GQAError(f"no text file at {source}")
        text = read_text(Path(source))
        if not text.strip():
            raise GQAError(f"{source} is empty")
        tokens = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    return tokens[: max_tokens + 1] if max_tokens else tokens


def pack(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = stream.numel() // (seq_len + 1)
    return stream[: n * (seq_len + 1)].view(n, seq_len + 1)


@dataclass
class TokenData:
    train: torch.Tensor  # [blocks, seq_len + 1]
    val: torch.Tensor
    documents: int
    train_tokens: int
    val_tokens: int

    @property
    def seq_len(self) -> int:
        return self.train.shape[1] - 1


def prepare(source, tokenizer, seq_len: int, val_fraction: float = 0.05, length_option: str = "--seq-len") -> TokenData:
    """Read, split, tokenize and pack a source (see the module docstring); `length_option` is the name of the
    option that set seq_len, for the message when the text is too short."""
    if not 0 < val_fraction < 1:
        raise GQAError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    docs = read_documents(source)
    val_docs = [d for d in docs if is_validation(d, val_fraction)]
    train_docs = [d for d in docs if not is_validation(d, val_fraction)]
    train_stream, val_stream = tokenize(train_docs, tokenizer), tokenize(val_docs, tokenizer)
    if val_stream.numel() < seq_len + 1:
        # too few documents for a hash split to give validation a block: hold out the stream's tail instead
        stream = tokenize(docs, tokenizer)
        cut = stream.numel() - max(seq_len + 1, int(stream.numel() * val_fraction))
        train_stream, val_stream = stream[:cut], stream[cut:]
    train, val = pack(train_stream, seq_len), pack(val_stream, seq_len)
    if len(train) == 0 or len(val) == 0:
        raise GQAError(
            f"{source} has {train_stream.numel() + val_stream.numel()} tokens: too little for training and "
            f"validation blocks of {seq_len + 1} tokens; give more text or a smaller {length_option}"
        )
    return TokenData(train, val, len(docs), train_stream.numel(), val_stream.numel())


class BlockOrder:
    """Which training block is the i-th sample: epoch-wise permutations drawn from the seed."""

    def __init__(self, n_blocks: int, seed: int):
        self.n_blocks, self.seed = n_blocks, seed
        self._epoch, self._perm = -1, None

    def __getitem__(self, index: int) -> int:
        epoch, position = divmod(index, self.n_blocks)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n_blocks, generator=generator)
        return int(self._perm[position])

    def batch(self, blocks: torch.Tensor, start: int, size: int) -> torch.Tensor:
        return blocks[[self[i] for i in range(start, start + size)]]
