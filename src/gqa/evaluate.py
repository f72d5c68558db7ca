"""Quality and cost of a model: perplexity on text, agreement with a teacher, KV bytes per token."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import GQAError
from .model import Transformer


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of the next-token distributions at each position, [...] of logits [..., vocab]."""
    log_p, log_q = F.log_softmax(teacher_logits.float(), -1), F.log_softmax(student_logits.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def mean_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor | None = None):
    """KL(teacher ‖ student) per token, averaged over the tokens that have a target (all, without targets): the
    distillation loss of uptraining and of the joint stage."""
    log_s = F.log_softmax(student_logits.float().flatten(0, 1), dim=-1)
    log_t = F.log_softmax(teacher_logits.float().flatten(0, 1), dim=-1)
    if targets is not None and bool((targets == -100).any()):
        keep = targets.flatten() != -100
        log_s, log_t = log_s[keep], log_t[keep]
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


class Scores:
    """Sums over the scored positions of a run of batches: NLL, tokens, and against a reference, top-1
    agreement and KL(reference ‖ model)."""

    def __init__(self) -> None:
        self.nll = self.kl = 0.0
        self.tokens = self.agree = 0
        self.compared = False

    def add(self, logits: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """logits [B, T, vocab] (float), targets [B, T] (-100: not scored), the reference's logits [B, T, vocab]."""
        scored = targets != -100
        self.nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=-100).item()
        self.tokens += int(scored.sum())
        if reference is not None:
            self.compared = True
            self.agree += int(((logits.argmax(-1) == reference.argmax(-1)) & scored).sum())
            self.kl += float((token_kl(reference, logits) * scored).sum())

    def result(self) -> dict:
        if self.tokens == 0:
            raise GQAError("no target tokens to score")
        loss = self.nll / self.tokens
        out = {"loss": loss, "perplexity": math.exp(loss), "tokens": self.tokens}
        if self.compared:
            out.update(top1_agreement=self.agree / self.tokens, kl=self.kl / self.tokens)
        return out


def windows(tokens: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Non-overlapping windows of at most seq_len tokens; a last window shorter than 2 tokens is dropped."""
    out = [tokens[i : i + seq_len] for i in range(0, tokens.numel(), seq_len)]
    return [w for w in out if w.numel() >= 2]


@torch.inference_mode()
def perplexity(model: Transformer, tokens: torch.Tensor, seq_len: int | None = None, batch_size: int = 8,
               reference: Transformer | None = None) -> dict:
    """Perplexity of a token stream, scored in non-overlapping windows of seq_len tokens; with a reference
    model, also the top-1 agreement with it and KL(reference ‖ model) per predicted token.

    Each window's first token has no context and is not scored, so `tokens` counts the predicted ones.
    """
    seq_len = seq_len or min(model.config.max_positions, 1024)
    if seq_len > model.config.max_positions:
        raise GQAError(f"--seq-len {seq_len} exceeds the model's {model.config.max_positions} positions")
    if seq_len < 2:
        raise GQAError("--seq-len must be at least 2")
    chunks = windows(tokens.flatten(), seq_len)
    if not chunks:
        raise GQAError("the text has fewer than 2 tokens; nothing to score")
    scores = Scores()
    for i in range(0, len(chunks), batch_size):
        ids, mask = padded(chunks[i : i + batch_size], model.device)
        logits = model(ids, attention_mask=None if bool(mask.all()) else mask)[:, :-1].float()
        ref = None
        if reference is not None:
            ref = reference(ids.to(reference.device), attention_mask=None if bool(mask.all()) else mask)[:, :-1]
            ref = ref.float().to(logits.device)
        scores.add(logits, ids[:, 1:].masked_fill(~mask[:, 1:], -100), ref)
    out = scores.result()
    return {"perplexity": out.pop("perplexity"), **out}  # eval --json has always led with it


def padded(chunks: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of different lengths as right-padded ids [B, max] and their mask."""
    width = max(c.numel() for c in chunks)
    ids = torch.zeros(len(chunks), width, dtype=torch.long)
    mask = torch.zeros(len(chunks), width, dtype=torch.bool)
    for b, c in enumerate(chunks):
        ids[b, : c.numel()], mask[b, : c.numel()] = c, True
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def compare_blocks(model: Transformer, blocks: torch.Tensor, teacher: Transformer | None = None, batch_size: int = 16) -> dict:
    """Validation loss / perplexity of `model` on packed blocks [n, seq_len + 1], and, given a teacher, the
    fraction of positions where both predict the same next token (top-1 agreement) and KL(teacher ‖ model)."""
    scores = Scores()
    for i in range(0, len(blocks), batch_size):
        chunk = blocks[i : i + batch_size].to(model.device)
        x = chunk[:, :-1]
        ref = None if teacher is None else teacher(x.to(teacher.device)).float().to(model.device)
        scores.add(model(x).float(), chunk[:, 1:], ref)
    return scores.result()


def seq2seq_logits(model, batch) -> torch.Tensor:
    """Teacher-forced decoder logits of an encoder–decoder on a batch of `seq2seq_data.Examples`."""
    decoder_ids = model.shift_right(batch.labels)
    return model(batch.input_ids, decoder_ids, attention_mask=batch.input_mask).float()


@torch.inference_mode()
def compare_examples(model, examples, teacher=None, batch_size: int = 16) -> dict:
    """Loss / perplexity per target token of an encoder–decoder on input/target examples (the way
    transformers' `labels=` scores them), and, given a teacher, top-1 agreement and KL(teacher ‖ model)
    over the target positions."""
    scores = Scores()
    for i in range(0, len(examples), batch_size):
        batch = examples[i : i + batch_size].to(model.device)
        ref = None if teacher is None else seq2seq_logits(teacher, batch.to(teacher.device)).to(model.device)
        scores.add(seq2seq_logits(model, batch), batch.labels, ref)
    return scores.result()
