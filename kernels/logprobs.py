"""Triton log-prob kernels: ``log_softmax(logits / T)[label]`` (+ entropy) and its gradient (docs/kernels.md).

Design
------
* One program per row (grid ``(N,)``); the program walks the vocabulary in ``BLOCK_V`` chunks.
* Forward keeps three fp32 scalars per row: the running max ``m``, ``s = sum exp(z - m)`` and
  ``t = sum exp(z - m) * (z - m)``.  Each chunk costs one exp per element plus three block reductions
  (max, sum, sum); when ``m`` grows the scalars are rescaled: ``t' = a*(t + (m - m')*s)``, ``s' = a*s`` with
  ``a = exp(m - m')``.  Then ``lse = m + log s`` and ``entropy = log s - t / s`` (measured from the max, so
  there is no cancellation of ``m`` against ``lse``).  Nothing of size ``[N, V]`` is written.
* Backward reads each chunk once, writes its gradient once (so ``grad_logits`` may alias ``logits``).
  Ignored rows skip the reads and store zeros.
* All math in fp32 whatever the logits dtype; row strides are explicit (``stride(1) == 1``); row offsets are
  int64 so ``N * V`` may exceed 2**31.
* ``BLOCK_V = min(next_pow2(V), 4096)`` on a GPU (``num_warps`` 8 at 4096, about 16 elements per thread),
  ``min(next_pow2(V), 32)`` under the interpreter (fast, and small vocabularies already cross chunk edges).
"""
from __future__ import annotations

import contextlib

try:
    import torch
except ImportError:  # the ahead-of-time compile check (saferlhf_fast/benchmarks/triton_aot.py) needs only triton
    torch = None
import triton
import triton.language as tl

GPU_MAX_BLOCK_V = 4096
INTERP_MAX_BLOCK_V = 32


def _block_v(v: int, gpu: bool) -> int:
    cap = GPU_MAX_BLOCK_V if gpu else INTERP_MAX_BLOCK_V
    return max(16, min(triton.next_power_of_2(max(int(v), 1)), cap))


