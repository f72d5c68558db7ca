"""`gqa experiment paper`: the GQA paper's experiments at small scale, in one command.

1. Pre-train an MHA Llama (12 layers, hidden 512, 8 heads of 64, ~52 M parameters with the demo's 4,096-token
   vocabulary) on the bundled corpus.
2. Convert it to G in {1, 2, 4} (4 = H/2) with mean / first / random and uptrain each for α = 0.05, with two
   seeds (the conversion-method ablation, the paper's Fig. 4).
3. Uptrain the mean-pooled models for α in {0.01, 0.025, 0.1, 0.2} as well (quality vs α, Fig. 5); α = 0 is
   the converted model itself.
4. Train the same GQA/MQA architectures from scratch for the pre-training tokens plus α = 0.05 of them, two
   seeds (the reference the paper compares uptraining against).
5. Measure decode time per token of each architecture on this device (quality vs decode time, Fig. 3/6).

Every run's numbers go to results.json; the figures and README.md are made from that file, and each
statement in the README is computed from it, so it can be checked by a script. Sizes are set for one
~10-minute run on an H100; `--quick` shrinks everything to a CPU pipeline check.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from .bench import decode_tokens_per_s, device_name
from .checkpoints import load
from .checkpoints.tokenizer import load_tokenizer
from .conversion import convert
from .data import prepare
from .demo import ASSET
from .errors import GQAError
from .evaluate import compare_blocks
from .model import ModelConfig, Transformer
from .train import TrainConfig, init_weights, train


@dataclass
class PaperSettings:
    model: dict = field(default_factory=lambda: dict(
        vocab_size=4096, dim=512, n_layers=12, n_heads=8, n_kv_heads=8, head_dim=64, hidden_dim=2048,
        max_positions=512, tie_embeddings=True))
    kv_heads: tuple[int, ...] = (1, 2, 4)
    methods: tuple[str, ...] = ("mean", "first", "random")
    alpha: float = 0.05
    alphas: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.2)
    seeds: tuple[int, ...] = (0, 1)
    pretrain_steps: int = 1500
    seq_len: int = 512
    batch_size: int = 32
    lr: float = 1e-3
    uptrain_lr: float = 3e-4
    eval_blocks: int = 128
    compile: bool = True
    decode_batch: int = 8
    decode_context: int = 448


QUICK = PaperSettings(
    model=dict(vocab_size=4096, dim=32, n_layers=2, n_heads=8, n_kv_heads=8, head_dim=4, hidden_dim=64,
               max_positions=64, tie_embeddings=True),
    alphas=(0.05, 0.2), pretrain_steps=20, seq_len=32, batch_size=4, eval_blocks=4, compile=False,
    decode_batch=2, decode_context=16,
)


def read_settings(defaults, path: str | Path | None):
    """`defaults` with the fields named in a JSON file replaced (lists become tuples): how a run at another
    scale (say, one that fits a CPU) is described and recorded."""
    if path is None:
        return defaults
    try:
        given = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise GQAError(f"settings file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise GQAError(f"settings file {path} is not JSON: {e}") from None
    names = {f.name for f in fields(defaults)}
    if not isinstance(given, dict) or set(given) - names:
        unknown = sorted(set(given) - names) if isinstance(given, dict) else "not an object"
        raise GQAError(f"settings file {path}: unknown settings {unknown}; known: {', '.join(sorted(names))}")
    return replace(defaults, **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})


def command_line(which: str, quick: bool, settings: str | Path | None, out: Path) -> str:
    return " ".join(["gqa experiment", which, *(["--quick"] if quick else []),
                     *([f"--settings {settings}"] if settings else []), f"--out {out}"])


def fresh_runs(out: Path) -> Path:
    """OUT/runs, emptied: each experiment starts from nothing."""
    runs = out / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    return runs


def run_paper(out: str | Path, quick: bool = False, device: str | None = None,
              settings: str | Path | None = None) -> dict:
    s = read_settings(QUICK if quick else PaperSettings(), settings)
    out = Path(out)
    runs = fresh_runs(out)
    started = time.time()
    tokenizer = load_tokenizer(ASSET)
    data = prepare("bundled", tokenizer, s.seq_len)
    val = data.val[: s.eval_blocks]
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = dict(data="bundled", seq_len=s.seq_len, batch_size=s.batch_size, eval_every=10**9,
                eval_blocks=s.eval_blocks, save_every=10**9, compile=s.compile, device=device, overwrite=True)

    def fresh(config: ModelConfig, seed: int) -> Transformer:
        torch.manual_seed(seed)
        model = Transformer(config)
        init_weights(model)
        model.hf_config, model.source_dir = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, ASSET
        return model

    def evaluate(path: Path) -> dict:
        model = load(path, dtype=torch.float32, device=dev)
        return compare_blocks(model, val.to(model.device))

    # 1. the MHA starting point
    mha_config = ModelConfig(**s.model)
    pre = train(fresh(mha_config, 0), tokenizer, TrainConfig(out=str(runs / "mha"), steps=s.pretrain_steps, lr=s.lr,
                                                             seed=0, **base), data=data)
    pretrain_tokens = pre["tokens"]
    rows = []

    def add(row: dict) -> None:  # also logged as it comes, so a run cut short keeps what it measured
        row["reference_perplexity"] = rows[0]["val_perplexity"] if rows else row["val_perplexity"]  # the MHA model's
        rows.append(row)
        with open(runs / "rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    add({"kind": "mha", "kv_heads": mha_config.n_heads, "method": "none", "alpha": 0.0, "seed": 0,
         "tokens": pretrain_tokens, "val_perplexity": evaluate(runs / "mha")["perplexity"]})

    def uptrain(src: Path, dest: Path, alpha: float, seed: int) -> dict:
        cfg = TrainConfig(out=str(dest), alpha=alpha, pretrain_tokens=pretrain_tokens, lr=s.uptrain_lr, seed=seed,
                          **base)
        return train(load(src, dtype=torch.float32), tokenizer, cfg, init_path=str(src), data=data)

    # the control: the MHA model itself uptrained for α = 0.05. While the starting model still improves with
    # more tokens (it does at small scale), part of any uptrained model's gain is just more training.
    for train_seed in s.seeds:
        dest = runs / f"mha-a{s.alpha}-t{train_seed}"
        report = uptrain(runs / "mha", dest, s.alpha, train_seed)
        add({"kind": "control", "kv_heads": mha_config.n_heads, "method": "none", "alpha": s.alpha, "seed": train_seed,
             "tokens": pretrain_tokens + report["tokens"], "val_perplexity": evaluate(dest)["perplexity"]})

    # 2-3. conversions, the method ablation at α = 0.05 (two seeds), the α sweep for mean pooling
    for g in s.kv_heads:
        for method in s.methods:
            for seed in s.seeds if method == "random" else s.seeds[:1]:
                conv = runs / f"g{g}-{method}-s{seed}"
                convert(runs / "mha", conv, kv_heads=g, method=method, seed=seed, progress=False)
                add({"kind": "uptrained", "kv_heads": g, "method": method, "alpha": 0.0, "seed": seed,
                     "tokens": pretrain_tokens, "val_perplexity": evaluate(conv)["perplexity"]})
                alphas = s.alphas if method == "mean" else (s.alpha,)
                for alpha in alphas:
                    for train_seed in s.seeds if alpha == s.alpha else s.seeds[:1]:
                        dest = runs / f"g{g}-{method}-s{seed}-a{alpha}-t{train_seed}"
                        report = uptrain(conv, dest, alpha, train_seed)
                        add({"kind": "uptrained", "kv_heads": g, "method": method, "alpha": alpha,
                             "seed": train_seed, "init_seed": seed, "tokens": pretrain_tokens + report["tokens"],
                             "val_perplexity": evaluate(dest)["perplexity"]})

    # 4. the same architectures from scratch, for the same total tokens as α = 0.05 uptraining
    scratch_steps = round(s.pretrain_steps * (1 + s.alpha))
    for g in s.kv_heads:
        for seed in s.seeds:
            dest = runs / f"scratch-g{g}-s{seed}"
            config = ModelConfig(**{**s.model, "n_kv_heads": g})
            report = train(fresh(config, seed), tokenizer,
                           TrainConfig(out=str(dest), steps=scratch_steps, lr=s.lr, seed=seed, **base), data=data)
            add({"kind": "scratch", "kv_heads": g, "method": "scratch", "alpha": None, "seed": seed,
                 "tokens": report["tokens"], "val_perplexity": evaluate(dest)["perplexity"]})

    # 5. decode time per token of each architecture on this device
    decode = {}
    for g in (mha_config.n_heads, *s.kv_heads):
        path = runs / "mha" if g == mha_config.n_heads else runs / f"g{g}-mean-s0"
        model = load(path, dtype=torch.bfloat16 if dev.startswith("cuda") else torch.float32, device=dev)
        tps = decode_tokens_per_s(model, s.decode_batch, s.decode_context, 32 if not quick else 4)
        decode[g] = {"tokens_per_s": tps, "ms_per_token": 1e3 * s.decode_batch / tps,
                     "kv_bytes_per_token": model.kv_bytes_per_token(torch.bfloat16)}

    results = {
        "command": command_line("paper", quick, settings, out),
        "device": device_name(torch.device(dev)),
        "settings": asdict(s),
        "pretrain_tokens": pretrain_tokens,
        "validation_tokens": int(len(val) * s.seq_len),
        "rows": rows,
        "decode": {str(k): v for k, v in decode.items()},
        "seconds": round(time.time() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    figures(results, out)
    (out / "README.md").write_text(findings(results))
    return results


def rewrite_report(which: str, out: str | Path) -> dict:
    """README.md and figures again from OUT/results.json (they are functions of it), without re-running."""
    out = Path(out)
    try:
        results = json.loads((out / "results.json").read_text())
    except FileNotFoundError:
        raise GQAError(f"no results.json in {out} to rewrite the report from") from None
    if which == "paper":
        figures(results, out)
        (out / "README.md").write_text(findings(results))
    else:
        smol_figure(results, out / "recovery.png")
        (out / "README.md").write_text(smol_readme(results))
    return results


def perplexities(rows, **match) -> list[float]:
    return [r["val_perplexity"] for r in rows if all(r.get(k) == v for k, v in match.items())]


def mean_ppl(rows, **match) -> float | None:
    values = perplexities(rows, **match)
    return statistics.mean(values) if values else None


def seed_spread(rows, **match) -> float:
    """max - min of the perplexities of the runs that differ only by seed: the run-to-run noise of a point."""
    values = perplexities(rows, **match)
    return max(values) - min(values) if len(values) > 1 else 0.0


def compare(a: str, b: str, ppl: dict, noise: dict) -> tuple[str, str]:
    """Is method a better than b? A difference within the larger seed spread of the two is a tie."""
    diff, tol = ppl[b] - ppl[a], max(noise[a], noise[b])
    verdict = "tie" if abs(diff) <= tol else ("better" if diff > 0 else "worse")
    words = {"better": "better than", "worse": "worse than", "tie": "a tie with"}[verdict]
    return verdict, f"{a} {ppl[a]:.2f} {words} {b} {ppl[b]:.2f}, seed spread {tol:.2f}"


def control_line(rows: list[dict], alpha: float) -> str:
    control = mean_ppl(rows, kind="control")
    if control is None:
        return " (No MHA control in this run.)"
    return (f" The MHA model uptrained the same way for α = {alpha} (control, mean of seeds): {control:.2f}; "
            f"an uptrained GQA/MQA model is best read against this, not only against the MHA model.")


def findings(results: dict) -> str:
    """The README of the run: a table and the paper's claims checked against the numbers, all from the JSON."""
    rows, s = results["rows"], results["settings"]
    alpha = s["alpha"]
    mha = rows[0]["val_perplexity"]
    lines = ["# The GQA paper at small scale\n", f"```\n{results['command']}\n```\n",
             f"Device: {results['device']}; {results['seconds']:.0f} s; pre-training {results['pretrain_tokens']:,} "
             f"tokens; validation {results['validation_tokens']:,} tokens. Every number below is in "
             f"[results.json](results.json).\n",
             f"MHA perplexity: {mha:.2f}." + control_line(rows, alpha) + "\n",
             f"| G | mean α=0 | mean α={alpha} | first α={alpha} | random α={alpha} | from scratch |",
             "|---|---|---|---|---|---|"]
    for g in s["kv_heads"]:
        cells = [mean_ppl(rows, kv_heads=g, method="mean", alpha=0.0)]
        cells += [mean_ppl(rows, kv_heads=g, method=m, alpha=alpha) for m in ("mean", "first", "random")]
        cells.append(mean_ppl(rows, kv_heads=g, kind="scratch"))
        lines.append(f"| {g} | " + " | ".join("—" if c is None else f"{c:.2f}" for c in cells) + " |")
    lines.append("\n## The paper's findings, checked\n")
    for g in s["kv_heads"]:
        ppl = {m: mean_ppl(rows, kv_heads=g, method=m, alpha=alpha) for m in ("mean", "first", "random")}
        noise = {m: seed_spread(rows, kv_heads=g, method=m, alpha=alpha) for m in ("mean", "first", "random")}
        pairs = [compare(a, b, ppl, noise) for a, b in (("mean", "first"), ("first", "random"))]
        verdict = ("does not hold" if any(v == "worse" for v, _ in pairs) else
                   "holds" if all(v == "better" for v, _ in pairs) else "holds only up to a tie")
        lines.append(f"- G = {g}: mean pooling > first head > random at α = {alpha}: {verdict} ("
                     + "; ".join(text for _, text in pairs) + ").")
        sweep = [(a, mean_ppl(rows, kv_heads=g, method="mean", alpha=a)) for a in [0.0, *s["alphas"]]]
        sweep = [(a, p) for a, p in sweep if p is not None]
        line = "  Quality vs α (mean): " + ", ".join(f"α={a}: {p:.2f}" for a, p in sweep)
        ppl_at = dict(sweep)
        if 0.0 in ppl_at and alpha in ppl_at and len(sweep) > 2 and sweep[-1][0] > alpha:
            top_alpha, top = sweep[-1]
            share = (ppl_at[0.0] - ppl_at[alpha]) / (ppl_at[0.0] - top) if ppl_at[0.0] != top else float("nan")
            line += f"; α={alpha} gets {share:.0%} of the improvement α={top_alpha} gets"
        lines.append(line + ".")
        at_zero = {m: mean_ppl(rows, kv_heads=g, method=m, alpha=0.0) for m in ("mean", "first", "random")}
        if all(v is not None for v in at_zero.values()):
            lines.append("  Before uptraining (α = 0): " + ", ".join(f"{m} {v:.2f}" for m, v in at_zero.items())
                         + f"; best {min(at_zero, key=at_zero.get)}.")
        scratch = mean_ppl(rows, kv_heads=g, kind="scratch")
        if scratch is not None:
            ppl["from scratch"], noise["from scratch"] = scratch, seed_spread(rows, kv_heads=g, kind="scratch")
            verdict, text = compare("mean", "from scratch", ppl, noise)
            lines.append(f"  Uptrained (α={alpha}) vs the same architecture trained from scratch on the same total "
                         f"tokens: {text} — uptraining is {dict(better='better', worse='worse', tie='no better')[verdict]}.")
    d = results["decode"]
    mha_key = str(rows[0]["kv_heads"])
    lines.append("\n## Decode time per token on this device\n")
    for g, v in d.items():
        lines.append(f"- G = {g}: {v['ms_per_token']:.3f} ms per step of {s['decode_batch']} sequences "
                     f"({v['tokens_per_s']:,.0f} tokens/s, {d[mha_key]['ms_per_token'] / v['ms_per_token']:.2f}× MHA), "
                     f"{v['kv_bytes_per_token']:,} KV bytes per token.")
    lines.append("\nFigures: quality vs decode time (quality_vs_time.png), conversion methods (methods.png), "
                 "quality vs α (alpha.png).\n")
    return "\n".join(lines)


