"""MHA -> GQA / MQA conversion of a model folder, streamed one layer at a time.

`convert()` checks everything it can before any work (`plan`), then the layer loop (`layers`) reads one
layer at a time, merges its K/V heads with a method and writes it. Methods are registered in `methods`
(one module each: `pooling` has the paper's mean / first / random, `aligned` fits to calibration
activations); each maps one layer's attention (`heads.AttentionWeights`) to the merged attention.

With calibration text (`calib`), the source model runs over it layer by layer beside the conversion
(`calibration.Stream`): that is what calibrated methods fit to, what `transfer` (`transfer_steps`) trains
each converted attention against, and what `budget` (`kv_budget`) measures each layer's sensitivity on.
The joint stage (`joint_steps`, `joint`) then trains every layer's attention together against the
source's next-token distributions. Work that would be expensive to lose is kept for a resume (`resume`).
Output goes to a temporary folder renamed when complete.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..attention import check_regroup
from ..card import conversion_step, write_card
from ..checkpoints import check_layout, config_json, export_tensors, files, read_model_config, target_family
from ..checkpoints.tokenizer import warn_without_tokenizer
from ..devices import keep_freed_memory
from ..errors import GQAError
from ..fingerprint import tensors_digest
from ..kinds import kind_of
from ..model import ModelConfig
from ..version import __version__
from . import budget, joint
from .calibration import calibration_blocks
from .heads import AttentionWeights, RopeLayout
from .interface import CalibrationSettings, Method
from .joint import JointSettings
from .layers import choose_heads, shard_bytes, write_model
from .methods import REGISTRY, register
from .options import ConversionOptions
from .report import conversion_report, format_report
from .resume import ResumeState
from .seq2seq import convert_seq2seq
from .transfer import TransferSettings

TORCH_DTYPES = {name: dtype for dtype, name in files.SAFETENSORS_DTYPES.items() if dtype.is_floating_point}
TransferState = ResumeState  # the name gqa 0.1 had for it

__all__ = ["convert", "ConversionOptions", "target_kv_heads", "format_report", "REGISTRY",
           "register", "ResumeState"]


def target_kv_heads(current: list[int], n_heads: int, n_kv_heads: int | None, per_layer: list[int] | None) -> list[int]:
    """The new KV-head count of every layer, checked: each must divide the layer's current count."""
    if (n_kv_heads is None) == (per_layer is None):
        raise GQAError("give exactly one of --kv-heads, --kv-heads-per-layer or --kv-budget")
    new = [n_kv_heads] * len(current) if per_layer is None else list(per_layer)
    if len(new) != len(current):
        raise GQAError(f"--kv-heads-per-layer has {len(new)} entries but the model has {len(current)} layers")
    for layer, (old, g) in enumerate(zip(current, new)):
        check_regroup(old, g, n_heads, f"layer {layer}: " if per_layer is not None else "")
    return new


@dataclass(kw_only=True)
class Job:
    """Everything one decoder conversion needs, checked before any work starts."""
    src: Path
    dst: Path
    config: ModelConfig
    family: object
    source_hf: dict | None
    method: Method
    settings: object  # the method's own settings dataclass
    seed: int
    calibration: CalibrationSettings | None
    transfer: TransferSettings
    joint: JointSettings
    kv_budget: float | None
    new_heads: list[int] | None
    overwrite: bool = False
    index: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    init_std: float = 0.02

    @property
    def rope(self) -> RopeLayout:
        return RopeLayout.of(self.config)

    @property
    def fitted(self) -> bool:
        """Whether the conversion fits or trains the merged attention (then what it writes is balanced, see
        `AttentionWeights.balanced`, after the last step that changes it: the layer loop or the joint stage)."""
        return self.method.calibrated or self.transfer.steps > 0 or self.joint.steps > 0

    def merged_layers(self, new_config: ModelConfig) -> list[int]:
        return [i for i, (old, new) in enumerate(zip(self.config.n_kv_heads, new_config.n_kv_heads)) if old != new]


def plan(src, dst, options: ConversionOptions) -> Job:
    """The conversion, checked from the configs and headers before anything is read or written."""
    settings = options.settings()
    options.check()
    transfer, joint_settings = options.training()
    config, family, hf = read_model_config(src)
    if options.kv_budget is not None:
        if options.n_kv_heads is not None or options.n_kv_heads_per_layer is not None:
            raise GQAError("give exactly one of --kv-heads, --kv-heads-per-layer or --kv-budget")
        budget.check_budget(options.kv_budget, config.n_kv_heads)
        new_heads = None
    else:
        new_heads = target_kv_heads(config.n_kv_heads, config.n_heads, options.n_kv_heads, options.n_kv_heads_per_layer)
    calibration = options.calibration_for(config)
    headers = files.read_headers(src)  # read once: the layout check, the index of files, the storage dtype
    shapes = files.tensor_shapes(src, headers)
    check_layout(src, config, family, shapes)  # a config that disagrees with the weights stops here
    files.check_destination(dst, options.overwrite, sources=[src])
    source_hf = hf.get("hf_config") if family is None else hf
    return Job(src=Path(src), dst=Path(dst), config=config, family=family, source_hf=source_hf, method=options.chosen,
               settings=settings, seed=options.seed, calibration=calibration, transfer=transfer, joint=joint_settings,
               kv_budget=options.kv_budget, new_heads=new_heads, overwrite=options.overwrite,
               index=files.tensor_index(src, headers), dtype=storage_dtype(shapes),
               init_std=init_std(source_hf or {}))


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, options: ConversionOptions | None = None,
            **keywords) -> dict:
    """Convert the model folder `src` to `dst` with fewer KV heads; returns the report written to conversion.json.

    The options are a `ConversionOptions` (`options=`), or its fields as keyword arguments (a method's own settings too:
    `convert(src, dst, n_kv_heads=1, method="aligned", grouping="greedy")`). An encoder–decoder source (T5,
    BART) has its decoder's self- and cross-attention grouped (`encoder=True`: its encoder's too; see
    `conversion.seq2seq`).
    """
    if options is not None and keywords:
        raise TypeError(f"convert() takes options= or keyword options, not both (got {', '.join(keywords)})")
    options = options or ConversionOptions.of(**keywords)
    return CONVERTERS[kind_of(src).name](src, dst, options)


