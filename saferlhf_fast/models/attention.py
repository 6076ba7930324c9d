"""Attention backends and the static KV cache.

Every backend computes the same thing: softmax(q k^T * d^-1/2 + mask) v with grouped-query attention (``nkv`` key /
value heads shared by ``nh / nkv`` query heads each).  Layout everywhere: q ``[B, nh, Lq, d]``, k / v
``[B, nkv, Lk, d]``, output ``[B, nh, Lq, d]``.

Backends (``attn_backend=``; default on CUDA: ``flash`` when the flash-attn package imports, else ``xformers`` when
xformers does, else ``sdpa``; on CPU ``native`` when the extension is built, else ``sdpa``; names, needs and
defaults are the registry entry ``_backend.FAMILIES["attention"]``, :func:`resolve_backend` asks it):

* ``sdpa``      -- ``torch.nn.functional.scaled_dot_product_attention`` (torch's fused flash / memory-efficient
                   kernels on CPU and GPU); ``is_causal`` when the batch has no padding, a boolean mask otherwise.
* ``flash``     -- ``flash_attn_varlen_func`` on packed, padding-free sequences (``cu_seqlens``); decode steps and
                   padded prefill use ``sdpa``.
* ``flex``      -- torch's FlexAttention with a block mask (documents / causal / window without an N x N tensor);
                   compiled on CUDA (``attention_ext.py``).
* ``xformers``  -- ``memory_efficient_attention`` on packed sequences (block-diagonal causal bias), GPU only
                   (``attention_ext.py``).
* ``native``    -- the extension's C++ CPU kernel (``csrc/attention_ops.cpp``, forward and backward): causal,
                   packed documents (``cu_seqlens``) and sliding windows, fp32 or bf16 (bf16 autocast: fp32 scores,
                   softmax, lse and accumulation, bf16 out / gradients), no N x N mask, no k / v expansion.
                   The CPU default (sequences up to ``NATIVE_MAX_SEQLEN``); anything else it cannot take
                   (padded masks, decode steps, fp16, longer sequences) goes to ``sdpa``.  In bf16, SDPA's
                   forward alone is faster (AMX), the native forward + backward is faster; one kernel serves both so
                   that no-grad and training forwards of a model agree bit for bit (PPO's first ratio is 1).
* ``reference`` -- explicit matmul / softmax / matmul in fp32, for tests.

Masks.  ``Mask`` carries what a layer needs, built once per forward: a boolean ``[B or 1, 1, Lq, Lk]`` "may attend"
tensor (or ``None`` with ``is_causal``), and for packed sequences ``cu_seqlens`` / ``max_seqlen``.  Rows that are
padding attend to themselves only (the diagonal is always allowed), so a fully padded query row never produces
NaN; its output is garbage that nobody reads.  A cached forward's masks (``cached_mask``, ``static_cached_mask``)
also say where its keys / values go in the cache (``cache_start``): the mask is the only thing the layers receive
about the cache, which each attention module holds itself (``LayerKVCache``).

KV cache.  ``StaticKVCache``: one preallocated ``[layers, B, nkv, max_len, d]`` pair for a ``generate`` call;
``LlamaForCausalLM.setup_cache`` allocates it and gives each attention module its layer's ``LayerKVCache`` views,
``release_cache`` takes them back.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend

# The names of attn_backend= / --attn_backend: the registry entry's (saferlhf_fast/_backend.py FAMILIES).
BACKENDS = tuple(_backend.FAMILIES["attention"].impls)

# Longest sequence (document) the native CPU kernel takes.  It keeps a unit's whole keys / values and [8, L] score
# rows in cache, which beats SDPA's fwd + bwd at training lengths up to this bound (docs/performance.md); longer
# sequences are unmeasured and go to SDPA.  `saferlhf-fast bench ops --kernels attention` measures it.
NATIVE_MAX_SEQLEN = 512
# q / k / v dtypes the native kernel takes (one dtype for all three); bf16 computes in fp32 and rounds its outputs.
NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def native_available() -> bool:
    """Whether the compiled extension has the CPU attention kernel (``csrc/attention_ops.cpp``)."""
    return _backend.has_op("attention")


def resolve_backend(name: str | None, device: torch.device) -> str:
    """The attention backend to use: ``name`` if given (an error if it cannot run here), else the device's default
    (module docstring); the choice is ``_backend.FAMILIES["attention"]``'s."""
    return _backend.choose("attention", name, device)


