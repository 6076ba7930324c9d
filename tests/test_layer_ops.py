"""The fused layer ops (``saferlhf_fast.ops.layers``: RoPE, SwiGLU, RMSNorm; C++ in csrc/layer_ops.cpp) against their
torch references: the RoPE forward bit for bit, SwiGLU / RMSNorm to fp32 rounding, every gradient against an fp64
reference; odd sizes (scalar tails), strided q / k views of one projection and of a fused qkv projection, broadcast
cos / sin, the fallbacks (fp16, mixed dtypes the kernels do not take, backend="torch") and the argument checks of the
C++ ops.  bf16 (the mixed-precision contract): each kernel against the fp32 reference on the upcast inputs, rounded
to the output dtype, in bf16 ulps, and against the bf16 reference's own error; the mixed norm cases (bf16 x, fp32
residual / weight); and a profile showing that the kernels, not the references, ran."""
from __future__ import annotations

import itertools

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


def test_rope_fp16_and_torch_backend_fall_back_to_the_reference():
    q, k = _rope_inputs(2, 5, 2, 1, 16)
    cos, sin = _tables(2, 5, 16)
    qh, kh = q.half().requires_grad_(), k.half().requires_grad_()
    q_out, k_out = ops.rope(qh, kh, cos, sin)
    r_q, r_k = layers.rope_reference(qh.detach(), kh.detach(), cos, sin)
    assert q_out.dtype == torch.float16 and torch.equal(q_out, r_q) and torch.equal(k_out, r_k)
    (q_out.float().sum() + k_out.float().sum()).backward()
    assert qh.grad is not None and qh.grad.dtype == torch.float16 and torch.isfinite(qh.grad.float()).all()
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
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        op(q.double(), k.double(), cos.double(), sin.double())
    with pytest.raises(RuntimeError, match="k must be BFloat16"):
        op(q.bfloat16(), k, cos, sin)
    with pytest.raises(RuntimeError, match="sin_signed must be Float"):
        op(q, k, cos, sin.bfloat16())
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


def test_swiglu_fp16_and_torch_backend_fall_back_to_the_reference():
    gate, up = _swiglu_inputs((3, 20))
    gh, uh = gate.half().requires_grad_(), up.half().requires_grad_()
    out = ops.swiglu(gh, uh)
    assert out.dtype == torch.float16 and torch.equal(out, F.silu(gh.detach()) * uh.detach())
    out.float().sum().backward()
    assert gh.grad is not None and gh.grad.dtype == torch.float16
    assert torch.equal(ops.swiglu(gate, up, backend="torch"), F.silu(gate) * up)


@needs_swiglu
def test_swiglu_bad_inputs_raise():
    gate, up = _swiglu_inputs((3, 8))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.saferlhf.swiglu_forward(gate.double(), up.double())
    with pytest.raises(RuntimeError, match="up must be BFloat16"):
        torch.ops.saferlhf.swiglu_forward(gate.bfloat16(), up)
    with pytest.raises(RuntimeError, match="dout must be BFloat16"):
        torch.ops.saferlhf.swiglu_backward(gate, gate.bfloat16(), up.bfloat16())
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.saferlhf.swiglu_forward(gate, up[:, :7])
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.saferlhf.swiglu_backward(gate[:2], gate, up)
    with pytest.raises(ValueError, match="unknown swiglu backend 'tpu'"):
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


def test_rms_norm_fp16_and_torch_backend_fall_back_to_the_reference():
    g = _gen(3)
    x = torch.randn(4, 32, generator=g)
    w = torch.randn(32, generator=g)
    xh = x.half().requires_grad_()
    y = ops.rms_norm(xh, w, 1e-6)
    assert torch.equal(y, layers.rms_norm_reference(xh.detach(), w, 1e-6))
    y.sum().backward()
    assert xh.grad is not None and xh.grad.dtype == torch.float16 and torch.isfinite(xh.grad.float()).all()
    assert torch.equal(ops.rms_norm(x, w, 1e-6, backend="torch"), F.rms_norm(x, (32,), w, 1e-6))


