"""Readable pure-torch reference of every op family: the spec all backends are tested against.

Everything here follows the reference implementation (PKU-Alignment/safe-rlhf) formula by formula; the math is
written out in ``docs/algorithm.md`` section 4.
It is written for clarity, not speed: ``gather_logprobs`` materialises the full ``log_softmax`` exactly as the
reference implementation does, and ``gae`` is the reference's Python loop over time.  The fast backends
(``cpu`` C++ kernels, ``cuda`` kernels, ``triton`` kernels) must agree with these functions.

Conventions shared by all backends
----------------------------------
* Masks may be bool or float; they are used as float weights (1 = real token, 0 = padding).
* ``masked_mean(x, m) = mean over leading dims of ( sum_t x*m / sum_t m )``.  A fully masked row has
  ``sum_t m == 0``: we define its row mean as 0 (denominator clamped to 1 when it is 0) and the row still counts
  in the mean over leading dims.  The reference implementation returns NaN there; everywhere it is defined we
  return exactly its value.
* Labels equal to ``ignore_index`` (-100) give log-prob 0, entropy 0 and no gradient.  Any other label outside
  ``[0, V)`` is an error.
* All math and all outputs are fp32 whatever the input dtype (bf16 / fp16 inputs are upcast).
"""
from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------- helpers
def _as_float_mask(mask: Tensor) -> Tensor:
    return mask.to(torch.float32) if mask.dtype != torch.float64 else mask


def row_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Per-row masked mean over the last dim: ``sum_t x*m / sum_t m`` with a 0/0 row defined as 0.  [..., T] -> [...]"""
    m = _as_float_mask(mask).to(x.dtype)
    den = m.sum(-1)
    den = torch.where(den == 0, torch.ones_like(den), den)
    return (x * m).sum(-1) / den


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """``mean_{leading}( sum_t x*m / sum_t m )`` -> scalar.  x, mask: [..., T]."""
    return row_mean(x, mask).mean()


def check_labels(labels: Tensor, vocab_size: int, ignore_index: int = IGNORE_INDEX) -> None:
    """Raise ``ValueError`` when a label is outside ``[0, vocab_size)`` and is not ``ignore_index``.  Under
    torch.compile the check is an assertion inside the graph (``torch._assert_async``: a ``RuntimeError`` when the
    compiled code runs), so the data-dependent test does not break the graph."""
    bad = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), f"a label is out of range for vocabulary size {vocab_size} "
                                        f"(valid: 0..{vocab_size - 1}, or ignore_index={ignore_index})")
        return
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(
            f"label {int(labels[idx])} at index {idx} is out of range for vocabulary size {vocab_size} "
            f"(valid: 0..{vocab_size - 1}, or ignore_index={ignore_index})"
        )


# ----------------------------------------------------------------------------------------------- log-probs
def gather_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
):
    """``logp[i] = log_softmax(logits[i] / temperature)[labels[i]]`` (fp32).

    logits [..., V] any float dtype, labels [...] int.  With ``return_entropy`` also returns
    ``H[i] = -sum_v p log p`` of the same tempered distribution.  Ignored labels give 0 for both.
    This materialises the full [..., V] fp32 log_softmax, as the reference implementation does.
    """
    check_labels(labels, logits.shape[-1], ignore_index)
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    ignored = labels == ignore_index
    safe_labels = torch.where(ignored, torch.zeros_like(labels), labels).long()
    logp = logp_all.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logp = logp.masked_fill(ignored, 0.0)
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    entropy = entropy.masked_fill(ignored, 0.0)
    return logp, entropy


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
    softcap: float | None = None,
):
    """``gather_logprobs(hidden @ weight.T, labels)``: hidden [..., H], weight [V, H] -> [...] fp32.

    The matmul runs in the inputs' dtype (as an lm_head would); softmax math is fp32.  ``softcap``: logits
    ``z -> softcap * tanh(z / softcap)`` first (Gemma 2).
    """
    logits = hidden @ weight.t()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return gather_logprobs(
        logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
    )


# ----------------------------------------------------------------------------------------------- LoRA
def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scaling: float,
                *, x_adapter: Tensor | None = None, base=None) -> Tensor:
    """A LoRA-adapted projection as PEFT computes it: ``base(x, W, b) + (x_adapter @ A.T @ B.T) * scaling``.

    ``x_adapter``: the adapter's input (``x`` after the adapter's dropout; default ``x``); ``base``: the base
    projection (default ``F.linear``).  The up-projection's output is scaled, then added (PEFT's order).
    """
    base = torch.nn.functional.linear if base is None else base
    x_adapter = x if x_adapter is None else x_adapter
    return base(x, weight, bias) + (x_adapter @ lora_a.t() @ lora_b.t()) * scaling


# ----------------------------------------------------------------------------------------------- GAE
def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation, the reference implementation's loop, over the last dim.

    rewards, values, mask: [..., T].  Values and rewards are multiplied by the mask first; the value after the
    last position is 0::

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V        (V masked)

    Returns (advantages, returns), fp32, same shape.  Advantages are not whitened.  Like the reference, the
    recursion runs through padded positions too (their delta is 0 after masking), so a left-padded row carries
    decayed advantages into its pad positions; every consumer masks them.
    """
    m = _as_float_mask(mask)
    values = values.float() * m
    rewards = rewards.float() * m
    length = rewards.shape[-1]
    last = torch.zeros_like(rewards[..., 0])
    advantages_reversed = []
    for t in reversed(range(length)):
        next_values = values[..., t + 1] if t < length - 1 else torch.zeros_like(last)
        delta = rewards[..., t] + gamma * next_values - values[..., t]
        last = delta + gamma * lam * last
        advantages_reversed.append(last)
    advantages = torch.stack(advantages_reversed[::-1], dim=-1)
    return advantages, advantages + values