def _num_warps(block: int) -> int:
    # about 16 elements per thread, 1..8 warps
    return max(1, min(8, block // 512))


def launch_config(v: int, gpu: bool = True) -> dict:
    """The constexpr / launch options of both kernels for a vocabulary of ``v``: what the launchers pass, and what
    saferlhf_fast/benchmarks/triton_aot.py compiles ahead of time (for every ``v``)."""
    block = _block_v(v, gpu)
    return {"BLOCK_V": block, "num_warps": _num_warps(block)}


# Triton names of the logits dtypes the launchers accept (grad_logits has the dtype of logits).
LOGITS_DTYPES = ("fp32", "bf16", "fp16")
_TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# The argument types the launchers pass, "{dtype}" one of LOGITS_DTYPES, and the constexpr flags;
# saferlhf_fast/benchmarks/triton_aot.py compiles every combination at every launch_config and checks that the names
# match the kernels' parameters.
AOT_KERNELS = [
    {
        "kernel": "_logprobs_fwd_kernel",
        "launch_config": launch_config,
        "dtypes": LOGITS_DTYPES,
        "flags": {"WITH_ENTROPY": (False, True)},
        "signature": {
            "logits_ptr": "*{dtype}", "labels_ptr": "*i64", "logp_ptr": "*fp32", "lse_ptr": "*fp32",
            "ent_ptr": "*fp32", "V": "i32", "stride_row": "i32", "inv_temp": "fp32", "ignore_index": "i32",
        },
    },
    {
        "kernel": "_logprobs_bwd_kernel",
        "launch_config": launch_config,
        "dtypes": LOGITS_DTYPES,
        "flags": {"HAS_GRAD_ENTROPY": (False, True)},
        "signature": {
            "grad_logp_ptr": "*fp32", "grad_ent_ptr": "*fp32", "logits_ptr": "*{dtype}", "labels_ptr": "*i64",
            "lse_ptr": "*fp32", "ent_ptr": "*fp32", "grad_ptr": "*{dtype}", "V": "i32", "stride_row": "i32",
            "stride_grad_row": "i32", "inv_temp": "fp32", "ignore_index": "i32",
        },
    },
]


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logp_ptr, lse_ptr, ent_ptr,
    V, stride_row, inv_temp, ignore_index,
    WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    # A finite "minus infinity" keeps exp(m - m_new) and (m - m_new) * s well defined before the first chunk.
    m = -1e30
    s = 0.0
    t = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        valid = offs < V
        x = tl.load(base + offs, mask=valid, other=float("-inf")).to(tl.float32)
        z = x * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        if WITH_ENTROPY:
            # p log p -> 0 where p underflows (also keeps padded / -inf lanes from giving 0 * inf)
            ez = e * tl.where(e > 0.0, z - m_new, 0.0)
            t = alpha * (t + (m - m_new) * s) + tl.sum(ez, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    tl.store(lse_ptr + row, lse)

    label = tl.load(labels_ptr + row)
    keep = label != ignore_index
    safe_label = tl.where(keep, label, 0)
    x_label = tl.load(base + safe_label).to(tl.float32)
    logp = tl.where(keep, x_label * inv_temp - lse, 0.0)
    tl.store(logp_ptr + row, logp)
    if WITH_ENTROPY:
        ent = tl.where(keep, log_s - t / s, 0.0)
        tl.store(ent_ptr + row, ent)


@triton.jit
def _logprobs_bwd_kernel(
    grad_logp_ptr, grad_ent_ptr, logits_ptr, labels_ptr, lse_ptr, ent_ptr, grad_ptr,
    V, stride_row, stride_grad_row, inv_temp, ignore_index,
    HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    gbase = grad_ptr + row * stride_grad_row
    cols = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        zero = tl.zeros([BLOCK_V], dtype=tl.float32).to(grad_ptr.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            tl.store(gbase + offs, zero, mask=offs < V)
    else:
        lse = tl.load(lse_ptr + row)
        c1 = tl.load(grad_logp_ptr + row) * inv_temp
        if HAS_GRAD_ENTROPY:
            c2 = tl.load(grad_ent_ptr + row) * inv_temp
            ent = tl.load(ent_ptr + row)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            valid = offs < V
            x = tl.load(base + offs, mask=valid, other=0.0).to(tl.float32)
            z = x * inv_temp
            logp_v = z - lse
            p = tl.exp(logp_v)
            # d/dz = g_logp * ([v == label] - p) - g_ent * p * (logp_v + entropy);  d/dlogits = d/dz / T
            g = tl.where(offs == label, c1, 0.0) - c1 * p
            if HAS_GRAD_ENTROPY:
                g -= (c2 * p) * tl.where(p > 0.0, logp_v + ent, 0.0)
            tl.store(gbase + offs, g.to(grad_ptr.dtype.element_ty), mask=valid)


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got {tuple(logits.shape)}")
    if logits.dtype not in tuple(getattr(torch, _TORCH_DTYPE_NAMES[d]) for d in LOGITS_DTYPES):
        raise TypeError(f"logits must be fp32 / bf16 / fp16, got {logits.dtype}")
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError("logits must have stride(1) == 1")


def logprobs_forward(logits, labels, temperature, ignore_index, with_entropy):
    """(logp [N], lse [N], entropy [N]) fp32 of ``log_softmax(logits / temperature)`` at ``labels``."""
    _check_logits(logits)
    n, v = logits.shape
    labels = labels.to(torch.int64).contiguous()
    dev = logits.device
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    entropy = (torch.empty if with_entropy else torch.zeros)(n, dtype=torch.float32, device=dev)
    if n == 0:
        return logp, lse, entropy
    if v == 0:
        raise ValueError("logits must have at least one column")
    with _device_ctx(logits):
        _logprobs_fwd_kernel[(n,)](
            logits, labels, logp, lse, entropy,
            v, logits.stride(0), 1.0 / float(temperature), int(ignore_index),
            WITH_ENTROPY=bool(with_entropy), **launch_config(v, dev.type == "cuda"),
        )
    return logp, lse, entropy


def logprobs_backward(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index, grad_logits):
    """Writes ``d(sum g_logp*logp + g_entropy*entropy) / d logits`` into ``grad_logits`` (may be ``logits``)."""
    _check_logits(logits)
    n, v = logits.shape
    if grad_logits.shape != logits.shape or grad_logits.dtype != logits.dtype:
        raise ValueError("grad_logits must have the shape and dtype of logits")
    if v > 1 and grad_logits.stride(1) != 1:
        raise ValueError("grad_logits must have stride(1) == 1")
    if n == 0 or v == 0:
        return None
    labels = labels.to(torch.int64).contiguous()
    grad_logp = grad_logp.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    entropy = entropy.to(torch.float32).contiguous()
    has_ge = grad_entropy is not None
    grad_entropy = grad_entropy.to(torch.float32).contiguous() if has_ge else grad_logp  # dummy pointer
    with _device_ctx(logits):
        _logprobs_bwd_kernel[(n,)](
            grad_logp, grad_entropy, logits, labels, lse, entropy, grad_logits,
            v, logits.stride(0), grad_logits.stride(0), 1.0 / float(temperature), int(ignore_index),
            HAS_GRAD_ENTROPY=has_ge, **launch_config(v, logits.device.type == "cuda"),
        )
    return None
