"""CUDA kernels (csrc/*_cuda.cu, registered as torch.ops.saferlhf.* for CUDA tensors) against the torch reference.

Every test needs a GPU and an extension built with CUDA (``saferlhf_fast._C.cuda_built``); otherwise the module
is skipped.  Shapes cover the kernels' code paths: warp-per-row (V <= 2048) and block-per-row vocabularies, rows
whose start is not 16-byte aligned (odd V, sliced logits), V = 32003, T = 1, tiles of 256 / 1024 steps and rows
longer than a tile, >= 2048 rows (4 warps per block in GAE), ignored labels, fully masked rows, in-place backward.
"""
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from saferlhf_fast import _backend, ops
from saferlhf_fast.ops import reference as ref

_EXT, _WHY = _backend.extension()
if _EXT is None or not getattr(_EXT, "cuda_built", False):
    pytest.skip(_WHY or "saferlhf_fast._C was built without CUDA kernels", allow_module_level=True)

OPS = torch.ops.saferlhf
DEV = "cuda"
IGN = ref.IGNORE_INDEX
LOWP = (torch.bfloat16, torch.float16)


def _close(a, b, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- log-probs
def _logits_labels(n, v, dtype, seed, scale=3.0):
    g = _gen(seed)
    logits = (torch.randn(n, v, generator=g) * scale).to(dtype).to(DEV)
    labels = torch.randint(0, v, (n,), generator=g)
    if n > 1:
        labels[1] = IGN
    return logits, labels.to(DEV)


def _ref_forward(logits, labels, temperature):
    logp, ent = ref.gather_logprobs(logits, labels, temperature=temperature, return_entropy=True)
    return logp, torch.logsumexp(logits.float() / temperature, -1), ent


def _safe_ref(logits, labels, temperature):
    """The reference with p log p := 0 where p == 0, so rows holding -inf logits (banned tokens) have a finite
    entropy and gradient, as the kernels define them (the plain reference gives 0 * -inf = NaN there)."""
    lsm = torch.log_softmax(logits.float() / temperature, -1)
    ignored = labels == IGN
    logp = lsm.gather(-1, torch.where(ignored, 0, labels).unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0.0)
    p = lsm.exp()
    ent = -(p * torch.where(p > 0, lsm, torch.zeros_like(lsm))).sum(-1).masked_fill(ignored, 0.0)
    return logp, ent


SHAPES = [(1, 1), (5, 7), (33, 130), (8, 2048), (8, 2049), (6, 32003), (3, 50257)]


@pytest.mark.parametrize("n,v", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logprobs_forward(n, v, dtype):
    logits, labels = _logits_labels(n, v, dtype, seed=n * 100003 + v)
    for temperature in (1.0, 0.7):
        rlogp, rlse, rent = _ref_forward(logits, labels, temperature)
        for with_entropy in (True, False):
            logp, lse, entropy = OPS.logprobs_forward(logits, labels, temperature, IGN, with_entropy)
            assert logp.dtype == lse.dtype == entropy.dtype == torch.float32
            assert logp.device == logits.device
            # The math is fp32 whatever the input dtype: fp32 tolerances for bf16 / fp16 logits too.
            _close(logp, rlogp)
            _close(lse, rlse)
            _close(entropy, rent if with_entropy else torch.zeros_like(rent))
    if n > 1:
        assert logp[1].item() == 0.0 and entropy[1].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [140, 3001])
def test_logprobs_forward_strided_unaligned_extremes(dtype, v):
    g = _gen(v)
    base = torch.randn(5, v + 67, generator=g) * 4
    base[0, 8] = 80.0          # near one-hot row: entropy ~ 0
    base[2, :] = -30.0         # uniform row
    base[3, 20:40] = -float("inf")  # banned tokens
    logits = base.to(dtype).to(DEV)[:, 3:3 + v]  # row stride v + 67, rows start off any 16-byte boundary
    assert logits.stride() == (v + 67, 1)
    labels = torch.tensor([5, 3, IGN, 7, v - 1], device=DEV)
    logp, lse, entropy = OPS.logprobs_forward(logits, labels, 1.0, IGN, True)
    rlogp, rent = _safe_ref(logits, labels, 1.0)
    _close(logp, rlogp)
    _close(lse, torch.logsumexp(logits.float(), -1))
    _close(entropy, rent)
    assert torch.isfinite(entropy).all()


def _ref_grad(logits, labels, temperature, g_logp, g_ent, safe=False):
    x = logits.detach().clone().requires_grad_(True)
    if safe:
        logp, ent = _safe_ref(x, labels, temperature)
    else:
        logp, ent = ref.gather_logprobs(x, labels, temperature=temperature, return_entropy=True)
    loss = (g_logp * logp).sum() + ((g_ent * ent).sum() if g_ent is not None else 0.0)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


@pytest.mark.parametrize("n,v", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logprobs_backward(n, v, dtype):
    logits, labels = _logits_labels(n, v, dtype, seed=7 * n + v)
    temperature = 0.8
    g = _gen(v)
    g_logp = torch.randn(n, generator=g).to(DEV)
    g_ent = torch.randn(n, generator=g).to(DEV)
    tol = dict(atol=1e-2, rtol=1e-2) if dtype in LOWP else dict(atol=1e-5, rtol=1e-5)
    _, lse, entropy = OPS.logprobs_forward(logits, labels, temperature, IGN, True)
    for ge in (g_ent, None):
        out = torch.empty_like(logits)
        OPS.logprobs_backward(g_logp, ge, logits, labels, lse, entropy, temperature, IGN, out)
        assert out.dtype == logits.dtype
        _close(out, _ref_grad(logits, labels, temperature, g_logp, ge), **tol)
        if n > 1:
            assert (out[1] == 0).all()  # ignored row
        # in place: grad_logits is logits itself
        inplace = logits.clone()
        OPS.logprobs_backward(g_logp, ge, inplace, labels, lse, entropy, temperature, IGN, inplace)
        assert torch.equal(inplace, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_backward_strided_and_phase_mismatch(dtype):
    n, v = 4, 2501
    g = _gen(11)
    base = (torch.randn(n, v + 9, generator=g) * 3).to(dtype).to(DEV)
    base[0, 100:110] = -float("inf")
    logits = base[:, 1:1 + v]                               # stride v + 9, odd start
    labels = torch.tensor([0, IGN, v - 1, 1234], device=DEV)
    g_logp = torch.randn(n, generator=g).to(DEV)
    g_ent = torch.randn(n, generator=g).to(DEV)
    _, lse, entropy = OPS.logprobs_forward(logits, labels, 1.0, IGN, True)
    expect = _ref_grad(logits, labels, 1.0, g_logp, g_ent, safe=True)
    tol = dict(atol=1e-2, rtol=1e-2) if dtype in LOWP else dict(atol=1e-5, rtol=1e-5)
    # Output rows whose 16-byte phase differs from the input rows' (scalar path).
    out_base = torch.full((n, v + 5), 7.0, dtype=dtype, device=DEV)
    out = out_base[:, 2:2 + v]
    OPS.logprobs_backward(g_logp, g_ent, logits, labels, lse, entropy, 1.0, IGN, out)
    _close(out, expect, **tol)
    assert (out_base[:, :2] == 7).all() and (out_base[:, 2 + v:] == 7).all()  # nothing outside the view
    assert torch.isfinite(out.float()).all()
    # In place on the strided view.
    OPS.logprobs_backward(g_logp, g_ent, logits, labels, lse, entropy, 1.0, IGN, logits)
    _close(logits, expect, **tol)


def test_logprobs_public_ops_cuda_backend():
    logits, labels = _logits_labels(6, 1000, torch.bfloat16, seed=5)
    x = logits.clone().requires_grad_(True)
    logp, ent = ops.gather_logprobs(x, labels, temperature=0.9, return_entropy=True, backend="cuda")
    (logp.sum() + ent.sum()).backward()
    y = logits.clone().requires_grad_(True)
    rlogp, rent = ref.gather_logprobs(y, labels, temperature=0.9, return_entropy=True)
    (rlogp.sum() + rent.sum()).backward()
    _close(logp, rlogp)
    _close(ent, rent)
    _close(x.grad, y.grad, atol=1e-2, rtol=1e-2)
    # Chunked lm-head path: in-place backward through the kernel.
    g = _gen(9)
    h = torch.randn(2, 5, 64, generator=g).to(DEV).requires_grad_(True)
    w = (torch.randn(700, 64, generator=g) * 0.2).to(DEV).requires_grad_(True)
    lab = torch.randint(0, 700, (2, 5), generator=g).to(DEV)
    lab[0, 0] = IGN
    out = ops.linear_logprobs(h, w, lab, backend="cuda", chunk_rows=3)
    out.sum().backward()
    h2, w2 = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    rout = ref.linear_logprobs(h2, w2, lab)
    rout.sum().backward()
    _close(out, rout)
    _close(h.grad, h2.grad, atol=1e-4, rtol=1e-4)
    _close(w.grad, w2.grad, atol=1e-4, rtol=1e-4)


def test_logprobs_input_checks():
    logits, labels = _logits_labels(3, 10, torch.float32, seed=1)
    with pytest.raises(RuntimeError):
        OPS.logprobs_forward(logits, labels.int(), 1.0, IGN, False)
    with pytest.raises(RuntimeError):
        OPS.logprobs_forward(logits, labels.cpu(), 1.0, IGN, False)
    with pytest.raises(RuntimeError):
        OPS.logprobs_forward(logits.double(), labels, 1.0, IGN, False)
    with pytest.raises(RuntimeError):
        OPS.logprobs_forward(torch.randn(10, 3, device=DEV).t(), labels, 1.0, IGN, False)  # stride(1) != 1
    out = torch.empty(3, 10, dtype=torch.bfloat16, device=DEV)
    _, lse, ent = OPS.logprobs_forward(logits, labels, 1.0, IGN, True)
    with pytest.raises(RuntimeError):  # grad_logits dtype differs from logits
        OPS.logprobs_backward(lse, None, logits, labels, lse, ent, 1.0, IGN, out)


# ----------------------------------------------------------------------------------------------- GAE
def _gae_inputs(rows, t, seed, pad=True):
    g = _gen(seed)
    rewards = torch.randn(rows, t, generator=g)
    values = torch.randn(rows, t, generator=g)
    mask = torch.ones(rows, t)
    if pad and t > 4:
        lengths = torch.randint(1, t + 1, (rows,), generator=g)
        for i in range(rows):
            mask[i, int(lengths[i]):] = 0  # right padding
        mask[0, :2] = 0  # left padding in one row
    if rows > 2:
        mask[2] = 0  # fully masked row
    return rewards.to(DEV), values.to(DEV), mask.to(DEV)


@pytest.mark.parametrize(
    "rows,t", [(1, 1), (3, 1), (3, 7), (4, 255), (4, 256), (4, 257), (128, 1024), (5, 1025), (2, 3000), (2050, 33)]
)
def test_gae(rows, t):
    rewards, values, mask = _gae_inputs(rows, t, seed=rows * 7919 + t)
    for gamma, lam in ((1.0, 0.95), (0.99, 0.9), (0.9, 1.0)):
        adv, ret = OPS.gae_forward(rewards, values, mask, gamma, lam)
        radv, rret = ref.gae(rewards, values, mask, gamma=gamma, lam=lam)
        _close(adv, radv)
        _close(ret, rret)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_gae_shared_mask_rows(mask_dtype):
    # [2 * 64, 1025] streams sharing one [64, 1025] mask (row i reads mask row i % 64), bool or fp32.
    rewards, values, mask = _gae_inputs(128, 1025, seed=17)
    mask = mask[:64].contiguous()
    adv, ret = OPS.gae_forward(rewards, values, mask.to(mask_dtype), 1.0, 0.95)
    radv, rret = ref.gae(rewards, values, mask.repeat(2, 1), gamma=1.0, lam=0.95)
    _close(adv, radv)
    _close(ret, rret)


# ----------------------------------------------------------------------------------------------- losses
def _loss_inputs(rows, t, seed):
    g = _gen(seed)
    logp = -torch.rand(rows, t, generator=g) * 3
    old = logp + torch.randn(rows, t, generator=g) * 0.3
    old[:, ::5] = logp[:, ::5]  # rho == 1 exactly: s1 == s2 ties inside the clip range
    adv = torch.randn(rows, t, generator=g)
    adv[:, 1::7] = 0.0  # A == 0: ties whatever rho
    cost_adv = torch.randn(rows, t, generator=g)
    mask = (torch.rand(rows, t, generator=g) > 0.2).float()
    if rows > 1:
        mask[1] = 0  # fully masked row: row loss 0, zero gradient
    return [x.to(DEV) for x in (logp, old, adv, cost_adv, mask)]


LOSS_SHAPES = [(1, 1), (3, 1), (4, 37), (16, 1024), (3, 3001)]


@pytest.mark.parametrize("rows,t", LOSS_SHAPES)
@pytest.mark.parametrize("lagrangian", [False, True])
def test_ppo_clip_objective(rows, t, lagrangian):
    logp, old, adv, cost_adv, mask = _loss_inputs(rows, t, seed=rows * 31 + t)
    clip, lam = 0.2, 0.75
    row_loss, grad = OPS.ppo_clip_objective(
        logp, old, adv, cost_adv if lagrangian else None, mask, lam if lagrangian else 0.0, clip
    )
    x = logp.clone().requires_grad_(True)
    a = ref.lagrangian_advantages(adv, cost_adv, lam) if lagrangian else adv
    rrow = -ref.row_mean(ref.ppo_objective(x, old, a, clip), mask)
    (rgrad,) = torch.autograd.grad(rrow.sum(), x)
    _close(row_loss, rrow.detach())
    _close(grad, rgrad)
    if rows > 1:
        assert row_loss[1].item() == 0.0 and (grad[1] == 0).all()


@pytest.mark.parametrize("rows,t", LOSS_SHAPES)
def test_clipped_value_objective(rows, t):
    g = _gen(rows * 17 + t)
    values = torch.randn(rows, t, generator=g)
    old = values + torch.randn(rows, t, generator=g) * 0.5
    old[:, ::4] = values[:, ::4]  # v == old: clipped == unclipped, l1 == l2 ties
    returns = torch.randn(rows, t, generator=g)
    mask = (torch.rand(rows, t, generator=g) > 0.2).float()
    if rows > 1:
        mask[1] = 0
    values, old, returns, mask = (z.to(DEV) for z in (values, old, returns, mask))
    clip = 0.3
    row_loss, grad = OPS.clipped_value_objective(values, old, returns, mask, clip)
    x = values.clone().requires_grad_(True)
    rrow = 0.5 * ref.row_mean(ref.critic_objective(x, old, returns, clip), mask)
    (rgrad,) = torch.autograd.grad(rrow.sum(), x)
    _close(row_loss, rrow.detach())
    _close(grad, rgrad)
    if rows > 1:
        assert row_loss[1].item() == 0.0 and (grad[1] == 0).all()


@pytest.mark.parametrize("rows,t", [(1, 1), (3, 1), (5, 40), (8, 1024), (2, 3001)])
def test_kl_penalized_rewards(rows, t):
    g = _gen(rows * 13 + t)
    reward = (torch.randn(rows, generator=g) * 30).to(DEV)
    cost = (torch.randn(rows, generator=g) * 30).to(DEV)
    logp = (-torch.rand(rows, t, generator=g) * 3).to(DEV)
    ref_logp = (logp.cpu() + torch.randn(rows, t, generator=g)).to(DEV)
    mask = torch.ones(rows, t)
    if t > 3:
        mask[0, -2:] = 0      # right padding
        mask[-1, :2] = 0      # left padding
    if rows > 2:
        mask[1] = 0           # fully masked row: all zeros
    mask = mask.to(DEV)
    for kl_coeff, clip in ((0.05, 50.0), (2.0, 1.5)):
        r, c = OPS.kl_penalized_rewards(reward, cost, logp, ref_logp, mask, kl_coeff, clip)
        rr, rc = ref.kl_penalized_rewards(reward, cost, logp, ref_logp, mask, kl_coeff=kl_coeff,
                                          clip_range_score=clip)
        _close(r, rr)
        _close(c, rc)


def test_losses_public_ops_cuda_backend():
    logp, old, adv, cost_adv, mask = _loss_inputs(2 * 3, 50, seed=1)
    logp, old, adv, cost_adv, mask = (z.view(2, 3, 50) for z in (logp, old, adv, cost_adv, mask))
    x = logp.clone().requires_grad_(True)
    loss = ops.ppo_lag_actor_loss(x, old, adv, cost_adv, mask, multiplier=0.5, clip_range=0.2, backend="cuda")
    loss.backward()
    y = logp.clone().requires_grad_(True)
    rloss = ref.ppo_lag_actor_loss(y, old, adv, cost_adv, mask, multiplier=0.5, clip_range=0.2)
    rloss.backward()
    _close(loss, rloss)
    _close(x.grad, y.grad)
    adv2, ret2 = ops.gae(adv, old, mask, gamma=0.99, lam=0.95, backend="cuda")
    radv2, rret2 = ref.gae(adv, old, mask, gamma=0.99, lam=0.95)
    _close(adv2, radv2)
    _close(ret2, rret2)
