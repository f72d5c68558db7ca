"""Bad input, verb by verb: each case exits 2 with one line that says what is wrong, and writes nothing.

Most mistakes must be caught before any model or tokenizer is loaded (a typo should cost a second, not a
model load); those cases run with loading made to fail loudly. Legal but suspicious input gets a warning
(tested at the end), and interrupted runs leave nothing a later run trips over.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import user_error
from families import TEXT, build, save, train_tokenizer
from safetensors.torch import load_file, save_file

import gqa
import gqa.checkpoints
import gqa.checkpoints.gguf
import gqa.checkpoints.tokenizer
import gqa.demo  # noqa: F401  imported before the cases patch `load`, so that they keep the real one
import gqa.experiments  # noqa: F401
from gqa.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """A folder of inputs, good and bad, that the cases read (and must leave as they found it)."""
    root = tmp_path_factory.mktemp("world")
    save(build("llama"), root / "model", tokenizer)
    (root / "text.txt").write_text(TEXT)
    shutil.copytree(root / "model", root / "nan-model")
    weights = load_file(str(root / "nan-model" / "model.safetensors"))
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, str(root / "nan-model" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(root / "model", root / "wide-config")  # config says 128 wide, the tensors are 64
    config = json.loads((root / "wide-config" / "config.json").read_text())
    (root / "wide-config" / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    save(build("llama", vocab_size=100), root / "small-vocab", tokenizer)  # the tokenizer has 320 tokens
    (root / "afile").write_text("not a folder")
    save(build("llama"), root / "no-tokenizer")
    from gqa.checkpoints.gguf import packaged_smollm2

    (root / "trunc.gguf").write_bytes(packaged_smollm2().read_bytes()[:100])
    other = train_tokenizer("Zebras and quokkas play the xylophone in Zanzibar. " * 40 + TEXT[:200])
    save(build("llama", seed=3), root / "other-tokenizer", other)  # same vocabulary size, another tokenizer
    save(build("llama", max_position_embeddings=512), root / "long", tokenizer)  # the model: 512 positions
    (root / "short.txt").write_text("A few words only.")
    (root / "a-folder").mkdir()
    for name, config in (("config-list", [1, 2, 3]), ("config-null", None)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
    shutil.copytree(root / "model", root / "arch-string")
    config = json.loads((root / "arch-string" / "config.json").read_text())
    (root / "arch-string" / "config.json").write_text(json.dumps({**config, "architectures": "LlamaForCausalLM"}))
    per_layer = gqa.convert(root / "model", root / "per-layer-native", n_kv_heads_per_layer=[4, 2], progress=False)
    assert per_layer["architecture"] == "GQAForCausalLM"
    gqa.checkpoints.gguf.write_gguf(gqa.load(root / "per-layer-native"), root / "deci.gguf")
    return root


def unwritable(root: Path) -> Path:
    """A folder no output can be created in, even by root (whom permission bits do not stop)."""
    if os.geteuid() == 0:
        return Path("/sys")  # a read-only file system for everyone
    folder = root / "readonly"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    return folder


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


# (verb arguments with {w} for the world folder and {ro} for an unwritable one, message, caught before loading)
CASES = {
    # destinations
    "convert-parent-read-only": (["convert", "{w}/model", "{ro}/out", "--kv-heads", "2"], "is not writable", True),
    "convert-parent-is-a-file": (["convert", "{w}/model", "{w}/afile/out", "--kv-heads", "2"],
                                 "afile is a file, not a folder", True),
    "convert-into-source": (["convert", "{w}/model", "{w}/model/inner", "--kv-heads", "2"],
                            "is inside the source folder", True),
    "convert-over-source": (["convert", "{w}/model", "{w}/model", "--kv-heads", "2", "--overwrite"],
                            "is the source folder", True),
    "export-over-source": (["export", "{w}/model", "{w}/model", "--overwrite"], "is the source folder", True),
    "export-read-only": (["export", "{w}/model", "{ro}/out"], "is not writable", True),
    "export-gguf-no-tokenizer": (["export", "{w}/no-tokenizer", "{w}/o.gguf", "--format", "gguf"],
                                 "GGUF export needs the model's tokenizer.json", True),
    "export-gguf-bfloat16": (["export", "{w}/model", "{w}/o.gguf", "--format", "gguf", "--dtype", "bfloat16"],
                             "GGUF export writes float32 or float16, not bfloat16", True),
    "uptrain-into-source": (["uptrain", "{w}/model", "{w}/model/run", "--data", "{w}/text.txt", "--steps", "1"],
                            "is inside the source folder", True),
    "uptrain-read-only": (["uptrain", "{w}/model", "{ro}/run", "--data", "{w}/text.txt", "--steps", "1"],
                          "is not writable", True),
    "import-gguf-existing-dest": (["import-gguf", "smollm2", "{w}/model"], "already exists", True),
    "import-gguf-truncated": (["import-gguf", "{w}/trunc.gguf", "{w}/gguf-out"], "cannot read", True),
    "import-gguf-not-gguf": (["import-gguf", "{w}/text.txt", "{w}/gguf-out"], "is not a GGUF file", True),
    "bench-read-only": (["bench", "capacity", "--quick", "--device", "cpu", "--out", "{ro}/b"], "is not writable", True),
    "demo-read-only": (["demo", "--quick", "--out", "{ro}/demo"], "is not writable", True),
    # the checkpoint itself
    "convert-config-disagrees": (["convert", "{w}/wide-config", "{w}/o", "--kv-heads", "2"],
                                 "but config.json implies", True),
    "info-config-disagrees": (["info", "{w}/wide-config"], "but config.json implies", True),
    "eval-config-disagrees": (["eval", "{w}/wide-config", "--data", "{w}/text.txt"], "but config.json implies", True),
    "convert-nan-weights": (["convert", "{w}/nan-model", "{w}/o", "--kv-heads", "2"], "holds NaN or Inf", False),
    "eval-nan-weights": (["eval", "{w}/nan-model", "--data", "{w}/text.txt"], "holds NaN or Inf", False),
    "uptrain-nan-weights": (["uptrain", "{w}/nan-model", "{w}/o", "--data", "{w}/text.txt", "--steps", "1"],
                            "holds NaN or Inf", False),
    "eval-tokenizer-beyond-vocab": (["eval", "{w}/small-vocab", "--data", "{w}/text.txt"],
                                    "but the model's vocabulary has 100 entries", False),
    # devices
    "eval-unknown-device": (["eval", "{w}/model", "--data", "{w}/text.txt", "--device", "tpu"], "unknown device", True),
    "uptrain-cuda-without-cuda": (["uptrain", "{w}/model", "{w}/o", "--data", "{w}/text.txt", "--steps", "1",
                                   "--device", "cuda"], "CUDA is not available", True),
    "generate-cuda-graph-on-cpu": (["generate", "{w}/model", "--prompt", "hi", "--cuda-graph", "--device", "cpu"],
                                   "--cuda-graph needs a CUDA device", True),
    "bench-unknown-device": (["bench", "decode", "--quick", "--device", "tpu"], "unknown device", True),
    # numbers
    "uptrain-lr-nan": (["uptrain", "{w}/model", "{w}/o", "--data", "{w}/text.txt", "--steps", "1", "--lr", "nan"],
                       "argument --lr: must be a finite number > 0, got nan", True),
    "uptrain-lr-inf": (["uptrain", "{w}/model", "{w}/o", "--data", "{w}/text.txt", "--steps", "1", "--lr", "inf"],
                       "argument --lr: must be a finite number > 0", True),
    "uptrain-alpha-negative": (["uptrain", "{w}/model", "{w}/o", "--data", "{w}/text.txt", "--alpha", "-0.1",
                                "--pretrain-tokens", "1e6"], "argument --alpha: must be a finite number > 0", True),
    "uptrain-seq-len-zero": (["uptrain", "{w}/model", "{w}/o", "--data", "{w}/text.txt", "--steps", "1",
                              "--seq-len", "0"], "argument --seq-len: must be >= 2, got 0", True),
    "uptrain-seq-len-too-long": (["uptrain", "{w}/model", "{w}/o", "--data", "{w}/text.txt", "--steps", "1",
                                  "--seq-len", "4096"], "--seq-len 4096 exceeds the model's 128 positions", True),
    "uptrain-alpha-without-tokens": (["uptrain", "{w}/model", "{w}/o", "--data", "{w}/text.txt", "--alpha", "0.05"],
                                     "--alpha needs --pretrain-tokens", True),
    "uptrain-missing-data": (["uptrain", "{w}/model", "{w}/o", "--data", "{w}/nope.txt", "--steps", "1"],
                             "no data at", True),
    "uptrain-missing-teacher": (["uptrain", "{w}/model", "{w}/o", "--data", "{w}/text.txt", "--steps", "1",
                                 "--teacher", "{w}/nope"], "no model folder at", True),
    "eval-seq-len-zero": (["eval", "{w}/model", "--data", "{w}/text.txt", "--seq-len", "0"],
                          "argument --seq-len: must be >= 2, got 0", True),
    "eval-seq-len-too-long": (["eval", "{w}/model", "--data", "{w}/text.txt", "--seq-len", "4096"],
                              "--seq-len 4096 exceeds the model's 128 positions", True),
    "generate-stop-token-beyond-vocab": (["generate", "{w}/model", "--prompt", "hi", "--stop-token", "99999"],
                                         "--stop-token 99999 is not a token of this model", True),
    "convert-kv-heads-zero": (["convert", "{w}/model", "{w}/o", "--kv-heads", "0"],
                              "argument --kv-heads: must be >= 1, got 0", True),
    "convert-kv-heads-negative": (["convert", "{w}/model", "{w}/o", "--kv-heads-per-layer", "4,-1"],
                                  "layer 1: the number of KV heads must be >= 1, got -1", True),
    "convert-per-layer-hf": (["convert", "{w}/model", "{w}/o", "--kv-heads-per-layer", "4,2", "--format", "hf"],
                             "DeciLMForCausalLM block_configs, cannot hold this model either: its MLP width 96", True),
    "bench-capacity-context-zero": (["bench", "capacity", "--quick", "--device", "cpu", "--context", "0", "--out",
                                     "{w}/b"], "argument --context: must be >= 1, got 0", True),
    "bench-capacity-context-short": (["bench", "capacity", "--quick", "--device", "cpu", "--context", "3", "--out",
                                      "{w}/b"], "--context must be at least 9 tokens", True),
    "bench-capacity-memory-negative": (["bench", "capacity", "--quick", "--device", "cpu", "--memory-gb", "-1",
                                        "--out", "{w}/b"], "argument --memory-gb: must be a finite number > 0", True),
    "bench-capacity-more-than-the-machine": (["bench", "capacity", "--device", "cpu", "--memory-gb", "100000",
                                              "--out", "{w}/b"], "is more than cpu memory has available now", True),
    "bench-capacity-weights-fill-budget": (["bench", "capacity", "--device", "cpu", "--memory-gb", "0.5",
                                            "--out", "{w}/b"], "weights alone take", True),
    # references and teachers must read text as the model does (not just have as many tokens)
    "eval-reference-other-tokenizer": (["eval", "{w}/model", "--data", "{w}/text.txt", "--reference",
                                        "{w}/other-tokenizer"], "does not share the tokenizer of", False),
    "uptrain-teacher-other-tokenizer": (["uptrain", "{w}/model", "{w}/o", "--data", "{w}/text.txt", "--steps", "1",
                                         "--teacher", "{w}/other-tokenizer"], "its vocabulary differs in", False),
    "eval-reference-without-tokenizer": (["eval", "{w}/model", "--data", "{w}/text.txt", "--reference",
                                          "{w}/no-tokenizer"], "has no tokenizer files, so gqa cannot check", False),
    "uptrain-teacher-fewer-positions": (["uptrain", "{w}/long", "{w}/o", "--data", "{w}/text.txt", "--steps", "1",
                                         "--seq-len", "256", "--teacher", "{w}/model"],
                                        "windows of 256 tokens (--seq-len) exceed the teacher's 128 positions", True),
    "eval-reference-fewer-positions": (["eval", "{w}/long", "--data", "{w}/text.txt", "--reference", "{w}/model"],
                                       "windows of 512 tokens (--seq-len) exceed the reference's 128 positions", True),
    # calibration: the checks of eval and uptrain apply to it too
    "convert-aligned-tokenizer-beyond-vocab": (["convert", "{w}/small-vocab", "{w}/o", "--kv-heads", "2", "--method",
                                                "aligned", "--calib", "{w}/text.txt", "--calib-tokens", "256",
                                                "--calib-seq-len", "32"], "but the model's vocabulary has 100", False),
    "convert-budget-tokenizer-beyond-vocab": (["convert", "{w}/small-vocab", "{w}/o", "--kv-budget", "0.5",
                                               "--calib", "{w}/text.txt", "--calib-tokens", "256", "--calib-seq-len",
                                               "32"], "but the model's vocabulary has 100", False),
    "convert-transfer-tokenizer-beyond-vocab": (["convert", "{w}/small-vocab", "{w}/o", "--kv-heads", "2",
                                                 "--transfer-steps", "5", "--calib", "{w}/text.txt", "--calib-tokens",
                                                 "256", "--calib-seq-len", "32"], "vocabulary has 100 entries", False),
    "convert-calib-text-too-short": (["convert", "{w}/model", "{w}/o", "--kv-heads", "2", "--method", "aligned",
                                      "--calib", "{w}/short.txt", "--calib-seq-len", "32"],
                                     "give more text or a smaller --calib-seq-len", False),
    "convert-transfer-nan-weights-new-parent": (["convert", "{w}/nan-model", "{w}/new/nested/o", "--kv-heads", "2",
                                                 "--transfer-steps", "2", "--calib", "{w}/text.txt", "--calib-tokens",
                                                 "256", "--calib-seq-len", "32"], "holds NaN or Inf", False),
    # options that would do nothing in the combination given
    "convert-calib-with-mean": (["convert", "{w}/model", "{w}/o", "--kv-heads", "2", "--calib", "{w}/text.txt"],
                                "--method mean merges from the weights alone: drop --calib", True),
    "convert-calib-tokens-without-calib": (["convert", "{w}/model", "{w}/o", "--kv-heads", "2", "--calib-tokens",
                                            "512"], "--calib-tokens sets the calibration, which --method mean without", True),
    "convert-transfer-inputs-without-steps": (["convert", "{w}/model", "{w}/o", "--kv-heads", "2", "--method",
                                               "aligned", "--calib", "{w}/text.txt", "--transfer-inputs", "converted"],
                                              "--transfer-inputs sets the layer-wise transfer, which runs only", True),
    "convert-transfer-lr-without-steps": (["convert", "{w}/model", "{w}/o", "--kv-heads", "2", "--transfer-lr", "0.1"],
                                          "--transfer-lr sets the layer-wise transfer", True),
    "convert-grouping-with-mean": (["convert", "{w}/model", "{w}/o", "--kv-heads", "2", "--grouping", "contiguous"],
                                   "--grouping is an option of --method aligned; --method mean does not use it", True),
    "uptrain-distill-weight-without-teacher": (["uptrain", "{w}/model", "{w}/o", "--data", "{w}/text.txt", "--steps",
                                                "1", "--distill-weight", "1"], "which needs a --teacher", True),
    "generate-top-p-greedy": (["generate", "{w}/model", "--prompt", "hi", "--top-p", "0.9"],
                              "top-p shapes sampling, but temperature 0 decodes greedily", True),
    "generate-top-k-top-p-greedy": (["generate", "{w}/model", "--prompt", "hi", "--top-k", "5", "--top-p", "0.9"],
                                    "top-k and top-p shape sampling", True),
    "bench-decode-memory-gb": (["bench", "decode", "--quick", "--device", "cpu", "--memory-gb", "8"],
                               "--memory-gb is an option of `gqa bench capacity`; `gqa bench decode` does not use it",
                               True),
    "bench-capacity-peers": (["bench", "capacity", "--quick", "--device", "cpu", "--peers", "plain"],
                             "--peers is an option of `gqa bench generate`", True),
    "bench-serve-gqa-format": (["bench", "serve", "{w}/per-layer-native"],
                               "per-layer-native: gqa's own format (no HF architecture holds", True),
    "bench-serve-no-models": (["bench", "serve"], "bench serve: give the model folders to compare", True),
    "bench-serve-bad-points": (["bench", "serve", "{w}/model", "--points", "8by2048"],
                               "--points takes CONCURRENCYxCONTEXT pairs like 8x2048, got '8by2048'", True),
    # GGUF: one atomic writer, and a tokenizer that fits the model
    "export-gguf-tokenizer-beyond-vocab": (["export", "{w}/small-vocab", "{w}/o.gguf", "--format", "gguf"],
                                           "has token ids up to 311, but the model's vocabulary has 100", True),
    "export-gguf-onto-a-folder": (["export", "{w}/model", "{w}/a-folder", "--format", "gguf", "--overwrite"],
                                  "a-folder is a folder; give the name of the file to write", True),
    "import-gguf-deci": (["import-gguf", "{w}/deci.gguf", "{w}/gguf-out"], "holds llama.cpp's `deci` architecture",
                         True),
    # configs that are JSON but not configs
    "info-config-list": (["info", "{w}/config-list"], "config.json holds a JSON list, not an object", True),
    "info-config-null": (["info", "{w}/config-null"], "config.json holds a JSON null, not an object", True),
    "info-architectures-string": (["info", "{w}/arch-string"],
                                  '"architectures" must be a list of class names, like ["LlamaForCausalLM"]; got '
                                  '"LlamaForCausalLM"', True),
    # argparse itself: the verb named once
    "convert-argparse": (["convert", "{w}/model"], "gqa: error: convert: the following arguments are required", True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, world, capsys, monkeypatch):
    argv, message, before_loading = CASES[case]
    ro = unwritable(world.parent)
    argv = [a.format(w=world, ro=ro) for a in argv]
    if before_loading:  # the mistake must be found without loading a model or a tokenizer
        def no_loading(*args, **kwargs):
            raise AssertionError(f"{case}: loaded something before finding the mistake")
        monkeypatch.setattr(gqa.checkpoints, "load", no_loading)
        monkeypatch.setattr(gqa.checkpoints.tokenizer, "load_tokenizer", no_loading)
    before = snapshot(world)
    user_error(capsys, argv, message)
    assert snapshot(world) == before, "something was written"


# ------------------------------------------------------------------------------------- encoder–decoders, serving

def seq2seq_tokenizer():
    tok = train_tokenizer()
    tok.add_special_tokens({"pad_token": "<pad>", "mask_token": "<mask>",
                            "additional_special_tokens": [f"<extra_id_{i}>" for i in range(8)]})
    return tok


def save_seq2seq(config, folder: Path, tok, **ids) -> None:
    import transformers

    torch.manual_seed(0)
    ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "decoder_start_token_id":
           tok.pad_token_id, **ids}
    transformers.AutoModelForSeq2SeqLM.from_config(config(**ids)).save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def s2s(tmp_path_factory):
    """Encoder–decoder inputs, good and bad: a T5 and a BART of 128 learned positions, with their mistakes."""
    import transformers

    root, tok = tmp_path_factory.mktemp("s2s"), seq2seq_tokenizer()
    t5 = dict(vocab_size=336, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, feed_forward_proj="relu")
    save_seq2seq(lambda **ids: transformers.T5Config(**t5, **ids), root / "t5", tok)
    bart = dict(vocab_size=336, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=128)
    save_seq2seq(lambda **ids: transformers.BartConfig(**bart, **ids), root / "bart", tok, decoder_start_token_id=
                 tok.eos_token_id)
    shutil.copytree(root / "t5", root / "t5-wide")  # config says 128 wide, the tensors are 64
    config = json.loads((root / "t5-wide" / "config.json").read_text())
    (root / "t5-wide" / "config.json").write_text(json.dumps({**config, "d_model": 128}))
    (root / "text.txt").write_text(TEXT * 6)
    (root / "binary.jsonl").write_bytes(b"\xff\xfe\x00binary\x80\x81\n" * 20)
    rows = [{"input": f"question {i}: the quick brown fox", "target": f"answer {i} the lazy dog"} for i in range(8)]
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "afile").write_text("not a folder")
    return root


SEQ2SEQ_CASES = {  # as CASES, with {s} for the encoder–decoder world
    "eval-seq2seq-binary-jsonl": (["eval", "{s}/t5", "--data", "{s}/binary.jsonl"], "binary.jsonl is not UTF-8 text",
                                  True),
    "uptrain-seq2seq-binary-jsonl": (["uptrain", "{s}/t5", "{s}/o", "--data", "{s}/binary.jsonl", "--steps", "1"],
                                     "binary.jsonl is not UTF-8 text", True),
    "convert-seq2seq-binary-calib": (["convert", "{s}/t5", "{s}/o", "--kv-heads", "2", "--method", "aligned", "--calib",
                                      "{s}/binary.jsonl", "--calib-tokens", "64", "--calib-seq-len", "32"],
                                     "binary.jsonl is not UTF-8 text", False),
    "eval-bart-seq-len-beyond-positions": (["eval", "{s}/bart", "--data", "{s}/text.txt", "--seq-len", "128"],
                                           "--seq-len 128: blocks of 128 tokens (the block plus eos: 129 tokens) exceed "
                                           "the model's 128 learned positions; pass --seq-len 127 or less", True),
    "eval-bart-pairs-beyond-positions": (["eval", "{s}/bart", "--data", "{s}/pairs.jsonl", "--seq-len", "200"],
                                         "--seq-len 200: pairs cut to 200 tokens exceed the model's 128 learned "
                                         "positions; pass --seq-len 128 or less", True),
    "uptrain-bart-seq-len-at-positions": (["uptrain", "{s}/bart", "{s}/o", "--data", "{s}/text.txt", "--steps", "1",
                                           "--seq-len", "128"], "(the block plus eos: 129 tokens) exceed the model's "
                                           "128 learned positions", True),
    "convert-bart-calib-seq-len": (["convert", "{s}/bart", "{s}/o", "--kv-heads", "2", "--method", "aligned", "--calib",
                                    "{s}/text.txt", "--calib-seq-len", "128"],
                                   "--calib-seq-len 128: blocks of 128 tokens (the block plus eos: 129 tokens)", True),
    "generate-bart-long-prompt": (["generate", "{s}/bart", "--prompt", "the quick brown fox " * 60],
                                  "a source of 662 tokens is longer than the model's 128 learned positions", False),
    "generate-bart-max-new-tokens": (["generate", "{s}/bart", "--prompt", "hi", "--max-new-tokens", "200"],
                                     "--max-new-tokens 200 is more than the model's 128 learned positions", False),
    "convert-seq2seq-calib-tokens-below-a-block": (["convert", "{s}/t5", "{s}/o", "--kv-heads", "2", "--method",
                                                    "aligned", "--calib", "{s}/text.txt", "--calib-tokens", "10",
                                                    "--calib-seq-len", "32"],
                                                   "--calib-tokens 10 is less than one block of --calib-seq-len 32", True),
    "convert-seq2seq-format-hf-before-calibration": (["convert", "{s}/t5", "{s}/o", "--kv-heads", "2", "--method",
                                                      "aligned", "--calib", "{s}/text.txt", "--format", "hf"],
                                                     "t5 cannot hold fewer KV heads than query heads", True),
    "info-seq2seq-config-disagrees": (["info", "{s}/t5-wide"], "t5-wide: tensor decoder.block.0.layer.0.SelfAttention",
                                      True),
    "bench-seq2seq-out-is-a-file": (["bench", "seq2seq", "--quick", "--out", "{s}/afile"],
                                    "afile is a file; --out takes a folder to write the results into", True),
    "bench-serve-out-is-a-file": (["bench", "serve", "{w}/model", "--out", "{s}/afile"],
                                  "afile is a file; --out takes a folder", True),
    "bench-serve-dtype": (["bench", "serve", "{w}/model", "--dtype", "int8", "--out", "{s}/serve"],
                          "bench serve --dtype takes float32, bfloat16, float16 (vLLM's model dtype), got 'int8'", True),
    "bench-serve-points-beyond-positions": (["bench", "serve", "{w}/model", "--points", "1x4096", "--out", "{s}/serve"],
                                            "--points asks for 4096 tokens of context, but a model has 128", True),
    "bench-serve-new-tokens-fill-context": (["bench", "serve", "{w}/model", "--points", "1x64", "--new-tokens", "64",
                                             "--out", "{s}/serve"], "every point's context must exceed --new-tokens 64",
                                            True),
    "bench-serve-vocabularies": (["bench", "serve", "{w}/model", "{w}/small-vocab", "--points", "1x64", "--out",
                                  "{s}/serve"], "the models have different vocabularies", True),
    "convert-seq2seq-calib-text-too-short": (["convert", "{s}/t5", "{s}/o", "--kv-heads", "2", "--method", "aligned",
                                              "--calib", "{w}/short.txt", "--calib-seq-len", "32",
                                              "--calib-tokens", "64"], "give more text or a smaller --calib-seq-len",
                                             False),
    "convert-seed-with-mean": (["convert", "{w}/model", "{s}/o", "--kv-heads", "2", "--seed", "3"],
                               "--seed draws --method random's heads and the calibration sample; --method mean without "
                               "calibration (--transfer-steps, --joint-steps, --kv-budget) draws nothing: drop --seed",
                               True),
    "uptrain-strategy-in-one-process": (["uptrain", "{w}/model", "{s}/o", "--data", "{w}/text.txt", "--steps", "1",
                                         "--strategy", "fsdp"], "--strategy fsdp splits the work over the ranks of a "
                                         "torchrun launch; this is one process", True),
}


@pytest.mark.parametrize("case", list(SEQ2SEQ_CASES))
def test_bad_input_seq2seq_and_serving(case, world, s2s, capsys, monkeypatch):
    argv, message, before_loading = SEQ2SEQ_CASES[case]
    argv = [a.format(w=world, s=s2s) for a in argv]
    if before_loading:
        def no_loading(*args, **kwargs):
            raise AssertionError(f"{case}: loaded something before finding the mistake")
        monkeypatch.setattr(gqa.checkpoints, "load", no_loading)
        monkeypatch.setattr(gqa.checkpoints.tokenizer, "load_tokenizer", no_loading)
    before = snapshot(world), snapshot(s2s)
    user_error(capsys, argv, message)
    assert (snapshot(world), snapshot(s2s)) == before, "something was written"


def test_vllm_errors_come_back_as_one_readable_line():
    from gqa.runtimes.vllm_runtime import short

    pydantic = ("1 validation error for ModelConfig dtype Input should be 'auto', 'half', 'float16', 'bfloat16', "
                "'float' or 'float32' [type=literal_error, input_value='int8', input_type=str]\n    For further "
                "information visit https://errors.pydantic.dev/2.11/v/literal_error")
    assert short(pydantic) == ("1 validation error for ModelConfig dtype Input should be 'auto', 'half', 'float16', "
                               "'bfloat16', 'float' or 'float32' [type=literal_error, input_value='int8', "
                               "input_type=str]")
    cut = short("word " * 200 + "https://example.org/a/very/long/address")
    assert cut.endswith("word …") and len(cut) <= 502 and "https" not in cut


def test_bart_runs_at_its_defaults_within_its_positions(s2s, tmp_path, capsys):
    """BART's text-infilling target is the block plus eos: the default lengths leave room for it (eval,
    conversion, uptraining all ran into the table's end before), and a whole generation fits."""
    assert main(["eval", str(s2s / "bart"), "--data", str(s2s / "text.txt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0
    assert main(["convert", str(s2s / "bart"), str(tmp_path / "c"), "--kv-heads", "2", "--method", "aligned",
                 "--calib", str(s2s / "text.txt"), "--calib-tokens", "254"]) == 0
    assert json.loads((tmp_path / "c" / "conversion.json").read_text())["calibration"]["seq_len"] == 127
    assert main(["uptrain", str(s2s / "bart"), str(tmp_path / "u"), "--data", str(s2s / "text.txt"), "--steps", "1",
                 "--batch-size", "2"]) == 0
    assert main(["generate", str(s2s / "bart"), "--prompt", "hi", "--max-new-tokens", "128", "--ignore-eos"]) == 0


def test_pretrain_takes_an_hf_encoder_decoder_config(s2s, tmp_path):
    """--help says an HF config.json is accepted: a T5's or a BART's is, as a Llama's (it was refused as 'a file')."""
    for name in ("t5", "bart"):
        assert main(["pretrain", str(tmp_path / name), "--config", str(s2s / name / "config.json"), "--tokenizer",
                     str(s2s / name), "--data", str(s2s / "text.txt"), "--steps", "1", "--seq-len", "32",
                     "--batch-size", "2"]) == 0
        assert gqa.load(tmp_path / name).config.n_heads == 4


def test_serving_refusals_leave_no_output_folder(world, tmp_path, capsys, monkeypatch):
    """Where vLLM is installed: a KV-cache size the machine lacks is refused before vLLM starts, naming
    --kv-cache-gb; a head size vLLM's CPU build refuses is refused as such; GQA_VLLM_PYTHON naming a Python
    without vllm says what to install. No output folder is made for any of them."""
    from gqa.runtimes import vllm_runtime

    out = tmp_path / "serve"
    if os.environ.get("GQA_SKIP_VLLM"):
        pytest.skip("GQA_SKIP_VLLM is set")
    wide = tmp_path / "wide"
    save(build("llama", hidden_size=128, intermediate_size=256), wide, train_tokenizer())
    user_error(capsys, ["bench", "serve", wide, "--kv-cache-gb", "100000", "--points", "1x64", "--out", out],
               "--kv-cache-gb 100000 is more than cpu memory has available now")
    if vllm_runtime.runs_on_cpu(vllm_runtime.vllm_python()):
        user_error(capsys, ["bench", "serve", world / "model", "--points", "1x64", "--out", out],
                   "vLLM's CPU build cannot serve")
    monkeypatch.setenv("GQA_VLLM_PYTHON", sys.executable)  # gqa's own Python: no vllm in it
    user_error(capsys, ["bench", "serve", wide, "--points", "1x64", "--out", out],
               f"GQA_VLLM_PYTHON={sys.executable} has no vllm: bash scripts/setup.sh installs")
    assert not out.exists()


# ------------------------------------------------------------------------------------- warnings

def test_source_without_tokenizer_files_warns(world, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(world / "model" / name, bare / name)
    assert main(["convert", str(bare), str(tmp_path / "out"), "--kv-heads", "2"]) == 0
    err = capsys.readouterr().err
    assert "gqa: warning:" in err and "has no tokenizer files (tokenizer.json" in err
    assert (tmp_path / "out" / "config.json").is_file()


def test_alpha_above_one_warns(world, tmp_path, capsys):
    argv = ["uptrain", world / "model", tmp_path / "run", "--data", world / "text.txt", "--alpha", "2",
            "--pretrain-tokens", "100", "--seq-len", "32", "--batch-size", "2"]
    assert main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    assert "gqa: warning: --alpha 2 trains on more tokens than the model was pre-trained on" in err
    assert json.loads((tmp_path / "run" / "train" / "report.json").read_text())["tokens"] == 256  # 2 × 100, rounded up


def test_encoder_decoder_warnings(s2s, tmp_path, capsys):
    """Legal but suspicious encoder–decoder input gets one warning: a tokenizer whose eos is not config.json's
    (the model's is used), pairs cut to --seq-len, a source without tokenizer files; --max-tokens says that
    examples are scored whole."""
    shutil.copytree(s2s / "t5", tmp_path / "eos")
    config = json.loads((tmp_path / "eos" / "config.json").read_text())
    (tmp_path / "eos" / "config.json").write_text(json.dumps({**config, "eos_token_id": 5}))
    assert main(["eval", str(tmp_path / "eos"), "--data", str(s2s / "pairs.jsonl"), "--json"]) == 0
    err = capsys.readouterr().err
    assert err.count("gqa: warning:") == 1 and "its tokenizer ends sequences with token id 0, but config.json's " \
        "eos_token_id is 5; gqa uses 5" in err
    from gqa.checkpoints.tokenizer import load_tokenizer
    from gqa.seq2seq_data import eval_examples

    examples = eval_examples(s2s / "pairs.jsonl", load_tokenizer(tmp_path / "eos"), 64)
    assert all(row[row != -100][-1] == 5 for row in examples.labels)

    assert main(["eval", str(s2s / "t5"), "--data", str(s2s / "pairs.jsonl"), "--seq-len", "4"]) == 0
    err = capsys.readouterr().err
    assert "gqa: warning:" in err and "8 inputs and 8 targets of 8 pairs are longer than --seq-len 4 tokens (eos " \
        "included) and were cut to it" in err
    assert main(["uptrain", str(s2s / "t5"), str(tmp_path / "u"), "--data", str(s2s / "pairs.jsonl"), "--seq-len", "4",
                 "--steps", "1", "--batch-size", "2"]) == 0
    assert "were cut to it" in capsys.readouterr().err

    assert main(["eval", str(s2s / "t5"), "--data", str(s2s / "pairs.jsonl"), "--max-tokens", "10"]) == 0
    assert "over 14 target tokens of 1 example (examples are scored whole: --max-tokens 10 is reached within the " \
        "first 1 example)" in capsys.readouterr().out

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(s2s / "t5" / name, bare / name)
    assert main(["convert", str(bare), str(tmp_path / "out"), "--kv-heads", "2"]) == 0
    assert "gqa: warning:" in capsys.readouterr().err


def test_outputs_and_messages_name_what_the_user_has(world, s2s, tmp_path, capsys):
    """An uptraining refusal is one line (the 'distilling from' line comes once the checks pass); info says
    how to serve a gqa-format model that an HF class holds, and which head sizes vLLM's CPU build takes."""
    gqa.convert(world / "model", tmp_path / "g2", n_kv_heads=2, format="native", progress=False)
    user_error(capsys, ["uptrain", tmp_path / "g2", tmp_path / "u", "--data", world / "nope.txt", "--steps", "1"],
               "no data at")
    assert capsys.readouterr().out == ""
    assert main(["info", str(tmp_path / "g2"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vllm"] == (f"no: gqa's own format; `gqa export {tmp_path / 'g2'} OUT --format hf` writes it as "
                            f"LlamaForCausalLM, which vLLM loads")
    assert main(["info", str(world / "model"), "--json"]) == 0
    assert "not vLLM's CPU build: its attention takes head sizes 32, 64" in json.loads(capsys.readouterr().out)["vllm"]


# ------------------------------------------------------------------------------------- interrupted runs

def test_stale_partial_folders_are_removed_on_the_next_run(world, tmp_path, capsys):
    """A killed conversion leaves `.DEST.partial-*` beside DEST; the next conversion of DEST removes it (its
    process is gone), says so, and leaves a partial folder of a live process alone."""
    dest = tmp_path / "dest"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / ".dest.partial-abc123"
    stale.mkdir()
    (stale / "model-00001.safetensors").write_bytes(b"x" * 1000)
    (stale / ".gqa-owner").write_text(f"{dead.stdout.strip()} {os.uname().nodename}\n")
    orphan = tmp_path / ".dest.partial-def456"  # killed before it wrote its owner
    orphan.mkdir()
    live = tmp_path / ".dest.partial-live99"
    live.mkdir()
    (live / ".gqa-owner").write_text(f"{os.getpid()} {os.uname().nodename}\n")
    assert main(["convert", str(world / "model"), str(dest), "--kv-heads", "2"]) == 0
    err = capsys.readouterr().err
    assert not stale.exists() and not orphan.exists() and live.exists()
    assert f"removed {stale} (0.0 MB), left by an interrupted write of dest" in err
    assert not (dest / ".gqa-owner").exists()


def test_one_writer_per_destination(world, tmp_path, capsys, monkeypatch):
    """Two conversions to one new destination, neither with --overwrite: the one that finishes second is refused
    at its final rename (exit 2, one line) and the first one's output stays, with nothing of the second left;
    with --overwrite the second replaces it. A GGUF file is published the same way."""
    import gqa.checkpoints.files as files

    dest, real_close, others = tmp_path / "dest", files.ShardWriter.close, []

    def close_while_another_run_finishes(self):
        real_close(self)
        if not others:  # another run starts and finishes while this one is still writing
            others.append(1)
            gqa.convert(world / "model", dest, n_kv_heads=1, progress=False)

    monkeypatch.setattr(files.ShardWriter, "close", close_while_another_run_finishes)
    user_error(capsys, ["convert", world / "model", dest, "--kv-heads", "2"], f"{dest} appeared while this run was "
               f"writing it (another run wrote it meanwhile); it is left as that run wrote it")
    assert gqa.load(dest).config.n_kv_heads == [1, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]
    assert main(["convert", str(world / "model"), str(dest), "--kv-heads", "2", "--overwrite"]) == 0
    assert gqa.load(dest).config.n_kv_heads == [2, 2]

    import gguf

    gguf_file, real_header = tmp_path / "m.gguf", gguf.GGUFWriter.write_header_to_file

    def another_file_appears(self, *args, **kwargs):
        gguf_file.write_bytes(b"the other run's file")
        return real_header(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_header_to_file", another_file_appears)
    user_error(capsys, ["export", world / "model", gguf_file, "--format", "gguf"], "appeared while this run was writing")
    assert gguf_file.read_bytes() == b"the other run's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "m.gguf"]


def test_killed_conversion_is_cleaned_up_by_the_next(world, tmp_path):
    dest = tmp_path / "dest"
    script = f"""
import os, signal
import gqa.checkpoints.files as files
real_add = files.ShardWriter.add
def add(self, name, tensor):
    os.kill(os.getpid(), signal.SIGKILL)
files.ShardWriter.add = add
import gqa
gqa.convert({str(world / 'model')!r}, {str(dest)!r}, n_kv_heads=1, progress=False)
"""
    assert subprocess.run([sys.executable, "-c", script]).returncode == -signal.SIGKILL
    assert [p.name.startswith(".dest.partial-") for p in tmp_path.iterdir()] == [True]
    gqa.convert(world / "model", dest, n_kv_heads=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


def test_serving_without_vllm_says_what_to_install(world, tmp_path, capsys, monkeypatch):
    from gqa.runtimes import vllm_runtime

    monkeypatch.delenv("GQA_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(vllm_runtime, "DEFAULT_ENV", tmp_path / "no-vllm-here")
    monkeypatch.setattr(vllm_runtime.importlib.util, "find_spec", lambda name: None)
    argv = ["bench", "serve", world / "model", "--points", "1x64", "--out", tmp_path / "out"]
    user_error(capsys, argv, "vLLM is not installed: bash scripts/setup.sh installs vLLM's CPU build into")
    monkeypatch.setenv("GQA_VLLM_PYTHON", str(tmp_path / "python-nowhere"))
    user_error(capsys, argv, "python-nowhere is not a file")
    assert not (tmp_path / "out").exists()


def test_killed_gguf_export_is_cleaned_up_by_the_next(world, tmp_path, capsys):
    """GGUF goes through the same atomic writer as folders: a uniquely named partial beside the file, which
    the next export of that file removes (saying so); a new parent folder is created."""
    dest = tmp_path / "new" / "parent" / "m.gguf"
    script = f"""
import os, signal
import gguf
def killed(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
gguf.GGUFWriter.write_tensors_to_file = killed
from gqa.cli import main
main(["export", {str(world / 'model')!r}, {str(dest)!r}, "--format", "gguf"])
"""
    assert subprocess.run([sys.executable, "-c", script]).returncode == -signal.SIGKILL
    [partial] = dest.parent.iterdir()
    assert partial.name.startswith(".m.gguf.partial-") and partial.is_dir()
    assert main(["export", str(world / "model"), str(dest), "--format", "gguf"]) == 0
    assert f"removed {partial} (" in capsys.readouterr().err
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m.gguf"]
    assert dest.read_bytes()[:4] == b"GGUF"


def test_uptrain_killed_before_its_first_checkpoint_starts_again(world, tmp_path, capsys):
    """OUT holding only the log of a run killed before its first checkpoint: a plain re-run and --resume both
    start again from step 0 (with a warning), instead of sending the user from one message to the other."""
    out = tmp_path / "run"
    argv = ["uptrain", world / "model", out, "--data", world / "text.txt", "--steps", "2", "--seq-len", "32"]
    for extra in ([], ["--resume"]):
        shutil.rmtree(out, ignore_errors=True)  # what a kill before the first checkpoint leaves
        (out / "train").mkdir(parents=True)
        (out / "train" / "log.jsonl").write_text(json.dumps({"step": 0, "val_loss": 5.0}) + "\n")
        assert main([str(a) for a in argv + extra]) == 0
        assert "stopped before its first checkpoint; starting it again from step 0" in capsys.readouterr().err
        log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [0, 1, 2] and (out / "config.json").is_file()
    (out / "mine.txt").write_text("not a run")  # a finished run, or anything else, is still refused
    user_error(capsys, argv, "already exists; pass --overwrite to replace it or --resume")


def test_diverging_training_stops_with_the_last_good_checkpoint(world, tmp_path, capsys, monkeypatch):
    """A loss that turns non-finite stops the run with one line naming the last good checkpoint; the bad
    step is not applied, no model or report is written, and every file it wrote is strict JSON."""
    from gqa import train as train_module

    real = train_module.lm_loss
    calls = []

    def loss_turning_nan(logits, targets):
        calls.append(1)
        return real(logits, targets) * (float("nan") if len(calls) == 4 else 1.0)

    monkeypatch.setattr(train_module, "lm_loss", loss_turning_nan)
    out = tmp_path / "run"
    argv = ["uptrain", world / "model", out, "--data", world / "text.txt", "--steps", "6", "--seq-len", "32",
            "--save-every", "2", "--batch-size", "2"]
    err = user_error(capsys, argv, "training diverged at step 4: loss nan")
    assert f"the last good checkpoint is {out}/train/checkpoints/step-0000002" in err
    assert not (out / "config.json").exists() and not (out / "train" / "report.json").exists()
    log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3]


def test_json_is_strict(tmp_path):
    from gqa.jsonfiles import write_json

    write_json(tmp_path / "r.json", {"loss": float("nan"), "rows": [float("inf"), 1.5]})
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "rows": [None, 1.5]}


def test_bench_writes_to_a_folder_named_for_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "capacity", "--quick", "--device", "cpu", "--dtype", "float32", "--memory-gb", "0.01",
            "--context", "64"]
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gqa-bench-capacity"]
    assert (tmp_path / "gqa-bench-capacity" / "bench_capacity.json").is_file()


def test_library_refuses_out_of_vocabulary_tokens(world):
    model = gqa.load(world / "model")
    with pytest.raises(gqa.GQAError, match="token ids must be in 0..319"):
        gqa.generate(model, [[1, 2, 400]], max_new_tokens=2)
    with pytest.raises(gqa.GQAError, match="token ids must be in 0..319"):
        gqa.generate(model, [[1, 2]], max_new_tokens=2, stop_tokens=[99999])
    assert torch.isfinite(model(torch.tensor([[1, 2]]))).all()


# ------------------------------------------------------------------------------------- model cards

def card(folder: Path) -> tuple[dict, str]:
    import yaml

    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_every_output_has_a_model_card(world, s2s, tmp_path, capsys):
    """convert, uptrain and export write README.md: front matter in the Hub's conventions that parses, names the
    base model (the original through a chain of steps) and no path of this machine; the body says what was
    done, what it costs and how to run it. A source's own README is not copied."""
    (world.parent / "with-readme").mkdir(exist_ok=True)
    source = world.parent / "with-readme" / "llama"
    shutil.copytree(world / "model", source, dirs_exist_ok=True)
    (source / "README.md").write_text("---\nlicense: apache-2.0\n---\n# The original model's own card\n")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "_name_or_path": "someone/tiny-llama"}))
    argv = [["convert", source, tmp_path / "mqa", "--kv-heads", "1", "--method", "aligned", "--calib", world / "text.txt",
             "--calib-tokens", "256", "--calib-seq-len", "32", "--transfer-steps", "2"],
            ["uptrain", tmp_path / "mqa", tmp_path / "up", "--data", world / "text.txt", "--steps", "2", "--seq-len", "32",
             "--batch-size", "2"],
            ["export", tmp_path / "up", tmp_path / "exported", "--format", "native"],
            ["convert", s2s / "t5", tmp_path / "t5-mqa", "--kv-heads", "1"]]
    for a in argv:
        assert main([str(x) for x in a]) == 0
    capsys.readouterr()
    for name, steps in (("mqa", ["convert"]), ("up", ["convert", "uptrain"]), ("exported", ["convert", "uptrain", "export"])):
        meta, body = card(tmp_path / name)
        assert meta["base_model"] == "someone/tiny-llama" and meta["license"] == "apache-2.0"
        assert meta["pipeline_tag"] == "text-generation" and "multi-query-attention" in meta["tags"]
        assert [s["step"] for s in meta["gqa_steps"]] == steps
        assert str(tmp_path) not in (tmp_path / name / "README.md").read_text()
        assert str(world) not in (tmp_path / name / "README.md").read_text()
        assert "The original model's own card" not in body
        assert f"| this model (F32) | {gqa.load(tmp_path / name).kv_bytes_per_token():,} |" in body
    assert meta["library_name"] == "gqa" and "no transformers class holds this KV-head layout" in body
    meta, body = card(tmp_path / "up")
    assert meta["library_name"] == "transformers" and 'AutoModelForCausalLM.from_pretrained("up")' in body
    assert "calibrated on 256 tokens of text.txt in blocks of 32" in body and "distilled from mqa" not in body
    train = json.loads((tmp_path / "up" / "train" / "report.json").read_text())
    assert f"{train['val_perplexity']:.3f} after" in body and "(never trained on;" in body
    meta, body = card(tmp_path / "t5-mqa")
    assert meta["base_model"] == "t5" and meta["pipeline_tag"] == "text2text-generation"
    assert meta["gqa_steps"][0]["kv_heads"] == {"self": [1, 1], "cross": [1, 1], "encoder": [4, 4]}
    assert "vLLM: gqa serves encoder–decoder outputs itself" in body
