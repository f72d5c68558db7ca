"""Speed and memory measurements. Timing lives here and in benchmarks/, never in tests."""

from __future__ import annotations

import statistics
import time

import torch

from .model import Transformer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode_tokens_per_s(
    model: Transformer, batch_size: int = 8, context: int = 384, new_tokens: int = 32, repeats: int = 3, seed: int = 0
) -> float:
    """Greedy decode throughput (tokens/s over the batch) after a prefill of `context` random tokens.

    Only the decode steps are timed: each reads every weight and the whole KV cache once, which is where
    G KV heads instead of H pay off. The median of `repeats` runs.
    """
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch_size, context), generator=generator).to(model.device)
    rates = []
    for _ in range(repeats):
        cache = model.new_cache(batch_size, context + new_tokens)
        token = model(prompt, cache=cache)[:, -1:].argmax(-1)
        synchronize(model.device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = model(token, cache=cache)[:, -1:].argmax(-1)
        synchronize(model.device)
        rates.append(batch_size * new_tokens / (time.perf_counter() - start))
    return statistics.median(rates)


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
    """name -> function(q [B,H,D], k, v [B,G,T,D]) -> [B,H,D]; each peer reads the same contiguous cache."""
    import torch.nn.functional as F

    from .kernels import decode_kernel_available, gqa_decode

    peers = {}
    if decode_kernel_available(torch.empty(0, device=device)):
        lengths_cache = {}

        def ours(q, k, v):
            key = (q.shape[0], k.shape[2])
            if key not in lengths_cache:
                lengths_cache[key] = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
            return gqa_decode(q, k, v, lengths_cache[key])

        peers["gqa (Triton)"] = ours
    peers["torch SDPA enable_gqa"] = lambda q, k, v: F.scaled_dot_product_attention(
        q[:, :, None], k, v, enable_gqa=k.shape[1] != q.shape[1])[:, :, 0]
    if device.type == "cuda":
        try:
            from torch.nn.attention.flex_attention import flex_attention

            flex = torch.compile(flex_attention, dynamic=False)
            peers["FlexAttention (compiled)"] = lambda q, k, v: flex(
                q[:, :, None], k, v, enable_gqa=k.shape[1] != q.shape[1])[:, :, 0]
        except ImportError:
            pass
    return peers


def bench_decode(
    batch_sizes=(1, 4, 16, 64),
    lengths=(1024, 8192, 32768, 131072),
    kv_heads=(1, 4, 8, 32),
    n_heads: int = 32,
    head_dim: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    memory_fraction: float = 0.6,
) -> dict:
    """Decode attention for one query per sequence over a full cache: every peer, every grid point, one run.

    Points whose K/V would exceed `memory_fraction` of the device memory are skipped (and listed). When the
    cache is smaller than twice the L2, several copies are rotated so that timings measure memory, not L2.
    """
    device = torch.device(device)
    bandwidth = measured_bandwidth(device, 1.0 if device.type == "cuda" else 0.05)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 2 * 1024**3
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 32 * 1024**2
    peers = decode_peers(device)
    rows, skipped = [], []
    element = torch.empty((), dtype=dtype).element_size()
    for g in kv_heads:
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
                for name, fn in peers.items():
                    def run(fn=fn, sets=sets):
                        for q, k, v in sets:
                            fn(q, k, v)
                    seconds = time_call(run, device) / copies
                    row["peers"][name] = {"us": seconds * 1e6, "gb_per_s": kv_bytes / seconds / 1e9,
                                          "fraction_of_bandwidth": kv_bytes / seconds / bandwidth}
                rows.append(row)
                sets = None  # free this point's buffers before the next is allocated
    return {"device": device_name(device), "bandwidth_bytes_per_s": bandwidth, "n_heads": n_heads,
            "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."), "rows": rows, "skipped": skipped}


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
