"""DeciLM (Nemotron-NAS) configuration: Llama with a KV-head count per layer, in `block_configs`.

Written by gqa into the per-layer KV-head models it converts, because neither transformers nor vLLM ships
a configuration class for model type `nemotron-nas`: vLLM's native `DeciLMForCausalLM` reads each
layer's `block_configs[i].attention.n_heads_in_group` as attributes, and loads this class with
`trust_remote_code=True`. This file is gqa's own code (MIT); it imports only transformers.
"""

from transformers import LlamaConfig


class Section(dict):
    """One part of a block_configs entry: a dict (so the config saves as JSON unchanged) whose keys also
    read as attributes (`block.attention.n_heads_in_group`, as vLLM reads them); a missing key is an
    AttributeError, so `hasattr` works."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def sections(blocks) -> list:
    return [Section({k: Section(v) if isinstance(v, dict) else v for k, v in dict(b).items()}) for b in blocks or []]


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"
    block_configs: list | None = None  # per layer: {"attention": {"n_heads_in_group": H/G, ...}, "ffn": {...}}

    def __post_init__(self, **kwargs):
        self.block_configs = sections(self.block_configs)
        super().__post_init__(**kwargs)
