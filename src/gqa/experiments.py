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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .attention import heads_name
from .bench import device_name, interleaved_decode_rates
from .checkpoints import load
from .checkpoints.seq2seq import t5_config
from .checkpoints.tokenizer import load_tokenizer
from .conversion import methods as conversion_methods
from .data import prepare
from .demo import ASSET
from .devices import default_device
from .errors import GQAError
from .jsonfiles import append_jsonl, read_json, write_json
from .kinds import kind_of
from .model import ModelConfig
from .pipeline import Pipeline, settings_for
from .plots import log_y, pyplot
from .presets import T5_SENTINELS, preset_fields
from .seq2seq import Seq2SeqConfig


@dataclass
class PaperSettings:
    architecture: str = "llama"  # "llama" (a decoder) or "t5" (an encoder–decoder, the paper's own setting)
    model: dict = field(default_factory=lambda: preset_fields("paper-llama"))
    kv_heads: tuple[int, ...] = (1, 2, 4)
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(conversion_methods.REGISTRY))  # all registered
    sweep_methods: tuple[str, ...] = ("mean", "aligned")  # uptrained over every α in `alphas`
    alpha: float = 0.05
    alphas: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2)
    calib_tokens: int = 65536  # aligned: calibration text (the corpus's training split)
    transfer_steps: int = 100  # aligned: layer-wise attention transfer steps per layer
    seeds: tuple[int, ...] = (0, 1)
    scratch: bool = True  # also train the GQA/MQA architectures from scratch (the most expensive part)
    pretrain_steps: int = 1500
    seq_len: int = 512
    batch_size: int = 32
    lr: float = 1e-3
    uptrain_lr: float = 3e-4
    eval_blocks: int = 128
    compile: bool = True
    decode_batch: int = 8
    decode_context: int = 448
    decode_tokens: int = 32
    decode_repeats: int = 5


PAPER_QUICK = dict(
    model=preset_fields("paper-llama-quick"),
    alphas=(0.05, 0.2), pretrain_steps=20, seq_len=32, batch_size=4, eval_blocks=4, compile=False,
    decode_batch=2, decode_context=16, decode_tokens=4, decode_repeats=2, calib_tokens=256, transfer_steps=2,
)


PAPER_T5 = dict(  # the paper's setting: a T5 (v1.0 layout) pre-trained with span corruption; decoder attention grouped
    architecture="t5", model=preset_fields("paper-t5"),
    methods=("mean", "first", "random", "aligned"), sweep_methods=("mean", "aligned"), seq_len=256,
    transfer_steps=100)  # as for decoders: `aligned`, then the layer-wise transfer
PAPER_T5_QUICK = dict(model=preset_fields("paper-t5-quick"), alphas=(0.05, 0.2), pretrain_steps=20,
                      seq_len=32, batch_size=4, eval_blocks=4, compile=False, decode_batch=2, decode_context=16,
                      decode_tokens=4, decode_repeats=2, calib_tokens=256, transfer_steps=2)


def t5_tokenizer(folder: Path):
    """The demo model's tokenizer with T5's sentinels and a padding token, saved in `folder`."""
    tokenizer = load_tokenizer(ASSET)
    tokenizer.add_special_tokens({"pad_token": "<pad>",
                                  "additional_special_tokens": [f"<extra_id_{i}>" for i in range(T5_SENTINELS)]})
    tokenizer.save_pretrained(folder)
    return load_tokenizer(folder)


def conversion_options(method: str, calib_tokens: int, seq_len: int, transfer_steps: int) -> dict:
    """What a calibrated method is given: the bundled corpus's training split, then layer-wise transfer."""
    if not conversion_methods.get(method).calibrated:
        return {}
    return dict(calib="bundled", calib_tokens=calib_tokens, calib_seq_len=seq_len, transfer_steps=transfer_steps)


def command_line(which: str, quick: bool, settings: str | Path | None, out: Path) -> str:
    return " ".join(["gqa experiment", which, *(["--quick"] if quick else []),
                     *([f"--settings {settings}"] if settings else []), f"--out {out}"])


def fresh_runs(out: Path) -> Path:
    """OUT/runs, emptied: each experiment starts from nothing."""
    runs = out / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    return runs


def resolve(device: str | None) -> str:
    return device or default_device()


