"""Dense projections ``y = x @ W.T + b`` for the decoder, on oneDNN for CPU fp32.

``x [..., K]``, ``W [N, K]``, ``b [N]`` or None -> ``y [..., N]`` in the input dtype.  Differentiable in x, W and b:
``dx = dy @ W``, ``dW = dy.T @ x`` (rows flattened), ``db = sum_rows dy``.

Why: torch's CPU ``F.linear`` in fp32 runs MKL's sgemm, which is slower at the decoder's shapes (1280 x 256 x 688
and the like) than oneDNN's matmul -- the ``mkldnn::_linear_pointwise`` op that inductor's CPU freezing and our
decode step use -- on a plain row-major weight, and slower still than oneDNN on a weight prepacked into its blocked
layout (figures in ``docs/perf-log.md``).

* Forward: oneDNN.  A trainable weight (``requires_grad``) is used as it is: it changes after every optimizer
  step, and repacking it each step costs about what packing saves.  A frozen weight (the reference, reward and
  cost models) is packed once and the blocked copy reused until the weight changes (its version counter or
  storage moves) or is freed.
* Backward: ``dx`` through oneDNN with ``W.T`` as a strided view (no copy; faster than MKL); ``dW = dy.T @ x``
  through oneDNN as ``A @ B.T`` with ``A = dy.T`` copied contiguous by the extension's 16 x 16-tile
  ``transpose_2d`` and ``B = x.T`` a strided view (oneDNN is fast on a strided *weight* operand, slow on a strided
  *input*): faster than MKL's transposed-left ``mm``, copy included (:func:`matmul_tn`); ``db`` a row sum.  The
  lm_head's ``[V, n]`` weight gradient in ``linear_logprobs`` stays on ``torch.mm``: its ``dlogits`` block is cold
  by the backward, and copying it costs what the faster product saves.
* The autograd node is C++ (``saferlhf::onednn_linear``, ``csrc/linear_ops.cpp``): a Python
  ``torch.autograd.Function`` around the same products adds interpreter overhead to every projection and
  step.  Without the extension ``F.linear`` runs.

Anything else -- other dtypes, CUDA, autocast, tensor subclasses (FSDP's DTensor), a torch without oneDNN,
``$SAFERLHF_ONEDNN_LINEAR=0``, or code traced by torch.compile -- takes ``F.linear``, the reference.  Both sum in
fp32 in their own orders, so results agree to fp32 rounding (``tests/test_dense.py``).
"""
from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from ..settings import settings

BACKENDS = ("onednn", "torch")
ENV_VAR = "SAFERLHF_ONEDNN_LINEAR"  # settings().onednn_linear


@torch.compiler.assume_constant_result
def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear op and its weight packing (CPU builds with MKL-DNN); a constant under
    torch.compile."""
    return _onednn_available()


@functools.lru_cache(maxsize=None)
def _onednn_available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    except (AttributeError, RuntimeError):
        return False


def _plain(t: Tensor | None) -> bool:
    return t is None or type(t) in (Tensor, torch.nn.Parameter)


def eligible(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether the oneDNN path takes these tensors (see the module docstring for what falls back).  Never under
    torch.compile: inductor lowers ``mkldnn._linear_pointwise`` only for constant (frozen) weights, and picks its
    own GEMM for ``F.linear`` / ``mm``."""
    return (not torch.compiler.is_compiling()
            and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.device.type == "cpu" and weight.dim() == 2
            and (bias is None or bias.dtype == torch.float32)
            and _plain(x) and _plain(weight) and _plain(bias)
            and not torch.is_autocast_enabled("cpu")
            and settings().onednn_linear and onednn_available())


def linear_pointwise(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """oneDNN's ``x @ weight.T + bias`` on a plain, strided or prepacked (blocked) weight; no autograd."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# id(frozen weight) -> (weak reference, version, data_ptr, blocked copy); an entry goes when its weight is freed.
_PACKED: dict[int, tuple] = {}


def packed_weight(weight: Tensor) -> Tensor:
    """oneDNN's blocked copy of a frozen ``weight`` [N, K], packed on first use and reused while the weight is
    unchanged (same storage, same version counter)."""
    key = id(weight)
    hit = _PACKED.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == weight._version and hit[2] == weight.data_ptr():
        return hit[3]
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
    if hit is None or hit[0]() is not weight:
        weakref.finalize(weight, _PACKED.pop, key, None)
    _PACKED[key] = (weakref.ref(weight), weight._version, weight.data_ptr(), packed)
    return packed


def _forward_weight(weight: Tensor) -> Tensor:
    """What the oneDNN forward multiplies by: the blocked copy of a frozen weight, a trainable one as it is."""
    return weight if weight.requires_grad else packed_weight(weight)


def matmul_nt(x: Tensor, weight: Tensor) -> Tensor:
    """``x [M, K] @ weight.T`` -> ``[M, N]`` with no autograd (the lm_head chunks of ``linear_logprobs``):
    oneDNN when eligible (packed when the weight is frozen), else ``torch.mm``."""
    if eligible(x, weight):
        return linear_pointwise(x, _forward_weight(weight), None)
    return x @ weight.t()


def matmul_nn(dy: Tensor, weight: Tensor) -> Tensor:
    """``dy [M, N] @ weight [N, K]`` -> ``[M, K]`` with no autograd (input gradients): oneDNN on the strided view
    ``weight.T`` when eligible, else ``torch.mm``."""
    if eligible(dy, weight):
        return linear_pointwise(dy, weight.t(), None)
    return dy @ weight


def matmul_tn(a: Tensor, b: Tensor) -> Tensor:
    """``a [M, N].T @ b [M, K]`` -> ``[N, K]`` with no autograd (weight gradients ``dy.T @ x``): when eligible,
    oneDNN's ``A @ B.T`` on ``A = a.T`` made contiguous by the extension's ``transpose_2d`` and ``B = b.T`` as a
    strided view -- faster than MKL's transposed-left ``torch.mm`` at the decoder's shapes, copy included --
    else ``torch.mm(a.t(), b)``."""
    if eligible(a, b) and _backend.has_op("transpose_2d"):
        return linear_pointwise(torch.ops.saferlhf.transpose_2d(a), b.t(), None)
    return torch.mm(a.t(), b)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """``x @ weight.T + bias`` (``F.linear``'s contract).  ``backend``: ``"onednn"``, ``"torch"`` (``F.linear``) or
    None (oneDNN where :func:`eligible`, else torch)."""
    if backend not in (None, *BACKENDS):
        raise ValueError(f"unknown linear backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch" or x.numel() == 0 or not eligible(x, weight, bias):
        if backend == "onednn":
            raise RuntimeError("linear backend 'onednn' needs fp32 CPU tensors (no autocast, no tensor subclass) and "
                               f"a torch with oneDNN (available: {onednn_available()})")
        return F.linear(x, weight, bias)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x has {x.shape[-1]} features, weight is {tuple(weight.shape)}")
    if not _backend.has_op("onednn_linear"):  # no extension: the reference, unless oneDNN was asked for by name
        if backend == "onednn":
            raise RuntimeError(f"linear backend 'onednn' needs the compiled extension: {_backend.extension()[1]}")
        return F.linear(x, weight, bias)
    # the autograd node in C++ (csrc/linear_ops.cpp)
    return torch.ops.saferlhf.onednn_linear(x, weight, bias, _forward_weight(weight))
