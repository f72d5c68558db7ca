"""Benchmark (not a test): training throughput and model FLOPs utilisation of `gqa pretrain` on one GPU.

A ~116M-parameter Llama-style model (12 layers, hidden 768, 12 heads of 64, MLP 3072, the demo's 4,096-token
vocabulary) trained on the bundled corpus with bf16 autocast, fused AdamW and torch.compile. Tokens/s and
MFU (6·N + 12·L·H·D·T FLOPs per token over the device's dense bf16 peak) are read from the run's log,
skipping the first steps (compilation, warm-up), and written with the command and device.

    python benchmarks/train_throughput.py --out docs/results/train-125m.json            # on the GPU machine
    python benchmarks/train_throughput.py --steps 3 --batch-size 2 --seq-len 64 --no-compile   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from gqa.presets import preset_fields

CONFIG = preset_fields("llama-125m")
TOKENIZER = Path(__file__).resolve().parents[1] / "src" / "gqa" / "assets" / "demo-mha"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10, help="first steps left out of the averages")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default="docs/results/train-125m.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "config.json").write_text(json.dumps(CONFIG))
        command = [sys.executable, "-m", "gqa", "pretrain", str(tmp / "run"), "--config", str(tmp / "config.json"),
                   "--tokenizer", str(TOKENIZER), "--data", "bundled", "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                   "--eval-every", str(10**9), "--save-every", str(10**9), "--eval-blocks", "4"]
        if not args.no_compile:
            command.append("--compile")
        subprocess.run(command, check=True)
        log = [json.loads(line) for line in (tmp / "run" / "train" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "tokens_per_s" in r][args.skip :] or [r for r in log if "tokens_per_s" in r]
    result = {
        "benchmark": "gqa pretrain throughput, ~125M Llama-style model, bundled corpus",
        "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "config": CONFIG,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "compile": not args.no_compile,
        "steps_measured": len(steps),
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in steps),
        "mfu_median": statistics.median(r["mfu"] for r in steps) if "mfu" in steps[0] else None,
        "final_loss": log[-1].get("loss"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
