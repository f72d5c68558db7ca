"""What a conversion did: `conversion.json` in the output, and the table `gqa convert` ends with."""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from ..checkpoints import architecture_name
from ..model import ModelConfig
from ..version import __version__


def conversion_report(job, new_config: ModelConfig, out_family, *, counts, layers, budget_record, joint_record,
                      start: float) -> dict:
    element = torch.empty((), dtype=job.dtype).element_size()
    before, after = job.config.kv_bytes_per_token(element), new_config.kv_bytes_per_token(element)
    report = {
        "gqa_version": __version__,
        "source": str(job.src.resolve()),
        "destination": str(job.dst.resolve()),
        "method": job.method.name,
        "seed": job.seed if job.method.name == "random" or job.calibration else None,
        "architecture": architecture_name(new_config, out_family),
        "query_heads": job.config.n_heads,
        "kv_heads_before": job.config.n_kv_heads,
        "kv_heads_after": new_config.n_kv_heads,
        "kv_bytes_per_token_before": before,
        "kv_bytes_per_token_after": after,
        "kv_reduction": before / after,
        "parameters_before": counts[0],
        "parameters_after": counts[1],
        "dtype": str(job.dtype).removeprefix("torch."),
        "seconds": round(time.time() - start, 3),
    }
    if asdict(job.settings):
        report["method_settings"] = asdict(job.settings)
    if job.calibration:
        report["calibration"] = job.calibration.record()
        report["transfer"] = asdict(job.transfer) if job.transfer.steps else None
        report["layers"] = layers
    if joint_record:
        report["joint"] = joint_record
    if budget_record:
        report["kv_budget"] = budget_record
    return report


# the rows of KV heads a report may hold: a decoder's per layer; an encoder–decoder's per attention kind
HEAD_ROWS = (("kv_heads", "KV heads per layer"), ("self_kv_heads", "decoder self-attention KV heads"),
             ("cross_kv_heads", "cross-attention KV heads"), ("encoder_kv_heads", "encoder KV heads"))


def format_report(report: dict) -> str:
    """The table `gqa convert` ends with: the rows its report has (a decoder's KV heads per layer and
    parameters; an encoder–decoder's heads per attention kind and KV bytes per source token)."""
    def heads(hs):
        return f"{hs[0]} in all {len(hs)} layers" if len(set(hs)) == 1 else ",".join(map(str, hs))

    rows = [("", "before", "after")]
    rows += [(label, heads(report[f"{key}_before"]), heads(report[f"{key}_after"])) for key, label in HEAD_ROWS
             if f"{key}_before" in report]
    per_token = "KV bytes per generated token" if "kv_bytes_per_source_token_before" in report else "KV bytes per token"
    rows.append((per_token, f"{report['kv_bytes_per_token_before']:,}",
                 f"{report['kv_bytes_per_token_after']:,}  ({report['kv_reduction']:.2f}x smaller)"))
    for key, label in (("kv_bytes_per_source_token", "KV bytes per source token"), ("parameters", "parameters")):
        if f"{key}_before" in report:
            rows.append((label, f"{report[f'{key}_before']:,}", f"{report[f'{key}_after']:,}"))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    lines.append(f"method {method_line(report)}; written as {report['architecture']} to {report['destination']}")
    return "\n".join(lines)


def method_line(report: dict) -> str:
    how = report["method"] + (f", seed {report['seed']}" if report["seed"] is not None else "")
    if not report.get("calibration"):
        return how
    c = report["calibration"]
    how += f"; calibrated on {c.get('tokens_used', c['tokens']):,} tokens of {c['data']}"
    if report.get("transfer"):
        errors = [(r["relative_error_before"], r["relative_error_after"]) for r in report["layers"]
                  if "relative_error_after" in r]
        unit = "attention" if any("attention" in r for r in report["layers"]) else "layer"  # encoder–decoder: per kind
        how += f"; transfer {report['transfer']['steps']} steps per {unit}"
        if errors:
            how += (f" (attention output error, mean over {unit}s: {sum(e[0] for e in errors) / len(errors):.3f}"
                    f" -> {sum(e[1] for e in errors) / len(errors):.3f})")
    if report.get("joint"):
        j = report["joint"]
        how += f"; joint stage {j['steps']} steps (KL to the source {j['kl_before']:.4f} -> {j['kl_after']:.4f}" + (
            ": not lowered, the weights before it kept)" if j.get("kept") else ")")
    return how
