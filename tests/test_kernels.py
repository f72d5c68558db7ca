"""The Triton GQA decode kernel against an fp64 reference. On a CPU machine it runs in Triton's
interpreter (TRITON_INTERPRET=1, set in conftest before Triton is imported); on a GPU, for real."""

import math

import pytest
import torch

pytest.importorskip("triton")

from gqa.kernels import gqa_decode  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(q, k, v, lengths):
    """fp64 softmax attention of one query per sequence over its first lengths[b] keys, K/V repeated per group."""
    B, H, D = q.shape
    G = k.shape[1]
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        kk = k[b, :, :n].double().repeat_interleave(H // G, dim=0)  # [H, n, D]
        vv = v[b, :, :n].double().repeat_interleave(H // G, dim=0)
        scores = torch.einsum("hd,hnd->hn", q[b].double(), kk) / math.sqrt(D)
        out[b] = torch.einsum("hn,hnd->hd", scores.softmax(-1), vv)
    return out


def to_pages(k, v, page_size, generator):
    """Scatter a contiguous cache [B, G, T, D] into shuffled pages [P, G, page_size, D] plus a block table."""
    B, G, T, D = k.shape
    per_seq = T // page_size
    order = torch.randperm(B * per_seq, generator=generator)
    k_pages = torch.empty(B * per_seq, G, page_size, D, dtype=k.dtype)
    v_pages = torch.empty_like(k_pages)
    table = order.view(B, per_seq)
    for b in range(B):
        for i in range(per_seq):
            k_pages[table[b, i]] = k[b, :, i * page_size:(i + 1) * page_size]
            v_pages[table[b, i]] = v[b, :, i * page_size:(i + 1) * page_size]
    return k_pages, v_pages, table


CASES = [  # (H, G, head_dim, lengths): G in {1, 2, 4, H}, ragged, lengths not multiples of the tile
    (8, 1, 64, [1, 77, 200]),
    (8, 2, 128, [130, 5, 64]),
    (8, 4, 64, [199, 33]),
    (4, 4, 128, [100, 1, 57]),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H,G,D,lengths", CASES)
@pytest.mark.parametrize("paged", [False, True])
def test_decode_kernel_matches_reference(H, G, D, lengths, paged, dtype):
    gen = torch.Generator().manual_seed(H * 1000 + G * 10 + D + len(lengths))
    B, T = len(lengths), 208  # capacity a multiple of the page size (16), not of the kernel's tile
    q = torch.randn(B, H, D, generator=gen).to(dtype)
    k = torch.randn(B, G, T, D, generator=gen).to(dtype)
    v = torch.randn(B, G, T, D, generator=gen).to(dtype)
    lengths_t = torch.tensor(lengths, dtype=torch.int32)
    expected = reference(q, k, v, lengths_t)
    if paged:
        k_pages, v_pages, table = to_pages(k, v, 16, gen)
        out = gqa_decode(q.to(DEVICE), k_pages.to(DEVICE), v_pages.to(DEVICE), lengths_t.to(DEVICE),
                         block_table=table.to(DEVICE), block_n=32)
    else:
        out = gqa_decode(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), lengths_t.to(DEVICE), block_n=32)
    assert out.dtype == dtype and out.shape == (B, H, D)
    out = out.double().cpu()
    assert torch.isfinite(out).all()
    error = (out - expected).norm() / expected.norm()
    assert error < 1e-2, error  # bf16/fp16 operands, fp32 accumulation


@pytest.mark.parametrize("splits", [1, 3])
def test_split_count_does_not_change_the_result(splits):
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 8, 64, generator=gen).half()
    k, v = torch.randn(2, 2, 160, 64, generator=gen).half(), torch.randn(2, 2, 160, 64, generator=gen).half()
    lengths = torch.tensor([160, 90], dtype=torch.int32)
    out = gqa_decode(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), lengths.to(DEVICE), num_splits=splits, block_n=32)
    expected = reference(q, k, v, lengths)
    assert (out.double().cpu() - expected).norm() / expected.norm() < 1e-2


