"""Benchmark (not a test): how close each conversion method stays to the original, and what it costs.

Runs real `gqa` commands one after another (each printed and recorded with its wall time), scores every
model on held-out text with `gqa eval --reference ORIGINAL` (perplexity, top-1 agreement with the original,
KL), and writes results.json and a README with the tables:

    python benchmarks/conversion_quality.py --model smollm2 --out docs/results/conversion-quality/smollm2
    python benchmarks/conversion_quality.py --model demo --out docs/results/conversion-quality/demo

Calibration text comes from the training split of --calib (default `bundled`: the mix of Wikipedia leads
and Shakespeare the demo model was trained on). Scores come from held-out text: the validation splits of
`wiki` and `shakespeare` (documents no calibration step saw) and the Python language reference shipped with
CPython (`pydoc_data`), a kind of text calibration never drew from. `--narrow-calib wiki` adds the MQA
conversion calibrated on Wikipedia alone, to show how far a fit carries outside its calibration domain.
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

from gqa.bench import cpu_model_name
from gqa.jsonfiles import write_json

EVAL_SETS = ("wiki", "shakespeare", "python-reference")


def eval_data(name: str, work: Path) -> str:
    """What `gqa eval --data` takes for a held-out set: the bundled corpora's validation splits, and the Python
    language reference (pydoc_data, in every Python installation): a source no calibration draws from."""
    if name != "python-reference":
        return name
    import pydoc_data.topics

    path = work / "python-reference.txt"
    path.write_text("\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)))
    return str(path)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(command: list[str], log: list[dict], name: str) -> dict:
    """Run one gqa command, print it, record it with its wall time; returns its JSON output if any."""
    line = "gqa " + " ".join(command)
    print(f"$ {line}", flush=True)
    start, cpu_start = time.time(), cpu_seconds()
    result = subprocess.run([sys.executable, "-m", "gqa", *command], capture_output=True, text=True)
    seconds, cpu = time.time() - start, cpu_seconds() - cpu_start
    if result.returncode != 0:
        raise SystemExit(f"{line} failed:\n{result.stderr[-3000:]}")
    # wall time, and the CPU time the command used on all cores (what it costs even on a shared machine)
    log.append({"name": name, "command": line, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1)})
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        return {}


def plans(model: str, calib: str, calib_tokens: int, transfer_steps: int, uptrain_steps: int,
          narrow_calib: str | None = None, joint: tuple[int, int] | None = None) -> list[tuple]:
    """(name, kv description, conversion options or None for the original, uptrain source or None).
    joint: (transfer steps, joint steps) of the recommended recipe's row, within the same CPU budget."""
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
        if joint:
            out.append((f"{tag}-aligned-transfer-joint", label,
                        [*target, "--method", "aligned", *cal, "--transfer-steps", str(joint[0]),
                         "--joint-steps", str(joint[1])], None))
    if uptrain_steps:  # uptraining (distillation from the original) after the transfer, and after the joint stage
        for start in (out[3], out[4]) if joint else (out[3],):
            out.append((f"{start[0]}-uptrained", start[1], None, start[0]))
    if narrow_calib:  # the same conversion calibrated on one source only: how far its fit carries to other text
        options = [*out[3][2]]
        options[options.index("--calib") + 1] = narrow_calib
        out.insert(4, (f"{out[3][0]}-{narrow_calib}-only", out[3][1], options, None))
    return out


def minutes(row: dict, key: str) -> str:
    return "—" if row.get(key) is None else f"{row[key] / 60:.1f}"


