"""Model folders on disk: config.json, safetensors weights (one file or shards), tokenizer files.

Weights are read with safetensors only: a pickle (`.bin`) can run code when it is loaded, so it is refused.
Writing goes to a temporary folder beside the destination that is renamed when complete, so an
interrupted write never leaves something that looks like a model.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import GQAError, warn
from ..jsonfiles import current_umask, write_json

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")
SHARD_BYTES = 4 * 1024**3


def model_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise GQAError(f"no model folder at {path}")
    if not path.is_dir():
        raise GQAError(f"{path} is a file; expected a model folder holding config.json and safetensors weights")
    return path


def read_config(path: str | os.PathLike) -> dict:
    path = model_dir(path)
    file = path / "config.json"
    if not file.is_file():
        raise GQAError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GQAError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise GQAError(f"{file} holds a JSON {type(config).__name__ if config is not None else 'null'}, "
                       f"not an object of config fields")
    return config


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a folder: model.safetensors, or the shards its index names."""
    path = model_dir(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise GQAError(f"{index} is not a valid safetensors index: {e}") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise GQAError(f"{path} is missing shards named in its index: {', '.join(missing)}")
        return files
    if single.is_file():
        return [single]
    others = sorted(path.glob("*.safetensors"))
    if len(others) == 1:
        return others
    pickles = [name for name in PICKLE_WEIGHTS if (path / name).exists()] or [p.name for p in path.glob("*.bin")]
    if pickles:
        raise GQAError(
            f"{path} holds weights only in pickle form ({pickles[0]}); gqa reads safetensors only, because "
            "loading a pickle can run arbitrary code: re-save it with save_pretrained(safe_serialization=True)"
        )
    raise GQAError(f"{path} has no model.safetensors or model.safetensors.index.json")


def iter_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a folder, one file open at a time."""
    for file in weight_files(path):
        yield from iter_file(file)


@contextlib.contextmanager
def open_weights(file: Path):
    """safe_open, with safetensors' own errors for truncated or corrupt files turned into one GQAError line."""
    try:
        with safe_open(str(file), framework="pt") as f:
            yield f
    except GQAError:
        raise
    except Exception as e:
        raise GQAError(f"cannot read {file}: truncated or corrupt safetensors file ({one_line(e)})") from None


def iter_file(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    with open_weights(file) as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def read_headers(path: str | os.PathLike) -> dict[str, tuple[list[int], str, Path]]:
    """Name -> (shape, dtype, the file that holds it) from the safetensors headers, without reading any weights."""
    headers = {}
    for file in weight_files(path):
        with open_weights(file) as f:
            for name in f.keys():
                s = f.get_slice(name)
                headers[name] = (list(s.get_shape()), s.get_dtype(), file)
    return headers


def tensor_index(path: str | os.PathLike, headers: dict | None = None) -> dict[str, Path]:
    """Name -> the file that holds it, from the headers alone."""
    return {name: file for name, (_, _, file) in (headers or read_headers(path)).items()}


def read_tensors(index: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    """Read `names`, opening each file once and closing it after, so its mapping does not stay resident."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(index[name], []).append(name)
    out = {}
    for file, wanted in by_file.items():
        with open_weights(file) as f:
            for name in wanted:
                out[name] = f.get_tensor(name)
    return out


def tensor_shapes(path: str | os.PathLike, headers: dict | None = None) -> dict[str, tuple[list[int], str]]:
    """Name -> (shape, dtype) from the safetensors headers, without reading any weights."""
    return {name: (shape, dtype) for name, (shape, dtype, _) in (headers or read_headers(path)).items()}


def check_finite(path, name: str, tensor: torch.Tensor) -> None:
    """Refuse NaN / Inf weights: a model holding them computes nothing meaningful, and training from one
    would run to the end at loss = nan."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise GQAError(f"{path}: tensor {name} holds NaN or Inf values; gqa refuses non-finite weights")


SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def stored_parameters(path: str | os.PathLike, ignore=()) -> tuple[int, str, int]:
    """A folder's parameter count (tensors matching an `ignore` pattern left out), the dtype most of them are
    stored in and its bytes per value, from the headers (no weights read)."""
    counts = collections.Counter()
    for name, (shape, dtype) in tensor_shapes(path).items():
        if not any(re.fullmatch(p, name) for p in ignore):
            counts[dtype] += math.prod(shape)
    storage = counts.most_common(1)[0][0] if counts else "F32"
    return sum(counts.values()), storage, SAFETENSORS_BYTES.get(storage, 4)


def write_remote_code(family, folder: Path) -> None:
    """Copy the family's runtime modules (if any: `Family.remote_code`, kept as data in `gqa/runtimes/<family>/`)
    into the model folder being written."""
    for name in getattr(family, "remote_code", ()) if family is not None else ():
        source = resources.files("gqa.runtimes").joinpath(family.name, name)
        (Path(folder) / name).write_bytes(source.read_bytes())


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


PARTIAL_OWNER = ".gqa-owner"  # in a partial or state folder: "pid hostname" of the process writing it


def check_destination(dest: str | os.PathLike, overwrite: bool = False, sources=(), kind: str = "folder") -> Path:
    """Refuse a destination before any work is done: an existing one (unless `overwrite`), one equal to or
    inside a source folder (writing would overwrite or nest into the input), one that cannot be created,
    and, for a file (`kind="file"`), an existing folder (which --overwrite does not turn into a file)."""
    dest = Path(dest)
    resolved = dest.resolve()
    for source in sources:
        source = Path(source).resolve()
        if resolved == source or source in resolved.parents:
            where = "is the source folder" if resolved == source else f"is inside the source folder {source}"
            raise GQAError(f"{dest} {where}; write the output somewhere else")
    if kind == "file" and dest.is_dir():
        raise GQAError(f"{dest} is a folder; give the name of the file to write")
    if dest.exists() and not overwrite:
        raise GQAError(f"{dest} already exists; pass --overwrite (overwrite=True) to replace it")
    ancestor = resolved.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise GQAError(f"cannot create {dest}: {ancestor} is a file, not a folder")
    try:  # a real probe: permission bits say nothing to root, and a read-only file system refuses root too
        Path(tempfile.mkdtemp(prefix=".gqa-probe-", dir=ancestor)).rmdir()
    except OSError as e:
        raise GQAError(f"cannot create {dest}: {ancestor} is not writable ({e.strerror})") from None
    return dest


def claim(folder: Path) -> None:
    """Mark `folder` as being written by this process (see `owner_alive`)."""
    (folder / PARTIAL_OWNER).write_text(f"{os.getpid()} {socket.gethostname()}\n")


def owner_alive(folder: Path) -> bool:
    """Whether the process that claimed `folder` still runs (False when it never said who it was)."""
    try:
        pid, host = (folder / PARTIAL_OWNER).read_text().split()
        return host == socket.gethostname() and process_alive(int(pid))
    except (OSError, ValueError):
        return False


def remove_stale(dest: Path, pattern: str, what: str) -> None:
    """Delete the folders matching `pattern` beside `dest` whose process is gone, saying so."""
    for stale in dest.parent.glob(pattern):
        if stale.is_dir() and not owner_alive(stale):
            size = folder_bytes(stale)
            shutil.rmtree(stale, ignore_errors=True)
            warn(f"removed {stale} ({size / 1e6:,.1f} MB), {what} {dest.name}")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def remove_stale_partials(dest: Path) -> None:
    """Delete the partial folders an interrupted write of `dest` left behind (its process is gone), saying so."""
    remove_stale(dest, f".{dest.name}.partial-*", "left by an interrupted write of")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_parents(folder: Path) -> list[Path]:
    """mkdir -p `folder`; returns the folders it created, deepest first (for `remove_empty`)."""
    created = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        created.append(parent)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GQAError(f"cannot create {folder}: {e.strerror}") from None
    return created


def remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty: another writer may have put something there meanwhile


@contextlib.contextmanager
def partial_folder(dest: Path, overwrite: bool, kind: str) -> Iterator[tuple[Path, list[Path]]]:
    """The one atomic-output helper's core: (a fresh uniquely named folder beside `dest` that names its owner,
    the parent folders created for it). On an error the folder and the parents it created are removed; the
    partial folders of killed writes of `dest` are removed first, with a warning."""
    dest = check_destination(dest, overwrite, kind=kind)
    created = make_parents(dest.parent)
    try:
        remove_stale_partials(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    except OSError as e:
        remove_empty(created)
        raise GQAError(f"cannot create {dest}: {e.strerror}") from None
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the finished output gets the usual permissions
    claim(tmp)
    try:
        yield tmp, created
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(created)  # only those left empty: state kept for a resume keeps its parent
        raise


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; rename it to `dest` only if the block completes.

    The temporary folder names its owner, so a later write of the same destination can tell a folder left
    by a killed run (removed, with a warning) from one another live run is writing. One writer per
    destination: a `dest` that appeared while the block ran (another run wrote it) is replaced only with
    `overwrite`; otherwise this run's output is discarded and the other's kept (`publish`).
    """
    dest = Path(dest)
    with partial_folder(dest, overwrite, "folder") as (tmp, _):
        yield tmp
        (tmp / PARTIAL_OWNER).unlink()
        publish(tmp, dest, overwrite)


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a path to write the file `dest` at; it becomes `dest` only if the block completes. The file is
    written inside a partial folder (`partial_folder`), so killed writes are found and cleaned the same way."""
    dest = Path(dest)
    with partial_folder(dest, overwrite, "file") as (tmp, _):
        yield tmp / dest.name
        publish(tmp / dest.name, dest, overwrite)
        shutil.rmtree(tmp)


def publish(done: Path, dest: Path, overwrite: bool) -> None:
    """Rename the finished `done` (a folder or a file) to `dest`. Without `overwrite` an existing `dest` is never
    replaced, even one that appeared after the checks at the start: the rename itself refuses it (a folder
    cannot be renamed over a non-empty one; a file is linked, which fails where one exists)."""
    if overwrite and (dest.exists() or dest.is_symlink()):
        shutil.rmtree(dest) if dest.is_dir() and not dest.is_symlink() else dest.unlink()
    try:
        if done.is_dir() or overwrite:
            if not overwrite and (dest.exists() or dest.is_symlink()):
                raise FileExistsError
            os.rename(done, dest)
        else:
            link_or_rename(done, dest)
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as e:
        raise appeared(dest) from e
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise appeared(dest) from None
        raise


def link_or_rename(done: Path, dest: Path) -> None:
    """Move the file `done` to `dest`, failing where `dest` exists: a hard link where the file system has them."""
    try:
        os.link(done, dest)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        if dest.exists() or dest.is_symlink():
            raise FileExistsError from None
        os.rename(done, dest)
        return
    done.unlink()


def appeared(dest: Path) -> GQAError:
    return GQAError(f"{dest} appeared while this run was writing it (another run wrote it meanwhile); it is left as "
                    f"that run wrote it and this run's output is discarded: pass --overwrite to replace it")


def copy_tokenizer(src: str | os.PathLike | None, dest: Path) -> None:
    if src is None:
        return
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, dest / name)


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


class ShardWriter:
    """Writes tensors into safetensors shards of at most `shard_bytes`, then the index if there is more than one.

    A tensor's bytes go to disk when it is added, so the writer holds none of a shard in memory (holding
    one was 2 GB of a 7B-geometry conversion's peak). The safetensors header comes first in a file and is
    known only when the shard is complete: room for it (`HEADER_BYTES`) is left at the start and filled
    then, padded with spaces as the format allows; a shard whose header would outgrow it closes early."""

    HEADER_BYTES = 64 * 1024

    def __init__(self, dest: Path, shard_bytes: int = SHARD_BYTES):
        self.dest, self.shard_bytes = dest, shard_bytes
        self.header: dict[str, dict] = {"__metadata__": {"format": "pt"}}  # the open shard's
        self.header_bytes = len(header_json(self.header))
        self.out = None  # the open shard
        self.data_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise GQAError(f"cannot write {name}: dtype {tensor.dtype} has no safetensors name here")
        tensor = tensor.detach().cpu().contiguous()
        size = tensor.numel() * tensor.element_size()
        entry = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape)}
        most = max(self.shard_bytes, self.data_bytes + size)  # offsets never have more digits than this
        grows = len(header_json({name: {**entry, "data_offsets": [most, most]}}))  # >= len("," + the entry)
        if self.out is not None and (self.data_bytes + size > self.shard_bytes
                                     or self.header_bytes + grows > self.HEADER_BYTES):
            self.flush()
        if self.header_bytes + grows > self.HEADER_BYTES:
            raise GQAError(f"cannot write {name}: its safetensors header entry alone is over {self.HEADER_BYTES} bytes")
        if self.out is None:
            self.out = open(self.dest / f"shard-{len(self.files):05d}.safetensors", "wb")
            self.out.seek(8 + self.HEADER_BYTES)
        self.out.write(tensor.reshape(-1).view(torch.uint8).numpy())
        self.header[name] = {**entry, "data_offsets": [self.data_bytes, self.data_bytes + size]}
        self.header_bytes += grows
        self.data_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if self.out is None:
            return
        header = header_json(self.header)
        self.out.seek(0)
        self.out.write(self.HEADER_BYTES.to_bytes(8, "little") + header + b" " * (self.HEADER_BYTES - len(header)))
        self.out.close()
        self.files.append((Path(self.out.name).name, [k for k in self.header if k != "__metadata__"]))
        self.header = {"__metadata__": self.header["__metadata__"]}
        self.header_bytes, self.out, self.data_bytes = len(header_json(self.header)), None, 0

    def close(self) -> None:
        self.flush()
        if len(self.files) == 1:
            os.replace(self.dest / self.files[0][0], self.dest / "model.safetensors")
            return
        n = len(self.files)
        weight_map = {}
        for i, (old, names) in enumerate(self.files):
            new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dest / old, self.dest / new)
            weight_map.update({t: new for t in names})
        write_json(
            self.dest / "model.safetensors.index.json",
            {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
        )


def header_json(header: dict) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()