@dataclass
class Mask:
    """What the attention of one forward needs (shared by all layers)."""

    allowed: Tensor | None = None  # bool [B|1, 1, Lq, Lk]: True = may attend; None: plain causal (is_causal)
    additive: Tensor | None = None  # fp32 [B, 1, 1, Lk] 0 / -inf: the one-query decode step (grouped matmul path)
    is_causal: bool = False  # no mask tensor, causal with aligned q/k (training / prefill without padding)
    cu_seqlens: Tensor | None = None  # int32 [n_docs + 1], packed sequences (flash backend)
    max_seqlen: int = 0
    window: int | None = None  # sliding window of the causal/packed paths (flash)
    # a cached forward (prefill / decode step): the first cache slot this forward's keys / values are written to;
    # an int64 tensor for the static-shape step (CUDA graphs); None: no cache (training, scoring)
    cache_start: int | Tensor | None = None


# --------------------------------------------------------------------------------------------- mask builders
def padded_mask(attention_mask: Tensor | None, length: int, device, window: int | None = None) -> Mask:
    """Causal (+ key padding, + sliding window) mask for a ``[B, L]`` batch attending to itself."""
    needs_window = window is not None and length > window
    if not needs_window and (attention_mask is None or bool(attention_mask.all())):
        return Mask(is_causal=True, window=window)
    i = torch.arange(length, device=device)
    allowed = i[None, :] <= i[:, None]  # [Lq, Lk]
    if needs_window:
        allowed = allowed & (i[:, None] - i[None, :] < window)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=device)
    return Mask(allowed=allowed, window=window)


def cached_mask(key_valid: Tensor, start: int, q_len: int, window: int | None = None) -> Mask:
    """Mask for ``q_len`` new tokens written at cache slots ``[start, start + q_len)`` attending to cache slots
    ``[0, start + q_len)``; ``key_valid`` [B, S] marks slots holding real tokens."""
    total = start + q_len
    device = key_valid.device
    kv = key_valid[:, :total].bool()[:, None, None, :]  # [B, 1, 1, Lk]
    if q_len == 1:
        if window is not None and total > window:
            kv = kv.clone()
            kv[..., : total - window] = False
        additive = torch.zeros(kv.shape, dtype=torch.float32, device=device).masked_fill_(~kv, float("-inf"))
        return Mask(allowed=kv, additive=additive, cache_start=start)
    qi = torch.arange(start, total, device=device)[:, None]
    ki = torch.arange(total, device=device)[None, :]
    allowed = ki <= qi
    if window is not None:
        allowed = allowed & (qi - ki < window)
    allowed = (allowed[None, None] & kv) | (ki == qi)[None, None]
    return Mask(allowed=allowed, cache_start=start)


def static_cached_mask(key_valid: Tensor, slot: Tensor) -> Mask:
    """Mask of the static-shape decode step (CUDA graphs): one token per row written at cache slot ``slot`` (an
    int64 tensor ``[1]``, so one captured graph serves every step) attending to every cache slot under
    ``key_valid`` [B, S] (no sliding window)."""
    kv = key_valid[:, None, None, :]
    additive = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device).masked_fill_(~kv, float("-inf"))
    return Mask(allowed=kv, additive=additive, cache_start=slot)


