"""MHA -> GQA / MQA conversion of a model folder, streamed one layer at a time.

The converter never holds the model: it reads one layer's tensors (from whichever shard holds them),
splits fused layouts into per-head projections (`gqa.checkpoints.families`), pools the K and V
projections (`pooling`), joins them back into the output family's layout and hands them to a shard
writer whose shards are at most half the largest input shard. Peak memory is therefore bounded by the
largest shard, not the model. Output goes to a temporary folder renamed when complete; config.json is
written last, so a partial folder is never mistaken for a model.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoints import check_finite, check_layout, config_json, export_tensors, files, read_model_config, target_family
from ..errors import GQAError, warn
from ..version import __version__
from .pooling import METHODS, check_method, pool_heads

LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
KV_TENSOR = re.compile(r"layers\.(\d+)\.attention\.w[kv]\.(weight|bias)")
TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}

__all__ = ["convert", "target_kv_heads", "METHODS"]


def target_kv_heads(current: list[int], n_heads: int, n_kv_heads: int | None, per_layer: list[int] | None) -> list[int]:
    """The new KV-head count of every layer, checked: each must divide the layer's current count."""
    if (n_kv_heads is None) == (per_layer is None):
        raise GQAError("give exactly one of --kv-heads or --kv-heads-per-layer")
    new = [n_kv_heads] * len(current) if per_layer is None else list(per_layer)
    if len(new) != len(current):
        raise GQAError(f"--kv-heads-per-layer has {len(new)} entries but the model has {len(current)} layers")
    for layer, (old, g) in enumerate(zip(current, new)):
        where = f"layer {layer}: " if per_layer is not None else ""
        if g < 1:
            raise GQAError(f"{where}the number of KV heads must be >= 1, got {g}")
        if old % g:
            divisors = [d for d in range(1, old + 1) if old % d == 0]
            raise GQAError(f"{where}{g} KV heads does not divide the current {old} (of {n_heads} query heads); "
                           f"choose one of {divisors}")
    return new


def init_std(hf: dict) -> float:
    for key in ("initializer_range", "init_std"):
        if isinstance(hf.get(key), (int, float)):
            return float(hf[key])
    return 0.02


def storage_dtype(shapes: dict) -> torch.dtype:
    """The dtype most of a checkpoint's parameters are stored in (the output keeps it)."""
    counts: dict[str, int] = {}
    for shape, dt in shapes.values():
        counts[dt] = counts.get(dt, 0) + math.prod(shape)
    return TORCH_DTYPES.get(max(counts, key=counts.get), torch.float32)


def layer_groups(names) -> list[list[str]]:
    """Tensor names grouped by layer, in layer order; tensors outside the layers (embeddings, head) last."""
    groups: dict[int | None, list[str]] = {}
    for name in names:
        m = LAYER.search(name)
        groups.setdefault(int(m[1]) if m else None, []).append(name)
    order = sorted(k for k in groups if k is not None) + ([None] if None in groups else [])
    return [groups[k] for k in order]


