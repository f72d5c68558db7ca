"""The model card (README.md) of every folder gqa writes: what it is, how it was made, what it costs, how to run it.

Hugging Face folders carry a README.md whose YAML front matter the Hub and its tools read (`base_model`,
`library_name`, `tags`, `pipeline_tag`, `license`). gqa writes one into each output of `convert`, `uptrain`
and `export`, built from the written folder itself (`info.describe`: architecture, KV heads, KV
bytes, whether vLLM loads it) and the record of the work (the conversion's report, the training run's).
A folder gqa made from another gqa folder names the original model as its base and lists every step.

The card names things as the user would publish them: the base model by the hub id its config.json
recorded (`_name_or_path`), else by its folder's name; data, teachers and sources by name. Never a path of
the machine the work ran on. A source folder's own README describes the source, not this output: it is
not copied (its licence, a fact about the weights, is carried over).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import yaml

from . import corpus
from .version import __version__

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def front_matter(folder: Path) -> dict:
    """The YAML front matter of a folder's README.md ({} if it has none or it does not parse)."""
    readme = Path(folder) / "README.md"
    try:
        text = readme.read_text(encoding="utf-8")
        if text.startswith("---\n"):
            meta = yaml.safe_load(text[4:text.index("\n---", 4)])
            return meta if isinstance(meta, dict) else {}
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        pass
    return {}


def public_name(source) -> str:
    """How a card names a folder, file or corpus: a bundled corpus or a hub id as it is, else the last part
    of the path (never the path itself)."""
    text = str(source)
    if text in corpus.NAMES or (HUB_ID.fullmatch(text) and not Path(text).exists()):
        return text
    return Path(text).name or text


def base_model(source: Path) -> str:
    """The model an output derives from: the base a gqa card of the source names (a chain of gqa steps
    keeps the original), else the hub id the source's config.json recorded, else the source folder's name."""
    meta = front_matter(source)
    if "gqa" in (meta.get("tags") or []) and meta.get("base_model"):
        return str(meta["base_model"])
    try:
        recorded = json.loads((Path(source) / "config.json").read_text()).get("_name_or_path") or ""
    except (OSError, ValueError, AttributeError):
        recorded = ""
    return recorded if HUB_ID.fullmatch(str(recorded)) and not Path(recorded).is_absolute() else public_name(source)


def history(source: Path) -> list[dict]:
    """The steps gqa recorded in a source folder (its card's front matter keeps them for the next step)."""
    steps = front_matter(source).get("gqa_steps")
    return steps if isinstance(steps, list) else []


# ------------------------------------------------------------------------------------------------ steps

def conversion_step(report: dict) -> dict:
    """A conversion's report as a card step: no paths, the settings that made it."""
    calibration = report.get("calibration")
    return {
        "step": "convert", "method": report["method"],
        "kv_heads": {k.removesuffix("kv_heads_after").rstrip("_") or "layers": report[k] for k in report
                     if k.endswith("kv_heads_after")},  # decoder: {layers}; encoder–decoder: {encoder, self, cross}
        "transfer_error": transfer_error(report),
        "calibration": None if not calibration else {"data": public_name(calibration["data"]),
                                                     "tokens": calibration.get("tokens_used", calibration["tokens"]),
                                                     "seq_len": calibration["seq_len"]},
        "transfer_steps": (report.get("transfer") or {}).get("steps", 0),
        "joint_steps": (report.get("joint") or {}).get("steps", 0),
        "joint_kl": None if not report.get("joint") else [round(report["joint"][k], 5) for k in ("kl_before", "kl_after")],
        "kv_bytes_per_token": [report["kv_bytes_per_token_before"], report["kv_bytes_per_token_after"]],
    }


def transfer_error(report: dict) -> list[float] | None:
    """The layer-wise transfer's relative attention-output error, mean over the attentions it trained."""
    errors = [(r["relative_error_before"], r["relative_error_after"]) for r in report.get("layers") or []
              if "relative_error_after" in r]
    return [round(sum(e[i] for e in errors) / len(errors), 4) for i in (0, 1)] if errors else None


