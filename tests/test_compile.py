"""torch.compile (inductor, CPU) over the ``saferlhf::`` ops: the tiny model's training step -- forward through the
fused layer ops, native attention and oneDNN linears, loss from ``ops.linear_logprobs``, backward -- and the PPO
loss path (``ops.gae``, ``ops.kl_penalized_rewards``, ``ops.ppo_lag_actor_loss``, ``ops.critic_loss``) and
``ops.gather_logprobs`` with entropy compile with
``fullgraph=True`` (no graph break at all) and give the eager values and gradients to 1e-5 (fp32, rtol = atol =
1e-5: the compiled graph runs the same kernels; only the fused torch ops around them may round differently).
``model.token_logprobs`` does break graphs, on the model's data-dependent row selection (``nonzero``) and packing
decision; none of its breaks comes from ``saferlhf_fast/ops`` or ``_backend``."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._inductor.config

from saferlhf_fast import _backend, ops
from saferlhf_fast.models.llama import LlamaForCausalLM, ModelConfig

pytestmark = pytest.mark.skipif(_backend.extension()[0] is None, reason="the compiled extension is not built")

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """A clean dynamo cache per test; inductor compiles its C++ kernels in this process (a worker pool costs more
    than it saves on the small CI machines)."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(compile_threads=1):
        yield
    torch._dynamo.reset()


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def _train_step(model):
    def step(ids, labels, mask):
        """Masked mean of -log p(label) through the fused lm_head log-prob path."""
        hidden = model.hidden_states(ids)
        logp = ops.linear_logprobs(hidden, model.lm_head.weight, labels)
        return -(logp * mask).sum() / mask.sum(), logp
    return step


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(fn, model, *args):
    model.zero_grad(set_to_none=True)
    loss, out = fn(*args)
    loss.backward()
    return loss.detach(), out.detach(), _grads(model)


