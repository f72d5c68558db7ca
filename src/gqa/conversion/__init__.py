"""MHA -> GQA / MQA conversion of a model folder, streamed one layer at a time.

The converter never holds the model: it reads one layer's tensors (from whichever shard holds them),
splits fused layouts into per-head projections (`gqa.checkpoints.families`), merges the layer's K/V heads
with a method, joins the result back into the output family's layout and hands it to a shard writer whose
shards are at most half the largest input shard. Methods, one module each, map one layer's attention
(`heads.AttentionWeights`) to the merged attention:

- `pooling`: mean / first / random, from the weights alone (the GQA paper's three);
- `aligned`: exact symmetries, then fits to calibration activations (needs `calib`).

With calibration text (`calib`), the source model runs over it layer by layer beside the conversion
(`calibration.Stream`): that is what `aligned` fits to, what `transfer` (`transfer_steps`) trains each
converted attention against, and what `budget` (`kv_budget`) measures each layer's sensitivity on.
Output goes to a temporary folder renamed when complete; config.json is written last.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoints import check_finite, check_layout, config_json, export_tensors, files, read_model_config, target_family
from ..checkpoints.families import stack_heads
from ..errors import GQAError, warn
from ..fingerprint import digest, tensors_digest
from ..jsonfiles import read_json, write_json
from ..model import ModelConfig
from ..runtimes import write_remote_code
from ..version import __version__
from . import aligned, budget, pooling
from .calibration import Stream, build_block, calibration_blocks
from .heads import AttentionWeights, RopeLayout
from .transfer import TransferSettings, transfer_layer

LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
TORCH_DTYPES = {name: dtype for dtype, name in files.SAFETENSORS_DTYPES.items() if dtype.is_floating_point}
METHODS = (*pooling.METHODS, "aligned")
CALIBRATED = ("aligned",)  # methods that need calibration text
CALIB_TOKENS = 65536

__all__ = ["convert", "target_kv_heads", "METHODS"]


def target_kv_heads(current: list[int], n_heads: int, n_kv_heads: int | None, per_layer: list[int] | None) -> list[int]:
    """The new KV-head count of every layer, checked: each must divide the layer's current count."""
    if (n_kv_heads is None) == (per_layer is None):
        raise GQAError("give exactly one of --kv-heads, --kv-heads-per-layer or --kv-budget")
    new = [n_kv_heads] * len(current) if per_layer is None else list(per_layer)
    if len(new) != len(current):
        raise GQAError(f"--kv-heads-per-layer has {len(new)} entries but the model has {len(current)} layers")
    for layer, (old, g) in enumerate(zip(current, new)):
        where = f"layer {layer}: " if per_layer is not None else ""
        if g < 1:
            raise GQAError(f"{where}the number of KV heads must be >= 1, got {g}")
        if old % g:
            raise GQAError(f"{where}{g} KV heads does not divide the current {old} (of {n_heads} query heads); "
                           f"choose one of {budget.divisors(old)}")
    return new


@dataclass
class Job:
    """Everything one conversion needs, checked before any work starts."""
    src: Path
    dst: Path
    config: ModelConfig
    family: object
    source_hf: dict | None
    method: str
    seed: int
    grouping: str
    calib: dict | None  # {"data", "tokens", "seq_len"}
    transfer: TransferSettings
    kv_budget: float | None
    new_heads: list[int] | None
    index: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    init_std: float = 0.02

    @property
    def rope(self) -> RopeLayout:
        return RopeLayout.of(self.config)


