"""Did a refactor change what gqa writes? A fixed set of real jobs and the sha256 of every output.

    python scripts/identity_check.py --record scripts/identity.json   # before the first refactor commit
    python scripts/identity_check.py --check scripts/identity.json    # after the last: every digest the same

The jobs cover both model shapes: every conversion method on the embedded demo model (with calibration,
a KV budget, the layer-wise transfer and the joint stage), a tiny T5 v1.1 and a tiny BART built from
configs with transformers (their decoders' self- and cross-attention grouped; T5 with its encoder too),
a short uptraining of each shape (distilled from its source), an export of each (HF folder, gqa's own
format, GGUF), and the stdout of `info --json`, `eval --json` (with a quantized cache too) and
`generate --json`. Each job runs in its own process on one thread (`OMP_NUM_THREADS=1`), so no job's
numbers depend on another's random state or on the thread count.

What is hashed: every file a job writes, with the keys of JSON files that hold wall times or the run's
own folder (`VOLATILE`) removed first, and the job's stdout with the work folder's path replaced by
`WORK`. A digest that differs names its job and file; `--keep DIR` keeps the outputs to compare by hand.
Float results depend on the CPU and the torch build: record and check on the same machine and versions
(scripts/identity.json was recorded with torch 2.13.0+cpu, transformers 5 on the 2-core x86 CI-class machine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "src" / "gqa" / "assets" / "demo-mha"
# JSON keys whose values are wall-clock times, dates or absolute paths of this run: dropped before hashing
VOLATILE = {"seconds", "wall_seconds", "cpu_seconds", "elapsed", "elapsed_seconds", "date", "created", "time",
            "started", "finished", "tokens_per_second", "tokens_per_s", "host", "python", "platform", "versions", "version",
            "gqa_version", "torch", "transformers"}

CALIB = ["--calib", "bundled", "--calib-tokens", "4096", "--calib-seq-len", "64"]
TRAIN = ["--data", "bundled", "--steps", "3", "--batch-size", "2", "--seq-len", "64", "--eval-every", "2",
         "--eval-blocks", "2", "--save-every", "2"]


def jobs() -> list[tuple[str, list[str]]]:
    """(name, gqa arguments); `{w}` is the work folder. In order: later jobs read earlier jobs' outputs."""
    d = str(DEMO)
    out = [
        ("demo-mean-g2", ["convert", d, "{w}/demo-mean-g2", "--kv-heads", "2", "--method", "mean"]),
        ("demo-first-mqa", ["convert", d, "{w}/demo-first-mqa", "--kv-heads", "1", "--method", "first"]),
        ("demo-random-g2", ["convert", d, "{w}/demo-random-g2", "--kv-heads", "2", "--method", "random", "--seed", "3"]),
        ("demo-mean-layers", ["convert", d, "{w}/demo-mean-layers", "--kv-heads-per-layer", "8,4,2,1",
                              "--method", "mean"]),
        ("demo-aligned-g2", ["convert", d, "{w}/demo-aligned-g2", "--kv-heads", "2", "--method", "aligned", *CALIB]),
        ("demo-aligned-budget", ["convert", d, "{w}/demo-aligned-budget", "--kv-budget", "0.5", "--method",
                                 "aligned", *CALIB, "--transfer-steps", "4"]),
        ("demo-joint-mqa", ["convert", d, "{w}/demo-joint-mqa", "--kv-heads", "1", "--method", "aligned", *CALIB,
                            "--transfer-steps", "3", "--joint-steps", "3"]),
        ("demo-mean-native", ["convert", d, "{w}/demo-mean-native", "--kv-heads", "2", "--format", "native"]),
        ("demo-uptrain", ["uptrain", "{w}/demo-mean-g2", "{w}/demo-uptrain", *TRAIN]),
        ("demo-export-hf", ["export", "{w}/demo-uptrain", "{w}/demo-export-hf"]),
        ("demo-export-native", ["export", "{w}/demo-mean-g2", "{w}/demo-export-native", "--format", "native"]),
        ("demo-export-gguf", ["export", "{w}/demo-mean-g2", "{w}/demo-g2.gguf", "--format", "gguf"]),
        ("demo-info", ["info", "{w}/demo-joint-mqa", "--json"]),
        ("demo-eval", ["eval", "{w}/demo-aligned-g2", "--data", "shakespeare", "--max-tokens", "2048", "--seq-len",
                       "128", "--reference", d, "--json"]),
        ("demo-eval-q8", ["eval", "{w}/demo-mean-g2", "--data", "wiki", "--max-tokens", "2048", "--seq-len", "128",
                          "--kv-cache-dtype", "q8_0", "--json"]),
        ("demo-generate", ["generate", "{w}/demo-aligned-g2", "--prompt", "The king said", "--prompt", "Once upon",
                           "--max-new-tokens", "12", "--json"]),
    ]
    for name in ("t5", "bart"):
        m = f"{{w}}/{name}"
        out += [
            (f"{name}-mean-g2", ["convert", m, f"{m}-mean-g2", "--kv-heads", "2", "--method", "mean"]),
            (f"{name}-mean-encoder", ["convert", m, f"{m}-mean-encoder", "--kv-heads", "1", "--method", "mean",
                                      "--convert-encoder"]),
            (f"{name}-aligned-mqa", ["convert", m, f"{m}-aligned-mqa", "--kv-heads", "1", "--method", "aligned",
                                     *CALIB, "--transfer-steps", "3", "--joint-steps", "2"]),
            (f"{name}-uptrain", ["uptrain", f"{m}-mean-g2", f"{m}-uptrain", *TRAIN]),
            (f"{name}-export-native", ["export", f"{m}-uptrain", f"{m}-export-native", "--format", "native"]),
            (f"{name}-export-hf", ["export", m, f"{m}-export-hf"]),
            (f"{name}-info", ["info", f"{m}-aligned-mqa", "--json"]),
            (f"{name}-eval", ["eval", f"{m}-aligned-mqa", "--data", "wiki", "--max-tokens", "1024", "--reference", m,
                              "--json"]),
            (f"{name}-generate", ["generate", f"{m}-mean-g2", "--prompt", "The quick brown", "--max-new-tokens", "8",
                                  "--json"]),
        ]
    return out


