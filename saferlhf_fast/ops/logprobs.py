"""Log-prob gathering: ``log_softmax(logits / T)[label]`` (and entropy) without a [N, V] fp32 copy.

Two public ops:

* :func:`gather_logprobs` -- from logits ``[..., V]``;
* :func:`linear_logprobs` -- from the last hidden state ``[..., H]`` and the lm_head ``weight [V, H]``: the
  logits are produced chunk by chunk (rows), turned into log-probs by the backend kernel and dropped; backward
  recomputes each chunk's logits and overwrites them in place with their gradient.  Peak extra memory is one
  chunk of logits instead of ``[N, V]`` fp32 logits + log_softmax + gradient.

Both return fp32 and are differentiable (w.r.t. logits, or hidden and weight; entropy too).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from . import reference
from .dense import autocast_bf16, compute_weight, matmul_nn, matmul_nt, onednn_bf16_available

IGNORE_INDEX = reference.IGNORE_INDEX

# Upper bound on the elements of one logits chunk in linear_logprobs (fp32: 64 MiB) when gradients are needed: one
# chunk keeps its d logp / d logits from the forward instead of recomputing the logits in backward.
_CHUNK_ELEMENTS = 1 << 24
# Without gradients nothing is kept: smaller chunks (fp32: 16 MiB) keep the lm_head matmul's output in cache, which
# makes the no-grad pass (reference log-probs) faster than one large block (docs/perf-log.md).
_NOGRAD_CHUNK_ELEMENTS = 1 << 22


def _flatten(logits_or_hidden: Tensor, labels: Tensor):
    if labels.shape != logits_or_hidden.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match leading shape {tuple(logits_or_hidden.shape[:-1])}"
        )
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    x = logits_or_hidden.reshape(-1, logits_or_hidden.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, labels.reshape(-1).to(torch.int64).contiguous()


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return temperature


class _GatherLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, with_entropy, kernels):
        logp, lse, entropy = kernels.logprobs_forward(logits, labels, temperature, ignore_index, with_entropy)
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.args = (temperature, ignore_index, kernels)
        ctx.mark_non_differentiable(lse)
        return logp, lse, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_lse, grad_entropy):
        logits, labels, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, kernels = ctx.args
        grad_logits = torch.empty_like(logits)
        kernels.logprobs_backward(
            _as_grad(grad_logp, lse), _maybe_grad(grad_entropy, lse), logits, labels, lse, entropy,
            temperature, ignore_index, grad_logits,
        )
        return grad_logits, None, None, None, None, None


def _as_grad(g, like):
    return torch.zeros_like(like) if g is None else g.float().contiguous()


def _maybe_grad(g, like):
    return None if g is None else g.float().contiguous()


def gather_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
    backend: str | None = None,
):
    """``logp = log_softmax(logits / temperature, -1).gather(-1, labels)`` in fp32.

    logits ``[..., V]`` (fp32 / bf16 / fp16), labels ``[...]`` integer -> logp ``[...]`` fp32 (and entropy
    ``[...]`` fp32 with ``return_entropy``).  ``labels == ignore_index`` gives 0 and no gradient; other labels
    outside ``[0, V)`` raise ``ValueError``.  Differentiable w.r.t. logits.
    """
    temperature = _check_temperature(temperature)
    name = _backend.choose("gather_logprobs", backend, logits.device)
    if name == "torch":
        return reference.gather_logprobs(
            logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
        )
    x, y = _flatten(logits, labels)
    reference.check_labels(y, x.shape[-1], ignore_index)
    logp, _lse, entropy = _GatherLogprobs.apply(
        x, y, temperature, ignore_index, return_entropy, _backend.kernel_module(name)
    )
    logp = logp.view(labels.shape)
    return (logp, entropy.view(labels.shape)) if return_entropy else logp


def _chunk_rows(n_rows: int, vocab: int, grad: bool = True) -> int:
    budget = _CHUNK_ELEMENTS if grad else _NOGRAD_CHUNK_ELEMENTS
    return max(1, min(n_rows, budget // max(vocab, 1)))


def _softcap_(logits: Tensor, cap: float) -> Tensor:
    """``cap * tanh(z / cap)`` in place (transformers' order of operations: the same rounding as its Gemma 2)."""
    return logits.div_(cap).tanh_().mul_(cap)


class _LinearLogprobs(torch.autograd.Function):
    """Chunked ``hidden @ weight.T`` (soft-capped with ``softcap``) -> log-probs; backward recomputes each chunk's
    logits."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, ignore_index, with_entropy, kernels, chunk, softcap=None):
        n = hidden.shape[0]
        logp = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        entropy = hidden.new_zeros(n, dtype=torch.float32)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            logits = matmul_nt(hidden[start:stop], weight)
            if softcap is not None:
                _softcap_(logits, softcap)
            lp, ls, en = kernels.logprobs_forward(logits, labels[start:stop], temperature, ignore_index, with_entropy)
            logp[start:stop] = lp
            lse[start:stop] = ls
            if with_entropy:
                entropy[start:stop] = en
            single = n <= chunk and not with_entropy and logits.dtype == torch.float32 and softcap is None
            if single and any(ctx.needs_input_grad[:2]):
                # One chunk: keep d logp / d logits (onehot - p) / T from here instead of recomputing the logits
                # in backward (the row gradient only scales it; same peak memory: one chunk).
                kernels.logprobs_backward(torch.ones_like(lp), None, logits, labels[start:stop], ls,
                                          torch.zeros_like(ls), temperature, ignore_index, logits)
                ctx.dlogits = logits
            del logits
        ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        ctx.args = (temperature, ignore_index, kernels, chunk, softcap)
        ctx.mark_non_differentiable(lse)
        return logp, lse, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_lse, grad_entropy):
        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, kernels, chunk, softcap = ctx.args
        grad_logp = _as_grad(grad_logp, lse)
        grad_entropy = _maybe_grad(grad_entropy, lse)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        n = hidden.shape[0]
        # fp32 sum of the chunks' weight gradients (bf16 accumulation over many chunks would lose bits); the first
        # chunk's product initialises it, so no [V, H] block is zero-filled.
        grad_weight = None
        dlogits = getattr(ctx, "dlogits", None)
        ctx.dlogits = None
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            h = hidden[start:stop]
            if dlogits is not None:  # only saved without entropy (whose incoming gradient is then unused zeros)
                # d loss / d logits = g[:, None] * dlogits; the row scale commutes with the matmuls, so it goes on
                # h ([n, H]) and on grad_hidden instead of a pass over the [n, V] block.
                g = grad_logp[start:stop, None]
                if need_h:
                    grad_hidden = matmul_nn(dlogits, weight).mul_(g)
                if need_w:
                    grad_weight = torch.mm(dlogits.t(), h * g)
                del dlogits
                break
            else:
                logits = matmul_nt(h, weight)
                tanh = None
                if softcap is not None:  # c = cap * tanh(z / cap): dc / dz = 1 - tanh^2
                    tanh = logits.div_(softcap).tanh_()
                    logits = tanh * softcap
                kernels.logprobs_backward(
                    grad_logp[start:stop],
                    None if grad_entropy is None else grad_entropy[start:stop],
                    logits, labels[start:stop], lse[start:stop], entropy[start:stop],
                    temperature, ignore_index, logits,  # in place: logits become d loss / d logits
                )
                if tanh is not None:
                    logits.mul_(tanh.mul_(tanh).neg_().add_(1.0))
                    del tanh
            if need_h:
                grad_hidden[start:stop] = matmul_nn(logits, weight)
            if need_w:
                if grad_weight is None:
                    grad_weight = torch.mm(logits.t(), h).float()
                elif logits.dtype == torch.float32:
                    grad_weight.addmm_(logits.t(), h)
                else:
                    grad_weight += (logits.t() @ h).float()
            del logits
        if need_w:
            if grad_weight is None:  # no rows
                grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
    backend: str | None = None,
    chunk_rows: int | None = None,
    softcap: float | None = None,
):
    """Log-probs (and entropy) of ``labels`` under ``softmax(hidden @ weight.T / temperature)``.

    ``softcap``: the logits are soft-capped first, ``z -> softcap * tanh(z / softcap)`` (Gemma 2's final logit
    soft-capping), chunk by chunk like the rest: still no ``[N, V]`` block; backward applies ``1 - tanh^2``.

    hidden ``[..., H]``, weight ``[V, H]`` (same dtype), labels ``[...]`` -> ``[...]`` fp32.  Never materialises the
    ``[N, V]`` logits on the kernel backends: rows are processed in chunks of ``chunk_rows`` (default: about 16 M
    logits per chunk).  Differentiable w.r.t. hidden and weight.

    Under CPU bf16 autocast (``--bf16``) hidden and weight are cast to bf16 first (the weight as ``ops.linear``
    casts it: per call for a trainable fp32 master, cached for a frozen one): each chunk's logits come from a bf16
    matmul (fp32 accumulation, logits rounded to bf16 as every bf16 lm_head rounds them), the log-softmax, entropy
    and their gradients run in fp32, and the weight gradient sums its chunks in fp32.  A weight held in bf16 with
    fp32 hidden states (a frozen model held in bf16) takes the same bf16 product, autocast or not.  On a CPU without
    native bf16 GEMMs (no AVX512-BF16 / AMX) the weight's bf16 values enter in fp32 instead: autocast still rounds
    the forward's products to bf16, and the backward's products run in fp32 (torch's bf16 GEMMs are 6-100x slower
    than its fp32 ones there).
    """
    temperature = _check_temperature(temperature)
    held_bf16 = weight.dtype == torch.bfloat16 and hidden.dtype == torch.float32 and hidden.device.type == "cpu"
    if held_bf16 or (torch.float32 in (hidden.dtype, weight.dtype) and autocast_bf16(hidden)):
        if onednn_bf16_available():
            hidden, weight = hidden.to(torch.bfloat16), compute_weight(weight)
        else:
            # No native bf16 GEMM (an AVX2 CPU): torch's bf16 GEMMs run 6-100x slower than fp32 ones there.  The
            # weight's bf16 values in fp32, held or cast alike: the forward's products are still rounded to bf16 by
            # autocast, the backward's run in fp32 on the same values (so a weight held in bf16 trains as its fp32
            # original).
            weight = compute_weight(weight).float()
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with H = {hidden.shape[-1]}, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    name = _backend.choose("linear_logprobs", backend, hidden.device)
    if name == "torch":
        return reference.linear_logprobs(
            hidden, weight, labels, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy, softcap=softcap,
        )
    h, y = _flatten(hidden, labels)
    reference.check_labels(y, weight.shape[0], ignore_index)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    chunk = chunk_rows or _chunk_rows(h.shape[0], weight.shape[0], grad)
    logp, _lse, entropy = _LinearLogprobs.apply(
        h, weight, y, temperature, ignore_index, return_entropy, _backend.kernel_module(name), chunk,
        None if softcap is None else float(softcap),
    )
    logp = logp.view(labels.shape)
    return (logp, entropy.view(labels.shape)) if return_entropy else logp