def plan(src, dst, n_kv_heads, per_layer, method, seed, overwrite, calib, calib_tokens, calib_seq_len, grouping,
         transfer, kv_budget) -> Job:
    if method not in METHODS:
        raise GQAError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if grouping not in aligned.GROUPINGS:
        raise GQAError(f"unknown grouping {grouping!r}; choose one of {', '.join(aligned.GROUPINGS)}")
    transfer.check()
    config, family, hf = read_model_config(src)
    if kv_budget is not None:
        if n_kv_heads is not None or per_layer is not None:
            raise GQAError("give exactly one of --kv-heads, --kv-heads-per-layer or --kv-budget")
        budget.check_budget(kv_budget, config.n_kv_heads)
        new_heads = None
    else:
        new_heads = target_kv_heads(config.n_kv_heads, config.n_heads, n_kv_heads, per_layer)
    needs = [what for what, wanted in ((f"--method {method}", method in CALIBRATED), ("--transfer-steps",
             transfer.steps > 0), ("--kv-budget", kv_budget is not None)) if wanted]
    calibration = None
    if needs and not calib:
        raise GQAError(f"{' and '.join(needs)} {'need' if len(needs) > 1 else 'needs'} calibration text: "
                       f"pass --calib DATA (a file, folder or bundled corpus)")
    if calib:
        from ..data import check_source

        check_source(calib)
        seq_len = calib_seq_len or min(512, config.max_positions)
        if not 2 <= seq_len <= config.max_positions:
            raise GQAError(f"--calib-seq-len must be in [2, {config.max_positions}], got {seq_len}")
        if calib_tokens < seq_len:
            raise GQAError(f"--calib-tokens {calib_tokens} is less than one block of --calib-seq-len {seq_len}")
        calibration = {"data": str(calib), "tokens": calib_tokens, "seq_len": seq_len}
    check_layout(src, config, family)  # from the headers: a config that disagrees with the weights stops here
    files.check_destination(dst, overwrite, sources=[src])
    source_hf = hf.get("hf_config") if family is None else hf
    return Job(Path(src), Path(dst), config, family, source_hf, method, seed, grouping, calibration, transfer,
               kv_budget, new_heads, files.tensor_index(src), storage_dtype(files.tensor_shapes(src)),
               init_std(source_hf or {}))


def check_options(method: str, calib, calib_tokens, calib_seq_len, grouping, transfer_steps: int, transfer_lr,
                  transfer_inputs, kv_budget) -> None:
    """Refuse an option that would do nothing in the combination given (it would be recorded as applied)."""
    calibrated = method in CALIBRATED or transfer_steps > 0 or kv_budget is not None
    if calib and not calibrated:
        raise GQAError(f"--calib is read only by {' / '.join(f'--method {m}' for m in CALIBRATED)}, --transfer-steps "
                       f"or --kv-budget; --method {method} merges from the weights alone: drop --calib or add one of them")
    for name, value in (("--calib-tokens", calib_tokens), ("--calib-seq-len", calib_seq_len)):
        if value is not None and not calib:
            raise GQAError(f"{name} sets the calibration, but no --calib is given")
    if grouping is not None and method not in CALIBRATED:
        raise GQAError(f"--grouping chooses the groups of {' / '.join(f'--method {m}' for m in CALIBRATED)}; "
                       f"--method {method} groups query heads contiguously")
    for name, value in (("--transfer-lr", transfer_lr), ("--transfer-inputs", transfer_inputs)):
        if value is not None and not transfer_steps:
            raise GQAError(f"{name} sets the layer-wise transfer, which runs only with --transfer-steps N (N > 0)")


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
    *,
    calib: str | os.PathLike | None = None,
    calib_tokens: int | None = None,
    calib_seq_len: int | None = None,
    grouping: str | None = None,
    transfer_steps: int = 0,
    transfer_lr: float | None = None,
    transfer_inputs: str | None = None,
    kv_budget: float | None = None,
) -> dict:
    """Convert the model folder `src` to `dst` with fewer KV heads; returns the report written to conversion.json.

    Exactly one of n_kv_heads (every layer), n_kv_heads_per_layer, kv_budget (a fraction of the source's KV
    bytes, split over layers by measured sensitivity) sets the target. `calib` (a file, folder or bundled
    corpus name) is the text `aligned`, transfer and the budget need; `calib_tokens` of it are used (65,536
    unless given). Options left None take their defaults; one given where it would do nothing is refused.
    """
    start = time.time()
    check_options(method, calib, calib_tokens, calib_seq_len, grouping, transfer_steps, transfer_lr, transfer_inputs,
                  kv_budget)
    transfer = TransferSettings(steps=transfer_steps, lr=TransferSettings.lr if transfer_lr is None else transfer_lr,
                                inputs=transfer_inputs or "original", seed=seed)
    job = plan(src, dst, n_kv_heads, n_kv_heads_per_layer, method, seed, overwrite, calib,
               CALIB_TOKENS if calib_tokens is None else calib_tokens, calib_seq_len, grouping or "similarity",
               transfer, kv_budget)
    warn_without_tokenizer(src)
    blocks = calibration_for(job) if job.calib else None
    budget_record = None
    if job.kv_budget is not None:
        budget_record = choose_heads(job, blocks, progress)
        job.new_heads = budget_record["kv_heads"]
    new_config = replace(job.config, n_kv_heads=job.new_heads)
    out_family = target_family(new_config, job.source_hf, format)
    with files.atomic_dir(dst, overwrite=overwrite) as tmp:
        state_dir = TransferState.open(job, new_config, blocks) if job.transfer.steps else None
        try:
            writer = files.ShardWriter(tmp, shard_bytes(job))
            counts, layers = write_model(job, new_config, out_family, writer, blocks, state_dir, progress)
            writer.close()
        except GQAError:  # a mistake in the input (weights holding NaN, say): nothing of this run is worth resuming
            if state_dir:
                state_dir.remove()
            raise
        report = conversion_report(job, new_config, out_family, counts, layers, budget_record, start)
        files.copy_tokenizer(src, tmp)
        write_remote_code(out_family, tmp)
        files.write_json(tmp / "conversion.json", report)
        files.write_json(tmp / "config.json", config_json(new_config, job.source_hf, out_family, job.dtype))
    if state_dir:
        state_dir.remove()
    # the destination is replaced: a transfer into it that a killed run left is of no use any more
    files.remove_stale(job.dst, TransferState.pattern(job.dst), "left by an interrupted transfer into")
    return report


