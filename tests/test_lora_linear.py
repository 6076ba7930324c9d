"""``ops.lora_linear``: the LoRA projection in one autograd node equals PEFT's composition (fp64 reference) in
value and in every gradient, at odd shapes, with and without bias; what it cannot take falls back to the
composition (dropout, bf16 autocast, a trainable base)."""
import pytest
import torch

from saferlhf_fast import ops
from saferlhf_fast.ops import dense, lora

pytestmark = pytest.mark.skipif(not dense.onednn_available(), reason="needs a torch with oneDNN")


def _operands(shape, k, n, r, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, k, generator=g).requires_grad_()
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    a = (torch.randn(r, k, generator=g) / k**0.5).requires_grad_()
    bb = (torch.randn(n, r, generator=g) * 0.5).requires_grad_()
    return x, w, b, a, bb


def _grads(y, inputs, seed=1):
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)  # the same dy in fp64
    return torch.autograd.grad(y, inputs, dy)


@pytest.mark.parametrize("shape,k,n,r", [((7,), 33, 19, 1), ((3, 5), 64, 96, 8), ((2, 13), 40, 72, 5)])
@pytest.mark.parametrize("bias", [False, True])
def test_one_node_equals_the_composition(shape, k, n, r, bias):
    x, w, b, a, bb = _operands(shape, k, n, r, bias)
    s = 16.0 / r
    assert lora.fused_eligible(x, w, b, a, bb, 0.0)
    y = ops.lora_linear(x, w, b, a, bb, s)
    assert type(y.grad_fn).__name__ == "_LoraLinearBackward"  # one node, not the composition's five
    got = _grads(y, (x, a, bb))
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, bb))
    y64 = ops.reference.lora_linear(x64, w.double(), None if b is None else b.double(), a64, b64, s)
    want = _grads(y64, (x64, a64, b64))
    assert (y.detach().double() - y64.detach()).abs().max() <= 1e-4 * max(1.0, y64.abs().max().item())
    for name, gv, wv in zip(("dx", "dA", "dB"), got, want):
        err = (gv.double() - wv).abs().max().item()
        assert err <= 1e-4 * max(1.0, wv.abs().max().item()), (name, err)


def test_fresh_adapter_is_the_base_projection_bit_for_bit():
    """B = 0 (PEFT's initialisation): the one-node output equals ops.linear's exactly."""
    x, w, b, a, bb = _operands((4, 6), 48, 40, 4, True)
    with torch.no_grad():
        bb.zero_()
    assert torch.equal(ops.lora_linear(x, w, b, a, bb, 2.0), ops.linear(x, w, b))


def test_what_it_cannot_take_falls_back_to_the_composition():
    x, w, b, a, bb = _operands((3, 4), 32, 24, 4, True)
    assert not lora.fused_eligible(x, w.requires_grad_(), b, a, bb, 0.0)  # a trainable base
    w.requires_grad_(False)
    assert not lora.fused_eligible(x, w, b, a, bb, 0.1)  # adapter dropout
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lora.fused_eligible(x, w, b, a, bb, 0.0)  # bf16 autocast: the composition computes in bf16
    drop = torch.nn.Dropout(0.5).train()
    torch.manual_seed(0)
    y = ops.lora_linear(x, w, b, a, bb, 2.0, drop)
    torch.manual_seed(0)
    want = ops.reference.lora_linear(x, w, b, a, bb, 2.0, x_adapter=drop(x), base=ops.linear)
    assert torch.equal(y, want)
    assert type(y.grad_fn).__name__ != "_LoraLinearBackward"
