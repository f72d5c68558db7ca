"""MHA -> GQA / MQA for encoder–decoder models (T5, mT5, UMT5, BART): the GQA paper's own setting.

The decoder's self-attention and its cross-attention are grouped to G KV heads (the paper's choice), the
encoder's self-attention only when asked (`encoder=True`): its queries are all computed at once, so its
keys and values are read once per source, not once per generated token. Each attention is merged by a
registered method, exactly as a decoder-only layer is (`heads.AttentionWeights`, `methods.REGISTRY`).

Calibrated methods (`aligned`) fit to what each attention reads on calibration text
(`seq2seq_calibration`): cross-attention's queries read the decoder and its keys and values the encoder's
output, and the fits whiten each side by its own inputs. T5 has no rotary embedding, so every key
dimension is "free": any invertible map per head on the key side, undone in that head's queries, leaves
the scores unchanged, and `aligned` fits the group's shared key subspace to the heads' score maps W_kᵀW_q
(weighted by the spread of the attended keys) and refits each head's queries to it; values and outputs as
for decoders.

The layer-wise transfer (`transfer`) trains each grouped attention, after its merge, to reproduce the
source attention's outputs on the calibration blocks, as for decoders: inputs are the source model's own
(`inputs="original"`), the position bias stays the source's (frozen: T5 shares one across layers). The
joint stage (`joint`) then trains every grouped attention together on KL(source ‖ converted) of the
target-side distributions of the calibration examples. Per-layer budgets are decoder-only for now.

The model is read whole (an 11B T5 needs its size in memory), merged, and written in one go (no resume:
transfer at T5-base takes minutes); calibration runs the source in float32.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..attention import check_regroup
from ..card import conversion_step, write_card
from ..checkpoints import architecture_name, check_layout, files, import_tensors, model_from_state, save_state, target_family
from ..checkpoints.seq2seq import read_seq2seq_config
from ..checkpoints.tokenizer import warn_without_tokenizer
from ..errors import GQAError
from ..kinds import ENCODER_DECODER
from ..model import Attention
from ..seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from ..version import __version__
from . import joint
from .heads import NAMES, AttentionWeights, RopeLayout
from .interface import Calibration, CalibrationSettings, Layer, Method
from .joint import JointSettings
from .methods import REGISTRY
from .options import ConversionOptions
from .seq2seq_calibration import calibration_examples, calibrations, transfer_data
from .transfer import TransferSettings, fit_to_targets, load_weights, weights_of

KINDS = {"encoder": ("encoder", "attention", "encoder_kv_heads"), "self": ("decoder", "attention", "self_kv_heads"),
         "cross": ("decoder", "cross", "cross_kv_heads")}
SEED_OFFSET = {"encoder": 0, "self": 1000, "cross": 2000}  # a fresh draw of each attention kind is its own


def attention_of(state: dict, prefix: str, head_dim: int) -> AttentionWeights:
    return AttentionWeights(**{part: state.get(prefix + name) for part, name in NAMES.items()}, head_dim=head_dim)


def merged_state(attn: AttentionWeights, prefix: str) -> dict:
    return {prefix + name: getattr(attn, part).contiguous() for part, name in NAMES.items()
            if getattr(attn, part) is not None}


def convert_seq2seq(src, dst, options: ConversionOptions) -> dict:
    """Convert an encoder–decoder folder (see the module docstring); returns the report."""
    start = time.time()
    refuse_unsupported(options)
    options.check()
    transfer, joint_settings = options.training()
    options.calibration_source()  # a bad --calib is refused before the model is read
    chosen, settings, n_kv_heads, seed, progress = options.chosen, options.settings(), options.n_kv_heads, \
        options.seed, options.progress
    hf = files.read_config(src)
    config, family = read_seq2seq_config(src, hf)
    kinds = check_kv_heads(config, n_kv_heads, options.encoder)
    new_config = replace(config, **{KINDS[k][2]: [n_kv_heads] * len(getattr(config, KINDS[k][2])) for k in kinds})
    out_family = target_family(new_config, hf if family else hf.get("hf_config"), options.format)  # now
    calibration = options.calibration_for(config)
    files.check_destination(dst, options.overwrite, sources=[src])
    warn_without_tokenizer(src)
    check_layout(src, config, family)
    state = import_tensors(src, config, family)
    dtype = state["tok_embeddings.weight"].dtype
    todo = [(kind, layer) for kind in kinds for layer, g_now in enumerate(getattr(config, KINDS[kind][2]))
            if g_now != n_kv_heads]
    source = model_from_state(config, state, torch.float32) if calibration else None  # the source's own tensors
    fits, blocks = calibrate(src, source, calibration, todo, seed, progress) if calibration else ({}, None)
    steps = Steps(method=chosen, settings=settings, transfer=transfer, joint=joint_settings, n_kv_heads=n_kv_heads,
                  seed=seed, init_std=float(hf.get("initializer_factor", hf.get("init_std", 0.02)) or 0.02))
    todo_bar = tqdm(todo, desc=f"converting ({options.method})", unit="attention", disable=not progress)
    records = [merge_attention(state, config, kind, layer, steps=steps, source=source, fits=fits, progress=progress)
               for kind, layer in todo_bar]
    joint_record = joint_stage(source, new_config, state, blocks, todo, joint_settings, progress=progress) \
        if joint_settings.steps else None
    report = seq2seq_report(src, dst, options, settings=settings, config=config, new=new_config,
                            out_family=out_family, kinds=kinds, dtype=dtype, start=start)
    report.update(calibration=calibration.record() if calibration else None,
                  transfer=asdict(transfer) if transfer.steps else None, joint=joint_record, layers=records)
    save_state(state, new_config, hf if family else hf.get("hf_config"), out_family, dst, dtype, source_dir=src,
               overwrite=options.overwrite, extra_files={"conversion.json": report},
               card=lambda folder: write_card(folder, source=src, step=conversion_step(report), name=Path(dst).name))
    return report


def refuse_unsupported(options: ConversionOptions) -> None:
    unsupported = {"--kv-heads-per-layer": options.n_kv_heads_per_layer is not None,
                   "--kv-budget": options.kv_budget is not None,
                   "--transfer-inputs converted": options.transfer_inputs == "converted"}
    for option, given in unsupported.items():
        if given:
            raise GQAError(f"{option} is not available for encoder–decoder models yet; give --kv-heads G with "
                           f"--method {', '.join(REGISTRY)} (and --transfer-steps N on the source's own inputs, "
                           f"--joint-steps N)")


def check_kv_heads(config: Seq2SeqConfig, n_kv_heads: int | None, encoder: bool) -> list[str]:
    """The attention kinds to group, once G divides every one of their layers' KV-head counts."""
    if n_kv_heads is None:
        raise GQAError("give --kv-heads G for an encoder–decoder model")
    kinds = ["self", "cross", *(["encoder"] if encoder else [])]
    for kind in kinds:
        for layer, g_now in enumerate(getattr(config, KINDS[kind][2])):
            check_regroup(g_now, n_kv_heads, config.n_heads, f"{kind} attention, layer {layer}: ")
    return kinds


