"""Every public op on every available backend against the torch reference (values and gradients).

Backends: ``cpu`` (C++ extension), ``triton`` (interpreter on CPU, real kernels on GPU), ``cuda`` (GPU only).
Shapes stay tiny so the Triton interpreter keeps up; large-vocabulary cases live in the backend-specific tests.
"""
import math

import pytest
import torch

from saferlhf_fast import _backend, ops, settings
from saferlhf_fast.ops import reference as ref


def _backend_params():
    params = []
    for name in ("cpu", "triton"):
        ok, why = _backend.availability(name, "cpu")
        params.append(pytest.param((name, "cpu"), id=f"{name}-cpu", marks=() if ok else pytest.mark.skip(reason=why)))
    for name in ("cuda", "triton"):
        params.append(pytest.param((name, "cuda"), id=f"{name}-cuda", marks=pytest.mark.gpu))
    return params


BACKENDS = _backend_params()


@pytest.fixture(params=BACKENDS)
def backend(request):
    name, device = request.param
    if device == "cuda":
        ok, why = _backend.availability(name, "cuda")
        if not ok:
            pytest.skip(why)
    return name, device


def _mask(b, t, device, kind="var", dtype=torch.bool):
    """Masks with right padding ('var'), left padding ('left'), a fully masked row ('empty') or all ones."""
    lengths = torch.tensor([max(1, t - (i * 3) % (t + 1)) for i in range(b)])
    pos = torch.arange(t)
    if kind == "left":
        m = pos.unsqueeze(0) >= (t - lengths).unsqueeze(1)
    elif kind == "ones":
        m = torch.ones(b, t, dtype=torch.bool)
    else:
        m = pos.unsqueeze(0) < lengths.unsqueeze(1)
    if kind == "empty":
        m[0] = False
    return m.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5)])
@pytest.mark.parametrize("vocab", [1, 33, 130])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gather_logprobs_fp32(backend, shape, vocab, temperature):
    name, device = backend
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(*shape, vocab, generator=g) * 3).to(device).requires_grad_()
    labels = torch.randint(0, vocab, shape, generator=g).to(device)
    labels.view(-1)[0] = ops.IGNORE_INDEX
    logp, ent = ops.gather_logprobs(logits, labels, temperature=temperature, return_entropy=True, backend=name)
    logits_ref = logits.detach().clone().requires_grad_()
    logp_ref, ent_ref = ref.gather_logprobs(logits_ref, labels, temperature=temperature, return_entropy=True)
    assert logp.dtype == torch.float32 and logp.shape == shape
    torch.testing.assert_close(logp, logp_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=1e-5)
    assert logp.view(-1)[0].item() == 0.0 and ent.view(-1)[0].item() == 0.0
    w1, w2 = torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)
    (grad,) = torch.autograd.grad((logp * w1 + ent * w2).sum(), logits)
    (grad_ref,) = torch.autograd.grad((logp_ref * w1 + ent_ref * w2).sum(), logits_ref)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-5)
    assert grad.view(-1, vocab)[0].abs().max().item() == 0.0  # ignored row: no gradient


def test_gather_logprobs_bf16_and_noncontiguous(backend):
    name, device = backend
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(5, 4, 67, generator=g) * 4).to(device)
    logits = base.transpose(0, 1)  # non-contiguous [4, 5, 67]
    labels = torch.randint(0, 67, (4, 5), generator=g).to(device)
    torch.testing.assert_close(
        ops.gather_logprobs(logits, labels, backend=name), ref.gather_logprobs(logits, labels), atol=1e-5, rtol=1e-5
    )
    lb = logits.to(torch.bfloat16).requires_grad_()
    logp = ops.gather_logprobs(lb, labels, backend=name)
    lb_ref = lb.detach().clone().requires_grad_()
    logp_ref = ref.gather_logprobs(lb_ref, labels)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, logp_ref, atol=1e-2, rtol=1e-2)
    logp.sum().backward()
    logp_ref.sum().backward()
    assert lb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(lb.grad.float(), lb_ref.grad.float(), atol=1e-2, rtol=1e-2)


