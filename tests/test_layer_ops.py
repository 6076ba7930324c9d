"""The fused layer ops (``saferlhf_fast.ops.layers``: RoPE, SwiGLU, RMSNorm; C++ in csrc/layer_ops.cpp) against their
torch references: the RoPE forward bit for bit, SwiGLU / RMSNorm to fp32 rounding, every gradient against an fp64
reference; odd sizes (scalar tails), strided q / k views of one projection and of a fused qkv projection, broadcast
cos / sin, the fallbacks (bf16, backend="torch") and the argument checks of the C++ ops."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from saferlhf_fast import _backend, ops
from saferlhf_fast.ops import layers

HAS_ROPE = _backend.has_op("rope_forward")
HAS_SWIGLU = _backend.has_op("swiglu_forward")
HAS_RMS = _backend.has_op("rms_norm_forward")
_WHY = "the compiled extension is not built or lacks saferlhf::{} (rebuild: python setup.py build_ext --inplace)"
needs_rope = pytest.mark.skipif(not HAS_ROPE, reason=_WHY.format("rope_forward"))
needs_swiglu = pytest.mark.skipif(not HAS_SWIGLU, reason=_WHY.format("swiglu_forward"))
needs_rms = pytest.mark.skipif(not HAS_RMS, reason=_WHY.format("rms_norm_forward"))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _max_rel(x, y):
    """max |x - y| / max |y| (fp64)."""
    return float((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-300))


# ================================================================================================== RoPE
def _tables(bc, length, d, seed=1, dtype=torch.float32):
    """cos / sin_signed ``[bc, L, d]`` as the model builds them (positions x inverse frequencies)."""
    g = _gen(seed)
    pos = torch.randint(0, 4096, (bc, length), generator=g).float()
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    freqs = pos[..., None] * inv
    sin = freqs.sin()
    return torch.cat((freqs, freqs), -1).cos().to(dtype), torch.cat((-sin, sin), -1).to(dtype)


def _rope_inputs(b, length, hq, hk, d, layout="split", seed=0):
    """q / k ``[B, L, H, d]`` views: of two projection outputs [B, L, H*d] ("split"), of one fused qkv output
    [B, L, (Hq + 2 Hk) d] ("fused"), or of [B, H, L, d] tensors transposed ("transposed")."""
    g = _gen(seed)
    if layout == "split":
        q = torch.randn(b, length, hq * d, generator=g).view(b, length, hq, d)
        k = torch.randn(b, length, hk * d, generator=g).view(b, length, hk, d)
    elif layout == "fused":
        qkv = torch.randn(b, length, (hq + 2 * hk) * d, generator=g)
        q = qkv[..., :hq * d].view(b, length, hq, d)
        k = qkv[..., hq * d:(hq + hk) * d].view(b, length, hk, d)
    else:
        q = torch.randn(b, hq, length, d, generator=g).transpose(1, 2)
        k = torch.randn(b, hk, length, d, generator=g).transpose(1, 2)
    return q, k


@needs_rope
@pytest.mark.parametrize("b,length,hq,hk,d", [
    (2, 5, 2, 1, 8),      # shorter than one vector
    (3, 7, 3, 1, 24),     # half = 12: scalar / partial-vector tail only
    (2, 80, 4, 4, 64),    # the model's heads
    (2, 33, 8, 4, 32),    # grouped-query heads, half = one AVX-512 vector
    (1, 9, 2, 2, 80),     # half = 40: vectors plus a tail
    (2, 6, 1, 3, 128),
])
@pytest.mark.parametrize("layout", ["split", "fused", "transposed"])
@pytest.mark.parametrize("bc", ["B", 1])
def test_rope_forward_is_bit_exact_and_backward_matches(b, length, hq, hk, d, layout, bc):
    q, k = _rope_inputs(b, length, hq, hk, d, layout)
    cos, sin = _tables(b if bc == "B" else 1, length, d)
    q_out, k_out = ops.rope(q, k, cos, sin, backend="cpu")
    r_q, r_k = layers.rope_reference(q, k, cos, sin)
    assert q_out.shape == (b, length, hq, d) and k_out.shape == (b, length, hk, d)
    assert q_out.is_contiguous() and k_out.is_contiguous()
    assert torch.equal(q_out, r_q) and torch.equal(k_out, r_k)

    # gradients: against fp64 (tight), and against torch autograd of the fp32 reference (same products, same adds)
    qg, kg = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    g = _gen(7)
    gq, gk = torch.randn(q_out.shape, generator=g), torch.randn(k_out.shape, generator=g)
    q_out, k_out = ops.rope(qg, kg, cos, sin, backend="cpu")
    torch.autograd.backward([q_out, k_out], [gq, gk])
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    r_q, r_k = layers.rope_reference(q64, k64, cos.double(), sin.double())
    torch.autograd.backward([r_q, r_k], [gq.double(), gk.double()])
    assert _max_rel(qg.grad, q64.grad) < 1e-6 and _max_rel(kg.grad, k64.grad) < 1e-6
    q32, k32 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    torch.autograd.backward(list(layers.rope_reference(q32, k32, cos, sin)), [gq, gk])
    assert torch.equal(qg.grad, q32.grad) and torch.equal(kg.grad, k32.grad)


@needs_rope
def test_rope_non_contiguous_output_gradient():
    q, k = _rope_inputs(2, 10, 4, 2, 64)
    cos, sin = _tables(2, 10, 64)
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    q_out, k_out = ops.rope(q, k, cos, sin)
    # the model transposes to [B, H, L, d] right after: the incoming gradients are transposed views
    (q_out.transpose(1, 2) * torch.arange(10.0)[:, None]).sum().backward(retain_graph=True)
    ref_q = q.detach().clone().requires_grad_()
    weights = torch.arange(10.0)[:, None]
    (layers.rope_reference(ref_q, k.detach(), cos, sin)[0].transpose(1, 2) * weights).sum().backward()
    assert torch.equal(q.grad, ref_q.grad)
    assert k.grad is None or k.grad.abs().max() == 0  # only q was used


@needs_rope
def test_rope_backward_op_is_the_transpose_of_the_forward():
    # <rope(x), y> == <x, rope_backward(y)> for random x, y (the backward is the adjoint of the linear map)
    q, k = _rope_inputs(2, 6, 3, 1, 24, seed=3)
    cos, sin = _tables(2, 6, 24, seed=4)
    y_q, y_k = _rope_inputs(2, 6, 3, 1, 24, seed=5)
    f_q, f_k = torch.ops.saferlhf.rope_forward(q, k, cos, sin)
    b_q, b_k = torch.ops.saferlhf.rope_backward(y_q, y_k, cos, sin)
    lhs = (f_q.double() * y_q.double()).sum() + (f_k.double() * y_k.double()).sum()
    rhs = (q.double() * b_q.double()).sum() + (k.double() * b_k.double()).sum()
    assert abs(float(lhs - rhs)) <= 1e-4 * float(lhs.abs() + 1)


def test_rope_bf16_and_torch_backend_fall_back_to_the_reference():
    q, k = _rope_inputs(2, 5, 2, 1, 16)
    cos, sin = _tables(2, 5, 16)
    qb, kb = q.bfloat16().requires_grad_(), k.bfloat16().requires_grad_()
    q_out, k_out = ops.rope(qb, kb, cos, sin)
    r_q, r_k = layers.rope_reference(qb.detach(), kb.detach(), cos, sin)
    assert q_out.dtype == torch.bfloat16 and torch.equal(q_out, r_q) and torch.equal(k_out, r_k)
    (q_out.float().sum() + k_out.float().sum()).backward()
    assert qb.grad is not None and qb.grad.dtype == torch.bfloat16 and torch.isfinite(qb.grad.float()).all()
    t_q, t_k = ops.rope(q, k, cos, sin, backend="torch")
    assert torch.equal(t_q, layers.rope_reference(q, k, cos, sin)[0])


@needs_rope
def test_rope_tables_requiring_grad_take_the_reference():
    q, k = _rope_inputs(1, 4, 2, 1, 8)
    cos, sin = _tables(1, 4, 8)
    cos.requires_grad_()
    q_out, k_out = ops.rope(q, k, cos, sin)
    (q_out.sum() + k_out.sum()).backward()
    assert cos.grad is not None and cos.grad.abs().max() > 0


@needs_rope
def test_rope_bad_inputs_raise():
    q, k = _rope_inputs(2, 4, 2, 1, 16)
    cos, sin = _tables(2, 4, 16)
    op = torch.ops.saferlhf.rope_forward
    with pytest.raises(RuntimeError, match="float32"):
        op(q.double(), k.double(), cos.double(), sin.double())
    with pytest.raises(RuntimeError, match="even"):
        op(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])
    with pytest.raises(RuntimeError, match="does not match"):
        op(q, k[:1], cos, sin)
    with pytest.raises(RuntimeError, match="do not fit"):
        op(q, k, cos[:, :3], sin[:, :3])
    with pytest.raises(RuntimeError, match="differ"):
        op(q, k, cos, sin[:1])
    with pytest.raises(RuntimeError, match=r"\[B, L, H, d\]"):
        op(q[0], k[0], cos, sin)
    with pytest.raises(ValueError, match="rope"):
        ops.rope(q[0], k[0], cos, sin)


# ================================================================================================ SwiGLU
def _swiglu_inputs(shape, seed=0, scale=3.0):
    g = _gen(seed)
    return torch.randn(shape, generator=g) * scale, torch.randn(shape, generator=g)


@needs_swiglu
@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 7, 33), (4, 80, 688), (3, 1000), (2, 3, 17)])
def test_swiglu_forward_and_gradients(shape):
    gate, up = _swiglu_inputs(shape)
    out = ops.swiglu(gate, up, backend="cpu")
    ref = F.silu(gate) * up
    assert out.shape == gate.shape
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-8)
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    exact = F.silu(g64) * u64
    assert _max_rel(out, exact.detach()) < 1e-6
    dout = torch.randn(shape, generator=_gen(9))
    exact.backward(dout.double())
    gg, ug = gate.clone().requires_grad_(), up.clone().requires_grad_()
    ops.swiglu(gg, ug, backend="cpu").backward(dout)
    assert _max_rel(gg.grad, g64.grad) < 2e-6 and _max_rel(ug.grad, u64.grad) < 1e-6
    # element-wise relative error as well (not only relative to the largest entry)
    torch.testing.assert_close(gg.grad.double(), g64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ug.grad.double(), u64.grad, rtol=1e-5, atol=1e-7)


@needs_swiglu
def test_swiglu_extreme_and_strided_inputs():
    gate = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 80.0, -80.0, 103.0, -103.0, 150.0, -150.0,
                         float("inf"), float("-inf"), 1.5, -1.5, 0.5, -0.5])
    up = torch.ones_like(gate)
    out = torch.ops.saferlhf.swiglu_forward(gate, up)
    exact = (F.silu(gate.double()) * up.double()).float()
    finite = torch.isfinite(gate)
    torch.testing.assert_close(out[finite], exact[finite], rtol=2e-7, atol=1e-37)
    assert out[12] == float("inf") and torch.isnan(out[13])  # silu(-inf) = -inf * 0 = NaN, as torch's x / (1 + inf)
    assert torch.isnan(torch.ops.saferlhf.swiglu_forward(torch.tensor([float("nan")]), torch.ones(1))).all()
    # gate / up as halves of one fused gate_up projection (row stride 2I) and a transposed view
    gu = torch.randn(5, 9, 2 * 40, generator=_gen(2))
    gate, up = gu[..., :40], gu[..., 40:]
    torch.testing.assert_close(ops.swiglu(gate, up), F.silu(gate) * up, rtol=1e-6, atol=1e-7)
    gt, ut = gate.transpose(0, 1), up.transpose(0, 1)
    torch.testing.assert_close(ops.swiglu(gt, ut), F.silu(gt) * ut, rtol=1e-6, atol=1e-7)


def test_swiglu_bf16_and_torch_backend_fall_back_to_the_reference():
    gate, up = _swiglu_inputs((3, 20))
    gb, ub = gate.bfloat16().requires_grad_(), up.bfloat16().requires_grad_()
    out = ops.swiglu(gb, ub)
    assert out.dtype == torch.bfloat16 and torch.equal(out, F.silu(gb.detach()) * ub.detach())
    out.float().sum().backward()
    assert gb.grad is not None and gb.grad.dtype == torch.bfloat16
    assert torch.equal(ops.swiglu(gate, up, backend="torch"), F.silu(gate) * up)


@needs_swiglu
def test_swiglu_bad_inputs_raise():
    gate, up = _swiglu_inputs((3, 8))
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.saferlhf.swiglu_forward(gate.double(), up.double())
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.saferlhf.swiglu_forward(gate, up[:, :7])
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.saferlhf.swiglu_backward(gate[:2], gate, up)
    with pytest.raises(ValueError, match="unknown backend"):
        ops.swiglu(gate, up, backend="tpu")


# =============================================================================================== RMSNorm
@needs_rms
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 7, 33), (16, 80, 256), (4, 1000), (2, 3, 576)])
def test_rms_norm_forward_and_gradients(shape):
    g = _gen(0)
    x = torch.randn(shape, generator=g) * 2 + 0.5
    w = torch.randn(shape[-1], generator=g)
    eps = 1e-6
    y = ops.rms_norm(x, w, eps, backend="cpu")
    ref = F.rms_norm(x, (shape[-1],), w, eps)
    assert y.shape == x.shape
    torch.testing.assert_close(y, ref, rtol=2e-6, atol=1e-6)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    exact = F.rms_norm(x64, (shape[-1],), w64, eps)
    assert _max_rel(y, exact.detach()) < 1e-6
    dy = torch.randn(shape, generator=_gen(4))
    exact.backward(dy.double())
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    ops.rms_norm(xg, wg, eps, backend="cpu").backward(dy)
    # dx relative to the size of its terms (dx itself can vanish: H = 1 leaves only the eps term)
    rstd = torch.rsqrt(x64.detach().pow(2).mean(-1, keepdim=True) + eps)
    scale = float((dy.double() * w64.detach() * rstd).abs().max())
    assert float((xg.grad.double() - x64.grad).abs().max()) < 5e-6 * scale, "dx"
    assert _max_rel(wg.grad, w64.grad) < 5e-6, "dweight"


@needs_rms
def test_rms_norm_saves_rstd_and_is_deterministic_across_threads():
    g = _gen(1)
    x = torch.randn(1000, 200, generator=g)
    w = torch.randn(200, generator=g)
    y, rstd = torch.ops.saferlhf.rms_norm_forward(x, w, 1e-5)
    torch.testing.assert_close(rstd, torch.rsqrt(x.pow(2).mean(-1) + 1e-5), rtol=1e-6, atol=0)
    dy = torch.randn(1000, 200, generator=g)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(torch.ops.saferlhf.rms_norm_backward(dy, x, w, rstd))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@needs_rms
def test_rms_norm_strided_input_and_weight_without_grad():
    g = _gen(2)
    base = torch.randn(6, 4, 64, generator=g)
    x = base.transpose(0, 1).requires_grad_(False)  # [4, 6, 64], rows not evenly strided
    w = torch.randn(64, generator=g)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), F.rms_norm(x, (64,), w, 1e-6), rtol=2e-6, atol=1e-6)
    xg = x.clone().requires_grad_()
    ops.rms_norm(xg, w, 1e-6).sum().backward()
    xr = x.clone().requires_grad_()
    F.rms_norm(xr, (64,), w, 1e-6).sum().backward()
    assert w.grad is None
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-4, atol=1e-5)


def test_rms_norm_bf16_and_torch_backend_fall_back_to_the_reference():
    g = _gen(3)
    x = torch.randn(4, 32, generator=g)
    w = torch.randn(32, generator=g)
    xb = x.bfloat16().requires_grad_()
    y = ops.rms_norm(xb, w, 1e-6)
    assert torch.equal(y, layers.rms_norm_reference(xb.detach(), w, 1e-6))
    y.sum().backward()
    assert xb.grad is not None and torch.isfinite(xb.grad.float()).all()
    assert torch.equal(ops.rms_norm(x, w, 1e-6, backend="torch"), F.rms_norm(x, (32,), w, 1e-6))


@needs_rms
def test_rms_norm_bad_inputs_raise():
    x, w = torch.randn(3, 8), torch.randn(8)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.saferlhf.rms_norm_forward(x.double(), w.double(), 1e-6)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.saferlhf.rms_norm_forward(x, w.bfloat16(), 1e-6)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.saferlhf.rms_norm_forward(x, w[:7], 1e-6)
    _, rstd = torch.ops.saferlhf.rms_norm_forward(x, w, 1e-6)
    with pytest.raises(RuntimeError, match="one value per row"):
        torch.ops.saferlhf.rms_norm_backward(x, x, w, rstd[:2])


def test_backend_cpu_without_the_op_is_an_error(monkeypatch):
    monkeypatch.setattr(_backend, "has_op", lambda name: False)
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="not available"):
        ops.swiglu(x, x, backend="cpu")
    assert torch.equal(ops.swiglu(x, x), F.silu(x) * x)  # the default quietly takes the reference


# ========================================================================================== add + RMSNorm
@needs_rms
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 7, 33), (16, 80, 256)])
@pytest.mark.parametrize("use_sum", [True, False])
def test_add_rms_norm_is_bit_identical_to_add_then_norm(shape, use_sum):
    """The fused residual add + norm gives the bits of ``s = x + r; rms_norm(s)`` forward and backward, whether the
    sum itself gets a gradient (the residual stream) or only the normalised output does."""
    g = _gen(11)
    x, r = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    w = torch.randn(shape[-1], generator=g)
    gs, gy = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)

    def run(fused):
        xs, rs, ws = (t.clone().requires_grad_(True) for t in (x, r, w))
        if fused:
            s, y = ops.add_rms_norm(xs, rs, ws, 1e-5)
        else:
            s = xs + rs
            y = ops.rms_norm(s, ws, 1e-5)
        loss = (y * gy).sum() + ((s * gs).sum() if use_sum else 0.0)
        loss.backward()
        return s.detach(), y.detach(), xs.grad, rs.grad, ws.grad

    for a, c in zip(run(True), run(False)):
        assert torch.equal(a, c)


@needs_rms
def test_add_rms_norm_matches_fp64_and_handles_strided_inputs():
    g = _gen(12)
    x = torch.randn(20, 2 * 48, generator=g)[:, ::2]  # last dim strided: copied to rows
    r = torch.randn(48, 20, generator=g).t()  # transposed view
    w = torch.randn(48, generator=g)
    xs, rs, ws = (t.clone().requires_grad_(True) for t in (x, r, w))
    s, y = ops.add_rms_norm(xs, rs, ws, 1e-6)
    gy = torch.randn(20, 48, generator=g)
    ((y * gy).sum() + s.sum()).backward()
    x64, r64, w64 = (t.double().requires_grad_(True) for t in (x, r, w))
    s64 = x64 + r64
    y64 = s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64
    ((y64 * gy.double()).sum() + s64.sum()).backward()
    assert _max_rel(y, y64) < 1e-6
    for a, c in ((xs.grad, x64.grad), (rs.grad, r64.grad), (ws.grad, w64.grad)):
        assert _max_rel(a, c) < 1e-5


def test_add_rms_norm_bf16_falls_back_and_shapes_must_match():
    x = torch.randn(4, 8).bfloat16()
    w = torch.randn(8).bfloat16()
    s, y = ops.add_rms_norm(x, x, w)
    s_ref, y_ref = layers.add_rms_norm_reference(x, x, w)
    assert torch.equal(s, s_ref) and torch.equal(y, y_ref)
    with pytest.raises(ValueError, match="differ"):
        ops.add_rms_norm(torch.randn(4, 8), torch.randn(4, 9), torch.randn(8))