@pytest.mark.parametrize("family", ["llama", "gpt_bigcode", "mistral"])
def test_model_decode_through_the_kernel_matches_the_default_path(tiny, family, monkeypatch):
    """Greedy generation with the model's decode steps on the Triton kernel (on CUDA for real, elsewhere in
    the interpreter) gives the same tokens as the default path on the CPU."""
    import gqa
    import gqa.model as model_module

    _, path = tiny(family)
    model = gqa.load(path)
    prompts = [[5, 17, 33, 8, 90], [44, 3], [100, 101, 102]]
    expected = gqa.generate(model, prompts, max_new_tokens=6)
    ids = torch.tensor([[7, 8, 9]])
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(ids[:, :2], cache=cache)
        plain = model(ids[:, 2:], cache=cache)
    if DEVICE == "cuda":
        model = model.to("cuda")
    else:
        monkeypatch.setenv("GQA_TRITON_ON_CPU", "1")
    calls = []
    real = model_module.gqa_decode
    monkeypatch.setattr(model_module, "gqa_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert gqa.generate(model, prompts, max_new_tokens=6) == expected
    assert len(calls) == 5 * model.config.n_layers  # every decode step of every layer took the kernel
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(ids[:, :2].to(model.device), cache=cache)
        torch.testing.assert_close(model(ids[:, 2:].to(model.device), cache=cache).cpu(), plain, atol=1e-4, rtol=0)


def test_bench_decode_harness_on_cpu(tmp_path, monkeypatch):
    """The benchmark harness end to end on a tiny grid (timings on a CPU mean nothing; the structure does)."""
    import json

    from gqa.cli import main

    monkeypatch.setenv("GQA_TRITON_ON_CPU", "1")
    assert main(["bench", "decode", "--quick", "--device", "cpu", "--dtype", "float16", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_decode.json").read_text())
    assert len(result["rows"]) == 2 * 2 * 2
    for row in result["rows"]:
        assert set(row["peers"]) == {"gqa (Triton)", "torch SDPA enable_gqa"}
        assert row["kv_bytes"] == 2 * row["batch"] * row["kv_heads"] * row["length"] * 64 * 2
        assert all(v["us"] > 0 for v in row["peers"].values())
    assert set(result["summary"]) >= {"fraction_at_most_best_peer", "worst_ratio_to_best_peer"}
    assert (tmp_path / "bench_decode.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_generate_harness_on_cpu(tmp_path):
    """Whole-model decode benchmark end to end on a tiny model: ours and transformers, roofline, speed-ups."""
    import json

    from gqa.cli import main

    assert main(["bench", "generate", "--quick", "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path),
                 "--kv-cache-dtype", "q8_0"]) == 0
    result = json.loads((tmp_path / "bench_generate.json").read_text())
    assert [(r["kv_heads"], r["batch"]) for r in result["rows"]] == [(4, 1), (4, 2), (1, 1), (1, 2)]
    for r in result["rows"]:
        assert set(r["tokens_per_s"]) == {"gqa", "gqa, q8_0 cache", "transformers generate (static cache)",
                                          "plain PyTorch + eager (K/V repeat_interleave)",
                                          "plain PyTorch + eager (SDPA enable_gqa)"}
        tokens = r["batch"] * (r["prompt"] + 2)
        assert r["kv_bytes"] == tokens * 2 * 2 * r["kv_heads"] * 32 * 4
        q8_bytes = tokens * 2 * 2 * r["kv_heads"] * 32 * 34 / 32  # 34 bytes per block of 32
        bandwidth = result["bandwidth_bytes_per_s"]
        assert r["kv_rooflines"]["gqa, q8_0 cache"] == pytest.approx(r["batch"] * bandwidth / (r["weight_bytes"] + q8_bytes))
    assert [s["kv_heads"] for s in result["speedups"]] == [1, 1]
    assert all(s["roofline_ratio"] > 1 for s in result["speedups"])
    assert result["command"] == "gqa bench generate"


def test_bench_capacity_counts_a_quantized_caches_bytes(tmp_path):
    """At one memory budget a q8_0 cache (34 bytes per 32 values) holds 3.76x the sequences of a float32 one."""
    import json

    from gqa.cli import main

    counts = {}
    for kv in ("float32", "q8_0"):
        assert main(["bench", "capacity", "--quick", "--device", "cpu", "--dtype", "float32", "--memory-gb", "0.05",
                     "--context", "64", "--kv-cache-dtype", kv, "--out", str(tmp_path / kv)]) == 0
        rows = json.loads((tmp_path / kv / "bench_capacity.json").read_text())["rows"]
        counts[kv] = {r["kv_heads"]: (r["max_sequences"], r["kv_bytes_per_sequence"]) for r in rows}
    for g in counts["q8_0"]:
        assert counts["q8_0"][g][1] * 4 * 32 == counts["float32"][g][1] * 34
        assert counts["q8_0"][g][0] == pytest.approx(counts["float32"][g][0] * 4 * 32 / 34, rel=0.01)


def test_bench_generate_rejects_unknown_peer(tmp_path, capsys):
    from gqa.cli import main

    assert main(["bench", "generate", "--quick", "--device", "cpu", "--peers", "vllm", "--out", str(tmp_path)]) == 2
    assert "unknown generate peers ['vllm']; known: transformers, plain, plain-gqa" in capsys.readouterr().err
    assert not (tmp_path / "bench_generate.json").exists()


def test_bench_capacity_on_cpu(tmp_path):
    """At a fixed budget, a G-times smaller cache holds H/G times more sequences (up to rounding)."""
    import json

    from gqa.cli import main

    argv = ["bench", "capacity", "--quick", "--device", "cpu", "--dtype", "float32", "--memory-gb", "0.01",
            "--context", "64", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "bench_capacity.json").read_text())["rows"]
    mha, mqa = rows
    assert mha["kv_bytes_per_sequence"] == 4 * mqa["kv_bytes_per_sequence"] == 64 * 2 * 2 * 4 * 32 * 4
    for r in rows:  # what is left beside the weights (MQA's are smaller: fewer K/V rows), in whole sequences
        assert r["max_sequences"] == int((0.01 * 1024**3 * 0.9 - r["weight_bytes"]) // r["kv_bytes_per_sequence"])
    assert mqa["max_sequences"] >= 4 * mha["max_sequences"]
    assert mha["tokens_per_s"] > 0 and mqa["tokens_per_s"] > 0


def test_bench_keeps_going_when_a_peer_fails(tmp_path, monkeypatch):
    """A peer that cannot run a point (out of memory, a JIT that fails) is recorded with its error, and the
    run goes on with the others: a GPU run is too short to lose to one peer."""
    import json

    from gqa import bench
    from gqa.cli import main

    def broken(q, k, v):
        raise RuntimeError("no kernel image is available\nsecond line")

    real_peers = bench.decode_peers
    monkeypatch.setattr(bench, "decode_peers", lambda device: real_peers(device) | {"broken": broken})
    assert main(["bench", "decode", "--quick", "--device", "cpu", "--dtype", "float16", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_decode.json").read_text())["rows"]
    assert len(rows) == 8 and all(r["failed"] == {"broken": "RuntimeError: no kernel image is available"} for r in rows)
    assert all(set(r["peers"]) == {"torch SDPA enable_gqa"} for r in rows)

    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(bench, "transformers_seconds_per_step", out_of_memory)
    argv = ["bench", "generate", "--quick", "--device", "cpu", "--dtype", "float32", "--peers", "transformers,plain",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "bench_generate.json").read_text())
    for r in result["rows"]:
        assert r["failed"] == {"transformers generate (static cache)": "MemoryError: "}
        assert set(r["tokens_per_s"]) == {"gqa", "plain PyTorch + eager (K/V repeat_interleave)"}
    assert all(set(s["realised"]) == {"gqa", "plain PyTorch + eager (K/V repeat_interleave)"} for s in result["speedups"])