class Rows(list):
    """The experiment's result rows, each also logged to runs/rows.jsonl as it comes, so a run cut short keeps
    what it measured. Every row carries the MHA model's perplexity (the first row's) as its reference."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def add(self, **row) -> None:
        row["reference_perplexity"] = self[0]["val_perplexity"] if self else row["val_perplexity"]
        self.append(row)
        append_jsonl(self.path, row)


def fresh_model(config, seed: int, tokenizer_dir: Path = ASSET):
    """A model to train from scratch: a Llama-style decoder, or a T5 (v1.0 layout) for a `Seq2SeqConfig`."""
    torch.manual_seed(seed)
    kind = kind_of(config)
    model = kind.build(config)
    model.hf_config = FRESH_HF_CONFIG[kind.name](config)
    model.init_weights()
    model.source_dir = tokenizer_dir
    return model


FRESH_HF_CONFIG = {  # what a model trained from scratch is written as, by kind
    "decoder": lambda config: {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
    "encoder-decoder": lambda config: t5_config(config).to_dict(),
}


def paper_model_config(s: PaperSettings, kv_heads: int | None = None):
    """The experiment's MHA config, or the same architecture with `kv_heads` KV heads (in the decoder's self-
    and cross-attention for a T5, as the paper groups them)."""
    if s.architecture == "t5":  # T5 v1.0's layout: a tied head after the decoder's output scaled by dim^-0.5
        config = Seq2SeqConfig(**{"output_scale": s.model["dim"] ** -0.5, **s.model})
        return config if kv_heads is None else replace(config, self_kv_heads=[kv_heads] * config.n_decoder_layers,
                                                       cross_kv_heads=[kv_heads] * config.n_decoder_layers)
    return ModelConfig(**({**s.model, "n_kv_heads": kv_heads} if kv_heads is not None else s.model))


def run_paper(out: str | Path, quick: bool = False, device: str | None = None,
              settings: str | Path | None = None, which: str = "paper") -> dict:
    """The GQA paper at small scale (`which="paper-t5"`: in its own encoder–decoder setting)."""
    t5 = which == "paper-t5"
    defaults = replace(PaperSettings(), **PAPER_T5) if t5 else PaperSettings()
    s = settings_for(defaults, {**PAPER_QUICK, **(PAPER_T5_QUICK if t5 else {})}, quick, settings)
    out = Path(out)
    runs = fresh_runs(out)
    started = time.time()
    tokenizer_dir = runs / "tokenizer" if s.architecture == "t5" else ASSET
    tokenizer = t5_tokenizer(tokenizer_dir) if s.architecture == "t5" else load_tokenizer(ASSET)
    mha_config = paper_model_config(s)
    data = kind_of(mha_config).prepare_data("bundled", tokenizer, s.seq_len, val_fraction=0.05, seed=0)
    pipe = Pipeline(tokenizer, data, s.eval_blocks, device=resolve(device),
                    train_settings=dict(data="bundled", seq_len=s.seq_len, batch_size=s.batch_size, eval_every=None,
                                        eval_blocks=s.eval_blocks, save_every=None, compile=s.compile, device=device))
    rows = Rows(runs / "rows.jsonl")
    # 1. the MHA starting point
    pre, scores = pipe.train(fresh_model(mha_config, 0, tokenizer_dir), runs / "mha", steps=s.pretrain_steps,
                             lr=s.lr, seed=0)
    pretrain_tokens = pre["tokens"]
    rows.add(kind="mha", kv_heads=mha_config.n_heads, method="none", alpha=0.0, seed=0, tokens=pretrain_tokens,
             val_perplexity=scores["perplexity"])
    uptrain_paper_models(pipe, s, runs, rows, pretrain_tokens, mha_config.n_heads)
    # 4. the same architectures from scratch, for the same total tokens as α = 0.05 uptraining
    for g in s.kv_heads if s.scratch else ():
        for seed in s.seeds:
            config = paper_model_config(s, g)
            report, scores = pipe.train(fresh_model(config, seed, tokenizer_dir), runs / f"scratch-g{g}-s{seed}",
                                        steps=round(s.pretrain_steps * (1 + s.alpha)), lr=s.lr, seed=seed)
            rows.add(kind="scratch", kv_heads=g, method="scratch", alpha=None, seed=seed, tokens=report["tokens"],
                     val_perplexity=scores["perplexity"])
    results = {
        "command": command_line(which, quick, settings, out),
        "device": device_name(torch.device(pipe.device)),
        "settings": asdict(s),
        "pretrain_tokens": pretrain_tokens,
        "validation_tokens": pipe.val.numel() if s.architecture == "t5" else int(len(pipe.val) * s.seq_len),
        "rows": list(rows),
        "decode": paper_decode(s, runs, mha_config.n_heads, pipe.device),
        "seconds": round(time.time() - started, 1),
    }
    write_json(out / "results.json", results)
    figures(results, out)
    (out / "README.md").write_text(findings(results))
    return results


def uptrain_paper_models(pipe: Pipeline, s: PaperSettings, runs: Path, rows: Rows, pretrain_tokens: int,
                         n_heads: int) -> None:
    """The MHA control, the conversion-method ablation at α (two seeds) and the α sweep for mean pooling."""
    def uptrain(src: Path, dest: Path, alpha: float, seed: int) -> tuple[dict, dict]:
        return pipe.uptrain(src, dest, alpha=alpha, pretrain_tokens=pretrain_tokens, lr=s.uptrain_lr, seed=seed)

    # the control: the MHA model itself uptrained for α. While the starting model still improves with more
    # tokens (it does at small scale), part of any uptrained model's gain is just more training.
    for train_seed in s.seeds:
        report, scores = uptrain(runs / "mha", runs / f"mha-a{s.alpha}-t{train_seed}", s.alpha, train_seed)
        rows.add(kind="control", kv_heads=n_heads, method="none", alpha=s.alpha, seed=train_seed,
                 tokens=pretrain_tokens + report["tokens"], val_perplexity=scores["perplexity"])
    for g in s.kv_heads:
        for method in s.methods:
            for seed in s.seeds if method == "random" else s.seeds[:1]:
                conv = runs / f"g{g}-{method}-s{seed}"
                scores = pipe.convert(runs / "mha", conv, g, method, seed=seed,
                                      **conversion_options(method, s.calib_tokens, s.seq_len, s.transfer_steps))
                rows.add(kind="uptrained", kv_heads=g, method=method, alpha=0.0, seed=seed, tokens=pretrain_tokens,
                         val_perplexity=scores["perplexity"])
                for alpha in s.alphas if method in s.sweep_methods else (s.alpha,):
                    for train_seed in s.seeds if alpha == s.alpha else s.seeds[:1]:
                        report, scores = uptrain(conv, runs / f"g{g}-{method}-s{seed}-a{alpha}-t{train_seed}", alpha,
                                                 train_seed)
                        rows.add(kind="uptrained", kv_heads=g, method=method, alpha=alpha, seed=train_seed,
                                 init_seed=seed, tokens=pretrain_tokens + report["tokens"],
                                 val_perplexity=scores["perplexity"])


def paper_decode(s: PaperSettings, runs: Path, n_heads: int, device: str) -> dict:
    """Decode time per token of each architecture on this device, the architectures taking turns."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    models = {g: load(runs / "mha" if g == n_heads else runs / f"g{g}-mean-s0", dtype=dtype, device=device)
              for g in (n_heads, *s.kv_heads)}
    rates = interleaved_decode_rates(models, s.decode_batch, s.decode_context, s.decode_tokens, s.decode_repeats)
    return {str(g): {"tokens_per_s": r["median"], "tokens_per_s_range": [r["min"], r["max"]],
                     "ms_per_token": 1e3 * s.decode_batch / r["median"],
                     "kv_bytes_per_token": models[g].kv_bytes_per_token(torch.bfloat16)} for g, r in rates.items()}


