"""Benchmark (not a test): decode speed on a CPU, gqa beside what a CPU user would pick instead.

One random-weight Llama shape (16 query heads, ~170M parameters, float32) with 16 / 4 / 1 KV heads, at
batch 1 and 8 and 512 / 2k / 8k tokens of context. At each point four decoders produce greedy tokens, in
turns (a round of every peer, then the next round), and each reports the median tokens/s of its rounds
with the spread:

- gqa: `DecodeStep` over gqa's static cache of G heads (what `gqa generate` runs);
- transformers `generate`, with its default (dynamic) cache and with its static cache, on the same weights;
- llama.cpp (llama-cpp-python's vendored build) on an f32 GGUF of the same weights written by
  `gqa export --format gguf`, with an f32 KV cache, one cache stream per sequence, the same threads.

`--peers` may add each runtime's quantized KV cache beside its float one: "gqa (q8_0 cache)", "gqa (q4_0
cache)" (`gqa.kv_formats`; also q5_0, iq4_nl, fp8_e4m3) and "llama.cpp (q8_0 cache)", "llama.cpp (q4_0
cache)" (-ctk / -ctv, flash attention on, as llama.cpp needs for a quantized V); each peer's roofline
counts the bytes its cache holds:

    python benchmarks/cpu_decode.py --kv-heads 4 --out docs/results/kv-frontier/cpu-decode --peers \
        "gqa,gqa (q8_0 cache),gqa (q4_0 cache),llama.cpp,llama.cpp (q8_0 cache),llama.cpp (q4_0 cache)"

The caches of gqa and transformers are filled with random K/V rather than prefilled (decode speed does not
depend on the values; a prefill of 8 x 8k tokens costs minutes on 2 cores); llama.cpp, whose cache cannot
be written from outside, prefills one sequence once per G and copies it to the others. Only decode steps
are timed. Next to every point: the bytes a step must read (every weight once, and each sequence's cache)
and the roofline it allows at the read bandwidth measured in the same run; and, per (batch, context), each
decoder's realised MHA -> GQA/MQA speed-up next to the ratio of bytes.

    python benchmarks/cpu_decode.py --out docs/results/cpu-decode
    python benchmarks/cpu_decode.py --quick --out /tmp/cpu-decode     # a minute: the harness at toy sizes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import gqa
from gqa.bench import cpu_model_name, fill_random, greedy_seconds_per_step, random_llama
from gqa.checkpoints import save
from gqa.checkpoints.gguf import write_gguf
from gqa.generate import DecodeStep
from gqa.jsonfiles import write_json
from gqa.kv_formats import FORMATS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from llama_cpp_tools import llama_cpp_module  # noqa: E402  (builds llama.cpp from the registry's sdist once)

DEMO_TOKENIZER = Path(gqa.__file__).parent / "assets" / "demo-mha"
SHAPE = dict(n_layers=8, dim=1024, n_heads=16, head_dim=64, hidden_dim=2816, vocab_size=32000)
QUICK_SHAPE = dict(n_layers=2, dim=128, n_heads=4, head_dim=32, hidden_dim=256, vocab_size=4096)
WARMUP_STEPS = 2


def read_bandwidth(gigabytes: float = 1.0, repeats: int = 9) -> dict:
    """Bytes/s this machine's cores read from memory now, over a buffer far larger than any cache, two ways:
    a sum (torch's cascade sum does some arithmetic per element) and a matrix-vector product (what a decode
    step does with every weight). The faster of the two medians is the roofline's bandwidth."""
    x = torch.ones(int(gigabytes * 1024**3 / 4))
    matrix, vector = x.view(-1, 4096), torch.ones(4096)
    kernels = {"sum": lambda: x.sum(), "matrix-vector": lambda: torch.mv(matrix, vector)}
    out = {}
    for name, kernel in kernels.items():
        kernel()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            kernel()
            times.append(time.perf_counter() - start)
        rates = [x.numel() * 4 / t for t in times]
        out[name] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}
    return max(out.values(), key=lambda r: r["median"]) | {"kernel": max(out, key=lambda n: out[n]["median"]), "by_kernel": out}


# ------------------------------------------------------------------------------------------------- peers

def random_kv(shape, seed: int) -> torch.Tensor:
    return torch.empty(shape).normal_(generator=torch.Generator().manual_seed(seed))


