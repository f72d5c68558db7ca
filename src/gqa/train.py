"""Pre-training and uptraining: one loop for both.

Uptraining (the GQA paper's second step) continues pre-training a converted model for a fraction α of its
original budget: tokens to train = α × pretrain_tokens, and steps = tokens / (batch × seq_len × grad_accum),
where `batch` is the number of sequences in one micro-batch across all ranks. `steps` overrides α.

The loop: AdamW (no decay on norms and biases), linear warm-up then cosine decay to `min_lr_ratio`,
gradient clipping and accumulation, bf16 autocast on CUDA (fp32 on the CPU), optional torch.compile.
The loss is the LM loss, plus `distill_weight` × KL(teacher ‖ student) when a teacher is given.

Distributed runs use torch.distributed under torchrun: DDP, or FSDP2 (`fully_shard` per block) for models
that do not fit one GPU. Every rank reads its slice of each global micro-batch, so the run is the same
computation as one process with the same batch. Rank 0 logs and writes.

Files under OUT: `train/log.jsonl` (one line per step, plus evaluations), `train/report.json`,
`train/checkpoints/step-N/` (model, optimizer, schedule, RNG, data position = the step), and, at the end,
the model itself, written through the checkpoint layer in the format it came in.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoints import load, save
from .checkpoints.files import write_json
from .data import BlockOrder, TokenData, prepare
from .errors import GQAError
from .model import Transformer

# dense bf16 peak FLOP/s by device name, for model FLOPs utilisation
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


@dataclass
class TrainConfig:
    data: str
    out: str
    seq_len: int | None = None  # default: the model's positions, at most 1024
    batch_size: int = 8  # sequences per micro-batch, across all ranks
    grad_accum: int = 1
    steps: int | None = None
    alpha: float | None = None
    pretrain_tokens: float | None = None
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # default: 5 % of the steps
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_blocks: int = 64  # validation blocks scored per evaluation (the first ones, always the same)
    save_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    val_fraction: float = 0.05
    teacher: str | None = None
    distill_weight: float = 0.5
    strategy: str = "ddp"  # with more than one rank: ddp | fsdp
    compile: bool = False
    device: str | None = None
    overwrite: bool = False
    resume: bool = False
    progress: bool = True


# ------------------------------------------------------------------------------------------- planning

def plan_steps(cfg: TrainConfig) -> dict:
    """Steps and tokens of the run, from --steps or from α × --pretrain-tokens."""
    for name in ("seq_len", "batch_size", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise GQAError(f"--{name.replace('_', '-')} must be >= 1")
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    alpha_tokens = None
    if cfg.alpha is not None:
        if cfg.pretrain_tokens is None:
            raise GQAError("--alpha needs --pretrain-tokens: α is a fraction of the tokens the model was pre-trained on")
        if cfg.alpha <= 0:
            raise GQAError(f"--alpha must be > 0, got {cfg.alpha}")
        alpha_tokens = cfg.alpha * cfg.pretrain_tokens
    if cfg.steps is not None:
        if cfg.steps < 1:
            raise GQAError(f"--steps must be >= 1, got {cfg.steps}")
        steps = cfg.steps
    elif alpha_tokens is not None:
        steps = max(1, math.ceil(alpha_tokens / tokens_per_step))
    else:
        raise GQAError("give --steps, or --alpha with --pretrain-tokens")
    return {
        "steps": steps,
        "tokens_per_step": tokens_per_step,
        "tokens": steps * tokens_per_step,
        "alpha": cfg.alpha,
        "pretrain_tokens": cfg.pretrain_tokens,
        "alpha_tokens": alpha_tokens,
        "alpha_effective": (steps * tokens_per_step / cfg.pretrain_tokens) if cfg.pretrain_tokens else None,
    }


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        return value


def init_distributed(device: str | None) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        name = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return Dist(), torch.device(name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), world, local_rank), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def wrap(model: Transformer, strategy: str, d: Dist, device: torch.device) -> torch.nn.Module:
    if d.world == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    raise GQAError(f"unknown --strategy {strategy!r}; choose ddp or fsdp")


# ------------------------------------------------------------------------------------------- losses

def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per token, averaged over tokens."""
    log_s = F.log_softmax(student_logits.float().flatten(0, 1), dim=-1)
    log_t = F.log_softmax(teacher_logits.float().flatten(0, 1), dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


@torch.no_grad()
def validation_loss(model: torch.nn.Module, blocks: torch.Tensor, batch: int, device, autocast) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        chunk = blocks[i : i + batch].to(device)
        with autocast():
            logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / count


# ------------------------------------------------------------------------------------------- checkpoints

def checkpoint_dir(out: Path) -> Path:
    return out / "train" / "checkpoints"


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in checkpoint_dir(out).glob("step-*") if (p / "trainer.json").is_file())
    return done[-1] if done else None


