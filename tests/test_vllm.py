"""gqa's outputs in vLLM's own engine (its CPU build, which the set-up installs into an environment of its
own): every HF architecture gqa writes loads, and decodes the greedy tokens gqa's decoder decodes, with the
same log-probabilities; the KV capacity vLLM allocates follows the KV bytes per token; per-layer KV heads
load through gqa's configuration module; `gqa info` says which outputs vLLM can hold, as vLLM finds it.

vLLM is not optional here: without it these tests fail, saying what to install (GQA_SKIP_VLLM=1 skips
them where vLLM cannot be installed). One vLLM process serves every model (engines one after another,
in-process), so the suite pays vLLM's import once.
"""

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from families import build, save

import gqa
import gqa.checkpoints.gguf
from gqa.info import describe
from gqa.runtimes.vllm_runtime import WORKER, run_job, vllm_python

if os.environ.get("GQA_SKIP_VLLM"):
    pytest.skip("GQA_SKIP_VLLM is set", allow_module_level=True)

# vLLM's CPU attention takes head sizes of 32 and up: the tiny models are 128 wide with 4 heads of 32
WIDE = {"hidden_size": 128}
CASES = {  # name -> (family, build overrides, conversion), one output of every kind gqa writes in an HF architecture
    "llama-gqa": ("llama", {**WIDE, "intermediate_size": 256}, {"n_kv_heads": 2}),
    "llama-mqa": ("llama", {**WIDE, "intermediate_size": 256}, {"n_kv_heads": 1}),
    "llama-per-layer": ("llama", {**WIDE, "intermediate_size": 256}, {"n_kv_heads_per_layer": [4, 1]}),
    "mistral-mqa": ("mistral", {**WIDE, "intermediate_size": 256}, {"n_kv_heads": 1}),
    "qwen2-biases-mqa": ("qwen2", WIDE, {"n_kv_heads": 1}),
    "gpt2-as-bigcode": ("gpt2", {"n_embd": 128}, {"n_kv_heads": 1}),
    "gemma-gqa": ("gemma", {**WIDE, "head_dim": 32}, {"n_kv_heads": 2}),
    "phi-mqa": ("phi", WIDE, {"n_kv_heads": 1}),
    "phi3-gqa": ("phi3", WIDE, {"n_kv_heads": 2}),
    "qwen3-mqa": ("qwen3", {**WIDE, "head_dim": 32}, {"n_kv_heads": 1}),
    "olmo2-gqa": ("olmo2", WIDE, {"n_kv_heads": 2}),
    "stablelm-gqa": ("stablelm", {**WIDE, "qk_layernorm": False, "use_parallel_residual": False}, {"n_kv_heads": 2}),
    # vLLM's StableLM has no per-head q/k norms (StableLM-2-12B's) and no parallel residual
    "stablelm-qk-norm": ("stablelm", {**WIDE, "use_parallel_residual": False}, {"n_kv_heads": 2}),
    "stablelm-parallel": ("stablelm", {**WIDE, "qk_layernorm": False}, {"n_kv_heads": 2}),
    "falcon-mqa": ("falcon", WIDE, {"n_kv_heads": 1}),
    "falcon-new-mqa": ("falcon_new", WIDE, {"n_kv_heads": 1}),
}
REFUSED = {"stablelm-qk-norm": "k_layernorm", "stablelm-parallel": "post_attention_layernorm"}  # vLLM's words
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42], [100, 7, 200, 9, 300, 11, 250, 13, 17, 19, 23]]
NEW_TOKENS = 12
KV_CACHE = 512 * 1024**2


