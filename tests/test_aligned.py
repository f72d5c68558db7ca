"""Calibrated conversion: the symmetries `aligned` relies on are exact, its fits beat mean pooling, transfer
is deterministic and resumable, the KV budget's choice is optimal, and bad input is refused up front."""

import itertools
import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import factor_norms, padded_batch, user_error
from families import TEXT, build, save
from safetensors.torch import load_file, save_file

import gqa
from gqa.cli import main
from gqa.conversion import aligned, budget, pooling
from gqa.conversion.calibration import Stream, build_block, calibration_blocks
from gqa.conversion.heads import AttentionWeights, RopeLayout
from gqa.demo import ASSET
from gqa.errors import GQAError

ROPE_FAMILIES = {  # every rotary layout gqa reads: full rotate-half, partial (NeoX), with q/k/v biases (Qwen2),
    "llama": dict(num_attention_heads=4, num_key_value_heads=4),  # interleaved pairs over part of the head (GPT-J)
    "gpt_neox": dict(num_attention_heads=4, rotary_pct=0.5),
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=4),
    "gptj": dict(n_head=4, rotary_dim=8),
}


def transformed(model, change):
    """A copy of `model` whose every layer's attention went through change(AttentionWeights) -> AttentionWeights."""
    out = gqa.load(model.source_dir)
    with torch.no_grad():
        for layer, block in enumerate(out.layers):
            state = {f"layers.{layer}.attention.{k}": v for k, v in block.attention.state_dict().items()}
            new = change(AttentionWeights.from_state(state, layer, out.config)).to_state(layer)
            block.attention.load_state_dict({k.split("attention.")[1]: v for k, v in new.items()})
    return out


def logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask)


