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
source in float32): meant for models that fit twice in memory. An encoder–decoder trains its decoder's
self- and cross-attention (and its encoder's, where that was grouped) on the target-side distributions of
span-corrupted calibration examples, given as (input ids, decoder ids).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..errors import GQAError
from ..evaluate import mean_kl
from ..fingerprint import digest
from ..kinds import kind_of
from .transfer import ramped_cosine, relative_groups

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


def attention_parameters(model, modules: dict[str, torch.nn.Module]) -> list[dict]:
    """Adam groups for the attention `modules` of `model` (everything else frozen)."""
    model.requires_grad_(False)
    groups = []
    for module in modules.values():
        module.requires_grad_(True)
        groups += relative_groups(module, 1.0)  # lr set per step: relative scale x the schedule
    for g in groups:
        g["scale"] = g.pop("lr")
    return groups


def kl(teacher, student, batch) -> torch.Tensor:
    """KL(teacher ‖ student) per token of the next-token distributions on a batch (`ModelKind.batch_inputs`)."""
    kind = kind_of(student)
    with torch.no_grad():
        target = kind.logits(teacher, batch)
    return mean_kl(kind.logits(student, batch), target)


@torch.no_grad()
def held_kl(teacher, student, blocks) -> float:
    kind = kind_of(student)
    n = min(EVAL_BLOCKS, kind.n_blocks(blocks))
    return sum(float(kl(teacher, student, kind.batch_inputs(blocks, slice(i, min(i + 2, n))))) * (min(i + 2, n) - i)
               for i in range(0, n, 2)) / n


def attention_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The trained tensors, by their names in the model's state dict."""
    return {f"{prefix}.{name}": p.detach().clone() for prefix, module in modules.items()
            for name, p in module.named_parameters()}


def train(teacher, student, blocks, settings: JointSettings, *, resume, fingerprint: str, progress: bool = True) -> dict:
    """Train `student`'s attention in place (see the module docstring); returns the stage's record. blocks:
    a decoder's calibration blocks [N, T + 1], or an encoder–decoder's (input ids, decoder ids)."""
    kind = kind_of(student)
    modules = kind.attention_modules(student, teacher)
    optimizer = torch.optim.Adam(attention_parameters(student, modules))
    teacher.eval()
    before = held_kl(teacher, student, blocks)
    untouched = attention_state(modules)
    start = 0
    saved = resume.get_joint(fingerprint) if resume else None
    if saved is not None:
        start, tensors, optimizer_state = saved
        student.load_state_dict(tensors, strict=False)
        optimizer.load_state_dict(optimizer_state)
    batch = min(settings.batch_blocks, kind.n_blocks(blocks))
    student.train()
    for step in tqdm(range(start, settings.steps), initial=start, total=settings.steps, desc="joint stage",
                     unit="step", disable=not progress):
        index = torch.randint(kind.n_blocks(blocks), (batch,), generator=torch.Generator().manual_seed(
            settings.seed * 1_000_003 + step))
        loss = kl(teacher, student, kind.batch_inputs(blocks, index))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for g in optimizer.param_groups:
            g["lr"] = g["scale"] * (settings.lr * ramped_cosine(step, settings.steps))
        optimizer.step()
        if resume and (step + 1) % settings.save_every == 0 and step + 1 < settings.steps:
            resume.put_joint(fingerprint, step + 1, attention_state(modules), optimizer.state_dict())
    student.eval().requires_grad_(False)
    after = held_kl(teacher, student, blocks)
    record = {**asdict(settings), "kl_before": before, "kl_after": after}
    if after >= before:  # never leaves the model further from the source than the layer loop did
        student.load_state_dict(untouched, strict=False)
        record.update(kl_after=before, kept="layer loop")
    return record


def stage_fingerprint(chain: str, settings: JointSettings) -> str:
    return digest(chain, asdict(settings))
