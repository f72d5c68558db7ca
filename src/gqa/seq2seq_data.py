"""Encoder–decoder data: input/target pairs, and T5's span corruption of plain text.

- Pairs: JSON Lines of {"input": ..., "target": ...}. Each side is encoded as the folder's tokenizer encodes
  it, with the end-of-sequence token appended where the tokenizer does not end with it, so a pair scores as
  transformers scores `model(input_ids=ids(input) + [eos], labels=ids(target) + [eos])`: the loss per
  target token, eos included.
- Text (any source `gqa.data` reads): each side of the document-hash split is tokenized into one stream,
  cut into blocks of `seq_len` tokens, and each block is span-corrupted (T5's objective): about 15 % of
  its tokens, in spans of mean length 3, are cut out; the input keeps the rest with a sentinel in each
  gap, the target lists the sentinels each followed by what it replaced. Sentinels are the tokenizer's
  `<extra_id_N>` tokens (T5's); a tokenizer with a mask token but no sentinels (BART's) gets BART's text
  infilling instead: one mask per gap in the input, the whole block as the target. The corruption of
  block i is drawn from (seed, i), so it is the same in every run and every evaluation.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import is_validation, jsonl_rows, read_documents, read_text, tokenize
from .errors import GQAError, warn

NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0


@dataclass
class Examples:
    """Padded encoder inputs and labels (-100 where there is no target token)."""
    input_ids: torch.Tensor  # [N, S]
    input_mask: torch.Tensor  # [N, S] bool
    labels: torch.Tensor  # [N, T]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index) -> Examples:
        return Examples(self.input_ids[index], self.input_mask[index], self.labels[index])

    def numel(self) -> int:
        """Target tokens (what the loss is taken over)."""
        return int((self.labels != -100).sum())

    def to(self, device) -> Examples:
        return Examples(self.input_ids.to(device), self.input_mask.to(device), self.labels.to(device))

    def max_id(self) -> int:
        return max(int(self.input_ids.max()), int(self.labels.max())) if len(self) else -1


@dataclass
class Seq2SeqData:
    train: Examples
    val: Examples
    documents: int
    train_tokens: int
    val_tokens: int
    objective: str  # "pairs" | "span corruption" | "text infilling"
    seq_len: int


def with_eos(ids: list[int], eos: int) -> list[int]:
    return ids if ids and ids[-1] == eos else [*ids, eos]


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def examples(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> Examples:
    if not pairs:
        return Examples(torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.bool),
                        torch.zeros(0, 1, dtype=torch.long))
    inputs = pad([p[0] for p in pairs], pad_id)
    mask = pad([[1] * len(p[0]) for p in pairs], 0).bool()
    return Examples(inputs, mask, pad([p[1] for p in pairs], -100))


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """(input, target) strings of a JSON Lines file, each line checked."""
    rows = []
    for i, row in jsonl_rows(path):
        if not isinstance(row, dict):
            raise GQAError(f"{path}:{i} is not a JSON object with 'input' and 'target'")
        for key in ("input", "target"):
            if not isinstance(row.get(key), str):
                raise GQAError(f"{path}:{i} has no string field {key!r} (a pair is {{\"input\": ..., \"target\": ...}})")
        rows.append((row["input"], row["target"]))
    if not rows:
        raise GQAError(f"{path} holds no pairs")
    return rows


def is_pairs(source) -> bool:
    """A .jsonl file whose first line has an 'input' field (text files carry 'text')."""
    path = Path(str(source))
    if path.suffix.lower() not in (".jsonl", ".json") or not path.is_file():
        return False
    first = next((line for line in read_text(path).splitlines() if line.strip()), "")
    try:
        return "input" in json.loads(first)
    except (json.JSONDecodeError, TypeError):
        return False


def example_length(seq_len: int, pairs: bool) -> int:
    """The longest input or target of examples made with `seq_len`: a pair's sides are cut to seq_len tokens,
    eos included; a span-corrupted block's input, and a text-infilled block's target, hold the block + eos."""
    return seq_len if pairs else seq_len + 1


def default_seq_len(config, pairs: bool, most: int = 512) -> int:
    """The block length (or pair cut) when none is given: at most `most`, and within learned positions."""
    if config.positions != "learned":
        return min(most, config.max_positions)
    return min(most, config.max_positions - example_length(0, pairs))


def check_seq_len(config, seq_len: int, pairs: bool, option: str = "--seq-len") -> None:
    """Learned positions (BART) end at the table's size: refuse a length whose examples would not fit, before
    any model runs (T5's relative position bias has no end)."""
    longest = example_length(seq_len, pairs)
    if config.positions == "learned" and longest > config.max_positions:
        what = "pairs cut to" if pairs else "blocks of"
        fits = config.max_positions - example_length(0, pairs)
        plus = "" if pairs else f" (the block plus eos: {longest} tokens)"
        raise GQAError(f"{option} {seq_len}: {what} {seq_len} tokens{plus} exceed the model's {config.max_positions} "
                       f"learned positions; pass {option} {fits} or less")


def encode_pairs(rows: list[tuple[str, str]], tokenizer, seq_len: int, source) -> list[tuple[list[int], list[int]]]:
    """Each side of each pair as token ids ending in eos, cut to seq_len tokens (with a warning naming how
    many were cut: a cut target is scored and trained on its beginning only)."""
    eos, cut = tokenizer.eos_token_id, {"input": 0, "target": 0}
    pairs = []
    for a, b in rows:
        sides = []
        for side, text in (("input", a), ("target", b)):
            ids = with_eos(tokenizer(text)["input_ids"], eos)
            if len(ids) > seq_len:
                cut[side] += 1
                ids = [*ids[:seq_len - 1], eos]
            sides.append(ids)
        pairs.append((sides[0], sides[1]))
    if any(cut.values()):
        which = " and ".join(f"{n} {side}{'s' if n > 1 else ''}" for side, n in cut.items() if n)
        warn(f"{source}: {which} of {len(rows)} pairs are longer than --seq-len {seq_len} tokens (eos included) and "
             f"were cut to it; pass a larger --seq-len to read them whole")
    return pairs


def sentinels(tokenizer) -> tuple[str, list[int]]:
    """The objective text is corrupted with, and its marker ids (see the module docstring)."""
    vocab = tokenizer.get_vocab()
    extra = sorted((int(t[len("<extra_id_"):-1]), i) for t, i in vocab.items()
                   if t.startswith("<extra_id_") and t.endswith(">") and t[len("<extra_id_"):-1].isdigit())
    if extra:
        return "span corruption", [i for _, i in extra]
    if tokenizer.mask_token_id is not None:
        return "text infilling", [tokenizer.mask_token_id]
    raise GQAError("span corruption needs sentinel tokens (<extra_id_0>, ... as T5's tokenizer has) or a mask token "
                   "(BART's); this tokenizer has neither: give input/target pairs (.jsonl) instead")


def segments(n: int, k: int, rng: random.Random) -> list[int]:
    """A random partition of n items into k non-empty segments (T5's random_segmentation)."""
    cuts = sorted(rng.sample(range(1, n), k - 1)) if k > 1 else []
    return [b - a for a, b in zip([0, *cuts], [*cuts, n])]


def corrupt(block: list[int], rng: random.Random, objective: str, markers: list[int], eos: int):
    """(input, target) of one block of tokens (see the module docstring)."""
    n = len(block)
    noise = min(max(round(n * NOISE_DENSITY), 1), n - 1)
    spans = max(min(round(noise / MEAN_SPAN), noise, n - noise, len(markers) if objective == "span corruption"
                    else n), 1)
    noise_lengths, keep_lengths = segments(noise, spans, rng), segments(n - noise, spans, rng)
    inputs, targets, at = [], [], 0
    for j, (keep, cut) in enumerate(zip(keep_lengths, noise_lengths)):
        inputs += block[at:at + keep]
        at += keep
        marker = markers[j] if objective == "span corruption" else markers[0]
        inputs.append(marker)
        if objective == "span corruption":
            targets += [marker, *block[at:at + cut]]
        at += cut
    if objective == "text infilling":
        targets = list(block)
    return inputs + [eos], targets + [eos]


def text_examples(docs: list[str], tokenizer, seq_len: int, seed: int, first_index: int,
                  stream: list[int] | None = None) -> tuple[Examples, int]:
    objective, markers = sentinels(tokenizer)
    stream = tokenize(docs, tokenizer).tolist() if stream is None else stream
    blocks = [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    pairs = [corrupt(b, random.Random(seed * 1_000_003 + first_index + i), objective, markers, tokenizer.eos_token_id)
             for i, b in enumerate(blocks)]
    return examples(pairs, tokenizer.pad_token_id or 0), len(stream)


def prepare_seq2seq(source, tokenizer, seq_len: int, val_fraction: float = 0.05, seed: int = 0,
                    length_option: str = "--seq-len") -> Seq2SeqData:
    """Pairs or span-corrupted text of `source`, split into training and validation examples. `length_option`:
    the option that set `seq_len`, named where the text is too short for it."""
    if not 0 < val_fraction < 1:
        raise GQAError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise GQAError("the tokenizer has no end-of-sequence token, which encoder–decoder inputs and targets end with")
    pad_id = tokenizer.pad_token_id or 0
    if is_pairs(source):
        rows = read_pairs(Path(source))
        split = [is_validation(a + "\t" + b, val_fraction) for a, b in rows]
        if all(split) or not any(split):  # too few pairs for the hash split: the last one validates
            split = [i == len(rows) - 1 for i in range(len(rows))]
        pairs = encode_pairs(rows, tokenizer, seq_len, source)
        train = examples([p for p, v in zip(pairs, split) if not v], pad_id)
        val = examples([p for p, v in zip(pairs, split) if v], pad_id)
        if len(train) == 0:
            raise GQAError(f"{source} has too few pairs for training and validation")
        return Seq2SeqData(train, val, documents=len(rows), train_tokens=train.numel(), val_tokens=val.numel(),
                           objective="pairs", seq_len=seq_len)
    docs = read_documents(source)
    objective, _ = sentinels(tokenizer)
    val_docs = [d for d in docs if is_validation(d, val_fraction)]
    train_docs = [d for d in docs if not is_validation(d, val_fraction)]
    train, train_tokens = text_examples(train_docs, tokenizer, seq_len, seed, 0)
    val, val_tokens = text_examples(val_docs, tokenizer, seq_len, seed, 10**9)
    if len(val) == 0:  # too few documents for a hash split to give validation a block: hold out the tail
        stream = tokenize(docs, tokenizer).tolist()
        cut = len(stream) - max(seq_len, int(len(stream) * val_fraction))
        train, train_tokens = text_examples([], tokenizer, seq_len, seed, 0, stream[:cut])
        val, val_tokens = text_examples([], tokenizer, seq_len, seed, 10**9, stream[cut:])
    if len(train) == 0 or len(val) == 0:
        raise GQAError(f"{source} has too little text for training and validation blocks of {seq_len} tokens; give more "
                       f"text or a smaller {length_option}")
    return Seq2SeqData(train, val, documents=len(docs), train_tokens=train_tokens, val_tokens=val_tokens,
                       objective=objective, seq_len=seq_len)


def eval_examples(source, tokenizer, seq_len: int, max_tokens: int | None = None) -> Examples:
    """What `gqa eval` scores an encoder–decoder on: every pair of a pairs file; the span-corrupted text of a
    text file; a bundled corpus's validation split, span-corrupted. `max_tokens`: the first examples that
    hold that many target tokens."""
    from . import corpus

    eos, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id or 0
    if eos is None:
        raise GQAError("the tokenizer has no end-of-sequence token, which encoder–decoder inputs and targets end with")
    if is_pairs(source):
        out = examples(encode_pairs(read_pairs(Path(source)), tokenizer, seq_len, source), pad_id)
    else:
        docs = read_documents(source)
        if str(source) in corpus.NAMES:
            docs = [d for d in docs if is_validation(d, 0.05)]
        out, _ = text_examples(docs, tokenizer, seq_len, 0, 10**9)
        if len(out) == 0:
            raise GQAError(f"{source} has fewer than {seq_len} tokens: too little for one block (give a smaller --seq-len)")
    if max_tokens:
        counts = (out.labels != -100).sum(-1).cumsum(0)
        out = out[: int((counts < max_tokens).sum()) + 1]
    return out