def build_seq2seq_sources(work: Path) -> None:
    """A tiny T5 v1.1 and BART from configs (seeded), with the tests' byte-level tokenizer and sentinels."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    import transformers
    from families import train_tokenizer

    tok = train_tokenizer()
    tok.add_special_tokens({"pad_token": "<pad>", "mask_token": "<mask>",
                            "additional_special_tokens": [f"<extra_id_{i}>" for i in range(8)]})
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    configs = {
        "t5": transformers.T5Config(vocab_size=336, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, **ids),
        "bart": transformers.BartConfig(vocab_size=336, d_model=64, encoder_layers=2, decoder_layers=2,
                                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
                                        decoder_ffn_dim=96, max_position_embeddings=128, **ids),
    }
    for name, config in configs.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForSeq2SeqLM.from_config(config).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n or n.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.1)
        model.save_pretrained(work / name)
        tok.save_pretrained(work / name)


def scrub(obj, work: str):
    if isinstance(obj, dict):
        return {k: scrub(v, work) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [scrub(v, work) for v in obj]
    return obj.replace(work, "WORK") if isinstance(obj, str) else obj


def tensors_digest(obj, sha, path: str = "") -> None:
    """Hash a torch.save'd tree by its keys and tensor bytes; the global torch RNG state ("rng") is left out:
    uptraining never seeds or draws from it (its batches come from seeded generators), so it differs run to run."""
    import torch

    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            if key != "rng":
                tensors_digest(obj[key], sha, f"{path}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            tensors_digest(item, sha, f"{path}/{i}")
    elif isinstance(obj, torch.Tensor):
        sha.update(f"{path}:{obj.dtype}:{tuple(obj.shape)}".encode())
        sha.update(obj.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    else:
        sha.update(f"{path}={obj!r}".encode())


def digest(data: bytes, name: str, work: str) -> str:
    if name.endswith(".pt"):
        import io

        import torch

        sha = hashlib.sha256()
        tensors_digest(torch.load(io.BytesIO(data), weights_only=False, map_location="cpu"), sha)
        return sha.hexdigest()
    if name.endswith(".json") or name.endswith(".jsonl"):
        try:
            lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()] \
                if name.endswith(".jsonl") else [json.loads(data)]
            data = json.dumps([scrub(x, work) for x in lines]).encode()  # key order kept: it is in the bytes
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
    elif name.endswith((".md", ".txt", ".log")):
        data = data.decode(errors="replace").replace(work, "WORK").encode()
    return hashlib.sha256(data).hexdigest()


def stdout_digest(text: str, work: str) -> str:
    lines = []
    for line in text.replace(work, "WORK").splitlines():
        try:
            lines.append(json.dumps(scrub(json.loads(line), "WORK")))
        except json.JSONDecodeError:
            lines.append(line)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def run_jobs(work: Path) -> dict[str, dict[str, str]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONHASHSEED="0")
    build_seq2seq_sources(work)
    digests: dict[str, dict[str, str]] = {}
    for name, argv in jobs():
        argv = [a.replace("{w}", str(work)) for a in argv]
        print(f"{name}: gqa {' '.join(argv).replace(str(work), 'WORK')}", flush=True)
        done = subprocess.run([sys.executable, "-m", "gqa", *argv], capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        files = {"stdout": stdout_digest(done.stdout, str(work))}
        target = Path(argv[2]) if argv[0] in ("convert", "uptrain", "export") else None
        for path in sorted(target.rglob("*") if target and target.is_dir() else [target] if target else []):
            if path.is_file():
                rel = str(path.relative_to(target)) if target.is_dir() else path.name
                files[rel] = digest(path.read_bytes(), rel, str(work))
        digests[name] = files
    return digests


def compare(expected: dict, got: dict) -> list[str]:
    problems = []
    for job, files in expected.items():
        for rel, sha in files.items():
            now = got.get(job, {}).get(rel)
            if now != sha:
                problems.append(f"{job}: {rel} {'missing' if now is None else 'differs'}")
        problems += [f"{job}: {rel} is new" for rel in got.get(job, {}) if rel not in files]
    return problems


def numbers(path: Path, work: Path) -> dict[str, torch.Tensor]:
    """A file's numbers by name, to compare two runs within a tolerance: tensors of .safetensors and .pt,
    numeric leaves of .json / .jsonl and JSON stdout lines (volatile keys left out)."""
    import torch
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        return {k: v.double() for k, v in load_file(path).items()}
    if path.suffix == ".pt":
        return {k: v.double() for k, v in flat(torch.load(path, weights_only=False, map_location="cpu")).items()
                if isinstance(v, torch.Tensor) and not k.startswith("/rng") and v.is_floating_point()}
    lines = path.read_text().replace(str(work), "WORK").splitlines()
    leaves = {}
    for i, line in enumerate(lines):
        try:
            leaves.update({f"{i}{k}": torch.tensor(float(v), dtype=torch.float64) for k, v in
                           flat(scrub(json.loads(line), "WORK")).items() if isinstance(v, (int, float))})
        except json.JSONDecodeError:
            pass
    return leaves


def flat(obj, path: str = "") -> dict:
    if isinstance(obj, dict):
        return {k: v for key, item in obj.items() for k, v in flat(item, f"{path}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, item in enumerate(obj) for k, v in flat(item, f"{path}/{i}").items()}
    return {path: obj}


def largest_difference(before: Path, after: Path, problems: list[str]) -> None:
    """For each changed file of two kept runs: the largest absolute difference of its numbers, relative to the
    largest magnitude of the tensor or value it is in."""
    for line in problems:
        job, rel = line.split(": ")[0], line.split(": ")[1].rsplit(" ", 1)[0]
        target = next(a for n, a in jobs() if n == job)[2].replace("{w}/", "")
        a_path, b_path = before / target / rel, after / target / rel
        if rel == "stdout" or not (a_path.is_file() and b_path.is_file()):
            print(f"  {job}: {rel}: not compared (stdout or not a file in both)")
            continue
        a, b = numbers(a_path, before), numbers(b_path, after)
        worst = max((float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)) for k in a
                     if k in b and a[k].shape == b[k].shape), default=0.0)
        print(f"  {job}: {rel}: largest relative difference {worst:.2e}"
              f"{'' if set(a) == set(b) else ' (names differ)'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--record", type=Path, help="write the digests to this JSON file")
    group.add_argument("--check", type=Path, help="compare the digests with this JSON file")
    parser.add_argument("--keep", type=Path, default=None, help="run in this (new) folder and keep it")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="with --check and --keep: a kept run of the recorded tree; print how far each changed "
                             "file's numbers moved")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        digests = run_jobs(work.resolve())
    if args.record:
        args.record.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
        return print(f"recorded {sum(map(len, digests.values()))} digests of {len(digests)} jobs in {args.record}")
    problems = compare(json.loads(args.check.read_text()), digests)
    if problems and args.baseline and args.keep:
        largest_difference(args.baseline, args.keep, problems)
    if problems:
        raise SystemExit("changed:\n  " + "\n  ".join(problems))
    print(f"all {sum(map(len, digests.values()))} digests of {len(digests)} jobs unchanged")


if __name__ == "__main__":
    main()
