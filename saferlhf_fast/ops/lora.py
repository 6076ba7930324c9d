"""A LoRA-adapted projection in one autograd node: ``y = x @ W.T + b + s * (x @ A.T) @ B.T``.

``x [..., K]``, frozen ``W [N, K]`` / ``b [N]`` or None, trainable ``A [r, K]`` / ``B [N, r]``, ``s = alpha / r``
-> ``y [..., N]``.  Gradients (rows of ``x`` flattened, ``xa = x @ A.T``, ``g = dy``)::

    dB = s * g.T @ xa        dA = (s * g @ B).T @ x        dx = g @ W + (s * g @ B) @ A

Why one node: the adapter as two ``nn.Linear`` after the base projection (:func:`reference.lora_linear`) writes
``B xa`` into a fresh ``[M, N]`` tensor, scales it in another pass and adds it to the base output in a third; its
backward sums the base and adapter input gradients in a fourth pass over ``[M, K]``, with autograd bookkeeping
for five nodes.  Here the adapter's up-projection accumulates straight into the base output inside the GEMM
(``addmm_`` with ``alpha = s``), and ``(s g B) @ A`` straight into the base input gradient: the only extra pass
over activations is the rank-``r`` down-projection ``x @ A.T``, which LoRA needs by definition.  The base product
runs on oneDNN with the frozen weight packed once (:func:`dense.linear`'s rules); the products stay fp32.

Taken when: fp32 CPU tensors (not under autocast), no tensor subclass, frozen ``W`` / ``b`` (LoRA's case), oneDNN
chosen (``_backend.FAMILIES["lora_linear"]``; ``$SAFERLHF_ONEDNN_LINEAR=0`` switches it off), no adapter dropout
(dropout reaches only the adapter's input, so the base and adapter would need two inputs).  Anything else -- bf16
autocast, CUDA, FSDP's DTensors, dropout, a trainable base -- takes the reference composition, which equals this to
fp32 rounding (``tests/test_lora_linear.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from . import dense, reference


def fused_eligible(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                   dropout: float) -> bool:
    """Whether :func:`lora_linear` takes the one-node path for these operands (module docstring)."""
    return (dropout == 0.0 and not weight.requires_grad and (bias is None or not bias.requires_grad)
            and x.numel() > 0 and lora_a.dtype == lora_b.dtype == torch.float32
            and dense._plain(lora_a) and dense._plain(lora_b) and lora_a.device.type == lora_b.device.type == "cpu"
            and dense.eligible(x, weight, bias) and x.dtype == torch.float32
            and _backend.chosen("lora_linear", "cpu") == "onednn")


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = dense.linear_pointwise(x2, dense.packed_weight(weight), bias)
        xa = dense.matmul_nt(x2, lora_a)  # A trains: multiplied as it is, never packed
        y.addmm_(xa, lora_b.t(), alpha=scaling)  # the up-projection accumulates into the base output
        ctx.save_for_backward(x2, xa, weight, lora_a, lora_b)
        ctx.scaling, ctx.x_shape = scaling, shape
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        g = dy.reshape(-1, dy.shape[-1]).contiguous()
        g_xa = torch.mm(g, lora_b).mul_(s)  # [M, r]: the gradient reaching A's output
        d_b = torch.mm(g.t(), xa).mul_(s)  # [N, r]: a strided g.T costs MKL less than copying [M, N] contiguous
        d_a = dense.matmul_tn(g_xa, x2)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dense.matmul_nn(g, weight)
            dx.addmm_(g_xa, lora_a)  # the adapter's input gradient accumulates into the base's
            dx = dx.reshape(ctx.x_shape)
        return dx, None, None, d_a, d_b, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scaling: float,
                dropout: torch.nn.Module | None = None) -> Tensor:
    """``x @ W.T + b + scaling * dropout(x) @ A.T @ B.T`` (module docstring); ``dropout``: the adapter's input dropout
    module (``nn.Dropout``, active while training; None or ``nn.Identity``: none)."""
    active_dropout = getattr(dropout, "p", 0.0) if (dropout is not None and dropout.training) else 0.0
    if fused_eligible(x, weight, bias, lora_a, lora_b, active_dropout):
        return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, float(scaling))
    x_adapter = dropout(x) if active_dropout > 0 else x
    return reference.lora_linear(x, weight, bias, lora_a, lora_b, scaling, x_adapter=x_adapter,
                                 base=dense.linear)
