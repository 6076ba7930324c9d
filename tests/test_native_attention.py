"""The extension's CPU attention kernel (csrc/attention_ops.cpp, backend ``native``) against an fp64 reference:
forward, all three gradients, grouped-query heads, head dims that are not a multiple of the SIMD width, sliding
windows, packed documents (including empty ones), strided inputs, and the model-level parity and fallbacks."""
from __future__ import annotations

import pytest
import torch

from saferlhf_fast.models import attention as attn

pytestmark = pytest.mark.skipif(not attn.native_available(), reason="the compiled extension is not built")


def _allowed(length, window=0, cu=None):
    """[L, L] "may attend": causal, within ``window`` when > 0, inside one document of ``cu``."""
    i = torch.arange(length)
    allowed = i[None, :] <= i[:, None]
    if window > 0:
        allowed &= i[:, None] - i[None, :] < window
    if cu is not None:
        doc = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor(cu).diff())
        allowed &= doc[:, None] == doc[None, :]
    return allowed


def reference(q, k, v, scale, window=0, cu=None):
    """fp64 softmax(q k^T * scale + mask) v on [B, H, L, D] tensors (causal, window, documents)."""
    allowed = _allowed(q.shape[2], window, cu)
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
    attn.native_attention(q.half(), q.half(), q.half(), attn.Mask(is_causal=True), 1.0)  # fp16: not a kernel dtype
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
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        torch.ops.saferlhf.attention_forward(q.double(), q.double(), q.double(), None, 1.0, 0)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.saferlhf.attention_forward(q.bfloat16(), q, q, None, 1.0, 0)


def _native_and_sdpa_models():
    """(config, a tiny GQA Llama on the default CPU attention, the same weights on SDPA)."""
    from saferlhf_fast.models.llama import LlamaForCausalLM, ModelConfig

    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    native = LlamaForCausalLM(cfg)
    sdpa = LlamaForCausalLM(cfg, attn_backend="sdpa")
    sdpa.load_state_dict(native.state_dict())
    return cfg, native, sdpa


def test_model_default_on_cpu_is_native_and_matches_sdpa():
    cfg, native, sdpa = _native_and_sdpa_models()
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


# ----------------------------------------------------------------------------------------------------------- bf16
def bf16_ulp(x):
    """One bf16 ulp at each element of the bf16 tensor ``x`` (2^(e - 7) for |x| in [2^e, 2^(e+1)); the smallest normal
    spacing at 0)."""
    mag = x.double().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - 7)


def eager_bf16(q, k, v, scale, window=0, cu=None):
    """Attention computed in bf16 as transformers' eager path does (matmuls in bf16, softmax in fp32 rounded to bf16):
    the bf16 reference the kernel must never be worse than."""
    allowed = _allowed(q.shape[2], window, cu)
    rep = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(rep, 1).transpose(-1, -2)) * scale
    p = s.masked_fill(~allowed, float("-inf")).softmax(-1, dtype=torch.float32).to(q.dtype)
    return p @ v.repeat_interleave(rep, 1)


def run_bf16(b, length, hq, hk, d, window=0, cu=None, seed=0):
    """(ours, exact rounded to bf16, eager bf16), each (out, dq, dk, dv): the kernel on bf16 q / k / v and a bf16
    output gradient; the fp64 reference on the same (upcast) values, its results rounded to bf16."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=g).bfloat16() for h in (hq, hk, hk))
    grad = torch.randn(b, hq, length, d, generator=g).bfloat16()
    scale = d ** -0.5
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference(*leaves, scale, window, cu)
    ref.backward(grad.double())
    exact = tuple(t.bfloat16() for t in (ref.detach(), *(x.grad for x in leaves)))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    eager = eager_bf16(*leaves, scale, window, cu)
    eager.backward(grad)
    eager = (eager.detach(), *(x.grad for x in leaves))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    mask = attn.Mask(is_causal=cu is None, window=window or None,
                     cu_seqlens=None if cu is None else torch.tensor(cu, dtype=torch.int32),
                     max_seqlen=0 if cu is None else int(torch.tensor(cu).diff().max()))
    out = attn.native_attention(*leaves, mask, scale)
    out.backward(grad)
    return (out.detach(), *(x.grad for x in leaves)), exact, eager


def check_bf16(ours, exact, eager):
    """Every result is bf16, within 1 bf16 ulp of the exact result rounded to bf16 (plus 2e-5 absolute: near 0 the
    fp32 accumulation error exceeds a bf16 ulp), and its largest error is never above the eager bf16 path's."""
    for name, x, y, z in zip(("out", "dq", "dk", "dv"), ours, exact, eager):
        assert x.dtype == torch.bfloat16, name
        err = (x.double() - y.double()).abs()
        assert bool((err <= bf16_ulp(y) + 2e-5).all()), f"{name}: {float((err / bf16_ulp(y)).max())} ulp"
        eager_err = float((z.double() - y.double()).abs().max())
        assert float(err.max()) <= eager_err, f"{name}: {float(err.max())} > eager bf16 {eager_err}"


