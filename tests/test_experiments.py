import json

import pytest

from gqa.cli import main
from gqa.errors import GQAError


def test_paper_experiment_quick(tmp_path):
    """The paper pipeline end to end at toy size: every point the findings rest on is in results.json."""
    out = tmp_path / "paper"
    assert main(["experiment", "paper", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    points = {(r["kind"], r["kv_heads"], r["method"], r["alpha"], r["seed"]) for r in rows}
    for g in (1, 2, 4):
        for method in ("mean", "first", "random", "aligned"):
            assert ("uptrained", g, method, 0.0, 0) in points  # α = 0: the converted model
            for seed in (0, 1):  # two seeds where the conclusions rest
                assert ("uptrained", g, method, 0.05, seed) in points
        assert ("uptrained", g, "mean", 0.2, 0) in points and ("uptrained", g, "aligned", 0.2, 0) in points
        assert {("scratch", g, "scratch", None, s) for s in (0, 1)} <= points
    assert rows[0]["kind"] == "mha" and rows[0]["kv_heads"] == 8
    assert {("control", 8, "none", 0.05, s) for s in (0, 1)} <= points  # MHA uptrained the same way
    assert all(r["reference_perplexity"] == rows[0]["val_perplexity"] for r in rows)
    scratch = [r for r in rows if r["kind"] == "scratch"]
    assert all(r["tokens"] == round(20 * 1.05) * 4 * 32 for r in scratch)  # same total tokens as α = 0.05
    assert set(results["decode"]) == {"8", "1", "2", "4"}
    readme = (out / "README.md").read_text()
    assert "mean pooling > first head > random" in readme and "from scratch" in readme
    assert "uptrained the same way for α = 0.05 (control" in readme
    assert "calibrated conversion (`aligned` + layer-wise transfer) against mean pooling" in readme
    assert "| G | mean α=0 | aligned α=0 | mean α=0.05 | first α=0.05 | random α=0.05 | aligned α=0.05 |" in readme
    for name in ("quality_vs_time.png", "methods.png", "alpha.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    (out / "README.md").unlink()
    assert main(["experiment", "paper", "--report", "--out", str(out)]) == 0  # from results.json alone
    assert (out / "README.md").read_text() == readme


def test_paper_alpha_curve_without_scratch_runs(tmp_path):
    """The settings of docs/results/paper-cpu-aligned at toy size: mean vs aligned over α, no scratch runs."""
    settings = tmp_path / "s.json"
    settings.write_text(json.dumps({"kv_heads": [1], "methods": ["mean", "aligned"], "alphas": [0.005, 0.05],
                                    "seeds": [0], "scratch": False}))
    out = tmp_path / "paper"
    assert main(["experiment", "paper", "--quick", "--settings", str(settings), "--out", str(out), "--device", "cpu"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert not [r for r in rows if r["kind"] == "scratch"]
    points = {(r["method"], r["alpha"]) for r in rows if r["kind"] == "uptrained"}
    assert points == {(m, a) for m in ("mean", "aligned") for a in (0.0, 0.005, 0.05)}
    readme = (out / "README.md").read_text()
    assert "Uptraining the aligned start needs to match mean pooling uptrained for α = 0.05" in readme


def test_smollm2_experiment_quick(tmp_path):
    """SmolLM2 -> MQA, uptrained with and without distillation, at toy size: curves start at the converted model."""
    out = tmp_path / "smol"
    assert main(["experiment", "smollm2", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    plain, distilled = results["curves"]
    assert (plain["distill"], distilled["distill"]) == (False, True)
    assert plain["val_perplexity_converted"] == distilled["val_perplexity_converted"]  # the same converted model
    assert plain["val_perplexity_converted"] > 10 * results["original_perplexity"]  # MQA mean pooling hurts
    assert [t for t, _ in plain["points"]] == [0, 64, 128]
    assert results["converted_perplexity"] == {"mean": plain["val_perplexity_converted"]}
    assert (out / "recovery.png").read_bytes()[:4] == b"\x89PNG"
    readme = (out / "README.md").read_text()
    assert "Original SmolLM2-135M" in readme and "- mean: distillation from the original" in readme
    assert main(["experiment", "smollm2", "--report", "--out", str(out)]) == 0
    assert (out / "README.md").read_text() == readme


def test_experiment_settings_file(tmp_path, capsys):
    """--settings changes named fields (recorded in results.json); an unknown field is a one-line error, exit 2."""
    settings = tmp_path / "s.json"
    settings.write_text(json.dumps({"methods": ["mean", "first"], "uptrain_methods": ["mean"], "distill": [False]}))
    out = tmp_path / "smol"
    assert main(["experiment", "smollm2", "--quick", "--settings", str(settings), "--out", str(out), "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["methods"] == ["mean", "first"] and results["settings"]["steps"] == 2
    assert set(results["converted_perplexity"]) == {"mean", "first"}
    assert [(c["method"], c["distill"]) for c in results["curves"]] == [("mean", False)]
    assert f"--settings {settings}" in results["command"]
    settings.write_text(json.dumps({"pretrain_step": 5}))
    capsys.readouterr()
    assert main(["experiment", "paper", "--settings", str(settings), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "unknown settings ['pretrain_step']" in err and err.count("\n") == 1
    assert not (tmp_path / "p").exists()
    assert main(["experiment", "paper", "--report", "--out", str(tmp_path / "p")]) == 2
    assert "no results.json in" in capsys.readouterr().err


def test_paper_t5_experiment_quick(tmp_path):
    """The paper's own setting at toy size: a T5 pre-trained with span corruption, its decoder's attention
    converted and uptrained, the same architectures from scratch, and the README computed from the JSON;
    every model the findings compare is scored as it was saved (the MHA row equals its training's own
    validation, so nothing changes between training and loading)."""
    out = tmp_path / "paper-t5"
    assert main(["experiment", "paper-t5", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    points = {(r["kind"], r["kv_heads"], r["method"], r["alpha"], r["seed"]) for r in results["rows"]}
    for g in (1, 2, 4):
        for method in ("mean", "first", "random", "aligned"):
            assert ("uptrained", g, method, 0.0, 0) in points and ("uptrained", g, method, 0.05, 1) in points
        assert {("scratch", g, "scratch", None, s) for s in (0, 1)} <= points
    trained = json.loads((out / "runs" / "mha" / "train" / "report.json").read_text())
    assert abs(results["rows"][0]["val_perplexity"] - trained["val_perplexity"]) < 1e-6 * trained["val_perplexity"]
    conversion = json.loads((out / "runs" / "g1-aligned-s0" / "conversion.json").read_text())
    assert conversion["method"] == "aligned" and conversion["calibration"]["data"] == "bundled"
    assert conversion["transfer"]["steps"] == 2 and len(conversion["layers"]) == 4  # self and cross, 2 layers
    readme = (out / "README.md").read_text()
    assert "encoder–decoder (T5)" in readme and "mean pooling > first head > random" in readme
    assert "## The calibrated conversion (`aligned` + layer-wise transfer) against mean pooling" in readme


def test_model_presets_build_and_unknown_names_are_refused():
    from gqa.model import ModelConfig
    from gqa.presets import DECODERS, ENCODER_DECODERS, preset
    from gqa.seq2seq import Seq2SeqConfig

    for name in DECODERS:
        assert isinstance(preset(name), ModelConfig)
    for name in ENCODER_DECODERS:
        assert isinstance(preset(name), Seq2SeqConfig)
    assert preset("llama-1b", n_kv_heads=4).n_kv_heads == [4] * 24
    with pytest.raises(GQAError, match="unknown model preset 'llama-7b'; known: llama-1b, llama-125m, llama-tiny"):
        preset("llama-7b")
