"""Pre-training and uptraining: one loop for both.

Uptraining (the GQA paper's second step) continues pre-training a converted model for a fraction α of its
original budget: tokens to train = α × pretrain_tokens, and steps = tokens / (batch × seq_len × grad_accum),
where `batch` is the number of sequences in one micro-batch across all ranks. `steps` overrides α.
Encoder–decoders on text read `seq_len` tokens of text per example, as a decoder's block; on input/target
pairs a step reads the target tokens of its examples (padding is no token), so tokens and α count those.

The loop: AdamW (no decay on norms and biases), linear warm-up then cosine decay to `min_lr_ratio`,
gradient clipping and accumulation, bf16 autocast on CUDA (fp32 on the CPU), optional torch.compile.
The loss is `lm_weight` × the LM loss, plus `distill_weight` × KL(teacher ‖ student) when a teacher is given
(`lm_weight` 0: distillation alone, the student fitted to the teacher's distributions and not to the text's).

Distributed runs use torch.distributed under torchrun: DDP, or FSDP2 (`fully_shard` per block) for models
that do not fit one GPU. Every rank reads its slice of each global micro-batch, so the run is the same
computation as one process with the same batch. Rank 0 logs and writes.

Files under OUT: `train/log.jsonl` (one line per step, plus evaluations), `train/report.json`,
`train/checkpoints/step-N/` (model, optimizer, schedule, RNG, data position = the step), and, at the end,
the model itself, written through the checkpoint layer in the format it came in.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from .card import training_step, write_card
from .checkpoints import check_reference, load, save
from .data import BlockOrder, TokenData
from .devices import default_device, keep_freed_memory
from .errors import GQAError, warn
from .evaluate import mean_kl
from .fingerprint import digest, tensors_digest
from .jsonfiles import append_jsonl, write_json
from .kinds import kind_of
from .model import Transformer
from .seq2seq_data import Examples

PRETRAIN_LR = 3e-4  # the default from scratch, and for uptraining without a teacher
# Uptraining a converted model next to the model it came from: distil from it, at a step size for continued
# training (on the demo model 5e-4 walked a near-copy of the original away from it: perplexity 77.1 -> 80.3).
CONTINUED_LR = 1e-4
CONTINUED_DISTILL_WEIGHT = 1.0
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
    lr: float = PRETRAIN_LR
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # default: 5 % of the steps
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int | None = 100  # None: only at the end
    eval_blocks: int = 64  # validation blocks scored per evaluation (the first ones, always the same)
    save_every: int | None = 500  # None: no checkpoints
    keep_checkpoints: int = 2
    seed: int = 0
    val_fraction: float = 0.05
    teacher: str | None = None
    distill_weight: float | None = None  # default 0.5 with a teacher; without one it has nothing to weigh
    lm_weight: float = 1.0  # 0 with a teacher: the KL alone
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
    for name in ("lr", "weight_decay", "grad_clip", "distill_weight", "lm_weight", "min_lr_ratio"):
        value = getattr(cfg, name)
        if value is not None and (not math.isfinite(value) or value < 0):
            raise GQAError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if cfg.distill_weight is not None and not cfg.teacher:
        raise GQAError("--distill-weight weighs the distillation loss, which needs a --teacher to distil from")
    if cfg.lm_weight == 0 and not cfg.teacher:
        raise GQAError("--lm-weight 0 leaves the distillation loss alone, which needs a --teacher to distil from")
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    alpha_tokens = None
    if cfg.alpha is not None:
        if cfg.pretrain_tokens is None:
            raise GQAError("--alpha needs --pretrain-tokens: α is a fraction of the tokens the model was pre-trained on")
        if not (math.isfinite(cfg.alpha) and cfg.alpha > 0 and math.isfinite(cfg.pretrain_tokens)
                and cfg.pretrain_tokens > 0):
            raise GQAError(f"--alpha and --pretrain-tokens must be finite and > 0, got {cfg.alpha} and {cfg.pretrain_tokens}")
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


def plan_pairs(plan: dict, cfg: TrainConfig, data) -> tuple[dict, list[int]]:
    """A run on input/target pairs counted in the target tokens its steps read (what the loss is taken over;
    padding is no token): (the plan, the tokens of each step). --alpha runs the steps that reach α ×
    --pretrain-tokens. Each step's examples are known before it runs (`BlockOrder` is seeded)."""
    lengths = (data.train.labels != -100).sum(-1).tolist()
    order, per_step = BlockOrder(len(lengths), cfg.seed), cfg.batch_size * cfg.grad_accum

    def step_tokens(step: int) -> int:
        return sum(lengths[order[i]] for i in range(step * per_step, (step + 1) * per_step))

    if cfg.steps is not None or plan["alpha_tokens"] is None:
        counts = [step_tokens(s) for s in range(plan["steps"])]
    else:
        counts, total = [], 0
        while total < plan["alpha_tokens"]:
            counts.append(step_tokens(len(counts)))
            total += counts[-1]
    tokens = sum(counts)
    return {**plan, "steps": len(counts), "tokens_per_step": round(tokens / len(counts)), "tokens": tokens,
            "tokens_counted": "target tokens of the pairs (padding excluded)",
            "alpha_effective": tokens / cfg.pretrain_tokens if cfg.pretrain_tokens else None}, counts


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
        name = device or default_device()
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
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def forward_batch(net, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) of a training batch: packed blocks [B, L + 1] of a decoder (next-token targets), or
    `seq2seq_data.Examples` of an encoder–decoder (teacher-forced targets, -100 where there is none)."""
    if isinstance(batch, Examples):
        logits = net(batch.input_ids, unwrap(net).shift_right(batch.labels), attention_mask=batch.input_mask)
        return logits, batch.labels
    return net(batch[:, :-1]), batch[:, 1:]


def unwrap(net) -> torch.nn.Module:
    return getattr(net, "module", getattr(net, "_orig_mod", net))


@torch.no_grad()
def validation_loss(model: torch.nn.Module, blocks, batch: int, device, autocast) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        with autocast():
            logits, targets = forward_batch(model, blocks[i : i + batch].to(device))
        total += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                 reduction="sum").item()
        count += int((targets != -100).sum())
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


def save_checkpoint(out: Path, step: int, model, *, optimizer, schedule, cfg: TrainConfig, d: Dist, tied: bool,
                    fingerprint: dict | None = None) -> None:
    """Model, optimizer, schedule and RNG at `step`, written atomically; the newest `keep_checkpoints` are kept."""
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
        write_json(tmp / "trainer.json", {"step": step, "config": asdict(cfg), "fingerprint": fingerprint})  # marks completion
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


def write_final_model(model: Transformer, out: Path, report: dict, source: str | None) -> None:
    """Write the model files and its card into OUT (which also holds train/): via a temporary folder, config.json
    last."""
    tmp = out / ".model.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    save(model, tmp, card=lambda folder: write_card(folder, source=source, step=training_step(report), name=out.name))
    names = sorted(p.name for p in tmp.iterdir())
    for name in [n for n in names if n != "config.json"] + ["config.json"]:
        os.replace(tmp / name, out / name)
    tmp.rmdir()


# ------------------------------------------------------------------------------------------- what a run is made of

RUN_DEFINING = ("seq_len", "batch_size", "grad_accum", "seed", "val_fraction", "distill_weight", "lm_weight")
# settings added after checkpoints existed, with the value every run before them had: written into a
# fingerprint only when they differ from it, so older checkpoints resume and default runs stay byte-identical
SINCE = {"lm_weight": 1.0}
DATA_DEFINING = ("seq_len", "val_fraction", "seed")  # these re-cut the data: its tokens differ with them


def run_fingerprint(cfg: TrainConfig, model: Transformer, data: TokenData, teacher: Transformer | None) -> dict:
    """What a checkpoint was trained from, part by part: the settings that fix which tokens each step reads and
    what it minimises (as values, so a refusal names the one that changed), the data's tokens, and the
    starting model's and the teacher's weights. The learning rate, schedule and the rest may change on a
    resume (a lower --lr after a divergence); these may not."""
    return {
        "settings": {name: getattr(cfg, name) for name in RUN_DEFINING
                     if name not in SINCE or getattr(cfg, name) != SINCE[name]},
        "data": tensors_digest(data_tensors(data)),
        "model": tensors_digest(model.state_dict()),
        "teacher": tensors_digest(teacher.state_dict()) if teacher is not None else None,
    }


def data_tensors(data) -> dict[str, torch.Tensor]:
    if isinstance(data.train, Examples):
        return {f"{side}.{name}": getattr(getattr(data, side), name) for side in ("train", "val")
                for name in ("input_ids", "input_mask", "labels")}
    return {"train": data.train, "val": data.val}


PARTS = {"data": "data (its tokens)", "model": "starting model (its weights)", "teacher": "teacher (its weights)"}


def changed_settings(saved, now: dict) -> list[str]:
    """The run-defining settings that differ from a checkpoint's, as '--name THEN (this run: NOW)'."""
    if not isinstance(saved, dict):  # an older gqa kept one digest of them all: which one differs is unknown
        return [] if saved == digest(now) else [f"settings ({', '.join(option(n) for n in RUN_DEFINING)})"]
    saved, now = ({n: d.get(n, SINCE.get(n)) for n in RUN_DEFINING} for d in (saved, now))  # omitted: SINCE's value
    return [f"{option(n)} {saved[n]} (this run: {now[n]})" for n in RUN_DEFINING if saved[n] != now[n]]


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_resume(path: Path, fingerprint: dict) -> None:
    """Refuse to continue a checkpoint trained from other inputs than this run's (see `run_fingerprint`),
    naming what differs: a setting by its value then and now; the data only where no setting re-cut it."""
    saved = json.loads((path / "trainer.json").read_text()).get("fingerprint")
    if saved is None:
        return warn(f"{path} was written by a gqa that recorded no fingerprint: cannot check it was trained from "
                    f"this run's model and data")
    settings = changed_settings(saved.get("settings"), fingerprint["settings"])
    recut = isinstance(saved.get("settings"), dict) and any(
        saved["settings"].get(n) != fingerprint["settings"][n] for n in DATA_DEFINING)
    parts = [PARTS[k] for k in PARTS if saved.get(k) != fingerprint[k] and not (k == "data" and recut)]
    if settings:
        raise GQAError(f"--resume: {path} was trained with {', '.join(settings)}"
                       f"{' and from another ' + ' and another '.join(parts) if parts else ''}; resume with the same "
                       f"settings, or start again with --overwrite")
    if parts:
        raise GQAError(f"--resume: {path} was trained from another {' and another '.join(parts)} than this run is "
                       f"given; resume with the same ones, or start again with --overwrite")