@pytest.mark.parametrize("b,length,hq,hk,d,window", [
    (2, 5, 2, 1, 8, 0),        # shorter than one SIMD tile
    (2, 37, 4, 2, 32, 0),      # odd length, GQA, 32-dim heads (the tiny test models)
    (1, 45, 9, 3, 64, 0),      # SmolLM2-135M's heads: 9 query / 3 kv heads of 64
    (3, 100, 6, 2, 24, 0),     # head dim not a multiple of the SIMD width
    (2, 31, 3, 1, 13, 0),      # odd head dim
    (1, 80, 8, 4, 64, 7),      # sliding window
])
def test_bf16_within_one_ulp_of_the_exact_result_with_grads(b, length, hq, hk, d, window):
    """bf16 q / k / v: out, dq, dk, dv are the fp32-computed results rounded once.  Measured: every element within
    1 ulp of the exact result rounded to bf16 (largest errors 0-3.9e-3 absolute, 1 ulp of values in [1, 2); the fp32
    error is ~1e-6, so a result differs from that rounding only next to a rounding boundary, and elements near 0 are
    within fp32 error); the eager bf16 path's largest errors are 3.9e-3 to 3.1e-2 (up to 16 ulp of values in
    [1, 2))."""
    check_bf16(*run_bf16(b, length, hq, hk, d, window))


@pytest.mark.parametrize("cu,window", [([0, 10, 11, 30, 50], 0), ([0, 0, 25, 25, 50], 0), ([0, 7, 43, 50], 5)])
def test_bf16_packed_documents(cu, window):
    check_bf16(*run_bf16(1, 50, 4, 2, 32, window, cu))


def test_bf16_forward_returns_bf16_out_and_fp32_lse_equal_to_the_fp32_kernel_on_upcast_inputs():
    """bf16 inputs are converted exactly and computed as fp32: lse equals the fp32 kernel's bit for bit, out is its
    output rounded to bf16."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 21, h, 40, generator=g).bfloat16() for h in (4, 2, 2))
    out, lse = torch.ops.saferlhf.attention_forward(q, k, v, None, 0.2, 0)
    out32, lse32 = torch.ops.saferlhf.attention_forward(q.float(), k.float(), v.float(), None, 0.2, 0)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert torch.equal(lse, lse32) and torch.equal(out, out32.bfloat16())


def test_bf16_model_under_autocast_runs_native_as_close_to_fp32_as_sdpa(monkeypatch):
    """The model under CPU bf16 autocast (bf16 q / k / v from the projections) runs the native kernel (its SDPA
    fallback is disabled here), on a full batch and on a ragged one (packed documents), and is as close to the fp32
    model as the SDPA backend under autocast.  Measured (both batches): log-prob errors 1.7e-3 (native) and 1.5e-3
    (SDPA), q_proj gradient errors 2.4-2.5e-4 and 2.4-2.5e-4 (gradients up to 0.035): the bf16 projections dominate
    both."""
    cfg, native, sdpa = _native_and_sdpa_models()
    ids = torch.randint(1, cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(2))
    sdpa_attention = attn.sdpa_attention
    for ragged in (False, True):  # full batch: causal rows; one ragged row: the native path packs the batch
        mask = torch.ones_like(ids)
        if ragged:
            mask[1, 9:] = 0
        out = {}
        for name, m, bf16 in (("fp32", sdpa, False), ("native", native, True), ("sdpa", sdpa, True)):
            m.zero_grad(set_to_none=True)
            monkeypatch.setattr(attn, "sdpa_attention", None if name == "native" else sdpa_attention)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logp = m.token_logprobs(ids, mask)
            logp.float().sum().backward()
            out[name] = (logp.detach().float(), m.model.layers[0].self_attn.q_proj.weight.grad.clone())
        for name in ("native", "sdpa"):
            assert float((out[name][0] - out["fp32"][0]).abs().max()) <= 4e-3, (name, ragged)
            assert float((out[name][1] - out["fp32"][1]).abs().max()) <= 6e-4, (name, ragged)


def test_bf16_no_grad_and_training_forwards_agree_bit_for_bit():
    """One kernel serves no-grad and training forwards in bf16 (SDPA's forward alone would be faster, its backward is
    slower): a policy's rollout log-probs (no grad) equal its training forward's, so PPO's first ratio is exactly 1."""
    from saferlhf_fast.models.llama import LlamaForCausalLM, ModelConfig

    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    assert model.backend() == "native"
    ids = torch.randint(1, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            rollout = model.token_logprobs(ids, torch.ones_like(ids))
        training = model.token_logprobs(ids, torch.ones_like(ids))
    assert training.requires_grad and torch.equal(rollout, training.detach())