def training_step(report: dict) -> dict:
    """An uptraining run's report as a card step."""
    config = report.get("config") or {}
    return {
        "step": "uptrain", "data": public_name(report["data"]), "steps": report["steps"], "tokens": report["tokens"],
        "tokens_counted": report.get("tokens_counted", "tokens"), "alpha": report.get("alpha_effective"),
        "teacher": public_name(config["teacher"]) if config.get("teacher") else None,
        "validation_perplexity": [None if loss is None else round(math.exp(loss), 4)
                                  for loss in (report.get("val_loss_initial"), report.get("val_loss"))],
        "validation_tokens": report.get("val_tokens"),
    }


def describe_step(step: dict) -> str:
    """One line of the card's 'How it was made'."""
    if step["step"] == "convert":
        heads = "; ".join(f"{'' if k == 'layers' else k + ' attention '}KV heads: {compact(v)}"
                          for k, v in step["kv_heads"].items())
        line = f"converted with `{step['method']}` ({heads})"
        if step.get("calibration"):
            c = step["calibration"]
            line += f", calibrated on {c['tokens']:,} tokens of {c['data']} in blocks of {c['seq_len']}"
        if step.get("transfer_steps"):
            line += f", layer-wise transfer {step['transfer_steps']} steps per attention"
        if step.get("joint_steps"):
            line += f", joint stage {step['joint_steps']} steps"
        return line
    if step["step"] == "uptrain":
        teacher = f", distilled from {step['teacher']}" if step.get("teacher") else ""
        alpha = f" (α = {step['alpha']:.3g} of pre-training)" if step.get("alpha") else ""
        return f"uptrained {step['steps']:,} steps on {step['tokens']:,} {step['tokens_counted']} of {step['data']}" \
               f"{alpha}{teacher}"
    return f"written as {step['architecture']} in {step['dtype']} by `gqa export`"


def compact(heads) -> str:
    return f"{heads[0]} in all {len(heads)} layers" if isinstance(heads, list) and len(set(heads)) == 1 else str(heads)


# ------------------------------------------------------------------------------------------------ the card

def write_card(folder: Path, *, source, step: dict, name: str | None = None) -> None:
    """README.md of the written `folder` (before it is renamed to its destination `name`), made from the model
    folder `source` (None: trained from scratch) by `step` (`conversion_step`, `training_step`, or
    {"step": "export"})."""
    from .info import describe
    from .kinds import kind_of

    name, kind = name or Path(folder).name, kind_of(folder)
    info = {k: v.replace(str(folder), name) if isinstance(v, str) else v for k, v in describe(folder).items()}
    if step["step"] == "export":
        step = {**step, "architecture": info["architecture"], "dtype": info["dtype"]}
    source = Path(source) if source else None
    steps = [*history(source), step] if source else [step]
    base = base_model(source) if source else None
    meta = {"base_model": base, "library_name": library(info),
            "pipeline_tag": kind.pipeline_tag,
            "tags": tags(info), "gqa_steps": steps}
    if base is None:
        del meta["base_model"]
    if source and front_matter(source).get("license"):
        meta["license"] = front_matter(source)["license"]
    body = [f"# {name}", "", summary(info, base or "A model trained from scratch", kind), "", "## How it was made", "",
            *[f"{i}. {describe_step(s)}." for i, s in enumerate(steps, 1)], "", f"Made with gqa {__version__}.", "",
            "## KV cache", "", *kv_table(info), "", "## Quality", "", *quality(steps, name, base), "",
            "## How to run it", "", *how_to_run(info, name, kind)]
    text = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(body) + "\n"
    (Path(folder) / "README.md").write_text(text, encoding="utf-8")


def library(info: dict) -> str:
    """transformers where its classes (or gqa's configuration module, with trust_remote_code) load the folder."""
    return "gqa" if info["family"] == "gqa" else "transformers"


