"""DeciLM (Nemotron-NAS) for transformers: a Llama whose layers each have their own KV-head count.

Written by gqa into the per-layer KV-head models it converts, because transformers has no model class for
model type `nemotron-nas`: `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads
this one. Each block is transformers' own `LlamaDecoderLayer`, built from a copy of the config with that
block's KV heads and MLP width, so attention, masks, caches and `generate` are transformers' Llama code
(grouped KV heads are never copied up to H heads here: the cache holds each layer's G). This file is gqa's
own code (MIT); it imports only torch and transformers.
"""

import copy

from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .configuration_decilm import DeciLMConfig


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """DeciLM's MLP width for a block (the rule vLLM, TensorRT-LLM and llama.cpp apply)."""
    width = int(2 * ffn_mult * hidden_size / 3)
    return width if width % 256 == 0 else width + 256 - width % 256


def block_config(config: DeciLMConfig, layer: int) -> DeciLMConfig:
    """The config of one block as a plain Llama block reads it: its KV heads and its MLP width."""
    block = config.block_configs[layer]
    attention, ffn = block["attention"], block["ffn"]
    for part, name in ((attention, "attention"), (ffn, "ffn")):
        if part.get("no_op") or part.get("replace_with_linear"):
            raise ValueError(f"block {layer}: a no-op or linear-replacement {name} is not supported here")
    out = copy.copy(config)
    out.num_key_value_heads = config.num_attention_heads // attention["n_heads_in_group"]
    out.intermediate_size = ffn["intermediate_size"] if "intermediate_size" in ffn else \
        ffn_mult_to_intermediate_size(ffn["ffn_mult"], config.hidden_size)
    return out


class DeciLMModel(LlamaModel):
    config_class = DeciLMConfig

    def __init__(self, config: DeciLMConfig):
        LlamaPreTrainedModel.__init__(self, config)  # LlamaModel's own __init__ would build uniform layers first
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(block_config(config, i), i) for i in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class DeciLMForCausalLM(LlamaForCausalLM):
    config_class = DeciLMConfig

    def __init__(self, config: DeciLMConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
