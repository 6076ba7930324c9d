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

bf16 mixed precision (``--bf16``: CPU ``torch.autocast`` in bf16).  Under autocast :func:`linear` computes in bf16
on oneDNN (AVX512-BF16 / AMX: several times the fp32 matmul rate): ``x`` and ``W`` rounded to bf16, products
accumulated in fp32, ``y`` rounded to bf16 -- what autocast's own ``F.linear`` computes, without its per-call cast of
frozen weights.  The bf16 weight (:func:`compute_weight`): a bf16 parameter as it is; a trainable fp32 master cast
per call inside the autograd graph (its gradient reaches the fp32 master through the cast); a frozen fp32 weight
cast once and cached (then packed like any frozen weight) until it changes.  Outside autocast, bf16 ``x`` and ``W``
take the same oneDNN products.

Anything else -- other dtypes, CUDA, fp16 autocast, tensor subclasses (FSDP's DTensor), a torch without oneDNN or
without bf16 support in it, ``$SAFERLHF_ONEDNN_LINEAR=0``, or code traced by torch.compile -- takes ``F.linear``, the
reference.  Both sum in fp32 in their own orders, so fp32 results agree to fp32 rounding (``tests/test_dense.py``).
"""
from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend

# ops.linear's backend= names and the setting that switches oneDNN off: _backend.FAMILIES["linear"] (oneDNN for
# ops.linear also needs the extension's autograd node) and FAMILIES["matmul"] (the products below need oneDNN only).
BACKENDS = tuple(_backend.FAMILIES["linear"].impls)
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


@functools.lru_cache(maxsize=None)
def onednn_bf16_available() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (AVX512-BF16 / AMX; elsewhere it would emulate them)."""
    try:
        return onednn_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _plain(t: Tensor | None) -> bool:
    return t is None or type(t) in (Tensor, torch.nn.Parameter)


def autocast_bf16(x: Tensor) -> bool:
    """Whether ``x`` is a CPU tensor under CPU autocast in bf16 (``--bf16``): the ops then compute in bf16."""
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def eligible(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether the oneDNN path takes these tensors as they are: plain CPU tensors of one dtype, fp32 (not under
    autocast, which wants them cast) or bf16 (see the module docstring for what falls back).  Never under
    torch.compile: inductor lowers ``mkldnn._linear_pointwise`` only for constant (frozen) weights, and picks its
    own GEMM for ``F.linear`` / ``mm``."""
    dtype = x.dtype
    if dtype == torch.float32:
        if torch.is_autocast_enabled("cpu"):
            return False
    elif dtype != torch.bfloat16 or not onednn_bf16_available():
        return False
    return (not torch.compiler.is_compiling()
            and x.device.type == "cpu" and weight.dtype == dtype
            and weight.device.type == "cpu" and weight.dim() == 2
            and (bias is None or bias.dtype == dtype)
            and _plain(x) and _plain(weight) and _plain(bias)
            and _backend.chosen("matmul", "cpu") == "onednn")


def linear_pointwise(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """oneDNN's ``x @ weight.T + bias`` on a plain, strided or prepacked (blocked) weight; no autograd."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _DerivedCache:
    """Tensors derived from a frozen weight (its oneDNN blocked copy, its bf16 copy), made on first use and reused
    while the weight is unchanged (same storage, same version counter); an entry goes when its weight is freed."""

    def __init__(self, make):
        self.make = make
        self.entries: dict[int, tuple] = {}  # id(weight) -> (weak reference, version, data_ptr, derived)

    def __call__(self, weight: Tensor) -> Tensor:
        key = id(weight)
        hit = self.entries.get(key)
        if hit is not None and hit[0]() is weight and hit[1] == weight._version and hit[2] == weight.data_ptr():
            return hit[3]
        derived = self.make(weight.detach())
        if hit is None or hit[0]() is not weight:
            weakref.finalize(weight, self.entries.pop, key, None)
        self.entries[key] = (weakref.ref(weight), weight._version, weight.data_ptr(), derived)
        return derived


packed_weight = _DerivedCache(lambda w: torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None))
packed_weight.__doc__ = """oneDNN's blocked copy of a frozen ``weight`` [N, K], packed on first use and reused while the
weight is unchanged."""
_bf16_copy = _DerivedCache(lambda w: w.to(torch.bfloat16))


def compute_weight(weight: Tensor) -> Tensor:
    """The bf16 weight a bf16 product multiplies by: a bf16 weight as it is; a trainable fp32 weight (gradient
    enabled) cast inside the autograd graph, so its gradient reaches the fp32 master; otherwise (frozen, or no
    gradient wanted) a bf16 copy, cached while the weight is unchanged for a frozen weight."""
    if weight.dtype == torch.bfloat16:
        return weight
    if weight.requires_grad:
        return weight.to(torch.bfloat16)  # fresh every call: the master changes after every optimizer step
    return _bf16_copy(weight)


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


def _autocast_operands(x: Tensor, weight: Tensor, bias: Tensor | None):
    """The bf16 operands of :func:`linear` under CPU bf16 autocast, or when the weight is held in bf16 and ``x`` is
    fp32 on any device (a frozen weight held in bf16, see ``models.llama.hold_in_bf16``: the product autocast would
    take, with or without autocast); else the inputs as they are."""
    mixed = weight.dtype == torch.bfloat16 and x.dtype == torch.float32
    if mixed or (torch.float32 in (x.dtype, weight.dtype) and autocast_bf16(x) and onednn_bf16_available()):
        x = x.to(torch.bfloat16)
        bias = None if bias is None else bias.to(torch.bfloat16)
        weight = compute_weight(weight) if _plain(weight) else weight.to(torch.bfloat16)
    return x, weight, bias


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """``x @ weight.T + bias`` (``F.linear``'s contract; under CPU bf16 autocast the bf16 product of the module
    docstring).  ``backend``: ``"onednn"``, ``"torch"`` (``F.linear``) or None (oneDNN where :func:`eligible`, else
    torch)."""
    name = _backend.chosen("linear", x.device.type) if backend is None else _backend.choose("linear", backend, x.device)
    trainable = weight.requires_grad  # a per-call bf16 cast of a trainable weight is never packed
    if backend != "torch":
        x, weight, bias = _autocast_operands(x, weight, bias)
    if name == "torch" or x.numel() == 0 or not eligible(x, weight, bias):
        if backend is not None and name == "onednn":
            raise RuntimeError("linear backend 'onednn' needs fp32 or bf16 CPU tensors (no tensor subclass) and a "
                               f"torch with oneDNN (available: {onednn_available()}; bf16: {onednn_bf16_available()})")
        return F.linear(x, weight, bias)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x has {x.shape[-1]} features, weight is {tuple(weight.shape)}")
    # the autograd node in C++ (csrc/linear_ops.cpp)
    return torch.ops.saferlhf.onednn_linear(x, weight, bias, weight if trainable else packed_weight(weight))
