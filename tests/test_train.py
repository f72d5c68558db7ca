import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import user_error
from safetensors.torch import load_file

import gqa
from gqa import GQAError
from gqa.checkpoints.tokenizer import load_tokenizer
from gqa.cli import main
from gqa.data import BlockOrder, prepare
from gqa.evaluate import mean_kl
from gqa.train import TrainConfig, plan_steps, validation_loss

TRAIN = ["--seq-len", "32", "--batch-size", "8", "--lr", "2e-3", "--eval-every", "10"]


def run_cli(*argv):
    code = main([str(a) for a in argv])
    assert code == 0
    return code


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Sentences from a small grammar: learnable in seconds, with a held-out part the model has not seen."""
    rng = random.Random(0)
    nouns = "fox dog model head cache query key value group layer token".split()
    verbs = "shares reads writes keeps skips finds moves pools".split()
    adjs = "quick lazy small grouped fast sparse dense".split()
    docs = []
    for _ in range(600):
        sentences = [f"the {rng.choice(adjs)} {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)}."
                     for _ in range(rng.randint(2, 6))]
        docs.append(" ".join(sentences))
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(docs))
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus, tokenizer):
    """A tiny MHA model pre-trained by the suite (about a second on a CPU)."""
    root = tmp_path_factory.mktemp("pre")
    tokenizer.save_pretrained(root / "tok")
    (root / "cfg.json").write_text(json.dumps(dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=4,
                                                   head_dim=16, hidden_dim=128, max_positions=64)))
    run_cli("pretrain", root / "mha", "--config", root / "cfg.json", "--tokenizer", root / "tok", "--data", corpus,
            "--steps", "80", *TRAIN, "--lr", "3e-3")
    return root / "mha"


def val_loss_of(folder, corpus):
    model = gqa.load(folder)
    data = prepare(corpus, load_tokenizer(folder), 32)
    return validation_loss(model, data.val[:64], 8, "cpu", contextlib.nullcontext)


def test_alpha_semantics():
    cfg = TrainConfig(data="x", out="y", seq_len=32, batch_size=4, grad_accum=2, alpha=0.05, pretrain_tokens=2e6)
    plan = plan_steps(cfg)
    assert plan["tokens_per_step"] == 4 * 32 * 2
    assert plan["steps"] == math.ceil(0.05 * 2e6 / 256) == 391
    cfg.steps = 10  # --steps overrides α; the report states both
    plan = plan_steps(cfg)
    assert plan["steps"] == 10 and plan["alpha_tokens"] == 1e5 and plan["alpha_effective"] == 10 * 256 / 2e6


def test_split_never_overlaps_and_order_is_seeded(corpus, tokenizer):
    data = prepare(corpus, tokenizer, 32, val_fraction=0.1)
    train = {tuple(b.tolist()) for b in data.train}
    assert not train & {tuple(b.tolist()) for b in data.val}
    docs = corpus.read_text().split("\n\n")
    from gqa.data import is_validation
    val_docs = {d for d in docs if is_validation(d, 0.1)}
    assert 0 < len(val_docs) < len(docs) and not val_docs & {d for d in docs if not is_validation(d, 0.1)}
    a, b = BlockOrder(len(data.train), 1), BlockOrder(len(data.train), 1)
    first_epoch = [a[i] for i in range(len(data.train))]
    assert sorted(first_epoch) == list(range(len(data.train)))  # each block once per epoch
    assert [b[i] for i in range(len(data.train))] == first_epoch
    assert [BlockOrder(len(data.train), 2)[i] for i in range(len(data.train))] != first_epoch


def test_uptraining_recovers_a_converted_mqa_model(pretrained, corpus, tmp_path):
    mqa = tmp_path / "mqa"
    gqa.convert(pretrained, mqa, n_kv_heads=1, progress=False)
    run_cli("uptrain", mqa, tmp_path / "up", "--data", corpus, "--steps", "40", *TRAIN)
    report = json.loads((tmp_path / "up" / "train" / "report.json").read_text())
    assert report["val_loss"] < report["val_loss_initial"] - 0.15  # well below the converted model
    assert report["val_loss_initial"] == pytest.approx(val_loss_of(mqa, corpus), rel=1e-6)
    # the written model reloads with the same validation loss, in the same format it came in
    assert json.loads((tmp_path / "up" / "config.json").read_text())["architectures"] == \
        json.loads((mqa / "config.json").read_text())["architectures"]
    assert val_loss_of(tmp_path / "up", corpus) == pytest.approx(report["val_loss"], rel=1e-6)
    log = [json.loads(line) for line in (tmp_path / "up" / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(41))
    assert all({"loss", "lr", "tokens_per_s"} <= set(r) for r in log[1:])


def test_resume_after_sigkill_is_exact(pretrained, corpus, tmp_path):
    args = ["-m", "gqa", "uptrain", str(pretrained), None, "--data", str(corpus), "--steps", "20",
            "--save-every", "5", *TRAIN]
    full, part = tmp_path / "full", tmp_path / "part"
    subprocess.run([sys.executable, *[str(full) if a is None else a for a in args]], check=True, capture_output=True)
    env = dict(os.environ, GQA_TEST_STEP_DELAY="0.3")
    proc = subprocess.Popen([sys.executable, *[str(part) if a is None else a for a in args]], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = part / "train" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if log.exists() and any(json.loads(line)["step"] >= 10 for line in log.read_text().splitlines()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (part / "config.json").exists()  # killed before the end: no model written
    subprocess.run([sys.executable, *[str(part) if a is None else a for a in args], "--resume"], check=True,
                   capture_output=True)
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=0)
    records = {p: [json.loads(line) for line in (p / "train" / "log.jsonl").read_text().splitlines()] for p in (full, part)}
    assert [r["step"] for r in records[part]] == [r["step"] for r in records[full]] == list(range(21))
    loss = {p: [r["loss"] for r in rs if "loss" in r] for p, rs in records.items()}
    assert loss[part] == pytest.approx(loss[full], rel=1e-6)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(pretrained, corpus, tmp_path, strategy):
    args = ["-m", "gqa", "uptrain", str(pretrained), None, "--data", str(corpus), "--steps", "5",
            "--grad-accum", "2", *TRAIN]
    subprocess.run([sys.executable, *[str(tmp_path / "one") if a is None else a for a in args]], check=True,
                   capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = [str(tmp_path / "two") if a is None else a for a in args[2:]]
    result = subprocess.run([*torchrun, "-m", "gqa", *two, "--strategy", strategy], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    curves = [[json.loads(line).get("loss") for line in (tmp_path / d / "train" / "log.jsonl").read_text().splitlines()]
              for d in ("one", "two")]
    assert curves[1][1:] == pytest.approx(curves[0][1:], abs=1e-4)
    assert json.loads((tmp_path / "two" / "train" / "report.json").read_text())["world_size"] == 2


def test_distillation_against_the_teacher(pretrained, corpus, tmp_path):
    # a student equal to its teacher has KL 0 at the first step
    run_cli("uptrain", pretrained, tmp_path / "self", "--data", corpus, "--steps", "2", "--teacher", pretrained, *TRAIN)
    log = [json.loads(line) for line in (tmp_path / "self" / "train" / "log.jsonl").read_text().splitlines()]
    assert abs(log[1]["kl"]) < 1e-6
    assert log[2]["kl"] > 0  # after one update it no longer equals its teacher
    # a converted student differs from its MHA teacher: the logged KL is the KL against the teacher's logits
    gqa.convert(pretrained, tmp_path / "mqa", n_kv_heads=1, progress=False)
    run_cli("uptrain", tmp_path / "mqa", tmp_path / "d", "--data", corpus, "--steps", "1", "--teacher", pretrained,
            *TRAIN)
    logged = json.loads((tmp_path / "d" / "train" / "log.jsonl").read_text().splitlines()[1])["kl"]
    student, teacher = gqa.load(tmp_path / "mqa"), gqa.load(pretrained)
    data = prepare(corpus, load_tokenizer(pretrained), 32)
    blocks = BlockOrder(len(data.train), 0).batch(data.train, 0, 8)[:, :-1]
    with torch.no_grad():
        expected = mean_kl(student(blocks), teacher(blocks)).item()
    assert logged == pytest.approx(expected, rel=1e-4) and expected > 0.01


def test_distillation_alone_follows_the_teacher_not_the_text(pretrained, corpus, tmp_path, capsys):
    """--lm-weight 0 trains on KL(teacher ‖ student) alone: a student equal to its teacher gets no gradient
    at all (with the LM loss it does); a checkpoint of such a run resumes only with the same weight."""
    def first_step(out, *extra):
        run_cli("uptrain", pretrained, tmp_path / out, "--data", corpus, "--steps", "2", "--save-every", "1",
                "--teacher", pretrained, *TRAIN, *extra)
        return json.loads((tmp_path / out / "train" / "log.jsonl").read_text().splitlines()[1])

    assert first_step("kl-only", "--lm-weight", "0")["grad_norm"] == pytest.approx(0.0, abs=1e-6)
    assert first_step("both")["grad_norm"] > 0.1
    (tmp_path / "kl-only" / "config.json").unlink()  # as if killed after a checkpoint
    user_error(capsys, ["uptrain", pretrained, tmp_path / "kl-only", "--data", corpus, "--steps", "2",
                        "--save-every", "1", "--teacher", pretrained, *TRAIN, "--resume"],
               "was trained with --lm-weight 0.0 (this run: 1.0)")
    user_error(capsys, ["uptrain", pretrained, tmp_path / "o", "--data", corpus, "--steps", "1", "--lm-weight", "0",
                        "--no-teacher"], "--lm-weight 0 leaves the distillation loss alone, which needs a --teacher")


def test_mean_kl_matches_definition():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    p_t = t.softmax(-1)
    manual = (p_t * (p_t.log() - s.log_softmax(-1))).sum(-1).mean()
    assert mean_kl(s, t).item() == pytest.approx(manual.item(), rel=1e-5)
    assert mean_kl(t, t).item() == pytest.approx(0.0, abs=1e-7)


# --------------------------------------------------------------------------------------------- user errors


def test_training_errors(pretrained, corpus, tmp_path, capsys):
    out = tmp_path / "o"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    user_error(capsys, ["uptrain", pretrained, out, "--data", empty, "--steps", "1"], "holds no text")
    user_error(capsys, ["uptrain", pretrained, out, "--data", tmp_path / "missing.txt", "--steps", "1"], "no data at")
    user_error(capsys, ["uptrain", pretrained, out, "--data", corpus, "--alpha", "0.05"], "--alpha needs --pretrain-tokens")
    user_error(capsys, ["uptrain", pretrained, out, "--data", corpus, "--steps", "1", "--seq-len", "65"],
               "--seq-len 65 exceeds the model's 64 positions")
    no_tok = tmp_path / "no-tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((Path(pretrained) / name).read_bytes())
    user_error(capsys, ["uptrain", no_tok, out, "--data", corpus, "--steps", "1"], "has no tokenizer files")
    out.mkdir()
    (out / "something").write_text("x")
    user_error(capsys, ["uptrain", pretrained, out, "--data", corpus, "--steps", "1"], "already exists")
    user_error(capsys, ["uptrain", pretrained, out, "--data", corpus, "--steps", "1", "--resume"], "no checkpoint")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    user_error(capsys, ["uptrain", pretrained, tmp_path / "o2", "--data", short, "--steps", "1"], "too little")
    with pytest.raises(GQAError, match="--steps must be >= 1"):
        plan_steps(TrainConfig(data=str(corpus), out=str(tmp_path / "x"), seq_len=32, steps=0))


# --------------------------------------------------------------------------------------------- resume checks

def test_resume_refuses_a_checkpoint_trained_from_other_inputs(pretrained, corpus, tmp_path, capsys):
    """A checkpoint records what it was trained from; --resume with other data, another starting model (its
    weights replaced in place) or other data-defining settings is refused, and OUT is left as it was."""
    out = tmp_path / "run"
    run_cli("uptrain", pretrained, out, "--data", corpus, "--steps", "4", "--save-every", "2", *TRAIN)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text().replace("fox", "cat"))
    base = ["uptrain", pretrained, out, "--steps", "4", "--save-every", "2", *TRAIN, "--resume"]
    user_error(capsys, [*base, "--data", other], "was trained from another data (its tokens) than this run is given")
    user_error(capsys, [*base, "--data", corpus, "--seed", "1"], "was trained with --seed 0 (this run: 1); resume "
               "with the same settings")
    user_error(capsys, [*base[:-1], "--seq-len", "16", "--resume", "--data", corpus],
               "was trained with --seq-len 32 (this run: 16); resume")  # the data re-cut by it is not blamed
    moved = tmp_path / "new-weights"
    moved.mkdir()
    for f in Path(pretrained).iterdir():
        if f.is_file():
            (moved / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(moved / "model.safetensors"))
    weights["tok_embeddings.weight"][0, 0] += 1.0
    from safetensors.torch import save_file

    save_file(weights, str(moved / "model.safetensors"), metadata={"format": "pt"})
    user_error(capsys, ["uptrain", moved, *base[2:], "--data", corpus], "another starting model (its weights)")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_resume_takes_this_commands_learning_rate(pretrained, corpus, tmp_path):
    """`--resume --lr X` (what the divergence message suggests) trains on at X; the rest resumes exactly."""
    out = tmp_path / "run"
    args = ["uptrain", pretrained, out, "--data", corpus, "--steps", "6", "--save-every", "3", *TRAIN]
    run_cli(*args)
    first = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    (out / "config.json").unlink()  # as if killed after step 3's checkpoint... the log is cut back to it
    run_cli(*args, "--resume", "--lr", "1e-4")
    log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log[1:4]] == [r["lr"] for r in first[1:4]]  # steps 1-3: the first run's
    assert [r["lr"] for r in log[4:]] == pytest.approx([r["lr"] * 1e-4 / 2e-3 for r in first[4:]], rel=1e-9)


def test_uptraining_a_converted_model_distils_from_its_source(tmp_path, capsys):
    """`gqa uptrain` of a conversion distils from the source its conversion.json names, at the continued-
    training step size, and lowers the KL to it (the demo model, MQA by mean pooling)."""
    from gqa.demo import ASSET
    from gqa.evaluate import compare_blocks
    from gqa.train import CONTINUED_LR

    gqa.convert(ASSET, tmp_path / "mqa", n_kv_heads=1, progress=False)
    run_cli("uptrain", tmp_path / "mqa", tmp_path / "up", "--data", "bundled", "--steps", "40", "--seq-len", "64",
            "--batch-size", "4", "--eval-every", "40")
    assert f"distilling from {ASSET}" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "up" / "train" / "log.jsonl").read_text().splitlines()]
    assert all("kl" in r for r in log[1:]) and log[1]["lr"] <= CONTINUED_LR
    teacher = gqa.load(ASSET, dtype="float32")
    blocks = prepare("bundled", load_tokenizer(ASSET), 64).val[:16]
    before = compare_blocks(gqa.load(tmp_path / "mqa", dtype="float32"), blocks, teacher=teacher)["kl"]
    after = compare_blocks(gqa.load(tmp_path / "up", dtype="float32"), blocks, teacher=teacher)["kl"]
    assert after < 0.9 * before
    report = json.loads((tmp_path / "up" / "train" / "report.json").read_text())
    assert report["config"]["teacher"] == str(ASSET) and report["config"]["distill_weight"] == 1.0
