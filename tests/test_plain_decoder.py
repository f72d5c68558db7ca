"""The plain-PyTorch static-cache decoder that `gqa bench generate` compiles: it must decode the same model."""

import pytest
import torch

from gqa.bench import random_llama
from gqa.errors import GQAError
from gqa.model import ModelConfig, Transformer
from gqa.plain_decoder import PlainDecoder

TINY = dict(n_layers=2, dim=64, n_heads=4, head_dim=16, hidden_dim=128, vocab_size=320, max_positions=64)


def decode_all(decoder: PlainDecoder, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill `prefill` tokens, then one token per step; logits of every position."""
    outs = [decoder(ids[:, :prefill], torch.arange(prefill))]
    outs += [decoder(ids[:, i : i + 1], torch.tensor([i])) for i in range(prefill, ids.shape[1])]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("expand_kv", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_plain_decoder_equals_full_forward(kv_heads, expand_kv):
    model, _ = random_llama(kv_heads, torch.float32, torch.device("cpu"), **TINY)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids)
        got = decode_all(PlainDecoder(model, 2, 16, expand_kv=expand_kv), ids, prefill=9)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_compiled_plain_decoder_step_equals_eager():
    """One full-graph compile of the decode step (what the benchmark times) gives the eager logits."""
    model, _ = random_llama(2, torch.float32, torch.device("cpu"), **TINY)
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    with torch.inference_mode():
        eager = decode_all(PlainDecoder(model, 2, 12), ids, prefill=7)[:, 7:]
        decoder = PlainDecoder(model, 2, 12)
        decoder(ids[:, :7], torch.arange(7))
        step = torch.compile(decoder, mode="reduce-overhead", fullgraph=True)
        position = torch.tensor([7])
        compiled = []
        for i in range(7, 10):
            compiled.append(step(ids[:, i : i + 1], position).clone())
            position.add_(1)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.cat(compiled, dim=1), eager, atol=1e-5, rtol=0)


def test_plain_decoder_refuses_other_families():
    config = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=4, head_dim=8, hidden_dim=64,
                         max_positions=32, norm="layer", positions="learned", mlp="plain", activation="gelu")
    with pytest.raises(GQAError, match="Llama-style models only"):
        PlainDecoder(Transformer(config), 1, 8)
    model, _ = random_llama(4, torch.float32, torch.device("cpu"), **TINY)
    with pytest.raises(GQAError, match="exceeds the model's 64 positions"):
        PlainDecoder(model, 1, 65)
