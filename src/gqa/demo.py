"""`gqa demo`: the whole method on the embedded default, on a laptop-class CPU in minutes.

Start from the bundled MHA checkpoint (a small Llama pre-trained on the bundled corpus by
scripts/build_demo_model.py), convert it to GQA-2 and MQA with mean / first / random, uptrain each for
α = 5 % of the starting model's pre-training tokens, and measure what every variant costs and keeps:
KV bytes per token, validation perplexity before (α = 0) and after uptraining, top-1 agreement with the
MHA model, and greedy decode tokens/s on this machine. The MHA model is uptrained for the same tokens as a
control, so that gains from simply training longer are not credited to grouping.

Decode speed depends on the architecture only (MHA, GQA-2, MQA), so it is measured once per G, at the end,
with the three models taking turns (median and range of several rounds): one sample per model, taken
while the machine happens to be busy, can be off by a factor of ten.

Writes results.json (one row per model, with everything needed to check the findings by script), a PNG
(perplexity and decode speed against KV bytes per token) and prints one table.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .attention import heads_name
from .bench import interleaved_decode_rates
from .checkpoints import load
from .checkpoints.files import check_destination
from .checkpoints.tokenizer import load_tokenizer
from .conversion import methods
from .data import prepare
from .errors import GQAError
from .jsonfiles import read_json, write_json
from .pipeline import Pipeline, settings_for
from .plots import log_y, pyplot
from .train import CONTINUED_DISTILL_WEIGHT, CONTINUED_LR
from .version import __version__

ASSET = Path(__file__).parent / "assets" / "demo-mha"
MARKER = ".gqa-demo"  # in a folder the demo wrote, which a later demo may replace


@dataclass
class DemoSettings:
    kv_heads: tuple[int, ...] = (2, 1)
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(methods.REGISTRY))  # every registered method
    calib_tokens: int = 32768  # aligned: calibration text from the corpus's training split
    transfer_steps: int = 100  # aligned: layer-wise attention transfer steps per layer
    alpha: float = 0.05
    seq_len: int = 256
    batch_size: int = 16
    lr: float = CONTINUED_LR  # gqa uptrain's step size next to a teacher (5e-4 walked the aligned models away)
    eval_blocks: int = 64
    decode_batch: int = 8
    decode_context: int = 448
    decode_tokens: int = 32
    decode_repeats: int = 5
    kv_cache_dtypes: tuple[str, ...] = ("q8_0", "q4_0")  # the MHA and aligned models again with these caches
    max_steps: int | None = None  # --quick caps the uptraining steps
    seed: int = 0


QUICK = dict(eval_blocks=4, decode_batch=2, decode_context=32, decode_tokens=4, decode_repeats=2, max_steps=2,
             calib_tokens=1024, transfer_steps=2)

_TOKENIZED: dict = {}  # a second demo in the same process (the tests) reuses the tokenized corpus


def say(message: str) -> None:
    print(f"[gqa demo] {message}", flush=True)


def prepare_folder(out: Path, overwrite: bool) -> None:
    check_destination(out, overwrite=True)  # creatable; whether an existing folder may go is decided here
    if out.exists() and any(out.iterdir()) and not (overwrite or (out / MARKER).is_file()):
        raise GQAError(f"{out} already exists; pass --overwrite or choose another --out")
    if not (ASSET / "config.json").is_file():
        raise GQAError(f"the demo checkpoint is missing from the installation ({ASSET})")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by gqa demo; a later `gqa demo` may replace this folder\n")


def demo_pipeline(s: DemoSettings, pretrain_tokens: int) -> Pipeline:
    tokenizer = load_tokenizer(ASSET)
    say("tokenizing the bundled corpus (Wikipedia leads + Shakespeare) ...")
    if s.seq_len not in _TOKENIZED:
        _TOKENIZED[s.seq_len] = prepare("bundled", tokenizer, s.seq_len)
    data = _TOKENIZED[s.seq_len]
    pipe = Pipeline(tokenizer, data, s.eval_blocks, reference=load(ASSET, dtype=torch.float32), train_settings=dict(
        data="bundled", seq_len=s.seq_len, batch_size=s.batch_size, alpha=s.alpha, pretrain_tokens=pretrain_tokens,
        steps=s.max_steps, lr=s.lr, eval_every=None, eval_blocks=s.eval_blocks, save_every=None, seed=s.seed))
    say(f"{data.documents:,} documents; {data.train_tokens:,} training tokens, {data.val_tokens:,} validation "
        f"tokens, of which the first {pipe.val.numel() - len(pipe.val):,} predictions are scored")
    return pipe


def calibration(s: DemoSettings, method: str) -> dict:
    """What a calibrated method is given: the corpus's training split as calibration text, then layer-wise
    transfer."""
    if not methods.get(method).calibrated:
        return {}
    return dict(calib="bundled", calib_tokens=s.calib_tokens, calib_seq_len=s.seq_len, transfer_steps=s.transfer_steps)


def row(name: str, method: str, n_kv_heads: int, mha, *, before: dict, after: dict, report: dict | None,
        kv_cache_dtype: str = "bfloat16") -> dict:
    from .kv_formats import kv_format

    per_value = kv_format(kv_cache_dtype).bytes_per_value  # the runtime's default cache: bf16 (2 bytes a value)
    kv_bytes = round(mha.config.kv_bytes_per_token(1) * per_value * n_kv_heads / mha.config.n_heads)
    return {
        "name": name, "method": method, "kv_heads": n_kv_heads, "query_heads": mha.config.n_heads,
        "kv_cache_dtype": kv_cache_dtype,
        "alpha": report["alpha_effective"] if report else 0.0, "tokens_trained": report["tokens"] if report else 0,
        "kv_bytes_per_token": kv_bytes, "kv_reduction": mha.config.kv_bytes_per_token(2) / kv_bytes,
        "val_perplexity_alpha0": before["perplexity"], "val_perplexity": after["perplexity"],
        "top1_agreement_alpha0": before.get("top1_agreement", 1.0), "top1_agreement": after.get("top1_agreement", 1.0),
    }


def run_demo(out: str | os.PathLike, quick: bool = False, overwrite: bool = False,
             settings: str | os.PathLike | None = None) -> dict:
    s = settings_for(DemoSettings(), QUICK, quick, settings)
    out = Path(out)
    prepare_folder(out, overwrite)
    started = time.time()
    torch.manual_seed(s.seed)
    pretrain_tokens = read_json(ASSET / "pretraining.json")["tokens"]
    say(f"starting model: {ASSET.name}, MHA, pre-trained on {pretrain_tokens:,} tokens of the bundled corpus")
    pipe = demo_pipeline(s, pretrain_tokens)
    mha = pipe.reference
    reference = pipe.evaluate(ASSET)
    say(f"MHA validation perplexity {reference['perplexity']:.2f}")
    rows = [row("MHA", "none", mha.config.n_heads, mha, before=reference, after=reference, report=None)]
    say("control: the MHA model uptrained for the same tokens, with the same recipe (distilling from itself)")
    report, control = pipe.uptrain(ASSET, out / "mha-uptrained", teacher=str(ASSET),
                                   distill_weight=CONTINUED_DISTILL_WEIGHT)
    rows.append(row("MHA + uptraining (control)", "none", mha.config.n_heads, mha, before=reference, after=control,
                    report=report))
    for g in s.kv_heads:
        for method in s.methods:
            label, dest = f"{heads_name(mha.config.n_heads, g)} {method}", out / f"g{g}-{method}"
            say(f"{label}: converting ...")
            before = pipe.convert(ASSET, dest / "converted", g, method, seed=s.seed, **calibration(s, method))
            say(f"{label}: perplexity at α = 0 is {before['perplexity']:.2f}; uptraining ...")
            report, after = pipe.uptrain(dest / "converted", dest / "uptrained")
            rows.append(row(label, method, g, mha, before=before, after=after, report=report))
    rows += quantized_rows(s, pipe, mha, rows, out)
    decode = measure_decode(s, mha, out)
    for r in rows:  # decode speed is the float cache's: a quantized cache's rows are evaluation only
        measured = decode[r["kv_heads"]] if r["kv_cache_dtype"] == "bfloat16" else None
        r.update(reference_perplexity=reference["perplexity"], alpha_target=s.alpha, seed=s.seed,
                 decode_tokens_per_s=measured and measured["median"],
                 decode_tokens_per_s_range=measured and [measured["min"], measured["max"]])
    results = {
        "gqa_version": __version__, "command": "gqa demo" + (" --quick" if quick else ""),
        "device": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "torch": torch.__version__, "threads": torch.get_num_threads()},
        "starting_model": {"path": str(ASSET), "pretrain_tokens": pretrain_tokens,
                           "parameters": mha.num_parameters(), "reference_perplexity": reference["perplexity"]},
        "settings": asdict(s), "validation_tokens": reference["tokens"],
        "decode": {"what": decode_description(s), "by_kv_heads": {str(g): v for g, v in decode.items()}},
        "seconds": None, "rows": rows,
    }
    plot(rows, out / "perplexity_vs_kv_bytes.png")
    results["seconds"] = round(time.time() - started, 1)
    write_json(out / "results.json", results)
    print(table(rows) + "\n" + results["decode"]["what"])
    say(f"done in {results['seconds']:.0f} s; wrote {out / 'results.json'} and {out / 'perplexity_vs_kv_bytes.png'}")
    return results


def quantized_rows(s: DemoSettings, pipe: Pipeline, mha, rows: list[dict], out: Path) -> list[dict]:
    """The MHA model and the aligned conversions (uptrained) again, with the KV cache a runtime quantizes for
    free (llama.cpp's q8_0 and q4_0, `gqa.kv_formats`): the two ways to fewer KV bytes, and both at once,
    side by side (evaluation only)."""
    models = [("MHA", ASSET, mha.config.n_heads, None)]
    models += [(f"{heads_name(mha.config.n_heads, g)} aligned", out / f"g{g}-aligned" / "uptrained", g,
                next(r for r in rows if r["name"] == f"{heads_name(mha.config.n_heads, g)} aligned"))
               for g in s.kv_heads if "aligned" in s.methods]
    added = []
    for label, path, g, base in models:
        for kv in s.kv_cache_dtypes:
            say(f"{label}, {kv} KV cache: evaluating ...")
            scores = pipe.evaluate(path, kv_cache_dtype=kv)
            r = row(f"{label}, {kv} cache", base["method"] if base else "none", g, mha, before=scores, after=scores,
                    report=None, kv_cache_dtype=kv)
            if base:  # the uptrained conversion: its training is the row it was scored from
                r.update(alpha=base["alpha"], tokens_trained=base["tokens_trained"])
                r["val_perplexity_alpha0"] = None
            added.append(r)
    return added


def measure_decode(s: DemoSettings, mha, out: Path) -> dict[int, dict]:
    """Decode tokens/s of each architecture (MHA, then each G's mean-pooled model), interleaved."""
    models = {mha.config.n_heads: mha}
    for g in s.kv_heads:
        models[g] = load(out / f"g{g}-{s.methods[0]}" / "converted", dtype=torch.float32)
    say(f"measuring decode speed: {s.decode_repeats} rounds, the {len(models)} architectures in turn ...")
    return interleaved_decode_rates(models, s.decode_batch, s.decode_context, s.decode_tokens, s.decode_repeats)


def decode_description(s: DemoSettings) -> str:
    return (f"decode tok/s: greedy decoding of a batch of {s.decode_batch} after a {s.decode_context}-token prompt "
            f"({s.decode_tokens} steps timed), fp32, {torch.get_num_threads()} threads; median of {s.decode_repeats} "
            f"rounds in which the architectures take turns, [min–max]")


def table(rows: list[dict]) -> str:
    header = ("model", "KV heads", "KV bytes/token", "ppl α=0", "ppl uptrained", "top-1 agree", "decode tok/s")
    lines = [header]
    for r in rows:
        alpha0 = "" if r["val_perplexity_alpha0"] is None else f"{r['val_perplexity_alpha0']:.2f}"
        speed = "" if r["decode_tokens_per_s"] is None else \
            f"{r['decode_tokens_per_s']:,.0f} [{r['decode_tokens_per_s_range'][0]:,.0f}–" \
            f"{r['decode_tokens_per_s_range'][1]:,.0f}]"
        lines.append((
            r["name"], str(r["kv_heads"]), f"{r['kv_bytes_per_token']:,}", alpha0,
            f"{r['val_perplexity']:.2f}" + (f" (α={r['alpha']:.3f})" if r["tokens_trained"] else ""),
            f"{r['top1_agreement']:.3f}", speed,
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    fmt = lambda line: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))  # noqa: E731
    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths), *map(fmt, lines[1:])])


