import json

from gqa.cli import main

REQUIRED = {"method", "kv_heads", "alpha", "seed", "tokens_trained", "val_perplexity", "val_perplexity_alpha0",
            "reference_perplexity", "kv_bytes_per_token", "decode_tokens_per_s", "top1_agreement"}


def test_quick_demo_writes_results_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    rows, quantized = results["rows"][:10], results["rows"][10:]
    assert [r["name"] for r in rows] == [
        "MHA", "MHA + uptraining (control)", "GQA-2 mean", "GQA-2 first", "GQA-2 random", "GQA-2 aligned",
        "MQA mean", "MQA first", "MQA random", "MQA aligned"]
    # the MHA model and the aligned conversions again with llama.cpp's q8_0 and q4_0 caches (evaluation only)
    assert [(r["name"], r["kv_cache_dtype"]) for r in quantized] == [
        (f"{m}, {kv} cache", kv) for m in ("MHA", "GQA-2 aligned", "MQA aligned") for kv in ("q8_0", "q4_0")]
    by_name = {r["name"]: r for r in results["rows"]}
    for m in ("MHA", "GQA-2 aligned", "MQA aligned"):
        float_bytes = by_name[m]["kv_bytes_per_token"]  # bf16: 2 bytes a value; q8_0 34 / 32, q4_0 18 / 32
        assert by_name[f"{m}, q8_0 cache"]["kv_bytes_per_token"] == float_bytes * 34 // 64
        assert by_name[f"{m}, q4_0 cache"]["kv_bytes_per_token"] == float_bytes * 18 // 64
        assert by_name[f"{m}, q4_0 cache"]["decode_tokens_per_s"] is None
    assert by_name["MHA, q8_0 cache"]["top1_agreement"] > by_name["MHA, q4_0 cache"]["top1_agreement"]
    assert by_name["MQA aligned, q8_0 cache"]["tokens_trained"] == by_name["MQA aligned"]["tokens_trained"]
    for r in rows:
        assert REQUIRED <= set(r)
        assert r["reference_perplexity"] == rows[0]["val_perplexity"]
    mha_bytes = rows[0]["kv_bytes_per_token"]
    assert {r["kv_heads"]: r["kv_bytes_per_token"] for r in rows} == {8: mha_bytes, 2: mha_bytes // 4, 1: mha_bytes // 8}
    # mean pooling starts closer to the MHA model than a random initialisation of K/V
    by_name = {r["name"]: r for r in rows}
    assert by_name["MQA mean"]["val_perplexity_alpha0"] < by_name["MQA random"]["val_perplexity_alpha0"]
    # and the calibrated conversion closer still, even with the --quick calibration (1,024 tokens, 2 steps)
    assert by_name["MQA aligned"]["val_perplexity_alpha0"] < by_name["MQA mean"]["val_perplexity_alpha0"]
    conversion = json.loads((out / "g1-aligned" / "converted" / "conversion.json").read_text())
    assert conversion["calibration"] == {"data": "bundled", "tokens": 1024, "seq_len": 256, "tokens_used": 1024}
    assert conversion["transfer"]["steps"] == 2
    assert all(r["tokens_trained"] > 0 for r in rows[1:])
    png = (out / "perplexity_vs_kv_bytes.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "KV bytes/token" in printed and "MQA aligned" in printed and "median of 2 rounds" in printed
    assert set(results["decode"]["by_kv_heads"]) == {"8", "2", "1"}
    assert all(r["decode_tokens_per_s_range"][0] <= r["decode_tokens_per_s"] <= r["decode_tokens_per_s_range"][1]
               for r in rows)
    # a second run may replace the folder an earlier demo wrote, and nothing else
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    other = tmp_path / "taken"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    assert main(["demo", "--quick", "--out", str(other)]) == 2
    assert (other / "mine.txt").read_text() == "keep"