@needs_rms
def test_rms_norm_bad_inputs_raise():
    x, w = torch.randn(3, 8), torch.randn(8)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.saferlhf.rms_norm_forward(x.double(), w.double(), 1e-6)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.saferlhf.rms_norm_forward(x, w.half(), 1e-6)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.saferlhf.rms_norm_forward(x, w[:7], 1e-6)
    _, rstd = torch.ops.saferlhf.rms_norm_forward(x, w, 1e-6)
    with pytest.raises(RuntimeError, match="one value per row"):
        torch.ops.saferlhf.rms_norm_backward(x, x, w, rstd[:2])
    with pytest.raises(RuntimeError, match="dy must be BFloat16"):  # bf16 x, bf16 weight: dy in y's dtype
        torch.ops.saferlhf.rms_norm_backward(x, x.bfloat16(), w.bfloat16(), rstd)
    with pytest.raises(RuntimeError, match="rstd must be a float32"):
        torch.ops.saferlhf.rms_norm_backward(x, x, w, rstd.bfloat16())


def test_backend_cpu_without_the_op_is_an_error(monkeypatch):
    monkeypatch.setattr(_backend, "has_op", lambda name: False)
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match=r"swiglu backend 'cpu' needs .*saferlhf::swiglu"):
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


def test_add_rms_norm_fp16_falls_back_and_shapes_must_match():
    x = torch.randn(4, 8).half()
    w = torch.randn(8).half()
    s, y = ops.add_rms_norm(x, x, w)
    s_ref, y_ref = layers.add_rms_norm_reference(x, x, w)
    assert torch.equal(s, s_ref) and torch.equal(y, y_ref)
    with pytest.raises(ValueError, match="differ"):
        ops.add_rms_norm(torch.randn(4, 8), torch.randn(4, 9), torch.randn(8))


# ================================================================================================= bf16
# The mixed-precision contract (bf16 in, fp32 arithmetic and accumulation inside, each output rounded once to the
# dtype the reference returns): errors are measured against the fp32 reference on the upcast inputs, in units of
# one bf16 ulp of that reference rounded to bf16.
BF16 = torch.bfloat16


def _ulp(ref):
    """The spacing of bf16 numbers at each value of ``ref`` (bf16 keeps 8 significant bits: ulp(1) = 2^-7); the
    smallest normal spacing for zeros."""
    _, e = torch.frexp(ref.double().abs())
    return torch.exp2((e - 8).double()).clamp_min(2.0 ** -133)


def _ulps(actual, exact):
    """max |actual - exact| / ulp(exact rounded to bf16): the error of ``actual`` in bf16 ulps of ``exact``."""
    return float(((actual.double() - exact.double()).abs() / _ulp(exact.to(BF16))).max())


def _leaf(t, dtype):
    return t.detach().to(dtype).requires_grad_(True)


@needs_rope
@pytest.mark.parametrize("b,length,hq,hk,d", [(2, 5, 2, 1, 8), (3, 7, 3, 1, 24), (2, 33, 8, 4, 32),
                                              (1, 9, 2, 2, 80), (2, 80, 4, 4, 64)])
@pytest.mark.parametrize("table_dtype", [torch.float32, BF16])
@pytest.mark.parametrize("layout", ["split", "fused"])
def test_rope_bf16_rounds_the_fp32_result_once(b, length, hq, hk, d, table_dtype, layout):
    """bf16 q / k: outputs and gradients are bf16 and bit-identical to the fp32 expression on the upcast inputs,
    rounded once (0 ulp from it rounded, 0.5 from it unrounded), with fp32 or bf16 tables.  The bf16 reference also
    rounds the tables and each product: measured up to ~2300 ulp off where the two products cancel."""
    q32, k32 = _rope_inputs(b, length, hq, hk, d, layout)
    cos, sin = _tables(b, length, d, dtype=table_dtype)
    q, k = _leaf(q32, BF16), _leaf(k32, BF16)
    q_out, k_out = ops.rope(q, k, cos, sin, backend="cpu")
    assert q_out.dtype == k_out.dtype == BF16
    qf, kf = _leaf(q, torch.float32), _leaf(k, torch.float32)
    r_q, r_k = layers.rope_reference(qf, kf, cos.float(), sin.float())
    assert torch.equal(q_out, r_q.to(BF16)) and torch.equal(k_out, r_k.to(BF16))
    b_q, _ = layers.rope_reference(q.detach(), k.detach(), cos, sin)
    assert _ulps(q_out, r_q.detach()) <= _ulps(b_q, r_q.detach())

    g = _gen(7)
    gq, gk = torch.randn(q_out.shape, generator=g).to(BF16), torch.randn(k_out.shape, generator=g).to(BF16)
    torch.autograd.backward([q_out, k_out], [gq, gk])
    torch.autograd.backward([r_q, r_k], [gq.float(), gk.float()])
    assert q.grad.dtype == k.grad.dtype == BF16
    assert torch.equal(q.grad, qf.grad.to(BF16)) and torch.equal(k.grad, kf.grad.to(BF16))


