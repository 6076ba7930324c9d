"""PPO / PPO-Lagrangian losses with the gradient computed in the same pass.

Each kernel returns per-row losses and the per-element gradient of those row losses (docs/kernels.md); the
autograd Function stores that gradient and scales it by the incoming per-row gradient in backward, so a loss
costs one fused pass forward and one multiply backward.  Math: ``reference`` (``docs/algorithm.md`` section 4).  Only
``logprobs`` (actor) and ``values`` (critic) receive gradients; advantages, old log-probs, old values and
returns are constants of the PPO update.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from . import reference

masked_mean = reference.masked_mean


class _RowObjective(torch.autograd.Function):
    """Wraps a kernel returning (row_loss [R], d row_loss / d x [R, T]); x is the first input."""

    @staticmethod
    def forward(ctx, x, kernel, *args):
        row_loss, grad = kernel(x, *args)
        ctx.save_for_backward(grad)
        ctx.n_args = len(args)
        return row_loss

    @staticmethod
    def backward(ctx, grad_rows):
        (grad,) = ctx.saved_tensors
        return (grad * grad_rows.unsqueeze(-1), None) + (None,) * ctx.n_args


def _apply_rows(kernel, x, *args):
    return _RowObjective.apply(x, kernel, *args)


def _prepare(tensors: dict[str, Tensor], like: str):
    shape = tensors[like].shape
    for key, t in tensors.items():
        if t.shape != shape:
            raise ValueError(f"{key} has shape {tuple(t.shape)}, expected {tuple(shape)} (the shape of {like})")
    lead = shape[:-1]
    rows = {}
    for key, t in tensors.items():
        t = t if key == like else t.detach()
        rows[key] = t.to(torch.float32).reshape(-1, shape[-1]).contiguous()
    return rows, lead


def _reduce(row_loss: Tensor, lead) -> Tensor:
    return row_loss.view(lead).mean() if len(lead) else row_loss.view(()).clone()


def ppo_actor_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_range: float = 0.2,
    backend: str | None = None,
) -> Tensor:
    """``-masked_mean(min(A*rho, A*clip(rho, 1-eps, 1+eps)))``, rho = exp(logp - logp_old); [..., T] -> scalar."""
    name = _backend.choose("ppo_clip", backend, logprobs.device)
    if name == "torch":
        return reference.ppo_actor_loss(logprobs, old_logprobs, advantages, mask, clip_range=clip_range)
    rows, lead = _prepare(
        {"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages, "mask": mask}, "logprobs"
    )
    kernel = _backend.kernel_module(name).ppo_clip_objective
    row_loss = _apply_rows(
        kernel, rows["logprobs"], rows["old_logprobs"], rows["advantages"], None, rows["mask"], 0.0,
        float(clip_range),
    )
    return _reduce(row_loss, lead)


def _multiplier(multiplier) -> float:
    value = float(multiplier.detach()) if isinstance(multiplier, Tensor) else float(multiplier)
    if not value >= 0.0:
        raise ValueError(f"the Lagrange multiplier must be >= 0, got {value}")
    return value


def ppo_lag_actor_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    reward_advantages: Tensor,
    cost_advantages: Tensor,
    mask: Tensor,
    *,
    multiplier,
    clip_range: float = 0.2,
    backend: str | None = None,
) -> Tensor:
    """Clipped surrogate on ``A = (A^r - lam A^c) / (1 + lam)``, lam = ``multiplier`` (float or tensor, constant)."""
    lam = _multiplier(multiplier)
    name = _backend.choose("ppo_clip", backend, logprobs.device)
    if name == "torch":
        return reference.ppo_lag_actor_loss(
            logprobs, old_logprobs, reward_advantages, cost_advantages, mask, multiplier=lam, clip_range=clip_range
        )
    rows, lead = _prepare(
        {
            "logprobs": logprobs,
            "old_logprobs": old_logprobs,
            "reward_advantages": reward_advantages,
            "cost_advantages": cost_advantages,
            "mask": mask,
        },
        "logprobs",
    )
    kernel = _backend.kernel_module(name).ppo_clip_objective
    row_loss = _apply_rows(
        kernel, rows["logprobs"], rows["old_logprobs"], rows["reward_advantages"], rows["cost_advantages"],
        rows["mask"], lam, float(clip_range),
    )
    return _reduce(row_loss, lead)


def critic_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_range: float = 5.0,
    backend: str | None = None,
) -> Tensor:
    """``0.5 * masked_mean(max((V - G)^2, (clamp(V, V_old - cv, V_old + cv) - G)^2))``; [..., T] -> scalar."""
    name = _backend.choose("critic_loss", backend, values.device)
    if name == "torch":
        return reference.critic_loss(values, old_values, returns, mask, clip_range=clip_range)
    rows, lead = _prepare(
        {"values": values, "old_values": old_values, "returns": returns, "mask": mask}, "values"
    )
    kernel = _backend.kernel_module(name).clipped_value_objective
    row_loss = _apply_rows(
        kernel, rows["values"], rows["old_values"], rows["returns"], rows["mask"], float(clip_range)
    )
    return _reduce(row_loss, lead)


def kl_penalized_rewards(
    reward: Tensor,
    cost: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kl_coeff: float,
    clip_range_score: float = 50.0,
    backend: str | None = None,
):
    """Per-token (rewards, costs) [B, T] fp32: ``clamp(-+kl_coeff*(logp - logp_ref) + [t == end]*(R|C))``,
    masked; ``end`` = last real token.  reward, cost [B]; the rest [B, T]."""
    if logprobs.dim() != 2 or reward.shape != logprobs.shape[:1] or cost.shape != reward.shape:
        raise ValueError(
            f"expected reward, cost [B] and logprobs [B, T]; got {tuple(reward.shape)}, {tuple(cost.shape)}, "
            f"{tuple(logprobs.shape)}"
        )
    name = _backend.choose("kl_penalized_rewards", backend, logprobs.device)
    kernel = None if name == "torch" else getattr(_backend.kernel_module(name), "kl_penalized_rewards", None)
    if kernel is None:
        return reference.kl_penalized_rewards(
            reward, cost, logprobs, ref_logprobs, mask, kl_coeff=kl_coeff, clip_range_score=clip_range_score
        )
    rows, _ = _prepare({"logprobs": logprobs, "ref_logprobs": ref_logprobs, "mask": mask}, "logprobs")
    return kernel(
        reward.detach().float().contiguous(), cost.detach().float().contiguous(), rows["logprobs"].detach(),
        rows["ref_logprobs"], rows["mask"], float(kl_coeff), float(clip_range_score),
    )
