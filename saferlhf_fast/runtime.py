"""Process-level set-up shared by every command (trainers, evaluation, benchmarks): the device, seeds and RNG state,
TF32, and the allocator tuning the CLI (``saferlhf-fast ...``) applies once before any work.

``tune_allocator``: glibc's malloc serves every allocation above its mmap threshold (128 KiB, raised dynamically
up to 32 MiB) with fresh ``mmap`` pages and returns freed heap tops to the kernel past its trim threshold.  A
training step allocates and frees hundreds of 0.3-30 MiB activations, so with the defaults every step page-faults
(and zero-fills) the same memory again, thousands of minor faults per forward.  Raising both
thresholds keeps freed blocks in the heap for reuse -- the effect jemalloc / tcmalloc have, which PyTorch's CPU
performance guide recommends -- at the price of RSS staying at its high-water mark instead of shrinking between
phases.  The PPO-Lag step is measurably faster with it (``docs/perf-log.md``).

``$SAFERLHF_TUNE_MALLOC=0`` leaves the allocator alone; other C libraries (musl, macOS) are left alone too.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import random
import sys

import numpy as np
import torch

from . import distributed
from .options import ConfigError
from .settings import settings

ENV_VAR = "SAFERLHF_TUNE_MALLOC"
# mallopt parameter numbers (malloc.h) and the values we set.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 << 20  # larger blocks still get their own mapping (and go back to the OS when freed)
TRIM_THRESHOLD_BYTES = 1 << 30  # free memory kept at the heap top before it is returned

_applied: bool | None = None


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # raises AttributeError on non-glibc C libraries
        return libc
    except (OSError, AttributeError):
        return None


def tune_allocator() -> bool:
    """Raise glibc malloc's mmap and trim thresholds for this process (once).  Returns whether they are set."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not settings().tune_malloc:
        return False
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
    _applied = ok
    return ok


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def apply_tf32(tf32: bool | None) -> None:
    """``--tf32``: allow (True) or forbid (False) TF32 matmuls on CUDA; None leaves torch's setting."""
    if tf32 is not None and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)


def resolve_device(name: str) -> torch.device:
    local = distributed.device_for(name)  # torchrun on GPUs: cuda:LOCAL_RANK
    if local is not None:
        return local
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available")
    return device