@pytest.mark.parametrize("family", list(ROPE_FAMILIES))
def test_symmetries_leave_the_model_unchanged(family, tmp_path):
    model = gqa.load(save(build(family, **ROPE_FAMILIES[family]), tmp_path / family))
    rope = RopeLayout.of(model.config)
    ids, mask = padded_batch([14, 9])
    reference = logits(model, ids, mask)
    g = torch.Generator().manual_seed(0)
    D, H = model.config.head_dim, model.config.n_heads
    half = rope.rotary_dim // 2
    changes = {
        "permute heads": lambda a: a.permuted([2, 0, 3, 1]),
        "invertible V/O map per head": lambda a: a.transform_values(
            torch.randn(H, D, D, generator=g) + 3 * torch.eye(D)),
        "scaled rotation per rotary pair": lambda a: a.rotate_keys(
            torch.polar(torch.rand(H, half, generator=g, dtype=torch.float64) + 0.5,
                        torch.rand(H, half, generator=g, dtype=torch.float64) * 6.28), rope),
    }
    for name, change in changes.items():
        changed = transformed(model, change)
        first = changed.layers[0].attention.wq.weight
        assert not torch.allclose(first, model.layers[0].attention.wq.weight) or name.startswith("invertible")
        torch.testing.assert_close(logits(changed, ids, mask), reference, atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("family,overrides", [*ROPE_FAMILIES.items(), ("llama", dict(num_key_value_heads=2)),
                                               ("qwen3", {})])
def test_balancing_keeps_the_model_and_evens_each_kv_heads_factors(family, overrides, tmp_path):
    """`balanced` undoes any lopsided scale the symmetries allow (here made on purpose: a 100x on half of
    each value and each rotary pair, K/V large against Q/W_o) and leaves the logits as they were. With a q/k
    norm (qwen3) only V/W_o are rebalanced: the norm does not commute with rescaling K."""
    model = gqa.load(save(build(family, **overrides), tmp_path / family))
    rope = RopeLayout.of(model.config)
    ids, mask = padded_batch([14, 9])
    reference = logits(model, ids, mask)
    D, G = model.config.head_dim, model.config.n_kv_heads[0]
    spread = torch.ones(D).index_fill(0, torch.arange(D // 2), 100.0)

    def lopsided(a):
        a = a.transform_values(torch.diag(spread).repeat(G, 1, 1))
        if a.kn is None and a.qn is None:
            a = a.rotate_keys(torch.full((G, rope.rotary_dim // 2), 30.0, dtype=torch.complex128), rope)
        return a

    norms = []

    def balanced(a):
        lop = lopsided(a)
        out = lop.balanced(rope)
        norms.extend(zip(factor_norms(lop), factor_norms(out)))
        return out

    torch.testing.assert_close(logits(transformed(model, lopsided), ids, mask), reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(transformed(model, balanced), ids, mask), reference, atol=1e-4, rtol=0)
    for (k0, q0, v0, o0), (k, q, v, o) in norms:
        assert v0 > 10 * o0 and abs(v - o) < 1e-4 * v  # lopsided before, even after
        if family == "qwen3":
            assert (k, q) == pytest.approx((k0, q0), rel=1e-6)
        else:
            assert k0 > 3 * q0 and abs(k - q) < 1e-4 * k and k * k + q * q < k0 * k0 + q0 * q0


def test_rotations_that_do_not_commute_with_rope_change_the_model(tmp_path):
    """The check above can fail: a rotation between dims of different frequency pairs is not a symmetry."""
    model = gqa.load(save(build("llama", **ROPE_FAMILIES["llama"]), tmp_path / "m"))
    ids, mask = padded_batch([14])

    def swap_pairs(a):  # exchange two dims of different RoPE pairs in K and Q alike: q·k stays, the rotation does not
        order = torch.arange(a.head_dim)
        order[[0, 1]] = order[[1, 0]]
        order[[8, 9]] = order[[9, 8]]
        return a.with_heads(wq=a.heads("wq")[:, order], wk=a.heads("wk")[:, order])

    assert (logits(transformed(model, swap_pairs), ids, mask) - logits(model, ids, mask)).abs().max() > 1e-3


@pytest.fixture(scope="module")
def demo_layer():
    """Layer 1 of the bundled demo model (a trained MHA model, 8 heads) and its attention inputs on 4k tokens."""
    from gqa.checkpoints import files, read_model_config
    from gqa.checkpoints.tokenizer import load_tokenizer

    config, family, _ = read_model_config(ASSET)
    state = {}
    for name, tensor in files.iter_tensors(ASSET):
        state.update({k: v.float() for k, v in family.import_tensor(name, tensor, config).items()})
    blocks = calibration_blocks("shakespeare", load_tokenizer(ASSET), 4096, 128, seed=0)
    stream = Stream.start(config, state, blocks)
    stream.advance(build_block(config, 0, state))
    block = build_block(config, 1, state)
    inputs = stream.attention_inputs(block)
    return config, state, stream, inputs, stream.attention_outputs(block, inputs)


def layer_error(config, state, stream, inputs, target, merged: AttentionWeights) -> float:
    from dataclasses import replace

    cfg = replace(config, n_kv_heads=[merged.n_kv_heads] * config.n_layers)
    block = build_block(cfg, 1, {**state, **merged.to_state(1)})
    out = stream.attention_outputs(block, inputs)
    return float((out - target).pow(2).sum() / target.pow(2).sum())


def test_aligned_fits_better_than_mean_pooling_and_is_exact_at_g_equal_h(demo_layer):
    config, state, stream, inputs, target = demo_layer
    attn = AttentionWeights.from_state(state, 1, config)
    probabilities = aligned.self_attention_probabilities(build_block(config, 1, state).attention, stream.rope)
    stats = aligned.LayerInputs(inputs, False, probabilities)
    rope = RopeLayout.of(config)
    same, _ = aligned.merge(attn, 8, stats, rope)
    assert layer_error(config, state, stream, inputs, target, same) < 1e-8
    for g in (2, 1):
        mean = layer_error(config, state, stream, inputs, target, pooling.merge(attn, g, "mean", 1))
        for grouping in ("similarity", "contiguous"):
            fit = layer_error(config, state, stream, inputs, target, aligned.merge(attn, g, stats, rope, grouping)[0])
            assert fit < 0.5 * mean, (g, grouping, fit, mean)


def test_layer_over_stored_bf16_tensors_computes_as_a_float32_copy_without_one(demo_layer):
    """What keeps a 7B-geometry conversion within memory: the calibration layer holds the stored (bf16) tensors
    themselves, upcast where used, and computes exactly what a float32 copy of them would; a missing tensor is
    still an error."""
    config, state, stream, _, _ = demo_layer
    stored = {k: v.bfloat16() for k, v in state.items()}
    block, copy = build_block(config, 1, stored), build_block(config, 1, {k: v.float() for k, v in stored.items()})
    held = block.attention.wq.weight
    assert held.dtype == torch.bfloat16 and held.data_ptr() == stored["layers.1.attention.wq.weight"].data_ptr()
    assert all(p.dtype == torch.float32 for p in block.parameters())  # the norms, copied
    x = stream.hidden[:2]
    assert torch.equal(stream.attention_inputs(block), stream.attention_inputs(copy))
    assert torch.equal(block(x, rope=stream.rope), copy(x, rope=stream.rope))
    incomplete = {k: v for k, v in stored.items() if k != "layers.1.attention.wk.weight"}
    with pytest.raises(GQAError, match="layer 1: tensors missing"):
        build_block(config, 1, incomplete)


def test_whitener_factors_moments_that_round_off_made_indefinite():
    """A moment from fewer tokens than dimensions, with one eigenvalue pushed below zero as float64 round-off
    does on large layers: plain Cholesky fails there; the whitener damps until it holds, and stays exact
    (to its smallest damping) on a well-posed moment."""
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    moment = x @ x.T / 16
    values, vectors = torch.linalg.eigh(moment)
    values[0] = -1e-4 * moment.diagonal().mean()
    indefinite = vectors @ torch.diag(values) @ vectors.T
    with pytest.raises(RuntimeError):
        torch.linalg.cholesky(indefinite + 1e-6 * indefinite.diagonal().mean() * torch.eye(64, dtype=torch.float64))
    L = aligned.whitener(indefinite)
    assert torch.allclose(L @ L.T, indefinite, atol=2e-3 * moment.diagonal().mean())
    L = aligned.whitener(moment)
    assert torch.allclose(L @ L.T, moment, atol=2e-6 * moment.diagonal().mean())


def test_aligned_at_g_equal_h_returns_the_model(tiny, tmp_path):
    _, path = tiny("qwen2")  # 4 query heads, 2 KV heads, biases: the GQA source is expanded, fitted, and exact
    data = tmp_path / "calib.txt"
    data.write_text(TEXT)
    gqa.convert(path, tmp_path / "same", n_kv_heads=2, method="aligned", calib=data, calib_tokens=256,
                calib_seq_len=32, progress=False)
    ids, mask = padded_batch([12, 7])
    torch.testing.assert_close(logits(gqa.load(tmp_path / "same"), ids, mask), logits(gqa.load(path), ids, mask),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("options", [dict(method="aligned"), dict(method="mean", transfer_steps=4),
                                     dict(method="mean", joint_steps=4)])
def test_a_fitted_or_trained_conversion_writes_balanced_attention(tiny, tmp_path, options):
    """Whichever step changes the merged attention last (the fit, the transfer, the joint stage), what is
    written is balanced; mean pooling alone keeps the source's scale (the paper's recipe)."""
    _, path = tiny("llama")
    data = tmp_path / "calib.txt"
    data.write_text(TEXT)
    gqa.convert(path, tmp_path / "out", n_kv_heads=1, calib=data, calib_tokens=256, calib_seq_len=32,
                progress=False, **options)
    gqa.convert(path, tmp_path / "mean", n_kv_heads=1, progress=False)

    def norms(folder):
        model = gqa.load(folder, dtype=torch.float32)
        for i, block in enumerate(model.layers):
            state = {f"layers.{i}.attention.{k}": v for k, v in block.attention.state_dict().items()}
            yield from factor_norms(AttentionWeights.from_state(state, i, model.config))

    assert all(abs(k - q) < 1e-4 * k and abs(v - o) < 1e-4 * v for k, q, v, o in norms(tmp_path / "out"))
    assert all(abs(k - q) > 0.1 * k for k, q, v, o in norms(tmp_path / "mean"))


def test_similar_groups_finds_the_cheapest_partition():
    cost = torch.tensor([[0, 9, 1, 9], [9, 0, 9, 2], [1, 9, 0, 9], [9, 2, 9, 0]], dtype=torch.float64)
    assert aligned.similar_groups(cost, 2) == [0, 2, 1, 3]


# ------------------------------------------------------------------------------------------------ transfer

def convert_args(path, dest, data, method="aligned", steps=6):
    return ["convert", path, dest, "--kv-heads", "1", "--method", method, "--calib", data, "--calib-tokens", "512",
            "--calib-seq-len", "32", "--transfer-steps", str(steps)]


def test_transfer_lowers_the_error_and_is_deterministic(tiny, tmp_path, capsys):
    _, path = tiny("llama")
    data = tmp_path / "calib.txt"
    data.write_text(TEXT)
    for name in ("a", "b"):  # from mean pooling, which leaves plenty for transfer to fix
        assert main([str(a) for a in convert_args(path, tmp_path / name, data, "mean", 20)]) == 0
    report = json.loads((tmp_path / "a" / "conversion.json").read_text())
    assert report["transfer"]["steps"] == 20 and report["calibration"]["tokens"] == 512
    for layer in report["layers"]:
        assert layer["relative_error_after"] < 0.8 * layer["relative_error_before"]
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob(".a.resume*"))  # the resume state goes once the conversion is complete


def test_transfer_resumes_after_kill(tiny, tmp_path):
    """Killed after its first layer, the conversion resumes at the second and writes the same weights."""
    _, path = tiny("llama")
    data = tmp_path / "calib.txt"
    data.write_text(TEXT)
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([str(a) for a in convert_args(path, full, data)]) == 0
    script = f"""
import os, signal
import gqa.conversion as conversion
real = conversion.TransferState.put
def put(self, layer, merged, record):
    real(self, layer, merged, record)
    os.kill(os.getpid(), signal.SIGKILL)
conversion.TransferState.put = put
from gqa.cli import main
main({[str(a) for a in convert_args(path, part, data)]!r})
"""
    assert subprocess.run([sys.executable, "-c", script]).returncode == -signal.SIGKILL
    [state] = tmp_path.glob(".part.resume-*")
    assert not part.exists() and (state / "layer-00000.safetensors").is_file()
    result = subprocess.run([sys.executable, "-m", "gqa", *map(str, convert_args(path, part, data))],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "resuming the work saved in" in result.stderr
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


KILL_AFTER_FIRST_LAYER = """
import os, signal, sys
import gqa.conversion as conversion
real = conversion.TransferState.put
def put(self, layer, merged, record):
    real(self, layer, merged, record)
    os.kill(os.getpid(), signal.SIGKILL)
conversion.TransferState.put = put
from gqa.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("changed", ["model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight",
                                     "model.layers.1.mlp.up_proj.weight"])
def test_transfer_resume_after_the_source_changed_is_a_run_on_the_new_source(tiny, tmp_path, changed):
    """Killed after layer 0, then the source's weights are replaced in place (same path, same shapes): the
    resumed conversion equals an uninterrupted one on the new weights. A saved layer computed from weights
    that changed (the embeddings or layer 0 itself) is transferred again, with a warning; one whose inputs
    did not change (layer 0 when only layer 1 changed) is kept."""
    _, path = tiny("llama")
    source = tmp_path / "source"
    shutil.copytree(path, source)
    data = tmp_path / "calib.txt"
    data.write_text(TEXT)
    part = tmp_path / "part"
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_LAYER, *map(str, convert_args(source, part, data))])
    assert killed.returncode == -signal.SIGKILL
    weights = load_file(str(source / "model.safetensors"))
    weights[changed] = weights[changed] + 0.01 * torch.randn_like(weights[changed])
    save_file(weights, str(source / "model.safetensors"), metadata={"format": "pt"})
    fresh = tmp_path / "fresh"
    assert main([str(a) for a in convert_args(source, fresh, data)]) == 0
    result = subprocess.run([sys.executable, "-m", "gqa", *map(str, convert_args(source, part, data))],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "resuming the work saved in" in result.stderr, result.stderr
    redone = "the source's weights differ from those the interrupted work" in result.stderr
    assert redone == (changed != "model.layers.1.mlp.up_proj.weight")
    a, b = load_file(str(fresh / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob(".part.resume*"))


def test_a_transfer_with_other_settings_is_not_resumed(tiny, tmp_path):
    _, path = tiny("llama")
    data = tmp_path / "calib.txt"
    data.write_text(TEXT)
    part = tmp_path / "part"
    subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_LAYER, *map(str, convert_args(path, part, data))])
    [state] = tmp_path.glob(".part.resume-*")
    result = subprocess.run([sys.executable, "-m", "gqa", *map(str, convert_args(path, part, data, steps=7))],
                            capture_output=True, text=True)
    assert result.returncode == 0
    assert f"removed {state}: work on part interrupted with other settings" in result.stderr
    assert "resuming" not in result.stderr and not list(tmp_path.glob(".part.resume*"))


def test_a_plain_conversion_removes_a_stale_transfer_and_says_so(tiny, tmp_path, capsys):
    _, path = tiny("llama")
    data = tmp_path / "calib.txt"
    data.write_text(TEXT)
    part = tmp_path / "part"
    subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_LAYER, *map(str, convert_args(path, part, data))])
    [state] = tmp_path.glob(".part.resume-*")
    assert main(["convert", str(path), str(part), "--kv-heads", "2"]) == 0
    err = capsys.readouterr().err
    assert f"gqa: warning: removed {state} (" in err and "MB), left by interrupted work on part" in err
    assert not state.exists() and (part / "config.json").is_file()


def test_a_transfer_that_fails_on_bad_weights_leaves_nothing(tiny, tmp_path, capsys):
    _, path = tiny("llama")
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    weights = load_file(str(bad / "model.safetensors"))
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    data = tmp_path / "calib.txt"
    data.write_text(TEXT)
    before = sorted(p.name for p in tmp_path.iterdir())
    user_error(capsys, convert_args(bad, tmp_path / "new" / "nested" / "out", data), "holds NaN or Inf")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no state, no partial, no empty parents


# ------------------------------------------------------------------------------------------------ budget

def test_budget_choice_is_the_best_within_the_budget():
    g = torch.Generator().manual_seed(1)
    current = [4, 4, 4, 4, 2]
    sensitivity = [{d: float(torch.rand(1, generator=g)) * (4 - d) for d in budget.divisors(n)[:-1]} for n in current]
    allowed = budget.check_budget(0.5, current)
    choice = budget.choose(sensitivity, current, allowed)

    def cost(c):
        return sum(sensitivity[i].get(x, 0.0) for i, x in enumerate(c))

    feasible = [c for c in itertools.product(*[budget.divisors(n) for n in current]) if sum(c) <= allowed]
    assert sum(choice) <= allowed and cost(choice) == pytest.approx(min(cost(c) for c in feasible))


def test_kv_budget_writes_a_per_layer_model_with_its_reasons(tmp_path):
    data = "shakespeare"
    report = gqa.convert(ASSET, tmp_path / "b", kv_budget=0.25, method="aligned", calib=data, calib_tokens=1024,
                         calib_seq_len=128, progress=False)
    chosen = report["kv_heads_after"]
    assert sum(chosen) <= 0.25 * 8 * 4 and all(8 % g == 0 for g in chosen)
    record = report["kv_budget"]
    assert record["kv_heads"] == chosen and record["fraction"] == 0.25
    assert [sorted(map(int, s)) for s in record["sensitivity"]] == [[1, 2, 4]] * 4
    assert gqa.load(tmp_path / "b").config.n_kv_heads == chosen
    assert report["kv_bytes_per_token_after"] == sum(chosen) * 2 * 32 * 2


@pytest.mark.parametrize("argv", [["--method", "aligned"], ["--joint-steps", "1"]])
def test_calibration_text_defaults_to_the_general_mix(tiny, tmp_path, capsys, argv):
    """Without --calib, what reads calibration text reads the bundled `general` mix (its training split)."""
    _, path = tiny("llama")
    assert main(["convert", str(path), str(tmp_path / "out"), "--kv-heads", "1", *argv, "--calib-tokens", "256",
                 "--calib-seq-len", "64"]) == 0
    report = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert report["calibration"] == {"data": "general", "tokens": 256, "seq_len": 64, "tokens_used": 256}


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("argv,message", [
    (["--kv-heads", "1", "--method", "aligned", "--calib", "{w}/missing.txt"], "no data at"),
    (["--kv-heads", "1", "--method", "aligned", "--calib", "{w}/empty.txt"], "holds no text"),
    (["--kv-heads", "1", "--method", "aligned", "--calib", "{w}/calib.txt", "--calib-tokens", "1000000"],
     "--calib-tokens 1,000,000 needs more text"),
    (["--kv-budget", "0", "--calib", "{w}/calib.txt"], "argument --kv-budget: must be a finite number in (0, 1]"),
    (["--kv-budget", "1.5", "--calib", "{w}/calib.txt"], "argument --kv-budget: must be a finite number in (0, 1]"),
    (["--kv-budget", "0.2", "--calib", "{w}/calib.txt"], "fewer than one per layer"),
    (["--kv-budget", "0.5", "--kv-heads", "2", "--calib", "{w}/calib.txt"], "give exactly one of --kv-heads"),
    (["--kv-heads", "1", "--transfer-steps", "-1", "--calib", "{w}/calib.txt"],
     "argument --transfer-steps: must be >= 0, got -1"),
    (["--kv-heads", "1", "--method", "aligned", "--calib", "{w}/calib.txt", "--grouping", "random"],
     "argument --grouping: invalid choice"),
])
def test_calibration_bad_input(tiny, tmp_path, capsys, argv, message):
    _, path = tiny("llama")  # 2 layers of 4 KV heads: the smallest budget is 2/8
    (tmp_path / "calib.txt").write_text(TEXT)
    (tmp_path / "empty.txt").write_text("\n\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    user_error(capsys, ["convert", path, tmp_path / "out", *[a.format(w=tmp_path) for a in argv]], message)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())

