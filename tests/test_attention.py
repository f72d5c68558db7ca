import pytest
import torch
import torch.nn.functional as F

from gqa import GQAError
from gqa.attention import attention, build_mask, check_heads, kv_head_of

H, D = 12, 16


def reference(q, k, v, mask):
    """SDPA on K/V repeated to H heads (transformers' repeat_kv convention), in float64."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask).float()


def test_contiguous_grouping():
    assert [kv_head_of(h, 12, 4) for h in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [kv_head_of(h, 12, 1) for h in range(12)] == [0] * 12
    assert [kv_head_of(h, 12, 12) for h in range(12)] == list(range(12))


@pytest.mark.parametrize("n_heads,n_kv_heads,message", [(12, 5, "does not divide"), (4, 8, "more than"), (4, 0, "positive")])
def test_bad_head_counts(n_heads, n_kv_heads, message):
    with pytest.raises(GQAError, match=message):
        check_heads(n_heads, n_kv_heads)


@pytest.mark.parametrize("G", [1, 2, 3, 4, 6, 12])
@pytest.mark.parametrize("q_len", [1, 3, 24])  # decode, a short block (grouped matmul), prefill (SDPA)
def test_attention_matches_repeated_kv_reference(G, q_len):
    torch.manual_seed(G * 100 + q_len)
    B, T = 3, 40
    lengths = torch.tensor([40, 29, 17])  # tokens in each sequence's cache after this block
    q = torch.randn(B, H, q_len, D)
    k, v = torch.randn(B, G, T, D), torch.randn(B, G, T, D)
    slots = (lengths - q_len)[:, None] + torch.arange(q_len)  # the block is each sequence's last q_len tokens
    key_valid = torch.arange(T)[None] < lengths[:, None]
    mask = build_mask(slots, key_valid)
    out = attention(q, k, v, mask)
    torch.testing.assert_close(out, reference(q, k, v, mask), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("G", [1, 4, 12])
def test_causal_fast_path_matches_masked(G):
    torch.manual_seed(G)
    q, k, v = torch.randn(2, H, 20, D), torch.randn(2, G, 20, D), torch.randn(2, G, 20, D)
    mask = build_mask(torch.arange(20).expand(2, 20), torch.ones(2, 20, dtype=torch.bool))
    torch.testing.assert_close(attention(q, k, v, is_causal=True), reference(q, k, v, mask), atol=1e-5, rtol=1e-4)


def test_sliding_window_mask():
    mask = build_mask(torch.arange(6)[None], torch.ones(1, 6, dtype=torch.bool), sliding_window=2)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_decode_path_never_repeats_kv(monkeypatch):
    """The decode path must not copy K/V up to H heads: forbid the usual ways of doing so."""
    def forbidden(*args, **kwargs):
        raise AssertionError("K/V repeated on the decode path")

    q, k, v = torch.randn(2, H, 1, D), torch.randn(2, 2, 30, D), torch.randn(2, 2, 30, D)
    mask = build_mask(torch.tensor([[29], [12]]), torch.arange(30)[None] < torch.tensor([[30], [13]]))
    expected = reference(q, k, v, mask)
    monkeypatch.setattr(torch, "repeat_interleave", forbidden)
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", forbidden)
    monkeypatch.setattr(torch.Tensor, "expand", forbidden)
    monkeypatch.setattr(torch.Tensor, "repeat", forbidden)
    torch.testing.assert_close(attention(q, k, v, mask), expected, atol=1e-5, rtol=1e-4)