# ----------------------------------------------------------------------------------------------- rewards
def end_index(mask: Tensor) -> Tensor:
    """Index of the last real token of each row ([..., T] -> [...] int64); -1 for a fully masked row."""
    m = mask.to(torch.bool)
    t = torch.arange(m.shape[-1], device=m.device)
    return torch.where(m, t, torch.full_like(t, -1)).amax(-1)


def kl_penalized_rewards(
    reward: Tensor,
    cost: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kl_coeff: float,
    clip_range_score: float = 50.0,
):
    """Per-token rewards and costs of the PPO-Lagrangian step (``docs/algorithm.md`` section 4).

    reward, cost [B]; logprobs, ref_logprobs, mask [B, T] ->  (rewards [B, T], costs [B, T]) fp32::

        kl_t = logp_t - logp_ref_t
        r_t  = clamp(-kl_coeff * kl_t + [t == end] * R, -clip, clip)
        c_t  = clamp(+kl_coeff * kl_t + [t == end] * C, -clip, clip)

    ``end`` is the last real token of the row.  Masked positions are set to 0 (the reference leaves the KL term
    there and relies on GAE's masking; downstream results are identical).  A fully masked row is all zeros.
    """
    m = _as_float_mask(mask)
    kl = logprobs.float() - ref_logprobs.float()
    end = end_index(mask)
    at_end = (torch.arange(m.shape[-1], device=m.device) == end.unsqueeze(-1)).float()
    rewards = -kl_coeff * kl + at_end * reward.float().unsqueeze(-1)
    costs = kl_coeff * kl + at_end * cost.float().unsqueeze(-1)
    rewards = rewards.clamp(-clip_range_score, clip_range_score) * m
    costs = costs.clamp(-clip_range_score, clip_range_score) * m
    return rewards, costs


# ----------------------------------------------------------------------------------------------- losses
def clamp_closed(x: Tensor, low, high) -> Tensor:
    """``clamp(x, low, high)`` whose gradient passes on the closed interval ``low <= x <= high`` (1 there, 0 outside).

    The subgradient at an exact boundary is a convention: torch's own ``clamp`` passed it up to 2.13 and gives 0
    from 2.14 on.  The kernels and this reference keep one convention, the closed interval, on every torch, so the
    loss gradients do not depend on the installed torch (the boundary is a measure-zero set of ratios / values)."""
    return torch.where((x >= low) & (x <= high), x, torch.clamp(x, low, high))


def ppo_objective(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip_range: float) -> Tensor:
    """Elementwise clipped surrogate ``min(A*rho, A*clip(rho, 1-eps, 1+eps))``, rho = exp(logp - logp_old)."""
    ratio = torch.exp(logprobs.float() - old_logprobs.float())
    adv = advantages.float()
    surrogate1 = adv * ratio
    surrogate2 = adv * clamp_closed(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.minimum(surrogate1, surrogate2)


def ppo_actor_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_range: float = 0.2
) -> Tensor:
    """``-masked_mean(min(A*rho, A*clip(rho, 1-eps, 1+eps)))`` -> scalar fp32.  All inputs [..., T]."""
    return -masked_mean(ppo_objective(logprobs, old_logprobs, advantages, clip_range), mask)


def lagrangian_advantages(reward_advantages: Tensor, cost_advantages: Tensor, multiplier) -> Tensor:
    """``(A^r - lam * A^c) / (1 + lam)`` with lam a constant (no gradient flows to it)."""
    lam = multiplier.detach().float() if isinstance(multiplier, Tensor) else float(multiplier)
    return (reward_advantages.float() - lam * cost_advantages.float()) / (1.0 + lam)


def ppo_lag_actor_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    reward_advantages: Tensor,
    cost_advantages: Tensor,
    mask: Tensor,
    *,
    multiplier,
    clip_range: float = 0.2,
) -> Tensor:
    """PPO-Lagrangian actor loss: the clipped surrogate on ``(A^r - lam A^c)/(1 + lam)``."""
    advantages = lagrangian_advantages(reward_advantages, cost_advantages, multiplier)
    return ppo_actor_loss(logprobs, old_logprobs, advantages, mask, clip_range=clip_range)


def critic_objective(values: Tensor, old_values: Tensor, returns: Tensor, clip_range: float) -> Tensor:
    """Elementwise ``max((V - G)^2, (clamp(V, V_old - cv, V_old + cv) - G)^2)``."""
    values = values.float()
    old_values = old_values.float()
    returns = returns.float()
    values_clipped = clamp_closed(values, old_values - clip_range, old_values + clip_range)
    return torch.maximum(torch.square(values - returns), torch.square(values_clipped - returns))


def critic_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip_range: float = 5.0
) -> Tensor:
    """``0.5 * masked_mean(max((V - G)^2, (V_clip - G)^2))`` -> scalar fp32.  All inputs [..., T]."""
    return 0.5 * masked_mean(critic_objective(values, old_values, returns, clip_range), mask)
