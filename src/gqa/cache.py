"""KV caches that hold G heads per layer, never H.

The static cache is pre-allocated: one [batch, G_layer, max_len, head_dim] tensor for K and one for V per
layer, plus the number of tokens each sequence already holds. Sequences of different lengths share a
batch: sequence b writes its next token at slot `lengths[b]`, which is also its position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kv_formats import KVStorage


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


@dataclass
class QuantizedKVCache:
    """A static cache that stores codes of a quantized format (`gqa.kv_formats`): per layer and field (codes,
    scales, ...) a tensor [B, G_layer, blocks, max_len, ...], block-major, so that a range of slots of one
    block is contiguous and converts to float in one vectorised pass; its bytes are the format's. K and V
    are stored as the attention computes them (after RoPE, and rotated where the storage rotates);
    attention reads ranges of slots tile by tile (`gqa.attention.attend_quantized`)."""
    storage: KVStorage
    keys: list[dict[str, torch.Tensor]]
    values: list[dict[str, torch.Tensor]]
    lengths: torch.Tensor
    scratch: dict = field(default_factory=dict)  # float buffers tiles are converted into, reused step to step

    @classmethod
    def allocate(cls, storage: KVStorage, n_kv_heads: list[int], head_dim: int, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu") -> QuantizedKVCache:
        fields = storage.format.fields(head_dim)

        def layer(g: int) -> dict[str, torch.Tensor]:
            return {name: torch.zeros((batch_size, g, shape[0], max_len, *shape[1:]), dtype=dtype, device=device)
                    for name, (shape, dtype) in fields.items()}

        return cls(storage, [layer(g) for g in n_kv_heads], [layer(g) for g in n_kv_heads],
                   torch.zeros(batch_size, dtype=torch.long, device=device))

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return next(iter(self.keys[0].values())).shape[3]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Quantize k/v [B, G, S, D] and store the codes at per-sequence slots [B, S]."""
        for store, x in ((self.keys[layer], k), (self.values[layer], v)):
            for name, codes in self.storage.format.quantize(x).items():
                codes = codes.movedim(3, 2)  # [B, G, S, blocks, ...] -> [B, G, blocks, S, ...]
                index = slots.view(slots.shape[0], 1, 1, -1, *[1] * (codes.dim() - 4)).expand_as(codes)
                if codes.element_size() == 1:  # as bytes: scatter has no 8-bit float kernels
                    store[name].view(torch.uint8).scatter_(3, index, codes.view(torch.uint8))
                else:
                    store[name].scatter_(3, index, codes)

    def slots(self, layer: int, start: int, end: int, values: bool = False) -> dict[str, torch.Tensor]:
        """The codes of slots [start, end) of K (or V), block-major."""
        return {name: t[:, :, :, start:end] for name, t in (self.values if values else self.keys)[layer].items()}

    def read(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of slots [start, end), dequantized to float32 [B, G, end - start, D]."""
        fmt = self.storage.format
        return tuple(fmt.dequantize({name: t.movedim(2, 3) for name, t in self.slots(layer, start, end, v).items()})
                     for v in (False, True))

    def read_affine(self, layer: int, start: int, end: int, values: bool = False):
        """Slots [start, end) of K (or V) as the format's (codes, scale, offset) in float32 (`KVFormat.affine`),
        the codes converted into a buffer kept for the next tile."""
        codes = self.slots(layer, start, end, values)
        first = codes["values" if "values" in codes else "codes"]
        shape = (*first.shape[:-1], first.shape[-1] * (2 if first.dtype == torch.uint8 else 1))  # nibbles: 2 a byte
        key = (shape[:3], shape[-1])
        if key not in self.scratch or self.scratch[key].shape[3] < shape[3]:
            self.scratch[key] = torch.empty(shape, dtype=torch.float32, device=first.device)
        return self.storage.format.affine(codes, out=self.scratch[key][:, :, :, : shape[3]])

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in self.keys + self.values for t in store.values())


class PageAllocator:
    """A free list of KV pages shared by all sequences of a paged cache."""

    def __init__(self, num_pages: int):
        self.free = list(range(num_pages - 1, -1, -1))

    def take(self, n: int) -> list[int]:
        if n > len(self.free):
            from .errors import GQAError

            raise GQAError(f"out of KV-cache pages: {n} needed, {len(self.free)} free")
        return [self.free.pop() for _ in range(n)]

    def give_back(self, pages: list[int]) -> None:
        self.free.extend(reversed(pages))


@dataclass
class PagedKVCache:
    """KV pages shared by a batch: per layer [num_pages, G_layer, page_size, head_dim] for K and for V, and a
    block table [B, max_pages] mapping each sequence's slot s to page block_table[b, s // page_size].

    Sequences reserve pages for the tokens they will hold, so short and long sequences share memory and
    more of them fit when G is small. Table entries that are not reserved point at a scratch page (the
    last one) that absorbs the padding a right-padded prefill writes, so it never lands in a used page.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    block_table: torch.Tensor  # [B, max_pages] int32
    lengths: torch.Tensor  # [B] int64
    page_size: int
    allocator: PageAllocator
    pages: list[list[int]]  # pages reserved by each sequence

    @classmethod
    def allocate(
        cls,
        n_kv_heads: list[int],
        head_dim: int,
        batch_size: int,
        max_len: int,
        num_pages: int,
        page_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "PagedKVCache":
        shapes = [(num_pages + 1, g, page_size, head_dim) for g in n_kv_heads]  # + the scratch page
        max_pages = -(-max_len // page_size)
        return cls(
            keys=[torch.zeros(s, dtype=dtype, device=device) for s in shapes],
            values=[torch.zeros(s, dtype=dtype, device=device) for s in shapes],
            block_table=torch.full((batch_size, max_pages), num_pages, dtype=torch.int32, device=device),
            lengths=torch.zeros(batch_size, dtype=torch.long, device=device),
            page_size=page_size,
            allocator=PageAllocator(num_pages),
            pages=[[] for _ in range(batch_size)],
        )

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return self.block_table.shape[1] * self.page_size

    def reserve(self, seq: int, n_tokens: int) -> None:
        """Make sequence `seq` able to hold n_tokens tokens in all (host-side bookkeeping, between steps)."""
        needed = -(-n_tokens // self.page_size) - len(self.pages[seq])
        if needed > 0:
            if len(self.pages[seq]) + needed > self.block_table.shape[1]:
                from .errors import GQAError

                raise GQAError(f"sequence {seq} would need more than {self.max_len} tokens")
            new = self.allocator.take(needed)
            start = len(self.pages[seq])
            self.block_table[seq, start : start + needed] = torch.tensor(new, dtype=torch.int32)
            self.pages[seq].extend(new)

    def release(self, seq: int) -> None:
        """Give a finished sequence's pages back (its slot of the batch can then start a new sequence)."""
        self.allocator.give_back(self.pages[seq])
        self.pages[seq] = []
        self.block_table[seq] = self.keys[0].shape[0] - 1
        self.lengths[seq] = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, gather: bool = True):
        """Store k/v [B, G, S, D] at per-sequence slots [B, S]; return the layer's K/V gathered to
        [B, G, max_len, D] for the generic attention path (the CUDA kernel reads the pages directly)."""
        pages = self.block_table.long().gather(1, torch.div(slots, self.page_size, rounding_mode="floor")
                                               .clamp(max=self.block_table.shape[1] - 1))
        offsets = slots % self.page_size
        self.keys[layer][pages, :, offsets] = k.transpose(1, 2).to(self.keys[layer].dtype)
        self.values[layer][pages, :, offsets] = v.transpose(1, 2).to(self.values[layer].dtype)
        return self.gather(layer) if gather else None

    def gather(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        def one(store):
            g, d = store.shape[1], store.shape[3]
            pages = store[self.block_table.long()]  # [B, max_pages, G, page_size, D]
            return pages.permute(0, 2, 1, 3, 4).reshape(self.batch_size, g, self.max_len, d)

        return one(self.keys[layer]), one(self.values[layer])

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