# ------------------------------------------------------------------------------------------- the layers

def write_model(job: Job, new_config: ModelConfig, out_family, writer, blocks, state_dir, progress: bool):
    """Read, merge (and transfer) and write every layer; returns (parameters before/after, per-layer record)."""
    groups = layer_groups(job.index)
    counts = [0, 0]
    outer = groups.pop() if groups and layer_of(groups[-1][0]) is None else []
    # embeddings, final norm, head: the stream starts from them; read again for writing at the end, not held
    # through the layers (with a large vocabulary they are as big as several layers)
    outside = read_layer(job, outer, [0, 0]) if blocks is not None else None
    streams = Streams.start(job, outside, blocks) if blocks is not None else None
    if state_dir:
        state_dir.follow(outside)
    del outside
    layers = []
    bar = tqdm(groups, desc=f"converting ({job.method})", unit="layer", disable=not progress)
    for names in bar:
        layer = layer_of(names[0])
        state = read_layer(job, names, counts)
        if state_dir:
            state_dir.follow(state)  # what this layer's saved transfer must have been computed from
        state, record = convert_layer(job, layer, state, new_config, streams, state_dir)
        layers.append(record)
        write(writer, export_tensors(state, new_config, out_family), counts)
        del state  # else held while the next layer is read: two layers in memory, not one
    write(writer, export_tensors(read_layer(job, outer, counts), new_config, out_family), counts)
    return counts, layers


def convert_layer(job: Job, layer: int, state: dict, new_config: ModelConfig, streams, state_dir) -> tuple[dict, dict]:
    """One layer's tensors with its attention merged to the layer's new KV-head count, and what was done."""
    g_now, g = job.config.n_kv_heads[layer], new_config.n_kv_heads[layer]
    record: dict = {"layer": layer, "kv_heads": g}
    block = build_block(job.config, layer, state) if streams else None  # over the stored tensors: no copy
    if g != g_now:
        saved = state_dir.get(layer) if state_dir else None
        merged, record = saved if saved is not None else merge_layer(job, layer, state, g, block, streams, state_dir,
                                                                     record)
        state = {**state, **merged.to_state(layer)}
    if streams:  # the converted layer only where a stream runs through it
        streams.advance(block, build_block(new_config, layer, state) if streams.converted else None)
    return state, record