def packed_mask(cu_seqlens: Tensor, total: int, window: int | None = None, dense: bool = True) -> Mask:
    """Block-diagonal causal (document) mask for packed sequences ``[1, total]`` with boundaries ``cu_seqlens``.
    ``dense=False``: boundaries only (flash varlen, or SDPA per document when there is no window)."""
    device = cu_seqlens.device
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if not dense:
        max_seqlen = int(lengths.max()) if lengths.numel() else 0
        return Mask(cu_seqlens=cu_seqlens.to(torch.int32), max_seqlen=max_seqlen, window=window)
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths.long())
    i = torch.arange(total, device=device)
    allowed = (doc[:, None] == doc[None, :]) & (i[None, :] <= i[:, None])
    if window is not None:
        allowed = allowed & (i[:, None] - i[None, :] < window)
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    return Mask(allowed=allowed[None, None], cu_seqlens=cu_seqlens.to(torch.int32), max_seqlen=max_seqlen,
                window=window)


# --------------------------------------------------------------------------------------------- backends
def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask.is_causal:
        lq, lk = q.shape[-2], k.shape[-2]
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    else:
        allowed = mask.allowed
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)


def softcap_attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, cap: float) -> Tensor:
    """Attention with soft-capped scores (Gemma 2): ``softmax(cap * tanh(q k^T * scale / cap) + mask) v``, as
    transformers' eager path computes it (matmuls in the inputs' dtype, softmax in fp32).  Every backend but flex
    runs this for such layers (:func:`attend_softcapped`); it takes every mask form: causal, dense (padded or packed:
    the model builds dense masks for packed batches of soft-capped models), and the decode step's additive row."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / cap) * cap
    if mask.additive is not None and q.shape[-2] == 1:
        scores = scores + mask.additive
    else:
        allowed = mask.allowed
        if allowed is None:
            if not mask.is_causal:
                raise ValueError("softcap_attention needs a causal or dense mask (build packed masks dense)")
            lq, lk = q.shape[-2], k.shape[-2]
            allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
    """One query per row (the decode step): grouped matmuls, no k / v expansion, no kernel set-up.  On CPU this is
    several times faster than SDPA's flash kernel at these sizes."""
    b, nh, _, d = q.shape
    nkv = k.shape[1]
    qg = q.view(b, nkv, nh // nkv, d)  # the query heads sharing one kv head
    scores = torch.matmul(qg, k.transpose(-1, -2)).float().mul_(scale).add_(mask.additive)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).view(b, nh, 1, d)