def test_gather_logprobs_rejects_bad_labels(backend):
    name, device = backend
    logits = torch.randn(2, 3, 11, device=device)
    for bad in (11, -1, -7):
        labels = torch.zeros(2, 3, dtype=torch.long, device=device)
        labels[1, 2] = bad
        with pytest.raises(ValueError, match="out of range"):
            ops.gather_logprobs(logits, labels, backend=name)
    with pytest.raises(ValueError, match="temperature"):
        ops.gather_logprobs(logits, torch.zeros(2, 3, dtype=torch.long, device=device), temperature=0.0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_linear_logprobs(backend, dtype, tol, chunk_rows):
    name, device = backend
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 5, 16, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(37, 16, generator=g) * 0.5).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, 37, (2, 5), generator=g).to(device)
    labels[1, 4] = ops.IGNORE_INDEX
    logp, ent = ops.linear_logprobs(
        hidden, weight, labels, temperature=0.9, return_entropy=True, backend=name, chunk_rows=chunk_rows
    )
    h_ref = hidden.detach().clone().requires_grad_()
    w_ref = weight.detach().clone().requires_grad_()
    logp_ref, ent_ref = ref.linear_logprobs(h_ref, w_ref, labels, temperature=0.9, return_entropy=True)
    torch.testing.assert_close(logp, logp_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(ent, ent_ref, atol=tol, rtol=tol)
    w1 = torch.randn(2, 5, generator=g).to(device)
    (logp * w1 - 0.1 * ent).sum().backward()
    (logp_ref * w1 - 0.1 * ent_ref).sum().backward()
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    scale = max(1.0, w_ref.grad.float().abs().max().item())
    torch.testing.assert_close(hidden.grad.float(), h_ref.grad.float(), atol=tol * scale, rtol=tol)
    torch.testing.assert_close(weight.grad.float(), w_ref.grad.float(), atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_linear_logprobs_under_bf16_autocast(chunk_rows):
    """CPU bf16 autocast (``--bf16``): fp32 hidden and master weight are cast to bf16 inside the op, so the result
    and the gradients equal the same op on bf16 copies (the gradients reach the fp32 tensors in fp32), and the
    log-probs stay within bf16 logit rounding of the fp32 ones."""
    from saferlhf_fast.ops.dense import onednn_bf16_available

    if not onednn_bf16_available():
        pytest.skip("oneDNN has no native bf16 matmul here")
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 7, 32, generator=g).requires_grad_()
    weight = (torch.randn(53, 32, generator=g) * 0.3).requires_grad_()
    labels = torch.randint(0, 53, (3, 7), generator=g)
    labels[2, 6] = ops.IGNORE_INDEX
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, ent = ops.linear_logprobs(hidden, weight, labels, return_entropy=True, chunk_rows=chunk_rows)
    hb = hidden.detach().bfloat16().requires_grad_()
    wb = weight.detach().bfloat16().requires_grad_()
    logp_b, ent_b = ops.linear_logprobs(hb, wb, labels, return_entropy=True, chunk_rows=chunk_rows)
    assert logp.dtype == torch.float32 and torch.equal(logp, logp_b) and torch.equal(ent, ent_b)
    w1 = torch.randn(3, 7, generator=g)
    (logp * w1 + 0.1 * ent).sum().backward()
    (logp_b * w1 + 0.1 * ent_b).sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    assert torch.equal(hidden.grad, hb.grad.float()) and torch.equal(weight.grad, wb.grad.float())
    logp32 = ref.linear_logprobs(hidden.detach(), weight.detach(), labels)
    # logits of magnitude ~5 rounded to bf16 (2^-8 relative) move a log-prob by a few hundredths at most
    torch.testing.assert_close(logp.detach(), logp32, atol=5e-2, rtol=0)


# ---------------------------------------------------------------------------------------------- GAE
@pytest.mark.parametrize("t", [1, 9, 70])
@pytest.mark.parametrize("kind", ["var", "left", "empty"])
def test_gae_both_streams_in_one_call(backend, t, kind):
    name, device = backend
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(2, 3, t, generator=g).to(device)
    values = torch.randn(2, 3, t, generator=g).to(device)
    mask = _mask(3, t, device, kind).expand(2, 3, t)
    adv, ret = ops.gae(rewards, values, mask, gamma=1.0, lam=0.95, backend=name)
    adv_ref, ret_ref = ref.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, adv_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, ret_ref, atol=1e-5, rtol=1e-5)
    adv2, _ = ops.gae(rewards, values, mask.float(), gamma=0.99, lam=0.9, backend=name)
    torch.testing.assert_close(adv2, ref.gae(rewards, values, mask, gamma=0.99, lam=0.9)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "mask_shape", [(3, 9), (1, 9), (9,), (2, 1, 9), (2, 3, 9), (1, 3, 9)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64])