def merge_layer(job: Job, layer: int, state: dict, g: int, block, streams, state_dir,
                record: dict) -> tuple[AttentionWeights, dict]:
    """The method's merge of one layer (then its transfer, saved for a resume); block: the source layer."""
    inputs = streams.source.attention_inputs(block) if streams else None
    attn = AttentionWeights.from_state(state, layer, job.config)
    merged, info = merge_attention(job, layer, attn, g, inputs, streams.source.rope if streams else None, block)
    record.update(info)
    if job.transfer.steps:
        merged, info = transfer_attention(job, layer, block, merged, inputs, streams)
        record.update(info)
        state_dir.put(layer, merged, record)
    return merged, record


def merge_attention(job: Job, layer: int, attn: AttentionWeights, g: int, inputs=None, rope_tables=None, block=None):
    """The method's merge of one layer's attention to g KV heads (inputs: its calibration inputs [blocks, T, d];
    block: the source layer)."""
    if job.method in pooling.METHODS:
        return pooling.merge(attn, g, job.method, layer, job.seed, job.init_std), {}
    with_bias = any(t is not None for t in (attn.bq, attn.bk, attn.bv))
    layer_inputs = aligned.LayerInputs(inputs, rope_tables, with_bias, block.attention)
    return aligned.merge(attn, g, layer_inputs, job.rope, job.grouping)


def transfer_attention(job: Job, layer: int, block, merged: AttentionWeights, inputs, streams) -> tuple[AttentionWeights, dict]:
    targets = streams.source.attention_outputs(block, inputs)
    if job.transfer.inputs == "converted":
        inputs = streams.converted.attention_inputs(block)
    return transfer_layer(job.config, layer, merged, inputs, targets, streams.source.rope, job.transfer)


@dataclass
class Streams:
    """The calibration blocks' residual stream through the source layers and, where transfer trains on the
    converted model's own inputs, through the converted layers."""
    source: Stream
    converted: Stream | None

    @classmethod
    def start(cls, job: Job, outside: dict, blocks: torch.Tensor) -> Streams:
        source = Stream.start(job.config, outside, blocks)
        own = job.transfer.steps and job.transfer.inputs == "converted"
        return cls(source, Stream(source.hidden.clone(), source.rope, source.targets) if own else None)

    def advance(self, source_block, converted_block) -> None:
        self.source.advance(source_block)
        if self.converted is not None:
            self.converted.advance(converted_block)


# ------------------------------------------------------------------------------------------- calibration

def calibration_for(job: Job) -> torch.Tensor:
    from ..checkpoints.tokenizer import load_tokenizer
    from ..data import check_token_ids

    c = job.calib
    blocks = calibration_blocks(c["data"], load_tokenizer(job.src), c["tokens"], c["seq_len"], job.seed)
    check_token_ids(blocks, job.config.vocab_size, c["data"])
    return blocks


BUDGET_TOKENS = 4096  # calibration tokens the sensitivities are measured on


