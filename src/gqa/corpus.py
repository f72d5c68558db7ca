"""Bundled corpora, usable by name wherever a data source is asked for (filled in with the demo)."""

from __future__ import annotations

from .errors import GQAError

NAMES: tuple[str, ...] = ()


def documents(name: str) -> list[str]:
    raise GQAError(f"no bundled corpus named {name!r}")
