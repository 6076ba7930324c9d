"""Generalised advantage estimation for both critics' streams in one call.

``gae(rewards, values, mask)`` over the last dim with any leading dims: stack the reward and the cost stream as
``[2, B, T]`` and both are computed in one kernel launch.  Math: ``reference.gae`` (``docs/algorithm.md`` section 4).
Not differentiable: the outputs are constants of the PPO update (the reference detaches them too).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from . import reference


def _rows(x: Tensor, shape) -> Tensor:
    return x.detach().to(torch.float32).expand(shape).reshape(-1, shape[-1]).contiguous()


def _mask_rows(mask: Tensor, shape) -> Tensor:
    """The mask as ``[M, T]`` rows (bool or fp32) with flattened row ``i`` of ``shape`` using mask row ``i % M``.

    A mask that only broadcasts over leading dims (the usual ``[B, T]`` mask of a ``[2, B, T]`` reward + cost
    stack) is passed as it is, with no expanded or converted copy; any other broadcast is materialised."""
    m = mask.detach()
    while m.dim() > 1 and m.stride(0) == 0:  # an expanded view: its leading broadcast dims carry no data
        m = m[0]
    if m.dtype not in (torch.bool, torch.float32):
        m = m.to(torch.float32)
    sizes = (1,) * (len(shape) - m.dim()) + tuple(m.shape)
    k = len(shape)
    while k > 0 and sizes[k - 1] == shape[k - 1]:
        k -= 1
    if k < len(shape) and all(s == 1 for s in sizes[:k]):
        return m.reshape(-1, shape[-1]).contiguous()
    return m.expand(shape).reshape(-1, shape[-1]).contiguous()


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    backend: str | None = None,
):
    """(advantages, returns), fp32 ``[..., T]``: ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t +
    gamma lam A_{t+1}``, ``returns = A + V``, with r and V masked first and ``V_T = 0``."""
    if rewards.shape != values.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} differ in shape")
    shape = rewards.shape
    # (not torch.broadcast_shapes: a Python reference implementation, slow next to this whole op)
    if mask.dim() > len(shape) or any(m not in (1, n) for m, n in zip(reversed(mask.shape), reversed(shape))):
        raise ValueError(f"mask {tuple(mask.shape)} does not broadcast to {tuple(rewards.shape)}")
    name = _backend.choose("gae", backend, rewards.device)
    if name == "torch" or rewards.numel() == 0:
        with torch.no_grad():
            return reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
    kernels = _backend.kernel_module(name)
    adv, ret = kernels.gae_forward(
        _rows(rewards, shape), _rows(values, shape), _mask_rows(mask, shape), float(gamma), float(lam)
    )
    return adv.view(shape), ret.view(shape)
