"""`gqa demo`: the whole method on the embedded default, on a laptop-class CPU in minutes.

Start from the bundled MHA checkpoint (a small Llama pre-trained on the bundled corpus by
scripts/build_demo_model.py), convert it to GQA-2 and MQA with mean / first / random, uptrain each for
α = 5 % of the starting model's pre-training tokens, and measure what every variant costs and keeps:
KV bytes per token, validation perplexity before (α = 0) and after uptraining, top-1 agreement with the
MHA model, and greedy decode tokens/s on this machine. The MHA model is uptrained for the same tokens as a
control, so that gains from simply training longer are not credited to grouping.

Writes results.json (one row per model, with everything needed to check the findings by script), a PNG
(perplexity against KV bytes per token) and prints one table.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .bench import decode_tokens_per_s
from .checkpoints import load
from .checkpoints.tokenizer import load_tokenizer
from .conversion import convert
from .data import prepare
from .errors import GQAError
from .evaluate import compare_blocks
from .train import TrainConfig, train

ASSET = Path(__file__).parent / "assets" / "demo-mha"


@dataclass
class DemoSettings:
    kv_heads: tuple[int, ...] = (2, 1)
    methods: tuple[str, ...] = ("mean", "first", "random")
    alpha: float = 0.05
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 5e-4  # the pre-training run ended at 2e-4; 1e-3 made the MHA control worse, 2e-4 recovers less
    eval_blocks: int = 64
    decode_batch: int = 8
    decode_context: int = 384
    decode_tokens: int = 32
    max_steps: int | None = None  # --quick caps the uptraining steps
    seed: int = 0


_TOKENIZED: dict = {}

QUICK = DemoSettings(eval_blocks=4, decode_batch=2, decode_context=32, decode_tokens=4, max_steps=2)


def say(message: str) -> None:
    print(f"[gqa demo] {message}", flush=True)


def run_demo(out: str | os.PathLike, quick: bool = False, overwrite: bool = False) -> dict:
    settings = QUICK if quick else DemoSettings()
    out = Path(out)
    earlier_demo = (out / ".gqa-demo").is_file()  # a folder an earlier demo wrote may be replaced
    if out.exists() and any(out.iterdir()) and not (overwrite or earlier_demo):
        raise GQAError(f"{out} already exists; pass --overwrite or choose another --out")
    if not (ASSET / "config.json").is_file():
        raise GQAError(f"the demo checkpoint is missing from the installation ({ASSET})")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / ".gqa-demo").write_text("written by gqa demo; a later `gqa demo` may replace this folder\n")
    started = time.time()
    torch.manual_seed(settings.seed)

    pretraining = json.loads((ASSET / "pretraining.json").read_text())
    pretrain_tokens = pretraining["tokens"]
    say(f"starting model: {ASSET.name}, MHA, pre-trained on {pretrain_tokens:,} tokens of the bundled corpus")
    tokenizer = load_tokenizer(ASSET)
    say("tokenizing the bundled corpus (Wikipedia leads + Shakespeare) ...")
    if settings.seq_len not in _TOKENIZED:  # a second demo in the same process reuses the blocks
        _TOKENIZED[settings.seq_len] = prepare("bundled", tokenizer, settings.seq_len)
    data = _TOKENIZED[settings.seq_len]
    val = data.val[: settings.eval_blocks]
    say(f"{data.documents:,} documents; {data.train_tokens:,} training tokens, {data.val_tokens:,} validation "
        f"tokens, of which the first {len(val) * settings.seq_len:,} are scored")

    mha = load(ASSET, dtype=torch.float32)
    reference = compare_blocks(mha, val)
    say(f"MHA validation perplexity {reference['perplexity']:.2f}")
    speed_cache: dict[int, float] = {}

    def speed(model) -> float:
        g = model.config.n_kv_heads[0]
        if g not in speed_cache:
            say(f"measuring decode speed with {g} KV heads ...")
            speed_cache[g] = decode_tokens_per_s(model, settings.decode_batch, settings.decode_context,
                                                 settings.decode_tokens)
        return speed_cache[g]

    def uptrain(source: Path, dest: Path) -> dict:
        cfg = TrainConfig(
            data="bundled", out=str(dest), seq_len=settings.seq_len, batch_size=settings.batch_size,
            alpha=settings.alpha, pretrain_tokens=pretrain_tokens, steps=settings.max_steps, lr=settings.lr,
            eval_every=10**9, eval_blocks=settings.eval_blocks, save_every=10**9, seed=settings.seed,
            overwrite=True, progress=True,
        )
        return train(load(source, dtype=torch.float32), tokenizer, cfg, init_path=str(source), data=data)

    rows = []
    mha_bytes = mha.kv_bytes_per_token(torch.bfloat16)

    def row(name, method, g, model_alpha0, alpha0, uptrained, report, tokens_per_s):
        return {
            "name": name,
            "method": method,
            "kv_heads": g,
            "query_heads": mha.config.n_heads,
            "alpha": report["tokens"] / pretrain_tokens if report else 0.0,
            "alpha_target": settings.alpha,
            "seed": settings.seed,
            "tokens_trained": report["tokens"] if report else 0,
            "kv_bytes_per_token": model_alpha0.kv_bytes_per_token(torch.bfloat16),
            "kv_reduction": mha_bytes / model_alpha0.kv_bytes_per_token(torch.bfloat16),
            "val_perplexity_alpha0": alpha0["perplexity"],
            "val_perplexity": uptrained["perplexity"],
            "reference_perplexity": reference["perplexity"],
            "top1_agreement_alpha0": alpha0.get("top1_agreement", 1.0),
            "top1_agreement": uptrained.get("top1_agreement", 1.0),
            "decode_tokens_per_s": tokens_per_s,
        }

    mha_speed = speed(mha)
    rows.append(row("MHA", "none", mha.config.n_heads, mha, reference, reference, None, mha_speed))

    say("control: the MHA model uptrained for the same tokens")
    report = uptrain(ASSET, out / "mha-uptrained")
    control = compare_blocks(load(out / "mha-uptrained", dtype=torch.float32), val, teacher=mha)
    rows.append(row("MHA + uptraining (control)", "none", mha.config.n_heads, mha, reference, control, report, mha_speed))

    for g in settings.kv_heads:
        for method in settings.methods:
            label = ("MQA" if g == 1 else f"GQA-{g}") + f" {method}"
            dest = out / f"g{g}-{method}"
            say(f"{label}: converting ...")
            convert(ASSET, dest / "converted", kv_heads=g, method=method, seed=settings.seed, progress=False)
            converted = load(dest / "converted", dtype=torch.float32)
            alpha0 = compare_blocks(converted, val, teacher=mha)
            say(f"{label}: perplexity at α = 0 is {alpha0['perplexity']:.2f}; uptraining ...")
            report = uptrain(dest / "converted", dest / "uptrained")
            after = compare_blocks(load(dest / "uptrained", dtype=torch.float32), val, teacher=mha)
            rows.append(row(label, method, g, converted, alpha0, after, report, speed(converted)))

    results = {
        "gqa_version": __version__,
        "command": "gqa demo" + (" --quick" if quick else ""),
        "device": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "torch": torch.__version__, "threads": torch.get_num_threads()},
        "starting_model": {"path": str(ASSET), "pretrain_tokens": pretrain_tokens,
                           "parameters": mha.num_parameters(), "reference_perplexity": reference["perplexity"]},
        "settings": settings.__dict__ | {"kv_heads": list(settings.kv_heads), "methods": list(settings.methods)},
        "validation_tokens": reference["tokens"],
        "seconds": None,
        "rows": rows,
    }
    plot(rows, out / "perplexity_vs_kv_bytes.png")
    results["seconds"] = round(time.time() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(rows))
    say(f"done in {results['seconds']:.0f} s; wrote {out / 'results.json'} and {out / 'perplexity_vs_kv_bytes.png'}")
    return results


def table(rows: list[dict]) -> str:
    header = ("model", "KV heads", "KV bytes/token", "ppl α=0", "ppl uptrained", "top-1 agree", "decode tok/s")
    lines = [header]
    for r in rows:
        lines.append((
            r["name"], str(r["kv_heads"]), f"{r['kv_bytes_per_token']:,}", f"{r['val_perplexity_alpha0']:.2f}",
            f"{r['val_perplexity']:.2f}" + (f" (α={r['alpha']:.3f})" if r["tokens_trained"] else ""),
            f"{r['top1_agreement']:.3f}", f"{r['decode_tokens_per_s']:,.0f}",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    fmt = lambda line: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))  # noqa: E731
    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths), *map(fmt, lines[1:])])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"none": "*", "mean": "o", "first": "s", "random": "^"}
    colors = {"none": "black", "mean": "tab:blue", "first": "tab:orange", "random": "tab:green"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen = set()
    for r in rows:
        m, c = markers[r["method"]], colors[r["method"]]
        label = "MHA + uptraining (control)" if r["method"] == "none" else r["method"]
        if r["tokens_trained"]:
            ax.scatter(r["kv_bytes_per_token"], r["val_perplexity"], marker=m, color=c, s=80,
                       label=None if label in seen else label, zorder=3)
            seen.add(label)
            if r["method"] != "none":
                ax.scatter(r["kv_bytes_per_token"], r["val_perplexity_alpha0"], marker=m, facecolors="none",
                           edgecolors=c, s=80, zorder=2)
                ax.annotate("", (r["kv_bytes_per_token"], r["val_perplexity"]),
                            (r["kv_bytes_per_token"], r["val_perplexity_alpha0"]),
                            arrowprops={"arrowstyle": "->", "color": c, "alpha": 0.4})
        else:
            ax.scatter(r["kv_bytes_per_token"], r["val_perplexity"], marker=m, color=c, s=160,
                       label="MHA (start)", zorder=3)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("KV-cache bytes per token (bf16)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("gqa demo — hollow: right after conversion (α = 0); filled: after uptraining", fontsize=10)
    ax.legend(title="K/V init")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
