"""ops.linear (ops/dense.py): oneDNN projections (CPU fp32) against F.linear, gradients against fp64, the
frozen-weight packing."""
import pytest
import torch
import torch.nn.functional as F

from saferlhf_fast import _backend, ops, settings
from saferlhf_fast.ops import dense as lin

needs_onednn = pytest.mark.skipif(not lin.onednn_available(), reason="this torch has no oneDNN linear op")


@pytest.fixture
def autograd_impl():
    """The C++ autograd node (saferlhf::onednn_linear), which ``ops.linear`` takes whenever the extension loads."""
    if not _backend.has_op("onednn_linear"):
        pytest.skip("the compiled extension has no saferlhf::onednn_linear")


def _data(m, k, n, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    b = torch.randn(n, generator=g) if bias else None
    return x, w, b


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 8, 3), (37, 24, 40), (130, 256, 688)])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_gradients_match_fp64(shape, bias, autograd_impl):
    x, w, b = _data(*shape, bias)
    x.requires_grad_(True)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    y = ops.linear(x, w, b, backend="onednn")
    g = torch.randn_like(y)
    y.backward(g)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    b64 = None if b is None else b.detach().double().requires_grad_(True)
    y64 = F.linear(x64, w64, b64)
    y64.backward(g.double())
    tol = 2e-5 * shape[1] ** 0.5
    assert float((y.detach().double() - y64).abs().max()) <= tol
    assert float((x.grad.double() - x64.grad).abs().max()) <= tol
    assert float((w.grad.double() - w64.grad).abs().max()) <= 2e-5 * shape[0] ** 0.5 * 4
    if b is not None:
        assert float((b.grad.double() - b64.grad).abs().max()) <= 1e-4


