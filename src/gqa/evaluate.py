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
def perplexity(model: Transformer, tokens: torch.Tensor, seq_len: int | None = None, batch_size: int = 8) -> dict:
    """Perplexity of a token stream, scored in non-overlapping windows of seq_len tokens.

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
    total_nll, total_tokens = 0.0, 0
    for i in range(0, len(chunks), batch_size):
        group = chunks[i : i + batch_size]
        width = max(c.numel() for c in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.bool)
        for b, c in enumerate(group):
            ids[b, : c.numel()], mask[b, : c.numel()] = c, True
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model(ids, attention_mask=None if bool(mask.all()) else mask)
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=-100)
        total_nll += nll.item()
        total_tokens += int(mask[:, 1:].sum())
    loss = total_nll / total_tokens
    return {"perplexity": math.exp(loss), "loss": loss, "tokens": total_tokens}


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
