"""Benchmark (not a test): transformers' own quantized KV cache next to gqa's, on the frontier's held-out text.

transformers' `QuantizedCache` is the third place users find KV-cache quantization (after llama.cpp's block
types and vLLM's fp8). It is not a storage format a runtime serves, so gqa does not reproduce it; this puts
it on the same yardstick as the frontier instead: SmolLM2-135M (float32), the frontier's four held-out
sets, windows of 512 tokens, perplexity x the original's, top-1 agreement and KL(original || model)
against the float32 forward.

transformers quantizes only what it holds from earlier steps (a prompt's own attention reads it
unquantized), so each window is decoded token by token, teacher-forced, as generation would read it:

- `quanto` int4 / int2 (optimum-quanto; transformers' defaults: groups of 64, 128 most recent tokens kept
  in the model's dtype, the whole cache re-quantized each time that residual fills);
- `fp8` (e4m3, one scale per layer and tensor calibrated on the first step's amplitude, then frozen).

gqa's q8_0 / q4_0 / fp8_e4m3 caches score the same windows (its full forward quantizes K/V exactly as its
cache stores them: a test). A token-by-token float32 `DynamicCache` pass on the first window checks the
harness against the full forward.

    pip install -e ".[bench]"        # optimum-quanto, for transformers' quanto backend (0.2.7 measured)
    python benchmarks/hf_quantized_cache.py --model /tmp/gqa-frontier/smollm2/original \\
        --linux-doc /tmp/gqa-frontier/smollm2/linux-doc.txt --out docs/results/kv-frontier/transformers-quantized-cache
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from conversion_quality import eval_data  # noqa: E402

from gqa.bench import cpu_model_name  # noqa: E402
from gqa.jsonfiles import write_json  # noqa: E402

SETS = ("wiki", "shakespeare", "python-reference", "linux-doc")
HF_CACHES = {"transformers quanto int4": {"backend": "quanto", "nbits": 4},
             "transformers quanto int2": {"backend": "quanto", "nbits": 2},
             "transformers fp8": {"backend": "fp8"}}
GQA_CACHES = ("q8_0", "q4_0", "fp8_e4m3")


def set_tokens(name: str, model_dir: str, linux_doc: str, n: int) -> torch.Tensor:
    """The tokens `gqa eval --data` scores for a held-out set (validation documents, or the whole file)."""
    from gqa import corpus
    from gqa.checkpoints.tokenizer import load_tokenizer
    from gqa.data import is_validation, tokenize

    tokenizer = load_tokenizer(model_dir)
    data = linux_doc if name == "linux-doc" else eval_data(name, Path("/tmp"))
    if data in corpus.NAMES:
        tokens = tokenize([d for d in corpus.documents(data) if is_validation(d, 0.05)], tokenizer)
    else:
        tokens = torch.tensor(tokenizer(Path(data).read_text())["input_ids"], dtype=torch.long)
    return tokens[: n + 1]


def quanto_bytes_per_value(nbits: int, group: int = 64, scale_bytes: int = 2) -> float:
    """int codes plus one scale and one shift per group, in a bf16 model's dtype (the quantized part only)."""
    return (group * nbits / 8 + 2 * scale_bytes) / group


def teacher_forced(model, window: torch.Tensor, cache) -> torch.Tensor:
    """Logits [T-1, V] for window[1:], one token at a time through `cache`."""
    out = []
    for t in range(window.numel() - 1):
        step = model(window[t : t + 1].view(1, 1), past_key_values=cache, use_cache=True)
        out.append(step.logits[0, -1].float())
    return torch.stack(out)


def scores(logits: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor) -> dict:
    log_p, log_q = F.log_softmax(ref, -1), F.log_softmax(logits, -1)
    return {"nll": F.cross_entropy(logits, targets, reduction="sum").item(), "tokens": targets.numel(),
            "agree": int((logits.argmax(-1) == ref.argmax(-1)).sum()),
            "kl": float((log_p.exp() * (log_p - log_q)).sum())}


def summary(total: dict, base_nll: float) -> dict:
    n = total["tokens"]
    return {"perplexity": math.exp(total["nll"] / n), "ratio": math.exp((total["nll"] - base_nll) / n),
            "top1_agreement": total["agree"] / n, "kl": total["kl"] / n, "tokens": n}


