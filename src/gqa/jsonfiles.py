"""JSON out of gqa: strict (no bare NaN or Infinity, which are not JSON) and written atomically.

A non-finite float (a diverged loss, a perplexity that overflowed) becomes null: the file stays readable by
every JSON parser, and the field says "no number" rather than a number that is not one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def finite(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (recursively through dicts, lists and tuples)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = None) -> str:
    return json.dumps(finite(obj), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Indented, strict JSON; written to a temporary name and renamed, so a reader never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)  # unique: writers may race
    try:
        with os.fdopen(fd, "w") as f:
            f.write(dumps(obj, indent=2) + "\n")
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    with open(path, "a") as f:
        f.write(dumps(record) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())
