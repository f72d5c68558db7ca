"""The joint stage: the converted model's attention trained end to end against the source's predictions.

Layer-wise transfer fits each layer's attention alone, so what every layer keeps of its error compounds
through the ones above it. This stage trains all attention weights together (W_q, the shared W_k / W_v,
W_o, their biases and q/k norms; embeddings, MLPs and the other norms frozen) on KL(source ‖ converted) of
the next-token distributions over the calibration blocks, the source running beside it as the teacher.
Adam with each tensor's step size relative to its projection's weight scale (as in transfer), a short
warm-up and cosine decay; the batch of step s is drawn from a generator seeded by (seed, s), and the
optimizer is checkpointed every `save_every` steps, so a killed run resumes to the same bytes. If the KL on
the first calibration blocks did not go down, the model is kept as the layer loop left it.

Unlike the layer loop it holds two whole models (the converted one in float32 with its gradients, the
source in float32): meant for models that fit twice in memory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import GQAError
from ..fingerprint import digest
from .transfer import relative_groups

EVAL_BLOCKS = 8  # calibration blocks the before / after KL is measured on


@dataclass(frozen=True)
class JointSettings:
    steps: int = 0
    lr: float = 0.005  # relative to each projection's weight RMS (SmolLM2 -> MQA: 0.005 measured best of 0.002-0.02)
    batch_blocks: int = 4
    save_every: int = 10
    seed: int = 0

    def check(self) -> None:
        if self.steps < 0:
            raise GQAError(f"--joint-steps must be >= 0, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise GQAError(f"--joint-lr must be a finite number > 0, got {self.lr}")


def attention_parameters(model) -> list[dict]:
    """Adam groups for every layer's attention (everything else frozen)."""
    model.requires_grad_(False)
    groups = []
    for layer in model.layers:
        layer.attention.requires_grad_(True)
        groups += relative_groups(layer.attention, 1.0)  # lr set per step: relative scale x the schedule
    for g in groups:
        g["scale"] = g.pop("lr")
    return groups


def lr_at(step: int, settings: JointSettings) -> float:
    warmup = max(1, settings.steps // 20)
    return settings.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / settings.steps)))


def kl(teacher, student, x: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per token of the next-token distributions on blocks x [B, T]."""
    with torch.no_grad():
        target = F.log_softmax(teacher(x).float(), -1).flatten(0, 1)
    return F.kl_div(F.log_softmax(student(x).float(), -1).flatten(0, 1), target, log_target=True,
                    reduction="batchmean")


@torch.no_grad()
def held_kl(teacher, student, blocks: torch.Tensor) -> float:
    x = blocks[:EVAL_BLOCKS, :-1]
    return sum(float(kl(teacher, student, x[i:i + 2])) * len(x[i:i + 2]) for i in range(0, len(x), 2)) / len(x)


def attention_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".attention." in k}


def train(teacher, student, blocks: torch.Tensor, settings: JointSettings, resume, fingerprint: str,
          progress: bool = True) -> dict:
    """Train `student`'s attention in place (see the module docstring); returns the stage's record."""
    groups = attention_parameters(student)
    optimizer = torch.optim.Adam(groups)
    teacher.eval()
    before = held_kl(teacher, student, blocks)
    untouched = attention_state(student)
    start = 0
    saved = resume.get_joint(fingerprint) if resume else None
    if saved is not None:
        start, tensors, optimizer_state = saved
        student.load_state_dict(tensors, strict=False)
        optimizer.load_state_dict(optimizer_state)
    batch = min(settings.batch_blocks, len(blocks))
    student.train()
    for step in tqdm(range(start, settings.steps), initial=start, total=settings.steps, desc="joint stage",
                     unit="step", disable=not progress):
        index = torch.randint(len(blocks), (batch,), generator=torch.Generator().manual_seed(
            settings.seed * 1_000_003 + step))
        loss = kl(teacher, student, blocks[index, :-1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for g in optimizer.param_groups:
            g["lr"] = g["scale"] * lr_at(step, settings)
        optimizer.step()
        if resume and (step + 1) % settings.save_every == 0 and step + 1 < settings.steps:
            resume.put_joint(fingerprint, step + 1, attention_state(student), optimizer.state_dict())
    student.eval().requires_grad_(False)
    after = held_kl(teacher, student, blocks)
    record = {**asdict(settings), "kl_before": before, "kl_after": after}
    if after >= before:  # never leaves the model further from the source than the layer loop did
        student.load_state_dict(untouched, strict=False)
        record.update(kl_after=before, kept="layer loop")
    return record


def stage_fingerprint(chain: str, settings: JointSettings) -> str:
    return digest(chain, asdict(settings))
