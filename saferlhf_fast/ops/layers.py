"""Elementwise layer ops of the Llama decoder: RoPE, SwiGLU and RMSNorm, fused forward + backward.

* :func:`rope` ``(q [B, L, Hq, d], k [B, L, Hk, d], cos [Bc, L, d], sin_signed [Bc, L, d]) -> (q_out, k_out)``:
  ``x * cos + roll(x, d/2) * sin_signed`` per head (``sin_signed = cat(-sin, sin)``, ``Bc`` = B or 1).
* :func:`swiglu` ``(gate [..., I], up [..., I]) -> silu(gate) * up``.
* :func:`rms_norm` ``(x [..., H], weight [H], eps) -> x * rsqrt(mean(x^2, -1) + eps) * weight``.
* :func:`add_rms_norm` ``(x, residual [..., H], weight [H], eps) -> (s, rms_norm(s))`` with ``s = x + residual``: the
  pre-norm decoder's residual add fused into the following norm (one pass forward; backward returns the gradient of
  ``s`` -- the norm's plus the one ``s`` gets from the residual stream -- to both ``x`` and ``residual``).

Backends: ``cpu`` (the extension's C++ kernels, ``csrc/layer_ops.cpp``, behind C++ autograd nodes,
``csrc/autograd_ops.cpp``: one op call per direction, one pass over the data, threads over rows) and ``torch`` (the
readable references below, ``*_reference``, which are also what the model computes today).  The choice is
``_backend.choose`` (registry entries ``rope``, ``swiglu``, ``rms_norm``, ``add_rms_norm``): ``backend=``, else
``$SAFERLHF_BACKEND`` when it is ``torch`` or ``cpu``, else ``cpu`` when the extension registers the op, else
``torch`` (with one warning).  The C++ kernels take fp32 and bf16 CPU tensors in the combinations below; any other
dtype, combination or device -- or cos / sin that require grad (the kernels give them no gradient) -- goes to the
reference, whatever the backend.  Asking for ``backend="cpu"`` when the extension lacks the op is an error.

Dtypes (the kernels read bf16 exactly, compute and accumulate in fp32 and round each output once; every output and
gradient has the dtype the reference gives for the same inputs):

* ``rope``: q and k of one dtype (fp32 or bf16), cos and sin_signed of one dtype (fp32 or bf16) -> q_out, k_out and
  the gradients of q and k in q's dtype.  bf16 q / k: the fp32 expression on the upcast inputs and the tables as
  given, rounded once (the bf16 reference rounds the tables to bf16 first, then each product and the sum).
* ``swiglu``: gate and up of one dtype -> out and both gradients in that dtype.
* ``rms_norm``: x and weight each fp32 or bf16 -> y in ``promote(x, weight)``; a bf16 x is normalised in fp32 and
  rounded to bf16 before the weight scales it (the reference's and transformers' ``weight * xhat.to(x.dtype)``).
  Gradients: x's in x's dtype, weight's in weight's dtype.
* ``add_rms_norm``: x, residual, weight each fp32 or bf16 -> ``s`` in ``promote(x, residual)`` and ``y`` as
  ``rms_norm(s, weight)``.  Mixed precision: bf16 x (a projection output) + fp32 residual and weight -> fp32 s and y,
  gradient of x in bf16, of residual in fp32; all bf16 (a frozen bf16 model) -> bf16 s and y.

Numerics (``tests/test_layer_ops.py``): in fp32 the RoPE forward is bit-identical to the reference (two products and
one add, each rounded to fp32, no fma), its backward too in practice; SwiGLU and RMSNorm agree with
``F.silu(gate) * up`` and ``F.rms_norm`` to a few fp32 ulp (their own exp / summation order); all accumulation is
fp32.  With bf16 outputs the kernels are within 1 bf16 ulp of the fp32 reference on the upcast inputs rounded to
the output dtype (the all-bf16 norm, which rounds twice as the reference does, within 2), never further than the
bf16 reference itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend

BACKENDS = ("cpu", "torch")
_CPU = torch.device("cpu")


# ============================================================================================== references
def rope_reference(q: Tensor, k: Tensor, cos: Tensor, sin_signed: Tensor) -> tuple[Tensor, Tensor]:
    """``x * cos + roll(x, d/2) * sin_signed`` on ``[B, L, H, d]`` q and k with ``[Bc, L, d]`` tables (cast to the
    inputs' dtype first, as the model does)."""
    def apply(x: Tensor) -> Tensor:
        c, s = cos.to(x.dtype)[:, :, None], sin_signed.to(x.dtype)[:, :, None]
        return x * c + torch.roll(x, x.shape[-1] // 2, dims=-1) * s

    return apply(q), apply(k)


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """The model's ``RMSNorm``: ``F.rms_norm`` in fp32; other dtypes normalise in fp32, round, then scale."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_reference(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    s = x + residual
    return s, rms_norm_reference(s, weight, eps)


# ============================================================================================== dispatch
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _use_kernel(op: str, backend: str | None, tensors: tuple[Tensor, ...], same_dtype: tuple[Tensor, ...] = ()
                ) -> bool:
    """Whether the C++ kernel runs: the registry picks ``cpu`` for ``op`` (``_backend.choose``; the kernels are CPU
    kernels, so the choice is made for the CPU), every tensor is a plain fp32 or bf16 CPU tensor, and the tensors
    in ``same_dtype`` share one dtype (the kernel instantiates one element type for them)."""
    if _backend.choose(op, backend, _CPU) == "torch":
        return False
    return (all(t.device.type == "cpu" and t.dtype in _KERNEL_DTYPES and type(t) in (Tensor, torch.nn.Parameter)
                for t in tensors)
            and len({t.dtype for t in same_dtype}) <= 1)


# ============================================================================================== public API
def rope(q: Tensor, k: Tensor, cos: Tensor, sin_signed: Tensor, *, backend: str | None = None
         ) -> tuple[Tensor, Tensor]:
    """Rotary embedding of q ``[B, L, Hq, d]`` and k ``[B, L, Hk, d]`` (views of the projection outputs are fine:
    only the last dim must be contiguous) with cos / ``sin_signed = cat(-sin, sin)`` tables ``[Bc, L, d]``,
    ``Bc`` = B or 1.  Returns new contiguous ``q_out``, ``k_out``; gradients flow to q and k only."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin_signed.dim() != 3:
        raise ValueError(f"rope: expected q [B, L, Hq, d], k [B, L, Hk, d], cos / sin_signed [B or 1, L, d]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(cos.shape)}, {tuple(sin_signed.shape)}")
    if (_use_kernel("rope", backend, (q, k, cos, sin_signed), (q, k))
            and cos.dtype == sin_signed.dtype and not (cos.requires_grad or sin_signed.requires_grad)):
        return torch.ops.saferlhf.rope(q, k, cos, sin_signed)
    return rope_reference(q, k, cos, sin_signed)


def swiglu(gate: Tensor, up: Tensor, *, backend: str | None = None) -> Tensor:
    """``silu(gate) * up`` for gate / up ``[..., I]`` of the same shape (any strides; the kernel reads rows with a
    contiguous last dim, copying when the layout has none)."""
    if _use_kernel("swiglu", backend, (gate, up), (gate, up)):
        return torch.ops.saferlhf.swiglu(gate, up)
    return swiglu_reference(gate, up)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, *, backend: str | None = None) -> Tensor:
    """``x * rsqrt(mean(x^2, -1) + eps) * weight`` for x ``[..., H]``, weight ``[H]``."""
    if _use_kernel("rms_norm", backend, (x, weight)):
        return torch.ops.saferlhf.rms_norm(x, weight, float(eps))
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6, *, backend: str | None = None
                 ) -> tuple[Tensor, Tensor]:
    """``(s, rms_norm(s, weight, eps))`` with ``s = x + residual`` (x, residual ``[..., H]`` of one shape, weight
    ``[H]``): bit-identical to the two separate ops, in one pass (the C++ node of ``saferlhf::add_rms_norm``);
    without it (other dtypes, backend ``torch``, no extension) the two ops run separately."""
    if x.shape != residual.shape:
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
    if _use_kernel("add_rms_norm", backend, (x, residual, weight)):
        s, y = torch.ops.saferlhf.add_rms_norm(x, residual, weight, float(eps))
        return s, y
    s = x + residual
    return s, rms_norm(s, weight, eps, backend=backend)
