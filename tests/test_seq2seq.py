"""Encoder–decoder models (T5 v1.0, v1.1 / Flan-T5, UMT5, BART), the GQA paper's own setting: logits equal
to transformers', cached decoding equal to the full forward, exact round trips at G = H, the decoder's
self- and cross-attention grouped with caches of G heads, span corruption, pair scoring the way
transformers scores `labels=`, uptraining that resumes exactly, and bad input refused up front."""

import json
import random

import pytest
import torch
import transformers
from conftest import factor_norms, user_error
from families import TEXT, train_tokenizer
from safetensors.torch import load_file

import gqa
from gqa.cli import main
from gqa.conversion.heads import AttentionWeights
from gqa.conversion.pooling import pool_heads
from gqa.generate import generate_seq2seq
from gqa.info import describe
from gqa.seq2seq_data import corrupt, prepare_seq2seq

SENTINELS = 8
TINY = dict(vocab_size=336, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4)
CONFIGS = {  # name -> config class, settings (T5 ids are set from the tokenizer below)
    "t5": (transformers.T5Config, dict(TINY, num_decoder_layers=3, feed_forward_proj="relu")),  # v1.0: tied, scaled
    "t5-v1.1": (transformers.T5Config, dict(TINY, feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "t5-v1.1-tied": (transformers.T5Config, dict(TINY, feed_forward_proj="gated-gelu")),  # tied: scaled, in T5
    # mT5 as the installed transformers writes it: tie_word_embeddings true, no lm_head, no scale field; its
    # MT5 does not scale the decoder output (transformers 5), where T5 would
    "mt5": (transformers.MT5Config, dict(TINY, feed_forward_proj="gated-gelu")),
    "mt5-untied": (transformers.MT5Config, dict(TINY, feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "umt5": (transformers.UMT5Config, dict(TINY, feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "bart": (transformers.BartConfig, dict(vocab_size=336, d_model=64, encoder_layers=2, decoder_layers=2,
                                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
                                           decoder_ffn_dim=96, max_position_embeddings=128)),
}


@pytest.fixture(scope="module")
def seq2seq_tokenizer():
    tok = train_tokenizer()
    tok.add_special_tokens({"pad_token": "<pad>", "mask_token": "<mask>",
                            "additional_special_tokens": [f"<extra_id_{i}>" for i in range(SENTINELS)]})
    return tok


@pytest.fixture(scope="module")
def models(tmp_path_factory, seq2seq_tokenizer):
    """name -> (transformers model, folder), random weights with non-trivial norms and biases."""
    tok, out = seq2seq_tokenizer, {}
    for name, (cls, settings) in CONFIGS.items():
        ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        model = transformers.AutoModelForSeq2SeqLM.from_config(cls(**settings, **ids)).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n or n.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.1)
            if hasattr(model, "final_logits_bias"):
                model.final_logits_bias.normal_()
        if settings.get("tie_word_embeddings") is False:  # Flan-T5's own head (transformers 5 ties it regardless)
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.05)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[name] = (model, folder)
    return out


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask, torch.randint(3, 300, (2, 7), generator=g)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_transformers(models, name):
    reference, folder = models[name]
    ids, mask, dec = batch()
    ours = gqa.load(folder, dtype="float32")
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(ours(ids, dec, attention_mask=mask), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_equals_the_full_forward(models, name):
    _, folder = models[name]
    model = gqa.load(folder, dtype="float32")
    ids, mask, dec = batch()
    full = model(ids, dec, attention_mask=mask)
    encoded = model.encode(ids, mask)
    cache = model.new_cache(2, dec.shape[1])
    steps = torch.cat([model.decode(dec[:, t:t + 1], encoded, cache=cache) for t in range(dec.shape[1])], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_at_g_equals_h_is_exact(models, tmp_path, name):
    _, folder = models[name]
    gqa.save(gqa.load(folder), tmp_path / "back")
    a, b = load_file(str(folder / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["architectures"] == json.loads((folder / "config.json").read_text())["architectures"]


def test_t5_layouts_are_written_as_their_own_class(models, tmp_path, capsys):
    """Each T5 layout is read as the installed transformers reads it and written back as its own class; an
    mT5 config gets no scale_decoder_outputs (its class has none), and a model it cannot hold is refused."""
    from dataclasses import replace

    from gqa.checkpoints.seq2seq import mt5_scales_tied_output
    from gqa.errors import GQAError

    for name, architecture in (("mt5", "MT5ForConditionalGeneration"), ("umt5", "UMT5ForConditionalGeneration"),
                               ("t5-v1.1", "T5ForConditionalGeneration")):
        model = gqa.load(models[name][1])
        gqa.save(model, tmp_path / name)
        written = json.loads((tmp_path / name / "config.json").read_text())
        assert written["architectures"] == [architecture]
        assert ("scale_decoder_outputs" in written) == (name != "mt5")
    assert main(["export", str(models["mt5"][1]), str(tmp_path / "exported")]) == 0
    assert f"wrote {tmp_path / 'exported'} as MT5ForConditionalGeneration" in capsys.readouterr().out
    mt5 = gqa.load(models["mt5"][1])
    assert mt5.config.tie_embeddings and mt5.config.output_scale == (64 ** -0.5 if mt5_scales_tied_output() else 1.0)
    scaled = replace(mt5.config, output_scale=1.0 if mt5_scales_tied_output() else 64 ** -0.5)
    mt5.config = scaled
    with pytest.raises(GQAError, match="mt5's config.json cannot express this model .*output_scale"):
        gqa.save(mt5, tmp_path / "scaled")
    assert not (tmp_path / "scaled").exists()


@pytest.mark.parametrize("name", ["t5-v1.1", "bart"])
def test_mean_pooling_groups_self_and_cross_attention(models, tmp_path, name):
    _, folder = models[name]
    source = gqa.load(folder, dtype="float32")
    report = gqa.convert(folder, tmp_path / "g2", n_kv_heads=2, progress=False)
    assert report["architecture"] == "GQASeq2SeqLM" and report["converted"] == ["self", "cross"]
    merged = gqa.load(tmp_path / "g2", dtype="float32")
    assert merged.config.self_kv_heads == merged.config.cross_kv_heads == [2] * merged.config.n_decoder_layers
    assert merged.config.encoder_kv_heads == source.config.encoder_kv_heads  # the encoder is left alone
    s, m = source.state_dict(), merged.state_dict()
    for module in ("attention", "cross"):
        for part in ("wk", "wv"):
            key = f"decoder.layers.0.{module}.{part}.weight"
            explicit = s[key].view(2, 2, 16, 64).mean(1).reshape(32, 64)  # each group's two heads averaged
            torch.testing.assert_close(m[key], explicit)
    ids, mask, dec = batch()
    same = gqa.convert(folder, tmp_path / "g4", n_kv_heads=4, progress=False)  # G = H: nothing changes
    assert same["kv_reduction"] == 1.0
    torch.testing.assert_close(gqa.load(tmp_path / "g4", dtype="float32")(ids, dec, attention_mask=mask),
                               source(ids, dec, attention_mask=mask), atol=0, rtol=0)


def test_caches_hold_g_heads(models, tmp_path):
    _, folder = models["t5"]
    gqa.convert(folder, tmp_path / "mqa", n_kv_heads=1, progress=False)
    model = gqa.load(tmp_path / "mqa", dtype="float32")
    ids, mask, _ = batch()
    encoded, cache = model.encode(ids, mask), model.new_cache(2, 5)
    c = model.config
    assert cache.bytes() == 2 * 5 * c.kv_bytes_per_token(4)  # 2 sequences x 5 generated tokens
    assert encoded.bytes() == 2 * 9 * c.kv_bytes_per_source_token(4)  # 2 sources x 9 tokens
    assert all(k.shape[1] == 1 for k in cache.keys) and all(k.shape[1] == 1 for k, _ in encoded.cross_kv)
    info = describe(tmp_path / "mqa")
    assert info["kv_bytes_per_token"] == c.kv_bytes_per_token(4) and info["cross_kv_heads"] == [1, 1, 1]


def test_convert_encoder_groups_the_encoder_too(models, tmp_path):
    _, folder = models["t5"]
    report = gqa.convert(folder, tmp_path / "all", n_kv_heads=2, encoder=True, progress=False)
    assert report["encoder_kv_heads_after"] == [2, 2] and report["converted"] == ["self", "cross", "encoder"]


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_calibration_sees_what_transformers_attends(models, seq2seq_tokenizer, name):
    """What `aligned` weights its fits with: every attention's source probabilities on the recorded inputs
    equal transformers' attention weights (T5's relative bias and unscaled scores, BART's scale, the causal
    mask); cross-attention's keys read the encoder's output."""
    from gqa.conversion.seq2seq_calibration import calibration_examples, calibrations

    reference, folder = models[name]
    ours = gqa.load(folder, dtype="float32")
    ids, labels = calibration_examples("wiki", seq2seq_tokenizer, 256, 64, seed=0)
    c = ours.config
    layers = [("encoder", i) for i in range(c.n_encoder_layers)] + \
        [(kind, i) for kind in ("self", "cross") for i in range(c.n_decoder_layers)]
    fits = calibrations(ours, ids, labels, layers)
    reference.set_attn_implementation("eager")  # the implementation that returns its attention weights
    with torch.no_grad():
        out = reference(input_ids=ids, decoder_input_ids=ours.shift_right(labels), output_attentions=True)
    expected = {"encoder": out.encoder_attentions, "self": out.decoder_attentions, "cross": out.cross_attentions}
    for kind, i in layers:
        c = fits[kind, i]
        probs = c.probabilities(c.x if c.queries is None else c.queries, c.x)
        torch.testing.assert_close(probs, expected[kind][i], atol=1e-5, rtol=0)
    torch.testing.assert_close(fits["cross", 0].x, out.encoder_last_hidden_state, atol=1e-5, rtol=0)


def held_out_kl(folder, tokenizer):
    """path -> KL(source ‖ model) per target token on held-out wiki examples (what no calibration read)."""
    from gqa.seq2seq_data import eval_examples

    source = gqa.load(folder, dtype="float32")
    held_out = eval_examples("wiki", tokenizer, 64, max_tokens=1500)
    dec = source.shift_right(held_out.labels)

    def kl(path) -> float:
        model = gqa.load(path, dtype="float32")
        with torch.no_grad():
            p = source(held_out.input_ids, dec, attention_mask=held_out.input_mask).log_softmax(-1)
            q = model(held_out.input_ids, dec, attention_mask=held_out.input_mask).log_softmax(-1)
        return float((p.exp() * (p - q)).sum(-1)[held_out.labels != -100].mean())

    return kl


def assert_balanced(path):
    """Every decoder self- and cross-attention of `path` balanced (AttentionWeights.balanced)."""
    converted = gqa.load(path, dtype="float32")
    for block in converted.decoder.layers:
        for m in (block.attention, block.cross):
            attn = AttentionWeights(wq=m.wq.weight, wk=m.wk.weight, wv=m.wv.weight, wo=m.wo.weight, bq=m.wq.bias,
                                    bk=m.wk.bias, bv=m.wv.bias, head_dim=converted.config.head_dim)
            (k, q, v, o), = factor_norms(attn)
            assert abs(k - q) < 1e-4 * k and abs(v - o) < 1e-4 * v


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_transfer_targets_are_what_each_attention_outputs(models, seq2seq_tokenizer, name):
    """What the layer-wise transfer trains towards: each attention's outputs recomputed from its recorded
    inputs and `scores_mask` equal what it output in the model's own forward (bias, causal mask, cross keys)."""
    from gqa.conversion.seq2seq_calibration import attention_module, calibration_examples, calibrations, transfer_data

    ours = gqa.load(models[name][1], dtype="float32")
    ids, labels = calibration_examples("wiki", seq2seq_tokenizer, 256, 64, seed=0)
    c = ours.config
    layers = [("encoder", i) for i in range(c.n_encoder_layers)] + \
        [(kind, i) for kind in ("self", "cross") for i in range(c.n_decoder_layers)]
    seen = {}
    hooks = [attention_module(ours, *key).register_forward_hook(lambda m, a, out, key=key: seen.setdefault(key, out))
             for key in layers]
    with torch.no_grad():
        ours(ids, ours.shift_right(labels))
    for hook in hooks:
        hook.remove()
    fits = calibrations(ours, ids, labels, layers)
    for key in layers:
        torch.testing.assert_close(transfer_data(ours, *key, fits[key]).targets, seen[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_transfer_and_joint_stage_bring_mean_pooling_closer_to_the_source(models, tmp_path, seq2seq_tokenizer, capsys,
                                                                          name):
    """MQA by mean pooling, then each grouped attention trained on calibration text to give its source's
    outputs: every attention's error goes down and the model is closer to the source on held-out text; the
    joint stage after it brings it closer still; both outputs are balanced."""
    _, folder = models[name]
    kl = held_out_kl(folder, seq2seq_tokenizer)

    gqa.convert(folder, tmp_path / "mean", n_kv_heads=1, progress=False)
    report = gqa.convert(folder, tmp_path / "transfer", n_kv_heads=1, calib="wiki", calib_tokens=2048,
                         calib_seq_len=64, transfer_steps=60, progress=False)
    assert report["transfer"]["steps"] == 60 and report["transfer"]["inputs"] == "original"
    for record in report["layers"]:
        assert record["relative_error_after"] < 0.9 * record["relative_error_before"], record
    assert kl(tmp_path / "transfer") < 0.8 * kl(tmp_path / "mean")
    capsys.readouterr()
    assert main(["convert", str(folder), str(tmp_path / "joint"), "--kv-heads", "1", "--calib", "wiki",
                 "--calib-tokens", "2048", "--calib-seq-len", "64", "--transfer-steps", "60", "--joint-steps", "30"]) == 0
    said = capsys.readouterr().out
    assert "transfer 60 steps per attention (attention output error, mean over attentions:" in said
    assert "joint stage 30 steps (KL to the source" in said
    report = json.loads((tmp_path / "joint" / "conversion.json").read_text())
    assert report["joint"]["steps"] == 30 and report["joint"]["kl_after"] < report["joint"]["kl_before"]
    assert kl(tmp_path / "joint") < kl(tmp_path / "transfer")
    for out in ("transfer", "joint"):
        assert_balanced(tmp_path / out)


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_aligned_stays_closer_to_the_source_than_mean_pooling(models, tmp_path, seq2seq_tokenizer, name):
    """MQA decoder self- and cross-attention: `aligned` calibrated on one split, scored on held-out text
    (KL from the source's next-token distribution) against mean pooling of the same weights."""
    _, folder = models[name]
    kl = held_out_kl(folder, seq2seq_tokenizer)

    gqa.convert(folder, tmp_path / "mean", n_kv_heads=1, progress=False)
    report = gqa.convert(folder, tmp_path / "aligned", n_kv_heads=1, method="aligned", calib="wiki",
                         calib_tokens=2048, calib_seq_len=64, progress=False)
    assert report["calibration"] == {"data": "wiki", "tokens": 2048, "seq_len": 64, "tokens_used": 2048}
    decoder_layers = range(gqa.load(folder).config.n_decoder_layers)
    assert [(r["attention"], r["layer"]) for r in report["layers"]] == \
        [(kind, i) for kind in ("self", "cross") for i in decoder_layers]
    assert kl(tmp_path / "aligned") < 0.5 * kl(tmp_path / "mean")
    assert_balanced(tmp_path / "aligned")  # AttentionWeights.balanced


def test_generation_is_greedy_over_the_full_forward(models):
    _, folder = models["bart"]
    model = gqa.load(folder, dtype="float32")
    sources = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    outs = generate_seq2seq(model, sources, max_new_tokens=6)
    for source, out in zip(sources, outs):
        dec = torch.tensor([[model.config.decoder_start_token_id, *out[:-1]]])
        assert model(torch.tensor([source]), dec).argmax(-1)[0].tolist() == out


def test_span_corruption_keeps_every_token(seq2seq_tokenizer):
    block = list(range(100, 164))
    markers = [seq2seq_tokenizer.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(SENTINELS)]
    inputs, targets = corrupt(block, random.Random(0), "span corruption", markers, eos=0)
    assert inputs[-1] == targets[-1] == 0
    spans, span = {}, None  # reassemble: each sentinel of the input replaced by what the target lists after it
    for t in targets[:-1]:
        if t in markers:
            span = t
            spans[span] = []
        else:
            spans[span].append(t)
    rebuilt = [x for t in inputs[:-1] for x in (spans[t] if t in markers else [t])]
    assert rebuilt == block and 0.1 < sum(len(v) for v in spans.values()) / len(block) < 0.2
    assert corrupt(block, random.Random(0), "span corruption", markers, eos=0) == (inputs, targets)


def test_pairs_score_as_transformers_scores_labels(models, tmp_path, seq2seq_tokenizer, capsys):
    reference, folder = models["t5-v1.1"]
    tok = seq2seq_tokenizer
    rows = [{"input": f"question {i}: the quick brown fox", "target": f"answer {i} the lazy dog"} for i in range(6)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    nll = count = 0
    for r in rows:
        ids, labels = (tok(r[k])["input_ids"] + [tok.eos_token_id] for k in ("input", "target"))
        with torch.no_grad():
            nll += reference(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item() * len(labels)
        count += len(labels)
    assert main(["eval", str(folder), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == count and result["loss"] == pytest.approx(nll / count, rel=1e-5)


def test_uptraining_on_pairs_counts_the_target_tokens_it_reads(models, tmp_path, seq2seq_tokenizer, capsys):
    """Tokens and α of a run on pairs are the target tokens its steps read (padding is none): --steps reports
    them; --alpha runs until α × --pretrain-tokens of them are read, and no step longer."""
    from gqa.data import BlockOrder

    _, folder = models["t5"]
    rows = [{"input": f"question {i}: " + "the quick brown fox " * (i % 5), "target": "answer " * (1 + i % 7)}
            for i in range(40)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    lengths = (prepare_seq2seq(data, seq2seq_tokenizer, 64).train.labels != -100).sum(-1).tolist()
    order = BlockOrder(len(lengths), 0)
    per_step = [sum(lengths[order[i]] for i in range(s * 4, s * 4 + 4)) for s in range(40)]
    common = ["--data", data, "--seq-len", "64", "--batch-size", "4", "--no-teacher", "--eval-every", "100"]
    assert main([str(a) for a in ["uptrain", folder, tmp_path / "a", "--steps", "3", *common]]) == 0
    report = json.loads((tmp_path / "a" / "train" / "report.json").read_text())
    assert report["tokens"] == sum(per_step[:3]) < 3 * 4 * 64
    assert f"trained 3 steps, {sum(per_step[:3]):,} target tokens" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "a" / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in log] == [0, per_step[0], sum(per_step[:2]), sum(per_step[:3])]
    assert main([str(a) for a in ["uptrain", folder, tmp_path / "b", "--alpha", "0.5", "--pretrain-tokens", "200",
                                  *common]]) == 0
    report = json.loads((tmp_path / "b" / "train" / "report.json").read_text())
    steps = report["steps"]
    assert sum(per_step[:steps - 1]) < 100 <= sum(per_step[:steps]) == report["tokens"]
    assert report["alpha_effective"] == pytest.approx(report["tokens"] / 200)


def test_uptraining_on_pairs_and_on_text_resumes_exactly(models, tmp_path, seq2seq_tokenizer):
    _, folder = models["t5"]
    gqa.convert(folder, tmp_path / "mqa", n_kv_heads=1, progress=False)
    data = tmp_path / "text.txt"
    data.write_text(TEXT * 4)
    args = ["uptrain", tmp_path / "mqa", tmp_path / "up", "--data", data, "--steps", "6", "--seq-len", "32",
            "--batch-size", "4", "--save-every", "3", "--no-teacher", "--lr", "1e-3"]
    assert main([str(a) for a in args]) == 0
    first = load_file(str(tmp_path / "up" / "model.safetensors"))
    (tmp_path / "up" / "config.json").unlink()  # as if killed after step 3's checkpoint
    assert main([str(a) for a in [*args, "--resume"]]) == 0
    again = load_file(str(tmp_path / "up" / "model.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    log = [json.loads(line) for line in (tmp_path / "up" / "train" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    assert prepare_seq2seq(data, seq2seq_tokenizer, 32).objective == "span corruption"


def test_calibration_text_defaults_to_the_general_mix(models, tmp_path):
    report = gqa.convert(models["t5"][1], tmp_path / "o", n_kv_heads=2, method="aligned", calib_tokens=512,
                         calib_seq_len=32, format="native")
    assert report["calibration"] == {"data": "general", "tokens": 512, "seq_len": 32, "tokens_used": 512}


@pytest.mark.parametrize("argv,message", [
    (["convert", "{t5}", "{w}/o", "--kv-heads", "3"],
     "self attention, layer 0: 3 KV heads does not divide the current 4 (of 4 query heads); choose one of [1, 2, 4]"),
    (["convert", "{t5}", "{w}/o", "--kv-budget", "0.5", "--calib", "bundled"],
     "--kv-budget is not available for encoder–decoder models yet"),
    (["convert", "{t5}", "{w}/o", "--kv-heads", "2", "--method", "aligned", "--calib", "{w}/bad.jsonl"],
     "an encoder–decoder is calibrated on text (span-corrupted as in pre-training), not on input/target pairs"),
    (["convert", "{t5}", "{w}/o", "--kv-heads", "2", "--method", "aligned", "--calib", "wiki", "--calib-seq-len", "8"],
     "--calib-seq-len must be in [16, 512]"),
    (["convert", "{t5}", "{w}/o", "--kv-heads", "2", "--calib", "wiki", "--transfer-steps", "5",
      "--transfer-inputs", "converted"], "--transfer-inputs converted is not available for encoder–decoder models"),
    (["convert", "{t5}", "{w}/o", "--kv-heads", "2", "--transfer-lr", "0.1"],
     "--transfer-lr sets the layer-wise transfer, which runs only with --transfer-steps N"),
    (["convert", "{t5}", "{w}/o", "--kv-heads", "2", "--calib", "wiki"], "--calib is read only by --method aligned"),
    (["eval", "{t5}", "--data", "{w}/bad.jsonl"], "bad.jsonl:2 has no string field 'target'"),
    (["uptrain", "{t5}", "{w}/o", "--data", "{w}/bad.jsonl", "--steps", "1"], "bad.jsonl:2 has no string field"),
    (["export", "{t5}", "{w}/o.gguf", "--format", "gguf"], "GGUF export writes decoder-only Llama-style models"),
])
def test_bad_input(models, tmp_path, capsys, argv, message):
    (tmp_path / "bad.jsonl").write_text('{"input": "a", "target": "b"}\n{"input": "c"}\n')
    before = sorted(p.name for p in tmp_path.iterdir())
    user_error(capsys, [a.format(t5=models["t5"][1], w=tmp_path) for a in argv], message)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_pooling_helper_matches_the_explicit_mean():
    t = torch.randn(4 * 16, 8)
    torch.testing.assert_close(pool_heads(t, 4, 1, "mean"), t.view(4, 16, 8).mean(0))


def test_a_t5_trained_from_scratch_reads_back_as_itself(tmp_path):
    """The paper experiment's T5 (v1.0 layout: tied head, decoder output x dim^-0.5) written as an HF T5 and
    loaded again gives the same logits; a config.json that would read back as another model is refused."""
    from dataclasses import replace

    from gqa.errors import GQAError
    from gqa.experiments import PAPER_T5, PAPER_T5_QUICK, PaperSettings, fresh_model, paper_model_config

    settings = replace(PaperSettings(), **{**PAPER_T5, **PAPER_T5_QUICK})
    model = fresh_model(paper_model_config(settings), 0).eval()
    gqa.save(model, tmp_path / "t5")
    loaded = gqa.load(tmp_path / "t5", dtype=torch.float32)
    ids, targets = torch.tensor([[5, 6, 7, 8, 0]]), torch.tensor([[4128, 9, 10]])
    assert torch.equal(model(ids, targets), loaded(ids, targets))
    assert json.loads((tmp_path / "t5" / "config.json").read_text())["scale_decoder_outputs"] is True

    gated = fresh_model(replace(paper_model_config(settings), mlp="gated"), 0)
    gated.hf_config = model.hf_config  # a T5 config that says relu (not gated): it cannot hold this model
    with pytest.raises(GQAError, match="cannot express this model .*mlp"):
        gqa.save(gated, tmp_path / "gated")
    assert not (tmp_path / "gated").exists()


def test_info_generate_and_bench_on_a_converted_t5(models, tmp_path, capsys):
    """gqa info reports each attention kind's KV heads and both KV byte counts; gqa generate decodes a batch
    through the G-head caches, greedy equal to the library's; gqa bench seq2seq --quick writes its rows."""
    _, folder = models["t5"]
    assert main(["convert", str(folder), str(tmp_path / "mqa"), "--kv-heads", "1"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "mqa"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    config = gqa.load(tmp_path / "mqa").config
    assert info["decoder_self_kv_heads"] == info["cross_kv_heads"] == [1] * config.n_decoder_layers
    assert info["encoder_kv_heads"] == [config.n_heads] * config.n_encoder_layers
    assert info["kv_bytes_per_token"] == config.kv_bytes_per_token(4) and info["kv_reduction"] == config.n_heads
    assert info["kv_bytes_per_source_token"] == config.kv_bytes_per_source_token(4)

    assert main(["generate", str(tmp_path / "mqa"), "--prompt", "a b c d", "--prompt", "e f",
                 "--max-new-tokens", "5", "--ignore-eos", "--json", "--dtype", "float32"]) == 0
    outputs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    model = gqa.load(tmp_path / "mqa", dtype="float32")
    from gqa.checkpoints.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(tmp_path / "mqa")
    sources = [tokenizer("a b c d")["input_ids"], tokenizer("e f")["input_ids"]]
    expected = generate_seq2seq(model, sources, max_new_tokens=5, stop_tokens=())
    assert [o["tokens"] for o in outputs] == expected

    assert main(["bench", "seq2seq", "--quick", "--out", str(tmp_path / "bench")]) == 0
    rows = json.loads((tmp_path / "bench" / "bench_seq2seq.json").read_text())["rows"]
    assert rows and set(rows[0]["models"]) == {"gqa G=4", "gqa G=1", "transformers generate (MHA)"}


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory, seq2seq_tokenizer):
    """A tiny T5 v1.1 and BART with heads of 64 (llama.cpp's blocks of 32, its rotation at 64), GQA-1 caches."""
    tok, out = seq2seq_tokenizer, {}
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    configs = {"t5": transformers.T5Config(vocab_size=336, d_model=128, d_kv=64, d_ff=192, num_layers=2, num_heads=2,
                                           feed_forward_proj="gated-gelu", **ids),
               "bart": transformers.BartConfig(vocab_size=336, d_model=128, encoder_layers=2, decoder_layers=2,
                                               encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=192,
                                               decoder_ffn_dim=192, max_position_embeddings=128, **ids)}
    for name, config in configs.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(f"wide-{name}")
        transformers.AutoModelForSeq2SeqLM.from_config(config).save_pretrained(folder)
        tok.save_pretrained(folder)
        gqa.convert(folder, folder.with_name(folder.name + "-mqa"), n_kv_heads=1, progress=False)
        out[name] = folder.with_name(folder.name + "-mqa")
    return out


@pytest.mark.parametrize("cache_dtype", ["float16", "q8_0", "q4_0", "q4_0 unrotated", "fp8_e4m3"])
@pytest.mark.parametrize("name", ["t5", "bart"])
def test_quantized_caches_decode_as_the_full_forward(wide_models, name, cache_dtype):
    """The decoder's self- and cross-attention caches store K and V in the format asked for (as the decoder-only
    models' do): the full forward (what `eval` scores) reads them exactly as cached decoding does."""
    model = gqa.load(wide_models[name], dtype="float32", kv_cache_dtype=cache_dtype.split()[0],
                     kv_rotation="unrotated" not in cache_dtype)
    ids, mask, dec = batch()
    full = model(ids, dec, attention_mask=mask)
    encoded = model.encode(ids, mask)
    cache = model.new_cache(2, dec.shape[1])
    steps = [model.decode(dec[:, :3], encoded, cache=cache)]
    steps += [model.decode(dec[:, t:t + 1], encoded, cache=cache) for t in range(3, dec.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-3, rtol=0)
    plain = gqa.load(wide_models[name], dtype="float32")(ids, dec, attention_mask=mask)
    assert (full - plain).abs().max() > 1e-6  # the cache dtype changed what attention read
    assert (full - plain).abs().max() < 0.5 * plain.abs().max()  # and still read the same model


def test_quantized_caches_hold_the_formats_bytes(wide_models):
    from gqa.cache import QuantizedKVCache
    from gqa.kv_formats import FORMATS

    model = gqa.load(wide_models["t5"], dtype="float32")
    ids, mask, _ = batch()
    for fmt in ("q8_0", "q4_0", "iq4_nl"):
        model.set_kv_cache_dtype(fmt)
        cache, encoded = model.new_cache(2, 5), model.encode(ids, mask)
        assert isinstance(cache, QuantizedKVCache) and isinstance(encoded.cross_kv, QuantizedKVCache)
        per_value = FORMATS[fmt].bytes_per_value  # 2 sequences x 5 tokens (sources: 9), K and V of 1 head of 64
        assert cache.bytes() == model.kv_bytes_per_token() * 2 * 5 == 2 * 5 * 2 * 2 * 64 * per_value
        assert encoded.bytes() == 2 * 9 * 2 * 2 * 64 * per_value


def test_eval_and_generate_take_a_cache_dtype(wide_models, tmp_path, capsys):
    folder = wide_models["bart"]
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert main(["eval", str(folder), "--data", str(text), "--kv-cache-dtype", "q4_0", "--max-tokens", "200"]) == 0
    assert "with a q4_0 (Hadamard-rotated) KV cache" in capsys.readouterr().out
    assert main(["generate", str(folder), "--prompt", "The quick", "--max-new-tokens", "4", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)["tokens"]
    assert main(["generate", str(folder), "--prompt", "The quick", "--max-new-tokens", "4", "--json",
                 "--kv-cache-dtype", "q8_0"]) == 0
    quantized = json.loads(capsys.readouterr().out)["tokens"]
    model = gqa.load(folder, dtype="float32", kv_cache_dtype="q8_0")
    tokens = gqa.checkpoints.tokenizer.load_tokenizer(folder)("The quick")["input_ids"]
    assert generate_seq2seq(model, [tokens], max_new_tokens=4) == [quantized] and len(plain) == 4