def convert_decoder(src: str | os.PathLike, dst: str | os.PathLike, options: ConversionOptions) -> dict:
    """A decoder-only model's conversion: the plan, calibration, the per-layer budget, then `write_conversion`."""
    if options.encoder:
        raise GQAError(f"--convert-encoder applies to encoder–decoder models; {src} is decoder-only")
    start = time.time()
    job = plan(src, dst, options)
    if job.new_heads is not None:  # a format that cannot hold the result is refused before any work
        target_family(replace(job.config, n_kv_heads=job.new_heads), job.source_hf, options.format)
    warn_without_tokenizer(src)
    blocks = calibration_for(job) if job.calibration else None
    budget_record = choose_heads(job, blocks, options.progress) if job.kv_budget is not None else None
    if budget_record:
        job.new_heads = budget_record["kv_heads"]
    new_config = replace(job.config, n_kv_heads=job.new_heads)
    return write_conversion(job, new_config, target_family(new_config, job.source_hf, options.format), blocks,
                            budget_record, progress=options.progress, start=start)


CONVERTERS = {"decoder": convert_decoder, "encoder-decoder": convert_seq2seq}  # by `kinds.ModelKind.name`


def write_conversion(job: Job, new_config: ModelConfig, out_family, blocks, budget_record, *, progress: bool,
                     start: float) -> dict:
    """The layer loop (and the joint stage) into a temporary folder, renamed to the destination when done."""
    with files.atomic_dir(job.dst, overwrite=job.overwrite) as tmp:
        state = None
        if job.transfer.steps or job.joint.steps:  # training loops: keep freed blocks mapped (see keep_freed_memory)
            keep_freed_memory()
            state = open_resume_state(job, new_config, blocks)
        try:
            writer = files.ShardWriter(tmp, shard_bytes(job))
            counts, layers = write_model(job, new_config, out_family, writer, blocks, state, progress=progress)
            writer.close()
            files.copy_tokenizer(job.src, tmp)
            files.write_remote_code(out_family, tmp)
            files.write_json(tmp / "config.json", config_json(new_config, job.source_hf, out_family, job.dtype))
            joint_record = joint_stage(job, tmp, new_config, out_family, blocks, state, progress=progress) \
                if job.joint.steps else None
        except GQAError:  # a mistake in the input (weights holding NaN, say): nothing of this run is worth resuming
            if state:
                state.remove()
            raise
        report = conversion_report(job, new_config, out_family, counts=counts, layers=layers,
                                   budget_record=budget_record, joint_record=joint_record, start=start)
        files.write_json(tmp / "conversion.json", report)
        write_card(tmp, source=job.src, step=conversion_step(report), name=job.dst.name)
    if state:
        state.remove()
    # the destination is replaced: work on it that a killed run left is of no use any more
    for pattern in (ResumeState.pattern(job.dst), ResumeState.legacy_pattern(job.dst)):
        files.remove_stale(job.dst, pattern, "left by interrupted work on")
    return report


def open_resume_state(job: Job, new_config: ModelConfig, blocks: torch.Tensor) -> ResumeState:
    record = {"method": job.method.name, "settings": asdict(job.settings), "seed": job.seed,
              "calibration": asdict(job.calibration), "calibration_tokens": tensors_digest({"blocks": blocks}),
              "transfer": asdict(job.transfer), "kv_heads": new_config.n_kv_heads, "gqa_version": __version__}
    return ResumeState.open(job.dst, record, new_config)


def joint_stage(job: Job, folder: Path, new_config: ModelConfig, out_family, blocks, state: ResumeState, *,
                progress: bool) -> dict:
    """Train the written model's attention against the source (`joint`), then write its weights again."""
    from ..checkpoints import load

    teacher, student = load(job.src, dtype=torch.float32), load(folder, dtype=torch.float32)
    record = joint.train(teacher, student, blocks, job.joint, resume=state,
                         fingerprint=joint.stage_fingerprint(state.chain, job.joint), progress=progress)
    del teacher
    for old in [*folder.glob("model*.safetensors"), folder / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    writer = files.ShardWriter(folder, shard_bytes(job))
    tensors = {k: v.to(job.dtype) if v.is_floating_point() else v for k, v in student.state_dict().items()}
    for layer in job.merged_layers(new_config):  # in the stored dtype, as the layer loop balances
        tensors.update(AttentionWeights.from_state(tensors, layer, new_config).balanced(job.rope).to_state(layer))
    for name, tensor in export_tensors(tensors, new_config, out_family).items():
        writer.add(name, tensor)
    writer.close()
    return record


def calibration_for(job: Job) -> torch.Tensor:
    from ..checkpoints.tokenizer import load_tokenizer
    from ..data import check_token_ids

    c = job.calibration
    blocks = calibration_blocks(c.data, load_tokenizer(job.src), c.tokens, c.seq_len, job.seed)
    check_token_ids(blocks, job.config.vocab_size, c.data)
    return blocks


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