def test_gae_mask_broadcast_and_dtypes(backend, mask_shape, mask_dtype):
    # A mask that only broadcasts over leading dims goes to the kernel as it is (row i uses mask row i % M);
    # any other broadcast is expanded first.  Both must give the reference's result, for bool / float / int masks.
    name, device = backend
    g = torch.Generator().manual_seed(11)
    rewards = torch.randn(2, 3, 9, generator=g).to(device)
    values = torch.randn(2, 3, 9, generator=g).to(device)
    mask = (torch.rand(mask_shape, generator=g) > 0.3).to(device)
    if len(mask_shape) >= 2 and mask_shape[-2] == 3:
        mask[..., 1, :] = False  # a fully masked row
    mask = mask.to(mask_dtype)
    adv, ret = ops.gae(rewards, values, mask, gamma=0.99, lam=0.95, backend=name)
    adv_ref, ret_ref = ref.gae(rewards, values, mask.expand(2, 3, 9).float(), gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv, adv_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, ret_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_shape", [(4, 9), (2, 3, 8), (1, 2, 3, 9)])
def test_gae_mask_that_does_not_broadcast_is_an_error(mask_shape):
    rewards = torch.zeros(2, 3, 9)
    with pytest.raises(ValueError, match="does not broadcast"):
        ops.gae(rewards, rewards, torch.ones(mask_shape))


def test_gae_hand_computed():
    # r = [0, 0, 1], V = [0.5, 0.2, 0.1], gamma 1, lam 0.5:
    # delta = [0 + 0.2 - 0.5, 0 + 0.1 - 0.2, 1 + 0 - 0.1] = [-0.3, -0.1, 0.9]
    # A2 = 0.9; A1 = -0.1 + 0.5*0.9 = 0.35; A0 = -0.3 + 0.5*0.35 = -0.125
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.1]])
    for name in _backend.available_backends("cpu"):
        adv, ret = ops.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5, backend=name)
        torch.testing.assert_close(adv, torch.tensor([[-0.125, 0.35, 0.9]]), atol=1e-6, rtol=0)
        torch.testing.assert_close(ret, torch.tensor([[0.375, 0.55, 1.0]]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- rewards
@pytest.mark.parametrize("kind", ["var", "left", "empty"])
def test_kl_penalized_rewards(backend, kind):
    name, device = backend
    g = torch.Generator().manual_seed(4)
    b, t = 4, 9
    reward = (torch.randn(b, generator=g) * 30).to(device)
    cost = (torch.randn(b, generator=g) * 30).to(device)
    logp = torch.randn(b, t, generator=g).to(device)
    ref_logp = torch.randn(b, t, generator=g).to(device)
    mask = _mask(b, t, device, kind)
    r, c = ops.kl_penalized_rewards(reward, cost, logp, ref_logp, mask, kl_coeff=0.5, clip_range_score=20.0,
                                    backend=name)
    r_ref, c_ref = ref.kl_penalized_rewards(reward, cost, logp, ref_logp, mask, kl_coeff=0.5, clip_range_score=20.0)
    torch.testing.assert_close(r, r_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c, c_ref, atol=1e-5, rtol=1e-5)
    if kind == "empty":
        assert r[0].abs().max().item() == 0.0 and c[0].abs().max().item() == 0.0


def test_kl_penalized_rewards_hand_computed():
    # one row, mask [1, 1, 0]: end = 1.  kl = [0.5, -1.0, 3.0], beta 0.1, R = 2, C = -60 (clipped to -50).
    logp = torch.tensor([[0.0, -2.0, 1.0]])
    ref_logp = torch.tensor([[-0.5, -1.0, -2.0]])
    mask = torch.tensor([[1, 1, 0]])
    r, c = ref.kl_penalized_rewards(torch.tensor([2.0]), torch.tensor([-60.0]), logp, ref_logp, mask, kl_coeff=0.1)
    torch.testing.assert_close(r, torch.tensor([[-0.05, 2.1, 0.0]]))
    torch.testing.assert_close(c, torch.tensor([[0.05, -50.0, 0.0]]))


# ---------------------------------------------------------------------------------------------- losses
def _loss_inputs(device, shape=(2, 4, 11), seed=5, kind="var"):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(*shape, generator=g) * 0.5
    logp = old + torch.randn(*shape, generator=g) * 0.3
    flat = logp.view(-1)
    flat[::5] = old.view(-1)[::5]  # rho == 1 exactly: surrogate tie
    flat[1::7] = old.view(-1)[1::7] + math.log(1.2)  # on the clip boundary (up to rounding)
    adv_r = torch.randn(*shape, generator=g)
    adv_c = torch.randn(*shape, generator=g)
    mask = _mask(shape[-2], shape[-1], "cpu", kind).expand(shape)
    return [x.to(device) for x in (logp, old, adv_r, adv_c, mask)]


@pytest.mark.parametrize("kind", ["var", "left", "empty", "ones"])
def test_ppo_actor_losses(backend, kind):
    name, device = backend
    logp, old, adv_r, adv_c, mask = _loss_inputs(device, kind=kind)
    for mask_ in (mask, mask.float()):
        x = logp.clone().requires_grad_()
        x_ref = logp.clone().requires_grad_()
        loss = ops.ppo_actor_loss(x, old, adv_r, mask_, clip_range=0.2, backend=name)
        loss_ref = ref.ppo_actor_loss(x_ref, old, adv_r, mask_, clip_range=0.2)
        torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
        loss.backward()
        loss_ref.backward()
        torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5)
    for lam in (0.0, 1.0, torch.tensor(3.5)):
        x = logp.clone().requires_grad_()
        x_ref = logp.clone().requires_grad_()
        loss = ops.ppo_lag_actor_loss(x, old, adv_r, adv_c, mask, multiplier=lam, clip_range=0.2, backend=name)
        loss_ref = ref.ppo_lag_actor_loss(x_ref, old, adv_r, adv_c, mask, multiplier=lam, clip_range=0.2)
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
        loss.backward()
        loss_ref.backward()
        torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["var", "left", "empty"])
