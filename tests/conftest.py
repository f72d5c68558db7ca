import os
import re
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


def user_error(capsys, argv, message):
    """Run the CLI; assert a user error: exit 2, one `gqa: error:` line holding `message`, no traceback."""
    from gqa.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    # a progress bar (tqdm, on stderr) may precede the error when the mistake shows only while working
    # (a nested bar that clears itself leaves only cursor-movement escapes on its line)
    lines = [line for line in err.splitlines()
             if re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line).strip() and "%|" not in line.split("\r")[-1]]
    assert len(lines) == 1 and lines[0].startswith("gqa: error:") and "Traceback" not in err, err
    assert message in lines[0], err
    return lines[0]


def factor_norms(attn) -> list[tuple[float, float, float, float]]:
    """Per KV head of `attn` (heads.AttentionWeights): the norms of its K rows, of its query heads' Q rows
    (biases included), of its V rows and of those query heads' W_o columns."""
    r = attn.n_heads // attn.n_kv_heads

    def rows(w, b):
        bias = attn.heads(b)
        return attn.heads(w).double() if bias is None else torch.cat([attn.heads(w).double(), bias.double()[..., None]], -1)

    q, k, v, o = (t.detach() for t in (rows("wq", "bq"), rows("wk", "bk"), rows("wv", "bv"), attn.heads("wo").double()))
    return [tuple(float(t.norm()) for t in (k[g], q[g * r:(g + 1) * r], v[g], o[g * r:(g + 1) * r]))
            for g in range(attn.n_kv_heads)]
