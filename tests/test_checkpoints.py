import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import padded_batch
from families import FAMILIES, KV_HEADS

import gqa
from gqa import GQAError, ModelConfig, Transformer
from gqa.checkpoints import save, target_family
from gqa.info import describe

ATOL = 1e-4


def hf_logits(hf, ids, mask, **kw):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask.long(), **kw).logits


def assert_logits_close(ours, ref, mask):
    """Compare at real tokens only; logits at padding are undefined."""
    torch.testing.assert_close(ours[mask], ref[mask], atol=ATOL, rtol=0)


def test_import_matches_transformers_on_padded_batch(tiny, family):
    hf, path = tiny(family)
    model = gqa.load(path)
    ids, mask = padded_batch([13, 7])
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
    assert_logits_close(ours, hf_logits(hf, ids, mask), mask)
    assert model.config.n_kv_heads == [KV_HEADS[family]] * 2


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "opt"])
def test_left_padding_matches_transformers(tiny, family):
    hf, path = tiny(family)
    model = gqa.load(path)
    ids, right = padded_batch([12, 5])
    # move each row's real tokens to the right end
    mask = right.flip(-1)
    ids = torch.stack([torch.cat([row[~m], row[m]]) for row, m in zip(ids, right)])
    kw = {}
    if family != "opt":  # OPT derives positions from the mask itself
        kw["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
    assert_logits_close(ours, hf_logits(hf, ids, mask, **kw), mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip_through_transformers(tiny, family, tmp_path):
    _, path = tiny(family)
    model = gqa.load(path)
    out = save(model, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["architectures"] == model.hf_config["architectures"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False).eval()
    ids, mask = padded_batch([11, 6], seed=1)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
    assert_logits_close(ours, hf_logits(reloaded, ids, mask), mask)
    assert (out / "tokenizer.json").is_file()


def test_export_keeps_grouped_heads(tiny, tmp_path):
    _, path = tiny("mistral")  # 4 query heads, 2 KV heads
    out = save(gqa.load(path), tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2


def per_layer_model(seed=0):
    config = ModelConfig(vocab_size=64, dim=48, n_layers=3, n_heads=6, n_kv_heads=[6, 3, 1], head_dim=8,
                         hidden_dim=80, max_positions=64, positions="learned", norm="layer", mlp="plain",
                         activation="gelu_tanh", qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True)
    torch.manual_seed(seed)
    return Transformer(config).eval()


def test_own_format_round_trip_is_exact(tmp_path):
    model = per_layer_model()
    # no HF family can hold per-layer KV heads with learned positions
    assert target_family(model.config, model.hf_config) is None
    out = save(model, tmp_path / "own")
    reloaded = gqa.load(out)
    assert reloaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids, mask = padded_batch([9, 4], vocab=64)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask), reloaded(ids, attention_mask=mask))
    assert reloaded.output.weight is reloaded.tok_embeddings.weight
    assert [k.shape[1] for k in reloaded.new_cache(2, 16).keys] == [6, 3, 1]


def test_gpt2_cannot_be_forced_into_hf_with_partial_grouping(tmp_path):
    model = per_layer_model()
    with pytest.raises(GQAError, match=r"own format instead \(--format native\)"):
        save(model, tmp_path / "x", format="hf")


def test_sharded_checkpoint_loads(tiny, tmp_path):
    hf, _ = tiny("llama")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = gqa.load(tmp_path / "sharded")
    ids, mask = padded_batch([10, 10])
    with torch.no_grad():
        assert_logits_close(model(ids), hf_logits(hf, ids, mask), mask)


def test_save_writes_shards_and_index(tiny, tmp_path):
    _, path = tiny("qwen2")
    model = gqa.load(path)
    out = save(model, tmp_path / "sh", shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = gqa.load(out)
    ids, _ = padded_batch([8])
    with torch.no_grad():
        assert torch.equal(model(ids), reloaded(ids))


def test_bf16_load_and_dtype_override(tiny):
    _, path = tiny("llama")
    model = gqa.load(path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with pytest.raises(GQAError, match="unknown dtype"):
        gqa.load(path, dtype="float8")


def test_describe_reports_kv_bytes(tiny):
    _, path = tiny("mistral")
    info = describe(path)
    # 2 layers * 2 (K and V) * 2 KV heads * head_dim 16 * 4 bytes
    assert info["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert info["kv_heads"] == [2, 2] and info["attention"] == "GQA-2" and info["kv_reduction"] == 2.0
    hf, _ = tiny("mistral")
    assert info["parameters"] == sum(p.numel() for p in hf.parameters())


def test_existing_destination_is_refused(tiny, tmp_path):
    _, path = tiny("llama")
    (tmp_path / "taken").mkdir()
    with pytest.raises(GQAError, match="already exists"):
        save(gqa.load(path), tmp_path / "taken")
    assert list((tmp_path / "taken").iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no temporary folder left behind


def test_old_style_names_and_buffers_load(tiny, tmp_path):
    """Checkpoints from older writers: GPT-2 without the `transformer.` prefix and with its causal-mask
    buffers, Llama with saved rotary tables. The buffers are skipped, the names mapped."""
    from safetensors.torch import load_file, save_file

    for family, rename, extra in (
        ("gpt2", lambda n: n.removeprefix("transformer."), {"h.0.attn.bias": torch.ones(1, 1, 128, 128)}),
        ("llama", lambda n: n, {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}),
    ):
        hf, path = tiny(family)
        folder = tmp_path / family
        folder.mkdir()
        (folder / "config.json").write_text((Path(path) / "config.json").read_text())
        tensors = {rename(k): v for k, v in load_file(f"{path}/model.safetensors").items()} | extra
        save_file(tensors, str(folder / "model.safetensors"))
        ids, mask = padded_batch([7, 7])
        with torch.no_grad():
            assert_logits_close(gqa.load(folder)(ids), hf_logits(hf, ids, mask), mask)


@pytest.mark.parametrize("header_bytes", [64 * 1024, 256], ids=["default", "small header room"])
def test_shard_writer_streams_every_dtype_into_shards_safetensors_reads_back(tmp_path, monkeypatch, header_bytes):
    """The writer puts each tensor's bytes on disk as it comes and fills the header in last: what safetensors
    reads back is every tensor exactly, and shards stay within their size; a shard whose header room is
    full closes early."""
    from safetensors import safe_open

    from gqa.checkpoints.files import ShardWriter

    monkeypatch.setattr(ShardWriter, "HEADER_BYTES", header_bytes)

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).bfloat16(),
        "c": torch.randn(2, 2, 2, generator=g).half(),
        "d": torch.arange(6).reshape(2, 3),
        "e": torch.tensor([True, False, True]),
        "f": torch.tensor(2.5, dtype=torch.float64),
        "g": torch.empty(0, 4),
        "h": torch.randn(4, 3, generator=g).T,  # not contiguous
        "i": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
    }
    writer = ShardWriter(tmp_path, shard_bytes=64 if header_bytes > 256 else 10**6)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert sorted(index["weight_map"]) == sorted(tensors)
    for shard in set(index["weight_map"].values()):
        with safe_open(str(tmp_path / shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            sizes = [f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()]
            assert sum(sizes) <= 64 or len(sizes) == 1 or header_bytes == 256
            for name in f.keys():
                got = f.get_tensor(name)
                assert got.dtype == tensors[name].dtype and torch.equal(got, tensors[name]), name
    assert len(set(index["weight_map"].values())) > 2
    one = tmp_path / "one"
    one.mkdir()
    writer = ShardWriter(one)
    writer.add("a", tensors["a"])
    writer.close()
    from safetensors.torch import load_file

    assert sorted(p.name for p in one.iterdir()) == ["model.safetensors"]
    assert torch.equal(load_file(str(one / "model.safetensors"))["a"], tensors["a"])


def test_a_missing_tensor_is_named_as_the_files_name_it(tiny, tmp_path):
    """A folder that lacks a tensor its config implies is refused before any weight is read, naming the tensor
    as the family's files name it, for both model shapes (one layout check)."""
    from safetensors.torch import load_file, save_file

    t5 = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
                               decoder_start_token_id=0)
    transformers.T5ForConditionalGeneration(t5).save_pretrained(tmp_path / "t5")
    folders = {tmp_path / "t5": "decoder.block.0.layer.1.EncDecAttention.k.weight"}
    folders[tmp_path / "llama"] = "model.layers.0.self_attn.k_proj.weight"
    tiny("llama")[0].save_pretrained(tmp_path / "llama")
    for folder, name in folders.items():
        tensors = load_file(str(folder / "model.safetensors"))
        del tensors[name]
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(GQAError, match=rf"the checkpoint misses \['{name}'\] for its config \(1 missing"):
            describe(folder)
