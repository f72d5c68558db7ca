"""Benchmark (not a test): vLLM's fp8 KV cache against gqa's, on SmolLM2, where vLLM runs.

vLLM with kv_cache_dtype="fp8" decodes the prompts greedily; gqa scores the same tokens with a float cache
and with its fp8_e4m3 cache (rounded to nearest, as vLLM's CUDA kernels store it) and fp8_e4m3_cpu (toward
zero, as vLLM's CPU build does). Written: the tokens, the largest log-probability difference to each, and
vLLM's version. The GPU acceptance script runs it on the device (`--parts vllm-fp8`).

    python benchmarks/vllm_fp8.py --out /tmp/vllm-fp8.json [--if-installed]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import gqa
from gqa.checkpoints.gguf import gguf_to_hf, packaged_smollm2
from gqa.jsonfiles import write_json

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42], [100, 7, 200, 9, 300, 11, 250, 13, 17, 19, 23]]


def chosen_logprobs(model, prompt: list[int], new: list[int]) -> np.ndarray:
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt + new[:-1]], device=model.device))[0, len(prompt) - 1:]
                               .float(), -1)
    return lp[torch.arange(len(new)), torch.tensor(new)].cpu().numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", default="/tmp/gqa-vllm-fp8")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--if-installed", action="store_true", help="record 'not installed' where vLLM is not")
    args = parser.parse_args()
    from gqa.errors import GQAError
    from gqa.runtimes.vllm_runtime import run_job, vllm_python

    try:
        vllm_python()
    except GQAError as e:
        if args.if_installed:
            write_json(Path(args.out), {"vllm": "not installed", "why": str(e)})
            return 0
        raise
    work = Path(args.workdir)
    model_dir = work / "smollm2"
    if not (model_dir / "config.json").is_file():
        gguf_to_hf(packaged_smollm2(), model_dir)
    job = {"task": "generate", "models": [str(model_dir)], "prompts": PROMPTS, "max_tokens": args.new_tokens,
           "engine": {"dtype": "float32", "max_model_len": 256, "enforce_eager": True, "seed": 0,
                      "kv_cache_memory_bytes": 1024**3, "kv_cache_dtype": "fp8"}}
    result = run_job(job, log=work / "vllm.log")
    served = result["results"][0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = gqa.load(model_dir, dtype="float32", device=device)
    theirs = np.concatenate([np.asarray(x) for x in served["logprobs"]])
    distances = {}
    for kv in (None, "fp8_e4m3", "fp8_e4m3_cpu"):
        with model.storing_kv_as(kv):
            ours = np.concatenate([chosen_logprobs(model, p, t) for p, t in zip(PROMPTS, served["tokens"])])
        distances[kv or "float32"] = float(np.abs(theirs - ours).max())
    record = {"vllm": result["versions"], "device": device, "tokens": served["tokens"],
              "max_logprob_difference": distances,
              "gqa_tokens_fp8_e4m3": gqa.generate(model, PROMPTS, max_new_tokens=args.new_tokens,
                                                  kv_cache_dtype="fp8_e4m3"),
              "command": "python benchmarks/vllm_fp8.py " + " ".join(sys.argv[1:])}
    write_json(Path(args.out), record)
    print(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
