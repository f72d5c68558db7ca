"""Batched incremental generation: one prefill of all prompts, then one token per step against the cache.

Prompts of different lengths share a batch without left padding: each sequence's cache slots start at 0 and
its next token goes to slot `lengths[b]` (see `gqa.cache`), so no cache memory is spent on padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import GQAError
from .model import Transformer


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next tokens [B] from logits [B, vocab]: greedy at temperature 0, else top-k / top-p sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already hold top_p of the mass; the first always stays
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class DecodeStep:
    """One decode step, [B, 1] tokens -> [B, vocab] logits, against a cache; on CUDA optionally captured in a
    CUDA graph and replayed, so a step costs one launch instead of one per kernel.

    The step writes K/V at `cache.lengths` and advances it on the device, and the Triton decode kernel's
    grid depends on shapes only, so the captured graph stays valid as the sequences grow. Capture needs
    warm-up runs, which write into slots past each sequence's length (overwritten later) and advance the
    lengths; the lengths are restored afterwards.
    """

    def __init__(self, model, cache, cuda_graph: bool = False, *, forward=None):
        # forward: tokens [B, 1] -> logits [B, 1, vocab], writing the cache (default: the decoder's forward)
        self.forward = forward or (lambda tokens: model(tokens, cache=cache))
        self.graph = None
        if cuda_graph and model.device.type == "cuda":
            self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=model.device)
            saved = cache.lengths.clone()
            stream = torch.cuda.Stream(model.device)
            stream.wait_stream(torch.cuda.current_stream(model.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.forward(self.tokens)
            torch.cuda.current_stream(model.device).wait_stream(stream)
            cache.lengths.copy_(saved)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.forward(self.tokens)[:, -1]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            return self.forward(tokens[:, None])[:, -1]
        self.tokens.copy_(tokens[:, None])
        self.graph.replay()
        return self.logits


STOP_CHECK_EVERY = 8  # steps between host reads of "all sequences stopped" (each read synchronises)


def check_cuda_graph(model, cuda_graph: bool) -> None:
    storage = model.kv_cache_storage
    if cuda_graph and storage is not None and storage.format.quantized:
        raise GQAError(f"--cuda-graph replays a float cache; a {storage.format.name} cache decodes without it")


def check_token_inputs(sequences, stop_tokens, vocab: int, what: str) -> None:
    """Every prompt (or source) has a token, and every id, stop tokens included, is in the vocabulary."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise GQAError(f"every {what} needs at least one token")
    if any(not 0 <= t < vocab for s in sequences for t in s) or any(not 0 <= t < vocab for t in stop_tokens):
        raise GQAError(f"token ids must be in 0..{vocab - 1}, the model's vocabulary (a {what} or stop token is not)")


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    """Refuse settings out of range, and top-k / top-p at temperature 0, where decoding is greedy and they would
    be silently ignored."""
    if temperature == 0 and (top_k is not None or top_p is not None):
        which = [n for n, v in (("top-k", top_k), ("top-p", top_p)) if v is not None]
        raise GQAError(f"{' and '.join(which)} {'shape' if len(which) > 1 else 'shapes'} sampling, but temperature 0 "
                       f"decodes greedily: set a temperature > 0 or drop {' and '.join(which)}")
    if temperature < 0:
        raise GQAError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise GQAError(f"top_k must be >= 0, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GQAError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise GQAError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def check_generation_lengths(config, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Prompts and the tokens to generate within the model's positions (from the config: before a model runs)."""
    longest, limit = max(len(p) for p in prompts), config.max_positions
    if longest > limit:
        raise GQAError(f"a prompt of {longest} tokens is longer than the model's {limit} positions")
    if longest + max_new_tokens > limit:
        raise GQAError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's {limit} "
                       f"positions")


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int | None = None,
    page_size: int | None = None,
    cuda_graph: bool = False,
    kv_cache_dtype: str | None = None,
    kv_rotation: bool = True,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids); returns the new tokens of each, up to and including a stop token.

    page_size: use a paged cache holding exactly the pages each sequence needs (its prompt plus
    max_new_tokens), instead of max(prompt) + max_new_tokens slots for every sequence.
    cuda_graph: on CUDA, replay each decode step from a CUDA graph (not yet measured on a GPU: opt-in).
    kv_cache_dtype: what the cache stores (`gqa.kv_formats`: "q8_0", "q4_0", "fp8_e4m3", ...; default what
    `model.set_kv_cache_dtype` set, else the model's dtype); kv_rotation=False drops llama.cpp's rotation.
    """
    if kv_cache_dtype is not None:  # for this call only
        with model.storing_kv_as(kv_cache_dtype, kv_rotation):
            return generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, stop_tokens=stop_tokens, seed=seed, page_size=page_size, cuda_graph=cuda_graph)
    check_cuda_graph(model, cuda_graph)
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    check_token_inputs(prompts, stop_tokens, model.config.vocab_size, "prompt")
    check_generation_lengths(model.config, prompts, max_new_tokens)
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    logits, step = prefill(model, prompts, max_new_tokens, page_size=page_size, cuda_graph=cuda_graph)
    return sample_until_stopped(logits, step, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, stop_tokens=stop_tokens, generator=generator)


def prefill(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
            page_size: int | None = None, cuda_graph: bool = False):
    """Read the prompts into a new cache with room for `max_new_tokens` more: (each prompt's next-token logits
    [B, vocab], the decode step: tokens [B] -> the next logits)."""
    lengths, device, batch = [len(p) for p in prompts], model.device, len(prompts)
    tokens = torch.zeros(batch, max(lengths), dtype=torch.long, device=device)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        mask[b, : len(p)] = True
    if page_size:
        pages = sum(-(-(n + max_new_tokens) // page_size) for n in lengths)
        cache = model.new_cache(batch, max(lengths) + max_new_tokens, num_pages=pages, page_size=page_size)
        for b, n in enumerate(lengths):
            cache.reserve(b, n + max_new_tokens)
    else:
        cache = model.new_cache(batch, max(lengths) + max_new_tokens)
    logits = model(tokens, attention_mask=mask, cache=cache)
    logits = logits[torch.arange(batch, device=device), torch.as_tensor(lengths, device=device) - 1]
    return logits, DecodeStep(model, cache, cuda_graph=cuda_graph) if max_new_tokens > 1 else None


def sample_until_stopped(logits: torch.Tensor, step, *, max_new_tokens: int, temperature: float, top_k: int | None,
                         top_p: float | None, stop_tokens: Sequence[int], generator) -> list[list[int]]:
    """The decode loop both model shapes share: sample the next tokens from logits [B, vocab], `step` them
    (tokens [B] -> the next logits) until max_new_tokens or every sequence has stopped; each sequence's new
    tokens, up to and including its first stop token."""
    stop = torch.as_tensor(list(stop_tokens), dtype=torch.long, device=logits.device)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    out = []
    for i in range(max_new_tokens):
        next_tokens = sample(logits, temperature, top_k, top_p, generator)
        out.append(next_tokens)
        if stop.numel():
            done |= torch.isin(next_tokens, stop)
            if (i + 1) % STOP_CHECK_EVERY == 0 and bool(done.all()):
                break
        if i + 1 < max_new_tokens:
            logits = step(next_tokens)
    stop_set = set(stop_tokens)
    return [seq[:next((i + 1 for i, t in enumerate(seq) if t in stop_set), len(seq))]
            for seq in torch.stack(out, dim=1).tolist()]


@torch.inference_mode()
def generate_seq2seq(model, sources: Sequence[Sequence[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None, stop_tokens: Sequence[int] = (),
                     seed: int | None = None, cuda_graph: bool = False) -> list[list[int]]:
    """An encoder–decoder's `generate`: the sources are encoded once (the cross-attention cache filled once, G
    heads per layer), then the decoder runs from its start token, one token per step against its
    self-attention cache. Returns each sequence's new tokens, up to and including a stop token."""
    from .seq2seq import check_source_lengths

    check_cuda_graph(model, cuda_graph)
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    check_token_inputs(sources, stop_tokens, model.config.vocab_size, "source")
    check_source_lengths(model.config, sources, max_new_tokens)
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    logits, step = prefill_seq2seq(model, sources, max_new_tokens, cuda_graph=cuda_graph)
    return sample_until_stopped(logits, step, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, stop_tokens=stop_tokens, generator=generator)


def prefill_seq2seq(model, sources: Sequence[Sequence[int]], max_new_tokens: int, *, cuda_graph: bool = False):
    """An encoder–decoder's `prefill`: the sources encoded once (the cross-attention cache filled), the decoder's
    start token read; (next-token logits [B, vocab], the decode step)."""
    device, width, pad = model.device, max(len(s) for s in sources), model.config.pad_token_id
    ids = torch.tensor([list(s) + [pad] * (width - len(s)) for s in sources], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sources], device=device)
    encoded = model.encode(ids, mask)
    cache = model.new_cache(len(sources), max_new_tokens + cuda_graph)  # + 1: the graph's warm-up runs one past
    start = torch.full((len(sources), 1), model.config.decoder_start_token_id, dtype=torch.long, device=device)
    logits = model.decode(start, encoded, cache=cache)[:, -1]
    step = DecodeStep(model, cache, cuda_graph, forward=lambda tokens: model.decode(tokens, encoded, cache=cache))
    return logits, step if max_new_tokens > 1 else None
