"""The optional attention backends (models/attention_ext.py): FlexAttention on CPU (eager; torch has no CPU backward
for it, so gradients are checked in the GPU test) against the reference path; the xformers layout plumbing against a
stand-in module (the real package is GPU-only and not installed here; the GPU test runs it when it is)."""
import sys
import types
import warnings

import pytest
import torch

from saferlhf_fast.models import attention as attn
from saferlhf_fast.models import attention_ext as ext
from saferlhf_fast.models.llama import LlamaForCausalLM, ModelConfig

warnings.filterwarnings("ignore", message=".*flex_attention.*")


def _model(backend, **over):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, **over)
    return LlamaForCausalLM(cfg, attn_backend=backend)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 61, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, :9] = 0  # a one-token row
    return ids, mask


@pytest.mark.skipif(not ext.flex_available(), reason="torch lacks flex_attention")
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("window", [None, 3])
def test_flex_matches_reference(packed, window):
    ids, mask = _batch()
    with torch.no_grad():
        ours = _model("flex", sliding_window=window)(ids, mask, packed=packed).logits
        ref = _model("reference", sliding_window=window)(ids, mask, packed=packed).logits
    m = mask[..., None].bool()
    torch.testing.assert_close(ours * m, ref * m, atol=1e-5, rtol=1e-5)


def test_flex_block_mask_built_once_per_forward(monkeypatch):
    calls = []
    real = ext._mask_mod
    monkeypatch.setattr(ext, "_mask_mod", lambda *a: calls.append(1) or real(*a))
    ids, mask = _batch()
    with torch.no_grad():
        _model("flex")(ids, mask)
    assert len(calls) == 1  # two layers, one block mask


# --------------------------------------------------------------------------------------------- xformers
def _fake_xformers(monkeypatch):
    """A stand-in exposing xformers' API on top of reference attention, recording what it was given."""
    seen = {}

    class LowerTriangularMask:
        pass

    class BlockDiagonalCausalMask:
        window = None

        @classmethod
        def from_seqlens(cls, seqlens, window_size=None):
            obj = cls()
            obj.seqlens, obj.window = list(seqlens), window_size
            return obj

    class BlockDiagonalCausalLocalAttentionMask(BlockDiagonalCausalMask):
        pass

    def memory_efficient_attention(q, k, v, attn_bias=None, scale=None):
        # q [B, M, G, H, K]; k, v [B, M, G, H, K] (stride-0 over H); -> [B, M, G, H, K]
        seen.setdefault("biases", []).append(type(attn_bias).__name__)
        seen["k_stride_h"] = k.stride(3)
        b, m, g, h, d = q.shape
        qh = q.reshape(b, m, g * h, d).transpose(1, 2)
        kh = k.reshape(b, m, g * h, d).transpose(1, 2)
        vh = v.reshape(b, m, g * h, d).transpose(1, 2)
        if isinstance(attn_bias, BlockDiagonalCausalMask):
            cu = torch.tensor([0] + attn_bias.seqlens).cumsum(0)
            mask = attn.packed_mask(cu, m, attn_bias.window, dense=True)
        else:
            mask = attn.Mask(is_causal=True)
        out = attn.reference_attention(qh, kh, vh, mask, scale)
        return out.transpose(1, 2).reshape(b, m, g, h, d)

    fmha = types.ModuleType("xformers.ops.fmha")
    bias_mod = types.ModuleType("xformers.ops.fmha.attn_bias")
    bias_mod.LowerTriangularMask = LowerTriangularMask
    bias_mod.BlockDiagonalCausalMask = BlockDiagonalCausalMask
    bias_mod.BlockDiagonalCausalLocalAttentionMask = BlockDiagonalCausalLocalAttentionMask
    fmha.attn_bias = bias_mod
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    ops.fmha = fmha
    root = types.ModuleType("xformers")
    root.ops = ops
    for name, mod in {"xformers": root, "xformers.ops": ops, "xformers.ops.fmha": fmha,
                      "xformers.ops.fmha.attn_bias": bias_mod}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(ext, "xformers_available", lambda: True)
    return seen


@pytest.mark.parametrize("window", [None, 3])
def test_xformers_layout_against_reference(monkeypatch, window):
    seen = _fake_xformers(monkeypatch)
    ids, mask = _batch()
    with torch.no_grad():
        ours = _model("xformers", sliding_window=window)(ids, mask).logits  # packed by default
        causal = _model("xformers", sliding_window=None)(ids[:1]).logits
        ref = _model("reference", sliding_window=window)(ids, mask).logits
        ref_causal = _model("reference", sliding_window=None)(ids[:1]).logits
    m = mask[..., None].bool()
    torch.testing.assert_close(ours * m, ref * m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(causal, ref_causal, atol=1e-5, rtol=1e-5)
    want = "BlockDiagonalCausalLocalAttentionMask" if window else "BlockDiagonalCausalMask"
    assert want in seen["biases"] and "LowerTriangularMask" in seen["biases"]
    assert seen["k_stride_h"] == 0  # k / v shared across the query group without a copy


def test_backend_names_and_missing_packages(monkeypatch):
    assert set(attn.BACKENDS) >= {"sdpa", "native", "flash", "flex", "xformers", "reference"}
    monkeypatch.setattr(ext, "xformers_available", lambda: False)
    with pytest.raises(RuntimeError, match="xformers package"):
        attn.resolve_backend("xformers", torch.device("cpu"))
    assert attn.resolve_backend(None, torch.device("cpu")) == ("native" if attn.native_available() else "sdpa")
    monkeypatch.setattr(attn, "native_available", lambda: False)
    assert attn.resolve_backend(None, torch.device("cpu")) == "sdpa"
    with pytest.raises(RuntimeError, match="compiled extension"):
        attn.resolve_backend("native", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["flex", "xformers"])
def test_gpu_backend_matches_reference_with_grads(backend):
    if backend == "xformers" and not ext.xformers_available():
        pytest.skip("xformers not installed")
    ids, mask = (x.cuda() for x in _batch())
    outs = {}
    for name in (backend, "reference"):
        model = _model(name).cuda()
        logits = model(ids, mask).logits
        (logits * mask[..., None]).square().sum().backward()
        outs[name] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    m = mask[..., None].bool()
    torch.testing.assert_close(outs[backend][0] * m, outs["reference"][0] * m, atol=1e-4, rtol=1e-4)
    for n, g in outs["reference"][1].items():
        torch.testing.assert_close(outs[backend][1][n], g, atol=1e-3, rtol=1e-3, msg=n)
