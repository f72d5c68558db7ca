"""Benchmark (not a test): how close each conversion method stays to the original, and what it costs.

Runs real `gqa` commands one after another (each printed and recorded with its wall time), scores every
model on held-out text with `gqa eval --reference ORIGINAL` (perplexity, top-1 agreement with the original,
KL), and writes results.json and a README with the tables:

    python benchmarks/conversion_quality.py --model smollm2 --out docs/results/conversion-quality/smollm2
    python benchmarks/conversion_quality.py --model demo --out docs/results/conversion-quality/demo

Calibration text comes from the training split of --calib (default: wiki for SmolLM2, the bundled corpus
the demo model was trained on for the demo); the scores come from the validation splits of the Wikipedia
leads and of Shakespeare (documents no calibration step saw; for SmolLM2 calibrated on wiki, Shakespeare
is also a source calibration never drew from).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from gqa.jsonfiles import write_json

EVAL_SETS = ("wiki", "shakespeare")


def run(command: list[str], log: list[dict], name: str) -> dict:
    """Run one gqa command, print it, record it with its wall time; returns its JSON output if any."""
    line = "gqa " + " ".join(command)
    print(f"$ {line}", flush=True)
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "gqa", *command], capture_output=True, text=True)
    seconds = time.time() - start
    if result.returncode != 0:
        raise SystemExit(f"{line} failed:\n{result.stderr[-3000:]}")
    log.append({"name": name, "command": line, "seconds": round(seconds, 1)})
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        return {}


def plans(model: str, calib: str, calib_tokens: int, transfer_steps: int, uptrain_steps: int) -> list[tuple]:
    """(name, kv description, conversion options or None for the original, uptrain source or None)."""
    cal = ["--calib", calib, "--calib-tokens", str(calib_tokens)]
    targets = [("MQA", ["--kv-heads", "1"]), ("half KV bytes", ["--kv-budget", "0.5"])]
    if model == "demo":
        targets = [("GQA-2", ["--kv-heads", "2"]), ("MQA", ["--kv-heads", "1"])]
    out = [("original", "source", None, None)]
    for label, target in targets:
        tag = label.split()[0].lower()
        budget = target[0] == "--kv-budget"
        out.append((f"{tag}-mean", label, [*target, "--method", "mean", *(cal if budget else [])], None))
        out.append((f"{tag}-aligned", label, [*target, "--method", "aligned", *cal], None))
        out.append((f"{tag}-aligned-transfer", label,
                    [*target, "--method", "aligned", *cal, "--transfer-steps", str(transfer_steps)], None))
    if uptrain_steps:
        out.append((f"{out[3][0]}-uptrained", out[3][1], None, out[3][0]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "demo"], default="smollm2")
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", default="/tmp/gqa-quality")
    parser.add_argument("--calib", default=None)
    parser.add_argument("--calib-tokens", type=int, default=65536)
    parser.add_argument("--transfer-steps", type=int, default=400)
    parser.add_argument("--uptrain-steps", type=int, default=25, help="distillation steps of 8 x 512 tokens")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens scored per set")
    args = parser.parse_args()

    work = Path(args.workdir) / args.model
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log: list[dict] = []
    if args.model == "smollm2":
        original, calib, seq_len = work / "original", args.calib or "wiki", 512
        run(["import-gguf", "smollm2", str(original)], log, "import")
    else:
        from gqa.demo import ASSET

        original, calib, seq_len = ASSET, args.calib or "bundled", 256
    rows = []
    for name, label, options, uptrain_from in plans(args.model, calib, args.calib_tokens, args.transfer_steps,
                                                    args.uptrain_steps if args.model == "smollm2" else 0):
        path = original if options is None and uptrain_from is None else work / name
        record = {"name": name, "target": label}
        if options is not None:
            run(["convert", str(original), str(path), *options], log, name)
            record["conversion"] = json.loads((path / "conversion.json").read_text())
        elif uptrain_from is not None:
            run(["uptrain", str(work / uptrain_from), str(path), "--data", calib, "--steps", str(args.uptrain_steps),
                 "--batch-size", "8", "--seq-len", str(seq_len), "--lr", "1e-4", "--teacher", str(original),
                 "--distill-weight", "1.0", "--eval-every", "1000"], log, name)
            record["uptrain"] = json.loads((path / "train" / "report.json").read_text())
        record["seconds"] = log[-1]["seconds"] if options is not None or uptrain_from is not None else None
        for data in EVAL_SETS:
            record[data] = run(["eval", str(path), "--data", data, "--seq-len", str(seq_len), "--max-tokens",
                                str(args.eval_tokens), "--reference", str(original), "--json"], log, f"{name} eval {data}")
        rows.append(record)
        print(json.dumps({k: record[k] for k in ("name", *EVAL_SETS)}), flush=True)
    results = {
        "command": "python benchmarks/conversion_quality.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__},
        "model": args.model, "calibration": {"data": calib, "tokens": args.calib_tokens},
        "evaluation": {"sets": [f"{d} validation split" for d in EVAL_SETS], "tokens_per_set": args.eval_tokens,
                       "seq_len": seq_len},
        "commands": log, "rows": rows,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out) / "results.json", results)
    print(f"wrote {args.out}/results.json")


if __name__ == "__main__":
    main()
