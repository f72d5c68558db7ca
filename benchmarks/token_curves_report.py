"""The README and figure of a token-curves run (`token_curves.py`), every number computed from its results.json.

The yardstick drawn beside each curve is the original with llama.cpp's q4_0 cache alone, read from the
KV-frontier run (docs/results/kv-frontier/smollm2/results.json: the same held-out sets, tokens and windows).
"""

from __future__ import annotations

import json
from pathlib import Path

from gqa.plots import pyplot

FRONTIER = Path(__file__).resolve().parents[1] / "docs" / "results" / "kv-frontier" / "smollm2" / "results.json"
STYLE = {("calibration: transfer", "half"): ("s", "#2ca02c"), ("calibration: transfer", "mqa"): ("^", "#1f77b4"),
         ("calibration: joint", "half"): ("<", "#17becf"), ("calibration: joint", "mqa"): ("v", "#9467bd"),
         ("distillation", "half"): ("P", "#ff7f0e"), ("distillation", "mqa"): ("D", "#d62728"),
         ("distillation: KL only", "half"): ("X", "#8c564b"), ("distillation: KL only", "mqa"): ("d", "#e377c2")}


def ratio(row: dict, results: dict, s: str) -> float:
    return row[s]["perplexity"] / results["reference"][s]["perplexity"]


def q4_0_alone() -> dict | None:
    """The original with a q4_0 cache: the bytes and, per set, the ratio and top-1 to beat."""
    if not FRONTIER.is_file():
        return None
    frontier = json.loads(FRONTIER.read_text())
    row = next(r for r in frontier["rows"] if r["model"] == "original" and r["cache"] == "q4_0")
    return {"kv_bytes_per_token": row["kv_bytes_per_token"],
            **{s: (ratio(row, frontier, s), row[s]["top1_agreement"]) for s in frontier["evaluation"]["sets"]}}


def cpu_minutes(row: dict) -> str:
    """CPU minutes of the command that made the model; its wall minutes (marked) where no CPU time was kept."""
    making = [c for c in row["commands"] if " eval " not in f" {c['command']} "]
    if not making:
        return "—"
    if any(c.get("cpu_seconds") is None for c in making):
        return f"{sum(c['seconds'] for c in making) / 60:.1f} (wall)"
    return f"{sum(c['cpu_seconds'] for c in making) / 60:.1f}"


def table(results: dict, curve: str, kv: str) -> list[str]:
    sets = results["evaluation"]["sets"]
    rows = sorted((r for r in results["rows"] if r["curve"] == curve and r["kv"] == kv),
                  key=lambda r: (r["tokens"], r["cache"]))
    lines = [f"| tokens | cache | KV bytes | CPU min | {' | '.join(f'{s} ppl× | top-1' for s in sets)} |",
             "|---|---|---|---|" + "---|---|" * len(sets)]
    for r in rows:
        cells = " | ".join(f"{ratio(r, results, s):.3f} | {r[s]['top1_agreement']:.3f}" for s in sets)
        made = cpu_minutes(r).replace("—", "")  # on the row of the first cache measured, where the model was made
        lines.append(f"| {r['tokens']:,} | {r['cache']} | {r['kv_bytes_per_token']:,} | {made} | {cells} |")
    return lines


def figure(results: dict, path: Path, yardstick: dict | None) -> None:
    plt = pyplot()
    sets = results["evaluation"]["sets"]
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 4.0))
    for ax, s in zip(axes, sets):
        for (curve, kv), (marker, color) in STYLE.items():
            rows = sorted((r for r in results["rows"] if (r["curve"], r["kv"]) == (curve, kv) and r["cache"] == "q8_0"),
                          key=lambda r: r["tokens"])
            if rows:
                ax.plot([r["tokens"] for r in rows], [ratio(r, results, s) for r in rows], marker=marker,
                        color=color, label=f"{kv} + q8_0, {curve}")
        if yardstick:
            ax.axhline(yardstick[s][0], color="black", ls="--", lw=1, label="original + q4_0 (llama.cpp)")
        ax.set_xscale("log")
        ax.set_xlabel("tokens (calibration, or distillation)")
        ax.set_title(s)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("held-out perplexity / original's")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("SmolLM2-135M, q8_0 cache: quality against tokens spent")
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path) -> None:
    results = json.loads((out / "results.json").read_text())
    yardstick = q4_0_alone()
    figure(results, out / "curves.png", yardstick)
    sets = results["evaluation"]["sets"]
    ev, m = results["evaluation"], results["machine"]
    lines = ["# Token curves: what more calibration and distillation tokens buy (SmolLM2-135M)\n",
             f"Calibration and distillation text: `{results['calibration']}`. Held-out: {', '.join(sets)}, "
             f"{ev['tokens_per_set']:,} tokens each in windows of {ev['seq_len']}; perplexity as a multiple of the "
             f"original's with a float32 cache, top-1 agreement with it. Machine: {m['cpu']}, {m['cores']} cores, "
             f"torch {m['torch']}, device {m['device']}. CPU min: the command that made the model (conversion, or "
             f"the uptraining alone for distillation points), user + system on all cores.\n",
             f"Command: `{results['command']}`; each command of each point, with its seconds, is in "
             f"[results.json](results.json).\n", "![curves](curves.png)\n"]
    if yardstick:
        cells = ", ".join(f"{s} {yardstick[s][0]:.3f}× / top-1 {yardstick[s][1]:.3f}" for s in sets)
        lines.append(f"The yardstick: the original with llama.cpp's q4_0 cache ({yardstick['kv_bytes_per_token']:,} "
                     f"KV bytes per token): {cells}.\n")
    for curve, kv in STYLE:
        if any(r["curve"] == curve and r["kv"] == kv for r in results["rows"]):
            lines += [f"## {kv}, {curve}\n", *table(results, curve, kv), ""]
    (out / "README.md").write_text("\n".join(lines))
