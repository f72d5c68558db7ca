"""Content fingerprints: what a piece of resumable work was computed from.

Work that is saved to be resumed (a conversion's transferred layers, a training run's checkpoints) records
the fingerprint of its inputs: the tensors' bytes (not their path or shapes: a folder whose weights were
replaced in place has the same path and shapes), the tokens it read, the settings. A resume compares the
fingerprint of what it is given now with the saved one and never continues from work computed on other
inputs. BLAKE2b over the raw bytes: a second or so per GB, paid only where there is something to resume.
"""

from __future__ import annotations

import hashlib
import json

import torch


def tensor_bytes(tensor: torch.Tensor):
    """The tensor's storage bytes as a numpy uint8 array (no copy for a contiguous CPU tensor)."""
    t = tensor.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """One digest of named tensors: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def digest(*parts) -> str:
    """One digest of JSON-able parts (settings, other digests) in order."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()