def choose_heads(job: Job, blocks: torch.Tensor, progress: bool) -> dict:
    """Measure every layer's sensitivity to merging and pick per-layer KV heads within the budget."""
    allowed = budget.check_budget(job.kv_budget, job.config.n_kv_heads)
    sample = blocks[: max(1, BUDGET_TOKENS // job.calib["seq_len"])]
    groups = layer_groups(job.index)
    outer = groups.pop() if groups and layer_of(groups[-1][0]) is None else []
    outside = read_layer(job, outer, [0, 0])
    by_layer = {layer_of(names[0]): names for names in groups}

    stream = Stream.start(job.config, outside, sample)

    def merge(layer, state, inputs, g, block):
        attn = AttentionWeights.from_state(state, layer, job.config)
        return {**state, **merge_attention(job, layer, attn, g, inputs, stream.rope, block)[0].to_state(layer)}

    bar = (lambda it: tqdm(it, desc="measuring sensitivities", unit="layer")) if progress else iter
    measured = budget.measure(job.config, lambda layer: read_layer(job, by_layer[layer], [0, 0]), stream, outside,
                              merge, bar)
    choice = budget.choose(measured["increase"], job.config.n_kv_heads, allowed)
    return {"fraction": job.kv_budget, "kv_heads_allowed": allowed, "tokens": int(sample[:, 1:].numel()),
            "loss": measured["loss"], "sensitivity": [{str(g): v for g, v in d.items()} for d in measured["increase"]],
            "kv_heads": choice}


class TransferState:
    """Layers already transferred, kept beside the destination (`.DEST.transfer-*`, claimed by the run that
    writes it) until the conversion completes, so that a killed run can be resumed.

    A run adopts the state a killed run left when its settings and calibration tokens are the same (other
    states of that destination are removed, with a warning), and takes a saved layer only when the
    fingerprint of everything that layer was computed from (those settings, the embeddings, the source
    layers up to it, byte for byte) is the one it computes now: a source whose weights were replaced in
    place is transferred again from the first layer that differs, never mixed with the old one."""

    def __init__(self, folder: Path, record: dict, config: ModelConfig):
        self.dir, self.record, self.config = folder, record, config
        self.chain = digest(record)
        self.checked_from: int | None = None

    @staticmethod
    def pattern(dst: Path) -> str:
        return f".{dst.name}.transfer*"

    @classmethod
    def open(cls, job: Job, new_config: ModelConfig, blocks: torch.Tensor) -> TransferState:
        record = {"method": job.method, "seed": job.seed, "grouping": job.grouping, "calibration": job.calib,
                  "calibration_tokens": tensors_digest({"blocks": blocks}), "transfer": asdict(job.transfer),
                  "kv_heads": new_config.n_kv_heads, "gqa_version": __version__}
        fresh = Path(tempfile.mkdtemp(prefix=f".{job.dst.name}.transfer-", dir=job.dst.parent))
        for old in sorted(job.dst.parent.glob(cls.pattern(job.dst))):
            if old == fresh or not old.is_dir() or files.owner_alive(old):
                continue  # a live run's state is its own
            settings = old / "settings.json"
            if settings.is_file() and read_json(settings) == record and not any(fresh.iterdir()):
                try:
                    os.replace(old, fresh)  # the rename claims it: of two runs starting together, one gets it
                except OSError:
                    continue
                warn(f"resuming the transfer saved in {old} (now {fresh.name})")
                continue
            shutil.rmtree(old, ignore_errors=True)
            warn(f"removed {old}: a transfer into {job.dst.name} interrupted with other settings or calibration text")
        files.claim(fresh)
        write_json(fresh / "settings.json", record)
        return cls(fresh, record, new_config)

    def follow(self, tensors: dict[str, torch.Tensor]) -> None:
        """Fold the next source tensors read (the embeddings, then each layer's) into the fingerprint."""
        self.chain = digest(self.chain, tensors_digest(tensors))

    def path(self, layer: int) -> Path:
        return self.dir / f"layer-{layer:05d}.safetensors"

    def get(self, layer: int):
        path = self.path(layer)
        if not path.is_file():
            return None
        record = read_json(path.with_suffix(".json"))
        if record.pop("fingerprint", None) != self.chain:
            self.discard_from(layer)
            return None
        from safetensors.torch import load_file

        return AttentionWeights.from_state(load_file(str(path)), layer, self.config), record

    def discard_from(self, layer: int) -> None:
        """The source differs from what the saved layers from `layer` on were computed from: drop them."""
        saved = [p for p in self.dir.glob("layer-*") if int(p.name[6:11]) >= layer]
        for p in saved:
            p.unlink()
        warn(f"the source's weights differ from those the interrupted transfer in {self.dir} was computed from, "
             f"from layer {layer} on: transferring those layers again")

    def put(self, layer: int, merged: AttentionWeights, record: dict) -> None:
        from safetensors.torch import save_file

        path = self.path(layer)
        write_json(path.with_suffix(".json"), {**record, "fingerprint": self.chain})
        save_file(merged.to_state(layer), str(path.with_suffix(".partial")))
        os.replace(path.with_suffix(".partial"), path)  # the weights last: their presence marks the layer done

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------- reading, writing

def layer_of(name: str) -> int | None:
    m = LAYER.search(name)
    return int(m[1]) if m else None


def layer_groups(names) -> list[list[str]]:
    """Tensor names grouped by layer, in layer order; tensors outside the layers (embeddings, head) last."""
    groups: dict[int | None, list[str]] = {}
    for name in names:
        groups.setdefault(layer_of(name), []).append(name)
    order = sorted(k for k in groups if k is not None) + ([None] if None in groups else [])
    return [groups[k] for k in order]


def read_layer(job: Job, names: list[str], counts: list[int]) -> dict[str, torch.Tensor]:
    """Tensors under gqa's names (fused layouts split), checked finite; counts the source parameters."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in files.read_tensors(job.index, names).items():
        check_finite(job.src, name, tensor)
        got = job.family.import_tensor(name, tensor, job.config) if job.family else {name: tensor}
        if got:
            counts[0] += tensor.numel()
        state.update(got)
    return stack_heads(state)


def write(writer, tensors: dict[str, torch.Tensor], counts: list[int]) -> None:
    for name, tensor in tensors.items():
        counts[1] += tensor.numel()
        writer.add(name, tensor)


def shard_bytes(job: Job) -> int:
    largest = max(f.stat().st_size for f in set(job.index.values()))
    return min(files.SHARD_BYTES, max(largest // 2, 256 * 1024**2))


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


def warn_without_tokenizer(src) -> None:
    from ..checkpoints.tokenizer import TOKENIZER_MARKERS

    if not any((Path(src) / name).is_file() for name in TOKENIZER_MARKERS):
        warn(f"{src} has no tokenizer files ({', '.join(TOKENIZER_MARKERS)}); the converted model cannot be "
             f"evaluated or generated from until they are copied next to it")


# ------------------------------------------------------------------------------------------- the report

def conversion_report(job: Job, new_config: ModelConfig, out_family, counts, layers, budget_record, start) -> dict:
    element = torch.empty((), dtype=job.dtype).element_size()
    before, after = job.config.kv_bytes_per_token(element), new_config.kv_bytes_per_token(element)
    report = {
        "gqa_version": __version__,
        "source": str(job.src.resolve()),
        "destination": str(job.dst.resolve()),
        "method": job.method,
        "seed": job.seed if job.method == "random" or job.calib else None,
        "architecture": (out_family.architectures[0] if out_family else "GQAForCausalLM"),
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
    if job.calib:
        report["calibration"] = job.calib
        report["grouping"] = job.grouping if job.method in CALIBRATED else None
        report["transfer"] = asdict(job.transfer) if job.transfer.steps else None
        report["layers"] = layers
    if budget_record:
        report["kv_budget"] = budget_record
    return report


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
    how = report["method"] + (f", seed {report['seed']}" if report["seed"] is not None else "")
    if report.get("calibration"):
        c = report["calibration"]
        how += f"; calibrated on {c['tokens']:,} tokens of {c['data']}"
        if report.get("transfer"):
            errors = [(r["relative_error_before"], r["relative_error_after"]) for r in report["layers"]
                      if "relative_error_after" in r]
            how += f"; transfer {report['transfer']['steps']} steps per layer"
            if errors:
                how += (f" (attention output error, mean over layers: {sum(e[0] for e in errors) / len(errors):.3f}"
                        f" -> {sum(e[1] for e in errors) / len(errors):.3f})")
    lines.append(f"method {how}; written as {report['architecture']} to {report['destination']}")
    return "\n".join(lines)
