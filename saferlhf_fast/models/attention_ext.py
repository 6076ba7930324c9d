"""Optional attention backends: torch's FlexAttention (``flex``) and xformers' memory-efficient attention
(``xformers``).  Same contract as ``attention.py``: q ``[B, nh, Lq, d]``, k / v ``[B, nkv, Lk, d]`` (grouped-query:
``nh / nkv`` query heads per key / value head), output ``[B, nh, Lq, d]`` = softmax(q k^T * scale + mask) v.

* ``flex`` -- ``torch.nn.attention.flex_attention`` with a ``BlockMask`` built once per forward from the ``Mask``
  (causal, causal + sliding window, causal per document for packed sequences given only ``cu_seqlens``, or the
  dense padded mask), so packed training needs no N x N mask tensor and fully masked blocks are skipped.  On CUDA
  the call is ``torch.compile``d (FlexAttention's fused Triton kernel); on CPU it runs eagerly (slow reference
  loop: for tests; CPU training defaults to SDPA).
* ``xformers`` -- ``xformers.ops.memory_efficient_attention`` on packed sequences (``BlockDiagonalCausalMask``,
  with a local window where the layer has one) and causal batches, k / v shared across a query group by a stride-0
  expand (no copy).  GPU only; used when the package is installed.

Decode steps (one query, ``mask.additive``) and padded prefills fall back to the SDPA path in both, as the flash
backend does: they are not where these kernels pay.  ``flex`` also soft-caps attention scores (Gemma 2) with a
``score_mod``; the other backends leave soft-capped layers to ``attention.softcap_attention``.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

from . import attention as attn


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


# ------------------------------------------------------------------------------------------------ flex
@functools.lru_cache(maxsize=None)
def _flex_fn(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    # The eager flex_attention is a vmapped reference; the compiled one is the fused kernel.
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def _mask_mod(mask: attn.Mask, lq: int, lk: int, device):
    """(mask_mod, batch) describing ``mask`` for ``create_block_mask``; batch None = same for every row."""
    window = mask.window
    offset = lk - lq  # queries are the last lq positions of the keys (prefill with a cache prefix)

    def causal(b, h, q, kv):
        q_abs = q + offset
        ok = kv <= q_abs
        if window is not None:
            ok = ok & (q_abs - kv < window)
        return ok

    if mask.allowed is not None:
        allowed = mask.allowed  # bool [B|1, 1, Lq, Lk]; already holds causal / window / padding / documents
        batch = allowed.shape[0] if allowed.shape[0] > 1 else None

        def dense(b, h, q, kv):
            return allowed[b if batch is not None else 0, 0, q, kv]

        return dense, batch
    if mask.cu_seqlens is not None:
        cu = mask.cu_seqlens.to(device=device, dtype=torch.long)
        doc = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=device), cu[1:] - cu[:-1])

        def document(b, h, q, kv):
            return causal(b, h, q, kv) & (doc[q] == doc[kv])

        return document, None
    if mask.is_causal:
        return causal, None
    raise ValueError("flex attention: the mask describes no attention pattern")


def block_mask(mask: attn.Mask, lq: int, lk: int, device) -> object:
    """The ``BlockMask`` of ``mask``, built once and kept on the ``Mask`` (all layers share it)."""
    cached = getattr(mask, "_flex_block_mask", None)
    if cached is not None and cached[0] == (lq, lk):
        return cached[1]
    from torch.nn.attention.flex_attention import create_block_mask

    mod, batch = _mask_mod(mask, lq, lk, device)
    bm = create_block_mask(mod, B=batch, H=None, Q_LEN=lq, KV_LEN=lk, device=device,
                           _compile=torch.device(device).type == "cuda")
    object.__setattr__(mask, "_flex_block_mask", ((lq, lk), bm))
    return bm


def flex_attention(q: Tensor, k: Tensor, v: Tensor, mask: attn.Mask, scale: float,
                   softcap: float | None = None) -> Tensor:
    """``softcap``: scores ``s -> softcap * tanh(s / softcap)`` after scaling (Gemma 2), as a ``score_mod``; the
    decode step then takes :func:`attention.softcap_attention` (SDPA cannot soft-cap)."""
    if mask.additive is not None and q.shape[-2] == 1:  # decode step
        if softcap is not None:
            return attn.softcap_attention(q, k, v, mask, scale, softcap)
        return attn.sdpa_attention(q, k, v, mask, scale)
    bm = block_mask(mask, q.shape[-2], k.shape[-2], q.device)
    fn = _flex_fn(q.device.type)
    kwargs = {} if softcap is None else {"score_mod": _softcap_mod(float(softcap))}
    return fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1], **kwargs)


@functools.lru_cache(maxsize=None)
def _softcap_mod(cap: float):
    """One function object per cap, so the compiled flex kernel is reused across layers and steps."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap

    return score_mod


# ------------------------------------------------------------------------------------------------ xformers
def _bmghk(x: Tensor, n_rep: int) -> Tensor:
    """[B, h, L, d] -> xformers' [B, L, G, n_rep, d] (k / v: stride-0 expand over the query group)."""
    b, h, length, d = x.shape
    x = x.transpose(1, 2)[:, :, :, None, :]  # [B, L, h, 1, d]
    return x.expand(b, length, h, n_rep, d)


def xformers_attention(q: Tensor, k: Tensor, v: Tensor, mask: attn.Mask, scale: float) -> Tensor:
    import xformers.ops as xops
    from xformers.ops.fmha import attn_bias

    b, nh, lq, d = q.shape
    nkv = k.shape[1]
    n_rep = nh // nkv
    if mask.cu_seqlens is not None and mask.allowed is None:
        lengths = (mask.cu_seqlens[1:] - mask.cu_seqlens[:-1]).tolist()
        if mask.window is not None:
            bias = attn_bias.BlockDiagonalCausalLocalAttentionMask.from_seqlens(lengths, window_size=mask.window)
        else:
            bias = attn_bias.BlockDiagonalCausalMask.from_seqlens(lengths)
    elif mask.is_causal and lq == k.shape[-2] and mask.window is None:
        bias = attn_bias.LowerTriangularMask()
    else:
        return attn.sdpa_attention(q, k, v, mask, scale)  # padded batches, decode steps, windowed batches
    qx = q.transpose(1, 2).reshape(b, lq, nkv, n_rep, d)  # query head j*n_rep + r -> group j, member r
    out = xops.memory_efficient_attention(qx, _bmghk(k, n_rep), _bmghk(v, n_rep), attn_bias=bias, scale=scale)
    return out.reshape(b, lq, nh, d).transpose(1, 2)