@needs_swiglu
@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 7, 33), (4, 80, 688), (3, 1000)])
def test_swiglu_bf16_within_one_ulp(shape):
    """bf16 gate / up -> bf16 out and gradients within 1 bf16 ulp of the fp32 reference's, rounded (measured: 1 ulp
    where the kernel's fp32 value and torch's differ by a few fp32 ulp across a bf16 rounding boundary), and the
    forward no further from the unrounded fp32 value than the bf16 reference (measured 0.50 vs 1.37 ulp)."""
    gate32, up32 = _swiglu_inputs(shape)
    gate, up = _leaf(gate32, BF16), _leaf(up32, BF16)
    out = ops.swiglu(gate, up, backend="cpu")
    gf, uf = _leaf(gate, torch.float32), _leaf(up, torch.float32)
    ref = F.silu(gf) * uf
    assert out.dtype == BF16
    assert _ulps(out, ref.detach().to(BF16)) <= 1
    assert _ulps(out, ref.detach()) <= max(0.5, _ulps(F.silu(gate.detach()) * up.detach(), ref.detach()))

    dout = torch.randn(shape, generator=_gen(9)).to(BF16)
    out.backward(dout)
    ref.backward(dout.float())
    assert gate.grad.dtype == up.grad.dtype == BF16
    assert _ulps(gate.grad, gf.grad.to(BF16)) <= 1 and _ulps(up.grad, uf.grad.to(BF16)) <= 1


def _dweight_close(dweight, s, dy, eps):
    """dweight = sum_rows dy xhat against fp64 (xhat of the norm's input ``s``): within 1 ulp plus the slack of an
    fp32 sum, 2^-16 of sum_rows |dy xhat|.  (Where a column nearly cancels, the fp32 reference's own summation is
    off by more than a bf16 ulp -- measured 2 ulp at [16, 80, 256], with the kernel the closer to fp64 -- so fp64 is
    the reference here.)"""
    s64 = s.detach().double()
    terms = dy.double() * (s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + eps))
    exact = terms.reshape(-1, s.shape[-1]).sum(0)
    slack = 2.0 ** -16 * terms.abs().reshape(-1, s.shape[-1]).sum(0)
    return bool(((dweight.double() - exact).abs() <= _ulp(exact.to(BF16)) + slack).all())


def _norm_inputs(shape, seed=0):
    g = _gen(seed)
    return torch.randn(shape, generator=g) * 2 + 0.5, torch.randn(shape[-1], generator=g)


NORM_SHAPES = [(1, 1), (3, 5), (2, 7, 33), (16, 80, 256), (5, 576), (2, 3, 100)]