@torch.inference_mode()
def measure(args) -> dict:
    from transformers import AutoModelForCausalLM, DynamicCache, QuantizedCache

    import gqa
    from gqa.kv_formats import kv_format

    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ours = gqa.load(args.model, dtype="float32")
    results, check = {}, None
    for name in SETS:
        tokens = set_tokens(name, args.model, args.linux_doc, args.tokens)
        windows = [tokens[i : i + args.seq_len] for i in range(0, tokens.numel() - 1, args.seq_len)]
        totals = {k: {"nll": 0.0, "tokens": 0, "agree": 0, "kl": 0.0} for k in ("reference", *GQA_CACHES, *HF_CACHES)}
        for window in windows:
            ref = hf(window.view(1, -1)).logits[0, :-1].float()
            targets = window[1:]
            for k, v in scores(ref, ref, targets).items():
                totals["reference"][k] += v
            for cache in GQA_CACHES:
                with ours.storing_kv_as(cache):
                    logits = ours(window.view(1, -1))[0, :-1].float()
                for k, v in scores(logits, ref, targets).items():
                    totals[cache][k] += v
            for label, options in HF_CACHES.items():
                logits = teacher_forced(hf, window, QuantizedCache(config=hf.config, **options))
                for k, v in scores(logits, ref, targets).items():
                    totals[label][k] += v
            if check is None:  # the harness: float32 token by token against the full forward
                check = float((teacher_forced(hf, window, DynamicCache(config=hf.config)) - ref).abs().max())
            print(f"{name}: {totals['reference']['tokens']:,} tokens scored", flush=True)
        base = totals["reference"]["nll"]
        results[name] = {k: summary(v, base) for k, v in totals.items()}
        print(name, {k: round(v["ratio"], 4) for k, v in results[name].items()}, flush=True)
    head_values = 2 * hf.config.num_hidden_layers * hf.config.num_key_value_heads * (
        hf.config.hidden_size // hf.config.num_attention_heads)
    kv_bytes = {c: round(head_values * kv_format(c).bytes_per_value) for c in ("bfloat16", *GQA_CACHES)}
    kv_bytes |= {"transformers fp8": head_values,
                "transformers quanto int4": round(head_values * quanto_bytes_per_value(4)),
                "transformers quanto int2": round(head_values * quanto_bytes_per_value(2))}
    import optimum.quanto
    import transformers

    return {"command": "python benchmarks/hf_quantized_cache.py " + " ".join(sys.argv[1:]),
            "machine": {"cpu": cpu_model_name(), "python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "optimum-quanto": optimum.quanto.__version__,
                        "gqa": gqa.__version__, "date": time.strftime("%Y-%m-%d")},
            "seq_len": args.seq_len, "tokens_per_set": args.tokens, "harness_max_abs_logit_difference": check,
            "kv_bytes_per_token": kv_bytes, "results": results}


def write_readme(out: Path, r: dict) -> None:
    rows = ["| KV cache | KV bytes/token | " + " | ".join(f"{s} ppl × | top-1 | KL" for s in SETS) + " |",
            "|---|---|" + "---|---|---|" * len(SETS)]
    labels = {"q8_0": "gqa q8_0 (llama.cpp's, rotated)", "q4_0": "gqa q4_0 (llama.cpp's, rotated)",
              "fp8_e4m3": "gqa fp8_e4m3 (vLLM's, scale 1.0)"}
    for key in (*GQA_CACHES, *HF_CACHES):
        cells = [f"{r['results'][s][key]['ratio']:.3f} | {r['results'][s][key]['top1_agreement']:.3f} | "
                 f"{r['results'][s][key]['kl']:.4f}" for s in SETS]
        extra = " (+128 recent tokens in the model's dtype)" if "quanto" in key else ""
        rows.append(f"| {labels.get(key, key)} | {r['kv_bytes_per_token'][key]:,}{extra} | " + " | ".join(cells) + " |")
    tokens = ", ".join(f"{s} {r['results'][s]['reference']['tokens']:,}" for s in SETS)
    m = r["machine"]
    (out / "README.md").write_text(f"""# transformers' QuantizedCache next to gqa's quantized caches (SmolLM2-135M)

```
{r['command']}
```

{m['cpu']}, torch {m['torch']}, transformers {m['transformers']}, optimum-quanto {m['optimum-quanto']}, gqa
{m['gqa']}, {m['date']}. Held-out tokens scored (windows of {r['seq_len']}): {tokens}. Against the float32
forward without a cache: perplexity ×, top-1 agreement, KL per token. KV bytes per token with a bf16 model
(bf16 cache: {r['kv_bytes_per_token']['bfloat16']:,}). transformers' caches are decoded token by token,
teacher-forced (a prompt's own attention never reads them quantized); the harness (float32 DynamicCache, token
by token) is {r['harness_max_abs_logit_difference']:.1e} from the full forward at most.

Read with care: quanto keeps the 128 most recent tokens in the model's dtype, a large share of a
{r['seq_len']}-token window (none of gqa's or the runtimes' caches keeps any); its bytes above count the
quantized part only. transformers' fp8 takes each layer's scale from the first step it stores — here a
window's first token, as a generation from a one-token prompt — and saturates what later exceeds it (torch's
cast to float8_e4m3fn clamps to ±448); a longer prompt would calibrate on more.

{chr(10).join(rows)}
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="SmolLM2-135M as an HF folder (gqa import-gguf smollm2 DIR)")
    parser.add_argument("--linux-doc", required=True, help="the frontier's linux-doc.txt")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=2048, help="held-out tokens scored per set")
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = measure(args)
    write_json(out / "results.json", result)
    write_readme(out, result)
    print(f"wrote {out}/results.json and README.md")


if __name__ == "__main__":
    main()
