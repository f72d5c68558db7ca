"""Per-layer KV heads (DeciLMForCausalLM, model type nemotron-nas) in transformers: no class of its own
ships for it, so gqa writes its own configuration and modeling modules into the folder, and
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` computes what gqa computes."""

import json
import shutil

import pytest
import torch
import transformers
from conftest import padded_batch
from families import build, save

import gqa
from gqa.info import describe


@pytest.fixture(scope="module")
def per_layer(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("remote-code")
    source = save(build("llama", intermediate_size=256), root / "source", tokenizer)  # MLP width: a multiple of 256
    report = gqa.convert(source, root / "per-layer", n_kv_heads_per_layer=[4, 1], progress=False)
    assert report["architecture"] == "DeciLMForCausalLM"
    return root / "per-layer"


def test_the_folder_carries_gqas_modules_and_names_them(per_layer):
    config = json.loads((per_layer / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig",
                                  "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
    assert (per_layer / "configuration_decilm.py").is_file() and (per_layer / "modeling_decilm.py").is_file()


def test_transformers_with_remote_code_gives_gqas_logits(per_layer):
    ours = gqa.load(per_layer, dtype="float32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(per_layer, trust_remote_code=True,
                                                               dtype=torch.float32).eval()
    assert [layer.self_attn.k_proj.weight.shape[0] for layer in theirs.model.layers] == [64, 16]  # 4 and 1 KV heads
    ids, mask = padded_batch([9, 5, 7])
    with torch.no_grad():
        reference = theirs(ids, attention_mask=mask.long()).logits
    torch.testing.assert_close(ours(ids, attention_mask=mask)[mask], reference[mask], atol=1e-4, rtol=0)
    prompt = ids[:1, :6]
    greedy = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert greedy[0, 6:].tolist() == gqa.generate(ours, [prompt[0].tolist()], max_new_tokens=8)[0]


def test_the_config_class_reads_block_configs_as_attributes(per_layer):
    """What vLLM's native DeciLM model reads: `block_configs[i].attention.n_heads_in_group`, and `hasattr`
    on keys a block does not have; the config saves back unchanged."""
    config = transformers.AutoConfig.from_pretrained(per_layer, trust_remote_code=True)
    assert [b.attention.n_heads_in_group for b in config.block_configs] == [1, 4]
    assert not hasattr(config.block_configs[0].ffn, "intermediate_size") and config.block_configs[0].ffn.ffn_mult == 6.0
    again = json.loads(config.to_json_string())["block_configs"]
    assert again == json.loads((per_layer / "config.json").read_text())["block_configs"]


def test_info_names_a_per_layer_folder_without_the_modules(per_layer, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(per_layer, old)
    (old / "configuration_decilm.py").unlink()
    assert describe(per_layer)["vllm"].startswith("yes, with trust_remote_code=True")
    assert describe(old)["vllm"].startswith("no: the folder lacks gqa's configuration_decilm.py")
    gqa.save(gqa.load(old), tmp_path / "new")  # writing it again (gqa export) puts the modules back
    assert describe(tmp_path / "new")["vllm"].startswith("yes")