@needs_onednn
def test_leading_dims_and_strided_input(autograd_impl):
    x, w, b = _data(6 * 5, 16, 12, True)
    x3 = x.view(6, 5, 16).transpose(0, 1).requires_grad_(True)  # not contiguous
    y = ops.linear(x3, w, b, backend="onednn")
    assert y.shape == (5, 6, 12)
    torch.testing.assert_close(y, F.linear(x3, w, b), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x3, g)
    torch.testing.assert_close(dx, g @ w, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_frozen_weight_with_trainable_input(autograd_impl):
    """A frozen weight multiplies in its packed copy; the input gradient still uses the plain weight."""
    x, w, _ = _data(12, 32, 20, False, seed=5)
    x.requires_grad_(True)
    y = ops.linear(x, w)
    y.sum().backward()
    assert w.grad is None
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, torch.ones(12, 20) @ w, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_frozen_weight_is_packed_once_and_repacked_after_an_update():
    x, w, _ = _data(20, 32, 24, False)
    w.requires_grad_(False)
    y0 = ops.linear(x, w)
    packed = lin.packed_weight(w)
    assert lin.packed_weight(w) is packed  # cached while the weight is unchanged
    with torch.no_grad():
        w.mul_(2.0)  # in place: the version counter moves, the cache must not serve the old weights
    y1 = ops.linear(x, w)
    torch.testing.assert_close(y1, 2.0 * y0, rtol=1e-5, atol=1e-5)
    assert lin.packed_weight(w) is not packed


@needs_onednn
def test_packed_copy_is_dropped_with_its_weight():
    import gc

    _, w, _ = _data(4, 8, 8, False)
    lin.packed_weight(w)
    key = id(w)
    assert key in lin.packed_weight.entries
    del w
    gc.collect()
    assert key not in lin.packed_weight.entries


@needs_onednn
def test_gradient_only_for_what_needs_it(autograd_impl):
    x, w, b = _data(9, 16, 8, True)
    w.requires_grad_(True)  # x and b frozen
    ops.linear(x, w, b).sum().backward()
    assert w.grad is not None and x.grad is None and b.grad is None
    torch.testing.assert_close(w.grad, torch.ones(9, 8).t() @ x, rtol=1e-5, atol=1e-5)


def test_other_dtypes_and_fp16_autocast_take_f_linear():
    x, w, b = _data(5, 8, 6, True)
    xh, wh, bh = x.half(), w.half(), b.half()
    assert not lin.eligible(xh, wh, bh)
    assert torch.equal(ops.linear(xh, wh, bh), F.linear(xh, wh, bh))
    with torch.autocast("cpu", dtype=torch.float16):
        assert not lin.eligible(x, w, b)
        y = ops.linear(x, w, b)
    assert y.dtype == torch.float16  # autocast still applies: the call went to F.linear


needs_bf16 = pytest.mark.skipif(not lin.onednn_bf16_available(), reason="oneDNN has no native bf16 matmul here")


def _bf16_reference(x, w, b):
    """fp64 product of the bf16-rounded operands: what a bf16 matmul with fp32 accumulation approximates."""
    y = x.bfloat16().double() @ w.bfloat16().double().t()
    return y if b is None else y + b.bfloat16().double()


@needs_onednn
@needs_bf16
@pytest.mark.parametrize("shape", [(1, 8, 3), (37, 24, 40), (130, 256, 688)])
def test_bf16_operands_take_onednn(shape, autograd_impl, monkeypatch):
    x, w, b = _data(*shape, True)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    assert lin.eligible(xb, wb, bb)
    monkeypatch.setattr(lin.F, "linear", lambda *a: pytest.fail("F.linear ran"))
    y = ops.linear(xb, wb, bb)
    assert y.dtype == torch.bfloat16
    # fp32 accumulation, one rounding to bf16 (plus the bias add's): within 2 bf16 ulp of the exact product
    torch.testing.assert_close(y.double(), _bf16_reference(x, w, b), rtol=2 ** -7, atol=1e-6)


@needs_onednn
@needs_bf16
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_autocast_keeps_fp32_masters_and_gradients(bias, autograd_impl, monkeypatch):
    """Under CPU bf16 autocast a trainable fp32 weight is cast per call inside the graph: the output is bf16, the
    gradients reach x, W and b in their own fp32, and equal the fp64 gradients of the bf16-rounded operands to
    bf16 rounding (the gradient products round their outputs to bf16)."""
    x, w, b = _data(67, 96, 80, bias)
    x.requires_grad_(True)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    monkeypatch.setattr(lin.F, "linear", lambda *a: pytest.fail("F.linear ran"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.linear(x, w, b)
    assert y.dtype == torch.bfloat16
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).bfloat16()
    y.backward(g)
    assert x.grad.dtype == w.grad.dtype == torch.float32
    x64 = x.detach().bfloat16().double().requires_grad_(True)
    w64 = w.detach().bfloat16().double().requires_grad_(True)
    b64 = None if b is None else b.detach().bfloat16().double().requires_grad_(True)
    y64 = x64 @ w64.t() + (0 if b64 is None else b64)
    y64.backward(g.double())
    torch.testing.assert_close(y.double(), y64, rtol=2 ** -7, atol=1e-6)
    for got, want in ((x.grad, x64.grad), (w.grad, w64.grad), *(((b.grad, b64.grad),) if bias else ())):
        torch.testing.assert_close(got.double(), want, rtol=2 ** -7, atol=want.abs().max().item() * 2 ** -7)


@needs_onednn
@needs_bf16
def test_bf16_autocast_caches_the_copy_of_a_frozen_weight(autograd_impl):
    x, w, _ = _data(9, 32, 16, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y0 = ops.linear(x, w)
        copy = lin._bf16_copy(w)
        assert copy.dtype == torch.bfloat16 and lin._bf16_copy(w) is copy
        torch.testing.assert_close(y0.double(), _bf16_reference(x, w, None), rtol=2 ** -7, atol=1e-6)
        with torch.no_grad():
            w.mul_(2.0)  # a changed weight is cast (and packed) again
        y1 = ops.linear(x, w)
    assert lin._bf16_copy(w) is not copy
    torch.testing.assert_close(y1.float(), 2.0 * y0.float(), rtol=2 ** -7, atol=1e-5)


def test_backend_choice_and_errors(monkeypatch):
    x, w, b = _data(5, 8, 6, True)
    assert torch.equal(ops.linear(x, w, b, backend="torch"), F.linear(x, w, b))
    with pytest.raises(ValueError, match="unknown linear backend"):
        ops.linear(x, w, b, backend="mkl")
    with pytest.raises(RuntimeError, match="needs fp32 or bf16 CPU tensors"):
        ops.linear(x.double(), w.double(), b.double(), backend="onednn")
    monkeypatch.setenv(lin.ENV_VAR, "0")
    settings.reload()
    assert not lin.eligible(x, w, b)


def test_without_the_extension_onednn_by_name_is_an_error(monkeypatch):
    monkeypatch.setattr(_backend, "has_op", lambda name: False)
    monkeypatch.setattr(_backend, "_EXTENSION", (None, "no _C here (test)"))
    x, w, b = _data(5, 8, 6, True)
    assert torch.equal(ops.linear(x, w, b), F.linear(x, w, b))  # the default: the reference
    if lin.eligible(x, w, b):
        with pytest.raises(RuntimeError, match=r"'onednn' needs the compiled extension: no _C here \(test\)"):
            ops.linear(x, w, b, backend="onednn")


@needs_onednn
def test_model_outputs_and_gradients_agree_with_f_linear(monkeypatch):
    from saferlhf_fast.models.llama import LlamaForCausalLM, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, qkv_bias=True)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 64, (3, 11))

    def run():
        model.zero_grad(set_to_none=True)
        lp = model.token_logprobs(ids)
        lp.sum().backward()
        return lp.detach(), [p.grad.clone() for p in model.parameters()]

    lp1, g1 = run()
    with settings.override(onednn_linear=False):
        lp0, g0 = run()
    assert float((lp1 - lp0).abs().max()) <= 1e-5
    for a, c in zip(g1, g0):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not _backend.has_op("transpose_2d"),
                    reason="the compiled extension has no saferlhf::transpose_2d")
@pytest.mark.parametrize("shape", [(1, 1), (16, 16), (17, 33), (640, 256), (5, 300), (129, 130), (0, 7)])
def test_transpose_2d_is_an_exact_transposed_copy(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    y = torch.ops.saferlhf.transpose_2d(x)
    assert y.is_contiguous() and torch.equal(y, x.t())
    strided = torch.randn(shape[0], shape[1] + 9)[:, 4:4 + shape[1]]  # row stride != width
    assert torch.equal(torch.ops.saferlhf.transpose_2d(strided), strided.t())


@needs_onednn
@pytest.mark.parametrize("m,n,k", [(640, 256, 128), (33, 17, 40), (1, 5, 3)])
def test_matmul_tn_matches_mm(m, n, k):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(m, n, generator=g), torch.randn(m, k, generator=g)
    out = lin.matmul_tn(a, b)
    assert out.shape == (n, k)
    ref = a.double().t() @ b.double()
    assert float((out.double() - ref).abs().max()) <= 2e-5 * m ** 0.5 * 4
