"""The quantized KV cache: each format value for value as its runtime defines it (llama.cpp's blocks against
the `gguf` package's reference quantizers and hand-computed blocks, vLLM's fp8 against its saturating cast),
llama.cpp's Hadamard rotation, cached decoding equal to the full forward at every dtype (so `eval` scores
what decoding computes), the bytes a cache holds, and bad values refused in one line."""

import math

import numpy as np
import pytest
import torch
from conftest import user_error
from families import build, save
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from llama_cpp_tools import ggml_reference_quantize, gguf_layout

import gqa
from gqa.cache import QuantizedKVCache
from gqa.errors import GQAError
from gqa.kv_formats import FORMATS, hadamard, kv_format, kv_storage, rotate, rotation_sizes

LLAMA_FORMATS = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0,
                 "q4_1": GGMLQuantizationType.Q4_1, "q5_0": GGMLQuantizationType.Q5_0,
                 "q5_1": GGMLQuantizationType.Q5_1}


def hard_rows() -> torch.Tensor:
    """Rows that reach every branch: random scales, a zero row, exact halves (rounding ties), the largest
    magnitude negative and positive, repeated extremes (the first one wins), tiny and large values."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 128, generator=g) * torch.rand(48, 1, generator=g) * 3
    x[1] = 0
    x[2] = torch.round(torch.randn(128, generator=g) * 8) / 2
    x[3, :32] = torch.linspace(-1, 1, 32)
    x[4, :32] = 0.5
    x[4, 7] = -0.5
    x[5] *= 1e-6
    x[6] *= 1e4
    x[7, 32:64] = torch.tensor([2.0, -2.0] * 16)
    return x


@pytest.mark.parametrize("name", list(LLAMA_FORMATS))
def test_llama_formats_are_ggmls_reference_quantizers_byte_for_byte(name):
    x, fmt = hard_rows(), kv_format(name)
    codes = fmt.quantize(x)
    reference = quantize(x.numpy(), LLAMA_FORMATS[name])
    np.testing.assert_array_equal(gguf_layout(codes), reference)
    np.testing.assert_array_equal(fmt.dequantize(codes).numpy(), dequantize(reference, LLAMA_FORMATS[name]))
    assert reference.nbytes / x.numel() == fmt.bytes_per_value
    assert sum(t.numel() * t.element_size() for t in codes.values()) == reference.nbytes


@pytest.mark.parametrize("name", ["iq4_nl", "q4_0", "q5_1"])
def test_llama_formats_are_llama_cpps_own_c_quantizers(name):
    """Against the C the tests' llama.cpp build runs (`quantize_row_*_ref` in its libggml-base): iq4_nl,
    which the `gguf` package cannot quantize (its levels are non-uniform and its scale refitted by weighted
    least squares), over many blocks, and two of the formats above as a check of the harness. A block of
    zeros is the one difference: ggml leaves its iq4_nl codes unset (any codes give 0 at scale 0)."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([hard_rows(), torch.randn(2000, 128, generator=g) * torch.rand(2000, 1, generator=g) * 5])
    fmt = kv_format(name)
    ours = gguf_layout(fmt.quantize(x))
    theirs = ggml_reference_quantize(x.numpy(), name, round(fmt.bytes_per_value * 32))
    blocks = x.reshape(-1, 32).abs().amax(-1) > 0
    ours, theirs = ours.reshape(len(blocks), -1), theirs.reshape(len(blocks), -1)
    np.testing.assert_array_equal(ours[blocks.numpy()], theirs[blocks.numpy()])
    np.testing.assert_array_equal(ours[~blocks.numpy(), :2], theirs[~blocks.numpy(), :2])  # zero blocks: the scale
    if name == "iq4_nl":
        reference = dequantize(theirs.reshape(x.shape[0], -1), GGMLQuantizationType.IQ4_NL)
        np.testing.assert_array_equal(fmt.dequantize(fmt.quantize(x)).numpy(), reference)