@pytest.fixture(scope="module")
def vllm_runs(tmp_path_factory, tokenizer):
    """Every case's folder (and SmolLM2 with two conversions), and what vLLM made of each, in one worker run."""
    vllm_python()  # fails here, with what to install, when vLLM is missing
    root = tmp_path_factory.mktemp("vllm")
    folders = {}
    for name, (family, overrides, conversion) in CASES.items():
        source = save(build(family, **overrides), root / f"{name}-source", tokenizer)
        gqa.convert(source, root / name, progress=False, **conversion)
        folders[name] = root / name
    smollm2 = root / "smollm2"
    gqa.checkpoints.gguf.gguf_to_hf(gqa.checkpoints.gguf.packaged_smollm2(), smollm2)
    folders["smollm2"] = smollm2
    gqa.convert(smollm2, root / "smollm2-mqa", n_kv_heads=1, progress=False)
    folders["smollm2-mqa"] = root / "smollm2-mqa"
    gqa.convert(smollm2, root / "smollm2-per-layer", n_kv_heads_per_layer=[3, 1] * 15, progress=False)
    folders["smollm2-per-layer"] = root / "smollm2-per-layer"
    job = {"task": "generate", "models": [str(f) for f in folders.values()], "prompts": PROMPTS,
           "max_tokens": NEW_TOKENS, "engine": {"dtype": "float32", "max_model_len": 128, "enforce_eager": True,
                                                 "kv_cache_memory_bytes": KV_CACHE, "trust_remote_code": True,
                                                 "seed": 0}}
    refused = [name for name in folders if name in REFUSED]
    job["models"] = [str(folders[n]) for n in folders if n not in refused]
    served = {Path(r["model"]).name: r for r in run_job(job, log=root / "vllm.log")["results"]}
    job["models"] = [str(folders[n]) for n in refused]  # checked by gqa before the worker: ask vLLM directly
    served.update({Path(r["model"]).name: r for r in run_refused(job, root)})
    return folders, served


def run_refused(job: dict, root: Path) -> list[dict]:
    """vLLM's own answer for folders `gqa` already says it cannot hold (run_job would refuse them first)."""
    python = vllm_python()
    (root / "refused-job.json").write_text(json.dumps(job))
    subprocess.run([python, str(WORKER), str(root / "refused-job.json"), str(root / "refused.json")],
                   capture_output=True, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    return json.loads((root / "refused.json").read_text())["results"]


def gqa_tokens_and_logprobs(folder: Path) -> tuple[list[list[int]], list[list[float]]]:
    model = gqa.load(folder, dtype="float32")
    tokens = gqa.generate(model, PROMPTS, max_new_tokens=NEW_TOKENS)
    logprobs = []
    for prompt, new in zip(PROMPTS, tokens):
        ids = torch.tensor([prompt + new[:-1]])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids)[0, len(prompt) - 1:].float(), -1)
        logprobs.append(lp[torch.arange(len(new)), torch.tensor(new)].tolist())
    return tokens, logprobs


@pytest.mark.parametrize("name", [*CASES, "smollm2", "smollm2-mqa", "smollm2-per-layer"])
def test_vllm_decodes_what_gqa_decodes(vllm_runs, name):
    folders, served = vllm_runs
    result = served[name]
    says = describe(folders[name])["vllm"]
    if name in REFUSED:
        assert REFUSED[name] in result["error"] and says.startswith("no:")
        return
    assert "error" not in result, result["error"]
    assert says.startswith("yes")
    tokens, logprobs = gqa_tokens_and_logprobs(folders[name])
    assert result["tokens"] == tokens
    for ours, theirs in zip(logprobs, result["logprobs"]):
        assert theirs == pytest.approx(ours, abs=2e-3)


def test_vllm_capacity_follows_the_kv_bytes(vllm_runs):
    """For the same cache memory, vLLM holds tokens in inverse proportion to the KV bytes per token."""
    folders, served = vllm_runs
    for name in ("llama-gqa", "llama-mqa", "llama-per-layer", "smollm2", "smollm2-mqa", "smollm2-per-layer"):
        config = gqa.checkpoints.read_model_config(folders[name])[0]
        blocks, block = served[name]["kv_blocks"], served[name]["block_size"]
        assert blocks == KV_CACHE // (config.kv_bytes_per_token(4) * block), name
    assert served["smollm2-mqa"]["kv_tokens"] == 3 * served["smollm2"]["kv_tokens"]
    assert served["smollm2-per-layer"]["kv_tokens"] * 2 == pytest.approx(3 * served["smollm2"]["kv_tokens"], rel=1e-2)


