"""Triton kernels (kernels/, shipped as saferlhf_fast.kernels) against the torch reference.

Without a GPU they run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py before
anything imports triton; set here too for a standalone run).  Shapes are tiny: the interpreter block caps (32 over
V, 16 over T) make V = 33 / 130 and T = 70 cross chunk / tile edges all the same.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

triton = pytest.importorskip("triton")

from saferlhf_fast import _backend, ops
from saferlhf_fast.ops import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton kernels on CPU need TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)

K = pytest.importorskip("saferlhf_fast.kernels.launchers")
IGN = ref.IGNORE_INDEX


def _close(a, b, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), atol=atol, rtol=rtol)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _t(x):
    return x.to(DEVICE)


# ----------------------------------------------------------------------------------------------- log-probs
def _logits_labels(n, v, dtype, seed=0, ignore=True):
    g = _gen(seed)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore and n > 1:
        labels[1] = IGN
    return _t(logits), _t(labels)


@pytest.mark.parametrize("v", [1, 7, 33, 130])
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_forward(n, v, dtype):
    logits, labels = _logits_labels(n, v, dtype, seed=n * 1000 + v)
    temperature = 0.7
    for with_entropy in (True, False):
        logp, lse, entropy = K.logprobs_forward(logits, labels, temperature, IGN, with_entropy)
        assert logp.dtype == lse.dtype == entropy.dtype == torch.float32
        rlogp, rent = ref.gather_logprobs(logits, labels, temperature=temperature, return_entropy=True)
        _close(logp, rlogp)
        _close(lse, torch.logsumexp(logits.float() / temperature, -1))
        _close(entropy, rent if with_entropy else torch.zeros_like(rent))
    if n > 1:  # ignored row
        assert logp[1].item() == 0.0 and entropy[1].item() == 0.0


def test_logprobs_forward_strided_fp16_and_extremes():
    g = _gen(3)
    base = torch.randn(4, 200, generator=g) * 4
    base[0, 5] = 80.0  # near one-hot row: entropy ~ 0
    base[2, :] = -30.0  # uniform row
    logits = _t(base.to(torch.float16))[:, 10:150]  # row stride 200, V = 140
    assert logits.stride() == (200, 1)
    labels = _t(torch.tensor([0, 3, IGN, 139]))
    logp, lse, entropy = K.logprobs_forward(logits, labels, 1.0, IGN, True)
    rlogp, rent = ref.gather_logprobs(logits, labels, return_entropy=True)
    _close(logp, rlogp, atol=1e-5)
    _close(entropy, rent, atol=1e-5)
    _close(lse, torch.logsumexp(logits.float(), -1))
    # backward from the strided logits into a contiguous gradient (what empty_like gives the dispatcher)
    g_logp = _t(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    K.logprobs_backward(g_logp, None, logits, labels, lse, entropy, 1.0, IGN, grad)
    _close(grad, _ref_logits_grad(logits, labels, 1.0, g_logp, None), atol=1e-3, rtol=1e-2)


def _ref_logits_grad(logits, labels, temperature, g_logp, g_ent):
    x = logits.detach().float().requires_grad_(True)
    logp, ent = ref.gather_logprobs(x, labels, temperature=temperature, return_entropy=True)
    out = (logp * g_logp).sum()
    if g_ent is not None:
        out = out + (ent * g_ent).sum()
    (grad,) = torch.autograd.grad(out, x)
    return grad


@pytest.mark.parametrize("v", [1, 7, 33, 130])
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_backward(n, v, dtype):
    logits, labels = _logits_labels(n, v, dtype, seed=7 * n + v)
    temperature = 1.3
    g = _gen(n + v)
    g_logp = _t(torch.randn(n, generator=g))
    g_ent = _t(torch.randn(n, generator=g))
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    _, lse, entropy = K.logprobs_forward(logits, labels, temperature, IGN, True)
    for ge in (None, g_ent):
        want = _ref_logits_grad(logits, labels, temperature, g_logp, ge)
        grad = torch.full_like(logits, float("nan"))
        assert K.logprobs_backward(g_logp, ge, logits, labels, lse, entropy, temperature, IGN, grad) is None
        assert grad.dtype == logits.dtype
        _close(grad, want, atol=atol, rtol=1e-2 if dtype != torch.float32 else 1e-5)
        if n > 1:
            assert bool((grad[1] == 0).all())
        # in place: grad_logits is logits itself
        inplace = logits.clone()
        K.logprobs_backward(g_logp, ge, inplace, labels, lse, entropy, temperature, IGN, inplace)
        assert torch.equal(inplace, grad)


# ----------------------------------------------------------------------------------------------- GAE
def _gae_inputs(r, t, seed=0):
    g = _gen(seed)
    rewards = torch.randn(r, t, generator=g)
    values = torch.randn(r, t, generator=g)
    mask = (torch.rand(r, t, generator=g) > 0.2).float()
    if r > 1:
        mask[1] = 0.0  # fully masked row
    if r > 2 and t > 3:
        mask[2, : t // 2] = 0.0  # left padding
        mask[2, t // 2 :] = 1.0
    return _t(rewards), _t(values), _t(mask)


@pytest.mark.parametrize("t", [1, 9, 70])
@pytest.mark.parametrize("r", [1, 5])
def test_gae_forward(r, t):
    rewards, values, mask = _gae_inputs(r, t, seed=r * 100 + t)
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (0.99, 0.0)):
        adv, ret = K.gae_forward(rewards, values, mask, gamma, lam)
        radv, rret = ref.gae(rewards, values, mask, gamma=gamma, lam=lam)
        _close(adv, radv)
        _close(ret, rret)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_gae_forward_shared_mask_rows(mask_dtype):
    # 6 rows sharing a [3, T] mask (row i reads mask row i % 3), as the stacked reward + cost streams do.
    rewards, values, mask = _gae_inputs(6, 21, seed=9)
    mask = mask[:3].contiguous()
    adv, ret = K.gae_forward(rewards, values, mask.to(mask_dtype), 0.99, 0.95)
    radv, rret = ref.gae(rewards, values, mask.repeat(2, 1), gamma=0.99, lam=0.95)
    _close(adv, radv)
    _close(ret, rret)


def test_gae_forward_long_rows():
    # T = 2048: 128 interpreter tiles (2 GPU tiles) of carried scan; gamma = lam = 1 sums every delta.
    rewards, values, mask = _gae_inputs(2, 2048, seed=5)
    for gamma, lam in ((1.0, 0.95), (1.0, 1.0)):
        adv, ret = K.gae_forward(rewards, values, mask, gamma, lam)
        radv, rret = ref.gae(rewards, values, mask, gamma=gamma, lam=lam)
        scale = max(1.0, radv.abs().max().item())
        _close(adv, radv, atol=1e-5 * scale, rtol=1e-5)
        _close(ret, rret, atol=1e-5 * scale, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- losses
def _loss_inputs(r, t, seed=0):
    g = _gen(seed)
    lp = -torch.rand(r, t, generator=g) * 3
    old = lp + torch.randn(r, t, generator=g) * 0.3
    old[:, ::3] = lp[:, ::3]  # rho == 1 exactly: s1 == s2 ties inside the range
    adv_r = torch.randn(r, t, generator=g)
    adv_c = torch.randn(r, t, generator=g)
    adv_r[:, 1::5] = 0.0  # A == 0: s1 == s2 == 0 ties, also outside the range
    mask = (torch.rand(r, t, generator=g) > 0.25).float()
    if r > 1:
        mask[1] = 0.0
    return [_t(x) for x in (lp, old, adv_r, adv_c, mask)]


@pytest.mark.parametrize("t", [1, 9, 70])
@pytest.mark.parametrize("r", [1, 5])
@pytest.mark.parametrize("with_cost", [False, True])
def test_ppo_clip_objective(r, t, with_cost):
    lp, old, adv_r, adv_c, mask = _loss_inputs(r, t, seed=r * 31 + t)
    lam, eps = (0.7, 0.2)
    row_loss, grad = K.ppo_clip_objective(lp, old, adv_r, adv_c if with_cost else None, mask, lam, eps)
    x = lp.clone().requires_grad_(True)
    adv = ref.lagrangian_advantages(adv_r, adv_c, lam) if with_cost else adv_r
    want = -ref.row_mean(ref.ppo_objective(x, old, adv, eps), mask)
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    _close(row_loss, want.detach())
    _close(grad, want_grad)
    if r > 1:
        assert row_loss[1].item() == 0.0 and bool((grad[1] == 0).all())


@pytest.mark.parametrize("t", [1, 9, 70])
@pytest.mark.parametrize("r", [1, 5])
def test_clipped_value_objective(r, t):
    g = _gen(r * 17 + t)
    cv = 0.5
    old = torch.randn(r, t, generator=g)
    values = old + torch.randn(r, t, generator=g)
    returns = torch.randn(r, t, generator=g)
    values[:, ::4] = old[:, ::4]  # inside the range: l1 == l2 ties
    # outside the range with l1 == l2: old = 0, v = 3*cv, G = 2*cv -> vc = cv, (v-G)^2 == (vc-G)^2
    old[:, 2::5], values[:, 2::5], returns[:, 2::5] = 0.0, 3 * cv, 2 * cv
    mask = (torch.rand(r, t, generator=g) > 0.25).float()
    if r > 1:
        mask[1] = 0.0
    old, values, returns, mask = (_t(x) for x in (old, values, returns, mask))
    row_loss, grad = K.clipped_value_objective(values, old, returns, mask, cv)
    x = values.clone().requires_grad_(True)
    want = 0.5 * ref.row_mean(ref.critic_objective(x, old, returns, cv), mask)
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    _close(row_loss, want.detach())
    _close(grad, want_grad)


@pytest.mark.parametrize("t", [1, 9, 70])
@pytest.mark.parametrize("r", [1, 5])
def test_kl_penalized_rewards(r, t):
    g = _gen(r * 13 + t)
    reward = torch.randn(r, generator=g) * 10
    cost = torch.randn(r, generator=g) * 10
    lp = -torch.rand(r, t, generator=g) * 3
    rlp = -torch.rand(r, t, generator=g) * 3
    mask = (torch.rand(r, t, generator=g) > 0.3).float()
    if r > 1:
        mask[1] = 0.0  # no end: all zeros
    if r > 2:
        reward[2] = 100.0  # clipped at the end token
    args = [_t(x) for x in (reward, cost, lp, rlp, mask)]
    rewards, costs = K.kl_penalized_rewards(*args, 0.1, 5.0)
    want_r, want_c = ref.kl_penalized_rewards(*args, kl_coeff=0.1, clip_range_score=5.0)
    _close(rewards, want_r)
    _close(costs, want_c)


# ----------------------------------------------------------------------------------------------- public API
def test_backend_is_available():
    ok, why = _backend.availability("triton", DEVICE)
    assert ok, why


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_api_gather_logprobs(dtype):
    g = _gen(11)
    logits = _t((torch.randn(2, 3, 37, generator=g) * 2).to(dtype))
    labels = _t(torch.randint(0, 37, (2, 3), generator=g))
    labels[0, 1] = IGN
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    outs, grads = [], []
    for backend in ("triton", "torch"):
        x = logits.clone().requires_grad_(True)
        logp, ent = ops.gather_logprobs(x, labels, temperature=0.8, return_entropy=True, backend=backend)
        (logp.sum() * 0.5 + (ent * torch.arange(3.0, device=DEVICE)).sum()).backward()
        outs.append((logp, ent))
        grads.append(x.grad)
    _close(outs[0][0], outs[1][0])
    _close(outs[0][1], outs[1][1])
    _close(grads[0], grads[1], atol=atol, rtol=1e-2 if dtype != torch.float32 else 1e-5)


def test_api_linear_logprobs():
    g = _gen(12)
    hidden = _t(torch.randn(2, 5, 8, generator=g))
    weight = _t(torch.randn(33, 8, generator=g) * 0.5)
    labels = _t(torch.randint(0, 33, (2, 5), generator=g))
    labels[1, 4] = IGN
    res = []
    for backend, kw in (("triton", {"chunk_rows": 3}), ("torch", {})):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        logp, ent = ops.linear_logprobs(h, w, labels, return_entropy=True, backend=backend, **kw)
        (logp.sum() - 0.3 * ent.sum()).backward()
        res.append((logp, ent, h.grad, w.grad))
    for a, b in zip(*res):
        _close(a, b, atol=1e-5, rtol=1e-4)


def test_api_gae_two_streams():
    rewards, values, mask = _gae_inputs(6, 70, seed=21)
    rewards, values = rewards.view(2, 3, 70), values.view(2, 3, 70)
    mask = mask[:3]  # [B, T] broadcast over both streams
    a_t, r_t = ops.gae(rewards, values, mask, gamma=0.99, lam=0.95, backend="triton")
    a_r, r_r = ops.gae(rewards, values, mask, gamma=0.99, lam=0.95, backend="torch")
    assert a_t.shape == (2, 3, 70)
    _close(a_t, a_r)
    _close(r_t, r_r)


def _api_loss_grad(fn, x, *args, **kw):
    x = x.clone().requires_grad_(True)
    loss = fn(x, *args, **kw)
    loss.backward()
    return loss.detach(), x.grad


def test_api_losses():
    lp, old, adv_r, adv_c, mask = _loss_inputs(6, 70, seed=99)
    lp, old, adv_r, adv_c, mask = (x.view(2, 3, 70) for x in (lp, old, adv_r, adv_c, mask))
    cases = [
        (ops.ppo_actor_loss, lp, (old, adv_r, mask), {"clip_range": 0.2}),
        (ops.ppo_lag_actor_loss, lp, (old, adv_r, adv_c, mask), {"multiplier": torch.tensor(1.5), "clip_range": 0.2}),
        (ops.critic_loss, adv_c, (adv_c + 0.3 * adv_r, adv_r, mask), {"clip_range": 0.25}),
    ]
    for fn, x, args, kw in cases:
        loss_t, grad_t = _api_loss_grad(fn, x, *args, backend="triton", **kw)
        loss_r, grad_r = _api_loss_grad(fn, x, *args, backend="torch", **kw)
        _close(loss_t, loss_r)
        _close(grad_t, grad_r, atol=1e-6)


def test_api_kl_penalized_rewards():
    g = _gen(5)
    reward, cost = _t(torch.randn(4, generator=g)), _t(torch.randn(4, generator=g))
    lp, rlp = _t(-torch.rand(4, 70, generator=g)), _t(-torch.rand(4, 70, generator=g))
    mask = _t((torch.rand(4, 70, generator=g) > 0.2).float())
    mask[3] = 0
    got = ops.kl_penalized_rewards(reward, cost, lp, rlp, mask, kl_coeff=0.05, backend="triton")
    want = ops.kl_penalized_rewards(reward, cost, lp, rlp, mask, kl_coeff=0.05, backend="torch")
    _close(got[0], want[0])
    _close(got[1], want[1])


def test_empty_inputs():
    labels = _t(torch.zeros(0, dtype=torch.long))
    logp, lse, ent = K.logprobs_forward(_t(torch.zeros(0, 5)), labels, 1.0, IGN, True)
    assert logp.shape == lse.shape == ent.shape == (0,)
    z = _t(torch.zeros(0, 4))
    row_loss, grad = K.ppo_clip_objective(z, z, z, None, z, 0.0, 0.2)
    assert row_loss.shape == (0,) and grad.shape == (0, 4)
    adv, ret = K.gae_forward(z, z, z, 1.0, 0.95)
    assert adv.shape == ret.shape == (0, 4)
