"""The fake (meta) implementations of the ``saferlhf::`` ops (``saferlhf_fast/ops/fakes.py``) against the C++ kernels:
on real inputs, the fake's outputs must have the real outputs' shapes, dtypes and strides (every kernel returns new
contiguous tensors, also from strided inputs); ``torch.library.opcheck`` runs on every op; and every op the loaded
extension defines must have a fake (a new op without one fails :func:`test_every_op_has_a_fake`)."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from saferlhf_fast import _backend
from saferlhf_fast.ops import fakes

pytestmark = pytest.mark.skipif(_backend.extension()[0] is None, reason="the compiled extension is not built")

OPS = torch.ops.saferlhf


def _g(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _logprobs_args(dtype=torch.float32):
    logits = _g(6, 11, dtype=dtype)
    labels = torch.tensor([0, 3, 10, -100, 5, 7])
    return logits, labels


def _attention_qkv(grad=False, strided=False):
    if strided:  # the model's [B, H, L, D] tensors transposed to [B, L, H, D]: no copy, head dim contiguous
        q, k, v = (_g(2, h, 6, 8).transpose(1, 2) for h in (4, 2, 2))
    else:
        q, k, v = _g(2, 6, 4, 8), _g(2, 6, 2, 8), _g(2, 6, 2, 8)
    return tuple(t.detach().requires_grad_(grad) for t in (q, k, v))


def _rope_args(grad=False, dtype=torch.float32):
    q, k = _g(2, 5, 4, 8, dtype=dtype, grad=grad), _g(2, 5, 2, 8, dtype=dtype, grad=grad)
    return q, k, _g(1, 5, 8), _g(1, 5, 8)


def _bf16_layer_cases():
    """The layer ops on bf16 inputs (tables and, in the "_mixed" cases, the residual / weight fp32): the norms'
    outputs take torch's type promotion of their inputs."""
    bf16 = torch.bfloat16
    xb, wb, w = _g(3, 4, 16, dtype=bf16), _g(16, dtype=bf16), _g(16)
    mixed = OPS.add_rms_norm_forward(xb, _g(3, 4, 16), w, 1e-6)
    plain = OPS.add_rms_norm_forward(xb, xb, wb, 1e-6)
    gate_up = _g(3, 4, 20, dtype=bf16)
    return [
        ("rope_forward_bf16", OPS.rope_forward, _rope_args(dtype=bf16)),
        ("rope_backward_bf16", OPS.rope_backward, _rope_args(dtype=bf16)),
        ("rope_bf16", OPS.rope, _rope_args(grad=True, dtype=bf16)),
        ("swiglu_forward_bf16", OPS.swiglu_forward, (gate_up[..., :10], gate_up[..., 10:])),
        ("swiglu_backward_bf16", OPS.swiglu_backward, (_g(3, 4, 10, dtype=bf16), gate_up[..., :10],
                                                       gate_up[..., 10:])),
        ("swiglu_bf16", OPS.swiglu, (_g(3, 4, 10, dtype=bf16, grad=True), _g(3, 4, 10, dtype=bf16, grad=True))),
        ("rms_norm_forward_bf16", OPS.rms_norm_forward, (xb, wb, 1e-6)),
        ("rms_norm_forward_bf16_mixed", OPS.rms_norm_forward, (xb, w, 1e-6)),
        ("rms_norm_backward_bf16_mixed", OPS.rms_norm_backward, (_g(3, 4, 16), xb, w, _norm_rstd(xb, w))),
        ("rms_norm_bf16", OPS.rms_norm, (_g(3, 4, 16, dtype=bf16, grad=True), _g(16, dtype=bf16, grad=True), 1e-6)),
        ("rms_norm_bf16_mixed", OPS.rms_norm, (_g(3, 4, 16, dtype=bf16, grad=True), _g(16, grad=True), 1e-6)),
        ("add_rms_norm_forward_bf16", OPS.add_rms_norm_forward, (xb, xb, wb, 1e-6)),
        ("add_rms_norm_forward_bf16_mixed", OPS.add_rms_norm_forward, (xb, _g(3, 4, 16), w, 1e-6)),
        ("add_rms_norm_backward_bf16", OPS.add_rms_norm_backward,
         (_g(3, 4, 16, dtype=bf16), _g(3, 4, 16, dtype=bf16), plain[0], wb, plain[2])),
        ("add_rms_norm_backward_bf16_mixed", OPS.add_rms_norm_backward, (_g(3, 4, 16), None, mixed[0], w, mixed[2])),
        ("add_rms_norm_bf16", OPS.add_rms_norm, (_g(3, 4, 16, dtype=bf16, grad=True),
                                                 _g(3, 4, 16, dtype=bf16, grad=True), _g(16, dtype=bf16), 1e-6)),
        ("add_rms_norm_bf16_mixed", OPS.add_rms_norm, (_g(3, 4, 16, dtype=bf16, grad=True),
                                                       _g(3, 4, 16, grad=True), _g(16, grad=True), 1e-6)),
    ]


def _norm_rstd(x, w):
    return OPS.rms_norm_forward(x, w, 1e-6)[1]