def warn_without_tokenizer(src) -> None:
    from ..checkpoints.tokenizer import TOKENIZER_MARKERS

    if not any((Path(src) / name).is_file() for name in TOKENIZER_MARKERS):
        warn(f"{src} has no tokenizer files ({', '.join(TOKENIZER_MARKERS)}); the converted model cannot be "
             f"evaluated or generated from until they are copied next to it")


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    n_kv_heads: int | None = None,
    n_kv_heads_per_layer: list[int] | None = None,
    method: str = "mean",
    seed: int = 0,
    overwrite: bool = False,
    format: str = "auto",
    progress: bool = True,
) -> dict:
    """Convert the model folder `src` to `dst` with fewer KV heads; returns the report written to conversion.json."""
    start = time.time()
    check_method(method)
    config, family, hf = read_model_config(src)
    source_hf = hf.get("hf_config") if family is None else hf
    new_config = replace(config, n_kv_heads=target_kv_heads(config.n_kv_heads, config.n_heads, n_kv_heads,
                                                             n_kv_heads_per_layer))
    out_family = target_family(new_config, source_hf, format)
    check_layout(src, config, family)  # from the headers: a config that disagrees with the weights stops here
    files.check_destination(dst, overwrite, sources=[src])
    warn_without_tokenizer(src)
    index, shapes = files.tensor_index(src), files.tensor_shapes(src)
    dtype = storage_dtype(shapes)
    largest = max(f.stat().st_size for f in set(index.values()))
    std = init_std(source_hf or {})

    def merge(name: str, tensor: torch.Tensor) -> torch.Tensor:
        m = KV_TENSOR.fullmatch(name)
        if not m:
            return tensor
        layer = int(m[1])
        return pool_heads(tensor, config.n_kv_heads[layer], new_config.n_kv_heads[layer], method, name=name, seed=seed,
                          init_std=std)

    with files.atomic_dir(dst, overwrite=overwrite) as tmp:
        writer = files.ShardWriter(tmp, min(files.SHARD_BYTES, max(largest // 2, 256 * 1024**2)))
        counts = [0, 0]  # parameters before, after
        bar = tqdm(layer_groups(index), desc=f"converting ({method})", unit="layer", disable=not progress)
        for names in bar:
            state = read_layer(src, index, names, config, family, counts)
            for name, tensor in export_tensors({k: merge(k, v) for k, v in state.items()}, new_config, out_family).items():
                counts[1] += tensor.numel()
                writer.add(name, tensor)
        writer.close()
        report = conversion_report(src, dst, method, seed, config, new_config, out_family, dtype, counts, start)
        files.copy_tokenizer(src, tmp)
        files.write_json(tmp / "conversion.json", report)
        files.write_json(tmp / "config.json", config_json(new_config, source_hf, out_family, dtype))
    return report


def read_layer(src, index, names: list[str], config, family, counts: list[int]) -> dict[str, torch.Tensor]:
    """One layer's tensors under gqa's names (fused layouts split), checked finite; counts the source parameters."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in files.read_tensors(index, names).items():
        check_finite(src, name, tensor)
        got = family.import_tensor(name, tensor, config) if family else {name: tensor}
        if got:
            counts[0] += tensor.numel()
        state.update(got)
    return state


def conversion_report(src, dst, method, seed, config, new_config, out_family, dtype, counts, start) -> dict:
    element = torch.empty((), dtype=dtype).element_size()
    before, after = config.kv_bytes_per_token(element), new_config.kv_bytes_per_token(element)
    return {
        "gqa_version": __version__,
        "source": str(Path(src).resolve()),
        "destination": str(Path(dst).resolve()),
        "method": method,
        "seed": seed if method == "random" else None,
        "architecture": (out_family.architectures[0] if out_family else "GQAForCausalLM"),
        "query_heads": config.n_heads,
        "kv_heads_before": config.n_kv_heads,
        "kv_heads_after": new_config.n_kv_heads,
        "kv_bytes_per_token_before": before,
        "kv_bytes_per_token_after": after,
        "kv_reduction": before / after,
        "parameters_before": counts[0],
        "parameters_after": counts[1],
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": round(time.time() - start, 3),
    }


def format_report(report: dict) -> str:
    """The table `gqa convert` ends with."""
    def heads(hs):
        return f"{hs[0]} in all {len(hs)} layers" if len(set(hs)) == 1 else ",".join(map(str, hs))

    rows = [
        ("", "before", "after"),
        ("KV heads per layer", heads(report["kv_heads_before"]), heads(report["kv_heads_after"])),
        ("KV bytes per token", f"{report['kv_bytes_per_token_before']:,}",
         f"{report['kv_bytes_per_token_after']:,}  ({report['kv_reduction']:.2f}x smaller)"),
        ("parameters", f"{report['parameters_before']:,}", f"{report['parameters_after']:,}"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    lines.append(f"method {report['method']}" + (f", seed {report['seed']}" if report["seed"] is not None else "")
                 + f"; written as {report['architecture']} to {report['destination']}")
    return "\n".join(lines)
