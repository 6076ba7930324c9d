"""The extension's CPU attention kernel (csrc/attention_ops.cpp, backend ``native``) against an fp64 reference:
forward, all three gradients, grouped-query heads, head dims that are not a multiple of the SIMD width, sliding
windows, packed documents (including empty ones), strided inputs, and the model-level parity and fallbacks."""
from __future__ import annotations

import pytest
import torch

from saferlhf_fast.models import attention as attn

pytestmark = pytest.mark.skipif(not attn.native_available(), reason="the compiled extension is not built")


def reference(q, k, v, scale, window=0, cu=None):
    """fp64 softmax(q k^T * scale + mask) v on [B, H, L, D] tensors (causal, window, documents)."""
    length = q.shape[2]
    i = torch.arange(length)
    allowed = i[None, :] <= i[:, None]
    if window > 0:
        allowed &= i[:, None] - i[None, :] < window
    if cu is not None:
        doc = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor(cu).diff())
        allowed &= doc[:, None] == doc[None, :]
    rep = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(rep, 1).transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    return s.softmax(-1) @ v.repeat_interleave(rep, 1)


def run_both(b, length, hq, hk, d, window=0, cu=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q64, k64, v64 = (torch.randn(b, h, length, d, generator=g, dtype=torch.float64).requires_grad_()
                     for h in (hq, hk, hk))
    grad = torch.randn(b, hq, length, d, generator=g, dtype=torch.float64)
    scale = d ** -0.5
    ref = reference(q64, k64, v64, scale, window, cu)
    ref.backward(grad)
    q, k, v = (t.detach().float().requires_grad_() for t in (q64, k64, v64))
    mask = attn.Mask(is_causal=cu is None, window=window or None,
                     cu_seqlens=None if cu is None else torch.tensor(cu, dtype=torch.int32),
                     max_seqlen=0 if cu is None else int(torch.tensor(cu).diff().max()))
    out = attn.native_attention(q, k, v, mask, scale)
    out.backward(grad.float())
    return (out, q.grad, k.grad, v.grad), (ref, q64.grad, k64.grad, v64.grad)


@pytest.mark.parametrize("b,length,hq,hk,d,window", [
    (2, 5, 2, 1, 8, 0),       # shorter than one SIMD tile
    (2, 37, 4, 2, 32, 0),     # odd length, GQA
    (3, 100, 6, 2, 24, 0),    # head dim not a multiple of the SIMD width
    (1, 80, 8, 4, 64, 7),     # sliding window
    (2, 33, 3, 3, 80, 0),     # multi-head (no grouping), 80-dim heads
])
def test_matches_fp64_reference_with_grads(b, length, hq, hk, d, window):
    ours, ref = run_both(b, length, hq, hk, d, window)
    for name, x, y in zip(("out", "dq", "dk", "dv"), ours, ref):
        err = float((x.double() - y).abs().max())
        assert err <= 2e-5, f"{name}: {err}"


@pytest.mark.parametrize("cu", [[0, 10, 11, 30, 50], [0, 0, 25, 25, 50]])
def test_packed_documents_do_not_see_each_other(cu):
    ours, ref = run_both(1, 50, 4, 2, 16, cu=cu)
    for name, x, y in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert float((x.double() - y).abs().max()) <= 2e-5, name


def test_tokens_outside_every_document_get_zero_outputs_and_gradients():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 24, h, 16, generator=g) for h in (4, 2, 2))
    cu = torch.tensor([2, 10, 20])
    out, lse = torch.ops.saferlhf.attention_forward(q, k, v, cu, 0.25, 0)
    dq, dk, dv = torch.ops.saferlhf.attention_backward(torch.randn(1, 24, 4, 16, generator=g), q, k, v, out, lse,
                                                       cu, 0.25, 0)
    outside = torch.tensor([0, 1, 20, 21, 22, 23])
    for t in (out, dq, dk, dv):
        assert t[:, outside].abs().max() == 0 and t[:, 2:20].abs().max() > 0
    assert lse[..., outside].abs().max() == 0
    ref = reference(q.transpose(1, 2)[:, :, 2:20].double(), k.transpose(1, 2)[:, :, 2:20].double(),
                    v.transpose(1, 2)[:, :, 2:20].double(), 0.25, cu=[0, 8, 18])
    assert float((out.transpose(1, 2)[:, :, 2:20].double() - ref).abs().max()) <= 1e-5


def test_output_is_a_view_of_the_token_major_layout_and_strided_inputs_work():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 19, 4 + 2 + 2, 16, generator=g)  # a fused qkv projection viewed as [B, L, H, D]
    q, k, v = base[:, :, :4].transpose(1, 2), base[:, :, 4:6].transpose(1, 2), base[:, :, 6:].transpose(1, 2)
    out = attn.native_attention(q, k, v, attn.Mask(is_causal=True), 0.25)
    assert out.transpose(1, 2).is_contiguous()
    ref = reference(q.double(), k.double(), v.double(), 0.25)
    assert float((out.double() - ref).abs().max()) <= 1e-5


def test_cases_it_cannot_take_go_to_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(attn, "sdpa_attention", lambda *a: calls.append(a) or a[0])
    q = torch.randn(1, 2, 6, 8)
    padded = attn.padded_mask(torch.tensor([[0, 1, 1, 1, 1, 1]]), 6, "cpu")
    attn.native_attention(q, q, q, padded, 1.0)  # a padded (non-causal) mask
    attn.native_attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), attn.Mask(is_causal=True), 1.0)
    attn.native_attention(q, q[:, :, :1], q[:, :, :1], attn.Mask(is_causal=True), 1.0)  # k shorter than q
    monkeypatch.setattr(attn, "NATIVE_MAX_SEQLEN", 4)
    attn.native_attention(q, q, q, attn.Mask(is_causal=True), 1.0)
    assert len(calls) == 4


def test_bad_inputs_raise():
    q = torch.randn(1, 6, 3, 8)
    with pytest.raises(RuntimeError, match="query heads"):
        torch.ops.saferlhf.attention_forward(q, q[:, :, :2], q[:, :, :2], None, 1.0, 0)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        torch.ops.saferlhf.attention_forward(q, q, q, torch.tensor([0, 4, 3]), 1.0, 0)
    with pytest.raises(RuntimeError, match="fp32"):
        torch.ops.saferlhf.attention_forward(q.double(), q.double(), q.double(), None, 1.0, 0)


def test_model_default_on_cpu_is_native_and_matches_sdpa():
    from saferlhf_fast.models.llama import LlamaForCausalLM, ModelConfig

    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    native = LlamaForCausalLM(cfg)
    sdpa = LlamaForCausalLM(cfg, attn_backend="sdpa")
    sdpa.load_state_dict(native.state_dict())
    assert native.backend() == "native" and sdpa.backend() == "sdpa"
    ids = torch.randint(1, cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(2))
    for ragged in (False, True):  # full batch: causal rows; one ragged row: the native path packs the batch
        mask = torch.ones_like(ids)
        if ragged:
            mask[1, 9:] = 0
        out = {}
        for name, m in (("native", native), ("sdpa", sdpa)):
            m.zero_grad(set_to_none=True)
            logp = m.token_logprobs(ids, mask)
            logp.sum().backward()
            out[name] = (logp.detach(), m.model.layers[0].self_attn.q_proj.weight.grad.clone())
        assert float((out["native"][0] - out["sdpa"][0]).abs().max()) <= 1e-5
        assert float((out["native"][1] - out["sdpa"][1]).abs().max()) <= 1e-5
