"""Benchmark (not a test): the serving table of docs/results/vllm, in vLLM's own engine.

Prepares a source model and its conversions in WORKDIR (once; reused when present), then runs
`gqa bench serve` on them (the models take turns round by round, one vLLM engine each) and writes the
result JSON with the machine's name:

    python benchmarks/vllm_serving.py --model smollm2 --workdir /tmp/gqa-serve --out docs/results/vllm/smollm2.json
    python benchmarks/vllm_serving.py --model llama-1b --workdir /tmp/gqa-serve --out docs/results/vllm/llama-1b.json

- smollm2: SmolLM2-135M as the set-up installs it (9 query heads, 3 KV heads), `--kv-heads 1` (MQA), and
  `--kv-budget 0.5` (per-layer KV heads at half the KV bytes, chosen from sensitivities measured on the
  bundled corpus). Mean pooling for both: speed does not depend on the weights' values.
- llama-1b: a random-weight Llama of 1.3B geometry (24 layers, hidden 2048, 16 heads of 128, MLP 5632,
  bf16), MHA-16, GQA-4 and MQA, and per-layer heads (16, 4, 4, 8) repeated: half the MHA's KV bytes
  (random weights have no sensitivities to choose from).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from convert_7b import synthetic_llama  # the same random Llama writer, at other shapes

from gqa.bench import cpu_model_name
from gqa.checkpoints.files import SHARD_BYTES, atomic_dir, write_json
from gqa.demo import ASSET

LLAMA_1B = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
    num_key_value_heads=16, head_dim=128, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=10000.0,
    hidden_act="silu", tie_word_embeddings=False, architectures=["LlamaForCausalLM"], model_type="llama",
    torch_dtype="bfloat16", initializer_range=0.02, bos_token_id=1, eos_token_id=2,
)
PLANS = {  # model -> (points, KV-cache GiB, dtype)
    "smollm2": ("1x2048,8x2048,16x2048,32x2048,4x8192", 2.0, "float32"),
    "llama-1b": ("1x1024,4x1024", 1.0, "bfloat16"),
    "demo": ("1x256,8x256", 0.25, "float32"),  # the demo model: a check that the harness works, in seconds
}


def gqa(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "gqa", *args], check=True)


def random_llama_1b(dest: Path) -> None:
    """Random bf16 weights with the 1.3B shapes, and the demo model's tokenizer (its ids fit 32,000)."""
    with atomic_dir(dest) as tmp:
        synthetic_llama(tmp, SHARD_BYTES, LLAMA_1B)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(ASSET) / name, tmp / name)


def prepare(model: str, work: Path) -> list[tuple[str, Path]]:
    """(label, folder) of the source and its conversions, made once."""
    work.mkdir(parents=True, exist_ok=True)
    if model == "smollm2":
        source = work / "smollm2"
        if not source.exists():
            gqa("import-gguf", "smollm2", str(source))
        plans = [("SmolLM2-135M (GQA-3, the source)", source, None),
                 ("MQA (--kv-heads 1)", work / "smollm2-mqa", ["--kv-heads", "1"]),
                 ("per-layer, half KV bytes (--kv-budget 0.5)", work / "smollm2-half",
                  ["--kv-budget", "0.5", "--calib", "bundled", "--calib-tokens", "16384"])]
    elif model == "demo":
        source = Path(ASSET)
        plans = [("demo MHA-8 (the source)", source, None), ("MQA", work / "demo-mqa", ["--kv-heads", "1"]),
                 ("per-layer 8,1,8,1", work / "demo-half", ["--kv-heads-per-layer", "8,1,8,1"])]
    else:
        source = work / "llama-1b"
        if not source.exists():
            random_llama_1b(source)
        plans = [("MHA-16 (the source)", source, None), ("GQA-4", work / "llama-1b-gqa4", ["--kv-heads", "4"]),
                 ("MQA", work / "llama-1b-mqa", ["--kv-heads", "1"]),
                 ("per-layer 16,4,4,8 (half KV bytes)", work / "llama-1b-half",
                  ["--kv-heads-per-layer", ",".join(["16,4,4,8"] * 6)])]
    for _, folder, options in plans:
        if options and not folder.exists():
            gqa("convert", str(source), str(folder), *options)
    return [(label, folder) for label, folder, _ in plans]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(PLANS), required=True)
    parser.add_argument("--workdir", default="/tmp/gqa-serve")
    parser.add_argument("--out", required=True)
    parser.add_argument("--points", default=None, help="override the plan's CONCURRENCYxCONTEXT points")
    parser.add_argument("--kv-cache-gb", default=None, help="override the plan's KV-cache memory")
    parser.add_argument("--rounds", default="5")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--if-installed", action="store_true",
                        help="where vLLM is not installed, write {\"vllm\": \"not installed\"} and stop (exit 0)")
    args = parser.parse_args()
    if args.if_installed:
        from gqa.errors import GQAError
        from gqa.runtimes.vllm_runtime import vllm_python

        try:
            vllm_python()
        except GQAError as e:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            write_json(args.out, {"vllm": "not installed", "why": str(e)})
            return print(f"vLLM is not installed here: wrote {args.out}")
    points, kv_gb, dtype = PLANS[args.model]
    models = prepare(args.model, Path(args.workdir))
    run = Path(args.workdir) / f"serve-{args.model}"
    command = ["bench", "serve", *[str(f) for _, f in models], "--points", args.points or points, "--kv-cache-gb",
               str(args.kv_cache_gb or kv_gb), "--dtype", dtype, "--rounds", args.rounds, "--out", str(run),
               *(["--enforce-eager"] if args.enforce_eager else [])]
    gqa(*command)
    result = json.loads((run / "bench_serve.json").read_text())
    result["labels"] = {str(f): label for label, f in models}
    result["machine"] = {"cpu": cpu_model_name(), "cores": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                         "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    result["command"] = "python " + " ".join(sys.argv)
    result["bench_command"] = "gqa " + " ".join(command)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