# ------------------------------------------------------------------------------------------- the run

def run_without_checkpoint(out: Path) -> bool:
    """OUT holds only what a run killed before its first checkpoint leaves (its log), and no model."""
    entries = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    if entries != {"train"} or latest_checkpoint(out) is not None:
        return False
    return {p.name for p in (out / "train").iterdir() if not p.name.startswith(".")} <= {"log.jsonl", "checkpoints"}


def prepare_out(cfg: TrainConfig) -> tuple[Path | None, str | None]:
    """Check OUT against --overwrite / --resume, writing nothing: (checkpoint to resume from, why the run
    starts again from step 0 although OUT holds one); raises where OUT must not be touched."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise GQAError(f"{out} is a file; give a folder for the run")
    fresh_again = out.is_dir() and run_without_checkpoint(out)
    if cfg.resume:
        ckpt = latest_checkpoint(out) if out.is_dir() else None
        if ckpt is not None:
            return ckpt, None
        if fresh_again:
            return None, f"{out} holds a run that stopped before its first checkpoint; starting it again from step 0"
        raise GQAError(f"--resume: no checkpoint in {checkpoint_dir(out)} to resume from; run without --resume")
    if out.is_dir() and any(out.iterdir()):
        if fresh_again:
            return None, f"{out} holds a run that stopped before its first checkpoint; starting it again from step 0"
        if not cfg.overwrite:
            raise GQAError(f"{out} already exists; pass --overwrite to replace it or --resume to continue its run")
    return None, None


def start_out(cfg: TrainConfig, d) -> tuple[Path | None, Path]:
    """`prepare_out`, then the main rank clears OUT for a run from step 0: (checkpoint to resume from, OUT)."""
    resume_from, restart = prepare_out(cfg)
    out = Path(cfg.out)
    if restart and d.main:
        warn(restart)
    if d.main and resume_from is None and out.exists():
        shutil.rmtree(out)
    d.barrier()
    return resume_from, out


class RunLog:
    """train/log.jsonl: a line per step, plus the evaluations. On resume, what the interrupted run logged past
    its checkpoint is dropped, so the log reads as one uninterrupted run."""

    def __init__(self, out: Path, main: bool, resumed_at: int | None):
        self.path, self.main = out / "train" / "log.jsonl", main
        if not main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resumed_at is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resumed_at]
            self.path.write_text("".join(line + "\n" for line in kept))
        else:
            self.path.write_text("")

    def __call__(self, record: dict) -> None:
        if self.main:
            append_jsonl(self.path, record)

    def first(self) -> dict:
        return json.loads(self.path.read_text().splitlines()[0])


def due(step: int, every: int | None) -> bool:
    return every is not None and step % every == 0


class Trainer:
    """One run's model, optimizer and schedule, and the step that advances them."""

    def __init__(self, model: Transformer, cfg: TrainConfig, plan: dict, *, d: Dist, device: torch.device,
                 teacher: Transformer | None, fingerprint: dict | None = None, step_tokens: list[int] | None = None):
        self.model, self.cfg, self.plan, self.d, self.device, self.teacher = model, cfg, plan, d, device, teacher
        # tokens read by each step (pairs differ in length: `plan_pairs`); else every step reads tokens_per_step
        self.step_tokens = step_tokens or [plan["tokens_per_step"]] * plan["steps"]
        self.tokens_after = list(itertools.accumulate(self.step_tokens))  # tokens read once step i is done
        self.fingerprint = fingerprint  # what the run is trained from (`run_fingerprint`), saved with checkpoints
        self.tied = model.config.tie_embeddings
        self.save_dtype = model.dtype  # the final model is written in the dtype it came in; training keeps fp32
        model.to(device=device, dtype=torch.float32).train()
        self.net = wrap(model, cfg.strategy, d, device)
        self.optimizer = torch.optim.AdamW(model.parameter_groups(cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                           fused=device.type == "cuda")
        steps = plan["steps"]
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, steps // 20)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, steps, warmup, cfg.min_lr_ratio))
        self.forward = torch.compile(self.net) if cfg.compile else self.net
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        self.peak_flops = peak * d.world if peak else None
        self.flops_per_token = model.flops_per_token(cfg.seq_len)

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def evaluate(self, val_blocks: torch.Tensor) -> float:
        return validation_loss(self.forward, val_blocks, max(1, self.cfg.batch_size // self.d.world), self.device,
                               self.autocast)

    def losses(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """LM loss and, with a teacher, KL(teacher ‖ student) of one micro-batch."""
        with self.autocast():
            logits, targets = forward_batch(self.forward, batch)
        lm = lm_loss(logits, targets)
        if self.teacher is None:
            return lm, None
        with torch.no_grad(), self.autocast():
            teacher_logits, _ = forward_batch(self.teacher, batch)
        return lm, mean_kl(logits, teacher_logits, targets)

    def step(self, step: int, data: TokenData, order: BlockOrder) -> dict:
        """One optimizer step over grad_accum micro-batches; refuses to apply a non-finite one."""
        cfg, d = self.cfg, self.d
        per_rank = cfg.batch_size // d.world
        t0 = time.time()
        lm_sum, kl_sum = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            first = (step * cfg.grad_accum + micro) * cfg.batch_size + d.rank * per_rank
            blocks = order.batch(data.train, first, per_rank).to(self.device)
            last = micro == cfg.grad_accum - 1
            sync = self.net.no_sync() if d.world > 1 and cfg.strategy == "ddp" and not last else contextlib.nullcontext()
            with sync:
                lm, kl = self.losses(blocks)
                lm_sum += lm.detach()
                loss = cfg.lm_weight * lm + (0 if kl is None else cfg.distill_weight * kl)
                if kl is not None:
                    kl_sum += kl.detach()
                (loss / cfg.grad_accum).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        loss_value = d.mean(lm_sum / cfg.grad_accum).item()
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            self.diverged(step + 1, loss_value, grad_norm)
        lr = self.schedule.get_last_lr()[0]
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens_per_s = self.step_tokens[step] / (time.time() - t0)
        record = {"step": step + 1, "tokens": self.tokens_after[step], "loss": loss_value, "lr": lr,
                  "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
        if self.teacher is not None:
            record["kl"] = d.mean(kl_sum / cfg.grad_accum).item()
        if self.peak_flops:
            record["mfu"] = tokens_per_s * self.flops_per_token / self.peak_flops
        return record

    def diverged(self, step: int, loss: float, grad_norm: float) -> None:
        ckpt = latest_checkpoint(Path(self.cfg.out))
        kept = f"the last good checkpoint is {ckpt} (--resume continues from it)" if ckpt else "no checkpoint was written yet"
        raise GQAError(f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; the step was not "
                       f"applied and training stopped; {kept}; try a lower --lr")

    def checkpoint(self, step: int) -> None:
        save_checkpoint(Path(self.cfg.out), step, self.net, optimizer=self.optimizer, schedule=self.schedule,
                        cfg=self.cfg, d=self.d, tied=self.tied, fingerprint=self.fingerprint)

    def restore(self, path: Path | None) -> int:
        """Continue from the checkpoint at `path` (checked to come from the same inputs), with this run's
        optimizer settings: the checkpoint's state, this command's --lr, --weight-decay and schedule."""
        if path is None:
            return 0
        check_resume(path, self.fingerprint)
        step = load_checkpoint(path, self.net, self.optimizer, self.schedule, self.tied)
        self.schedule.base_lrs = [self.cfg.lr] * len(self.optimizer.param_groups)
        at = self.schedule.last_epoch
        lrs = [base * lambda_(at) for base, lambda_ in zip(self.schedule.base_lrs, self.schedule.lr_lambdas)]
        for group, lr, decay in zip(self.optimizer.param_groups, lrs, (self.cfg.weight_decay, 0.0)):
            group.update(lr=lr, initial_lr=self.cfg.lr, weight_decay=decay, betas=self.cfg.betas)
        self.schedule._last_lr = lrs
        return step

    def final_model(self) -> Transformer | None:
        """The trained model, gathered on rank 0 in the dtype it came in (None on other ranks)."""
        model_state, _ = full_state(self.net, self.optimizer)  # collective
        if not self.d.main:
            return None
        if self.tied:
            model_state.setdefault("output.weight", model_state["tok_embeddings.weight"])
        final = type(self.model)(self.model.config)
        final.load_state_dict(model_state)
        final.tie_weights()
        final.hf_config, final.source_dir = self.model.hf_config, self.model.source_dir
        return final.to(self.save_dtype).eval()


def settle(cfg: TrainConfig, model: Transformer, d: Dist) -> TrainConfig:
    """The run's own copy of the config, with defaults that depend on the model filled in, checked against
    the model and the ranks (the caller's config is not changed)."""
    kind = kind_of(model)
    cfg = replace(cfg, seq_len=cfg.seq_len if cfg.seq_len is not None else kind.default_seq_len(model.config, cfg.data))
    if cfg.batch_size % d.world:
        raise GQAError(f"--batch-size {cfg.batch_size} does not split over {d.world} ranks")
    kind.check_seq_len(model.config, cfg.seq_len, cfg.data)
    if cfg.teacher:
        if model.source_dir is None:
            raise GQAError("distilling needs to know the student's tokenizer: set model.source_dir to its folder")
        check_reference(model.source_dir, model.config, cfg.teacher, "teacher", cfg.seq_len)
        cfg = replace(cfg, distill_weight=0.5 if cfg.distill_weight is None else cfg.distill_weight)
    return cfg


def training_data(cfg: TrainConfig, tokenizer, model: Transformer, data: TokenData | None) -> TokenData:
    """The run's blocks (a decoder) or examples (an encoder–decoder: pairs, or span-corrupted text)."""
    kind = kind_of(model)
    if data is None:
        data = kind.prepare_data(cfg.data, tokenizer, cfg.seq_len, cfg.val_fraction, cfg.seed)
    elif data.seq_len != cfg.seq_len:
        raise GQAError(f"prepared data has blocks of {data.seq_len} tokens, the run asks for {cfg.seq_len}")
    kind.check_token_ids(data, model.config.vocab_size, str(cfg.data))
    return data


def conversion_source(model_dir: str | os.PathLike) -> str | None:
    """The source a gqa conversion names in the folder's conversion.json, if that folder is still there (the
    default teacher for uptraining it); None for a folder gqa did not convert."""
    report = Path(model_dir) / "conversion.json"
    if not report.is_file():
        return None
    try:
        source = json.loads(report.read_text()).get("source")
    except (json.JSONDecodeError, AttributeError):
        return None
    if not source:
        return None
    if not (Path(source) / "config.json").is_file():
        warn(f"{report} names the source {source}, which is not there any more: uptraining without a teacher "
             f"(pass --teacher to distil from another copy of it)")
        return None
    return source


def load_teacher(cfg: TrainConfig, model: Transformer, device: torch.device) -> Transformer | None:
    if not cfg.teacher:
        return None
    teacher = load(cfg.teacher, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device)
    return teacher.requires_grad_(False)  # checked against the student by `settle`


def train(model: Transformer, tokenizer, cfg: TrainConfig, init_path: str | None = None,
          data: TokenData | None = None) -> dict:
    """Train `model` (already loaded) on cfg.data; returns the run's report. Call on every rank under torchrun.

    `data` may be given already prepared (the demo tokenizes its corpus once for many runs).
    """
    d, device = init_distributed(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    cfg = settle(cfg, model, d)
    plan = plan_steps(cfg)
    resume_from, out = start_out(cfg, d)
    data = training_data(cfg, tokenizer, model, data)
    plan, step_tokens = plan_pairs(plan, cfg, data) if getattr(data, "objective", None) == "pairs" else (plan, None)
    teacher = load_teacher(cfg, model, device)
    fingerprint = run_fingerprint(cfg, model, data, teacher) if resume_from or cfg.save_every else None
    trainer = Trainer(model, cfg, plan, d=d, device=device, teacher=teacher, fingerprint=fingerprint,
                      step_tokens=step_tokens)
    start = trainer.restore(resume_from)
    log = RunLog(out, d.main, start if resume_from else None)
    val_blocks = data.val[: cfg.eval_blocks]
    initial_val = val_loss = None
    if start == 0:
        initial_val = val_loss = trainer.evaluate(val_blocks)
        log({"step": 0, "tokens": 0, "val_loss": initial_val, "val_perplexity": math.exp(initial_val)})
    order = BlockOrder(len(data.train), cfg.seed)
    step_delay = float(os.environ.get("GQA_TEST_STEP_DELAY", "0"))  # test hook: slows steps so a test can kill mid-run
    bar = tqdm(range(start, plan["steps"]), initial=start, total=plan["steps"], desc="training",
               disable=not (cfg.progress and d.main))
    record: dict = {}
    for step in bar:
        record = trainer.step(step, data, order)
        if due(step + 1, cfg.eval_every) or step + 1 == plan["steps"]:
            val_loss = trainer.evaluate(val_blocks)
            record.update(val_loss=val_loss, val_perplexity=math.exp(val_loss))
        log(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}", lr=f"{record['lr']:.2e}")
        if due(step + 1, cfg.save_every) and step + 1 < plan["steps"]:
            trainer.checkpoint(step + 1)
        if step_delay:
            time.sleep(step_delay)
    report = {
        **plan, "source": init_path, "data": str(cfg.data), "documents": data.documents,
        "train_tokens_available": data.train_tokens, "val_tokens": int(val_blocks.numel()),
        "val_loss_initial": initial_val if initial_val is not None else log.first().get("val_loss") if d.main else None,
        "val_loss": val_loss, "val_perplexity": math.exp(val_loss) if val_loss is not None else None,
        "final_loss": record.get("loss"), "world_size": d.world,
        "strategy": cfg.strategy if d.world > 1 else "single", "config": asdict(cfg),
    }
    final = trainer.final_model()
    if d.main:
        write_final_model(final, out, report, init_path)
        write_json(out / "train" / "report.json", report)
    d.barrier()
    return report
