import pytest
import torch
from conftest import padded_batch

import gqa
from gqa import GQAError
from gqa.cache import PagedKVCache


@pytest.mark.parametrize("family", ["llama", "gpt_bigcode", "qwen2"])
def test_paged_cache_decodes_like_the_static_cache(tiny, family):
    _, path = tiny(family)
    model = gqa.load(path)
    lengths = [9, 3, 6]
    ids, mask = padded_batch(lengths, seed=5)
    static = model.new_cache(3, 16)
    paged = model.new_cache(3, 16, num_pages=12, page_size=4)
    for b, n in enumerate(lengths):
        paged.reserve(b, n + 4)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, cache=static)
        b = model(ids, attention_mask=mask, cache=paged)
        torch.testing.assert_close(b[mask], a[mask], atol=1e-5, rtol=0)
        for step in range(4):
            token = torch.tensor([[3 + step], [50 + step], [90 + step]])
            torch.testing.assert_close(model(token, cache=paged), model(token, cache=static), atol=1e-5, rtol=0)
    assert isinstance(paged, PagedKVCache)
    assert [k.shape[1] for k in paged.keys] == model.config.n_kv_heads  # G heads per page, never H
    # sequences hold only their own pages, in any order of the pool
    assert sorted(p for pages in paged.pages for p in pages) == list(range(12))[: sum(len(p) for p in paged.pages)]


def test_generate_with_pages_gives_the_same_tokens(tiny):
    _, path = tiny("mistral")
    model = gqa.load(path)
    prompts = [[5, 17, 33, 8, 90, 12, 7], [44, 3], [100, 101, 102, 103]]
    assert gqa.generate(model, prompts, max_new_tokens=7, page_size=4) == gqa.generate(model, prompts, max_new_tokens=7)


def test_paged_decode_through_the_kernel(tiny, monkeypatch):
    pytest.importorskip("triton")
    _, path = tiny("mistral")
    model = gqa.load(path)
    prompts = [[5, 17, 33, 8, 90, 12, 7], [44, 3]]
    expected = gqa.generate(model, prompts, max_new_tokens=5)
    if torch.cuda.is_available():
        model = model.to("cuda")
    else:
        monkeypatch.setenv("GQA_TRITON_ON_CPU", "1")
    assert gqa.generate(model, prompts, max_new_tokens=5, page_size=4) == expected


def test_pages_run_out_and_come_back(tiny):
    _, path = tiny("gpt_bigcode")
    model = gqa.load(path)
    cache = model.new_cache(2, 32, num_pages=5, page_size=4)
    cache.reserve(0, 16)  # 4 pages
    with pytest.raises(GQAError, match="out of KV-cache pages: 2 needed, 1 free"):
        cache.reserve(1, 8)
    cache.release(0)
    cache.reserve(1, 20)
    assert len(cache.pages[1]) == 5 and cache.pages[0] == []


def test_page_bytes_shrink_by_h_over_g(tiny, tmp_path):
    """The capacity story: the same pages hold the same tokens in H/G times fewer bytes."""
    _, path = tiny("llama")  # 4 query heads
    sizes = {}
    for g in (4, 2, 1):
        gqa.convert(path, tmp_path / f"g{g}", n_kv_heads=g, progress=False)
        model = gqa.load(tmp_path / f"g{g}")
        cache = model.new_cache(2, 32, num_pages=8, page_size=4)
        sizes[g] = cache.bytes()
        assert sizes[g] == (8 + 1) * 4 * model.kv_bytes_per_token()  # pages (+ scratch) x tokens x bytes/token
    assert sizes[4] == 2 * sizes[2] == 4 * sizes[1]