@dataclass(frozen=True, kw_only=True)
class Steps:
    """What is done to each grouped attention: the method's merge, then the transfer, then the joint stage."""
    method: Method
    settings: object
    transfer: TransferSettings
    joint: JointSettings
    n_kv_heads: int
    seed: int
    init_std: float


def merge_attention(state: dict, config: Seq2SeqConfig, kind: str, layer: int, *, steps: Steps, source, fits: dict,
                    progress: bool) -> dict:
    """Merge one attention in `state` (then transfer it); returns its record."""
    prefix = prefix_of(kind, layer)
    attn = attention_of(state, prefix, config.head_dim)
    context = Layer(SEED_OFFSET[kind] + layer, RopeLayout(config.head_dim, 0), steps.seed, steps.init_std,
                    fits.get((kind, layer)) if steps.method.calibrated else None)
    merged, record = steps.method.merge(attn, steps.n_kv_heads, context, steps.settings)
    if steps.transfer.steps:
        merged, trained = transfer_attention(source, kind, layer, merged, fits[kind, layer], steps.transfer,
                                             progress=progress)
        record = {**record, **trained}
    if (steps.method.calibrated or steps.transfer.steps) and not steps.joint.steps:  # else after the joint stage
        merged = merged.balanced(context.rope)  # a fit's K/V are in its whitened basis: see AttentionWeights.balanced
    state.update(merged_state(merged, prefix))
    return {"attention": kind, "layer": layer, **record}


