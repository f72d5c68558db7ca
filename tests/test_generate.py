import pytest
import torch

import gqa
from gqa import GQAError
from gqa.generate import sample


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gpt_bigcode"])
def test_greedy_batch_matches_transformers_one_by_one(tiny, family):
    hf, path = tiny(family)
    model = gqa.load(path)
    prompts = [[5, 17, 33, 8, 90, 12, 7], [44, 3], [100, 101, 102, 103]]
    ours = gqa.generate(model, prompts, max_new_tokens=12)
    for prompt, out in zip(prompts, ours):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0, min_new_tokens=12)
        assert out == ref[0, len(prompt):].tolist()


def test_stop_tokens_end_each_sequence(tiny):
    _, path = tiny("llama")
    model = gqa.load(path)
    free = gqa.generate(model, [[5, 6, 7], [9]], max_new_tokens=10)
    stop = free[0][3]
    stopped = gqa.generate(model, [[5, 6, 7], [9]], max_new_tokens=10, stop_tokens=[stop])
    first = free[0].index(stop)
    assert stopped[0] == free[0][: first + 1]
    expected = free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert stopped[1] == expected


def test_sampling_is_seeded_and_top_k_one_is_greedy(tiny):
    _, path = tiny("qwen2")
    model = gqa.load(path)
    prompts = [[5, 6, 7], [9, 10]]
    a = gqa.generate(model, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=1)
    b = gqa.generate(model, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=1)
    c = gqa.generate(model, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=2)
    assert a == b and a != c
    greedy = gqa.generate(model, prompts, max_new_tokens=8)
    assert gqa.generate(model, prompts, max_new_tokens=8, temperature=0.7, top_k=1, seed=3) == greedy


def test_top_p_keeps_the_smallest_set_holding_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, 1.0, top_p=0.75, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}
    draws = {sample(logits, 1.0, top_k=3, generator=g).item() for _ in range(400)}
    assert draws == {0, 1, 2}


def test_prompt_longer_than_positions(tiny):
    _, path = tiny("gpt2")  # 128 learned positions
    model = gqa.load(path)
    with pytest.raises(GQAError, match="longer than the model's 128 positions"):
        gqa.generate(model, [[1] * 129], max_new_tokens=1)
    with pytest.raises(GQAError, match="exceeds the model's 128 positions"):
        gqa.generate(model, [[1] * 120], max_new_tokens=20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (gpu_acceptance.py runs it)")
@pytest.mark.parametrize("name", ["llama-tiny", "t5-tiny"])
def test_cuda_graph_decoding_equals_eager_decoding(name):
    """Both shapes' decode steps replayed from a CUDA graph give the logits of the same steps run eagerly."""
    from gqa.kinds import kind_of
    from gqa.presets import preset

    config = preset(name, n_kv_heads=2) if name == "llama-tiny" else preset(name, self_kv_heads=2, cross_kv_heads=2)
    kind = kind_of(config)
    torch.manual_seed(0)
    model = kind.build(config)
    model.init_weights()
    model = model.to("cuda").eval()
    prompts = [[5, 6, 7, 8], [9, 10]]
    runs = []
    with torch.inference_mode():
        for cuda_graph in (False, True):
            logits, step = kind.prefill(model, prompts, 6, cuda_graph=cuda_graph)
            steps = [logits]
            for _ in range(5):
                steps.append(step(steps[-1].argmax(-1)))
            runs.append(torch.stack(steps))
    torch.testing.assert_close(runs[1], runs[0])
    assert kind.generate(model, prompts, max_new_tokens=6, cuda_graph=True) == kind.generate(model, prompts,
                                                                                             max_new_tokens=6)
