"""The multi-query paper's measurement, on an encoder–decoder: time per generated token and per sample
against the number of KV heads, MHA vs GQA vs MQA on the same weights (mean-pooled), at a few source
lengths and batch sizes, with transformers' own `generate` on the MHA model as the peer.

Each round times, for every model in turn (the order alternating round by round): encoding the batch of
sources once (which fills the cross-attention cache), then `new_tokens` greedy decoder steps against the
self- and cross-attention caches. Per sample = (encode + decode) / batch; per token = decode / new_tokens.
transformers' peer is timed end to end (`generate` with its own cache, greedy, `new_tokens` exactly) and
its per-token figure is that time over the tokens, encoder included (it has no separate hook).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from .attention import check_heads
from .bench import spread
from .errors import GQAError
from .presets import preset
from .seq2seq import Seq2SeqConfig, Seq2SeqTransformer

QUICK = dict(model_preset="t5-tiny", kv_heads=(4, 1), sources=(16,), batches=(2,), new_tokens=4, repeats=2)


def pooled(model: Seq2SeqTransformer, g: int) -> Seq2SeqTransformer:
    """The same weights with the decoder's self- and cross-attention mean-pooled to g KV heads."""
    from .conversion.pooling import pool_heads

    config = replace(model.config, self_kv_heads=[g] * model.config.n_decoder_layers,
                     cross_kv_heads=[g] * model.config.n_decoder_layers)
    state = dict(model.state_dict())
    for name, tensor in state.items():
        if name.startswith("decoder.layers.") and (".attention.w" in name or ".cross.w" in name) and \
                name.rsplit(".", 2)[-2] in ("wk", "wv"):
            state[name] = pool_heads(tensor, model.config.n_heads, g, "mean")
    out = Seq2SeqTransformer(config).to(model.dtype)
    out.load_state_dict(state)
    return out.eval()


def hf_t5(config: Seq2SeqConfig, state: dict):
    """transformers' T5 with the same weights (the MHA model), for its `generate` as the peer."""
    import transformers

    from .checkpoints.seq2seq import T5, t5_config

    model = transformers.T5ForConditionalGeneration(t5_config(config)).eval()
    tensors = T5.export_state(state, config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or [m for m in missing if "embed_tokens" not in m]:
        raise GQAError(f"transformers' T5 did not take the weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


@torch.inference_mode()
def ours_seconds(model: Seq2SeqTransformer, sources: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    start = time.perf_counter()
    encoded = model.encode(sources)
    encode = time.perf_counter() - start
    cache = model.new_cache(len(sources), new_tokens)
    tokens = torch.full((len(sources), 1), model.config.decoder_start_token_id, dtype=torch.long)
    start = time.perf_counter()
    for _ in range(new_tokens):
        tokens = model.decode(tokens, encoded, cache=cache)[:, -1:].argmax(-1)
    return encode, time.perf_counter() - start


@torch.inference_mode()
def hf_seconds(model, sources: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(input_ids=sources, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start


def bench_seq2seq(model_preset: str = "t5-base", kv_heads=(12, 4, 1), sources=(128, 512), batches=(1, 8),
                  new_tokens: int = 32, repeats: int = 5, seed: int = 0) -> dict:
    """Rows of (batch, source length, model) with the median and range of the rounds (see the module docstring)."""
    torch.manual_seed(seed)
    config = preset(model_preset)
    for g in kv_heads:
        check_heads(config.n_heads, g)
    mha = Seq2SeqTransformer(config)
    mha.init_weights()
    mha.eval()
    models = {f"gqa G={g}": mha if g == config.n_heads else pooled(mha, g) for g in kv_heads}
    peer = hf_t5(config, mha.state_dict())
    rows = []
    for batch in batches:
        for length in sources:
            ids = torch.randint(2, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
            for m in models.values():  # warm-up
                ours_seconds(m, ids, 2)
            hf_seconds(peer, ids, 2)
            times = {name: [] for name in [*models, "transformers generate (MHA)"]}
            for r in range(repeats):
                names = list(times) if r % 2 == 0 else list(times)[::-1]
                for name in names:
                    if name in models:
                        times[name].append(ours_seconds(models[name], ids, new_tokens))
                    else:
                        times[name].append((0.0, hf_seconds(peer, ids, new_tokens)))
            rows.append({"batch": batch, "source_length": length, "new_tokens": new_tokens,
                         "models": {name: summary(t, batch, new_tokens, models.get(name)) for name, t in times.items()}})
    return {"config": config.to_dict(), "kv_heads": list(kv_heads), "rows": rows, "threads": torch.get_num_threads()}


def summary(times: list[tuple[float, float]], batch: int, new_tokens: int, model) -> dict:
    out = {"per_sample_ms": spread([1e3 * (e + d) / batch for e, d in times]),
           "per_token_ms": spread([1e3 * d / new_tokens for _, d in times])}
    if model is not None:
        out["encode_ms"] = spread([1e3 * e for e, _ in times])
        out["kv_bytes_per_token"] = model.config.kv_bytes_per_token(4)
        out["kv_bytes_per_source_token"] = model.config.kv_bytes_per_source_token(4)
    return out