def test_hand_computed_blocks():
    q8 = kv_format("q8_0")
    block = torch.zeros(32)
    block[:4] = torch.tensor([1.0, -0.5, 0.25, 0.7])
    codes = q8.quantize(block)
    assert codes["codes"].flatten()[:4].tolist() == [127, -64, 32, 89]  # 63.5 rounds away from zero (roundf), 88.9 -> 89
    assert codes["scale"].item() == torch.tensor(1 / 127).half().item()
    q4 = kv_format("q4_0")
    block = torch.zeros(32)
    block[:3] = torch.tensor([-2.0, 1.99, 0.1])  # the largest magnitude is negative: d = -2 / -8 = 0.25
    codes = q4.quantize(block)
    assert codes["scale"].item() == 0.25
    assert q4.dequantize(codes)[:3].tolist() == [-2.0, 1.75, 0.0]  # 1.99 clamps to the top code, 15 - 8 = 7
    zero = q4.quantize(torch.zeros(32))
    assert zero["scale"].item() == 0 and q4.dequantize(zero).abs().max() == 0
    q41 = kv_format("q4_1")
    ramp = torch.arange(32, dtype=torch.float32) / 2  # 0 .. 15.5: d = 15.5 / 15, m = 0
    assert q41.quantize(ramp)["min"].item() == 0
    torch.testing.assert_close(q41.dequantize(q41.quantize(ramp)), ramp, atol=15.5 / 30 + 1e-3, rtol=0)
    with pytest.raises(GQAError, match="cannot store NaN or Inf in a q8_0 KV cache"):
        q8.quantize(torch.tensor([1.0, float("nan")] * 16))


def test_fp8_saturates_as_vllm_stores_it():
    e4m3, e5m2 = kv_format("fp8"), kv_format("fp8_e5m2")
    x = torch.tensor([0.0, 1.0, -3.5, 448.0, 1000.0, -1e6, 0.1])
    assert e4m3.name == "fp8_e4m3"
    assert e4m3.roundtrip(x).tolist() == [0.0, 1.0, -3.5, 448.0, 448.0, -448.0, x[6].to(torch.float8_e4m3fn).item()]
    assert e5m2.roundtrip(torch.tensor([1e6, 3.0])).tolist() == [57344.0, 3.0]
    assert e4m3.dequantize(e4m3.quantize(torch.tensor([900.0]), scale=2.0), scale=2.0).item() == 896.0


