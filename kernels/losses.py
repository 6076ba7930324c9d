"""Triton PPO / PPO-Lagrangian losses with their gradient in the same pass, and KL-penalised rewards
(docs/kernels.md).

Design
------
* One program per row (grid ``(R,)``), looping over T in ``BLOCK_T`` tiles.
* Losses: pass 1 sums the mask (``den``, 0 -> 1); pass 2 computes the elementwise objective, accumulates
  ``sum obj*mask`` in a ``BLOCK_T`` vector and stores ``grad = (+-scale) * mask/den * dobj`` directly, so the
  gradient is written once and never rescaled.  The mask re-read of pass 2 hits cache.
  Tie rules are the ones of torch autograd (``torch.minimum`` / ``torch.maximum`` split ties half/half,
  ``clamp`` passes the gradient on the closed interval).
* ``kl_penalized_rewards``: pass 1 finds ``end`` (last ``t`` with mask != 0, -1 if none), pass 2 writes both
  outputs.
* ``BLOCK_T = min(next_pow2(T), 1024)`` on a GPU (``num_warps`` = BLOCK_T / 256, 1..4), 16 under the interpreter.
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


def _num_warps(block: int) -> int:
    return max(1, min(4, block // 256))


def launch_config(t: int, gpu: bool = True) -> dict:
    """The constexpr / launch options of the three kernels for rows of length ``t``: what the launchers pass, and
    what saferlhf_fast/benchmarks/triton_aot.py compiles ahead of time (for every ``t``)."""
    block = _block_t(t, gpu)
    return {"BLOCK_T": block, "num_warps": _num_warps(block)}


# The argument types the launchers pass (everything is fp32 after _rows) and the constexpr flags;
# saferlhf_fast/benchmarks/triton_aot.py compiles every combination at every launch_config and checks that the names
# match the kernels' parameters.
AOT_KERNELS = [
    {
        "kernel": "_ppo_clip_kernel",
        "launch_config": launch_config,
        "dtypes": ("fp32",),
        "flags": {"HAS_COST": (False, True)},
        "signature": {
            "logp_ptr": "*fp32", "old_ptr": "*fp32", "adv_r_ptr": "*fp32", "adv_c_ptr": "*fp32", "mask_ptr": "*fp32",
            "loss_ptr": "*fp32", "grad_ptr": "*fp32", "T": "i32", "lam": "fp32", "one_plus_lam": "fp32",
            "lo": "fp32", "hi": "fp32",
        },
    },
    {
        "kernel": "_clipped_value_kernel",
        "launch_config": launch_config,
        "dtypes": ("fp32",),
        "signature": {
            "values_ptr": "*fp32", "old_ptr": "*fp32", "returns_ptr": "*fp32", "mask_ptr": "*fp32",
            "loss_ptr": "*fp32", "grad_ptr": "*fp32", "T": "i32", "clip": "fp32",
        },
    },
    {
        "kernel": "_kl_rewards_kernel",
        "launch_config": launch_config,
        "dtypes": ("fp32",),
        "signature": {
            "reward_ptr": "*fp32", "cost_ptr": "*fp32", "logp_ptr": "*fp32", "ref_ptr": "*fp32", "mask_ptr": "*fp32",
            "rewards_ptr": "*fp32", "costs_ptr": "*fp32", "T": "i32", "kl_coeff": "fp32", "clip": "fp32",
        },
    },
]


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def _row_den(mask_ptr, base, T, BLOCK_T: tl.constexpr):
    """sum_t mask over one row, 0 replaced by 1."""
    cols = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        offs = start + cols
        acc += tl.load(mask_ptr + base + offs, mask=offs < T, other=0.0)
    den = tl.sum(acc, axis=0)
    return tl.where(den == 0.0, 1.0, den)


@triton.jit
def _ppo_clip_kernel(
    logp_ptr, old_ptr, adv_r_ptr, adv_c_ptr, mask_ptr, loss_ptr, grad_ptr,
    T, lam, one_plus_lam, lo, hi,
    HAS_COST: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    cols = tl.arange(0, BLOCK_T)
    den = _row_den(mask_ptr, base, T, BLOCK_T)
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        offs = start + cols
        valid = offs < T
        lp = tl.load(logp_ptr + base + offs, mask=valid, other=0.0)
        old = tl.load(old_ptr + base + offs, mask=valid, other=0.0)
        adv = tl.load(adv_r_ptr + base + offs, mask=valid, other=0.0)
        if HAS_COST:
            adv_c = tl.load(adv_c_ptr + base + offs, mask=valid, other=0.0)
            adv = (adv - lam * adv_c) / one_plus_lam
        m = tl.load(mask_ptr + base + offs, mask=valid, other=0.0)
        rho = tl.exp(lp - old)
        rho_c = tl.minimum(tl.maximum(rho, lo), hi)
        s1 = adv * rho
        s2 = adv * rho_c
        obj = tl.minimum(s1, s2)
        inr = tl.where((rho >= lo) & (rho <= hi), 1.0, 0.0)
        w = tl.where(s1 < s2, 1.0, tl.where(s1 == s2, 0.5 * (1.0 + inr), inr))
        dobj = s1 * w
        acc += tl.where(valid, obj * m, 0.0)
        tl.store(grad_ptr + base + offs, -(m / den) * dobj, mask=valid)
    tl.store(loss_ptr + row, -(tl.sum(acc, axis=0) / den))


@triton.jit
def _clipped_value_kernel(
    values_ptr, old_ptr, returns_ptr, mask_ptr, loss_ptr, grad_ptr,
    T, clip,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    cols = tl.arange(0, BLOCK_T)
    den = _row_den(mask_ptr, base, T, BLOCK_T)
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        offs = start + cols
        valid = offs < T
        v = tl.load(values_ptr + base + offs, mask=valid, other=0.0)
        old = tl.load(old_ptr + base + offs, mask=valid, other=0.0)
        g = tl.load(returns_ptr + base + offs, mask=valid, other=0.0)
        m = tl.load(mask_ptr + base + offs, mask=valid, other=0.0)
        lo = old - clip
        hi = old + clip
        vc = tl.minimum(tl.maximum(v, lo), hi)
        e1 = v - g
        e2 = vc - g
        l1 = e1 * e1
        l2 = e2 * e2
        obj = tl.maximum(l1, l2)
        d1 = 2.0 * e1
        d2 = tl.where((v >= lo) & (v <= hi), 2.0 * e2, 0.0)
        dobj = tl.where(l1 > l2, d1, tl.where(l1 < l2, d2, 0.5 * (d1 + d2)))
        acc += tl.where(valid, obj * m, 0.0)
        tl.store(grad_ptr + base + offs, 0.5 * (m / den) * dobj, mask=valid)
    tl.store(loss_ptr + row, 0.5 * (tl.sum(acc, axis=0) / den))


@triton.jit
def _kl_rewards_kernel(
    reward_ptr, cost_ptr, logp_ptr, ref_ptr, mask_ptr, rewards_ptr, costs_ptr,
    T, kl_coeff, clip,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    cols = tl.arange(0, BLOCK_T)
    last = tl.full([BLOCK_T], -1, dtype=tl.int32)
    for start in range(0, T, BLOCK_T):
        offs = start + cols
        m = tl.load(mask_ptr + base + offs, mask=offs < T, other=0.0)
        last = tl.maximum(last, tl.where(m != 0.0, offs, -1))
    end = tl.max(last, axis=0)
    reward = tl.load(reward_ptr + row)
    cost = tl.load(cost_ptr + row)
    for start in range(0, T, BLOCK_T):
        offs = start + cols
        valid = offs < T
        lp = tl.load(logp_ptr + base + offs, mask=valid, other=0.0)
        ref = tl.load(ref_ptr + base + offs, mask=valid, other=0.0)
        m = tl.load(mask_ptr + base + offs, mask=valid, other=0.0)
        kl = lp - ref
        at_end = offs == end
        r = -kl_coeff * kl + tl.where(at_end, reward, 0.0)
        c = kl_coeff * kl + tl.where(at_end, cost, 0.0)
        r = tl.minimum(tl.maximum(r, -clip), clip) * m
        c = tl.minimum(tl.maximum(c, -clip), clip) * m
        tl.store(rewards_ptr + base + offs, r, mask=valid)
        tl.store(costs_ptr + base + offs, c, mask=valid)


def _rows(*tensors):
    shape = tensors[0].shape
    if len(shape) != 2:
        raise ValueError(f"expected [R, T] inputs, got {tuple(shape)}")
    for x in tensors:
        if x.shape != shape:
            raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(shape)}")
    return [x.to(torch.float32).contiguous() for x in tensors]


def ppo_clip_objective(logprobs, old_logprobs, reward_advantages, cost_advantages, mask, multiplier, clip_range):
    """(row_loss [R], grad [R, T] = d row_loss / d logprobs) of the (Lagrangian) clipped surrogate."""
    has_cost = cost_advantages is not None
    ins = [logprobs, old_logprobs, reward_advantages, mask] + ([cost_advantages] if has_cost else [])
    ins = _rows(*ins)
    logprobs, old_logprobs, reward_advantages, mask = ins[:4]
    cost_advantages = ins[4] if has_cost else reward_advantages  # dummy pointer when absent
    r, t = logprobs.shape
    row_loss = torch.empty(r, dtype=torch.float32, device=logprobs.device)
    grad = torch.empty_like(logprobs)
    if r == 0:
        return row_loss, grad
    lam = float(multiplier)
    eps = float(clip_range)
    gpu = logprobs.device.type == "cuda"
    with _device_ctx(logprobs):
        _ppo_clip_kernel[(r,)](
            logprobs, old_logprobs, reward_advantages, cost_advantages, mask, row_loss, grad,
            t, lam, 1.0 + lam, 1.0 - eps, 1.0 + eps,
            HAS_COST=has_cost, **launch_config(t, gpu),
        )
    return row_loss, grad


def clipped_value_objective(values, old_values, returns, mask, clip_range):
    """(row_loss [R], grad [R, T] = d row_loss / d values) of the clipped value loss."""
    values, old_values, returns, mask = _rows(values, old_values, returns, mask)
    r, t = values.shape
    row_loss = torch.empty(r, dtype=torch.float32, device=values.device)
    grad = torch.empty_like(values)
    if r == 0:
        return row_loss, grad
    gpu = values.device.type == "cuda"
    with _device_ctx(values):
        _clipped_value_kernel[(r,)](
            values, old_values, returns, mask, row_loss, grad,
            t, float(clip_range),
            **launch_config(t, gpu),
        )
    return row_loss, grad


def kl_penalized_rewards(reward, cost, logprobs, ref_logprobs, mask, kl_coeff, clip_range_score):
    """(rewards, costs) [R, T] fp32: clamp(-+kl_coeff*(logp - ref) + [t == end]*(reward|cost)) * mask."""
    logprobs, ref_logprobs, mask = _rows(logprobs, ref_logprobs, mask)
    r, t = logprobs.shape
    reward = reward.to(torch.float32).reshape(-1).contiguous()
    cost = cost.to(torch.float32).reshape(-1).contiguous()
    if reward.numel() != r or cost.numel() != r:
        raise ValueError(f"reward and cost must have {r} elements, got {reward.numel()} and {cost.numel()}")
    rewards = torch.empty_like(logprobs)
    costs = torch.empty_like(logprobs)
    if r == 0 or t == 0:
        return rewards, costs
    gpu = logprobs.device.type == "cuda"
    with _device_ctx(logprobs):
        _kl_rewards_kernel[(r,)](
            reward, cost, logprobs, ref_logprobs, mask, rewards, costs,
            t, float(kl_coeff), float(clip_range_score),
            **launch_config(t, gpu),
        )
    return rewards, costs