def joint_stage(source: Seq2SeqTransformer, new_config: Seq2SeqConfig, state: dict, blocks: tuple, todo: list,
                settings: JointSettings, *, progress: bool) -> dict:
    """Train the grouped model's attention against the source (`joint.train`, no resume: the conversion runs in
    one go) and write it into `state`, balanced; returns the stage's record."""
    student = model_from_state(new_config, state, torch.float32)
    record = joint.train(source, student, blocks, settings, resume=None, fingerprint="", progress=progress)
    trained = joint.attention_state(ENCODER_DECODER.attention_modules(student, source))
    state.update({name: tensor.to(state[name].dtype) for name, tensor in trained.items()})
    for kind, layer in todo:
        prefix = prefix_of(kind, layer)
        balanced = attention_of(state, prefix, new_config.head_dim).balanced(RopeLayout(new_config.head_dim, 0))
        state.update(merged_state(balanced, prefix))
    return record


def prefix_of(kind: str, layer: int) -> str:
    stack, module, _ = KINDS[kind]
    return f"{stack}.layers.{layer}.{module}."


def calibrate(src, source: Seq2SeqTransformer, calibration: CalibrationSettings, todo: list, seed: int,
              progress: bool) -> tuple[dict, tuple]:
    """(kind, layer) -> Calibration of every attention to be grouped, read off the source model (float32), and
    the calibration examples as model inputs (input ids, decoder ids)."""
    from ..checkpoints.tokenizer import load_tokenizer
    from ..data import check_token_ids

    config = source.config

    input_ids, labels = calibration_examples(calibration.data, load_tokenizer(src), calibration.tokens,
                                             calibration.seq_len, seed)
    for ids in (input_ids, labels):
        check_token_ids(ids, config.vocab_size, calibration.data)
    if progress:
        print(f"calibrating on {input_ids.numel():,} source and {labels.numel():,} target tokens "
              f"of {calibration.data}", file=sys.stderr)
    return calibrations(source, input_ids, labels, todo), (input_ids, source.shift_right(labels))


def transfer_attention(source: Seq2SeqTransformer, kind: str, layer: int, merged: AttentionWeights,
                       fit: Calibration, settings: TransferSettings, *, progress: bool) -> tuple[AttentionWeights, dict]:
    """Train the grouped attention `merged` to give the source attention's outputs on the calibration blocks
    (`transfer.fit_to_targets`); returns its weights and the relative error before and after."""
    data = transfer_data(source, kind, layer, fit)
    with torch.device("meta"):
        module = Attention(source.config, layer, n_kv_heads=merged.n_kv_heads)
    load_weights(module, merged)
    trained = fit_to_targets(module, data.forward, data.targets, settings, key=SEED_OFFSET[kind] + layer,
                             desc=f"transfer {kind} layer {layer}", progress=progress)
    return (merged if trained.get("kept") else weights_of(module, merged)), trained


def seq2seq_report(src, dst, options: ConversionOptions, *, settings, config: Seq2SeqConfig, new: Seq2SeqConfig,
                   out_family, kinds: list[str], dtype: torch.dtype, start: float) -> dict:
    element, method, seed = torch.empty((), dtype=dtype).element_size(), options.method, options.seed
    return {
        "gqa_version": __version__, "source": str(Path(src).resolve()), "destination": str(Path(dst).resolve()),
        "method": method, "seed": seed if method == "random" else None, "method_settings": asdict(settings) or None,
        "architecture": architecture_name(new, out_family), "query_heads": config.n_heads,
        "converted": kinds,
        **{f"{k}_kv_heads_{when}": getattr(c, KINDS[k][2]) for k in KINDS for when, c in (("before", config),
                                                                                            ("after", new))},
        "kv_bytes_per_token_before": config.kv_bytes_per_token(element),
        "kv_bytes_per_token_after": new.kv_bytes_per_token(element),
        "kv_bytes_per_source_token_before": config.kv_bytes_per_source_token(element),
        "kv_bytes_per_source_token_after": new.kv_bytes_per_source_token(element),
        "kv_reduction": config.kv_bytes_per_token(element) / new.kv_bytes_per_token(element),
        "dtype": str(dtype).removeprefix("torch."), "seconds": round(time.time() - start, 3),
    }
