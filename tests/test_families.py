"""Every verb on every family beyond Llama: a user's whole path from a checkpoint to a converted, uptrained,
exported model, each step's output checked. Exactness against transformers per family is tested in
test_checkpoints (logits, round trips), test_decode (cached decoding) and test_convert (converted folders)."""

import json

import pytest
import torch
from families import KV_HEADS, TEXT

import gqa
from gqa.cli import main

ARCHITECTURES = {"gemma": "GemmaForCausalLM", "phi": "PhiForCausalLM", "phi3": "Phi3ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "stablelm": "StableLmForCausalLM",
                 "gptj": "GPTJForCausalLM", "falcon": "FalconForCausalLM", "falcon_new": "FalconForCausalLM"}


def cli(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.mark.parametrize("family", list(ARCHITECTURES))
def test_every_verb_on_every_family(tiny, tmp_path, capsys, family):
    _, path = tiny(family)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    info = json.loads(cli(capsys, "info", path, "--json"))
    assert info["architecture"] == ARCHITECTURES[family] and info["kv_heads"] == [KV_HEADS[family]] * 2
    cli(capsys, "convert", path, tmp_path / "mqa", "--kv-heads", "1", "--method", "first")
    result = json.loads(cli(capsys, "eval", tmp_path / "mqa", "--data", text, "--seq-len", "32", "--json",
                            "--reference", path))
    assert result["tokens"] > 100 and 0 < result["top1_agreement"] <= 1 and result["kl"] > 1e-6  # MQA differs
    lines = cli(capsys, "generate", tmp_path / "mqa", "--prompt", "Once upon", "--max-new-tokens", "3", "--json",
                "--ignore-eos").splitlines()
    assert len(json.loads(lines[0])["tokens"]) == 3
    cli(capsys, "uptrain", tmp_path / "mqa", tmp_path / "up", "--data", text, "--steps", "2", "--seq-len", "32",
        "--batch-size", "2")
    report = json.loads((tmp_path / "up" / "train" / "report.json").read_text())
    assert report["steps"] == 2 and report["val_loss"] < 1e3
    cli(capsys, "export", tmp_path / "up", tmp_path / "exported")
    model = gqa.load(tmp_path / "exported")
    assert model.config.n_kv_heads == [1, 1]
    uptrained = gqa.load(tmp_path / "up")
    ids = torch.tensor([[5, 9, 13, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids), uptrained(ids))


@pytest.mark.parametrize("family", list(ARCHITECTURES))
def test_calibrated_methods_on_every_family(tiny, tmp_path, family):
    """aligned + transfer under a KV budget: every family's description gives the methods what they need
    (rotary pairs, q/k norms, fused layouts, biases), and the per-layer result loads and runs."""
    _, path = tiny(family)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    report = gqa.convert(path, tmp_path / "out", kv_budget=0.5, method="aligned", calib=calib, calib_tokens=256,
                         calib_seq_len=32, transfer_steps=3, progress=False)
    start = KV_HEADS[family]
    assert sum(report["kv_heads_after"]) <= start  # half of 2 layers x start heads
    assert all(start % g == 0 for g in report["kv_heads_after"])
    assert all(r["relative_error_after"] <= r["relative_error_before"] for r in report["layers"] if "relative_error_after" in r)
    model = gqa.load(tmp_path / "out")
    assert model.config.n_kv_heads == report["kv_heads_after"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 9, 13, 2, 7]]))).all()
