import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
try:
    import torch as _torch

    if not _torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU machines
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass
sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch
from families import FAMILIES, build, save, train_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tokenizer):
    """family -> (HF reference model, folder it was saved to with a tokenizer)."""
    models = {}

    def get(family):
        if family not in models:
            hf = build(family)
            models[family] = (hf, save(hf, tmp_path_factory.mktemp(family), tokenizer))
        return models[family]

    return get


def padded_batch(lengths, vocab=300, seed=0):
    """Right-padded token ids [B, max(lengths)] and their bool mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=g)
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
