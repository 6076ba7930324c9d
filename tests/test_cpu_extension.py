"""The C++ CPU kernels called directly as torch ops (``torch.ops.saferlhf.*``) against ``ops.reference``.

Covers the low-level contract of docs/kernels.md: edge shapes (N = 1, T = 1, V = 1, V = 32003), fp32 / bf16 / fp16
logits, arbitrary row stride, ignore_index rows, fully masked rows, exact ties of the loss gradients, in-place
backward, multi-threaded row splits, and the argument checks.  The public ops on every backend are tested in
tests/test_ops.py.
"""
import pytest
import torch

from saferlhf_fast import _backend
from saferlhf_fast.ops import reference as ref

_EXT, _WHY = _backend.extension()
pytestmark = pytest.mark.skipif(_EXT is None, reason=_WHY or "extension not built")

IGNORE = -100
# Gradient tolerance for low-precision logits: the kernel rounds an fp32 gradient once, the reference rounds too,
# so they differ by at most about one unit in the last place of the output dtype.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def ops():
    return torch.ops.saferlhf


def _logits(n, v, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * scale).to(dtype)


def _labels(n, v, seed=0, ignore_every=3):
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        y[1::ignore_every] = IGNORE
    return y


def _reference(x, y, temperature, gl, ge):
    xr = x.detach().clone().requires_grad_()
    logp, entropy = ref.gather_logprobs(xr, y, temperature=temperature, return_entropy=True)
    loss = (logp * gl).sum() + ((entropy * ge).sum() if ge is not None else 0.0)
    (grad,) = torch.autograd.grad(loss, xr)
    lse = torch.logsumexp(x.float() / temperature, -1)
    return logp.detach(), lse, entropy.detach(), grad