def test_critic_loss(backend, kind):
    name, device = backend
    g = torch.Generator().manual_seed(6)
    shape = (2, 3, 13)
    old = torch.randn(*shape, generator=g) * 4
    values = old + torch.randn(*shape, generator=g) * 6  # many outside the +-5 clip range
    values.view(-1)[::6] = old.view(-1)[::6]  # ties: V == V_old
    returns = torch.randn(*shape, generator=g) * 5
    mask = _mask(3, 13, "cpu", kind).expand(shape)
    values, old, returns, mask = (t.to(device) for t in (values, old, returns, mask))
    v = values.clone().requires_grad_()
    v_ref = values.clone().requires_grad_()
    loss = ops.critic_loss(v, old, returns, mask, clip_range=5.0, backend=name)
    loss_ref = ref.critic_loss(v_ref, old, returns, mask, clip_range=5.0)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    loss.backward()
    loss_ref.backward()
    torch.testing.assert_close(v.grad, v_ref.grad, atol=1e-6, rtol=1e-5)


def test_losses_single_row_t1(backend):
    name, device = backend
    x = torch.tensor([[0.1]], device=device, requires_grad=True)
    loss = ops.ppo_actor_loss(x, torch.zeros(1, 1, device=device), torch.ones(1, 1, device=device),
                              torch.ones(1, 1, device=device), backend=name)
    # rho = e^0.1 = 1.105 inside the clip range: loss = -rho, d/dx = -rho
    torch.testing.assert_close(loss, torch.tensor(-math.exp(0.1), device=device))
    loss.backward()
    torch.testing.assert_close(x.grad, torch.tensor([[-math.exp(0.1)]], device=device))


