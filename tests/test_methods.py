"""Conversion methods behind one interface: every registered method runs on every family through one code
path, a method registered anywhere is offered by the CLI with its own options, and the joint stage
(attention trained end to end against the source) lowers the KL, resumes to the same bytes, and refuses
bad settings."""

import dataclasses
import json
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from conftest import user_error
from families import KV_HEADS, TEXT
from safetensors.torch import load_file

import gqa
from gqa.cli import main
from gqa.conversion import methods, pooling
from gqa.conversion.interface import Method, setting


@pytest.mark.parametrize("method", list(methods.REGISTRY))
def test_every_method_on_every_family(tiny, tmp_path, family, method):
    _, path = tiny(family)
    g = 1 if KV_HEADS[family] > 1 else None
    if g is None:
        pytest.skip("already multi-query")
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    options = dict(calib=calib, calib_tokens=256, calib_seq_len=32) if methods.get(method).calibrated else {}
    report = gqa.convert(path, tmp_path / "out", n_kv_heads=g, method=method, progress=False, **options)
    model = gqa.load(tmp_path / "out")
    assert report["method"] == method and model.config.n_kv_heads == [1] * model.config.n_layers
    assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]]))).all()


@dataclass(frozen=True)
class PickSettings:
    which: int = setting(-1, "which head of each group keeps its K/V (-1: the last)")


def pick_head(attn, n_kv_heads, layer, settings):
    """A trivial method for the test: each group keeps one of its heads, chosen by --which."""
    def pick(t):
        if t is None:
            return None
        grouped = t.reshape(n_kv_heads, attn.n_kv_heads // n_kv_heads, -1, *t.shape[1:])
        return grouped[:, settings.which].reshape(-1, *t.shape[1:]).contiguous()
    return dataclasses.replace(attn, wk=pick(attn.wk), wv=pick(attn.wv), bk=pick(attn.bk), bv=pick(attn.bv)), \
        {"picked": settings.which}


def test_a_registered_method_is_offered_by_the_cli_with_its_options(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, "pick", Method("pick", "each group keeps one head", pick_head, PickSettings))
    _, path = tiny("llama")
    assert main(["convert", path, str(tmp_path / "last"), "--kv-heads", "2", "--method", "pick"]) == 0
    assert main(["convert", path, str(tmp_path / "first"), "--kv-heads", "2", "--method", "pick", "--which", "0"]) == 0
    assert main(["convert", path, str(tmp_path / "ref"), "--kv-heads", "2", "--method", "first"]) == 0
    first, ref = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("first", "ref"))
    assert all(torch.equal(first[k], ref[k]) for k in ref)  # --which 0 is `first`
    last = load_file(str(tmp_path / "last" / "model.safetensors"))
    k = "model.layers.0.self_attn.k_proj.weight"
    assert not torch.equal(last[k], ref[k])
    report = json.loads((tmp_path / "first" / "conversion.json").read_text())
    assert report["method_settings"] == {"which": 0}
    capsys.readouterr()
    user_error(capsys, ["convert", path, tmp_path / "x", "--kv-heads", "2", "--method", "mean", "--which", "1"],
               "--which is an option of --method pick; --method mean does not use it")
    user_error(capsys, ["convert", path, tmp_path / "x", "--kv-heads", "2", "--method", "pick", "--grouping",
                        "contiguous"], "--grouping is an option of --method aligned; --method pick does not use it")


def test_methods_take_keyword_settings_in_the_api(tiny, tmp_path):
    _, path = tiny("llama")
    with pytest.raises(gqa.GQAError, match="--grouping is an option of --method aligned"):
        gqa.convert(path, tmp_path / "x", n_kv_heads=2, method="mean", grouping="contiguous", progress=False)
    with pytest.raises(TypeError):  # keyword-only: a positional KV-head count is a mistake, not a guess
        gqa.convert(path, tmp_path / "x", 2)
    from gqa.conversion import ConversionOptions

    with pytest.raises(TypeError, match="options= or keyword options, not both"):  # the keywords would be dropped
        gqa.convert(path, tmp_path / "x", options=ConversionOptions(n_kv_heads=2), method="first")
    assert pooling.MEAN is methods.get("mean")


# ------------------------------------------------------------------------------------------------ joint stage

def joint_args(path, dest, data, steps=6):
    return ["convert", path, dest, "--kv-heads", "1", "--method", "mean", "--calib", data, "--calib-tokens", "512",
            "--calib-seq-len", "32", "--joint-steps", str(steps)]


KILL_AFTER_FIRST_CHECKPOINT = """
import os, signal, sys
from gqa.conversion import resume
real = resume.ResumeState.put_joint
def put_joint(self, *args):
    real(self, *args)
    os.kill(os.getpid(), signal.SIGKILL)
resume.ResumeState.put_joint = put_joint
from gqa.cli import main
main(sys.argv[1:])
"""


def test_joint_stage_lowers_the_kl_and_resumes_to_the_same_bytes(tiny, tmp_path):
    _, path = tiny("llama")
    data = tmp_path / "calib.txt"
    data.write_text(TEXT)
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([str(a) for a in joint_args(path, full, data, steps=25)]) == 0
    record = json.loads((full / "conversion.json").read_text())["joint"]
    assert record["steps"] == 25 and record["kl_after"] < 0.8 * record["kl_before"]
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_CHECKPOINT,
                             *map(str, joint_args(path, part, data, steps=25))])
    assert killed.returncode == -signal.SIGKILL and not part.exists()
    [state] = tmp_path.glob(".part.resume-*")
    assert json.loads((state / "joint.json").read_text())["step"] == 10
    done = subprocess.run([sys.executable, "-m", "gqa", *map(str, joint_args(path, part, data, steps=25))],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "resuming the work saved in" in done.stderr
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob(".part.resume*"))


CALIB = ["--calib", "{data}", "--calib-tokens", "512", "--calib-seq-len", "32"]


@pytest.mark.parametrize("argv,message", [
    (["--joint-steps", "-1", *CALIB], "argument --joint-steps: must be >= 0, got -1"),
    (["--joint-steps", "5", "--joint-lr", "nan", *CALIB], "argument --joint-lr: must be a finite number > 0, got nan"),
    (["--joint-steps", "5", "--joint-lr", "0", *CALIB], "argument --joint-lr: must be a finite number > 0, got 0"),
    (["--joint-lr", "0.01"], "--joint-lr sets the joint stage, which runs only with --joint-steps N"),
])
def test_joint_stage_bad_values(tiny, tmp_path, capsys, argv, message):
    _, path = tiny("llama")
    data = tmp_path / "calib.txt"
    data.write_text(TEXT)
    base = ["convert", path, tmp_path / "out", "--kv-heads", "1"]
    user_error(capsys, [*base, *[a.format(data=data) for a in argv]], message)
    assert not (tmp_path / "out").exists()


