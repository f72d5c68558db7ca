"""The conversion's layer loop: read one layer, merge it (and transfer it), write it, advance the stream.

The converter never holds the model. Layers are read one at a time from whichever shard holds them, fused
layouts split into gqa's per-head projections (`gqa.checkpoints.families`), merged by the method, joined
back into the output family's layout and handed to the shard writer. With calibration text the source's
residual stream on the calibration blocks runs alongside (`calibration.Stream`): each layer's attention
inputs are read off it for the method and the transfer, then the source layer (and, where transfer trains on
the converted model's own inputs, the converted layer) advances it to the next layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..checkpoints import export_tensors, files
from ..checkpoints.families import stack_heads
from ..model import ModelConfig
from . import budget
from .aligned import self_attention_probabilities
from .calibration import Stream, build_block
from .heads import AttentionWeights
from .interface import Calibration, Layer
from .transfer import transfer_layer

LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
BUDGET_TOKENS = 4096  # calibration tokens the sensitivities are measured on


def write_model(job, new_config: ModelConfig, out_family, writer, blocks, state_dir, *, progress: bool):
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
    bar = tqdm(groups, desc=f"converting ({job.method.name})", unit="layer", disable=not progress)
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


def convert_layer(job, layer: int, state: dict, new_config: ModelConfig, streams, state_dir) -> tuple[dict, dict]:
    """One layer's tensors with its attention merged to the layer's new KV-head count, and what was done."""
    g_now, g = job.config.n_kv_heads[layer], new_config.n_kv_heads[layer]
    record: dict = {"layer": layer, "kv_heads": g}
    block = build_block(job.config, layer, state) if streams else None  # over the stored tensors: no copy
    if g != g_now:
        saved = state_dir.get(layer) if state_dir and job.transfer.steps else None
        merged, record = saved if saved is not None else merge_layer(job, layer, state, g, block, streams,
                                                                     state_dir=state_dir, record=record)
        state = {**state, **merged.to_state(layer)}
    if streams:  # the converted layer only where a stream runs through it
        streams.advance(block, build_block(new_config, layer, state) if streams.converted else None)
    if g != g_now and job.fitted and not job.joint.steps:  # else the joint stage balances what it trained
        state = {**state, **AttentionWeights.from_state(state, layer, new_config).balanced(job.rope).to_state(layer)}
    return state, record


def merge_layer(job, layer: int, state: dict, g: int, block, streams, *, state_dir,
                record: dict) -> tuple[AttentionWeights, dict]:
    """The method's merge of one layer (then its transfer, saved for a resume); block: the source layer."""
    inputs = streams.source.attention_inputs(block) if streams else None
    attn = AttentionWeights.from_state(state, layer, job.config)
    merged, info = merge_attention(job, layer, attn, g, inputs=inputs,
                                   rope_tables=streams.source.rope if streams else None, block=block)
    record.update(info)
    if job.transfer.steps:
        merged, info = transfer_attention(job, layer, block, merged, inputs, streams)
        record.update(info)
        state_dir.put(layer, merged, record)
    return merged, record


def merge_attention(job, layer: int, attn: AttentionWeights, g: int, *, inputs=None, rope_tables=None, block=None):
    """The method's merge of one layer's attention to g KV heads (inputs: its calibration inputs [blocks, T, d];
    block: the source layer)."""
    calibration = None
    if job.method.calibrated:
        calibration = Calibration(inputs, self_attention_probabilities(block.attention, rope_tables))
    return job.method.merge(attn, g, Layer(layer, job.rope, job.seed, job.init_std, calibration), job.settings)


def transfer_attention(job, layer: int, block, merged: AttentionWeights, inputs, streams) -> tuple[AttentionWeights, dict]:
    targets = streams.source.attention_outputs(block, inputs)
    if job.transfer.inputs == "converted":
        inputs = streams.converted.attention_inputs(block)
    return transfer_layer(job.config, layer, merged, inputs, targets, rope=streams.source.rope, settings=job.transfer)


@dataclass
class Streams:
    """The calibration blocks' residual stream through the source layers and, where transfer trains on the
    converted model's own inputs, through the converted layers."""
    source: Stream
    converted: Stream | None

    @classmethod
    def start(cls, job, outside: dict, blocks: torch.Tensor) -> Streams:
        source = Stream.start(job.config, outside, blocks)
        own = job.transfer.steps and job.transfer.inputs == "converted"
        return cls(source, Stream(source.hidden.clone(), source.rope, source.targets) if own else None)

    def advance(self, source_block, converted_block) -> None:
        self.source.advance(source_block)
        if self.converted is not None:
            self.converted.advance(converted_block)


def choose_heads(job, blocks: torch.Tensor, progress: bool) -> dict:
    """Measure every layer's sensitivity to merging and pick per-layer KV heads within the budget."""
    allowed = budget.check_budget(job.kv_budget, job.config.n_kv_heads)
    sample = blocks[: max(1, BUDGET_TOKENS // job.calibration.seq_len)]
    groups = layer_groups(job.index)
    outer = groups.pop() if groups and layer_of(groups[-1][0]) is None else []
    outside = read_layer(job, outer, [0, 0])
    by_layer = {layer_of(names[0]): names for names in groups}

    stream = Stream.start(job.config, outside, sample)

    def merge(layer, state, inputs, g, block):
        attn = AttentionWeights.from_state(state, layer, job.config)
        merged = merge_attention(job, layer, attn, g, inputs=inputs, rope_tables=stream.rope, block=block)[0]
        return {**state, **merged.to_state(layer)}

    bar = (lambda it: tqdm(it, desc="measuring sensitivities", unit="layer")) if progress else iter
    measured = budget.measure(job.config, lambda layer: read_layer(job, by_layer[layer], [0, 0]), stream, outside,
                              merge, bar)
    choice = budget.choose(measured["increase"], job.config.n_kv_heads, allowed)
    return {"fraction": job.kv_budget, "kv_heads_allowed": allowed, "tokens": int(sample[:, 1:].numel()),
            "loss": measured["loss"], "sensitivity": [{str(g): v for g, v in d.items()} for d in measured["increase"]],
            "kv_heads": choice}


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


def read_layer(job, names: list[str], counts: list[int]) -> dict[str, torch.Tensor]:
    """Tensors under gqa's names (fused layouts split), checked finite; counts the source parameters."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in files.read_tensors(job.index, names).items():
        files.check_finite(job.src, name, tensor)
        got = job.family.import_tensor(name, tensor, job.config) if job.family else {name: tensor}
        if got:
            counts[0] += tensor.numel()
        state.update(got)
    return stack_heads(state)


def write(writer, tensors: dict[str, torch.Tensor], counts: list[int]) -> None:
    for name, tensor in tensors.items():
        counts[1] += tensor.numel()
        writer.add(name, tensor)


def shard_bytes(job) -> int:
    largest = max(f.stat().st_size for f in set(job.index.values()))
    return min(files.SHARD_BYTES, max(largest // 2, 256 * 1024**2))
