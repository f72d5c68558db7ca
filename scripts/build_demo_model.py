"""Rebuild the demo's starting checkpoint, src/gqa/assets/demo-mha/ (a small MHA Llama, ~9 MB in bf16).

    python scripts/build_demo_model.py            # about 17 minutes on a 2-core CPU

1. A byte-level BPE tokenizer (4,096 tokens) trained with `tokenizers` on the training split of the
   bundled corpus (Wikipedia leads + Shakespeare; the validation documents never reach it).
2. An MHA `LlamaForCausalLM` (4 layers, hidden 256, 8 heads of 32, MLP 768, tied embeddings) pre-trained
   from scratch with `gqa pretrain` on the same corpus: 800 steps of 16 × 256 tokens (3.3 M tokens).
3. Weights stored in bf16 with the tokenizer and `pretraining.json` (the run's report, whose `tokens` is
   what the demo's α refers to).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "src" / "gqa" / "assets" / "demo-mha"
VOCAB = 4096
STEPS, BATCH, SEQ_LEN = 800, 16, 256

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def train_tokenizer(dest: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gqa import corpus
    from gqa.data import is_validation

    docs = [d for d in corpus.documents("bundled") if not is_validation(d, 0.05)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>").save_pretrained(dest)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_tokenizer(tmp / "tokenizer")
        (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2))
        run = tmp / "run"
        subprocess.run([sys.executable, "-m", "gqa", "pretrain", str(run), "--config", str(tmp / "config.json"),
                        "--tokenizer", str(tmp / "tokenizer"), "--data", "bundled", "--steps", str(STEPS),
                        "--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN), "--lr", "2e-3", "--eval-every", "200",
                        "--save-every", "200", "--seed", "0"], check=True)
        from gqa import load, save

        model = load(run)
        shutil.rmtree(DEST, ignore_errors=True)
        save(model, DEST, dtype="bfloat16")
        report = json.loads((run / "train" / "report.json").read_text())
        report["command"] = "python scripts/build_demo_model.py"
        (DEST / "pretraining.json").write_text(json.dumps(report, indent=2) + "\n")
        shutil.copy(run / "train" / "log.jsonl", DEST / "pretraining-log.jsonl")
    print(f"wrote {DEST}")


if __name__ == "__main__":
    main()