class GqaPeer:
    """gqa's own decode step over its static cache (filled with random K/V), or over a cache of a quantized
    format (`kv_cache_dtype`: random codes and scales)."""

    def __init__(self, model, kv_cache_dtype: str | None = None):
        self.model, self.kv_cache_dtype = model, kv_cache_dtype

    @torch.inference_mode()
    def seconds_per_step(self, batch: int, context: int, steps: int) -> float:
        with self.model.storing_kv_as(self.kv_cache_dtype):
            cache = self.model.new_cache(batch, context + steps + WARMUP_STEPS + 1)
            if self.kv_cache_dtype:
                fill_random(cache)
            else:
                for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
                    k[:, :, :context] = random_kv(k[:, :, :context].shape, i)
                    v[:, :, :context] = random_kv(v[:, :, :context].shape, ~i)
            cache.lengths.fill_(context)
            return greedy_seconds_per_step(DecodeStep(self.model, cache), torch.zeros(batch, dtype=torch.long),
                                           torch.device("cpu"), steps, WARMUP_STEPS)


class TransformersPeer:
    """transformers `generate` on the same weights, from a cache (dynamic or static) holding `context` random
    tokens: (time for N new tokens - time for 1) / (N - 1), so what generate does once per call cancels."""

    def __init__(self, model, static: bool):
        import transformers

        from gqa.checkpoints.families import LLAMA

        self.config = transformers.LlamaConfig(**LLAMA.to_hf_config(model.config, {}))
        self.hf = transformers.LlamaForCausalLM(self.config).eval()
        self.hf.load_state_dict(LLAMA.export_state(model.state_dict(), model.config))
        self.static = static

    def filled_cache(self, batch: int, context: int, steps: int):
        from transformers import DynamicCache, StaticCache

        cfg = self.config
        cache = (StaticCache(config=cfg, max_cache_len=context + steps + 2) if self.static else DynamicCache(config=cfg))
        shape = (batch, cfg.num_key_value_heads, context, cfg.hidden_size // cfg.num_attention_heads)
        for layer in range(cfg.num_hidden_layers):
            cache.update(random_kv(shape, layer), random_kv(shape, ~layer), layer, {"cache_position": torch.arange(context)})
        return cache

    @torch.inference_mode()
    def seconds_per_step(self, batch: int, context: int, steps: int) -> float:
        prompt = torch.full((batch, context + 1), 7, dtype=torch.long)  # the cache holds the first `context`
        mask = torch.ones_like(prompt)

        def run(n):
            cache = self.filled_cache(batch, context, n)
            start = time.perf_counter()
            self.hf.generate(prompt, attention_mask=mask, past_key_values=cache, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
            return time.perf_counter() - start

        run(WARMUP_STEPS + 1)
        return (run(steps + 1) - run(1)) / steps


class LlamaCppPeer:
    """llama.cpp through llama-cpp-python's low-level API: one context with a cache stream per sequence
    (kv_unified off, so each sequence reads only its own cache, as in gqa and transformers), f32 K/V."""

    def __init__(self, gguf_file: Path, max_batch: int, max_context: int, threads: int, flash_attention: int = -1,
                 cache_type: int = 0):
        self.ll = ll = llama_cpp_module()
        ll.llama_backend_init()
        self.model = ll.llama_model_load_from_file(str(gguf_file).encode(), ll.llama_model_default_params())
        params = ll.llama_context_default_params()
        self.per_sequence = max_context + 64
        params.n_ctx = max_batch * self.per_sequence
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = max_batch
        params.kv_unified = False
        params.type_k = params.type_v = cache_type  # GGML_TYPE_F32 (0), or Q8_0 (8), Q4_0 (2): -ctk / -ctv
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = flash_attention  # -1 auto (llama.cpp's default: on where the backend has it), 0 off
        self.ctx = ll.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {params.n_ctx} tokens")
        self.memory = ll.llama_get_memory(self.ctx)
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.max_batch = max_batch
        self.batch = ll.llama_batch_init(512, 0, 1)
        self.filled = 0

    def decode(self, tokens: list[int], positions: list[int], sequences: list[int], want_logits: bool) -> None:
        b = self.batch
        b.n_tokens = len(tokens)
        for i, (t, p, s) in enumerate(zip(tokens, positions, sequences)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = t, p, 1, s
            b.logits[i] = want_logits
        if self.ll.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def prefill(self, context: int) -> None:
        """Sequence 0 reads `context` tokens (512 at a time), then every other sequence gets a copy."""
        ll = self.ll
        ll.llama_memory_clear(self.memory, True)
        for start in range(0, context, 512):
            n = min(512, context - start)
            self.decode([7] * n, list(range(start, start + n)), [0] * n, False)
        for s in range(1, self.max_batch):  # across cache streams llama.cpp copies whole streams only
            ll.llama_memory_seq_cp(self.memory, 0, s, -1, -1)
        self.filled = context

    def seconds_per_step(self, batch: int, context: int, steps: int) -> float:
        if context > self.filled:
            self.prefill(context)
        for s in range(self.max_batch):  # keep the first `context` tokens of every sequence
            self.ll.llama_memory_seq_rm(self.memory, s, context, -1)
        tokens = [0] * batch

        def step(position):
            self.decode(tokens, [position] * batch, list(range(batch)), True)
            for i in range(batch):
                logits = np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                tokens[i] = int(logits.argmax())

        for i in range(WARMUP_STEPS):
            step(context + i)
        start = time.perf_counter()
        for i in range(steps):
            step(context + WARMUP_STEPS + i)
        return (time.perf_counter() - start) / steps

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


# ------------------------------------------------------------------------------------------------- the run

PEERS = {
    "gqa": lambda model, gguf, args: GqaPeer(model),
    "transformers (dynamic cache)": lambda model, gguf, args: TransformersPeer(model, static=False),
    "transformers (static cache)": lambda model, gguf, args: TransformersPeer(model, static=True),
    "llama.cpp": lambda model, gguf, args: LlamaCppPeer(gguf, max(args.batches), max(args.contexts), args.threads),
    # llama.cpp's CPU flash attention walks the cache one position at a time; at long context without it is faster
    "llama.cpp (flash attention off)": lambda model, gguf, args: LlamaCppPeer(
        gguf, max(args.batches), max(args.contexts), args.threads, flash_attention=0),
}
for _name, _type in (("q8_0", 8), ("q4_0", 2)):  # each runtime's own quantized KV cache, beside its f32 one
    # a quantized V cache needs llama.cpp's flash attention (on)
    PEERS[f"llama.cpp ({_name} cache)"] = lambda model, gguf, args, t=_type: LlamaCppPeer(
        gguf, max(args.batches), max(args.contexts), args.threads, flash_attention=1, cache_type=t)
for _name in ("q8_0", "q5_0", "q4_0", "iq4_nl", "fp8_e4m3"):
    PEERS[f"gqa ({_name} cache)"] = lambda model, gguf, args, name=_name: GqaPeer(model, name)
DEFAULT_PEERS = ["gqa", "transformers (dynamic cache)", "transformers (static cache)", "llama.cpp"]


def kv_bytes_of(peer: str, float_bytes: int) -> int:
    """The KV bytes a peer reads per step: a quantized cache's are its format's (`gqa.kv_formats`)."""
    fmt = next((f for f in FORMATS if f"({f} cache)" in peer), None)
    return float_bytes if fmt is None else round(float_bytes * FORMATS[fmt].bytes_per_value / 4)


def gguf_of(model, folder: Path) -> Path:
    """The model saved as an HF folder with the demo's tokenizer, then as an f32 GGUF by gqa's writer."""
    import shutil

    save(model, folder, overwrite=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_TOKENIZER / name, folder / name)
    return write_gguf(gqa.load(folder, dtype="float32"), folder / "model.gguf", overwrite=True)


def weights_read_per_step(model) -> int:
    """Bytes of weights a decode step reads: all of them but the input embedding table, of which it reads one
    row per sequence (unless the table is also the output head)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.config.tie_embeddings:
        return total
    return total - model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()


def measure_point(peers: dict, batch: int, context: int, steps: int, repeats: int) -> dict:
    """Each peer's tokens/s at one point: `repeats` rounds in which every peer runs once, after one untimed round."""
    samples: dict[str, list[float]] = {name: [] for name in peers}
    failed: dict[str, str] = {}
    for round_ in range(repeats + 1):
        for name, peer in peers.items():
            if name in failed:
                continue
            try:
                rate = batch / peer.seconds_per_step(batch, context, steps)
            except Exception as e:  # one peer failing at one point (memory) must not end the run
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                continue
            if round_:
                samples[name].append(rate)
    stats = {n: {"median": statistics.median(v), "min": min(v), "max": max(v), "samples": v}
             for n, v in samples.items() if v}
    return {"tokens_per_s": stats, **({"failed": failed} if failed else {})}


def run(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    shape = QUICK_SHAPE if args.quick else SHAPE
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    bandwidth = read_bandwidth(0.25 if args.quick else 1.0)
    print(f"read bandwidth {bandwidth['median'] / 1e9:.1f} GB/s", flush=True)
    rows = []
    for g in args.kv_heads:
        model, _ = random_llama(g, torch.float32, torch.device("cpu"), **shape, max_positions=max(args.contexts) + 64)
        weight_bytes = weights_read_per_step(model)
        gguf_file = gguf_of(model, work / f"g{g}")
        peers = {name: PEERS[name](model, gguf_file, args) for name in args.peers}
        for context in sorted(args.contexts, reverse=True):  # llama.cpp prefills the longest once per G
            for batch in args.batches:
                kv_bytes = batch * context * model.kv_bytes_per_token()
                roofline = batch * bandwidth["median"] / (weight_bytes + kv_bytes)
                point = measure_point(peers, batch, context, args.new_tokens, args.repeats)
                own = {n: batch * bandwidth["median"] / (weight_bytes + kv_bytes_of(n, kv_bytes)) for n in peers}
                row = {"kv_heads": g, "batch": batch, "context": context, "weight_bytes_read": weight_bytes,
                       "kv_bytes": kv_bytes, "bytes_per_step": weight_bytes + kv_bytes,
                       "roofline_tokens_per_s": roofline, "roofline_by_peer": own, **point,
                       "fraction_of_roofline": {n: s["median"] / own[n] for n, s in point["tokens_per_s"].items()}}
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("kv_heads", "batch", "context")} | {
                    n: round(s["median"], 1) for n, s in point["tokens_per_s"].items()} | {
                    "roofline": round(roofline, 1)}), flush=True)
        for peer in peers.values():
            getattr(peer, "close", lambda: None)()
        del peers, model
    return {"command": "python benchmarks/cpu_decode.py " + shlex.join(sys.argv[1:]), "machine": machine(args.threads),
            "shape": shape, "dtype": "float32", "new_tokens_timed": args.new_tokens, "repeats": args.repeats,
            "read_bandwidth_bytes_per_s": bandwidth, "rows": rows, "speedups": speedups(rows, max(args.kv_heads))}


def speedups(rows: list[dict], mha: int) -> list[dict]:
    """Per (batch, context) and G < H: each peer's realised tokens/s ratio to its own MHA, next to the bytes ratio."""
    out = []
    for r in rows:
        point = (r["batch"], r["context"])
        base = next((b for b in rows if b["kv_heads"] == mha and (b["batch"], b["context"]) == point), None)
        if r["kv_heads"] == mha or base is None:
            continue
        bytes_ratio = base["bytes_per_step"] / r["bytes_per_step"]
        realised = {n: s["median"] / base["tokens_per_s"][n]["median"] for n, s in r["tokens_per_s"].items()
                    if n in base["tokens_per_s"]}
        out.append({"kv_heads": r["kv_heads"], "batch": r["batch"], "context": r["context"], "bytes_ratio": bytes_ratio,
                    "realised": realised, "fraction_of_bytes_ratio": {n: v / bytes_ratio for n, v in realised.items()}})
    return out


def machine(threads: int) -> dict:
    return {"cpu": cpu_model_name(), "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def readme(results: dict) -> str:
    """The tables of a run, every number from results.json."""
    m, bw = results["machine"], results["read_bandwidth_bytes_per_s"]
    peers = list(dict.fromkeys(n for r in results["rows"] for n in r["tokens_per_s"]))
    lines = ["# Decode speed on a CPU: gqa, transformers and llama.cpp\n", f"```\n{results['command']}\n```\n",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads for every decoder, torch {m['torch']}, "
             f"{m['date']}. Read bandwidth measured in the same run: {bw['median'] / 1e9:.1f} GB/s (median; "
             f"{bw['min'] / 1e9:.1f}–{bw['max'] / 1e9:.1f}{', ' + bw['kernel'] if 'kernel' in bw else ''}). "
             f"Model: random-weight Llama, {results['shape']}, "
             f"{results['dtype']} weights and KV cache. Each cell: median tokens/s of {results['repeats']} rounds of "
             f"{results['new_tokens_timed']} greedy decode steps (the peers take turns, round by round), the range of "
             "the rounds in brackets, and the fraction of the roofline (tokens/s if a step cost only reading its bytes "
             "once at the measured bandwidth; a quantized cache's bytes are its format's; the MB column is the float "
             "cache's).\n",
             "| KV heads | batch | context | MB read per step | roofline tok/s | " + " | ".join(peers) + " |",
             "|---" * (5 + len(peers)) + "|"]
    for r in results["rows"]:
        cells = []
        for n in peers:
            s = r["tokens_per_s"].get(n)
            cells.append("failed" if s is None else f"{s['median']:,.1f} ({s['min']:,.1f}–{s['max']:,.1f}) "
                         f"{r['fraction_of_roofline'][n]:.0%}")
        lines.append(f"| {r['kv_heads']} | {r['batch']} | {r['context']:,} | {r['bytes_per_step'] / 1e6:,.0f} | "
                     f"{r['roofline_tokens_per_s']:,.1f} | " + " | ".join(cells) + " |")
    if results["speedups"]:
        lines += ["\n## MHA → GQA / MQA: realised speed-up next to the ratio of bytes read per step\n",
                  "| KV heads | batch | context | bytes ratio | " + " | ".join(peers) + " |", "|---" * (4 + len(peers)) + "|"]
        for s in results["speedups"]:
            cells = [f"{s['realised'][n]:.2f}× ({s['fraction_of_bytes_ratio'][n]:.0%})" if n in s["realised"] else "—"
                     for n in peers]
            lines.append(f"| {s['kv_heads']} | {s['batch']} | {s['context']:,} | {s['bytes_ratio']:.2f}× | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines + quantized_against_float(results, peers)) + "\n"


def quantized_against_float(results: dict, peers: list[str]) -> list[str]:
    """Each quantized-cache peer's median tokens/s over its runtime's float-cache peer, per point."""
    pairs = [(n, n.split(" (")[0]) for n in peers if " cache)" in n and n.split(" (")[0] in peers]
    if not pairs:
        return []
    lines = ["\n## Quantized cache against the same runtime's float cache (median tokens/s ratio)\n",
             "| KV heads | batch | context | " + " | ".join(f"{q} / {f}" for q, f in pairs) + " |",
             "|---" * (3 + len(pairs)) + "|"]
    for r in results["rows"]:
        speed = r["tokens_per_s"]
        cells = [f"{speed[q]['median'] / speed[f]['median']:.2f}×" if speed.get(q) and speed.get(f) else "—"
                 for q, f in pairs]
        lines.append(f"| {r['kv_heads']} | {r['batch']} | {r['context']:,} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="cpu-decode")
    parser.add_argument("--workdir", default="/tmp/gqa-cpu-decode")
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks the harness in about a minute")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--kv-heads", type=lambda s: [int(x) for x in s.split(",")], default=[16, 4, 1])
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048, 8192])
    parser.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per round")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per point (after one untimed)")
    parser.add_argument("--peers", type=lambda s: s.split(","), default=DEFAULT_PEERS,
                        help=f"comma-separated, of: {', '.join(PEERS)}")
    parser.add_argument("--report", action="store_true", help="rewrite OUT/README.md from OUT/results.json")
    args = parser.parse_args()
    if unknown := [p for p in args.peers if p not in PEERS]:
        parser.error(f"unknown peer {unknown[0]!r}; known: {', '.join(PEERS)}")
    out = Path(args.out)
    if args.quick:
        args.kv_heads, args.contexts, args.new_tokens, args.repeats = [4, 1], [64, 128], 4, 2
    if not args.report:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "results.json", run(args))
    (out / "README.md").write_text(readme(json.loads((out / "results.json").read_text())))
    print(f"wrote {out}/results.json and README.md")


if __name__ == "__main__":
    main()