def fp8_machine() -> str | None:
    """Why vLLM's CPU build cannot store an fp8 KV cache here (None where it can)."""
    if not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        return "vLLM's CPU build stores an fp8 KV cache only on x86 machines with AVX-512 or AMX; this one has neither"
    return None


@pytest.mark.skipif(fp8_machine() is not None, reason=str(fp8_machine()))
def test_vllm_fp8_kv_cache_is_gqas(vllm_runs, tmp_path):
    """vLLM with kv_cache_dtype="fp8" against gqa's fp8_e4m3_cpu cache (vLLM's CPU build rounds toward zero;
    its CUDA kernels, and gqa's fp8_e4m3, to nearest): the same greedy tokens, and log-probabilities at
    least 10x closer to gqa's at that dtype than to gqa's float cache."""
    folders, _ = vllm_runs
    names = ["llama-mqa", "smollm2"]
    job = {"task": "generate", "models": [str(folders[n]) for n in names], "prompts": PROMPTS,
           "max_tokens": NEW_TOKENS, "engine": {"dtype": "float32", "max_model_len": 128, "enforce_eager": True,
                                                 "kv_cache_memory_bytes": KV_CACHE, "seed": 0,
                                                 "kv_cache_dtype": "fp8"}}
    for name, result in zip(names, run_job(job, log=tmp_path / "vllm.log")["results"]):
        assert "error" not in result, result["error"]
        model = gqa.load(folders[name], dtype="float32")
        logprobs = {}
        for kv in (None, "fp8_e4m3_cpu"):
            with model.storing_kv_as(kv):
                logprobs[kv] = np.concatenate([chosen_logprobs(model, p, t) for p, t in zip(PROMPTS, result["tokens"])])
        theirs = np.concatenate([np.asarray(x) for x in result["logprobs"]])
        to_same, to_plain = np.abs(theirs - logprobs["fp8_e4m3_cpu"]).max(), np.abs(theirs - logprobs[None]).max()
        assert to_same * 10 <= to_plain, (name, to_same, to_plain)
        assert result["tokens"] == gqa.generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, kv_cache_dtype="fp8_e4m3_cpu")


def chosen_logprobs(model, prompt: list[int], new: list[int]) -> np.ndarray:
    """The model's log-probability of each token of `new` after `prompt`, from one full forward."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt + new[:-1]]))[0, len(prompt) - 1:].float(), -1)
    return lp[torch.arange(len(new)), torch.tensor(new)].numpy()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_serves_the_per_layer_output(vllm_runs):
    """`vllm serve FOLDER --trust-remote-code`, the way users deploy: the per-layer output answers over HTTP
    with the tokens gqa decodes."""
    folders, _ = vllm_runs
    folder = folders["llama-per-layer"]
    port = free_port()
    vllm = Path(vllm_python()).with_name("vllm")
    server = subprocess.Popen([str(vllm), "serve", str(folder), "--port", str(port), "--dtype", "float32",
                               "--max-model-len", "128", "--enforce-eager", "--trust-remote-code",
                               "--kv-cache-memory-bytes", str(KV_CACHE)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and server.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        assert server.poll() is None, "vllm serve exited"
        request = {"model": str(folder), "prompt": PROMPTS[0], "max_tokens": NEW_TOKENS, "temperature": 0,
                   "ignore_eos": True, "return_token_ids": True}
        reply = urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(request).encode(),
            headers={"Content-Type": "application/json"}), timeout=120)
        choice = json.loads(reply.read())["choices"][0]
    finally:
        server.terminate()
        server.wait(timeout=60)
    tokens, _ = gqa_tokens_and_logprobs(folder)
    assert choice["token_ids"] == tokens[0]
