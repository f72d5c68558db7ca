"""Quality and cost of a model: perplexity on text, agreement with a teacher, KV bytes per token."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import GQAError
from .model import Transformer


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
    total = {"nll": 0.0, "tokens": 0, "agree": 0, "kl": 0.0}
    for i in range(0, len(chunks), batch_size):
        ids, mask = padded(chunks[i : i + batch_size], model.device)
        logits = model(ids, attention_mask=None if bool(mask.all()) else mask)[:, :-1].float()
        scored = mask[:, 1:]
        targets = ids[:, 1:].masked_fill(~scored, -100)
        total["nll"] += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=-100).item()
        total["tokens"] += int(scored.sum())
        if reference is not None:
            ref = reference(ids.to(reference.device), attention_mask=None if bool(mask.all()) else mask)[:, :-1]
            ref = ref.float().to(logits.device)
            total["agree"] += int(((logits.argmax(-1) == ref.argmax(-1)) & scored).sum())
            log_p, log_q = F.log_softmax(ref, -1), F.log_softmax(logits, -1)
            total["kl"] += float(((log_p.exp() * (log_p - log_q)).sum(-1) * scored).sum())
    loss = total["nll"] / total["tokens"]
    out = {"perplexity": math.exp(loss), "loss": loss, "tokens": total["tokens"]}
    if reference is not None:
        out.update(top1_agreement=total["agree"] / total["tokens"], kl=total["kl"] / total["tokens"])
    return out


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
    nll = kl = 0.0
    agree = count = 0
    for i in range(0, len(blocks), batch_size):
        chunk = blocks[i : i + batch_size].to(model.device)
        x, y = chunk[:, :-1], chunk[:, 1:]
        logits = model(x).float()
        nll += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
        if teacher is not None:
            ref = teacher(x.to(teacher.device)).float().to(logits.device)
            agree += (logits.argmax(-1) == ref.argmax(-1)).sum().item()
            log_p, log_q = F.log_softmax(ref, -1), F.log_softmax(logits, -1)
            kl += (log_p.exp() * (log_p - log_q)).sum().item()
    out = {"loss": nll / count, "perplexity": math.exp(nll / count), "tokens": count}
    if teacher is not None:
        out.update(top1_agreement=agree / count, kl=kl / count)
    return out


def seq2seq_logits(model, batch) -> torch.Tensor:
    """Teacher-forced decoder logits of an encoder–decoder on a batch of `seq2seq_data.Examples`."""
    decoder_ids = model.shift_right(batch.labels)
    return model(batch.input_ids, decoder_ids, attention_mask=batch.input_mask).float()


@torch.inference_mode()
def compare_examples(model, examples, teacher=None, batch_size: int = 16) -> dict:
    """Loss / perplexity per target token of an encoder–decoder on input/target examples (the way
    transformers' `labels=` scores them), and, given a teacher, top-1 agreement and KL(teacher ‖ model)
    over the target positions."""
    nll = kl = 0.0
    agree = count = 0
    for i in range(0, len(examples), batch_size):
        batch = examples[i : i + batch_size].to(model.device)
        logits = seq2seq_logits(model, batch)
        scored = batch.labels != -100
        nll += F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100, reduction="sum").item()
        count += int(scored.sum())
        if teacher is not None:
            ref = seq2seq_logits(teacher, batch.to(teacher.device)).to(logits.device)
            agree += int(((logits.argmax(-1) == ref.argmax(-1)) & scored).sum())
            log_p, log_q = F.log_softmax(ref, -1), F.log_softmax(logits, -1)
            kl += float(((log_p.exp() * (log_p - log_q)).sum(-1) * scored).sum())
    if count == 0:
        raise GQAError("no target tokens to score")
    out = {"loss": nll / count, "perplexity": math.exp(nll / count), "tokens": count}
    if teacher is not None:
        out.update(top1_agreement=agree / count, kl=kl / count)
    return out