def rewrite_report(which: str, out: str | Path) -> dict:
    """README.md and figures again from OUT/results.json (they are functions of it), without re-running."""
    out = Path(out)
    try:
        results = read_json(out / "results.json")
    except FileNotFoundError:
        raise GQAError(f"no results.json in {out} to rewrite the report from") from None
    if which.startswith("paper"):
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
    title = "in its own setting, an encoder–decoder (T5)" if s.get("architecture") == "t5" else "at small scale"
    lines = [f"# The GQA paper {title}\n", f"```\n{results['command']}\n```\n",
             f"Device: {results['device']}; {results['seconds']:.0f} s; pre-training {results['pretrain_tokens']:,} "
             f"tokens; validation {results['validation_tokens']:,} tokens. Every number below is in "
             f"[results.json](results.json).\n",
             f"MHA perplexity: {mha:.2f}." + control_line(rows, alpha) + "\n",
             table(rows, s)]
    lines.append("\n## The paper's findings, checked\n")
    for g in s["kv_heads"]:
        ppl = {m: mean_ppl(rows, kv_heads=g, method=m, alpha=alpha) for m in ("mean", "first", "random")}
        noise = {m: seed_spread(rows, kv_heads=g, method=m, alpha=alpha) for m in ("mean", "first", "random")}
        if None in ppl.values():  # a run without the paper's three initialisations
            lines.append(f"- G = {g}:")
        else:
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
    lines += aligned_findings(rows, s)
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


