"""KV caches that hold G heads per layer, never H.

The static cache is pre-allocated: one [batch, G_layer, max_len, head_dim] tensor for K and one for V per
layer, plus the number of tokens each sequence already holds. Sequences of different lengths share a
batch: sequence b writes its next token at slot `lengths[b]`, which is also its position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def kv_bytes_per_token(n_kv_heads: list[int], head_dim: int, bytes_per_element: int) -> int:
    """Bytes the cache grows by per token: sum over layers of 2 (K and V) * G * head_dim * bytes."""
    return sum(2 * g * head_dim * bytes_per_element for g in n_kv_heads)


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # per layer [B, G_layer, max_len, head_dim]
    values: list[torch.Tensor]
    lengths: torch.Tensor  # [B] int64: tokens already in the cache for each sequence

    @classmethod
    def allocate(
        cls,
        n_kv_heads: list[int],
        head_dim: int,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        shapes = [(batch_size, g, max_len, head_dim) for g in n_kv_heads]
        return cls(
            keys=[torch.zeros(s, dtype=dtype, device=device) for s in shapes],
            values=[torch.zeros(s, dtype=dtype, device=device) for s in shapes],
            lengths=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, G, S, D] at per-sequence slots [B, S]; return the layer's whole K and V.

        A scatter, not a Python loop or `.item()`, so a decode step has no host synchronisation.
        """
        index = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.keys[layer].scatter_(2, index, k.to(self.keys[layer].dtype))
        self.values[layer].scatter_(2, index, v.to(self.values[layer].dtype))
        return self.keys[layer], self.values[layer]

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
