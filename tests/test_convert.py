import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import padded_batch, user_error
from families import KV_HEADS, build, save
from families import TEXT as families_text
from safetensors.torch import load_file

import gqa
from gqa.cli import main


def logits(path_or_model, ids, mask):
    model = gqa.load(path_or_model) if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    with torch.no_grad():
        return model(ids, attention_mask=mask)


@pytest.mark.parametrize("method", ["mean", "first"])
def test_same_g_reproduces_the_model_exactly(tiny, family, method, tmp_path):
    _, path = tiny(family)
    out = tmp_path / "same"
    gqa.convert(path, out, n_kv_heads=KV_HEADS[family], method=method, progress=False)
    ids, mask = padded_batch([12, 7])
    assert torch.equal(logits(path, ids, mask), logits(out, ids, mask))
    source = gqa.load(path).state_dict()
    converted = gqa.load(out).state_dict()
    assert all(torch.equal(source[k], converted[k]) for k in source)


# ------------------------------------------------------------------------ mean equals an independent mean

H, D, DIM = 8, 8, 64
WIDE = {  # eight query heads, so G in {1, 2, H/2} are three different groupings
    "llama": dict(num_attention_heads=H, num_key_value_heads=H),
    "qwen2": dict(num_attention_heads=H, num_key_value_heads=H),
    "gpt2": dict(n_head=H),
    "gpt_neox": dict(num_attention_heads=H),
}


def hf_kv_heads(family, tensors, layer):
    """K and V weights and biases of one layer as [H, D, ...] read from the HF file layout."""
    if family in ("llama", "qwen2"):
        pre = f"model.layers.{layer}.self_attn"
        out = {f"k.{p}": tensors.get(f"{pre}.k_proj.{p}") for p in ("weight", "bias")}
        out.update({f"v.{p}": tensors.get(f"{pre}.v_proj.{p}") for p in ("weight", "bias")})
        return {k: v.reshape(H, D, *v.shape[1:]) for k, v in out.items() if v is not None}
    if family == "gpt2":  # Conv1D c_attn: [in, 3*out] columns [q | k | v]
        w, b = tensors[f"transformer.h.{layer}.attn.c_attn.weight"], tensors[f"transformer.h.{layer}.attn.c_attn.bias"]
        return {
            "k.weight": w[:, DIM:2 * DIM].t().reshape(H, D, DIM), "v.weight": w[:, 2 * DIM:].t().reshape(H, D, DIM),
            "k.bias": b[DIM:2 * DIM].reshape(H, D), "v.bias": b[2 * DIM:].reshape(H, D),
        }
    # GPT-NeoX query_key_value: rows per head [q_h | k_h | v_h]
    w = tensors[f"gpt_neox.layers.{layer}.attention.query_key_value.weight"].reshape(H, 3, D, DIM)
    b = tensors[f"gpt_neox.layers.{layer}.attention.query_key_value.bias"].reshape(H, 3, D)
    return {"k.weight": w[:, 1], "v.weight": w[:, 2], "k.bias": b[:, 1], "v.bias": b[:, 2]}