def full_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(out: Path, step: int, model, optimizer, schedule, cfg: TrainConfig, d: Dist, tied: bool) -> None:
    from safetensors.torch import save_file

    model_state, optim_state = full_state(model, optimizer)  # collective: every rank takes part
    if d.main:
        root = checkpoint_dir(out)
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{step:07d}"
        tmp = root / f".step-{step:07d}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tensors = {k: v.contiguous() for k, v in model_state.items() if not (tied and k == "output.weight")}
        save_file(tensors, str(tmp / "model.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save({"optimizer": optim_state, "schedule": schedule.state_dict(), "rng": rng}, tmp / "state.pt")
        write_json(tmp / "trainer.json", {"step": step, "config": asdict(cfg)})  # its presence marks completion
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        kept = sorted(p for p in root.glob("step-*") if (p / "trainer.json").is_file())
        for old in kept[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()


def load_checkpoint(path: Path, model, optimizer, schedule, tied: bool) -> int:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_state = load_file(str(path / "model.safetensors"))
    if tied:
        model_state["output.weight"] = model_state["tok_embeddings.weight"]
    state = torch.load(path / "state.pt", weights_only=True)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return json.loads((path / "trainer.json").read_text())["step"]


def write_final_model(model: Transformer, out: Path) -> None:
    """Write the model files into OUT (which also holds train/): via a temporary folder, config.json last."""
    tmp = out / ".model.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    save(model, tmp)
    names = sorted(p.name for p in tmp.iterdir())
    for name in [n for n in names if n != "config.json"] + ["config.json"]:
        os.replace(tmp / name, out / name)
    tmp.rmdir()


# ------------------------------------------------------------------------------------------- the loop

def prepare_out(cfg: TrainConfig) -> Path | None:
    """Check OUT against --overwrite / --resume; return the checkpoint to resume from, if any."""
    out = Path(cfg.out)
    if cfg.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise GQAError(f"--resume: no checkpoint in {checkpoint_dir(out)} to resume from")
        return ckpt
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise GQAError(f"{out} already exists; pass --overwrite to replace it or --resume to continue its run")
    return None


def train(model: Transformer, tokenizer, cfg: TrainConfig, init_path: str | None = None,
          data: TokenData | None = None) -> dict:
    """Train `model` (already loaded) on cfg.data; returns the run's report. Call on every rank under torchrun.

    `data` may be given already prepared (the demo tokenizes its corpus once for many runs).
    """
    d, device = init_distributed(cfg.device)
    if cfg.seq_len is None:
        cfg.seq_len = min(1024, model.config.max_positions)
    plan = plan_steps(cfg)
    if cfg.batch_size % d.world:
        raise GQAError(f"--batch-size {cfg.batch_size} does not split over {d.world} ranks")
    if cfg.seq_len > model.config.max_positions:
        raise GQAError(f"--seq-len {cfg.seq_len} exceeds the model's {model.config.max_positions} positions")
    resume_from = prepare_out(cfg)
    out = Path(cfg.out)
    if d.main and not cfg.resume and out.exists() and cfg.overwrite:
        shutil.rmtree(out)
    d.barrier()

    if data is None:
        data = prepare(cfg.data, tokenizer, cfg.seq_len, cfg.val_fraction)
    elif data.seq_len != cfg.seq_len:
        raise GQAError(f"prepared data has blocks of {data.seq_len} tokens, the run asks for {cfg.seq_len}")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise GQAError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}")
    teacher = None
    if cfg.teacher:
        teacher = load(cfg.teacher, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device)
        if teacher.config.vocab_size != model.config.vocab_size:
            raise GQAError("the teacher's vocabulary differs from the student's")
        teacher.requires_grad_(False)

    steps = plan["steps"]
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, steps // 20)
    tied = model.config.tie_embeddings
    save_dtype = model.dtype  # the final model is written in the dtype it came in; training keeps fp32 weights
    model.to(device=device, dtype=torch.float32).train()
    net = wrap(model, cfg.strategy, d, device)
    decay = [p for p in net.parameters() if p.dim() >= 2]
    no_decay = [p for p in net.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda",
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup, cfg.min_lr_ratio))
    forward = torch.compile(net) if cfg.compile else net

    def autocast():
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    start = 0
    if resume_from is not None:
        start = load_checkpoint(resume_from, net, optimizer, schedule, tied)
    log_path = out / "train" / "log.jsonl"
    if d.main:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from is not None and log_path.exists():  # drop what the interrupted run logged past its checkpoint
            kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= start]
            log_path.write_text("".join(line + "\n" for line in kept))
        elif resume_from is None:
            log_path.write_text("")

    def log(record: dict) -> None:
        if d.main:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    val_blocks = data.val[: cfg.eval_blocks]
    eval_batch = max(1, cfg.batch_size // d.world)
    initial_val = None
    if start == 0:
        initial_val = validation_loss(forward, val_blocks, eval_batch, device, autocast)
        log({"step": 0, "tokens": 0, "val_loss": initial_val, "val_perplexity": math.exp(initial_val)})

    order = BlockOrder(len(data.train), cfg.seed)
    per_rank = cfg.batch_size // d.world
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * n_params + 12 * model.config.n_layers * model.config.n_heads * model.config.head_dim * cfg.seq_len
    peak = next((v for k, v in PEAK_FLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)
    step_delay = float(os.environ.get("GQA_TEST_STEP_DELAY", "0"))  # test hook: slows steps so a test can kill mid-run
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="training", disable=not (cfg.progress and d.main))
    record = {}
    val_loss = initial_val
    for step in bar:
        t0 = time.time()
        lm_sum = torch.zeros((), device=device)
        kl_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            first = (step * cfg.grad_accum + micro) * cfg.batch_size + d.rank * per_rank
            blocks = order.batch(data.train, first, per_rank).to(device)
            x, y = blocks[:, :-1], blocks[:, 1:]
            sync = contextlib.nullcontext()
            if d.world > 1 and cfg.strategy == "ddp" and micro < cfg.grad_accum - 1:
                sync = net.no_sync()
            with sync:
                with autocast():
                    logits = forward(x)
                loss = lm_loss(logits, y)
                lm_sum += loss.detach()
                if teacher is not None:
                    with torch.no_grad(), autocast():
                        teacher_logits = teacher(x)
                    kl = distill_kl(logits, teacher_logits)
                    kl_sum += kl.detach()
                    loss = loss + cfg.distill_weight * kl
                (loss / cfg.grad_accum).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = schedule.get_last_lr()[0]
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        lm = d.mean(lm_sum / cfg.grad_accum).item()
        seconds = time.time() - t0
        tokens_per_s = plan["tokens_per_step"] / seconds
        record = {"step": step + 1, "tokens": (step + 1) * plan["tokens_per_step"], "loss": lm, "lr": lr,
                  "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_s}
        if teacher is not None:
            record["kl"] = d.mean(kl_sum / cfg.grad_accum).item()
        if peak:
            record["mfu"] = tokens_per_s * flops_per_token / (peak * d.world)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            val_loss = validation_loss(forward, val_blocks, eval_batch, device, autocast)
            record.update(val_loss=val_loss, val_perplexity=math.exp(val_loss))
        log(record)
        bar.set_postfix(loss=f"{lm:.3f}", tok_s=f"{tokens_per_s:,.0f}", lr=f"{lr:.2e}")
        if (step + 1) % cfg.save_every == 0 and step + 1 < steps:
            save_checkpoint(out, step + 1, net, optimizer, schedule, cfg, d, tied)
        if step_delay:
            time.sleep(step_delay)

    model_state, _ = full_state(net, optimizer)
    report = {
        **plan,
        "source": init_path,
        "data": str(cfg.data),
        "documents": data.documents,
        "train_tokens_available": data.train_tokens,
        "val_tokens": int(val_blocks.numel()),
        "val_loss_initial": initial_val,
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss) if val_loss is not None else None,
        "final_loss": record.get("loss"),
        "world_size": d.world,
        "strategy": cfg.strategy if d.world > 1 else "single",
        "config": asdict(cfg),
    }
    if d.main:
        if tied:
            model_state.setdefault("output.weight", model_state["tok_embeddings.weight"])
        final = Transformer(model.config)
        final.load_state_dict(model_state)
        final.tie_weights()
        final.hf_config, final.source_dir = model.hf_config, model.source_dir
        write_final_model(final.to(save_dtype).eval(), out)
        if initial_val is None:  # resumed: take the initial evaluation from the log
            first = json.loads(log_path.read_text().splitlines()[0])
            report["val_loss_initial"] = first.get("val_loss")
        write_json(out / "train" / "report.json", report)
    d.barrier()
    return report


def init_weights(model: Transformer, std: float = 0.02) -> None:
    """GPT-2-style initialisation for training from scratch: N(0, std), residual projections scaled by 1/√(2L)."""
    residual_std = std / math.sqrt(2 * model.config.n_layers)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.zeros_(p)
        elif p.dim() == 1:
            torch.nn.init.ones_(p)
        elif name.endswith(("attention.wo.weight", "mlp.down.weight")):
            torch.nn.init.normal_(p, std=residual_std)
        else:
            torch.nn.init.normal_(p, std=std)