def test_hadamard_rotation_as_llama_cpp_applies_it():
    for n in (64, 128, 256):
        h = hadamard(n)
        torch.testing.assert_close(h @ h, torch.eye(n), atol=1e-5, rtol=0)
        assert h[0, 0] == h[0, 1] == 1 / math.sqrt(n) and h[1, 1] == -h[1, 0]  # Sylvester's order, as ggml's
    q8 = FORMATS["q8_0"]
    assert rotation_sizes(q8, 64) == (64, 64) and rotation_sizes(q8, 128) == (128, 64)
    assert rotation_sizes(q8, 192) == (64, 64) and rotation_sizes(q8, 256) == (256, 64)
    assert rotation_sizes(q8, 32) == (None, None) and rotation_sizes(q8, 128, enabled=False) == (None, None)
    assert rotation_sizes(FORMATS["fp8_e4m3"], 128) == (None, None)
    x, y = torch.randn(3, 128), torch.randn(3, 128)
    torch.testing.assert_close((rotate(x, 128) * rotate(y, 128)).sum(-1), (x * y).sum(-1))  # scores unchanged
    torch.testing.assert_close(rotate(rotate(x, 64), 64), x)


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tokenizer):
    """A tiny Llama with heads of 64 (where llama.cpp rotates) and GQA-2."""
    folder = tmp_path_factory.mktemp("wide")
    save(build("llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=2, intermediate_size=192), folder,
         tokenizer)
    return folder


@pytest.mark.parametrize("name", ["float16", "bfloat16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl", "fp8_e4m3",
                                  "fp8_e5m2", "q4_0 unrotated"])
def test_cached_decoding_equals_the_full_forward(wide, name):
    """The full forward (what `eval` scores) quantizes K and V exactly as the cache stores them: the logits of
    a prefill and of one token at a time through a cache of that dtype are the full forward's."""
    model = gqa.load(wide, dtype="float32", kv_cache_dtype=name.split()[0], kv_rotation="unrotated" not in name)
    ids = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    cache = model.new_cache(2, 48)
    steps = [model(ids[:, :24], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(24, 48)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-3, rtol=0)
    plain = gqa.load(wide, dtype="float32")(ids)
    assert (full - plain).abs().max() > 1e-5  # the cache dtype changed what attention read


def test_quantized_cache_holds_the_formats_bytes(wide):
    model = gqa.load(wide, dtype="float32")
    for name, fmt in FORMATS.items():
        model.set_kv_cache_dtype(name)
        cache = model.new_cache(3, 40)
        assert isinstance(cache, QuantizedKVCache)
        assert cache.bytes() == model.kv_bytes_per_token() * 3 * 40 == 2 * 2 * 64 * 2 * 3 * 40 * fmt.bytes_per_value
    model.set_kv_cache_dtype(None)
    assert model.new_cache(3, 40).bytes() / (4 * 3 * 40 * 2 * 2 * 64 * 2) == 1  # float32: 4 bytes a value
    assert kv_storage("q8_0", 64).name == "q8_0 (Hadamard-rotated)"
    assert kv_storage("q8_0", 64, rotation=False).name == "q8_0 (unrotated)"


def test_generate_takes_a_cache_dtype_for_one_call(wide):
    model = gqa.load(wide, dtype="float32")
    prompts = [[5, 6, 7, 8], [9, 10]]
    quantized = gqa.generate(model, prompts, max_new_tokens=6, kv_cache_dtype="q4_0")
    assert model.kv_cache_storage is None  # the call's dtype is not left behind
    with model.storing_kv_as("q4_0"):
        assert gqa.generate(model, prompts, max_new_tokens=6) == quantized


@pytest.mark.parametrize("argv,message", [
    (["eval", "{m}", "--data", "{t}", "--kv-cache-dtype", "q3_k"], "argument --kv-cache-dtype: invalid choice: 'q3_k'"),
    (["generate", "{small}", "--prompt", "hi", "--kv-cache-dtype", "q8_0"],
     "--kv-cache-dtype q8_0 stores blocks of 32 values of a head; this model's heads are 16 wide"),
    (["eval", "{m}", "--data", "{t}", "--no-kv-rotation"], "--no-kv-rotation turns off llama.cpp's rotation"),
    (["eval", "{m}", "--data", "{t}", "--kv-cache-dtype", "fp8", "--no-kv-rotation"],
     "--no-kv-rotation turns off llama.cpp's rotation"),
])
def test_bad_cache_dtypes(wide, tmp_path, tokenizer, capsys, argv, message):
    small = tmp_path / "small"
    save(build("llama"), small, tokenizer)
    (tmp_path / "t.txt").write_text("the quick brown fox " * 50)
    user_error(capsys, [a.format(m=wide, t=tmp_path / "t.txt", small=small) for a in argv], message)


def test_fp8_refused_where_the_device_has_no_float8(wide, tmp_path, capsys, monkeypatch):
    """torch has no float8 tensors on some devices (MPS): one line before anything runs, not a cast error mid-run."""
    from gqa import kv_formats

    assert kv_formats.fp8_on("cpu", "fp8_e4m3") and kv_formats.fp8_on("cpu", "fp8_e5m2")  # the probe, where they are
    monkeypatch.setattr(kv_formats, "fp8_on", lambda device, name: device != "cpu")
    (tmp_path / "t.txt").write_text("the quick brown fox " * 50)
    user_error(capsys, ["eval", str(wide), "--data", str(tmp_path / "t.txt"), "--kv-cache-dtype", "fp8"],
               "--kv-cache-dtype fp8_e4m3: torch " + torch.__version__ + " has no float8 tensors on cpu")


@pytest.mark.parametrize("name", ["q8_0", "q4_1", "q5_0", "iq4_nl", "fp8_e4m3"])
def test_decode_over_tiles_is_attention_over_the_dequantized_cache(name):
    """attend_quantized reads the cache a tile at a time (codes converted per tile, scales applied to scores
    and probabilities): any tile size gives attention over the dequantized K/V, ragged lengths masked."""
    from gqa.attention import attend_quantized, attention, kv_tile

    g = torch.Generator().manual_seed(2)
    b, n_heads, n_kv, t, d = 3, 8, 2, 100, 64
    k, v = torch.randn(b, n_kv, t, d, generator=g), torch.randn(b, n_kv, t, d, generator=g)
    q = torch.randn(b, n_heads, 1, d, generator=g)
    cache = QuantizedKVCache.allocate(kv_storage(name, d, rotation=False), [n_kv], d, b, t)
    cache.write(0, k, v, torch.arange(t).expand(b, t))
    cache.lengths.copy_(torch.tensor([t - 1, 60, 7]))
    mask = (torch.arange(t)[None, :] <= cache.lengths[:, None])[:, None, None, :]
    dk, dv = cache.read(0, 0, t)
    expected = attention(q, dk, dv, mask, 1 / 8)
    for tile in (None, 16, 33, 4096):
        torch.testing.assert_close(attend_quantized(q, cache, 0, mask, 1 / 8, tile=tile), expected, atol=2e-5, rtol=0)
    assert kv_tile(1, 4, 64) == 4096 and kv_tile(8, 4, 64) == 1024 and kv_tile(64, 32, 128) == 256