# ---------------------------------------------------------------------------------------------- reference
def test_reference_ppo_lag_hand_computed():
    # Row 0: mask [1,1,0], Row 1: fully masked (contributes 0 and counts in the batch mean).
    logp = torch.tensor([[0.0, math.log(2.0), 0.0], [0.0, 0.0, 0.0]])
    old = torch.zeros(2, 3)
    adv_r = torch.tensor([[1.0, 3.0, 7.0], [1.0, 1.0, 1.0]])
    adv_c = torch.tensor([[1.0, -1.0, 7.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    # lam = 1: A = (A_r - A_c)/2 = [0, 2]; rho = [1, 2]; t=1: min(2*2, 2*1.2) = 2.4
    # row 0 mean = (0 + 2.4)/2 = 1.2; batch mean = (1.2 + 0)/2 = 0.6; loss = -0.6
    loss = ref.ppo_lag_actor_loss(logp, old, adv_r, adv_c, mask, multiplier=1.0)
    torch.testing.assert_close(loss, torch.tensor(-0.6))
    # critic: V=[3, 0], V_old=[0, 0], G=[0, 1], cv=1: t0 max(9, 1) = 9; t1 max(1, 1) = 1 -> 0.5 * mean(5, 0) = 1.25
    v = torch.tensor([[3.0, 0.0, 9.0], [0.0, 0.0, 0.0]])
    g = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(ref.critic_loss(v, torch.zeros(2, 3), g, mask, clip_range=1.0), torch.tensor(1.25))
    assert ref.masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0


def test_reference_gradcheck_float64():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, ops.IGNORE_INDEX, 5])

    def logp_and_entropy(x):
        logp, ent = ref.gather_logprobs(x, labels, temperature=0.8, return_entropy=True)
        return logp.double(), ent.double()

    # the reference computes in fp32 by design; check its math against a float64 twin, gradchecked
    def f64(x):
        lp = torch.log_softmax(x / 0.8, -1)
        safe = labels.clamp(min=0)
        out = lp.gather(-1, safe[:, None]).squeeze(-1).masked_fill(labels < 0, 0)
        ent = -(lp.exp() * lp).sum(-1)
        return out, ent.masked_fill(labels < 0, 0)

    assert torch.autograd.gradcheck(f64, (logits,))
    lp32, ent32 = logp_and_entropy(logits.detach())
    lp64, ent64 = f64(logits.detach())
    torch.testing.assert_close(lp32, lp64, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent32, ent64, atol=1e-6, rtol=1e-6)

    logp = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    old = torch.randn(2, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(2, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.float64)

    def actor(x):
        ratio = torch.exp(x - old)
        obj = torch.minimum(adv * ratio, adv * ratio.clamp(0.8, 1.2))
        return -ref.masked_mean(obj, mask)

    assert torch.autograd.gradcheck(actor, (logp,))

    values = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)

    def critic(v):
        clipped = torch.clamp(v, old - 0.3, old + 0.3)
        return 0.5 * ref.masked_mean(torch.maximum((v - adv) ** 2, (clipped - adv) ** 2), mask)

    assert torch.autograd.gradcheck(critic, (values,))
    torch.testing.assert_close(
        ref.critic_loss(values.detach(), old, adv, mask, clip_range=0.3), critic(values.detach()).float()
    )


def test_backend_resolution_and_env(monkeypatch):
    x = torch.randn(2, 3, 5)
    y = torch.zeros(2, 3, dtype=torch.long)
    monkeypatch.setenv("SAFERLHF_BACKEND", "torch")
    settings.reload()
    assert _backend.choose("gae", None, x.device) == "torch"
    monkeypatch.setenv("SAFERLHF_BACKEND", "nonsense")
    settings.reload()
    with pytest.raises(ValueError, match=r"unknown gather_logprobs backend 'nonsense' \(\$SAFERLHF_BACKEND\)"):
        ops.gather_logprobs(x, y)
    monkeypatch.delenv("SAFERLHF_BACKEND")
    settings.reload()
    with pytest.raises(RuntimeError, match="gather_logprobs backend 'cuda' needs CUDA tensors"):
        ops.gather_logprobs(x, y, backend="cuda")