def _cases():
    """(id, op, args) for every op with a registered fake: real inputs, some strided."""
    torch.manual_seed(0)
    logits, labels = _logprobs_args()
    lp_out = OPS.logprobs_forward(logits, labels, 1.0, -100, True)
    m = _g(3, 5).gt(0).float()
    q, k, v = _attention_qkv()
    out, lse = OPS.attention_forward(q, k, v, None, 0.35, 0)
    x, w = _g(3, 4, 16), _g(16)
    s = OPS.add_rms_norm_forward(x, _g(3, 4, 16), w, 1e-6)
    gate_up = _g(3, 4, 20)
    wide = _g(9, 14)
    return [
        ("logprobs_forward", OPS.logprobs_forward, (logits, labels, 0.7, -100, True)),
        ("logprobs_forward_bf16", OPS.logprobs_forward, (*_logprobs_args(torch.bfloat16), 1.0, -100, False)),
        ("logprobs_backward", OPS.logprobs_backward,
         (_g(6), _g(6), logits, labels, lp_out[1], lp_out[2], 1.0, -100, torch.empty_like(logits))),
        ("gae_forward", OPS.gae_forward, (_g(4, 7), _g(4, 7), _g(2, 7).gt(0), 0.99, 0.95)),
        ("ppo_clip_objective", OPS.ppo_clip_objective, (_g(3, 5), _g(3, 5), _g(3, 5), _g(3, 5), m, 0.5, 0.2)),
        ("ppo_clip_objective_nocost", OPS.ppo_clip_objective, (_g(3, 5), _g(3, 5), _g(3, 5), None, m, 0.0, 0.2)),
        ("clipped_value_objective", OPS.clipped_value_objective, (_g(3, 5), _g(3, 5), _g(3, 5), m, 5.0)),
        ("kl_penalized_rewards", OPS.kl_penalized_rewards, (_g(3), _g(3), _g(3, 5), _g(3, 5), m, 0.1, 50.0)),
        ("attention_forward", OPS.attention_forward, (*_attention_qkv(strided=True), None, 0.35, 0)),
        ("attention_forward_packed", OPS.attention_forward,
         (*(t[:1] for t in _attention_qkv()), torch.tensor([0, 2, 6]), 0.35, 3)),
        ("attention_backward", OPS.attention_backward, (_g(2, 6, 4, 8), q, k, v, out, lse, None, 0.35, 0)),
        ("attention", OPS.attention, (*_attention_qkv(grad=True, strided=True), None, 0.35, 0)),
        ("rope_forward", OPS.rope_forward, _rope_args()),
        ("rope_backward", OPS.rope_backward, _rope_args()),
        ("rope", OPS.rope, _rope_args(grad=True)),
        ("swiglu_forward", OPS.swiglu_forward, (gate_up[..., :10], gate_up[..., 10:])),
        ("swiglu_backward", OPS.swiglu_backward, (_g(3, 4, 10), gate_up[..., :10], gate_up[..., 10:])),
        ("swiglu", OPS.swiglu, (_g(3, 4, 10, grad=True), _g(3, 4, 10, grad=True))),
        ("rms_norm_forward", OPS.rms_norm_forward, (x, w, 1e-6)),
        ("rms_norm_backward", OPS.rms_norm_backward, (_g(3, 4, 16), x, w, _norm_rstd(x, w))),
        ("rms_norm", OPS.rms_norm, (_g(3, 4, 16, grad=True), _g(16, grad=True), 1e-6)),
        ("add_rms_norm_forward", OPS.add_rms_norm_forward, (x, _g(3, 4, 16), w, 1e-6)),
        ("add_rms_norm_backward", OPS.add_rms_norm_backward, (_g(3, 4, 16), _g(3, 4, 16), s[0], w, s[2])),
        ("add_rms_norm_backward_nodsum", OPS.add_rms_norm_backward, (_g(3, 4, 16), None, s[0], w, s[2])),
        ("add_rms_norm", OPS.add_rms_norm, (_g(3, 4, 16, grad=True), _g(3, 4, 16, grad=True), _g(16), 1e-6)),
        ("onednn_linear", OPS.onednn_linear, (_g(2, 3, 8, grad=True), w8 := _g(5, 8, grad=True), _g(5), w8)),
        ("transpose_2d", OPS.transpose_2d, (wide,)),
        ("transpose_2d_strided", OPS.transpose_2d, (wide[:, 1:12],)),
        *_bf16_layer_cases(),
    ]


CASES = _cases() if _backend.extension()[0] is not None else []
IDS = [c[0] for c in CASES]


def _meta(t):
    return None if t is None else (tuple(t.shape), t.dtype, t.stride(), t.device)