def readme(results: dict) -> str:
    """The tables of a run, every number from results.json."""
    ev, cal, machine = results["evaluation"], results["calibration"], results["machine"]
    original = results["rows"][0]
    sets = ", ".join(f"`{d}` ({original[d]['tokens']:,} tokens)" for d in EVAL_SETS)
    lines = [f"# Conversion quality: {results['model']}\n", f"```\n{results['command']}\n```\n",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {machine.get('date', '')}. "
             f"Calibration: {cal['tokens']:,} tokens of the `{cal['data']}` training split. Held-out text, scored "
             f"in blocks of {ev['seq_len']}: {sets}; `wiki` and `shakespeare` are the validation splits (documents no "
             "calibration or training step saw) of the sources the calibration draws from, `python-reference` is "
             "the Python language reference (`pydoc_data`), a source none of it comes from. Per set: perplexity "
             "(× the original's), top-1 agreement with the original model's next-token choice, and KL(original ‖ "
             "converted) per token. Time: wall minutes of the conversion command, and the CPU minutes it used on all "
             "cores.\n"]
    for target in dict.fromkeys(r["target"] for r in results["rows"][1:]):
        lines += [f"\n## → {target}\n", "| model | KV heads per layer | wall min | CPU min | " +
                  " | ".join(f"{d} ppl (× original) | {d} top-1 agree | {d} KL" for d in EVAL_SETS) + " |",
                  "|---" * (4 + 3 * len(EVAL_SETS)) + "|"]
        for row in [original] + [r for r in results["rows"] if r["target"] == target]:
            kv = row.get("conversion", {}).get("kv_heads_after") or row.get("uptrain", {}).get("kv_heads") or []
            kv = ("source" if row is original else ",".join(map(str, kv)) if len(set(kv)) > 1
                  else str(kv[0]) if kv else "as above")
            cells = [f"{row[d]['perplexity']:,.2f} ({row[d]['perplexity'] / original[d]['perplexity']:.2f}×) | "
                     f"{row[d]['top1_agreement']:.3f} | {row[d]['kl']:.3f}" for d in EVAL_SETS]
            lines.append(f"| {row['name']} | {kv} | {minutes(row, 'seconds')} | {minutes(row, 'cpu_seconds')} | "
                         + " | ".join(cells) + " |")
    lines += ["\n## Commands\n", "```"] + [f"{c['command']}    # {c['seconds']} s" for c in results["commands"]] + ["```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "demo"], default="smollm2")
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", default="/tmp/gqa-quality")
    parser.add_argument("--calib", default=None)
    parser.add_argument("--calib-tokens", type=int, default=65536)
    parser.add_argument("--transfer-steps", type=int, default=300)
    parser.add_argument("--narrow-calib", default=None,
                        help="also convert MQA with aligned + transfer calibrated on this one source (e.g. wiki)")
    parser.add_argument("--uptrain-steps", type=int, default=25, help="distillation steps of 8 x 512 tokens")
    parser.add_argument("--joint", default=None, help="TRANSFER,JOINT steps of a row with the joint stage, e.g. 100,40")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens scored per set")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in OUT/rows.jsonl")
    parser.add_argument("--report", action="store_true", help="rewrite OUT/README.md from OUT/results.json")
    args = parser.parse_args()
    if args.report:
        results = json.loads((Path(args.out) / "results.json").read_text())
        return (Path(args.out) / "README.md").write_text(readme(results))

    work, out = Path(args.workdir) / args.model, Path(args.out)
    # Rows are appended to rows.jsonl as they finish, so a run that dies after two hours keeps what it measured.
    done = {}
    if args.resume and (out / "rows.jsonl").exists():
        done = {row["name"]: row for row in map(json.loads, (out / "rows.jsonl").read_text().splitlines())}
    else:
        shutil.rmtree(work, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "rows.jsonl").write_text("")
    work.mkdir(parents=True, exist_ok=True)
    log: list[dict] = [command for row in done.values() for command in row.get("commands", [])]
    if args.model == "smollm2":
        original, calib, seq_len = work / "original", args.calib or "bundled", 512
        if not (original / "config.json").exists():
            run(["import-gguf", "smollm2", str(original)], log, "import")
    else:
        from gqa.demo import ASSET

        original, calib, seq_len = ASSET, args.calib or "bundled", 256
    rows = []
    for name, label, options, uptrain_from in plans(args.model, calib, args.calib_tokens, args.transfer_steps,
                                                    args.uptrain_steps if args.model == "smollm2" else 0,
                                                    args.narrow_calib,
                                                    tuple(map(int, args.joint.split(","))) if args.joint else None):
        path = original if options is None and uptrain_from is None else work / name
        if name in done:
            rows.append(done[name])
            continue
        if path != original:  # a half-written folder from a run that died here
            shutil.rmtree(path, ignore_errors=True)
        first_command = len(log)
        record = {"name": name, "target": label}
        if options is not None:
            run(["convert", str(original), str(path), *options], log, name)
            record["conversion"] = json.loads((path / "conversion.json").read_text())
        elif uptrain_from is not None:
            # gqa uptrain's defaults for a conversion: distil from its source, continued-training step size
            run(["uptrain", str(work / uptrain_from), str(path), "--data", calib, "--steps", str(args.uptrain_steps),
                 "--batch-size", "8", "--seq-len", str(seq_len), "--eval-every", "1000"], log, name)
            record["uptrain"] = json.loads((path / "train" / "report.json").read_text())
        if options is not None or uptrain_from is not None:
            record["seconds"], record["cpu_seconds"] = log[-1]["seconds"], log[-1]["cpu_seconds"]
        for data in EVAL_SETS:
            record[data] = run(["eval", str(path), "--data", eval_data(data, work), "--seq-len", str(seq_len), "--max-tokens",
                                str(args.eval_tokens), "--reference", str(original), "--json"], log, f"{name} eval {data}")
        record["commands"] = log[first_command:]
        rows.append(record)
        with open(out / "rows.jsonl", "a") as rows_file:
            rows_file.write(json.dumps(record) + "\n")
        print(json.dumps({k: record[k] for k in ("name", *EVAL_SETS)}), flush=True)
    results = {
        "command": "python benchmarks/conversion_quality.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": cpu_model_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")},
        "model": args.model, "calibration": {"data": calib, "tokens": args.calib_tokens},
        "evaluation": {"sets": list(EVAL_SETS), "tokens_per_set": args.eval_tokens,
                       "seq_len": seq_len},
        "commands": log, "rows": rows,
    }
    write_json(out / "results.json", results)
    (out / "README.md").write_text(readme(results))
    print(f"wrote {args.out}/results.json and README.md")


if __name__ == "__main__":
    main()
