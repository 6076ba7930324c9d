"""Triton GAE: both streams (reward and cost, stacked as rows) in one launch (docs/kernels.md).

Design
------
* One program per row (grid ``(R,)``).  The row is cut into ``BLOCK_T`` tiles aligned on its *end* and walked
  from the last tile to the first.  Each tile is loaded time-reversed (lane ``j`` holds ``t = T-1-(k*BLOCK_T+j)``)
  so the backward recurrence ``A_t = delta_t + c * A_{t+1}`` (``c = gamma*lam``) becomes a forward inclusive scan
  of affine maps ``x -> a*x + b`` with ``(a, b) = (c, delta_t)``, composed by
  ``(a1, b1) then (a2, b2) = (a1*a2, a2*b1 + b2)`` in ``tl.associative_scan`` (``reverse=`` is not needed, so
  this runs on old Triton too).  The prefix ``(P, B)`` of lane ``j`` gives ``A = B + P * carry`` where ``carry``
  is the advantage just after the tile (from the later tile, 0 after the row's end).  Lanes past the row start
  (``t < 0``) hold the identity ``(1, 0)`` and come last in scan order, so they never touch real lanes.
* ``v_{t+1}`` is a second (cached) load of the shifted tile; ``returns = A + v``.
* The mask is fp32 or bool (loaded as uint8) with ``M`` rows, ``R % M == 0``: row ``i`` reads mask row ``i % M``, so
  the stacked reward + cost rows share one ``[B, T]`` mask with no expanded fp32 copy.
* ``BLOCK_T = min(next_pow2(T), 1024)`` on a GPU (``num_warps`` = BLOCK_T / 256, 1..4), 16 under the
  interpreter (so short rows already cross tile edges).
"""
from __future__ import annotations

import contextlib

try:
    import torch
except ImportError:  # the ahead-of-time compile check (saferlhf_fast/benchmarks/triton_aot.py) needs only triton
    torch = None
import triton
import triton.language as tl

GPU_MAX_BLOCK_T = 1024
INTERP_MAX_BLOCK_T = 16


def _block_t(t: int, gpu: bool) -> int:
    cap = GPU_MAX_BLOCK_T if gpu else INTERP_MAX_BLOCK_T
    return max(16, min(triton.next_power_of_2(max(int(t), 1)), cap))


def launch_config(t: int, gpu: bool = True) -> dict:
    """The constexpr / launch options of ``_gae_kernel`` for rows of length ``t``: what ``gae_forward`` passes, and
    what saferlhf_fast/benchmarks/triton_aot.py compiles ahead of time (for every ``t``)."""
    block = _block_t(t, gpu)
    return {"BLOCK_T": block, "num_warps": max(1, min(4, block // 256))}


# The argument types gae_forward passes (the mask is fp32 or a bool mask viewed as uint8: the "{dtype}" of the AOT
# rows); saferlhf_fast/benchmarks/triton_aot.py compiles each at every launch_config and checks that the names
# match the kernel's parameters.
AOT_KERNELS = [
    {
        "kernel": "_gae_kernel",
        "launch_config": launch_config,
        "dtypes": ("fp32", "u8"),
        "signature": {
            "rewards_ptr": "*fp32", "values_ptr": "*fp32", "mask_ptr": "*{dtype}", "adv_ptr": "*fp32",
            "ret_ptr": "*fp32", "T": "i32", "mask_rows": "i32", "gamma": "fp32", "gamma_lam": "fp32",
        },
    },
]


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def _affine_then(a1, b1, a2, b2):
    # apply x -> a1*x + b1 first, then x -> a2*x + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _gae_kernel(
    rewards_ptr, values_ptr, mask_ptr, adv_ptr, ret_ptr,
    T, mask_rows, gamma, gamma_lam,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    mbase = (row % mask_rows) * T
    j = tl.arange(0, BLOCK_T)
    carry = 0.0
    n_tiles = tl.cdiv(T, BLOCK_T)
    for k in range(0, n_tiles):
        t = T - 1 - (k * BLOCK_T + j)  # time-reversed tile
        valid = t >= 0
        m = tl.load(mask_ptr + mbase + t, mask=valid, other=0).to(tl.float32)
        r = tl.load(rewards_ptr + base + t, mask=valid, other=0.0) * m
        v = tl.load(values_ptr + base + t, mask=valid, other=0.0) * m
        has_next = valid & (t + 1 < T)
        m_next = tl.load(mask_ptr + mbase + t + 1, mask=has_next, other=0).to(tl.float32)
        v_next = tl.load(values_ptr + base + t + 1, mask=has_next, other=0.0) * m_next
        delta = r + gamma * v_next - v
        a = tl.where(valid, gamma_lam, 1.0)
        b = tl.where(valid, delta, 0.0)
        pa, pb = tl.associative_scan((a, b), 0, _affine_then)
        adv = pb + pa * carry
        tl.store(adv_ptr + base + t, adv, mask=valid)
        tl.store(ret_ptr + base + t, adv + v, mask=valid)
        # advantage at the tile's earliest time = last lane in scan order (the next tile's carry)
        carry = tl.sum(tl.where(j == BLOCK_T - 1, adv, 0.0), axis=0)


def gae_forward(rewards, values, mask, gamma, lam):
    """(advantages, returns) [R, T] fp32 for rewards / values [R, T] and a mask [M, T] (fp32 or bool, R % M == 0;
    row i uses mask row i % M)."""
    if rewards.dim() != 2 or values.shape != rewards.shape:
        raise ValueError(
            f"rewards and values must be the same [R, T]; got {tuple(rewards.shape)}, {tuple(values.shape)}"
        )
    r, t = rewards.shape
    if mask.dim() != 2 or mask.shape[1] != t or (r > 0 and (mask.shape[0] == 0 or r % mask.shape[0] != 0)):
        raise ValueError(f"mask {tuple(mask.shape)} must be [M, {t}] with M dividing the {r} rows of rewards")
    rewards = rewards.to(torch.float32).contiguous()
    values = values.to(torch.float32).contiguous()
    mask = mask.contiguous().view(torch.uint8) if mask.dtype == torch.bool else mask.to(torch.float32).contiguous()
    adv = torch.empty_like(rewards)
    ret = torch.empty_like(rewards)
    if r == 0 or t == 0:
        return adv, ret
    with _device_ctx(rewards):
        _gae_kernel[(r,)](
            rewards, values, mask, adv, ret,
            t, mask.shape[0], float(gamma), float(gamma) * float(lam),
            **launch_config(t, rewards.device.type == "cuda"),
        )
    return adv, ret
