"""Convert -> uptrain -> evaluate: the sequence `gqa demo` and `gqa experiment` both run, and the one
settings mechanism they share.

Settings are a dataclass of defaults; `--quick` replaces some fields (a pipeline check at toy size) and
`--settings FILE.json` replaces any of them (a run at another scale), and the result is recorded with the
run. A `Pipeline` holds what every step of one experiment shares: the tokenized data, the held-out blocks
every model is scored on, the reference model agreement is measured against, and the training settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from .checkpoints import load
from .conversion import convert
from .data import TokenData
from .errors import GQAError
from .evaluate import compare_blocks, compare_examples
from .model import Transformer
from .seq2seq_data import Examples
from .train import CONTINUED_DISTILL_WEIGHT, TrainConfig, conversion_source, train


def read_settings(defaults, path: str | Path | None):
    """`defaults` with the fields named in a JSON file replaced (lists become tuples)."""
    if path is None:
        return defaults
    try:
        given = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise GQAError(f"settings file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise GQAError(f"settings file {path} is not JSON: {e}") from None
    names = {f.name for f in fields(defaults)}
    if not isinstance(given, dict) or set(given) - names:
        unknown = sorted(set(given) - names) if isinstance(given, dict) else "not an object"
        raise GQAError(f"settings file {path}: unknown settings {unknown}; known: {', '.join(sorted(names))}")
    return replace(defaults, **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})


def settings_for(defaults, quick_changes: dict[str, Any], quick: bool, path: str | Path | None):
    """The settings of a run: the defaults, with --quick's changes, then the --settings file's."""
    return read_settings(replace(defaults, **quick_changes) if quick else defaults, path)


@dataclass
class Pipeline:
    tokenizer: Any
    data: TokenData
    eval_blocks: int
    device: str = "cpu"
    reference: Transformer | None = None  # top-1 agreement and KL are measured against this model
    train_settings: dict = field(default_factory=dict)  # TrainConfig fields every run of the experiment shares

    @property
    def val(self) -> torch.Tensor:
        """The held-out blocks every model is scored on: the first `eval_blocks` of the validation split."""
        return self.data.val[: self.eval_blocks]

    def evaluate(self, path: str | Path, kv_cache_dtype: str | None = None) -> dict:
        """Scores of the model at `path` on the held-out blocks (its K/V stored as `kv_cache_dtype` says)."""
        model = load(path, dtype=torch.float32, device=self.device, kv_cache_dtype=kv_cache_dtype)
        if isinstance(self.val, Examples):  # an encoder–decoder: loss per target token of the held-out examples
            return compare_examples(model, self.val.to(model.device), teacher=self.reference)
        return compare_blocks(model, self.val.to(model.device), teacher=self.reference)

    def convert(self, source: str | Path, dest: str | Path, n_kv_heads: int, method: str, seed: int = 0,
                **options) -> dict:
        """Convert and score the converted model as it is (α = 0)."""
        convert(source, dest, n_kv_heads=n_kv_heads, method=method, seed=seed, progress=False, **options)
        return self.evaluate(dest)

    def train(self, model: Transformer, dest: str | Path, init_path: str | Path | None = None,
              **changes) -> tuple[dict, dict]:
        """Train `model` into `dest` (fields of TrainConfig in `changes` override the shared ones); the
        training report and the trained model's scores."""
        cfg = TrainConfig(out=str(dest), **{"overwrite": True, **self.train_settings, **changes})
        report = train(model, self.tokenizer, cfg, init_path=str(init_path) if init_path else None, data=self.data)
        return report, self.evaluate(dest)

    def uptrain(self, source: str | Path, dest: str | Path, **changes) -> tuple[dict, dict]:
        """Uptrain as `gqa uptrain` does: a converted model distils from the model it was converted from
        (`teacher=None` in `changes` turns that off)."""
        if "teacher" not in changes and (teacher := conversion_source(source)):
            changes = {"teacher": teacher, "distill_weight": CONTINUED_DISTILL_WEIGHT, **changes}
        return self.train(load(source, dtype=torch.float32), dest, init_path=source, **changes)