@needs_rms
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("w_dtype", [BF16, torch.float32])
def test_rms_norm_bf16(shape, w_dtype):
    """bf16 x with a bf16 weight (a frozen bf16 model: y bf16) or an fp32 weight (a qk-norm's fp32 master weight under
    autocast: y fp32).  The kernel rounds as the reference does -- xhat to bf16, then times weight -- so it agrees
    with the bf16 reference up to rstd's last fp32 bit (measured: at most 1 ulp), and is no further than the bf16
    reference from the fp32 reference: within 2 ulp of it rounded for bf16 y (two roundings; measured 1, and 1.42
    ulp from the unrounded value, as the bf16 reference), within 1 for fp32 y (measured 0.97).  Gradients in x's
    and weight's dtypes: dx = rstd (g - xhat mean(g xhat)) cancels, so its error is measured in ulps of its largest
    term (bound 2, measured 0.50; the bf16 reference 0.78); dweight sums over the rows (:func:`_dweight_close`)."""
    x32, w32 = _norm_inputs(shape)
    x, w = _leaf(x32, BF16), _leaf(w32, w_dtype)
    y = ops.rms_norm(x, w, 1e-6, backend="cpu")
    y_dtype = torch.promote_types(BF16, w_dtype)
    assert y.dtype == y_dtype
    xf, wf = _leaf(x, torch.float32), _leaf(w, torch.float32)
    exact = F.rms_norm(xf, (shape[-1],), wf, 1e-6)
    ref16 = layers.rms_norm_reference(x.detach(), w.detach(), 1e-6)
    assert _ulps(y, ref16) <= 1
    assert _ulps(y, exact.detach().to(y_dtype)) <= (2 if y_dtype == BF16 else 1)
    assert _ulps(y, exact.detach()) <= max(_ulps(ref16, exact.detach()), 0.5) + 2.0 ** -8

    dy = torch.randn(shape, generator=_gen(4)).to(y_dtype)
    y.backward(dy)
    exact.backward(dy.float())
    assert x.grad.dtype == BF16 and w.grad.dtype == w_dtype
    rstd = torch.rsqrt(xf.detach().pow(2).mean(-1, keepdim=True) + 1e-6)
    scale = (dy.float() * wf.detach() * rstd).abs().max()  # dx relative to its terms (dx can cancel to ~0)
    assert float((x.grad.float() - xf.grad).abs().max()) <= 2 * float(_ulp(scale.to(BF16)))
    assert _dweight_close(w.grad, x, dy, 1e-6)


@needs_rms
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_add_rms_norm_bf16_x_fp32_residual_is_the_fp32_kernel(shape):
    """Mixed precision: bf16 x (an o / down projection output) + fp32 residual stream and fp32 weight -> fp32 s and
    y, bit-identical to the fp32 op on the upcast x (the upcast is exact, the add is torch's fp32 add); the gradient
    of x is that of the fp32 op rounded to bf16, the residual's is fp32 and bit-identical."""
    x32, w = _norm_inputs(shape)
    r32 = torch.randn(shape, generator=_gen(5))
    x, r, wl = _leaf(x32, BF16), _leaf(r32, torch.float32), _leaf(w, torch.float32)
    s, y = ops.add_rms_norm(x, r, wl, 1e-5, backend="cpu")
    assert s.dtype == y.dtype == torch.float32
    xf, rf, wf = _leaf(x, torch.float32), _leaf(r32, torch.float32), _leaf(w, torch.float32)
    s32, y32 = ops.add_rms_norm(xf, rf, wf, 1e-5, backend="cpu")
    assert torch.equal(s, x.detach().float() + r32) and torch.equal(s, s32) and torch.equal(y, y32)

    g = _gen(6)
    gs, gy = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    ((s * gs).sum() + (y * gy).sum()).backward()
    ((s32 * gs).sum() + (y32 * gy).sum()).backward()
    assert x.grad.dtype == BF16 and r.grad.dtype == wl.grad.dtype == torch.float32
    assert torch.equal(x.grad, xf.grad.to(BF16)) and torch.equal(r.grad, rf.grad) and torch.equal(wl.grad, wf.grad)


