"""Triton kernels and their launch wrappers. Importing this package never needs a GPU or Triton;
`decode_kernel_available` says whether the fast decode path can run for a tensor."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache  # asked on every decode step; the answer cannot change while the process runs
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def decode_kernel_available(t: torch.Tensor) -> bool:
    """True where the Triton decode kernel runs for real: a CUDA tensor with Triton installed.

    GQA_DISABLE_TRITON=1 turns it off (the model then uses the grouped-matmul path everywhere).
    Tests on CPU machines set TRITON_INTERPRET=1 and GQA_TRITON_ON_CPU=1 to run the model's decode path
    through the kernel in Triton's interpreter.
    """
    if not triton_installed() or os.environ.get("GQA_DISABLE_TRITON", "0") == "1":
        return False
    if t.is_cuda:
        return True
    return os.environ.get("GQA_TRITON_ON_CPU") == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def gqa_decode(*args, **kwargs):
    from .decode import gqa_decode as kernel

    return kernel(*args, **kwargs)