@pytest.mark.parametrize("family", list(WIDE))
@pytest.mark.parametrize("G", [1, 2, H // 2])
def test_mean_equals_independent_group_mean(family, G, tmp_path):
    src = save(build(family, **WIDE[family]), tmp_path / "src")
    gqa.convert(src, tmp_path / "out", n_kv_heads=G, method="mean", progress=False)
    tensors = load_file(f"{src}/model.safetensors")
    model = gqa.load(tmp_path / "out")
    assert model.config.n_kv_heads == [G, G]
    for layer, block in enumerate(model.layers):
        for key, heads in hf_kv_heads(family, tensors, layer).items():
            expected = heads.reshape(G, H // G, *heads.shape[1:]).mean(1).reshape(G * D, *heads.shape[2:])
            which, part = key.split(".")
            got = getattr(getattr(block.attention, f"w{which}"), part)
            torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-6)


# -------------------------------------------------------------------------------------- end-to-end exactness

def mha_twin(gqa_hf, tmp_path):
    """The MHA model equal to a GQA model: each KV head repeated for every query head that reads it."""
    config = gqa_hf.config
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    twin_config = type(config).from_dict({**config.to_dict(), "num_key_value_heads": n_heads})
    twin = transformers.AutoModelForCausalLM.from_config(twin_config)
    state = gqa_hf.state_dict()
    for name, tensor in state.items():
        if ".k_proj." in name or ".v_proj." in name:
            heads = tensor.reshape(n_kv, -1, *tensor.shape[1:])
            state[name] = heads.repeat_interleave(n_heads // n_kv, dim=0).reshape(-1, *tensor.shape[1:])
    twin.load_state_dict(state)
    return save(twin.eval(), tmp_path / "twin")


def test_mha_twin_converts_back_to_the_gqa_model_exactly(tmp_path):
    gqa_hf = build("qwen2", num_attention_heads=6, num_key_value_heads=2, hidden_size=48)  # biases too
    original = save(gqa_hf, tmp_path / "gqa")
    twin = mha_twin(gqa_hf, tmp_path)
    ids, mask = padded_batch([10, 6])
    assert gqa.load(twin).config.n_kv_heads == [6, 6]
    torch.testing.assert_close(logits(twin, ids, mask), logits(original, ids, mask), atol=1e-5, rtol=0)
    gqa.convert(twin, tmp_path / "back", n_kv_heads=2, progress=False)
    assert torch.equal(logits(tmp_path / "back", ids, mask), logits(original, ids, mask))
    # and composition: GQA-2 -> MQA equals MHA twin -> MQA
    gqa.convert(original, tmp_path / "mqa1", n_kv_heads=1, progress=False)
    gqa.convert(twin, tmp_path / "mqa2", n_kv_heads=1, progress=False)
    assert torch.equal(logits(tmp_path / "mqa1", ids, mask), logits(tmp_path / "mqa2", ids, mask))


# ----------------------------------------------------------------------------------- output formats

def hf_reload_logits(folder, ids, mask):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask.long()).logits


@pytest.mark.parametrize("family,G,arch", [
    ("llama", 2, "LlamaForCausalLM"), ("llama", 1, "LlamaForCausalLM"), ("qwen2", 1, "Qwen2ForCausalLM"),
    ("mistral", 1, "MistralForCausalLM"), ("gpt2", 1, "GPTBigCodeForCausalLM"), ("gemma", 2, "GemmaForCausalLM"),
    ("phi", 2, "PhiForCausalLM"), ("phi", 1, "PhiForCausalLM"), ("phi3", 2, "Phi3ForCausalLM"),
    ("qwen3", 1, "Qwen3ForCausalLM"), ("olmo2", 2, "Olmo2ForCausalLM"), ("stablelm", 1, "StableLmForCausalLM"),
    ("falcon", 1, "FalconForCausalLM"), ("falcon", 2, "FalconForCausalLM"), ("falcon_new", 1, "FalconForCausalLM"),
])
@pytest.mark.parametrize("method", ["mean", "aligned"])
def test_converted_folder_loads_in_transformers(tiny, tmp_path, family, G, arch, method):
    """Converted to fewer KV heads, a model is written in its own architecture (with that architecture's
    KV-head field), and transformers computes the same logits from it as gqa does."""
    _, path = tiny(family)
    calib = tmp_path / "calib.txt"
    calib.write_text(families_text)
    options = dict(calib=calib, calib_tokens=256, calib_seq_len=32) if method == "aligned" else {}
    report = gqa.convert(path, tmp_path / "out", n_kv_heads=G, method=method, progress=False, **options)
    assert report["architecture"] == arch
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [arch]
    ids, mask = padded_batch([11, 5])
    ours = logits(tmp_path / "out", ids, mask)
    torch.testing.assert_close(ours[mask], hf_reload_logits(tmp_path / "out", ids, mask)[mask], atol=1e-4, rtol=0)
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_per_layer_kv_heads_written_as_block_configs(tmp_path):
    hf = build("llama", intermediate_size=256, num_hidden_layers=4)  # DeciLM MLP widths are multiples of 256
    src = save(hf, tmp_path / "src")
    report = gqa.convert(src, tmp_path / "var", n_kv_heads_per_layer=[4, 2, 2, 1], progress=False)
    config = json.loads((tmp_path / "var" / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and report["architecture"] == "DeciLMForCausalLM"
    assert [b["attention"]["n_heads_in_group"] for b in config["block_configs"]] == [1, 2, 2, 4]
    for block in config["block_configs"]:
        assert block["attention"]["no_op"] is False and block["ffn"]["no_op"] is False
        # DeciLM's own rule for the MLP width recovers intermediate_size
        width = int(2 * block["ffn"]["ffn_mult"] * config["hidden_size"] / 3)
        assert width + (-width % 256) == 256
    assert "num_key_value_heads" not in config
    model = gqa.load(tmp_path / "var")
    assert model.config.n_kv_heads == [4, 2, 2, 1]
    cache = model.new_cache(2, 16)
    assert [k.shape[1] for k in cache.keys] == [4, 2, 2, 1]
    assert report["kv_bytes_per_token_after"] == model.kv_bytes_per_token() == 2 * (4 + 2 + 2 + 1) * 16 * 4
    # its logits equal a uniform conversion layer by layer: layer 0 untouched, the others pooled the same way
    ids, mask = padded_batch([9, 9])
    reference = gqa.load(src)
    for layer, g in enumerate([4, 2, 2, 1]):
        for w in ("wk", "wv"):
            old = getattr(reference.layers[layer].attention, w).weight
            expected = old.reshape(g, 4 // g, 16, -1).double().mean(1).float().reshape(g * 16, -1)
            assert torch.equal(getattr(model.layers[layer].attention, w).weight, expected)
    out = gqa.generate(model, [[5, 6, 7]], max_new_tokens=4)
    assert len(out[0]) == 4


@pytest.mark.parametrize("family", ["gptj", "gpt_neox"])
def test_families_without_a_kv_head_field_go_to_own_format(tiny, tmp_path, family):
    """GPT-J and GPT-NeoX have no GQA form in transformers: a converted model is gqa's own format, exact."""
    _, path = tiny(family)
    report = gqa.convert(path, tmp_path / "g2", n_kv_heads=2, progress=False)
    assert report["architecture"] == "GQAForCausalLM"
    model = gqa.load(tmp_path / "g2")
    assert model.config.n_kv_heads == [2, 2] and model.hf_config["architectures"][0] != "GQAForCausalLM"
    reference = gqa.load(path)
    with torch.no_grad():  # the same as pooling the source's K/V by hand
        for block, ref in zip(model.layers, reference.layers):
            for w in ("wk", "wv"):
                expected = getattr(ref.attention, w).weight.reshape(2, 2, 16, -1).double().mean(1).float()
                assert torch.equal(getattr(block.attention, w).weight, expected.reshape(32, -1))
    ids, mask = padded_batch([9, 4])
    assert torch.isfinite(logits(model, ids, mask)).all()


def test_mean_pooling_of_a_fused_layout_equals_the_unfused_model(tiny, tmp_path):
    """Phi-3 keeps Q, K, V in one qkv_proj and gate/up in one gate_up_proj: cut out, pooled and written back
    fused, they give the same model as pooling a Llama holding the same weights unfused."""
    phi3, path = tiny("phi3")
    state = {}
    for name, tensor in phi3.state_dict().items():
        if "qkv_proj" in name:
            for part, t in zip("qkv", tensor.split([64, 64, 64])):
                state[name.replace("qkv_proj", f"{part}_proj")] = t
        elif "gate_up_proj" in name:
            gate, up = tensor.chunk(2)
            state[name.replace("gate_up_proj", "gate_proj")], state[name.replace("gate_up_proj", "up_proj")] = gate, up
        else:
            state[name] = tensor
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=phi3.config.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=phi3.config.rms_norm_eps))
    llama.load_state_dict(state)
    unfused = save(llama.eval(), tmp_path / "llama")
    for source, dest in ((path, "phi3-g2"), (unfused, "llama-g2")):
        gqa.convert(source, tmp_path / dest, n_kv_heads=2, progress=False)
    ids, mask = padded_batch([10, 6])
    assert torch.equal(logits(tmp_path / "phi3-g2", ids, mask), logits(tmp_path / "llama-g2", ids, mask))
    fused = load_file(str(tmp_path / "phi3-g2" / "model.safetensors"))
    assert fused["model.layers.0.self_attn.qkv_proj.weight"].shape == (64 + 2 * 32, 64)


def test_non_uniform_gpt2_goes_to_own_format(tiny, tmp_path):
    _, path = tiny("gpt2")
    report = gqa.convert(path, tmp_path / "v", n_kv_heads_per_layer=[2, 1], progress=False)
    assert report["architecture"] == "GQAForCausalLM"
    assert gqa.load(tmp_path / "v").config.n_kv_heads == [2, 1]


def test_random_is_reproducible_by_seed(tiny, tmp_path):
    _, path = tiny("llama")
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        gqa.convert(path, tmp_path / name, n_kv_heads=2, method="random", seed=seed, progress=False)
    a, b, c = (gqa.load(tmp_path / n).layers[0].attention.wk.weight for n in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.std().item() - 0.02) < 0.005  # the model's own init scale (initializer_range)
    report = json.loads((tmp_path / "a" / "conversion.json").read_text())
    assert report["method"] == "random" and report["seed"] == 1


def test_conversion_report(tiny, tmp_path):
    _, path = tiny("llama")
    report = gqa.convert(path, tmp_path / "r", n_kv_heads=1, progress=False)
    saved = json.loads((tmp_path / "r" / "conversion.json").read_text())
    assert saved["kv_heads_before"] == [4, 4] and saved["kv_heads_after"] == [1, 1]
    assert saved["kv_bytes_per_token_before"] == 2 * 2 * 4 * 16 * 4
    assert saved["kv_reduction"] == 4.0
    # K and V lose 3 of 4 heads: 2 layers * 2 projections * 3 heads * 16 * 64 weights
    assert saved["parameters_before"] - saved["parameters_after"] == 2 * 2 * 3 * 16 * 64
    assert saved["source"] == str(tmp_path.parent / os.path.basename(path)) or saved["source"].endswith(
        os.path.basename(path))
    assert saved["gqa_version"] == gqa.__version__ and report == saved


def test_convert_cli_prints_the_table(tiny, tmp_path, capsys):
    _, path = tiny("llama")
    assert main(["convert", path, str(tmp_path / "o"), "--kv-heads", "2", "--method", "first"]) == 0
    out = capsys.readouterr().out
    assert "KV heads per layer" in out and "2.00x smaller" in out and "parameters" in out


# --------------------------------------------------------------------------------------------- user errors


def test_convert_errors(tiny, tmp_path, capsys):
    _, path = tiny("mistral")  # 4 query heads, 2 KV heads
    out = tmp_path / "o"
    user_error(capsys, ["convert", path, out, "--kv-heads", "4"], "4 KV heads does not divide the current 2")
    user_error(capsys, ["convert", path, out, "--kv-heads", "3"], "does not divide the current 2")
    user_error(capsys, ["convert", path, out, "--kv-heads-per-layer", "1,1,1"], "has 3 entries but the model has 2")
    user_error(capsys, ["convert", path, out, "--kv-heads", "1", "--method", "median"],
               "argument --method: invalid choice: 'median'")
    user_error(capsys, ["convert", path, out], "exactly one of --kv-heads, --kv-heads-per-layer or --kv-budget")
    user_error(capsys, ["convert", tmp_path, out, "--kv-heads", "1"], "has no config.json")
    out.mkdir()
    user_error(capsys, ["convert", path, out, "--kv-heads", "1"], "already exists")
    assert main(["convert", path, str(out), "--kv-heads", "1", "--overwrite"]) == 0
    assert gqa.load(out).config.n_kv_heads == [1, 1]


@pytest.mark.parametrize("config_class,architecture", [
    (transformers.WhisperConfig, "WhisperForConditionalGeneration"),  # encoder-decoder outside T5/BART
    (transformers.BloomConfig, "BloomForCausalLM"),  # ALiBi decoders gqa does not implement
    (transformers.MptConfig, "MptForCausalLM"),
])
@pytest.mark.parametrize("verb", ["info", "convert"])
def test_unsupported_architecture(tmp_path, capsys, config_class, architecture, verb):
    """A family outside the table: one line naming it (and what is supported), exit 2, nothing written."""
    folder = tmp_path / "model"
    config_class(architectures=[architecture]).save_pretrained(folder)
    argv = ["info", folder] if verb == "info" else ["convert", folder, tmp_path / "o", "--kv-heads", "1"]
    line = user_error(capsys, argv, f"architecture {architecture} is not supported; supported: ")
    assert "LlamaForCausalLM" in line and "Phi3ForCausalLM" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_killed_conversion_leaves_no_destination(tiny, tmp_path):
    """SIGKILL in the middle of writing: the destination must not exist, and nothing there looks like a model."""
    _, path = tiny("llama")
    dest = tmp_path / "dest"
    script = f"""
import os, signal
import gqa.checkpoints.files as files
calls = []
real_add = files.ShardWriter.add
def add(self, name, tensor):
    calls.append(name)
    if len(calls) == 5:
        self.flush()  # a shard is on disk, the conversion is half done
        os.kill(os.getpid(), signal.SIGKILL)
    return real_add(self, name, tensor)
files.ShardWriter.add = add
import gqa
gqa.convert({str(path)!r}, {str(dest)!r}, n_kv_heads=1, progress=False)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL
    assert not dest.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name != "dest"]
    assert all(not (p / "config.json").exists() for p in leftovers)