def _recording_inductor(seen: set):
    """inductor, after noting the ``saferlhf::`` ops in dynamo's graph (autograd.Function bodies included)."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        for mod in gm.modules():
            if isinstance(mod, torch.fx.GraphModule):
                seen.update(str(n.target).removesuffix(".default").split(".")[-1]
                            for n in mod.graph.nodes if n.op == "call_function" and "saferlhf" in str(n.target))
        return compile_fx(gm, example_inputs)
    return backend


# the layer ops, attention and the log-prob kernels the model's CPU fp32 training step dispatches to (one lm_head
# chunk: linear_logprobs runs logprobs_backward in its forward)
_TRAIN_OPS = {"rms_norm", "add_rms_norm", "rope", "swiglu", "attention", "logprobs_forward", "logprobs_backward"}


def test_train_step_compiles_fullgraph_and_matches_eager():
    model = _tiny_model()
    assert model.backend() == "native"  # the C++ attention kernel, not SDPA
    torch.manual_seed(1)
    ids, labels = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 9))
    labels[1, 7:] = ops.IGNORE_INDEX
    mask = (labels != ops.IGNORE_INDEX).float()
    step = _train_step(model)
    eager = _run(step, model, ids, labels, mask)
    seen = set()
    compiled = _run(torch.compile(step, backend=_recording_inductor(seen), fullgraph=True), model, ids, labels, mask)
    assert _TRAIN_OPS <= seen, f"ops missing from the compiled graph: {_TRAIN_OPS - seen}"
    torch.testing.assert_close(compiled[0], eager[0], **TOL)
    torch.testing.assert_close(compiled[1], eager[1], **TOL)
    assert eager[2].keys() == compiled[2].keys() and len(eager[2]) == len(list(model.parameters()))
    for name, g in eager[2].items():
        torch.testing.assert_close(compiled[2][name], g, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def _ppo_inputs(b=3, t=7):
    torch.manual_seed(2)
    mask = torch.ones(b, t)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    f = lambda: torch.randn(b, t)  # noqa: E731
    logp = (f() * 0.1 - 2).requires_grad_()
    values = f().requires_grad_()
    return dict(logp=logp, old_logp=logp.detach() + 0.05 * f(), ref_logp=logp.detach() + 0.1 * f(), values=values,
                old_values=values.detach() + 0.1 * f(), cost_values=f(), reward=torch.randn(b), cost=torch.randn(b),
                mask=mask)


def _ppo_loss(logp, old_logp, ref_logp, values, old_values, cost_values, reward, cost, mask):
    """KL-penalised rewards -> GAE of both streams in one call -> PPO-Lagrangian actor loss + critic loss."""
    rewards, costs = ops.kl_penalized_rewards(reward, cost, logp.detach(), ref_logp, mask, kl_coeff=0.02)
    adv, ret = ops.gae(torch.stack([rewards, costs]), torch.stack([values.detach(), cost_values]), mask,
                       gamma=1.0, lam=0.95)
    actor = ops.ppo_lag_actor_loss(logp, old_logp, adv[0], adv[1], mask, multiplier=0.7, clip_range=0.2)
    critic = ops.critic_loss(values, old_values, ret[0], mask, clip_range=0.2)
    return actor + critic, adv


def test_ppo_loss_path_compiles_fullgraph_and_matches_eager():
    x = _ppo_inputs()
    eager_loss, eager_adv = _ppo_loss(**x)
    eager_grads = torch.autograd.grad(eager_loss, [x["logp"], x["values"]])
    seen = set()
    loss, adv = torch.compile(_ppo_loss, backend=_recording_inductor(seen), fullgraph=True)(**x)
    assert {"kl_penalized_rewards", "gae_forward", "ppo_clip_objective", "clipped_value_objective"} <= seen, seen
    grads = torch.autograd.grad(loss, [x["logp"], x["values"]])
    torch.testing.assert_close(loss, eager_loss, **TOL)
    torch.testing.assert_close(adv, eager_adv, **TOL)
    for g, e in zip(grads, eager_grads):
        assert e.abs().sum() > 0
        torch.testing.assert_close(g, e, **TOL)


def _innermost_saferlhf_frame(stack):
    frames = [f for f in stack if "saferlhf_fast" in f.filename]
    return frames[-1].filename if frames else ""


def test_token_logprobs_breaks_come_from_the_model_not_the_ops():
    """The model's own data-dependent steps break graphs (row selection with nonzero, the packing decision); no
    break may come from saferlhf_fast/ops or _backend (availability checks, op dispatch, label checks)."""
    model = _tiny_model()
    ids = torch.randint(0, 64, (2, 9))
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, 6:] = 0
    ex = torch._dynamo.explain(lambda i, a: model.token_logprobs(i, a, return_entropy=True))(ids, am)
    assert ex.graph_break_count > 0  # the model's nonzero / .item() (so this test sees real break reasons)
    where = [_innermost_saferlhf_frame(b.user_stack) for b in ex.break_reasons]
    ours = [w for w in where if "saferlhf_fast/ops/" in w or w.endswith("_backend.py")]
    assert not ours, [b.reason.splitlines()[0] for b, w in zip(ex.break_reasons, where) if w in ours]
    assert all("saferlhf_fast/models/" in w for w in where), where


def _gather_loss(logits, labels):
    """-mean log p(label) - 0.01 mean entropy from full logits (``ops.gather_logprobs``)."""
    logp, entropy = ops.gather_logprobs(logits, labels, temperature=0.9, return_entropy=True)
    return -logp.mean() - 0.01 * entropy.mean(), logp


def test_gather_logprobs_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(3)
    logits = torch.randn(2, 5, 33, requires_grad=True)
    labels = torch.randint(0, 33, (2, 5))
    labels[0, 0] = ops.IGNORE_INDEX
    eager_loss, eager_logp = _gather_loss(logits, labels)
    (eager_grad,) = torch.autograd.grad(eager_loss, logits)
    seen = set()
    loss, logp = torch.compile(_gather_loss, backend=_recording_inductor(seen), fullgraph=True)(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    assert {"logprobs_forward", "logprobs_backward"} <= seen, seen
    torch.testing.assert_close(loss, eager_loss, **TOL)
    torch.testing.assert_close(logp, eager_logp, **TOL)
    torch.testing.assert_close(grad, eager_grad, **TOL)


def test_compiled_label_check_raises():
    """Under torch.compile an out-of-range label still stops the kernel (an in-graph assertion)."""
    f = torch.compile(lambda x, y: ops.gather_logprobs(x, y), backend="inductor", fullgraph=True)
    logits = torch.randn(4, 7)
    assert f(logits, torch.tensor([0, 6, -100, 3])).shape == (4,)
    with pytest.raises(RuntimeError, match="out of range"):
        f(logits, torch.tensor([0, 7, 1, 2]))