def table(rows: list[dict], s: dict) -> str:
    """Perplexity of each G by method, at α = 0 and after uptraining for α, and from scratch (mean of seeds)."""
    alpha = s["alpha"]
    columns = [(m, 0.0) for m in ("mean", "aligned") if m in s["methods"]] + [(m, alpha) for m in s["methods"]]
    head = " | ".join(f"{m} α={a:g}" for m, a in columns)
    lines = [f"| G | {head} | from scratch |", "|---" * (len(columns) + 2) + "|"]
    for g in s["kv_heads"]:
        cells = [mean_ppl(rows, kv_heads=g, method=m, alpha=a) for m, a in columns]
        cells.append(mean_ppl(rows, kv_heads=g, kind="scratch"))
        lines.append(f"| {g} | " + " | ".join("—" if c is None else f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def aligned_findings(rows: list[dict], s: dict) -> list[str]:
    """How the calibrated conversion compares with mean pooling, and how much uptraining its start saves."""
    if "aligned" not in s["methods"]:
        return []
    alpha = s["alpha"]
    recipe = "`aligned` + layer-wise transfer" if s.get("transfer_steps") else "`aligned`"
    lines = [f"\n## The calibrated conversion ({recipe}) against mean pooling\n"]
    for g in s["kv_heads"]:
        start = {m: mean_ppl(rows, kv_heads=g, method=m, alpha=0.0) for m in ("mean", "aligned")}
        ppl = {m: mean_ppl(rows, kv_heads=g, method=m, alpha=alpha) for m in ("mean", "aligned")}
        if None in start.values() or None in ppl.values():
            continue
        noise = {m: seed_spread(rows, kv_heads=g, method=m, alpha=alpha) for m in ("mean", "aligned")}
        _, text = compare("aligned", "mean", ppl, noise)
        lines.append(f"- G = {g}: right after conversion aligned {start['aligned']:.2f} vs mean {start['mean']:.2f} "
                     f"({start['mean'] / start['aligned']:.1f}× lower); after uptraining for α = {alpha}: {text}.")
        sweep = [(a, mean_ppl(rows, kv_heads=g, method="aligned", alpha=a)) for a in [0.0, *s["alphas"]]]
        reached = next((a for a, p in sweep if p is not None and p <= ppl["mean"] + noise["mean"]), None)
        lines.append(f"  Uptraining the aligned start needs to match mean pooling uptrained for α = {alpha} "
                     f"({ppl['mean']:.2f}): {tokens_needed(reached, alpha)}.")
    return lines


def tokens_needed(reached: float | None, alpha: float) -> str:
    """The α at which the aligned start matched mean pooling uptrained for `alpha`, said against `alpha`."""
    if reached is None:
        return "not reached within the α swept"
    if reached == 0.0:
        return "α = 0 (the aligned start is already as good)"
    if reached == alpha:
        return f"α = {reached:g} (the same tokens: no saving seen at the α swept)"
    ratio = alpha / reached
    return f"α = {reached:g} ({ratio:.0f}× fewer tokens)" if ratio > 1 else f"α = {reached:g} ({1 / ratio:.0f}× more tokens)"


def figures(results: dict, out: Path) -> None:
    plt = pyplot()
    for draw, name in ((time_figure, "quality_vs_time.png"), (methods_figure, "methods.png"), (alpha_figure, "alpha.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax, results["rows"], results["settings"], results)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


def time_figure(ax, rows: list[dict], s: dict, results: dict) -> None:
    alpha, mha_g = s["alpha"], rows[0]["kv_heads"]
    for g, v in results["decode"].items():
        g = int(g)
        p = rows[0]["val_perplexity"] if g == mha_g else mean_ppl(rows, kv_heads=g, method="mean", alpha=alpha)
        ax.scatter(v["ms_per_token"], p, s=60)
        ax.annotate(heads_name(mha_g, g), (v["ms_per_token"], p))
    ax.set_xlabel("decode time per step (ms)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"quality vs decode time (mean pooling, uptrained α = {alpha})")


def methods_figure(ax, rows: list[dict], s: dict, results: dict) -> None:
    alpha, methods = s["alpha"], s["methods"]
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        values = [mean_ppl(rows, kv_heads=g, method=m, alpha=alpha) or 0.0 for g in s["kv_heads"]]
        ax.bar([j + i * width for j in range(len(values))], values, width, label=m)
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(s["kv_heads"]))],
                  [f"G = {g}" for g in s["kv_heads"]])
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"conversion method (α = {alpha}, mean of seeds)")
    heights = [p.get_height() for p in ax.patches if p.get_height() > 0] + [rows[0]["val_perplexity"]]
    ax.set_ylim(0.9 * min(heights), 1.05 * max(heights))  # the differences, not the distance from zero
    ax.axhline(rows[0]["val_perplexity"], color="black", linestyle="--", label="MHA")
    ax.legend(fontsize=8, ncols=5, loc="upper center", bbox_to_anchor=(0.5, -0.1))


def alpha_figure(ax, rows: list[dict], s: dict, results: dict) -> None:
    """Quality against uptraining α: mean pooling solid, the calibrated start dashed, one color per G."""
    for i, g in enumerate(s["kv_heads"]):
        for method, style in (("mean", "-"), ("aligned", "--")):
            if method not in s.get("sweep_methods", ("mean",)):
                continue
            pts = [(a, mean_ppl(rows, kv_heads=g, method=method, alpha=a)) for a in [0.0, *s["alphas"]]]
            pts = [(a, p) for a, p in pts if p is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", linestyle=style, color=f"C{i}",
                        label=f"{heads_name(0, g)} {method}")  # converted: G < H
    ax.axhline(rows[0]["val_perplexity"], color="black", linestyle=":", label="MHA")
    control = mean_ppl(rows, kind="control")
    if control is not None:
        ax.axhline(control, color="gray", linestyle=":", label=f"MHA uptrained α={s['alpha']}")
    ax.set_xscale("symlog", linthresh=min(a for a in s["alphas"] if a > 0))
    ax.set_xlabel("uptraining proportion α (0, then log scale)")
    ax.set_ylabel("validation perplexity")
    log_y(ax)
    ax.set_title("quality vs α")
    ax.legend(fontsize=7)


# ------------------------------------------------------------------------------------------------ SmolLM2

@dataclass
class SmolSettings:
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(conversion_methods.REGISTRY))  # converted, evaluated
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
    calib_tokens: int = 65536  # aligned: calibration text (the bundled corpus's training split)
    transfer_steps: int = 100


