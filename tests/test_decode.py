import torch
from conftest import padded_batch

import gqa


def test_incremental_decoding_matches_full_forward(tiny, family):
    """Prefill different-length prompts, then feed one token at a time: logits equal the full pass."""
    _, path = tiny(family)
    model = gqa.load(path)
    lengths, prompt_lengths = [14, 9, 11], [5, 2, 8]
    ids, mask = padded_batch(lengths, seed=3)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.new_cache(len(lengths), 20)
        width = max(prompt_lengths)
        prompt_mask = torch.arange(width)[None] < torch.tensor(prompt_lengths)[:, None]
        prefill = model(ids[:, :width].masked_fill(~prompt_mask, 0), attention_mask=prompt_mask, cache=cache)
        for b, n in enumerate(prompt_lengths):
            torch.testing.assert_close(prefill[b, :n], full[b, :n], atol=1e-4, rtol=0)
        assert cache.lengths.tolist() == prompt_lengths
        pos = torch.tensor(prompt_lengths)
        for _ in range(max(lengths) - min(prompt_lengths)):
            next_ids = ids[torch.arange(3), pos.clamp(max=max(lengths) - 1)][:, None]
            step = model(next_ids, cache=cache)
            for b in range(3):
                if pos[b] < lengths[b]:
                    torch.testing.assert_close(step[b, 0], full[b, pos[b]], atol=1e-4, rtol=0)
            pos += 1
    expected_heads = model.config.n_kv_heads
    assert [k.shape for k in cache.keys] == [torch.Size([3, g, 20, model.config.head_dim]) for g in expected_heads]
    assert [v.shape[1] for v in cache.values] == expected_heads


def test_cache_holds_g_heads_not_h(tiny):
    _, path = tiny("gpt_bigcode")  # multi-query: 4 query heads, 1 KV head
    model = gqa.load(path)
    cache = model.new_cache(2, 32)
    assert all(k.shape[1] == 1 for k in cache.keys + cache.values)
    assert cache.bytes() == 2 * 32 * model.kv_bytes_per_token()