# ---------------------------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (4, 1), (3, 7), (6, 33), (5, 257), (4, 1000), (3, 32003)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_forward_backward(dtype, shape, temperature):
    n, v = shape
    x, y = _logits(n, v, dtype), _labels(n, v)
    g = torch.Generator().manual_seed(5)
    gl, ge = torch.randn(n, generator=g), torch.randn(n, generator=g)
    logp, lse, entropy = ops().logprobs_forward(x, y, temperature, IGNORE, True)
    r_logp, r_lse, r_entropy, _ = _reference(x, y, temperature, gl, ge)
    assert logp.dtype == lse.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp, r_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, r_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, r_entropy, atol=1e-5, rtol=1e-5)

    logp2, lse2, entropy2 = ops().logprobs_forward(x, y, temperature, IGNORE, False)
    assert torch.equal(logp2, logp) and torch.equal(lse2, lse)
    assert not entropy2.any()

    for grad_entropy in (ge, None):
        *_, r_grad = _reference(x, y, temperature, gl, grad_entropy)
        grad = torch.full_like(x, float("nan"))
        ops().logprobs_backward(gl, grad_entropy, x, y, lse, entropy, temperature, IGNORE, grad)
        assert grad.dtype == dtype
        scale = r_grad.float().abs().amax(-1, keepdim=True).clamp_min(1e-3)
        torch.testing.assert_close(grad.float() / scale, r_grad.float() / scale, atol=GRAD_RTOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_backward_in_place_matches_out_of_place(dtype):
    x, y = _logits(9, 1031, dtype), _labels(9, 1031)
    gl, ge = torch.randn(9), torch.randn(9)
    logp, lse, entropy = ops().logprobs_forward(x, y, 0.9, IGNORE, True)
    out = torch.empty_like(x)
    ops().logprobs_backward(gl, ge, x, y, lse, entropy, 0.9, IGNORE, out)
    x_inplace = x.clone()
    ops().logprobs_backward(gl, ge, x_inplace, y, lse, entropy, 0.9, IGNORE, x_inplace)
    assert torch.equal(x_inplace, out)


def test_bf16_gradient_is_rounded_to_nearest_even():
    """The bf16 gradient is the fp32 gradient rounded once: equal to the reference's rounding almost everywhere
    (an fp32 difference of an ulp may flip a rounding tie), never more than one bf16 ulp away."""
    x, y = _logits(16, 4099, torch.bfloat16), _labels(16, 4099, ignore_every=0)
    gl = torch.randn(16)
    logp, lse, entropy = ops().logprobs_forward(x, y, 1.0, IGNORE, False)
    grad = torch.empty_like(x)
    ops().logprobs_backward(gl, None, x, y, lse, entropy, 1.0, IGNORE, grad)
    *_, r_grad = _reference(x, y, 1.0, gl, None)
    want = r_grad.float().to(torch.bfloat16)
    assert (grad == want).float().mean() > 0.999
    ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(1e-30)
    assert ((grad.float() - want.float()).abs() <= ulp).all()


def test_logprobs_row_stride():
    """Rows may be a column slice of a wider buffer (stride(0) > V); the padding is never read."""
    wide = _logits(7, 64, torch.float32)
    wide[:, 50:] = float("nan")
    x, y = wide[:, :50], _labels(7, 50)
    assert x.stride() == (64, 1)
    logp, lse, entropy = ops().logprobs_forward(x, y, 1.0, IGNORE, True)
    c_logp, c_lse, c_entropy = ops().logprobs_forward(x.contiguous(), y, 1.0, IGNORE, True)
    assert torch.equal(logp, c_logp) and torch.equal(lse, c_lse) and torch.equal(entropy, c_entropy)
    gl = torch.randn(7)
    grad_wide = torch.zeros(7, 64)
    ops().logprobs_backward(gl, None, x, y, lse, entropy, 1.0, IGNORE, grad_wide[:, :50])
    grad = torch.empty(7, 50)
    ops().logprobs_backward(gl, None, x.contiguous(), y, lse, entropy, 1.0, IGNORE, grad)
    assert torch.equal(grad_wide[:, :50], grad)
    assert not grad_wide[:, 50:].any()


def test_ignored_rows():
    x = _logits(4, 300, torch.float32)
    y = torch.full((4,), IGNORE)
    y[2] = 17
    logp, lse, entropy = ops().logprobs_forward(x, y, 1.0, IGNORE, True)
    mask = y == IGNORE
    assert not logp[mask].any() and not entropy[mask].any()
    torch.testing.assert_close(lse, torch.logsumexp(x, -1))  # lse is the row's logsumexp regardless
    grad = torch.full_like(x, 7.0)
    ops().logprobs_backward(torch.ones(4), torch.ones(4), x, y, lse, entropy, 1.0, IGNORE, grad)
    assert not grad[mask].any() and grad[2].abs().sum() > 0
    # any ignore_index value works
    logp_custom, *_ = ops().logprobs_forward(x, torch.tensor([5, -1, 6, -1]), 1.0, -1, True)
    assert logp_custom[1] == 0 and logp_custom[3] == 0 and logp_custom[0] != 0


def test_masked_vocabulary_entries():
    """-inf logits (masked tokens) get probability 0 and gradient 0; other entries are unaffected."""
    x = _logits(3, 100, torch.float32)
    x[:, ::4] = float("-inf")
    y = torch.tensor([1, 2, 3])
    logp, lse, entropy = ops().logprobs_forward(x, y, 1.0, IGNORE, True)
    r_logp = torch.log_softmax(x, -1).gather(-1, y[:, None]).squeeze(-1)
    p = torch.softmax(x, -1)
    r_entropy = -(p * torch.log_softmax(x, -1)).nan_to_num(0.0).sum(-1)
    torch.testing.assert_close(logp, r_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, r_entropy, atol=1e-5, rtol=1e-5)
    grad = torch.empty_like(x)
    ops().logprobs_backward(torch.ones(3), torch.ones(3), x, y, lse, entropy, 1.0, IGNORE, grad)
    assert torch.isfinite(grad).all()
    assert not grad[:, ::4].any()


def test_logprobs_threads_split_rows_identically():
    x, y = _logits(300, 1000, torch.float32), _labels(300, 1000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops().logprobs_forward(x, y, 1.0, IGNORE, True)
        g1 = torch.empty_like(x)
        ops().logprobs_backward(torch.ones(300), None, x, y, single[1], single[2], 1.0, IGNORE, g1)
    finally:
        torch.set_num_threads(threads)
    multi = ops().logprobs_forward(x, y, 1.0, IGNORE, True)
    g2 = torch.empty_like(x)
    ops().logprobs_backward(torch.ones(300), None, x, y, multi[1], multi[2], 1.0, IGNORE, g2)
    for a, b in zip(single, multi):
        assert torch.equal(a, b)
    assert torch.equal(g1, g2)


def test_logprobs_empty_batch():
    logp, lse, entropy = ops().logprobs_forward(torch.empty(0, 11), torch.empty(0, dtype=torch.long), 1.0, IGNORE, True)
    assert logp.shape == lse.shape == entropy.shape == (0,)


# ---------------------------------------------------------------------------------------------- GAE
def _masks(rows, t, seed=0):
    """Right padding, left padding and a fully masked row 0."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, t + 1, (rows,), generator=g)
    lengths[0] = 0
    pos = torch.arange(t)
    right = pos[None, :] < lengths[:, None]
    left = pos[None, :] >= (t - lengths)[:, None]
    odd = (torch.arange(rows) % 2 == 1)[:, None]
    return torch.where(odd, left, right).float()


@pytest.mark.parametrize("rows,mask_rows,t", [(2, 1, 7), (6, 3, 17), (2 * 9, 9, 64), (2 * 64, 64, 1024), (5, 5, 3)])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_gae_shared_mask_rows(rows, mask_rows, t, mask_dtype):
    # Row i reads mask row i % mask_rows (the [2 * B, T] reward + cost stack sharing one [B, T] mask), bool or fp32.
    g = torch.Generator().manual_seed(rows + t)
    rewards, values = torch.randn(rows, t, generator=g), torch.randn(rows, t, generator=g)
    mask = _masks(mask_rows, t)
    full = mask.repeat(rows // mask_rows, 1)
    adv, ret = ops().gae_forward(rewards, values, mask.to(mask_dtype), 1.0, 0.95)
    r_adv, r_ret = ref.gae(rewards, values, full, gamma=1.0, lam=0.95)
    assert torch.equal(adv, r_adv) and torch.equal(ret, r_ret)


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 9), (5, 17), (9, 64), (2 * 64, 1024)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (1.0, 1.0)])
def test_gae(shape, gamma, lam):
    g = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    mask = _masks(*shape)
    adv, ret = ops().gae_forward(rewards, values, mask, gamma, lam)
    r_adv, r_ret = ref.gae(rewards, values, mask, gamma=gamma, lam=lam)
    if gamma == 1.0:
        # The kernel performs the reference's fp32 operations in the same order (no fma contraction); with
        # gamma = 1 both also use the same fp32 gamma * lam, so the results are bitwise equal.
        assert torch.equal(adv, r_adv) and torch.equal(ret, r_ret)
    torch.testing.assert_close(adv, r_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, r_ret, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- losses
def _loss_inputs(rows, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(rows, t, generator=g) * 0.5 - 2.0
    old = logp + torch.randn(rows, t, generator=g) * 0.3
    old[:, ::5] = logp[:, ::5]  # rho == 1 exactly: s1 == s2 ties
    a_r, a_c = torch.randn(rows, t, generator=g), torch.randn(rows, t, generator=g)
    a_r[:, 1::7] = 0.0  # A == 0: ties whatever rho
    return logp, old, a_r, a_c, _masks(rows, t, seed)


def _row_grad(fn, x):
    """Row losses of fn and d row_loss / d x from torch autograd (rows are independent: grad of the sum)."""
    xr = x.clone().requires_grad_()
    row_loss = fn(xr)
    (grad,) = torch.autograd.grad(row_loss.sum(), xr)
    return row_loss.detach(), grad


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (4, 9), (2 * 64, 1024)])
@pytest.mark.parametrize("multiplier", [None, 0.0, 1.7])
def test_ppo_clip_objective(shape, multiplier):
    logp, old, a_r, a_c, mask = _loss_inputs(*shape)
    eps = 0.2
    if multiplier is None:
        loss, grad = ops().ppo_clip_objective(logp, old, a_r, None, mask, 0.0, eps)
        adv = a_r
    else:
        loss, grad = ops().ppo_clip_objective(logp, old, a_r, a_c, mask, multiplier, eps)
        adv = ref.lagrangian_advantages(a_r, a_c, multiplier)
    r_loss, r_grad = _row_grad(lambda lp: -ref.row_mean(ref.ppo_objective(lp, old, adv, eps), mask), logp)
    torch.testing.assert_close(loss, r_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, r_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (4, 9), (2 * 64, 1024)])
def test_clipped_value_objective(shape):
    g = torch.Generator().manual_seed(11)
    values = torch.randn(*shape, generator=g)
    old = values + torch.randn(*shape, generator=g)
    old[:, ::4] = values[:, ::4]  # v == old: l1 == l2 ties inside the clip range
    returns = torch.randn(*shape, generator=g)
    mask = _masks(*shape, seed=4)
    cv = 0.5
    loss, grad = ops().clipped_value_objective(values, old, returns, mask, cv)
    r_loss, r_grad = _row_grad(lambda v: 0.5 * ref.row_mean(ref.critic_objective(v, old, returns, cv), mask), values)
    torch.testing.assert_close(loss, r_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, r_grad, atol=1e-6, rtol=1e-5)


def test_loss_gradient_ties_follow_autograd():
    """Exact ties: torch.minimum / maximum split the gradient, clamp passes it on the closed interval."""
    logp = torch.tensor([[0.0, 0.5, 0.5, -0.5, float(torch.tensor(1.2).log())]])
    old = torch.zeros_like(logp)
    adv = torch.tensor([[2.0, 0.0, 1.5, 1.5, 1.0]])
    mask = torch.ones_like(logp)
    _, grad = ops().ppo_clip_objective(logp, old, adv, None, mask, 0.0, 0.2)
    _, r_grad = _row_grad(lambda lp: -ref.row_mean(ref.ppo_objective(lp, old, adv, 0.2), mask), logp)
    torch.testing.assert_close(grad, r_grad, atol=0, rtol=1e-6)

    values = torch.tensor([[0.5, 3.0, -1.0]])
    old_v = torch.tensor([[0.5, 0.0, 0.0]])
    returns = torch.tensor([[1.5, 2.0, -0.5]])
    mask = torch.ones_like(values)
    _, grad = ops().clipped_value_objective(values, old_v, returns, mask, 1.0)
    _, r_grad = _row_grad(lambda v: 0.5 * ref.row_mean(ref.critic_objective(v, old_v, returns, 1.0), mask), values)
    torch.testing.assert_close(grad, r_grad, atol=0, rtol=1e-6)


def test_fully_masked_rows_give_zero():
    logp, old, a_r, _, _ = _loss_inputs(3, 8)
    mask = torch.zeros(3, 8)
    loss, grad = ops().ppo_clip_objective(logp, old, a_r, None, mask, 0.0, 0.2)
    assert not loss.any() and not grad.any()
    loss, grad = ops().clipped_value_objective(logp, old, a_r, mask, 0.5)
    assert not loss.any() and not grad.any()


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (5, 13), (2 * 64, 1024)])
def test_kl_penalized_rewards(shape):
    g = torch.Generator().manual_seed(8)
    logp, ref_logp = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    reward = torch.randn(shape[0], generator=g) * 40
    cost = torch.randn(shape[0], generator=g) * 40
    mask = _masks(*shape, seed=2)
    rewards, costs = ops().kl_penalized_rewards(reward, cost, logp, ref_logp, mask, 0.1, 50.0)
    r_rewards, r_costs = ref.kl_penalized_rewards(
        reward, cost, logp, ref_logp, mask, kl_coeff=0.1, clip_range_score=50.0
    )
    torch.testing.assert_close(rewards, r_rewards, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(costs, r_costs, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- argument checks
def test_argument_errors():
    x, y = torch.randn(4, 10), torch.randint(0, 10, (4,))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ops().logprobs_forward(x.double(), y, 1.0, IGNORE, False)
    with pytest.raises(RuntimeError, match="labels must be int64"):
        ops().logprobs_forward(x, y.int(), 1.0, IGNORE, False)
    with pytest.raises(RuntimeError, match="2-D"):
        ops().logprobs_forward(x[None], y, 1.0, IGNORE, False)
    with pytest.raises(RuntimeError, match=r"shape \[4\]"):
        ops().logprobs_forward(x, y[:3], 1.0, IGNORE, False)
    with pytest.raises(RuntimeError, match="stride"):
        ops().logprobs_forward(torch.randn(10, 4).t(), y, 1.0, IGNORE, False)
    with pytest.raises(RuntimeError, match="temperature"):
        ops().logprobs_forward(x, y, 0.0, IGNORE, False)

    logp, lse, entropy = ops().logprobs_forward(x, y, 1.0, IGNORE, False)
    with pytest.raises(RuntimeError, match="grad_logits must match"):
        ops().logprobs_backward(logp, None, x, y, lse, entropy, 1.0, IGNORE, torch.empty(4, 10, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="grad_logp must be float32"):
        ops().logprobs_backward(logp.double(), None, x, y, lse, entropy, 1.0, IGNORE, torch.empty_like(x))
    with pytest.raises(RuntimeError, match="grad_entropy"):
        ops().logprobs_backward(logp, torch.zeros(3), x, y, lse, entropy, 1.0, IGNORE, torch.empty_like(x))
    buf = torch.randn(4 * 10 + 1)
    with pytest.raises(RuntimeError, match="(?i)overlap"):
        ops().logprobs_backward(logp, None, buf[:40].view(4, 10), y, lse, entropy, 1.0, IGNORE, buf[1:].view(4, 10))

    r = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="values has shape"):
        ops().gae_forward(r, torch.randn(3, 6), torch.ones(3, 5), 1.0, 0.95)
    with pytest.raises(RuntimeError, match="mask must be float32 or bool"):
        ops().gae_forward(r, r, torch.ones(3, 5, dtype=torch.float64), 1.0, 0.95)
    with pytest.raises(RuntimeError, match="does not divide"):
        ops().gae_forward(r, r, torch.ones(2, 5), 1.0, 0.95)
    with pytest.raises(RuntimeError, match=r"mask must be 2-D \[mask_rows, 5\]"):
        ops().gae_forward(r, r, torch.ones(3, 4), 1.0, 0.95)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops().gae_forward(r, torch.randn(5, 3).t(), torch.ones(3, 5), 1.0, 0.95)
    with pytest.raises(RuntimeError, match="cost_advantages has shape"):
        ops().ppo_clip_objective(r, r, r, torch.randn(2, 5), torch.ones(3, 5), 1.0, 0.2)
    with pytest.raises(RuntimeError, match="2-D"):
        ops().clipped_value_objective(r[0], r[0], r[0], torch.ones(5), 0.5)
    with pytest.raises(RuntimeError, match=r"reward must have shape \[3\]"):
        ops().kl_penalized_rewards(torch.zeros(2), torch.zeros(3), r, r, torch.ones(3, 5), 0.1, 50.0)
