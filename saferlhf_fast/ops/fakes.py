"""Fake (meta) implementations of every ``torch.ops.saferlhf.*`` op, so ``torch.compile`` / ``torch.export`` /
FakeTensorMode can trace code that calls them.

A fake computes the outputs' metadata only -- shape, dtype, strides, device -- exactly as the C++ kernel allocates
them (``csrc/*.cpp``): every kernel returns new contiguous tensors (``at::empty(sizes, contiguous)`` or
``at::empty_like`` of a contiguous input); log-prob outputs and the norms' rstd are fp32 whatever the inputs'
dtypes; the norms' outputs take torch's type promotion of their inputs (``s``: x and residual, ``y``: s and
weight); all other outputs take the dtype of the input named below.  No output size depends on data.

:func:`register` runs once, when :func:`saferlhf_fast._backend.extension` first imports ``saferlhf_fast._C``; it
registers a fake for each op the loaded extension defines (an older build may lack some) and returns their names.

An op whose C++ kernel is registered as ``CompositeImplicitAutograd`` (``m.def(schema, fn)``) cannot take a fake:
the dispatcher runs that kernel at the autograd key, above the fake-tensor mode, and torch refuses a Meta kernel
beside it.  So every op's C++ kernel is registered at a backend key (``TORCH_LIBRARY_IMPL(saferlhf, CPU, m)``, or
an autograd node); :func:`register` skips any op that still is composite-implicit (an older build), and
:data:`COMPOSITE_IMPLICIT` names the ops known to be so (none).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

NAMESPACE = "saferlhf"
_FAKES: dict[str, Callable] = {}
_REGISTERED: list[str] | None = None
_LIB: torch.library.Library | None = None
# Ops with a fake here that the extension registers as CompositeImplicitAutograd (see the module docstring).
COMPOSITE_IMPLICIT: tuple[str, ...] = ()


def fake(name: str):
    """Decorator: the fake of ``saferlhf::<name>``."""
    def deco(fn: Callable) -> Callable:
        _FAKES[name] = fn
        return fn
    return deco


def _contiguous(like: Tensor, shape: Sequence | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """``at::empty(shape or like.sizes(), like.options()[.dtype(dtype)])``: a new contiguous tensor."""
    return like.new_empty(tuple(like.shape) if shape is None else tuple(shape), dtype=dtype or like.dtype)


def _rows(x: Tensor) -> int:
    """``N = numel / H`` rows of ``x [..., H]`` (0 when ``H == 0``), as rms_norm_rows counts them."""
    h = x.shape[-1]
    return x.numel() // h if h != 0 else 0


# ---------------------------------------------------------------------------------- log-probs, GAE, losses
@fake("logprobs_forward")
def _logprobs_forward(logits, labels, temperature, ignore_index, with_entropy):
    """logits ``[N, V]`` -> (logp, lse, entropy), each ``[N]`` fp32."""
    n = logits.shape[0]
    return tuple(_contiguous(logits, (n,), torch.float32) for _ in range(3))


@fake("logprobs_backward")
def _logprobs_backward(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index,
                       grad_logits):
    """Writes ``grad_logits`` in place; returns nothing."""
    return None


@fake("gae_forward")
def _gae_forward(rewards, values, mask, gamma, lam):
    """``[R, T]`` -> (advantages, returns), ``empty_like(rewards)``."""
    return torch.empty_like(rewards), torch.empty_like(rewards)


def _row_objective(x: Tensor) -> tuple[Tensor, Tensor]:
    """``[R, T]`` -> (row_loss ``[R]``, grad ``empty_like(x)``)."""
    return _contiguous(x, (x.shape[0],)), torch.empty_like(x)


@fake("ppo_clip_objective")
def _ppo_clip_objective(logprobs, old_logprobs, reward_advantages, cost_advantages, mask, multiplier, clip_range):
    return _row_objective(logprobs)


@fake("clipped_value_objective")
def _clipped_value_objective(values, old_values, returns, mask, clip_range):
    return _row_objective(values)


@fake("kl_penalized_rewards")
def _kl_penalized_rewards(reward, cost, logprobs, ref_logprobs, mask, kl_coeff, clip_range_score):
    """``[R, T]`` -> (rewards, costs), ``empty_like(logprobs)``."""
    return torch.empty_like(logprobs), torch.empty_like(logprobs)


# ---------------------------------------------------------------------------------------------- attention
@fake("attention_forward")
def _attention_forward(q, k, v, cu_seqlens, scale, window):
    """q ``[B, L, Hq, D]`` (fp32 or bf16) -> (out ``[B, L, Hq, D]`` contiguous of q's dtype, lse ``[B, Hq, L]``
    fp32)."""
    b, length, hq, _ = q.shape
    return _contiguous(q), _contiguous(q, (b, hq, length), torch.float32)


@fake("attention_backward")
def _attention_backward(dout, q, k, v, out, lse, cu_seqlens, scale, window):
    """-> (dq, dk, dv), contiguous, shaped as q, k, v."""
    return _contiguous(q), _contiguous(k), _contiguous(v)


@fake("attention")
def _attention(q, k, v, cu_seqlens, scale, window):
    return _contiguous(q)


# ------------------------------------------------------------------------------------------- layer ops
def _rope_like(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    return _contiguous(q), _contiguous(k)


@fake("rope_forward")
def _rope_forward(q, k, cos, sin_signed):
    return _rope_like(q, k)


@fake("rope_backward")
def _rope_backward(dq_out, dk_out, cos, sin_signed):
    return _rope_like(dq_out, dk_out)


@fake("rope")
def _rope(q, k, cos, sin_signed):
    return _rope_like(q, k)


@fake("swiglu_forward")
def _swiglu_forward(gate, up):
    return _contiguous(gate)


@fake("swiglu_backward")
def _swiglu_backward(dout, gate, up):
    """-> (dgate, dup), contiguous, shaped as gate."""
    return _contiguous(gate), _contiguous(gate)


@fake("swiglu")
def _swiglu(gate, up):
    return _contiguous(gate)


def _norm_out(s: Tensor, weight: Tensor) -> Tensor:
    """y shaped as s in ``promote(s, weight)``."""
    return _contiguous(s, dtype=torch.promote_types(s.dtype, weight.dtype))


@fake("rms_norm_forward")
def _rms_norm_forward(x, weight, eps):
    """x ``[..., H]`` -> (y shaped as x in ``promote(x, weight)``, rstd ``[N]`` fp32), ``N = numel / H``."""
    return _norm_out(x, weight), _contiguous(x, (_rows(x),), torch.float32)


@fake("rms_norm_backward")
def _rms_norm_backward(dy, x, weight, rstd):
    """-> (dx shaped as x in x's dtype, dweight ``[H]`` in weight's)."""
    return _contiguous(x), _contiguous(weight, (x.shape[-1],))


@fake("rms_norm")
def _rms_norm(x, weight, eps):
    return _norm_out(x, weight)


def _add_norm_sum(x: Tensor, residual: Tensor) -> Tensor:
    """s = x + residual shaped as x in ``promote(x, residual)``."""
    return _contiguous(x, dtype=torch.promote_types(x.dtype, residual.dtype))


@fake("add_rms_norm_forward")
def _add_rms_norm_forward(x, residual, weight, eps):
    """-> (sum, y shaped as x, rstd ``[N]`` fp32)."""
    s = _add_norm_sum(x, residual)
    return s, _norm_out(s, weight), _contiguous(x, (_rows(x),), torch.float32)


@fake("add_rms_norm_backward")
def _add_rms_norm_backward(dy, dsum, sum, weight, rstd):  # noqa: A002 (the schema's argument names)
    """-> (d sum shaped as sum in its dtype, dweight ``[H]`` in weight's)."""
    return _contiguous(sum), _contiguous(weight, (sum.shape[-1],))


@fake("add_rms_norm")
def _add_rms_norm(x, residual, weight, eps):
    s = _add_norm_sum(x, residual)
    return s, _norm_out(s, weight)


# -------------------------------------------------------------------------------------------- linear
@fake("onednn_linear")
def _onednn_linear(x, weight, bias, forward_weight):
    """x ``[..., K]``, weight ``[N, K]`` -> ``[..., N]`` contiguous."""
    return _contiguous(x, (*x.shape[:-1], weight.shape[0]))


@fake("transpose_2d")
def _transpose_2d(x):
    """``[M, N]`` -> ``[N, M]`` contiguous."""
    return _contiguous(x, (x.shape[1], x.shape[0]))


# -------------------------------------------------------------------------------------------- decode
@fake("sample_tokens")
def _sample_tokens(logits, u, temperature, top_k, greedy):
    """logits ``[B, V]`` -> (tokens ``[B]`` int64, logp ``[B]``)."""
    b = logits.shape[0]
    return _contiguous(logits, (b,), torch.int64), _contiguous(logits, (b,))


@fake("decode_step")
def _decode_step(tok, pos, embed, weights, biases, norm_w, lm_w, k_cache, v_cache, cos, sin, mask, windows, slot,
                 n_heads, n_kv, inter, eps, packed):
    """-> logits ``[B, V]`` with ``B = tok.size(0)``; ``V = lm_w.size(0)`` for a oneDNN-packed ``[V, H]``
    lm_head, else ``lm_w.size(1)`` (the plain ``[H, V]`` one).  The KV-cache writes are in place."""
    vocab = lm_w.shape[0] if packed else lm_w.shape[1]
    return _contiguous(embed, (tok.shape[0], vocab))


# ------------------------------------------------------------------------------------------ registration
def defined_ops() -> list[str]:
    """Names of the ``saferlhf::`` ops the loaded extension defines."""
    prefix = NAMESPACE + "::"
    return sorted({n[len(prefix):].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith(prefix)})


def _is_composite_implicit(qualname: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CompositeImplicitAutograd")


def register() -> list[str]:
    """Register the fake of every ``saferlhf::`` op the extension defines (once), except the
    ``CompositeImplicitAutograd`` ones; return the names registered."""
    global _REGISTERED, _LIB
    if _REGISTERED is not None:
        return _REGISTERED
    _LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
    done = []
    for name in defined_ops():
        fn = _FAKES.get(name)
        if fn is None:
            continue
        qualname = f"{NAMESPACE}::{name}"
        if _is_composite_implicit(qualname):
            continue
        torch.library.register_fake(qualname, fn, lib=_LIB)
        done.append(name)
    _REGISTERED = done
    return done


def missing() -> list[str]:
    """Ops the extension defines that have no registered fake (the CompositeImplicitAutograd ones aside)."""
    return sorted(set(defined_ops()) - set(registered()) - set(COMPOSITE_IMPLICIT))


def registered() -> list[str]:
    """Names of the ops :func:`register` gave a fake (empty before it ran)."""
    return list(_REGISTERED or [])