SMOL_QUICK = dict(methods=("mean",), steps=2, seq_len=32, batch_size=2, eval_every=1, eval_blocks=2, compile=False,
                  calib_tokens=256, transfer_steps=2)


def run_smollm2(out: str | Path, quick: bool = False, device: str | None = None,
                settings: str | Path | None = None) -> dict:
    """SmolLM2-135M (9 query heads, 3 KV heads) -> MQA with mean / first / random, uptrained on the bundled
    corpus with and without distillation from the original; held-out perplexity along uptraining."""
    from .checkpoints.gguf import gguf_to_hf, packaged_smollm2

    s = settings_for(SmolSettings(), SMOL_QUICK, quick, settings)
    out = Path(out)
    runs = fresh_runs(out)
    started = time.time()
    original = gguf_to_hf(packaged_smollm2(), runs / "smollm2")
    tokenizer = load_tokenizer(original)
    pipe = Pipeline(tokenizer, prepare("bundled", tokenizer, s.seq_len), s.eval_blocks, device=resolve(device),
                    train_settings=dict(data="bundled", seq_len=s.seq_len, batch_size=s.batch_size, steps=s.steps,
                                        lr=s.lr, eval_every=s.eval_every, eval_blocks=s.eval_blocks, save_every=None,
                                        compile=s.compile, device=device))
    curves, converted = [], {}
    for method in s.methods:
        conv = runs / f"converted-{method}"
        converted[method] = pipe.convert(original, conv, 1, method, **conversion_options(
            method, s.calib_tokens, s.seq_len, s.transfer_steps))["perplexity"]
        if s.uptrain_methods is not None and method not in s.uptrain_methods:
            continue
        for distill in s.distill:
            dest = runs / f"uptrained-{method}{'-distill' if distill else ''}"
            pipe.uptrain(conv, dest, **(dict(teacher=str(original), distill_weight=s.distill_weight) if distill else {}))
            log = [json.loads(line) for line in (dest / "train" / "log.jsonl").read_text().splitlines()]
            points = [(r["tokens"], r["val_perplexity"]) for r in log if "val_perplexity" in r]
            curves.append({"method": method, "distill": distill, "kv_heads": 1, "points": points,
                           "val_perplexity_converted": points[0][1], "val_perplexity_final": points[-1][1]})
    results = {
        "command": command_line("smollm2", quick, settings, out),
        "device": device_name(torch.device(pipe.device)),
        "settings": asdict(s),
        "validation_tokens": int(len(pipe.val) * s.seq_len),
        "original_perplexity": pipe.evaluate(original)["perplexity"],
        "converted_perplexity": converted,
        "curves": curves,
        "seconds": round(time.time() - started, 1),
    }
    write_json(out / "results.json", results)
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
    plt = pyplot()

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
