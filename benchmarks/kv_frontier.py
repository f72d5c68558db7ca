"""Benchmark (not a test): fewer KV bytes by conversion, by KV-cache quantization, and by both at once.

Every combination of {the source, `--kv-budget 0.5`, MQA (`aligned` + transfer), MQA + distillation} x {the
model's dtype (bf16), fp8_e4m3, q8_0, q5_0, q4_0 caches} is scored on held-out text against the original
with an unquantized (float32) cache: perplexity (x the original's), top-1 agreement, KL(original || model),
next to its KV bytes per token. The quantized caches are gqa's, value for value the runtimes' (llama.cpp's
blocks with its Hadamard rotation, vLLM's fp8: `gqa.kv_formats`), so each point is what a user serving that
model with that flag gets.

    apt-get download linux-doc-6.1 && dpkg-deb -x linux-doc-6.1_*.deb /tmp/linux-doc   # one more kind of text
    python benchmarks/kv_frontier.py --model smollm2 --linux-doc /tmp/linux-doc --out docs/results/kv-frontier/smollm2
    python benchmarks/kv_frontier.py --model demo --linux-doc /tmp/linux-doc --out docs/results/kv-frontier/demo

Held-out sets: the validation splits of `wiki` and `shakespeare` (the calibration's sources; documents no
calibration or training step saw), the Python language reference (`pydoc_data`) and the Linux kernel's
development-process documentation (Debian's linux-doc-6.1, `Documentation/process`): kinds of text no
calibration draws from. Rows are appended to OUT/rows.jsonl as they finish (`--resume` keeps them);
`--report` rewrites the README and figure from OUT/results.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conversion_quality import cpu_seconds, eval_data, run  # noqa: E402

from gqa.bench import cpu_model_name  # noqa: E402
from gqa.jsonfiles import write_json  # noqa: E402

CACHES = ("bfloat16", "fp8_e4m3", "q8_0", "q5_0", "q4_0")
SETS = ("wiki", "shakespeare", "python-reference", "linux-doc")
FLAGS = {"bfloat16": "the model's dtype (vLLM's default; llama.cpp's f16 costs the same)",
         "fp8_e4m3": 'vLLM kv_cache_dtype="fp8"', "q8_0": "llama.cpp -ctk q8_0 -ctv q8_0 -fa on",
         "q5_0": "llama.cpp -ctk q5_0 -ctv q5_0 -fa on", "q4_0": "llama.cpp -ctk q4_0 -ctv q4_0 -fa on"}


def held_out(name: str, work: Path, linux_doc: Path | None) -> str:
    if name != "linux-doc":
        return eval_data(name, work)
    path = work / "linux-doc.txt"
    if linux_doc is None and path.is_file():  # written by an earlier run in this work folder
        return str(path)
    if linux_doc is None:
        raise SystemExit("the linux-doc set needs --linux-doc DIR (see the module docstring)")
    root = next(linux_doc.rglob("Documentation/process"))
    text = "\n\n".join(gzip.open(f, "rt", errors="replace").read() for f in sorted(root.glob("*.rst.gz")))
    path.write_text(text)
    return str(path)


def models(args) -> list[tuple[str, list | None, str | None]]:
    """(name, conversion options or None, uptrain source or None): the rows of the frontier (`--models` picks
    by slug, "original" included; a distilled model brings the conversion it starts from)."""
    cal = ["--method", "aligned", "--calib", args.calib, "--calib-tokens", str(args.calib_tokens)]
    rows = [("original", None, None),
            ("half KV bytes (--kv-budget 0.5, aligned + transfer 300)", ["--kv-budget", "0.5", *cal, "--transfer-steps",
                                                                         "300"], None),
            ("MQA (aligned + transfer 300)", ["--kv-heads", "1", *cal, "--transfer-steps", "300"], None),
            ("MQA + distillation", None, "MQA (aligned + transfer 300)")]
    if args.models is None:
        return rows
    keep = set(args.models.split(","))
    keep |= {uptrain_from for name, _, uptrain_from in rows if slug(name) in keep and uptrain_from}
    return [r for r in rows if r[0] in keep or slug(r[0]) in keep]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.split(" (")[0].lower()).strip("-")


def prepare(args, work: Path, log: list) -> tuple[Path, dict]:
    """The models of the frontier (converted and uptrained with gqa's commands), and each one's record."""
    if args.model == "smollm2":
        original, seq_len = work / "original", 512
        if not (original / "config.json").exists():
            run(["import-gguf", "smollm2", str(original)], log, "import")
    else:
        from gqa.demo import ASSET

        original, seq_len = ASSET, 256
    paths, records = {}, {}
    for name, options, uptrain_from in models(args):
        path = original if options is None and uptrain_from is None else work / slug(name)
        paths[name] = path
        if path != original and not (path / "config.json").exists():
            if options is not None:
                run(["convert", str(original), str(path), *options, "--overwrite"], log, name)
            else:
                run(["uptrain", str(paths[uptrain_from]), str(path), "--data", args.calib, "--steps",
                     str(args.uptrain_steps), "--batch-size", "8", "--seq-len", str(seq_len), "--eval-every", "1000",
                     "--overwrite"], log, name)
        records[name] = {"path": str(path), "conversion": read(path / "conversion.json"),
                         "uptrain": read(path / "train" / "report.json")}
    return original, {"seq_len": seq_len, "paths": paths, "records": records}


def read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def kv_bytes(path: Path, cache: str) -> int:
    from gqa.checkpoints import checked_config
    from gqa.kv_formats import kv_format

    return round(checked_config(path).kv_bytes_per_token(1) * kv_format(cache).bytes_per_value)


def measure(args, work: Path, out: Path) -> dict:
    log: list = []
    original, prep = prepare(args, work, log)
    done = {}
    if args.resume and (out / "rows.jsonl").exists():
        done = {(r["model"], r["cache"]): r for r in map(json.loads, (out / "rows.jsonl").read_text().splitlines())}
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "rows.jsonl").write_text("")
    data = {s: held_out(s, work, Path(args.linux_doc) if args.linux_doc else None) for s in SETS}
    rows = []
    for name, path in prep["paths"].items():
        for cache in args.caches.split(","):
            if (name, cache) in done:
                rows.append(done[(name, cache)])
                continue
            row = {"model": name, "cache": cache, "kv_bytes_per_token": kv_bytes(path, cache),
                   "runtime_flag": FLAGS[cache]}
            for s in SETS:
                row[s] = run(["eval", str(path), "--data", data[s], "--seq-len", str(prep["seq_len"]), "--max-tokens",
                              str(args.eval_tokens), "--dtype", "float32", "--kv-cache-dtype", cache, "--reference",
                              str(original), "--json"], log, f"{name} {cache} eval {s}")
            row["commands"] = log[-len(SETS):]
            rows.append(row)
            with open(out / "rows.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("model", "cache", "kv_bytes_per_token")} |
                             {s: round(row[s]["perplexity"], 3) for s in SETS}), flush=True)
    base = {s: run(["eval", str(original), "--data", data[s], "--seq-len", str(prep["seq_len"]), "--max-tokens",
                    str(args.eval_tokens), "--dtype", "float32", "--json"], log, f"original float32 eval {s}")
            for s in SETS}
    return {
        "command": "python benchmarks/kv_frontier.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": cpu_model_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")},
        "model": args.model, "calibration": {"data": args.calib, "tokens": args.calib_tokens},
        "evaluation": {"sets": list(SETS), "tokens_per_set": args.eval_tokens, "seq_len": prep["seq_len"]},
        "reference": {"cache": "float32", **base,
                      "kv_bytes_per_token": {c: kv_bytes(original, c) for c in ("float32", *CACHES)}},
        "models": {name: {k: v for k, v in r.items() if k != "path"} for name, r in prep["records"].items()},
        "rows": rows, "commands": log, "cpu_seconds_of_children": round(cpu_seconds(), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "demo"], default="smollm2")
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", default="/tmp/gqa-frontier")
    parser.add_argument("--calib", default="bundled")
    parser.add_argument("--calib-tokens", type=int, default=65536)
    parser.add_argument("--models", default=None, help="comma-separated slugs of the rows to measure (half-kv-bytes, "
                        "mqa, mqa---distillation); all when left out")
    parser.add_argument("--caches", default=",".join(CACHES), help="comma-separated cache dtypes to measure")
    parser.add_argument("--uptrain-steps", type=int, default=15, help="distillation steps of 8 sequences")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored per set")
    parser.add_argument("--linux-doc", default=None, help="the extracted linux-doc-6.1 package")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--report", action="store_true", help="rewrite OUT/README.md and the figure from results.json")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.report:
        work = Path(args.workdir) / args.model
        work.mkdir(parents=True, exist_ok=True)
        write_json(out / "results.json", measure(args, work, out))
    from kv_frontier_report import write_report

    write_report(out)
    print(f"wrote {out}/results.json, README.md and frontier.png")


if __name__ == "__main__":
    main()