@needs_rms
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("use_sum", [True, False])
def test_add_rms_norm_all_bf16(shape, use_sum):
    """A frozen bf16 model: x, residual, weight bf16 -> s = x + residual bit-identical to torch's bf16 add (one
    rounding of the fp32 sum), y as :func:`test_rms_norm_bf16` (the reference's roundings).  The fp32 reference is
    the norm of that bf16 s, upcast (s is an output, rounded before the norm reads it, as in the reference);
    gradients bf16: dx (the norm's plus dsum, added before the one rounding; autograd of the bf16 reference rounds
    both) within 2 ulp of its largest term (measured 0.50; the bf16 reference 0.88), dweight as
    :func:`_dweight_close`.  Measured y: 1 ulp from the fp32 value rounded and from the bf16 reference."""
    x32, w32 = _norm_inputs(shape)
    r32 = torch.randn(shape, generator=_gen(5))
    x, r, w = _leaf(x32, BF16), _leaf(r32, BF16), _leaf(w32, BF16)
    s, y = ops.add_rms_norm(x, r, w, 1e-5, backend="cpu")
    assert s.dtype == y.dtype == BF16
    assert torch.equal(s, x.detach() + r.detach())
    s32, wf = _leaf(s, torch.float32), _leaf(w, torch.float32)  # d/dx = d/dresidual = d/ds
    y32 = F.rms_norm(s32, (shape[-1],), wf, 1e-5)
    ref16 = layers.rms_norm_reference(s.detach(), w.detach(), 1e-5)
    assert _ulps(y, ref16) <= 1 and _ulps(y, y32.detach().to(BF16)) <= 2
    assert _ulps(y, y32.detach()) <= max(_ulps(ref16, y32.detach()), 0.5) + 2.0 ** -8

    g = _gen(6)
    gs, gy = torch.randn(shape, generator=g).to(BF16), torch.randn(shape, generator=g).to(BF16)
    ((y.float() * gy.float()).sum() + ((s.float() * gs.float()).sum() if use_sum else 0.0)).backward()
    ((y32 * gy.float()).sum() + ((s32 * gs.float()).sum() if use_sum else 0.0)).backward()
    assert x.grad.dtype == r.grad.dtype == w.grad.dtype == BF16 and torch.equal(x.grad, r.grad)
    rstd = torch.rsqrt(s32.detach().pow(2).mean(-1, keepdim=True) + 1e-5)
    scale = (gy.float() * wf.detach() * rstd).abs().max() + (gs.float().abs().max() if use_sum else 0.0)
    assert float((x.grad.float() - s32.grad).abs().max()) <= 2 * float(_ulp(scale.to(BF16)))
    assert _dweight_close(w.grad, s, gy, 1e-5)


@needs_rms
@pytest.mark.parametrize("x_dtype,r_dtype,w_dtype", list(itertools.product((torch.float32, BF16), repeat=3)))
def test_norm_dtype_combinations_follow_the_reference(x_dtype, r_dtype, w_dtype):
    """Every fp32 / bf16 combination of x, residual and weight (rms_norm: x and weight) runs the kernel and gives
    outputs and gradients in the dtypes the reference gives (torch's type promotion), s bit-identical, y within 1
    bf16 ulp of the reference (the same roundings, up to rstd's last fp32 bit), gradients within 2^-7 of the largest
    of the fp32 reference's on the upcast inputs."""
    x32, w32 = _norm_inputs((5, 37))
    r32 = torch.randn(5, 37, generator=_gen(8))
    dtypes = (x_dtype, r_dtype, w_dtype)
    ours = [_leaf(t, d) for t, d in zip((x32, r32, w32), dtypes)]
    theirs = [_leaf(t, d) for t, d in zip((x32, r32, w32), dtypes)]
    upcast = [_leaf(t.to(d), torch.float32) for t, d in zip((x32, r32, w32), dtypes)]
    (s, y), names = _profiled_ops(lambda: ops.add_rms_norm(*ours, 1e-6))
    assert "saferlhf::add_rms_norm" in names
    s_ref, y_ref = layers.add_rms_norm_reference(*theirs, 1e-6)
    assert (s.dtype, y.dtype) == (s_ref.dtype, y_ref.dtype)
    assert torch.equal(s, s_ref) and _ulps(y, y_ref.detach()) <= 1
    y_norm = ops.rms_norm(ours[0], ours[2], 1e-6)
    y_norm_ref = layers.rms_norm_reference(theirs[0], theirs[2], 1e-6)
    assert y_norm.dtype == y_norm_ref.dtype and _ulps(y_norm, y_norm_ref.detach()) <= 1

    g = _gen(9)
    gs, gy, gn = (torch.randn(5, 37, generator=g).to(t.dtype) for t in (s, y, y_norm))
    for outs, grads in (((s, y, y_norm), (gs, gy, gn)), ((s_ref, y_ref, y_norm_ref), (gs, gy, gn))):
        torch.autograd.backward(list(outs), list(grads))
    s32, y32 = layers.add_rms_norm_reference(*upcast, 1e-6)
    n32 = layers.rms_norm_reference(upcast[0], upcast[2], 1e-6)
    torch.autograd.backward([s32, y32, n32], [gs.float(), gy.float(), gn.float()])
    for a, b, c in zip(ours, theirs, upcast):
        assert a.grad.dtype == b.grad.dtype == a.dtype
        assert _max_rel(a.grad, c.grad) <= 2.0 ** -7