def varlen_sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
    """Packed sequences ``[1, h, N, d]`` without an N x N mask: one causal SDPA call per document (cost
    ``sum L_i^2`` instead of ``N^2``), with the sliding window of ``mask.window`` in documents longer than it (the
    native kernel's fallback gets such masks)."""
    lengths = (mask.cu_seqlens[1:] - mask.cu_seqlens[:-1]).tolist()
    outs = [
        sdpa_attention(qi, ki, vi, padded_mask(None, qi.shape[2], q.device, mask.window), scale)
        for qi, ki, vi in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))
        if qi.shape[2] > 0
    ]
    return torch.cat(outs, dim=2)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
    if mask.additive is not None and q.shape[-2] == 1:
        return decode_attention(q, k, v, mask, scale)
    if mask.cu_seqlens is not None and mask.allowed is None:
        return varlen_sdpa_attention(q, k, v, mask, scale)
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        # enable_gqa keeps one copy of k / v on the fused kernels; the math kernel would expand anyway.
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.allowed, is_causal=mask.is_causal, scale=scale, enable_gqa=True
        )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.allowed, is_causal=mask.is_causal, scale=scale)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
    """flash-attn on packed sequences (q, k, v ``[1, h, N, d]`` with ``mask.cu_seqlens``) or causal batches."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    window = (mask.window - 1, 0) if mask.window is not None else (-1, -1)
    if mask.cu_seqlens is not None:
        out = flash_attn_varlen_func(
            q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), mask.cu_seqlens, mask.cu_seqlens,
            mask.max_seqlen, mask.max_seqlen, softmax_scale=scale, causal=True, window_size=window,
        )
        return out.transpose(0, 1)[None]
    if mask.is_causal and q.shape[-2] == k.shape[-2]:
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                              causal=True, window_size=window)
        return out.transpose(1, 2)
    return sdpa_attention(q, k, v, mask, scale)  # padded batches, decode steps


def native_attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
    """The C++ CPU kernel for causal / packed-document attention of q ``[B, nh, L, d]`` over k / v of the same
    length and dtype (fp32 or bf16; bf16 returns bf16); returns ``[B, nh, L, d]`` as a transposed view of a
    ``[B, L, nh, d]`` tensor, so the caller's ``transpose(1, 2).reshape`` before ``o_proj`` is free.  Other cases go
    to :func:`sdpa_attention`."""
    length = q.shape[-2]
    packed = mask.cu_seqlens is not None
    aligned = mask.is_causal or (packed and q.shape[0] == 1)
    longest = mask.max_seqlen if packed else length
    if (not aligned or q.dtype not in NATIVE_DTYPES or not q.dtype == k.dtype == v.dtype or q.device.type != "cpu"
            or k.shape[-2] != length or longest > NATIVE_MAX_SEQLEN):
        return sdpa_attention(q, k, v, mask, scale)
    window = mask.window if mask.window is not None else 0
    out = torch.ops.saferlhf.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       mask.cu_seqlens if packed else None, float(scale), int(window))
    return out.transpose(1, 2)


_FUNCS = {"sdpa": sdpa_attention, "reference": reference_attention, "flash": flash_attention,
          "native": native_attention}


def attend(backend: str, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float) -> Tensor:
    fn = _FUNCS.get(backend)
    if fn is None:  # the optional backends live in attention_ext (imported on first use)
        from . import attention_ext as ext

        fn = _FUNCS[backend] = {"flex": ext.flex_attention, "xformers": ext.xformers_attention}[backend]
    return fn(q, k, v, mask, scale)


def attend_softcapped(backend: str, q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float, cap: float) -> Tensor:
    """Attention with soft-capped scores: flex's ``score_mod`` on the ``flex`` backend, else the eager
    :func:`softcap_attention` (no other kernel here soft-caps)."""
    if backend == "flex":
        from . import attention_ext as ext

        return ext.flex_attention(q, k, v, mask, scale, softcap=cap)
    return softcap_attention(q, k, v, mask, scale, cap)


# --------------------------------------------------------------------------------------------- KV cache
class LayerKVCache:
    """One layer's keys and values ``[B, nkv, max_len, d]``: views ``k[i]``, ``v[i]`` of a :class:`StaticKVCache`,
    held by that layer's attention module while the model has a cache set up."""

    __slots__ = ("k", "v")

    def __init__(self, k: Tensor, v: Tensor):
        self.k, self.v = k, v

    def update(self, k: Tensor, v: Tensor, start: int | Tensor) -> tuple[Tensor, Tensor]:
        """Write this forward's keys / values ``[B, nkv, n, d]`` at slots ``[start, start + n)`` in place and return
        what the queries attend to: the filled prefix ``[0, start + n)``; with a tensor ``start`` (the static-shape
        step of CUDA graphs: slots written by index) the whole cache, masked by ``valid``."""
        if isinstance(start, Tensor):
            self.k.index_copy_(2, start, k)
            self.v.index_copy_(2, start, v)
            return self.k, self.v
        n = k.shape[2]
        self.k[:, :, start:start + n] = k
        self.v[:, :, start:start + n] = v
        return self.k[:, :, :start + n], self.v[:, :, :start + n]


class StaticKVCache:
    """Preallocated keys and values ``[layers, B, nkv, max_len, d]`` plus ``valid`` ``[B, max_len]`` (slot holds a
    real token).  Slots are written in place; nothing is reallocated while decoding.  One allocation for all layers,
    so the compiled CPU decode step takes ``k`` / ``v`` whole; ``layers[i]`` is layer ``i``'s view of it, which
    ``LlamaForCausalLM.setup_cache`` hands to that layer's attention module."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.layers = [LayerKVCache(k, v) for k, v in zip(self.k.unbind(0), self.v.unbind(0))]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
