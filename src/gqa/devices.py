"""Which device a command runs on, checked once for every verb, and how much memory it has."""

from __future__ import annotations

import os
import sys

import torch

from .errors import GQAError

KNOWN = ("cpu", "cuda", "mps")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str | None) -> str:
    """`name` checked against this machine (cpu, cuda, cuda:N, mps), or cuda when available, else cpu."""
    if not name:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in KNOWN:
        raise GQAError(f"--device {name}: unknown device; choose cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GQAError(f"--device {name}: CUDA is not available on this machine (this torch is {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise GQAError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GQAError(f"--device {name}: MPS is not available on this machine")
    return name


def available_memory(device: str | torch.device) -> tuple[int, int]:
    """(available, total) bytes of the device's memory now: free GPU memory, or the OS's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, total
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024, total
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), total


def keep_freed_memory() -> None:
    """Ask glibc to keep freed large blocks for reuse instead of unmapping them: a CPU training step frees and
    re-allocates its logits and activations (tens of MB each), and every fresh mapping is page-faulted in again.
    On the demo model (16 x 256 tokens, distillation) that was 4.5 of 32 CPU-s per 8 steps in the kernel; with
    this, 1.0 (wall 18.9 -> 17.1 s). For training loops only (uptraining, transfer, the joint stage): a
    process that trains holds its peak anyway, while a plain conversion's memory bound stays glibc's default."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux") or not (name := ctypes.util.find_library("c")):
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "mallopt"):
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)  # 1 GiB: below it, blocks come from the heap
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
