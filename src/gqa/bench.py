"""Speed and memory measurements. Timing lives here and in benchmarks/, never in tests."""

from __future__ import annotations

import functools
import math
import statistics
import time

import torch

from .errors import GQAError
from .model import Transformer
from .plots import pyplot
from .presets import preset


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode_rate(model: Transformer, batch_size: int, context: int, new_tokens: int, seed: int = 0) -> float:
    """One sample of greedy decode throughput (tokens/s over the batch) after an untimed prefill of `context`
    random tokens (an encoder–decoder: an untimed encoding of that many source tokens). Only the decode
    steps are timed: each reads every weight and the whole KV cache once, which is where G KV heads instead
    of H pay off."""
    from .kinds import kind_of

    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch_size, context), generator=generator)
    # room for one more token: an encoder–decoder's prefill reads its start token into the cache
    logits, step = kind_of(model).prefill(model, prompt.tolist(), new_tokens + 1)
    token = logits.argmax(-1)
    synchronize(model.device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = step(token).argmax(-1)
    synchronize(model.device)
    return batch_size * new_tokens / (time.perf_counter() - start)


def interleaved_decode_rates(models: dict[str, Transformer], batch_size: int = 8, context: int = 384,
                             new_tokens: int = 32, repeats: int = 5, warmup: int = 1) -> dict[str, dict]:
    """Each model's decode tokens/s, measured in turns (A B C A B C ...) so that a stretch of a busy machine
    slows every model alike: median, min and max of `repeats` samples taken after `warmup` untimed rounds."""
    samples: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(warmup + repeats):
        for name, model in models.items():
            rate = decode_rate(model, batch_size, context, new_tokens, seed=round_)
            if round_ >= warmup:
                samples[name].append(rate)
    return {name: {**spread(v), "samples": v} for name, v in samples.items()}


def spread(values: list[float]) -> dict:
    """The median of repeated timings and their range."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# ------------------------------------------------------------------------------------------ decode kernels

def measured_bandwidth(device: torch.device, gigabytes: float = 1.0) -> float:
    """Device memory bandwidth in bytes/s from a large copy (bytes read + bytes written), measured now."""
    n = int(gigabytes * 1024**3 / 2)
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device)
    return 2 * n * 2 / seconds


def time_call(fn, device: torch.device, repeats: int = 20) -> float:
    """Median seconds per call: CUDA-graph replays timed with events on a GPU, wall clock elsewhere."""
    fn()  # warm-up: compilation, autotuning, allocation
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") / 1e3
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_peers(device: torch.device) -> dict:
    """name -> make(q [B,H,D], k, v [B,G,T,D]) -> a no-argument call computing [B,H,D].

    `make` runs before timing, so a peer that wants another cache layout (FlashInfer's pages) converts once,
    outside the timed calls; every peer reads the same bytes of K/V.
    """
    import torch.nn.functional as F

    from .kernels import decode_kernel_available, gqa_decode

    peers = {}
    if decode_kernel_available(torch.empty(0, device=device)):
        def ours(q, k, v):
            lengths = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
            return lambda: gqa_decode(q, k, v, lengths)

        peers["gqa (Triton)"] = ours

    def sdpa(q, k, v):
        return lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=k.shape[1] != q.shape[1])

    peers["torch SDPA enable_gqa"] = sdpa
    if device.type == "cuda":
        try:
            from torch.nn.attention.flex_attention import flex_attention

            flex = torch.compile(flex_attention, dynamic=False)
            peers["FlexAttention (compiled)"] = lambda q, k, v: (
                lambda: flex(q[:, :, None], k, v, enable_gqa=k.shape[1] != q.shape[1]))
        except ImportError:
            pass
        try:
            import flashinfer

            peers["FlashInfer (tensor cores)"] = lambda q, k, v: flashinfer_decode(flashinfer, q, k, v)
        except ImportError:
            pass
    return peers


def quantized_decode(storage, q, k, v):
    """gqa's decode attention over k/v stored in `storage`'s format (stored once, untimed)."""
    from .attention import attend_quantized
    from .cache import QuantizedKVCache

    b, g, t, d = k.shape
    cache = QuantizedKVCache.allocate(storage, [g], d, b, t, k.device)
    cache.write(0, k.float(), v.float(), torch.arange(t, device=k.device).expand(b, t))
    cache.lengths.fill_(t - 1)  # the query is the last token: every slot is read
    return lambda: attend_quantized(q[:, :, None], cache, 0, None)


def flashinfer_decode(flashinfer, q, k, v, page_size: int = 16):
    """FlashInfer's batch decode over a paged NHD cache holding the same K/V (converted once, untimed)."""
    b, g, t, d = k.shape
    pages = b * t // page_size
    k_pages = k.transpose(1, 2).reshape(pages, page_size, g, d).contiguous()
    v_pages = v.transpose(1, 2).reshape(pages, page_size, g, d).contiguous()
    workspace = torch.empty(128 * 1024**2, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
    indptr = torch.arange(b + 1, dtype=torch.int32, device=q.device) * (t // page_size)
    indices = torch.arange(pages, dtype=torch.int32, device=q.device)
    last = torch.full((b,), page_size, dtype=torch.int32, device=q.device)
    wrapper.plan(indptr, indices, last, num_qo_heads=q.shape[1], num_kv_heads=g, head_dim=d, page_size=page_size,
                 q_data_type=q.dtype, kv_data_type=k.dtype)
    return lambda: wrapper.run(q, (k_pages, v_pages))


def time_peer(make, sets, device: torch.device, repeats: int, row: dict, name: str) -> float | None:
    """Seconds of one decode call of a peer over each copy of the point's K/V (their mean); None where the peer
    cannot run the point (memory, JIT: it must not end the run), its failure written into `row`."""
    try:
        calls = [make(q, k, v) for q, k, v in sets]

        def run():
            for call in calls:
                call()
        return time_call(run, device, repeats) / len(sets)
    except Exception as e:
        row.setdefault("failed", {})[name] = failure(e)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None
    finally:
        calls = None


def bench_decode(
    batch_sizes=(1, 4, 16, 64),
    lengths=(1024, 8192, 32768, 131072),
    n_kv_heads=(1, 4, 8, 32),
    n_heads: int = 32,
    head_dim: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    memory_fraction: float = 0.4,
    repeats: int = 20,
    kv_cache_dtype: str | None = None,
) -> dict:
    """Decode attention for one query per sequence over a full cache: every peer, every grid point, one run.
    `kv_cache_dtype`: also gqa's attention over the same K/V stored in that format (`attend_quantized`),
    its bandwidth counted in the format's bytes.

    Points whose K/V would exceed `memory_fraction` of the device memory are skipped (and listed; a peer may
    hold a second copy in its own layout). When the
    cache is smaller than twice the L2, several copies are rotated so that timings measure memory, not L2.
    """
    device = torch.device(device)
    bandwidth = measured_bandwidth(device, 1.0 if device.type == "cuda" else 0.05)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 2 * 1024**3
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 32 * 1024**2
    peers = decode_peers(device)
    stored_bytes = {}  # peer -> bytes a value costs it, where not `dtype`'s
    if kv_cache_dtype:
        from .kv_formats import kv_storage

        name = f"gqa, {kv_cache_dtype} cache"
        peers[name] = functools.partial(quantized_decode, kv_storage(kv_cache_dtype, head_dim))
        stored_bytes[name] = kv_storage(kv_cache_dtype, head_dim).format.bytes_per_value
    rows, skipped = [], []
    element = torch.empty((), dtype=dtype).element_size()
    for g in n_kv_heads:
        for b in batch_sizes:
            for t in lengths:
                kv_bytes = 2 * b * g * t * head_dim * element
                if kv_bytes > memory_fraction * total:
                    skipped.append({"batch": b, "length": t, "kv_heads": g, "kv_bytes": kv_bytes})
                    continue
                copies = max(1, min(8, -(-2 * l2 // kv_bytes)))
                sets = [(torch.randn(b, n_heads, head_dim, device=device, dtype=dtype),
                         torch.randn(b, g, t, head_dim, device=device, dtype=dtype),
                         torch.randn(b, g, t, head_dim, device=device, dtype=dtype)) for _ in range(copies)]
                row = {"batch": b, "length": t, "kv_heads": g, "kv_bytes": kv_bytes, "copies": copies,
                       "roofline_us": kv_bytes / bandwidth * 1e6, "peers": {}}
                for name, make in peers.items():
                    seconds = time_peer(make, sets, device, repeats, row, name)
                    if seconds is not None:
                        read = kv_bytes * stored_bytes.get(name, element) / element
                        row["peers"][name] = {"us": seconds * 1e6, "gb_per_s": read / seconds / 1e9,
                                              "fraction_of_bandwidth": read / seconds / bandwidth, "kv_bytes": read}
                rows.append(row)
                sets = None  # free this point's buffers before the next is allocated
    return {"device": device_name(device), "bandwidth_bytes_per_s": bandwidth, "n_heads": n_heads,
            "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."), "rows": rows, "skipped": skipped}


def failure(e: Exception) -> str:
    """One line for a peer that failed at a point, kept in the results instead of ending the run."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def cpu_model_name() -> str:
    """The CPU's model name as the kernel reports it (what a results file should name), else the architecture."""
    import platform

    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def summarize_decode(result: dict, ours: str = "gqa (Triton)") -> dict:
    """The acceptance numbers of a decode run: where ours stands against the best peer and the bandwidth."""
    rows = [r for r in result["rows"] if ours in r["peers"] and len(r["peers"]) > 1]
    if not rows:
        return {}
    ratios = []
    for r in rows:
        best_peer = min(v["us"] for k, v in r["peers"].items() if k != ours)
        ratios.append((r, r["peers"][ours]["us"] / best_peer))
    big = [r for r in rows if r["kv_bytes"] >= 256 * 1024**2]
    long_b1 = [ratio for r, ratio in ratios if r["batch"] == 1 and r["length"] >= 8192]
    return {
        "points": len(rows),
        "fraction_at_most_best_peer": sum(ratio <= 1.0 for _, ratio in ratios) / len(ratios),
        "worst_ratio_to_best_peer": max(ratio for _, ratio in ratios),
        "b1_long_max_ratio_to_best_peer": max(long_b1) if long_b1 else None,
        "min_fraction_of_bandwidth_kv_ge_256mb": min((r["peers"][ours]["fraction_of_bandwidth"] for r in big),
                                                     default=None),
    }


def plot_decode(result: dict, path) -> None:
    plt = pyplot()

    heads = sorted({r["kv_heads"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(heads), figsize=(4.5 * len(heads), 4), squeeze=False, sharey=True)
    for ax, g in zip(axes[0], heads):
        rows = [r for r in result["rows"] if r["kv_heads"] == g]
        for peer in sorted({p for r in rows for p in r["peers"]}):
            for b in sorted({r["batch"] for r in rows}):
                pts = sorted((r["length"], r["peers"][peer]["fraction_of_bandwidth"]) for r in rows
                             if r["batch"] == b and peer in r["peers"])
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{peer}, B={b}")
        ax.set_xscale("log", base=2)
        ax.set_title(f"G = {g} (H = {result['n_heads']})")
        ax.set_xlabel("context length")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("fraction of measured bandwidth")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle(f"decode attention, {result['dtype']}, head_dim {result['head_dim']} — {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ whole-model decode

QUICK = {  # `gqa bench ... --quick`: tiny grids that check the harness on any machine, not the speed
    "decode": dict(batch_sizes=(1, 2), lengths=(64, 200), n_kv_heads=(1, 4), n_heads=8, head_dim=64, repeats=3),
    "generate": dict(n_kv_heads=(4, 1), shapes=((1, 16), (2, 24)), new_tokens=4, compile_plain=False,
                     model_preset="llama-tiny"),
    "capacity": dict(n_kv_heads=(4, 1), new_tokens=4, model_preset="llama-tiny"),
}


def random_llama(n_kv_heads: int, dtype: torch.dtype, device: torch.device, model_preset: str = "llama-1b",
                 **changes) -> tuple[Transformer, int]:
    """A Llama-style model of a preset's shape (`gqa.presets`, `changes` to its fields) with random weights (seed 0)
    and its weight bytes: speed does not depend on the values."""
    torch.manual_seed(0)
    config = preset(model_preset, n_kv_heads=n_kv_heads, **changes)
    with torch.device(device):
        model = Transformer(config)
    model.init_weights()
    model = model.to(dtype).eval()
    return model, sum(p.numel() * p.element_size() for p in model.parameters())


def greedy_seconds_per_step(step, tokens: torch.Tensor, device: torch.device, new_tokens: int, warmup: int) -> float:
    """Seconds per greedy decode step, `step(tokens [B]) -> logits [B, vocab]`; the warm-up steps are not timed."""
    for _ in range(warmup):
        tokens = step(tokens).argmax(-1)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        tokens = step(tokens).argmax(-1)
    synchronize(device)
    return (time.perf_counter() - start) / new_tokens


@torch.inference_mode()
def decode_seconds_per_step(model: Transformer, batch: int, prompt_len: int, new_tokens: int,
                            cuda_graph: bool = False, warmup: int = 3, kv_cache_dtype: str | None = None) -> float:
    """Seconds per greedy decode step after a prefill of `prompt_len` random tokens (the prefill is not timed),
    over a cache of `kv_cache_dtype` where given."""
    from .generate import DecodeStep

    if kv_cache_dtype:
        with model.storing_kv_as(kv_cache_dtype):
            return decode_seconds_per_step(model, batch, prompt_len, new_tokens, warmup=warmup)
    cache = model.new_cache(batch, prompt_len + new_tokens + warmup + 2)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=model.device)
    tokens = model(prompt, cache=cache)[:, -1].argmax(-1)
    return greedy_seconds_per_step(DecodeStep(model, cache, cuda_graph=cuda_graph), tokens, model.device,
                                   new_tokens, warmup)


@torch.inference_mode()
def transformers_seconds_per_step(model: Transformer, batch: int, prompt_len: int, new_tokens: int) -> float:
    """The same model in transformers (LlamaForCausalLM, same weights), `generate` with a static cache:
    (time for N new tokens - time for 1) / (N - 1), so the prefill cancels."""
    import transformers

    from .checkpoints.families import LLAMA

    hf_config = transformers.LlamaConfig(**LLAMA.to_hf_config(model.config, {}))
    hf = transformers.LlamaForCausalLM(hf_config).to(device=model.device, dtype=model.dtype).eval()
    hf.load_state_dict(LLAMA.export_state(model.state_dict(), model.config))
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=model.device)

    def run(n):
        synchronize(model.device)
        start = time.perf_counter()
        hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static",
                    pad_token_id=0)
        synchronize(model.device)
        return time.perf_counter() - start

    run(new_tokens)  # warm-up (and compilation, where transformers compiles static-cache decoding)
    return (run(new_tokens) - run(1)) / (new_tokens - 1)


@torch.inference_mode()
def plain_seconds_per_step(model: Transformer, batch: int, prompt_len: int, new_tokens: int, expand_kv: bool = True,
                           compile: bool = True, warmup: int = 3) -> float:
    """Seconds per greedy decode step of the plain-PyTorch static-cache decoder (gqa.plain_decoder) on the same
    weights, its step compiled with torch.compile(mode="reduce-overhead", fullgraph=True); the prefill is
    eager and not timed, and the warm-up steps absorb the compilation."""
    from .plain_decoder import PlainDecoder

    decoder = PlainDecoder(model, batch, prompt_len + new_tokens + warmup + 2, expand_kv=expand_kv)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=model.device)
    tokens = decoder(prompt, torch.arange(prompt_len, device=model.device))[:, -1].argmax(-1)
    forward = torch.compile(decoder, mode="reduce-overhead", fullgraph=True) if compile else decoder
    position = torch.tensor([prompt_len], device=model.device)

    def step(tokens):
        logits = forward(tokens[:, None], position)[:, -1]
        position.add_(1)
        return logits

    return greedy_seconds_per_step(step, tokens, model.device, new_tokens, warmup)


GENERATE_PEERS = {  # name in the results -> what it is
    "transformers": "transformers generate (static cache)",
    "plain": "plain PyTorch + torch.compile (K/V repeat_interleave)",
    "plain-gqa": "plain PyTorch + torch.compile (SDPA enable_gqa)",
}


def generate_runs(point: tuple, *, device: torch.device, wanted: tuple, compile_plain: bool,
                  kv_cache_dtype: str | None) -> dict:
    """Name -> a function timing one decode step of that peer at `point` (model, batch, prompt, new tokens)."""
    runs = {"gqa": functools.partial(decode_seconds_per_step, *point)}
    if device.type == "cuda":
        runs["gqa + CUDA graph"] = functools.partial(decode_seconds_per_step, *point, cuda_graph=True)
    if kv_cache_dtype:  # the same decoder over a cache of that format, beside the float one
        runs[f"gqa, {kv_cache_dtype} cache"] = functools.partial(decode_seconds_per_step, *point,
                                                                 kv_cache_dtype=kv_cache_dtype)
    if "transformers" in wanted:
        runs[GENERATE_PEERS["transformers"]] = functools.partial(transformers_seconds_per_step, *point)
    for name, expand_kv in (("plain", True), ("plain-gqa", False)):
        if name in wanted:
            label = GENERATE_PEERS[name].replace("torch.compile", "torch.compile" if compile_plain else "eager")
            runs[label] = functools.partial(plain_seconds_per_step, *point, expand_kv=expand_kv, compile=compile_plain)
    return runs


def bench_generate(
    n_kv_heads=(16, 4, 1),
    shapes=((1, 1024), (32, 2048)),
    new_tokens: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    model_preset: str = "llama-1b",
    peers=tuple(GENERATE_PEERS),
    compile_plain: bool = True,
    kv_cache_dtype: str | None = None,
) -> dict:
    """Whole-model decode tokens/s for each G and (batch, prompt), with the roofline of each point:
    a step must read every weight and the whole KV cache once, so tokens/s <= batch · bandwidth / bytes.

    peers: which of GENERATE_PEERS run beside ours (the plain decoders compile once per point);
    compile_plain=False runs them eagerly (a harness check: compiling costs ~40 s a point on a CPU);
    kv_cache_dtype: ours also decodes over a cache of that format (its roofline in `kv_rooflines`)."""
    unknown = set(peers) - set(GENERATE_PEERS)
    if unknown:
        raise GQAError(f"unknown generate peers {sorted(unknown)}; known: {', '.join(GENERATE_PEERS)}")
    wanted = tuple(peers)
    device = torch.device(device)
    bandwidth = measured_bandwidth(device, 1.0 if device.type == "cuda" else 0.05)
    rows = []
    for g in n_kv_heads:
        model, weight_bytes = random_llama(g, dtype, device, model_preset)
        for batch, prompt in shapes:
            kv_bytes = batch * (prompt + new_tokens // 2) * model.kv_bytes_per_token()
            roofline = batch * bandwidth / (weight_bytes + kv_bytes)
            runs = generate_runs((model, batch, prompt, new_tokens), device=device, wanted=wanted,
                                 compile_plain=compile_plain, kv_cache_dtype=kv_cache_dtype)
            peers, failed = {}, {}
            for name, seconds_per_step in runs.items():
                try:
                    peers[name] = batch / seconds_per_step()
                except Exception as e:  # one peer failing at one point (memory, compilation) must not end the run
                    failed[name] = failure(e)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                finally:
                    torch._dynamo.reset()  # the next run's module is new: start compiling from a clean cache
            if kv_cache_dtype:
                with model.storing_kv_as(kv_cache_dtype):
                    quantized_bytes = batch * (prompt + new_tokens // 2) * model.kv_bytes_per_token()
                rooflines = {f"gqa, {kv_cache_dtype} cache": batch * bandwidth / (weight_bytes + quantized_bytes)}
            rows.append({
                **({"kv_rooflines": rooflines} if kv_cache_dtype else {}),
                "kv_heads": g, "batch": batch, "prompt": prompt, "new_tokens": new_tokens,
                "weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "roofline_tokens_per_s": roofline,
                "tokens_per_s": peers, "fraction_of_roofline": {k: v / roofline for k, v in peers.items()},
                **({"failed": failed} if failed else {}),
            })
        del model, runs
    result = {"device": device_name(device), "bandwidth_bytes_per_s": bandwidth,
              "dtype": str(dtype).removeprefix("torch."), "rows": rows}
    result["speedups"] = speedups(rows, max(n_kv_heads))
    return result


def speedups(rows: list[dict], mha_heads: int) -> list[dict]:
    """Realised MHA -> G speed-up of each peer next to the roofline ratio, per (batch, prompt)."""
    out = []
    for r in rows:
        if r["kv_heads"] == mha_heads:
            continue
        base = next(x for x in rows if x["kv_heads"] == mha_heads and x["batch"] == r["batch"]
                    and x["prompt"] == r["prompt"])
        roofline = r["roofline_tokens_per_s"] / base["roofline_tokens_per_s"]
        realised = {k: v / base["tokens_per_s"][k] for k, v in r["tokens_per_s"].items()
                    if k in base["tokens_per_s"]}  # a peer that failed at either point has no ratio
        out.append({"kv_heads": r["kv_heads"], "batch": r["batch"], "prompt": r["prompt"], "roofline_ratio": roofline,
                    "realised": realised, "fraction_of_roofline_ratio": {k: v / roofline for k, v in realised.items()}})
    return out


def weight_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of a model's weights, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = Transformer(config)
    return model.num_parameters() * torch.empty((), dtype=dtype).element_size()


def check_capacity_request(memory_gb: float, context: int, new_tokens: int, *, device: torch.device, n_kv_heads,
                           dtype: torch.dtype, model_preset: str) -> None:
    """Refuse a capacity run that cannot work, before anything is allocated: a budget this machine does not
    have (the kernel would kill the run), one the weights alone fill, a context too short to decode in."""
    from .devices import available_memory

    if not (math.isfinite(memory_gb) and memory_gb > 0):
        raise GQAError(f"--memory-gb must be a finite number > 0, got {memory_gb}")
    if context < new_tokens + 5:
        raise GQAError(f"--context must be at least {new_tokens + 5} tokens (it holds the {new_tokens} decoded ones)")
    free, total = available_memory(device)
    if memory_gb * 1024**3 > free:
        fits = math.floor(0.9 * free / 1024**3 * 10) / 10
        raise GQAError(f"--memory-gb {memory_gb:g} is more than {device.type} memory has available now "
                       f"({free / 1024**3:.1f} of {total / 1024**3:.1f} GiB free); pass --memory-gb {fits:g} or less")
    largest = max(weight_bytes(preset(model_preset, n_kv_heads=g, max_positions=context), dtype) for g in n_kv_heads)
    if largest >= 0.9 * memory_gb * 1024**3:
        raise GQAError(f"the model's weights alone take {largest / 1024**3:.2f} GiB, no room for a cache in "
                       f"--memory-gb {memory_gb:g}")


@torch.inference_mode()
def bench_capacity(
    memory_gb: float = 60.0,
    context: int = 4096,
    n_kv_heads=(16, 4, 1),
    new_tokens: int = 32,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    model_preset: str = "llama-1b",
    reserve_fraction: float = 0.1,
    kv_cache_dtype: str | None = None,
) -> dict:
    """At a memory budget, how many sequences of `context` tokens fit beside the weights for each G, and the
    decode tokens/s of that batch. `reserve_fraction` of the budget is kept for activations and workspace.
    `kv_cache_dtype`: the cache stores that format (`gqa.kv_formats`), its bytes counted as the format's.

    The cache is filled with random K/V rather than prefilled (a prefill of hundreds of long sequences would
    need far more activation memory than decoding them; decode speed does not depend on the values).
    """
    from .generate import DecodeStep

    device = torch.device(device)
    budget = memory_gb * 1024**3
    check_capacity_request(memory_gb, context, new_tokens, device=device, n_kv_heads=n_kv_heads, dtype=dtype,
                           model_preset=model_preset)
    rows = []
    for g in n_kv_heads:
        model, weight_bytes = random_llama(g, dtype, device, model_preset, max_positions=context)
        model.set_kv_cache_dtype(kv_cache_dtype)
        per_sequence = context * model.kv_bytes_per_token()
        sequences = int((budget * (1 - reserve_fraction) - weight_bytes) // per_sequence)
        row = {"kv_heads": g, "weight_bytes": weight_bytes, "kv_bytes_per_sequence": per_sequence,
               "max_sequences": max(0, sequences)}
        if sequences >= 1:
            cache = model.new_cache(sequences, context)
            fill_random(cache)
            cache.lengths.fill_(context - new_tokens - 4)
            step = DecodeStep(model, cache, cuda_graph=device.type == "cuda" and not quantized(model))
            tokens = torch.zeros(sequences, dtype=torch.long, device=device)
            row["tokens_per_s"] = sequences / greedy_seconds_per_step(step, tokens, device, new_tokens, warmup=2)
            del cache, step
        rows.append(row)
        del model
    return {"device": device_name(device), "memory_gb": memory_gb, "context": context,
            "dtype": str(dtype).removeprefix("torch."), "kv_cache_dtype": kv_cache_dtype or "the model's", "rows": rows}


def quantized(model: Transformer) -> bool:
    storage = model.kv_cache_storage
    return storage is not None and storage.format.quantized


def fill_random(cache) -> None:
    """Random contents for a cache that is timed, not read for meaning: values, or codes and scales."""
    from .cache import QuantizedKVCache

    if not isinstance(cache, QuantizedKVCache):
        for k, v in zip(cache.keys, cache.values):
            k.normal_()
            v.normal_()
        return
    for store in cache.keys + cache.values:
        for t in store.values():
            if t.is_floating_point() and t.element_size() > 1:  # scales and minimums
                t.uniform_(-0.05, 0.05)
            else:  # codes (8-bit floats as their bytes, small ones: no NaN patterns)
                t.view(torch.uint8).random_(0, 120)
