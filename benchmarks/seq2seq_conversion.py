"""Experiment (not a test): an encoder–decoder's conversion steps, without uptraining.

Converts the MHA T5 that `gqa experiment paper-t5` pre-trained (its `runs/mha`) to each G by mean pooling
and by `aligned`, each alone, then with the layer-wise transfer, then with transfer and the joint stage,
and scores every result on the experiment's own held-out examples (the validation side of the bundled
corpus's document split, which no calibration step reads). One JSON file of rows.

    python benchmarks/seq2seq_conversion.py /tmp/paper-t5-cpu/runs \
        --settings docs/results/paper-t5-cpu/settings.json --out docs/results/paper-t5-cpu/conversion
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import transformers

from gqa.checkpoints.tokenizer import load_tokenizer
from gqa.pipeline import Pipeline
from gqa.seq2seq_data import prepare_seq2seq

STEPS = ((0, 0), (100, 0), (100, 100))  # (transfer steps per attention, joint-stage steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="the experiment's runs/ folder (its mha/ and tokenizer/)")
    parser.add_argument("--settings", type=Path, required=True, help="the experiment's settings.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kv-heads", default="1,2,4")
    parser.add_argument("--calib-tokens", type=int, default=65536)
    args = parser.parse_args()
    settings = json.loads(args.settings.read_text())
    tokenizer = load_tokenizer(args.runs / "tokenizer")
    pipe = Pipeline(tokenizer, prepare_seq2seq("bundled", tokenizer, settings["seq_len"]), settings["eval_blocks"])
    rows = [dict(kv_heads=8, method="none", transfer_steps=0, joint_steps=0,
                 val_perplexity=pipe.evaluate(args.runs / "mha")["perplexity"])]
    print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as work:
        for g in map(int, args.kv_heads.split(",")):
            for method in ("mean", "aligned"):
                for transfer, joint in STEPS:
                    rows.append(convert_and_score(pipe, args, settings, Path(work), g, method, transfer, joint))
                    print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/seq2seq_conversion.py " + " ".join(
                  [str(args.runs), "--settings", str(args.settings), "--out", str(args.out)]),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                         f"transformers {transformers.__version__}",
              "validation_tokens": int(pipe.val.numel()), "calib_tokens": args.calib_tokens, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")


def convert_and_score(pipe: Pipeline, args, settings: dict, work: Path, g: int, method: str, transfer: int,
                      joint: int) -> dict:
    options = dict(calib="bundled", calib_tokens=args.calib_tokens, calib_seq_len=settings["seq_len"],
                   transfer_steps=transfer, joint_steps=joint)
    if method == "mean" and not (transfer or joint):
        options = {}  # mean pooling reads no calibration text
    start = time.time()
    dest = work / f"g{g}-{method}-t{transfer}-j{joint}"
    scores = pipe.convert(args.runs / "mha", dest, g, method, **options)
    return dict(kv_heads=g, method=method, transfer_steps=transfer, joint_steps=joint,
                val_perplexity=scores["perplexity"], seconds=round(time.time() - start, 1))


if __name__ == "__main__":
    main()