def _outputs(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _run_fake(op, args):
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        return op(*fake_args)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fake_matches_kernel(case):
    """Shapes, dtypes and strides of the fake's outputs equal those of the kernel's outputs on the same inputs."""
    _, op, args = case
    with torch.no_grad():
        real = _outputs(op(*args))
    fake = _outputs(_run_fake(op, args))
    assert [_meta(t) for t in fake] == [_meta(t) for t in real]


# test_aot_dispatch_dynamic is skipped for onednn_linear only: its C++ backward (csrc/linear_ops.cpp) calls the C++
# function transpose_2d directly, not through the dispatcher, so AOTAutograd's trace of the backward runs that
# kernel on fake tensors.  Under torch.compile, ops.linear takes F.linear instead (dense.eligible is False while
# compiling); test_compile.py covers it.
_NO_AOT = {"onednn_linear"}
_ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _utils(name):
    base = name.split("_nocost")[0].split("_bf16")[0].split("_packed")[0].split("_nodsum")[0].split("_strided")[0]
    return tuple(u for u in _ALL_UTILS if not (base in _NO_AOT and u == "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_opcheck(case):
    name, op, args = case
    torch.library.opcheck(op.default, args, test_utils=_utils(name))


def test_every_op_has_a_fake():
    """Every ``saferlhf::`` op of the loaded extension has a registered fake, except the CompositeImplicitAutograd
    ones listed in ``fakes.COMPOSITE_IMPLICIT`` (which have a fake written but cannot register it)."""
    defined = set(fakes.defined_ops())
    assert defined, "no saferlhf:: ops found"
    assert not fakes.missing(), f"ops without a fake (add one to saferlhf_fast/ops/fakes.py): {fakes.missing()}"
    assert not defined - set(fakes._FAKES), f"ops without a fake function: {sorted(defined - set(fakes._FAKES))}"
    for name in fakes.registered():
        assert torch._library.utils.has_fake_kernel(getattr(OPS, name).default), name


def test_a_new_op_without_a_fake_is_reported():
    """An op added to the namespace (here from Python, removed again) shows up in ``fakes.missing()``."""
    lib = torch.library.Library("saferlhf", "FRAGMENT")
    try:
        lib.define("test_fake_ops_probe(Tensor x) -> Tensor")
        assert fakes.missing() == ["test_fake_ops_probe"]
    finally:
        lib._destroy()
    assert "test_fake_ops_probe" not in fakes.defined_ops()


# Checked by their own tests below, on the arguments of a real step / draw.
CHECKED_BY_OWN_TEST = {"decode_step", "sample_tokens"}


def test_every_registered_fake_is_checked():
    """Each op with a registered fake appears in the cases above or has its own test (so a new fake comes with a
    check)."""
    checked = {op._qualified_op_name.split("::")[1] for _, op, _ in CASES} | CHECKED_BY_OWN_TEST
    assert set(fakes.registered()) <= checked, sorted(set(fakes.registered()) - checked)


def test_no_op_is_composite_implicit():
    """Every op's C++ kernel sits at a backend key, so each has a fake, decode_step and sample_tokens included."""
    for name in fakes.defined_ops():
        assert not fakes._is_composite_implicit(f"saferlhf::{name}"), name
    assert {"decode_step", "sample_tokens"} <= set(fakes.registered())


@pytest.mark.parametrize("greedy", [True, False])
def test_sample_tokens_fake_function(greedy):
    """The sample_tokens fake, called on real tensors, allocates what the kernel returns."""
    if "sample_tokens" not in fakes.defined_ops():
        pytest.skip("the extension has no saferlhf::sample_tokens")
    logits, u = torch.randn(3, 17), torch.rand(3, dtype=torch.float64)
    real = OPS.sample_tokens(logits, u, 0.8, 5, greedy)
    fake = fakes._FAKES["sample_tokens"](logits, u, 0.8, 5, greedy)
    assert [_meta(t) for t in fake] == [_meta(t) for t in real]


def test_register_is_idempotent():
    assert fakes.register() == fakes.registered()


@pytest.mark.parametrize("packed", [False, True])
def test_decode_step_fake_function(packed):
    """The decode_step fake, called on the arguments of a real step, allocates what the kernel
    returns: logits [B, V] from a packed [V, H] or a plain [H, V] lm_head (V != H here)."""
    from saferlhf_fast.engine import fast_decode as fd
    from saferlhf_fast.models.llama import LlamaForCausalLM, ModelConfig

    if "decode_step" not in fakes.defined_ops():
        pytest.skip("the extension has no saferlhf::decode_step")
    if packed and not fd.onednn_available():
        pytest.skip("no MKL-DNN linear in this torch build")
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    b, p = 2, 3
    cache = model.allocate_cache(b, p + 2)
    plan = fd.DecodePlan(model, cache, b, torch.ones(b, p, dtype=torch.bool), packed=packed)
    assert plan.native
    args = (torch.tensor([1, 2]), torch.tensor([3, 3]), plan.embed, plan.weights, plan.biases, plan.norm_w,
            plan.lm_head.w, cache.k, cache.v, plan.cos, plan.sin, plan.additive2d, plan.window_list, p, plan.nh,
            plan.nkv, plan.inter, float(plan.layers[0].eps1), plan.packed)
    with torch.no_grad():
        real = OPS.decode_step(*args)
    assert _meta(fakes._FAKES["decode_step"](*args)) == _meta(real) and real.shape == (b, 40)