def log_y(ax) -> None:
    """Log-scale y with plain numbers on the ticks (perplexities, not powers of ten)."""
    from matplotlib.ticker import LogLocator, ScalarFormatter

    ax.set_yscale("log")
    ax.yaxis.set_minor_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())


def figures(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, s = results["rows"], results["settings"]
    alpha = s["alpha"]
    mha_g = rows[0]["kv_heads"]

    fig, ax = plt.subplots(figsize=(6, 4))
    for g, v in results["decode"].items():
        g = int(g)
        p = rows[0]["val_perplexity"] if g == mha_g else mean_ppl(rows, kv_heads=g, method="mean", alpha=alpha)
        ax.scatter(v["ms_per_token"], p, s=60)
        ax.annotate("MHA" if g == mha_g else ("MQA" if g == 1 else f"GQA-{g}"), (v["ms_per_token"], p))
    ax.set_xlabel("decode time per step (ms)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"quality vs decode time (uptrained, α = {alpha})")
    fig.tight_layout()
    fig.savefig(out / "quality_vs_time.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.25
    for i, m in enumerate(("mean", "first", "random")):
        values = [mean_ppl(rows, kv_heads=g, method=m, alpha=alpha) for g in s["kv_heads"]]
        ax.bar([j + i * width for j in range(len(values))], values, width, label=m)
    ax.set_xticks([j + width for j in range(len(s["kv_heads"]))], [f"G = {g}" for g in s["kv_heads"]])
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"conversion method (α = {alpha}, mean of seeds)")
    heights = [p.get_height() for p in ax.patches] + [rows[0]["val_perplexity"]]
    ax.set_ylim(0.9 * min(heights), 1.05 * max(heights))  # the differences, not the distance from zero
    ax.axhline(rows[0]["val_perplexity"], color="black", linestyle="--", label="MHA")
    ax.legend(fontsize=8, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(out / "methods.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for g in s["kv_heads"]:
        pts = [(a, mean_ppl(rows, kv_heads=g, method="mean", alpha=a)) for a in [0.0, *s["alphas"]]]
        pts = [(a, p) for a, p in pts if p is not None]
        ax.plot(*zip(*pts), marker="o", label="MQA" if g == 1 else f"GQA-{g}")
    ax.axhline(rows[0]["val_perplexity"], color="black", linestyle="--", label="MHA")
    control = mean_ppl(rows, kind="control")
    if control is not None:
        ax.axhline(control, color="gray", linestyle=":", label=f"MHA uptrained α={alpha}")
    ax.set_xlabel("uptraining proportion α")
    ax.set_ylabel("validation perplexity")
    log_y(ax)
    ax.set_title("quality vs α (mean pooling)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "alpha.png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ SmolLM2

@dataclass
class SmolSettings:
    methods: tuple[str, ...] = ("mean", "first", "random")  # converted and evaluated
    uptrain_methods: tuple[str, ...] | None = None  # of those, uptrained (default: all)
    distill: tuple[bool, ...] = (False, True)
    steps: int = 500
    seq_len: int = 512
    batch_size: int = 16
    lr: float = 3e-4
    eval_every: int = 50
    eval_blocks: int = 64
    distill_weight: float = 0.5
    compile: bool = True


SMOL_QUICK = SmolSettings(methods=("mean",), steps=2, seq_len=32, batch_size=2, eval_every=1, eval_blocks=2,
                          compile=False)


def run_smollm2(out: str | Path, quick: bool = False, device: str | None = None,
                settings: str | Path | None = None) -> dict:
    """SmolLM2-135M (9 query heads, 3 KV heads) -> MQA with mean / first / random, uptrained on the bundled
    corpus with and without distillation from the original; held-out perplexity along uptraining."""
    from .checkpoints.gguf import gguf_to_hf, packaged_smollm2

    s = read_settings(SMOL_QUICK if quick else SmolSettings(), settings)
    out = Path(out)
    runs = fresh_runs(out)
    started = time.time()
    original = gguf_to_hf(packaged_smollm2(), runs / "smollm2")
    tokenizer = load_tokenizer(original)
    data = prepare("bundled", tokenizer, s.seq_len)
    val = data.val[: s.eval_blocks]
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")

    def ppl(path: Path) -> float:
        return compare_blocks(load(path, dtype=torch.float32, device=dev), val.to(dev))["perplexity"]

    curves, converted = [], {}
    before = ppl(original)
    for method in s.methods:
        conv = runs / f"converted-{method}"
        convert(original, conv, kv_heads=1, method=method, progress=False)
        converted[method] = ppl(conv)
        if s.uptrain_methods is not None and method not in s.uptrain_methods:
            continue
        for distill in s.distill:
            dest = runs / f"uptrained-{method}{'-distill' if distill else ''}"
            cfg = TrainConfig(data="bundled", out=str(dest), seq_len=s.seq_len, batch_size=s.batch_size,
                              steps=s.steps, lr=s.lr, eval_every=s.eval_every, eval_blocks=s.eval_blocks,
                              save_every=10**9, compile=s.compile, device=device, overwrite=True,
                              teacher=str(original) if distill else None, distill_weight=s.distill_weight)
            train(load(conv, dtype=torch.float32), tokenizer, cfg, init_path=str(conv), data=data)
            log = [json.loads(line) for line in (dest / "train" / "log.jsonl").read_text().splitlines()]
            points = [(r["tokens"], r["val_perplexity"]) for r in log if "val_perplexity" in r]
            curves.append({"method": method, "distill": distill, "kv_heads": 1, "points": points,
                           "val_perplexity_converted": points[0][1], "val_perplexity_final": points[-1][1]})
    results = {
        "command": command_line("smollm2", quick, settings, out),
        "device": device_name(torch.device(dev)),
        "settings": asdict(s),
        "validation_tokens": int(len(val) * s.seq_len),
        "original_perplexity": before,
        "converted_perplexity": converted,
        "curves": curves,
        "seconds": round(time.time() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    smol_figure(results, out / "recovery.png")
    (out / "README.md").write_text(smol_readme(results))
    return results


def smol_readme(results: dict) -> str:
    before, converted, curves = results["original_perplexity"], results["converted_perplexity"], results["curves"]
    lines = ["# SmolLM2-135M: 3 KV heads -> 1 (MQA), uptrained on the bundled corpus\n",
             f"```\n{results['command']}\n```\n",
             f"Device: {results['device']}; {results['seconds']:.0f} s; validation {results['validation_tokens']:,} "
             f"held-out tokens of the bundled corpus. Numbers from [results.json](results.json); "
             f"curve in [recovery.png](recovery.png).\n",
             f"Original SmolLM2-135M (GQA-3): perplexity {before:.2f}. Converted to MQA, before uptraining: "
             + ", ".join(f"{m} {p:,.2f}" for m, p in converted.items()) + ".\n",
             "| K/V init | distillation | after conversion | after uptraining | tokens |", "|---|---|---|---|---|"]
    for c in curves:
        lines.append(f"| {c['method']} | {'yes' if c['distill'] else 'no'} | {c['val_perplexity_converted']:.2f} | "
                     f"{c['val_perplexity_final']:.2f} | {c['points'][-1][0]:,} |")
    best = min(curves, key=lambda c: c["val_perplexity_final"])
    lines.append(f"\nBest after uptraining: {best['method']}{' with distillation' if best['distill'] else ''}, "
                 f"{best['val_perplexity_final']:.2f} ({best['val_perplexity_final'] / before:.2f}× the original's "
                 f"perplexity).\n")
    for method in dict.fromkeys(c["method"] for c in curves):
        pair = {c["distill"]: c["val_perplexity_final"] for c in curves if c["method"] == method}
        if len(pair) == 2:
            verdict = "helps" if pair[True] < pair[False] else "does not help"
            lines.append(f"- {method}: distillation from the original {verdict} at this budget "
                         f"({pair[True]:.2f} with, {pair[False]:.2f} without).")
    return "\n".join(lines) + "\n"


def smol_figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in results["curves"]:
        tokens, ppl = zip(*c["points"])
        ax.plot(tokens, ppl, marker=".", linestyle="--" if c["distill"] else "-",
                label=f"{c['method']}{' + distillation' if c['distill'] else ''}")
    ax.axhline(results["original_perplexity"], color="black", linestyle=":", label="original (3 KV heads)")
    log_y(ax)
    ax.set_xlabel("uptraining tokens")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("SmolLM2-135M converted to MQA: recovery during uptraining")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
