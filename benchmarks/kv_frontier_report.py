"""The README and figure of a KV-frontier run (`kv_frontier.py`), every number computed from its results.json."""

from __future__ import annotations

import json
from pathlib import Path

from gqa.plots import pyplot

MARKERS = {"original": ("o", "the source"), "half": ("s", "half KV bytes"), "MQA (": ("^", "MQA"),
           "MQA +": ("D", "MQA + distillation")}
COLORS = {"bfloat16": "#444444", "fp8_e4m3": "#1f77b4", "q8_0": "#2ca02c", "q5_0": "#ff7f0e", "q4_0": "#d62728"}


def ratio(row: dict, results: dict, s: str) -> float:
    return row[s]["perplexity"] / results["reference"][s]["perplexity"]


def pareto(points: list[tuple[float, float, dict]]) -> list[dict]:
    """The points no other point beats on both KV bytes and quality (fewer bytes, lower ratio)."""
    front, best = [], float("inf")
    for _, q, row in sorted(points, key=lambda p: (p[0], p[1])):
        if q < best:
            front.append(row)
            best = q
    return front


def marker(name: str) -> str:
    return next(m for prefix, (m, _) in MARKERS.items() if name.startswith(prefix))


def figure(results: dict, path: Path) -> None:
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    plt = pyplot()
    sets = results["evaluation"]["sets"]
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 4.2), sharey=False)
    for ax, s in zip(axes, sets):
        points = [(r["kv_bytes_per_token"], ratio(r, results, s), r) for r in results["rows"]]
        for kv, q, r in points:
            ax.scatter(kv, q, marker=marker(r["model"]), color=COLORS[r["cache"]], s=40, zorder=3)
        front = pareto(points)
        ax.plot([r["kv_bytes_per_token"] for r in front], [ratio(r, results, s) for r in front], color="black",
                lw=1, ls="--", zorder=2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel("KV bytes per token")
        ax.set_title(s)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("held-out perplexity / original's (float32 cache)")
    handles = [plt.Line2D([], [], ls="", marker=m, color="gray", label=label) for m, label in MARKERS.values()]
    handles += [plt.Line2D([], [], ls="", marker="o", color=c, label=k) for k, c in COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"{results['model']}: conversion x KV-cache quantization (dashed: the Pareto front)")
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def answers(results: dict) -> list[str]:
    """Per held-out set: at equal or fewer bytes, does a stack with a conversion beat quantization alone?
    And the fewest bytes within 1.1x and 1.25x of the original."""
    lines = []
    for s in results["evaluation"]["sets"]:
        alone = [r for r in results["rows"] if r["model"] == "original"]
        stacks = [r for r in results["rows"] if r["model"] != "original"]
        wins = [(r, a) for r in stacks for a in alone
                if r["kv_bytes_per_token"] <= a["kv_bytes_per_token"] and ratio(r, results, s) < ratio(a, results, s)
                and r[s]["top1_agreement"] > a[s]["top1_agreement"]]
        verdict = "no" if not wins else "yes: " + "; ".join(
            f"{r['model']} + {r['cache']} ({r['kv_bytes_per_token']:,} B, {ratio(r, results, s):.3f}x, top-1 "
            f"{r[s]['top1_agreement']:.3f}) beats {a['cache']} alone ({a['kv_bytes_per_token']:,} B, "
            f"{ratio(a, results, s):.3f}x, {a[s]['top1_agreement']:.3f})" for r, a in wins[:3])
        fewest = []
        for limit in (1.1, 1.25):
            ok = [r for r in results["rows"] if ratio(r, results, s) <= limit]
            best = min(ok, key=lambda r: (r["kv_bytes_per_token"], ratio(r, results, s))) if ok else None
            fewest.append(f"within {limit}x: " + (f"{best['model']} + {best['cache']}, {best['kv_bytes_per_token']:,} "
                                                 f"B ({ratio(best, results, s):.3f}x, top-1 "
                                                 f"{best[s]['top1_agreement']:.3f})" if best else "none"))
        lines.append(f"- **{s}**: a conversion stack beats quantization alone at equal or fewer bytes (perplexity "
                     f"and top-1)? {verdict}. Fewest bytes {'; '.join(fewest)}.")
    lines.append("\n\"Within\" is perplexity × the original's, as the question is asked; top-1 agreement says how much of "
                 "the original is left. A model uptrained on text like a held-out set's can score below the original "
                 "there (perplexity × < 1) while agreeing with it less: it fits that text, it is not a closer copy.")
    return lines


def table(results: dict) -> list[str]:
    sets = results["evaluation"]["sets"]
    mha_bf16 = results["reference"]["kv_bytes_per_token"]["bfloat16"]
    head = ("| model | KV cache | KV bytes/token (× source bf16) | " +
            " | ".join(f"{s} ppl (×) | top-1 | KL" for s in sets) + " |")
    lines = [head, "|---" * (3 + 3 * len(sets)) + "|"]
    reference = results["reference"]
    lines.append(f"| original | float32 (reference) | {reference['kv_bytes_per_token']['float32']:,} "
                 f"({reference['kv_bytes_per_token']['float32'] / mha_bf16:.2f}) | " +
                 " | ".join(f"{reference[s]['perplexity']:.2f} (1) | 1 | 0" for s in sets) + " |")
    for r in results["rows"]:
        cells = [f"{r[s]['perplexity']:.2f} ({ratio(r, results, s):.3f}) | {r[s]['top1_agreement']:.3f} | "
                 f"{r[s]['kl']:.4f}" for s in sets]
        lines.append(f"| {r['model']} | {r['cache']} | {r['kv_bytes_per_token']:,} "
                     f"({r['kv_bytes_per_token'] / mha_bf16:.2f}) | " + " | ".join(cells) + " |")
    return lines


def write_report(out: Path) -> None:
    results = json.loads((out / "results.json").read_text())
    figure(results, out / "frontier.png")
    ev, m = results["evaluation"], results["machine"]
    tokens = ", ".join(f"`{s}` {results['reference'][s]['tokens']:,}" for s in ev["sets"])
    lines = [f"# KV bytes against quality: {results['model']}, conversions x KV-cache quantization\n",
             f"```\n{results['command']}\n```\n",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}. Every point scored on held-out "
             f"text in blocks of {ev['seq_len']} against the original model with a float32 cache (tokens scored: "
             f"{tokens}); perplexity × the original's, top-1 agreement with its next-token choice, KL(original ‖ "
             f"model) per token. KV bytes per token over all layers, K and V, with the cache's format; × the "
             f"original's bf16 cache in brackets. The quantized caches are gqa's, value for value llama.cpp's "
             f"(q8_0 / q5_0 / q4_0, Hadamard-rotated where llama.cpp rotates) and vLLM's (fp8_e4m3, scale 1.0).\n",
             "![frontier](frontier.png)\n", "## The answer, per held-out set\n", *answers(results), "",
             "## Every point\n", *table(results), "", "## How each model was made\n"]
    for name, record in results["models"].items():
        conversion, uptrain = record.get("conversion"), record.get("uptrain")
        what = "the source" if not conversion and not uptrain else (
            f"converted: {conversion['method']}, KV heads {conversion['kv_heads_after']}" if conversion else
            f"uptrained {uptrain['steps']} steps, {uptrain['tokens']:,} tokens of {uptrain['data']}, distilled from "
            f"the source")
        lines.append(f"- {name}: {what}")
    lines += ["", "## Commands\n", "```"] + [f"{c['command']}    # {c['seconds']} s" for c in results["commands"]] + ["```"]
    (out / "README.md").write_text("\n".join(lines) + "\n")
