"""Calibration of an encoder–decoder conversion: what each grouped attention reads on real text.

The source model (held whole, as the encoder–decoder converter holds it) reads span-corrupted calibration
text, T5's own pre-training objective (BART's text infilling for tokenizers without sentinels), from the
training side of the document-hash split (`gqa.seq2seq_data`), so `gqa eval` on the same source's
validation split scores text no fit saw. Hooks record the input of every attention to be grouped:

- decoder self-attention: queries, keys and values read the same decoder states (causal, T5's relative
  position bias in the scores);
- cross-attention: queries read the decoder states, keys and values the encoder's output;
- the encoder's self-attention (with `--convert-encoder`): bidirectional, with the encoder's bias.

Each attention's `Calibration` carries those inputs and the source attention's probabilities on them, which
`aligned` weights its fits with; `transfer_data` adds the source attention's outputs on them, what the
layer-wise transfer trains the grouped attention to reproduce. Examples are cut to the shortest input and
the shortest target of the ones drawn (span corruption makes them nearly equal), so every block is whole
and no fit sees padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import GQAError
from ..seq2seq import Seq2SeqTransformer, additive_mask
from ..seq2seq_data import is_pairs, prepare_seq2seq
from .calibration import check_calib_tokens, drawn_blocks
from .interface import Calibration

CHUNK = 8  # examples run through the source model at a time


def calibration_examples(source, tokenizer, n_tokens: int, seq_len: int, seed: int):
    """(input ids [N, S], labels [N, T]): ⌈n_tokens / seq_len⌉ span-corrupted blocks of `source`'s training
    split, drawn (seeded), cut to the shortest input and target among them."""
    check_calib_tokens(n_tokens)
    if is_pairs(source):
        raise GQAError(f"--calib {source}: an encoder–decoder is calibrated on text (span-corrupted as in "
                       f"pre-training), not on input/target pairs; give a text file, folder or bundled corpus")
    data = prepare_seq2seq(source, tokenizer, seq_len, seed=seed, length_option="--calib-seq-len").train
    chosen = data[drawn_blocks(len(data), n_tokens, seq_len, seed, source)]
    source_len = int(chosen.input_mask.sum(-1).min())
    target_len = int((chosen.labels != -100).sum(-1).min())
    return chosen.input_ids[:, :source_len], chosen.labels[:, :target_len]


@torch.no_grad()
def record_inputs(model: Seq2SeqTransformer, input_ids: torch.Tensor, labels: torch.Tensor,
                  modules: dict[tuple[str, int], torch.nn.Module]) -> tuple[dict, torch.Tensor]:
    """What each attention in `modules` ((kind, layer) -> module) reads as its query input, [N, S or T, d],
    and the encoder's output [N, S, d] (what cross-attention's keys and values read)."""
    seen: dict[tuple[str, int], list[torch.Tensor]] = {key: [] for key in modules}
    hooks = [module.register_forward_pre_hook(lambda _, args, key=key: seen[key].append(args[0].float()))
             for key, module in modules.items()]
    encoded = []
    try:
        for start in range(0, len(input_ids), CHUNK):
            ids = input_ids[start:start + CHUNK].to(model.device)
            out = model.encode(ids)
            model.decode(model.shift_right(labels[start:start + CHUNK].to(model.device)), out)
            encoded.append(out.hidden.float())
    finally:
        for hook in hooks:
            hook.remove()
    return {key: torch.cat(xs) for key, xs in seen.items()}, torch.cat(encoded)


def attention_module(model: Seq2SeqTransformer, kind: str, layer: int) -> torch.nn.Module:
    """The attention of `kind` ("encoder", "self", "cross") in layer `layer`."""
    stack = model.encoder if kind == "encoder" else model.decoder
    return getattr(stack.layers[layer], "cross" if kind == "cross" else "attention")


def scores_mask(model: Seq2SeqTransformer, kind: str, layer: int, S: int, T: int) -> torch.Tensor:
    """What the attention of `kind` in `layer` adds to its scores for S queries against T keys, [1, H or 1,
    S, T]: T5's relative bias (self-attention) and the decoder's causal mask; none for cross-attention
    (calibration blocks have no padding)."""
    stack = model.encoder if kind == "encoder" else model.decoder
    device = model.device
    causal = torch.ones(S, T, dtype=torch.bool, device=device).tril() if kind == "self" else \
        torch.ones(S, T, dtype=torch.bool, device=device)
    mask = additive_mask(causal[None, None], torch.float32)
    bias = stack.position_bias(layer, torch.arange(S, device=device), T) if kind != "cross" else None
    return mask if bias is None else mask + bias.float()


def source_probabilities(model: Seq2SeqTransformer, kind: str, layer: int):
    """The source attention's probabilities [B, H, S, T] for query inputs [B, S, d] and key inputs [B, T, d]:
    its own scale plus `scores_mask`."""
    module = attention_module(model, kind, layer)

    @torch.no_grad()
    def probabilities(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        q = module.project(queries, module.wq, module.n_heads, None)
        k = module.keys_values(keys)[0].repeat_interleave(module.n_heads // module.n_kv_heads, dim=1)  # never decoding
        scores = (q @ k.transpose(-1, -2)) * (module.head_dim ** -0.5 if module.scale is None else module.scale)
        return F.softmax(scores.float() + scores_mask(model, kind, layer, *scores.shape[-2:]), dim=-1)

    return probabilities


@dataclass
class TransferData:
    """What one source attention computes on the calibration blocks, the targets of its layer-wise transfer:
    its query inputs [N, S, d], what its keys and values read [N, T, d], its `scores_mask`, and its
    outputs [N, S, d]."""
    queries: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor

    def forward(self, module: torch.nn.Module, blocks) -> torch.Tensor:
        """`module` (a seq2seq `Attention`) on the calibration blocks `blocks` (an index)."""
        return module.attend(self.queries[blocks], *module.keys_values(self.keys[blocks]), self.mask)


@torch.no_grad()
def transfer_data(model: Seq2SeqTransformer, kind: str, layer: int, fit: Calibration) -> TransferData:
    queries = fit.x if fit.queries is None else fit.queries
    mask = scores_mask(model, kind, layer, queries.shape[1], fit.x.shape[1])
    data = TransferData(queries, fit.x, mask, torch.empty_like(queries))
    module = attention_module(model, kind, layer)
    for start in range(0, len(queries), CHUNK):
        data.targets[start:start + CHUNK] = data.forward(module, slice(start, start + CHUNK))
    return data


def calibrations(model: Seq2SeqTransformer, input_ids: torch.Tensor, labels: torch.Tensor,
                 layers: list[tuple[str, int]]) -> dict[tuple[str, int], Calibration]:
    """(kind, layer) -> the Calibration of that attention (kinds: "encoder", "self", "cross")."""
    inputs, encoded = record_inputs(model, input_ids, labels, {key: attention_module(model, *key) for key in layers})
    out = {}
    for kind, layer in layers:
        x, queries = (encoded, inputs[kind, layer]) if kind == "cross" else (inputs[kind, layer], None)
        out[kind, layer] = Calibration(x, source_probabilities(model, kind, layer), queries)
    return out