MARKERS = {"mean": "o", "first": "s", "random": "^", "aligned": "D"}
COLORS = {"mean": "tab:blue", "first": "tab:orange", "random": "tab:green", "aligned": "tab:red"}


def plot(rows: list[dict], path: Path) -> None:
    """Left: perplexity against KV bytes per token (hollow: right after conversion, filled: uptrained).
    Right: decode tokens/s against KV bytes per token, median with its range."""
    plt = pyplot()

    fig, (ax, speed) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        x = r["kv_bytes_per_token"]
        if r["kv_cache_dtype"] != "bfloat16":  # the same model with a quantized cache: evaluation only
            quantized = {"q8_0": "x", "q4_0": "+"}.get(r["kv_cache_dtype"], "1")
            ax.scatter(x, r["val_perplexity"], marker=quantized, s=90, zorder=4, linewidths=2,
                       color="black" if r["method"] == "none" else COLORS.get(r["method"], "tab:purple"),
                       label=f"{r['kv_cache_dtype']} cache" if r["method"] == "none" else None)
            continue
        if r["method"] == "none":
            start = not r["tokens_trained"]
            ax.scatter(x, r["val_perplexity"], marker="*" if start else "P", color="black" if start else "gray",
                       s=200 if start else 110, zorder=4, label="MHA (start)" if start else "MHA + uptraining (control)")
            continue
        m, c = MARKERS.get(r["method"], "x"), COLORS.get(r["method"], "tab:purple")
        ax.scatter(x, r["val_perplexity"], marker=m, color=c, s=80, zorder=3,
                   label=r["method"] if r["kv_heads"] == rows[-1]["kv_heads"] else None)
        ax.scatter(x, r["val_perplexity_alpha0"], marker=m, facecolors="none", edgecolors=c, s=80, zorder=2)
        ax.annotate("", (x, r["val_perplexity"]), (x, r["val_perplexity_alpha0"]),
                    arrowprops={"arrowstyle": "->", "color": c, "alpha": 0.4})
    ax.set_xscale("log", base=2)
    log_y(ax)
    ax.set_xlabel("KV-cache bytes per token (bf16, or the quantized cache's)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("hollow: right after conversion (α = 0); filled: after uptraining", fontsize=10)
    ax.legend(title="K/V init", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    plot_speed(speed, rows)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_speed(ax, rows: list[dict]) -> None:
    points = {r["kv_heads"]: r for r in rows if r["decode_tokens_per_s"] is not None}  # one per architecture
    for g, r in sorted(points.items()):
        low, high = r["decode_tokens_per_s_range"]
        median = r["decode_tokens_per_s"]
        ax.errorbar(r["kv_bytes_per_token"], median, yerr=[[median - low], [high - median]], fmt="o", capsize=4,
                    color="black")
        ax.annotate(heads_name(r["query_heads"], g), (r["kv_bytes_per_token"], median), textcoords="offset points",
                    xytext=(6, 6))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV-cache bytes per token (bf16)")
    ax.set_ylabel("decode tokens/s (median, bar: min–max)")
    ax.set_title("decode speed on this machine", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
