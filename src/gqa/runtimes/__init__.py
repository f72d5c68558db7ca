"""What a converted model needs to run elsewhere, beyond its weights and config.json.

A family whose config.json names a model class that a runtime does not ship (per-layer KV heads as
`DeciLMForCausalLM`: transformers has no class for it, vLLM has the model but not its configuration class)
carries gqa's own modules for it, listed in the family's `remote_code` and kept here in a folder per
family (`decilm/`). They are written into every such output next to an `auto_map` entry of its
config.json, so `trust_remote_code=True` loads them. gqa never imports or runs them itself: they are for
the runtimes, and are the only Python files it writes into a model folder (`checkpoints.files.
write_remote_code` copies them: they are this package's data, not code gqa imports).
"""
