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
    assert key in lin._PACKED
    del w
    gc.collect()
    assert key not in lin._PACKED


@needs_onednn
def test_gradient_only_for_what_needs_it(autograd_impl):
    x, w, b = _data(9, 16, 8, True)
    w.requires_grad_(True)  # x and b frozen
    ops.linear(x, w, b).sum().backward()
    assert w.grad is not None and x.grad is None and b.grad is None
    torch.testing.assert_close(w.grad, torch.ones(9, 8).t() @ x, rtol=1e-5, atol=1e-5)


def test_other_dtypes_and_autocast_take_f_linear():
    x, w, b = _data(5, 8, 6, True)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    assert not lin.eligible(xb, wb, bb)
    assert torch.equal(ops.linear(xb, wb, bb), F.linear(xb, wb, bb))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lin.eligible(x, w, b)
        y = ops.linear(x, w, b)
    assert y.dtype == torch.bfloat16  # autocast still applies: the call went to F.linear


def test_backend_choice_and_errors(monkeypatch):
    x, w, b = _data(5, 8, 6, True)
    assert torch.equal(ops.linear(x, w, b, backend="torch"), F.linear(x, w, b))
    with pytest.raises(ValueError, match="unknown linear backend"):
        ops.linear(x, w, b, backend="mkl")
    with pytest.raises(RuntimeError, match="needs fp32 CPU tensors"):
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
