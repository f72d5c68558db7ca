"""Benchmark (not a test): convert a synthetic checkpoint with Llama-2-7B geometry on the CPU, streamed.

Writes a random bf16 Llama-2-7B-shaped folder in several safetensors shards (once; reused if present),
converts it MHA-32 -> GQA-8 in a child process, and records wall time and the child's peak RSS next to
the largest shard. The claim checked: peak RSS <= 2x the largest shard, i.e. memory is bounded by the
shard, not the 13.5 GB model.

    python benchmarks/convert_7b.py --workdir /tmp/gqa-7b --out docs/results/convert-7b.json
    python benchmarks/convert_7b.py --workdir /tmp/gqa-7b --method aligned --calib-tokens 1024 \
        --out docs/results/convert-7b-aligned.json

With `--method aligned` the converter also runs the model over calibration text (the bundled corpus, with
the demo model's tokenizer copied in: its ids fit the 32,000-token vocabulary) layer by layer, so the
claim includes one layer's activations on top of the shard.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from gqa.checkpoints.files import ShardWriter, write_json

LLAMA2_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
    hidden_act="silu", tie_word_embeddings=False, architectures=["LlamaForCausalLM"], model_type="llama",
    torch_dtype="bfloat16", initializer_range=0.02,
)


def synthetic_llama(dest: Path, shard_bytes: int, config: dict = LLAMA2_7B) -> None:
    """Random bf16 weights with `config`'s shapes (default Llama-2-7B), written layer by layer into shards."""
    c = config
    dim, hidden, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    dest.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(dest, shard_bytes)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    writer.add("model.embed_tokens.weight", rand(vocab, dim))
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            writer.add(f"{p}.self_attn.{name}.weight", rand(dim, dim))
        writer.add(f"{p}.mlp.gate_proj.weight", rand(hidden, dim))
        writer.add(f"{p}.mlp.up_proj.weight", rand(hidden, dim))
        writer.add(f"{p}.mlp.down_proj.weight", rand(dim, hidden))
        writer.add(f"{p}.input_layernorm.weight", torch.ones(dim, dtype=torch.bfloat16))
        writer.add(f"{p}.post_attention_layernorm.weight", torch.ones(dim, dtype=torch.bfloat16))
    writer.add("model.norm.weight", torch.ones(dim, dtype=torch.bfloat16))
    writer.add("lm_head.weight", rand(vocab, dim))
    writer.close()
    write_json(dest / "config.json", c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/gqa-7b")
    parser.add_argument("--shard-gb", type=float, default=4.0)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--method", default="mean")
    parser.add_argument("--calib-tokens", type=int, default=1024, help="with a calibrated method")
    parser.add_argument("--out", default="docs/results/convert-7b.json")
    parser.add_argument("--keep", action="store_true", help="keep the converted folder")
    args = parser.parse_args()

    work = Path(args.workdir)
    src, dst = work / "llama2-7b-synthetic", work / f"gqa{args.kv_heads}"
    if not (src / "config.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        t = time.time()
        synthetic_llama(src, int(args.shard_gb * 1024**3))
        print(f"wrote synthetic checkpoint in {time.time() - t:.0f} s")
    shards = sorted(src.glob("*.safetensors"))
    largest = max(s.stat().st_size for s in shards)
    total = sum(s.stat().st_size for s in shards)
    shutil.rmtree(dst, ignore_errors=True)

    from gqa.demo import ASSET

    for name in ("tokenizer.json", "tokenizer_config.json"):  # calibration reads text with a tokenizer
        shutil.copy(ASSET / name, src / name)
    options = ["--kv-heads", str(args.kv_heads), "--method", args.method]
    if args.method == "aligned":
        options += ["--calib", "bundled", "--calib-tokens", str(args.calib_tokens)]
    command = [sys.executable, "-m", "gqa", "convert", str(src), str(dst), *options]
    t = time.time()
    subprocess.run(command, check=True)
    wall = time.time() - t
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux

    out_total = sum(s.stat().st_size for s in dst.glob("*.safetensors"))
    result = {
        "benchmark": f"convert a synthetic Llama-2-7B-geometry checkpoint (random bf16) MHA-32 -> GQA-{args.kv_heads}, "
                     f"streamed, method {args.method}",
        "command": "python benchmarks/convert_7b.py " + " ".join(sys.argv[1:]),
        "convert_command": "gqa convert SRC DST " + " ".join(options),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "input_shards": len(shards),
        "input_bytes": total,
        "largest_shard_bytes": largest,
        "output_bytes": out_total,
        "wall_seconds": round(wall, 1),
        "peak_rss_bytes": peak_rss,
        "peak_rss_over_largest_shard": round(peak_rss / largest, 3),
        "bound_holds": peak_rss <= 2 * largest,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out), result)
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(dst, ignore_errors=True)


if __name__ == "__main__":
    main()