def tags(info: dict) -> list[str]:
    kinds = info["attention"]
    out = ["gqa", "kv-cache"]
    if "MQA" in kinds:
        out.append("multi-query-attention")
    if "GQA" in kinds or "MQA" in kinds:
        out.append("grouped-query-attention")
    if "remote_code" in info.get("vllm", "") or "trust_remote_code" in info.get("vllm", ""):
        out.append("custom_code")
    return out


def summary(info: dict, base: str, kind) -> str:
    shape = kind.layers_format.format(**info)
    return (f"{base} with fewer key/value heads: {info['attention']} ({shape}, {info['query_heads']} query heads), "
            f"stored as {info['architecture']} in {info['dtype']}; its KV cache is {info['kv_reduction']:.2f}x "
            f"smaller than the same model's with multi-head attention.")


def kv_table(info: dict) -> list[str]:
    rows = ["| | KV bytes per token |", "|---|---|",
            f"| with multi-head attention | {info['kv_bytes_per_token_if_mha']:,} |",
            f"| this model ({info['dtype']}) | {info['kv_bytes_per_token']:,} |"]
    if "kv_bytes_per_source_token" in info:
        rows.append(f"| this model, cross-attention, per source token | {info['kv_bytes_per_source_token']:,} |")
    return rows


def quality(steps: list[dict], name: str, base: str | None) -> list[str]:
    """What gqa measured, each figure with the text it was measured on; a command where it measured nothing."""
    lines = []
    for s in steps:
        if s["step"] == "uptrain" and s.get("validation_perplexity", [None, None])[1]:
            before, after = s["validation_perplexity"]
            lines.append(f"- Validation perplexity on held-out documents of {s['data']} (never trained on; "
                         f"{s['validation_tokens']:,} tokens): {before:.3f} before uptraining, {after:.3f} after.")
        if s["step"] == "convert" and s.get("transfer_error"):
            lines.append(f"- Relative error of the attention outputs against the source's on the calibration text "
                         f"(not held-out), mean over attentions: {s['transfer_error'][0]:.3f} after the merge, "
                         f"{s['transfer_error'][1]:.3f} after the layer-wise transfer.")
        if s["step"] == "convert" and s.get("joint_kl"):
            lines.append(f"- KL(source ‖ converted) on the calibration examples (not held-out text): "
                         f"{s['joint_kl'][0]:.4f} before the joint stage, {s['joint_kl'][1]:.4f} after.")
    reference = f" --reference {base}" if base else ""
    lines.append(f"- Measure it on text of your own{' against the original' if base else ''}: "
                 f"`gqa eval {name} --data TEXT{reference}`.")
    return lines


def how_to_run(info: dict, name: str, kind) -> list[str]:
    lines = [f"- gqa: `gqa generate {name} --prompt \"...\"`, or `gqa.load(\"{name}\")` in Python."]
    if info["family"] == "gqa":
        lines.append("- transformers: no transformers class holds this KV-head layout; it runs in gqa.")
    else:
        remote = ", trust_remote_code=True" if "trust_remote_code" in info.get("vllm", "") else ""
        lines.append(f"- transformers: `transformers.{kind.auto_class}.from_pretrained(\"{name}\"{remote})`.")
    vllm = info.get("vllm", "")
    if vllm.startswith("yes"):
        flag = " --trust-remote-code" if "trust_remote_code" in vllm else ""
        caveat = vllm[vllm.index("(not ") + 1:].removesuffix(")") if "(not " in vllm else ""
        lines.append(f"- vLLM: `vllm serve {name}{flag}` (`--kv-cache-dtype fp8` stores its KV cache in a byte a value)"
                     + (f"; {caveat}." if caveat else "."))
    else:
        lines.append(f"- vLLM: {vllm.removeprefix('no: ')}.")
    gguf = info["llama_cpp"]
    lines.append(f"- llama.cpp: `gqa export {name} {name}.gguf --format gguf`, then `llama-cli -m {name}.gguf` "
                 f"(its KV cache quantized with `-ctk q8_0 -ctv q8_0` stores fewer bytes still)." if gguf.startswith("yes")
                 else f"- llama.cpp: {gguf.removeprefix('no: ')}.")
    return lines