def _profiled_ops(fn):
    """``fn()`` and the ``saferlhf::`` op names it ran (forward and backward), from the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.name for e in prof.events() if e.name.startswith("saferlhf::")}


@needs_rope
@needs_swiglu
@needs_rms
def test_bf16_runs_the_kernels_forward_and_backward(monkeypatch):
    """With bf16 inputs the default backend runs the C++ ops, forward and backward: the profile names them, and the
    torch references, patched to fail, are never called."""
    for name in ("rope_reference", "swiglu_reference", "rms_norm_reference", "add_rms_norm_reference"):
        monkeypatch.setattr(layers, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran"))
    q, k = (_leaf(t, BF16) for t in _rope_inputs(2, 7, 3, 1, 24))
    cos, sin = _tables(2, 7, 24)
    gate, up = (_leaf(t, BF16) for t in _swiglu_inputs((3, 33)))
    x32, w32 = _norm_inputs((3, 33))
    x, w = _leaf(x32, BF16), _leaf(w32, BF16)
    xm, rm, wm = _leaf(x32, BF16), _leaf(x32, torch.float32), _leaf(w32, torch.float32)

    def step():
        q_out, k_out = ops.rope(q, k, cos, sin)
        s, y = ops.add_rms_norm(xm, rm, wm)
        loss = (q_out.float().sum() + k_out.float().sum() + ops.swiglu(gate, up).float().sum()
                + ops.rms_norm(x, w).float().sum() + s.sum() + y.sum())
        loss.backward()

    _, names = _profiled_ops(step)
    for op in ("rope", "swiglu", "rms_norm", "add_rms_norm"):
        assert {f"saferlhf::{op}", f"saferlhf::{op}_forward", f"saferlhf::{op}_backward"} <= names, (op, names)
    for t in (q, k, gate, up, x, w, xm):
        assert t.grad is not None and t.grad.dtype == BF16
    assert rm.grad.dtype == wm.grad.dtype == torch.float32


def test_dtype_mixes_without_a_kernel_take_the_reference():
    """Combinations the kernels do not instantiate (q and k, gate and up, or cos and sin in different dtypes; fp16)
    go to the reference, never to an error, and run no C++ op."""
    q, k = _rope_inputs(2, 5, 2, 1, 16)
    cos, sin = _tables(2, 5, 16)
    gate, up = _swiglu_inputs((3, 20))
    x, w = _norm_inputs((3, 20))
    cases = [
        (lambda: ops.rope(q.bfloat16(), k, cos, sin), lambda: layers.rope_reference(q.bfloat16(), k, cos, sin)),
        (lambda: ops.rope(q, k, cos, sin.bfloat16()), lambda: layers.rope_reference(q, k, cos, sin.bfloat16())),
        (lambda: ops.swiglu(gate.bfloat16(), up), lambda: layers.swiglu_reference(gate.bfloat16(), up)),
        (lambda: ops.rms_norm(x.half(), w), lambda: layers.rms_norm_reference(x.half(), w)),
        (lambda: ops.add_rms_norm(x.half(), x.half(), w),
         lambda: layers.add_rms_norm_reference(x.half(), x.half(), w)),
    ]
    for run, ref in cases:
        got, names = _profiled_ops(run)
        assert not names
        want = ref()
        for a, c in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert a.dtype == c.dtype and torch.equal(a, c)
