import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import user_error
from families import TEXT

from gqa.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err



def test_info_json(tiny, capsys):
    _, path = tiny("mistral")
    code, out, _ = run(capsys, "info", path, "--json")
    info = json.loads(out)
    assert code == 0
    assert info["architecture"] == "MistralForCausalLM"
    assert info["layers"] == 2 and info["query_heads"] == 4 and info["kv_heads"] == [2, 2]
    assert info["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4


def test_eval_json(tiny, capsys, tmp_path):
    _, path = tiny("llama")
    data = tmp_path / "text.txt"
    data.write_text(TEXT[:2000])
    code, out, _ = run(capsys, "eval", path, "--data", data, "--json", "--seq-len", "64")
    result = json.loads(out)
    assert code == 0
    assert result["tokens"] > 100
    # a random model over a ~300-token vocabulary is near uniform: perplexity within a factor of the vocab size
    assert 100 < result["perplexity"] < 1000


def test_generate_prints_prompt_and_continuation(tiny, capsys):
    _, path = tiny("gpt2")
    code, out, _ = run(capsys, "generate", path, "--prompt", "Once upon a time", "--prompt", "The quick",
                       "--max-new-tokens", "5", "--json", "--ignore-eos")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [x["prompt"] for x in lines] == ["Once upon a time", "The quick"]
    assert all(len(x["tokens"]) == 5 for x in lines)


def test_export_then_info(tiny, capsys, tmp_path):
    _, path = tiny("qwen2")
    code, out, _ = run(capsys, "export", path, tmp_path / "q")
    assert code == 0 and "Qwen2ForCausalLM" in out
    user_error(capsys, ["export", path, tmp_path / "q"], "already exists")


# ------------------------------------------------------------------------------------------ user errors

def copy_model(tiny, tmp_path, family="llama"):
    _, path = tiny(family)
    dest = tmp_path / "model"
    shutil.copytree(path, dest)
    return dest


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_kv_heads_not_dividing_heads(tiny, tmp_path, capsys):
    folder = copy_model(tiny, tmp_path)
    edit_config(folder, num_key_value_heads=3)
    user_error(capsys, ["info", folder], "3 KV heads does not divide 4 query heads")


def test_more_kv_heads_than_heads(tiny, tmp_path, capsys):
    folder = copy_model(tiny, tmp_path)
    edit_config(folder, num_key_value_heads=8)
    user_error(capsys, ["info", folder], "8 KV heads is more than the 4 query heads")


def test_unsupported_architecture_lists_supported(tiny, tmp_path, capsys):
    folder = copy_model(tiny, tmp_path)
    edit_config(folder, architectures=["BertForMaskedLM"], model_type="bert")
    code, _, err = run(capsys, "info", folder)
    assert code == 2 and "BertForMaskedLM is not supported" in err
    for arch in ("LlamaForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM", "OPTForCausalLM", "GPTBigCodeForCausalLM"):
        assert arch in err


def test_folder_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    user_error(capsys, ["info", tmp_path / "empty"], "has no config.json")


def test_missing_folder(tmp_path, capsys):
    user_error(capsys, ["eval", tmp_path / "nope", "--data", tmp_path / "t.txt"], "no data at")
    user_error(capsys, ["info", tmp_path / "nope"], "no model folder")


def test_folder_without_weights(tiny, tmp_path, capsys):
    folder = copy_model(tiny, tmp_path)
    (folder / "model.safetensors").unlink()
    user_error(capsys, ["info", folder], "has no model.safetensors")


def test_truncated_safetensors(tiny, tmp_path, capsys):
    folder = copy_model(tiny, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    user_error(capsys, ["generate", folder, "--prompt", "hi"], "truncated or corrupt safetensors")


def test_corrupt_safetensors_header(tiny, tmp_path, capsys):
    folder = copy_model(tiny, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    user_error(capsys, ["info", folder], "truncated or corrupt safetensors")


def test_pickle_checkpoint_is_refused(tiny, tmp_path, capsys):
    folder = copy_model(tiny, tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    user_error(capsys, ["info", folder], "pickle form (pytorch_model.bin)")


def test_prompt_longer_than_positions(tiny, capsys):
    _, path = tiny("gpt2")
    user_error(capsys, ["generate", path, "--prompt", "heads " * 200], "longer than the model's 128 positions")


def test_bad_arguments_are_one_line(capsys):
    user_error(capsys, ["generate"], "required")
    user_error(capsys, ["frobnicate"], "invalid choice")


def test_entry_point_exit_code_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gqa", "info", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "has no config.json" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argv,message", [
    (["--temperature", "-1"], "argument --temperature: must be a finite number >= 0, got -1"),
    (["--top-p", "1.5"], "argument --top-p: must be a finite number in (0, 1], got 1.5"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
])
def test_bad_sampling_arguments(tiny, capsys, argv, message):
    _, path = tiny("llama")
    user_error(capsys, ["generate", path, "--prompt", "hi", *argv], message)


def test_eval_on_a_bundled_corpus_uses_its_validation_split(capsys):
    from gqa.demo import ASSET

    code, out, _ = run(capsys, "eval", ASSET, "--data", "shakespeare", "--json", "--seq-len", "256")
    result = json.loads(out)
    assert code == 0 and result["tokens"] > 10_000
    assert result["perplexity"] < 500  # the demo model has read the training split of this corpus


def test_eval_against_a_reference(tiny, capsys, tmp_path):
    """--reference adds top-1 agreement and KL(reference || model): 1 and 0 against itself, less after a merge."""
    import gqa

    _, path = tiny("llama")
    data = tmp_path / "text.txt"
    data.write_text(TEXT[:2000])
    code, out, _ = run(capsys, "eval", path, "--data", data, "--json", "--seq-len", "64", "--reference", path)
    same = json.loads(out)
    assert code == 0 and same["top1_agreement"] == 1.0 and abs(same["kl"]) < 1e-6
    gqa.convert(path, tmp_path / "mqa", n_kv_heads=1, progress=False)
    code, out, _ = run(capsys, "eval", tmp_path / "mqa", "--data", data, "--json", "--seq-len", "64", "--reference", path)
    merged = json.loads(out)
    assert code == 0 and merged["top1_agreement"] < 1.0 and merged["kl"] > 1e-4 and merged["tokens"] == same["tokens"]
