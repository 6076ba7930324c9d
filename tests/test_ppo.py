"""PPO / PPO-Lagrangian / reward shaping against a step-by-step transcription of the reference implementation's
math (full forwards, full log_softmax + gather, ``values[:, :-1]``, the scatter-add KL rewards, the Python GAE loop
from ``start = P - 1``, the eager losses, the Lagrange SGD step), plus order of the lambda update, micro-batches,
temperature != 1, resume equality, the NaN guards and the CLI."""
import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from saferlhf_fast.cli import main
from saferlhf_fast.models import from_pretrained
from saferlhf_fast.trainers.base import optimizer_groups
from saferlhf_fast.trainers.modeling import make_tiny_model
from saferlhf_fast.trainers.ppo import (
    ALGORITHMS,
    CONFIGS,
    NonFiniteError,
    PPOConfig,
    PPOLagConfig,
    PPOTrainer,
    RewardShapingConfig,
    Rollout,
    compute_advantages,
    response_labels,
    retokenize,
    trim,
)

SPEC_METRICS = ["actor_loss", "reward_critic_loss", "cost_critic_loss", "lambda", "episode_cost", "reward", "cost",
                "reward_with_kl_penalty", "reward_advantage", "reward_return", "reward_value", "cost_with_kl_penalty",
                "cost_advantage", "cost_return", "cost_value", "kl_divergence", "actor_lr", "reward_critic_lr",
                "cost_critic_lr", "mean_generated_length", "max_generated_length"]


# ------------------------------------------------------------------------------------------------ the reference
def ref_gather_log_probabilities(logits, labels):
    return F.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def ref_add_kl_divergence_regularization(reward, cost, log_probs, ref_log_probs, sequence_mask, kl_coeff, clip):
    end_index = torch.cat([m.nonzero()[-1] for m in sequence_mask])
    kl_divergence_estimate = log_probs - ref_log_probs
    kl_penalty_rewards = -kl_coeff * kl_divergence_estimate
    rewards = torch.scatter_add(kl_penalty_rewards, -1, end_index.unsqueeze(-1), reward.unsqueeze(-1))
    costs = torch.scatter_add(-kl_penalty_rewards, -1, end_index.unsqueeze(-1), cost.unsqueeze(-1))
    return rewards.clamp(-clip, clip), costs.clamp(-clip, clip)


def ref_get_advantages_and_returns(values, rewards, sequence_mask, start, gamma=1.0, lam=0.95):
    last_gae_lambda = 0.0
    advantages_reversed = []
    values = values * sequence_mask
    rewards = rewards * sequence_mask
    length = rewards.size(-1)
    for t in reversed(range(start, length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae_lambda = delta + gamma * lam * last_gae_lambda
        advantages_reversed.append(last_gae_lambda)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages.detach(), advantages + values[:, start:]


def ref_masked_mean(x, mask):
    return ((x * mask).sum(dim=-1) / mask.sum(dim=-1)).mean()


def ref_actor_loss(log_probs, old_log_probs, reward_adv, cost_adv, mask, multiplier, eps):
    advantages = (reward_adv - multiplier * cost_adv) / (1.0 + multiplier) if cost_adv is not None else reward_adv
    ratios = torch.exp(log_probs - old_log_probs)
    surrogate1 = advantages * ratios
    surrogate2 = advantages * torch.clamp(ratios, 1.0 - eps, 1.0 + eps)
    return -ref_masked_mean(torch.minimum(surrogate1, surrogate2), mask)


def ref_critic_loss(values, old_values, returns, mask, cv):
    values_clipped = torch.clamp(values, old_values - cv, old_values + cv)
    return 0.5 * ref_masked_mean(torch.maximum(torch.square(values - returns), torch.square(values_clipped - returns)),
                                 mask)


def ref_lagrange_step(log_lambda, episode_costs, threshold, lr, step, delay, log_max=None):
    """The reference's torch SGD on -(J_C - threshold) * exp(log_lambda)."""
    log_lambda = torch.tensor(log_lambda, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([log_lambda], lr=lr)
    if step >= delay:
        episode_cost = torch.tensor(episode_costs, dtype=torch.float64).mean()
        loss = -(episode_cost - threshold) * log_lambda.exp()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_max is not None:
            log_lambda.data.clamp_(max=log_max)
    return float(log_lambda.detach())


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory, make_score_model):
    root = tmp_path_factory.mktemp("ppo_models")
    actor = make_tiny_model(str(root / "actor"), hidden_size=32, num_layers=2, num_heads=2, seed=1)
    rm = make_score_model(actor, str(root / "rm"), 2)
    cm = make_score_model(actor, str(root / "cm"), 3, bias=0.3)
    nan_rm = make_score_model(actor, str(root / "nan_rm"), 4, bias=float("nan"))
    return {"actor": actor, "rm": rm, "cm": cm, "nan_rm": nan_rm}


def make_config(models, out, cls=PPOLagConfig, **kw):
    base = dict(actor_model_name_or_path=models["actor"], reward_model_name_or_path=models["rm"],
                train_datasets=["synthetic-prompts/train:0.006"], output_dir=str(out), max_length=64,
                max_new_tokens=8, per_device_prompt_batch_size=4, per_device_train_batch_size=4, progress=False,
                actor_lr=1e-3, critic_lr=1e-3, actor_lr_warmup_ratio=0.0, kl_coeff=0.1, seed=3)
    if cls is not PPOConfig:
        base["cost_model_name_or_path"] = models["cm"]
    if cls is PPOLagConfig:
        base["lambda_lr"] = 0.5
    base.update(kw)
    cfg = cls(**base)
    cfg.validate()
    return cfg


def first_batch(trainer):
    from saferlhf_fast.trainers.base import collator_of

    ds = trainer.train_dataset
    n = trainer.config.per_device_prompt_batch_size
    return collator_of(ds)([ds[i] for i in range(n)])


def snapshot(trainer):
    return {
        "actor": copy.deepcopy(trainer.actor),
        "critics": [copy.deepcopy(c) for c in trainer.critics],
        "log_lambda": trainer.lagrange.log_lambda if trainer.lagrange is not None else None,
        "costs": list(trainer.lagrange.episode_costs) if trainer.lagrange is not None else None,
        "actor_opt": copy.deepcopy(trainer.actor_optimizer.state_dict()),
        "critic_opts": [copy.deepcopy(o.state_dict()) for o in trainer.critic_optimizers],
    }


def adamw_step(model, loss, state, max_norm=1.0):
    """AdamW (betas 0.9 / 0.95) with the trainer's optimizer state (moments, step, current lr)."""
    opt = torch.optim.AdamW(optimizer_groups(model, 0.0), lr=0.0, betas=(0.9, 0.95), eps=1e-8)
    opt.load_state_dict(state)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()


def reference_step(trainer, snap, mb: Rollout, old_from_forward: bool):
    """The reference's rl_step on copies of the models: returns (losses, lambda, updated copies)."""
    cfg = trainer.config
    seq, am, p = mb.input_ids, mb.attention_mask, mb.prompt_length
    start = p - 1
    actor, critics = snap["actor"], snap["critics"]
    actor.train()
    log_probs = ref_gather_log_probabilities(actor(seq, am).logits[:, :-1], seq[:, 1:])
    with torch.no_grad():
        ref_log_probs = ref_gather_log_probabilities(trainer.reference(seq, am).logits[:, :-1], seq[:, 1:])
        reward = trainer.reward_model(seq, am).end_scores.float()
        cost = trainer.cost_model(seq, am).end_scores.float() if trainer.cost_model is not None else None
    values = [c(seq, am).scores[:, :-1].float() for c in critics]
    sequence_mask = am[:, 1:].float()
    # The reference's rollout forwards (old quantities): same weights, no grad.
    old_log_probs = log_probs.detach()
    old_values = [v.detach() for v in values]
    if not old_from_forward:  # the weights moved since the rollout: the rollout-time quantities
        old_log_probs = old_log_probs.clone()
        old_log_probs[:, start:] = mb.old_logprobs
        old_values = [v.clone() for v in old_values]
        for v, ov in zip(old_values, mb.old_values):
            v[:, start:] = ov
    assert torch.allclose(reward, mb.reward, atol=1e-5) and torch.allclose(ref_log_probs[:, start:] * mb.response_mask,
                                                                           mb.ref_logprobs, atol=1e-5)
    lam_value = None
    if trainer.config.algorithm == "ppo-lag":
        log_lambda = ref_lagrange_step(snap["log_lambda"], snap["costs"], cfg.threshold, cfg.lambda_lr,
                                       trainer.global_step, cfg.lambda_update_delay_steps,
                                       math.log(cfg.lambda_max) if cfg.lambda_max else None)
        lam_value = math.exp(log_lambda)
        old_rewards, old_costs = ref_add_kl_divergence_regularization(reward, cost, old_log_probs, ref_log_probs,
                                                                      sequence_mask, cfg.kl_coeff,
                                                                      cfg.clip_range_score)
        r_adv, r_ret = ref_get_advantages_and_returns(old_values[0], old_rewards, sequence_mask, start)
        c_adv, c_ret = ref_get_advantages_and_returns(old_values[1], old_costs, sequence_mask, start)
        returns = [r_ret, c_ret]
    else:
        shaped = reward - cfg.lambda_init * cost if trainer.config.algorithm == "ppo-reward-shaping" else reward
        old_rewards, _ = ref_add_kl_divergence_regularization(shaped, torch.zeros_like(shaped), old_log_probs,
                                                              ref_log_probs, sequence_mask, cfg.kl_coeff,
                                                              cfg.clip_range_score)
        r_adv, r_ret = ref_get_advantages_and_returns(old_values[0], old_rewards, sequence_mask, start)
        c_adv, returns = None, [r_ret]
    mask = sequence_mask[:, start:]
    actor_loss = ref_actor_loss(log_probs[:, start:], old_log_probs[:, start:], r_adv, c_adv, mask, lam_value,
                                cfg.clip_range_ratio)
    critic_losses = [ref_critic_loss(v[:, start:], ov[:, start:], ret, mask, cfg.clip_range_value)
                     for v, ov, ret in zip(values, old_values, returns)]
    losses = {"actor": float(actor_loss), "critics": [float(x) for x in critic_losses]}
    adamw_step(actor, actor_loss, snap["actor_opt"])
    for c, loss, state in zip(critics, critic_losses, snap["critic_opts"]):
        adamw_step(c, loss, state)
    return losses, lam_value, {"r_adv": r_adv, "c_adv": c_adv, "returns": returns}


def assert_same_weights(a, b, atol=2e-5):
    # After AdamW steps at lr 1e-3, 2e-5 is 2% of a step.  The two sides may sum in different orders (oneDNN vs
    # MKL matmuls, end rows only vs the full score forward), and AdamW's first steps are nearly sign(g) / (1 + eps/|g|),
    # which turns fp32 rounding in a near-zero gradient element into a few 1e-6 of weight; a wrong formula moves
    # weights by ~lr.
    for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert n1 == n2
        assert torch.allclose(p1, p2, atol=atol, rtol=1e-5), f"{n1}: max diff {float((p1 - p2).abs().max())}"


def changed(a, b):
    return any(not torch.equal(p1, p2) for p1, p2 in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------------------------------------------ unit pieces
def test_response_alignment():
    """Response token t sits at P + t; its log-prob and its state's value live at position P - 1 + t."""
    seq = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 0],     # prompt (left-padded) 5 6 | response 7 8 9, pad
                        [4, 5, 6, 7, 10, 1, 0, 0]])   # prompt 4 5 6 7 | response 10 eos(1), pad pad
    p = 4
    resp_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    labels = response_labels(seq, resp_mask, p)
    assert labels[0].tolist() == [-100, -100, -100, 7, 8, 9, -100, -100]
    assert labels[1].tolist() == [-100, -100, -100, 10, 1, -100, -100, -100]
    mb = Rollout(seq, None, resp_mask.float(), p, labels, None, None, None)
    pos = torch.arange(8).expand(2, 8)
    assert mb.response_slice(pos)[0].tolist() == [3, 4, 5, 6]
    # the reference: values[:, :-1][:, start:] with start = P - 1
    assert torch.equal(mb.response_slice(pos), pos[:, :-1][:, p - 1:])


def test_trim_is_exact(models):
    m = from_pretrained(models["actor"])
    seq = torch.tensor([[0, 0, 0, 5, 6, 7, 8, 0, 0], [0, 0, 4, 5, 6, 9, 1, 0, 0]])
    am = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    rm = am[:, 5:]
    seq2, am2, rm2, p2, t2 = trim(seq, am, rm, 5)
    assert (p2, t2) == (3, 2) and seq2.shape == (2, 5)
    full = m.token_logprobs(seq, am, labels=response_labels(seq, rm, 5))[:, 4:4 + 2]
    short = m.token_logprobs(seq2, am2, labels=response_labels(seq2, rm2, p2))[:, p2 - 1:p2 - 1 + t2]
    assert torch.allclose(full, short, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["ppo-lag", "ppo", "ppo-reward-shaping"])
def test_compute_advantages_matches_reference(algorithm):
    torch.manual_seed(0)
    b, p, t = 3, 4, 6
    length = p + t
    am = torch.ones(b, length)
    am[0, :2] = 0  # left padding
    am[1, p + 3:] = 0  # response of 3 tokens
    am[2, p + 1:] = 0  # response of 1 token
    seq_mask = am[:, 1:]
    lp, ref_lp = torch.randn(b, length - 1), torch.randn(b, length - 1)
    values = torch.randn(2, b, length - 1)
    reward, cost = torch.randn(b) * 3, torch.randn(b) * 3
    start = p - 1
    rmask = seq_mask[:, start:]
    nu = 0.7
    config = CONFIGS[algorithm](**({"lambda_init": nu} if algorithm == "ppo-reward-shaping" else {}))
    rewards, adv, ret = compute_advantages(
        ALGORITHMS[algorithm](config), reward, cost, lp[:, start:] * rmask, ref_lp[:, start:] * rmask,
        values[:, :, start:] if algorithm == "ppo-lag" else values[:1, :, start:], rmask, kl_coeff=0.05,
        clip_range_score=2.5)
    if algorithm == "ppo-lag":
        r, c = ref_add_kl_divergence_regularization(reward, cost, lp, ref_lp, seq_mask, 0.05, 2.5)
        streams = [(r, values[0]), (c, values[1])]
    else:
        shaped = reward - nu * cost if algorithm == "ppo-reward-shaping" else reward
        r, _ = ref_add_kl_divergence_regularization(shaped, torch.zeros(b), lp, ref_lp, seq_mask, 0.05, 2.5)
        streams = [(r, values[0])]
    assert adv.shape[0] == len(streams)
    for i, (rw, v) in enumerate(streams):
        a_ref, g_ref = ref_get_advantages_and_returns(v, rw, seq_mask, start)
        assert torch.allclose(rewards[i], rw[:, start:] * rmask, atol=1e-6)
        assert torch.allclose(adv[i] * rmask, a_ref * rmask, atol=1e-5)
        assert torch.allclose(ret[i] * rmask, g_ref * rmask, atol=1e-5)


def test_retokenize_roundtrip(models):
    from saferlhf_fast.data import format_prompt, load_tokenizer

    tok = load_tokenizer(models["actor"])
    text = format_prompt("how do i bake bread ?") + " sure . first mix the flour ."
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    seq = torch.tensor([[tok.pad_token_id] * 2 + ids])
    am = seq != tok.pad_token_id
    out, mask = retokenize(seq, am, tok, tok, 128)
    assert out[0][mask[0]].tolist() == ids


# ------------------------------------------------------------------------------------------------ full steps
@pytest.mark.parametrize("cls", [PPOLagConfig, PPOConfig, RewardShapingConfig])
def test_rl_step_matches_reference(models, tmp_path, cls):
    """One rollout split in two micro-batches: the first uses the fused path (old = the training forward), the
    second the engine's log-probs and pre-scored values.  Each rl_step equals the reference's, weights included."""
    trainer = PPOTrainer(make_config(models, tmp_path / "out", cls, per_device_train_batch_size=2))
    micro = trainer.rollout(first_batch(trainer), seed=11)
    assert len(micro) == 2 and micro[0].old_logprobs is None and micro[1].old_logprobs is not None
    n_critics = 2 if cls is PPOLagConfig else 1
    assert len(trainer.critics) == n_critics
    if cls is PPOLagConfig:  # the whole rollout's end costs are in the window before the first update
        assert list(trainer.lagrange.episode_costs) == pytest.approx(
            torch.cat([mb.cost for mb in micro]).tolist())
    # micro-batch 1's old quantities are the rollout-time policy / critics
    mb1 = micro[1]
    with torch.no_grad():
        lp = trainer.actor.token_logprobs(mb1.input_ids, mb1.attention_mask, labels=mb1.labels)
        assert torch.allclose(mb1.response_slice(lp) * mb1.response_mask, mb1.old_logprobs, atol=2e-5)
        for i, c in enumerate(trainer.critics):
            assert torch.allclose(mb1.response_slice(c(mb1.input_ids, mb1.attention_mask).scores), mb1.old_values[i])
    for k, mb in enumerate(micro):
        snap = snapshot(trainer)
        losses, lam, ref = reference_step(trainer, snap, mb, old_from_forward=(k == 0))
        info = trainer.rl_step(mb)
        trainer.global_step += 1
        assert info["train/actor_loss"] == pytest.approx(losses["actor"], rel=1e-4, abs=1e-6)
        assert info["train/reward_critic_loss"] == pytest.approx(losses["critics"][0], rel=1e-4, abs=1e-6)
        if cls is PPOLagConfig:
            assert info["train/cost_critic_loss"] == pytest.approx(losses["critics"][1], rel=1e-4, abs=1e-6)
            assert info["train/lambda"] == pytest.approx(lam, rel=1e-9)
            assert trainer.lagrange.value == pytest.approx(lam, rel=1e-9)
        assert torch.allclose(mb.advantages[0] * mb.response_mask, ref["r_adv"] * mb.response_mask, atol=1e-5)
        assert_same_weights(trainer.actor, snap["actor"])
        for c, rc in zip(trainer.critics, snap["critics"]):
            assert_same_weights(c, rc)
        expected = SPEC_METRICS if cls is PPOLagConfig else [
            k for k in SPEC_METRICS if not k.startswith(("cost", "lambda", "episode_cost"))]
        if cls is RewardShapingConfig:  # the reference's names: the shaped stream, and J_C of the window
            expected = [k.replace("reward_", "shaped_reward_") if k.startswith("reward_") and "critic" not in k
                        else k for k in expected] + ["shaped_reward", "episode_cost"]
        assert all(f"train/{k}" in info for k in expected)
        assert ("train/cost" in info) == (cls is not PPOConfig)


def test_step_changes_weights_and_lambda_moves_first(models, tmp_path):
    trainer = PPOTrainer(make_config(models, tmp_path / "out", lambda_lr=2.0, threshold=-5.0))
    before = snapshot(trainer)
    micro = trainer.rollout(first_batch(trainer), seed=5)
    j_c = sum(trainer.lagrange.episode_costs) / len(trainer.lagrange.episode_costs)
    expected = math.exp(math.log(1.0) + 2.0 * 1.0 * (j_c + 5.0))
    info = trainer.rl_step(micro[0])
    assert info["train/lambda"] == pytest.approx(expected, rel=1e-9)
    assert info["train/episode_cost"] == pytest.approx(j_c)
    # the loss used the *updated* lambda: recompute with the same advantages and both multipliers
    mb = micro[0]
    with torch.no_grad():
        lp = mb.old_logprobs  # ratio 1 on the fused first pass
        adv_new = (mb.advantages[0] - expected * mb.advantages[1]) / (1 + expected)
        adv_old = (mb.advantages[0] - 1.0 * mb.advantages[1]) / 2.0
        loss_new = -ref_masked_mean(adv_new * torch.exp(lp - lp), mb.response_mask)
        loss_old = -ref_masked_mean(adv_old, mb.response_mask)
    assert info["train/actor_loss"] == pytest.approx(float(loss_new), rel=1e-5, abs=1e-7)
    assert abs(float(loss_new) - float(loss_old)) > 1e-4
    assert changed(trainer.actor, before["actor"])
    assert all(changed(c, b) for c, b in zip(trainer.critics, before["critics"]))


def test_lambda_delay_and_cap(models, tmp_path):
    trainer = PPOTrainer(make_config(models, tmp_path / "out", lambda_lr=5.0, threshold=-10.0,
                                     lambda_update_delay_steps=1, lambda_max=2.0, per_device_train_batch_size=2))
    micro = trainer.rollout(first_batch(trainer), seed=5)
    info = trainer.rl_step(micro[0])
    trainer.global_step += 1
    assert info["train/lambda"] == 1.0  # step 0 < delay
    info = trainer.rl_step(micro[1])
    assert info["train/lambda"] == pytest.approx(2.0)  # moved, capped at lambda_max


def test_temperature_not_one_recomputes_old_logprobs(models, tmp_path):
    """At temperature != 1 the engine's log-probs are tempered; the reference's old log-probs are at temperature 1.
    The fused path and the separate-forward path must then give the same update."""
    results = []
    for separate in (False, True):
        trainer = PPOTrainer(make_config(models, tmp_path / f"out{separate}", temperature=0.7,
                                         per_device_train_batch_size=2, separate_scoring=separate))
        micro = trainer.rollout(first_batch(trainer), seed=9)
        mb1 = micro[1]
        with torch.no_grad():
            lp = trainer.actor.token_logprobs(mb1.input_ids, mb1.attention_mask, labels=mb1.labels)
        assert torch.allclose(mb1.old_logprobs, mb1.response_slice(lp) * mb1.response_mask, atol=1e-6)
        for mb in micro:
            trainer.rl_step(mb)
            trainer.global_step += 1
        results.append(trainer)
    assert_same_weights(results[0].actor, results[1].actor, atol=1e-6)
    for a, b in zip(results[0].critics, results[1].critics):
        assert_same_weights(a, b, atol=1e-6)


def _final_params(out):
    from safetensors.torch import load_file

    state = {"actor": load_file(os.path.join(out, "model.safetensors"))}
    for name in ("reward_critic", "cost_critic"):
        state[name] = load_file(os.path.join(out, name, "model.safetensors"))
    return state


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "perf/"))}
                for line in f if line.strip()]


def test_resume_equals_uninterrupted_run(models, tmp_path):
    kw = dict(train_datasets=["synthetic-prompts/train:0.008"], per_device_prompt_batch_size=4,
              per_device_train_batch_size=2, update_iters=2, actor_lr_warmup_ratio=0.3, lambda_max=5.0)
    PPOTrainer(make_config(models, tmp_path / "a", **kw)).train()
    r = PPOTrainer(make_config(models, tmp_path / "b", max_steps=1, **kw)).train()
    assert r["stopped_at"] == 1 and os.path.isdir(tmp_path / "b" / "checkpoint-1")
    PPOTrainer(make_config(models, tmp_path / "b", resume="auto", **kw)).train()
    a, b = _final_params(tmp_path / "a"), _final_params(tmp_path / "b")
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    ra, rb = json.load(open(tmp_path / "a" / "results.json")), json.load(open(tmp_path / "b" / "results.json"))
    assert ra["lambda"] == rb["lambda"] and ra["rl_steps"] == rb["rl_steps"] == 3 * 2 * 2
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")


def test_nan_reward_stops_with_checkpoint_intact(models, tmp_path):
    out = tmp_path / "out"
    kw = dict(train_datasets=["synthetic-prompts/train:0.008"])
    PPOTrainer(make_config(models, out, max_steps=1, **kw)).train()
    ckpt = out / "checkpoint-1"
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    trainer = PPOTrainer(make_config(models, out, resume="auto", reward_model_name_or_path=models["nan_rm"],
                                     resume_allow_changes=["reward_model_name_or_path"], **kw))
    actor_before = copy.deepcopy(trainer.actor)
    with pytest.raises(NonFiniteError, match="reward-model end scores.*checkpoint-1"):
        trainer.train()
    assert not changed(trainer.actor, actor_before)
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(out)) == sorted(["checkpoint-1", "metrics.jsonl", "arguments.json"])


def test_nan_gradient_stops_before_any_update(models, tmp_path):
    trainer = PPOTrainer(make_config(models, tmp_path / "out"))
    micro = trainer.rollout(first_batch(trainer), seed=1)
    before = snapshot(trainer)
    p = next(trainer.critics[1].parameters())
    p.register_hook(lambda g: g * float("nan"))
    with pytest.raises(NonFiniteError, match="cost_critic gradient"):
        trainer.rl_step(micro[0])
    assert not changed(trainer.actor, before["actor"])
    assert not any(changed(c, b) for c, b in zip(trainer.critics, before["critics"]))
    assert all(q.grad is None for q in trainer.actor.parameters())


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_ppo_lag_end_to_end(models, tmp_path):
    out = tmp_path / "run"
    rc = main(["ppo-lag", "--actor_model_name_or_path", models["actor"], "--reward_model_name_or_path", models["rm"],
               "--cost_model_name_or_path", models["cm"], "--train_datasets", "synthetic-prompts/train:0.006",
               "--eval_datasets", "synthetic-prompts/test:0.01", "--output_dir", str(out), "--max_length", "48",
               "--max_new_tokens", "6", "--per_device_prompt_batch_size", "4", "--per_device_train_batch_size", "4",
               "--lambda_max", "5.0", "--kl_coeff", "0.01", "--progress", "false"])
    assert rc == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train_rows = [r for r in rows if "train/actor_loss" in r]
    assert len(train_rows) == 3
    for key in SPEC_METRICS:
        assert f"train/{key}" in train_rows[0], key
    for key in ("generation", "scoring", "gae", "actor", "critics", "step"):
        assert f"time/{key}" in train_rows[0]
    assert train_rows[0]["perf/tokens_per_s"] > 0
    assert any("eval/reward" in r and "eval/cost" in r for r in rows)
    assert os.path.isfile(out / "model.safetensors") and os.path.isfile(out / "cost_critic" / "config.json")
    reloaded = from_pretrained(str(out))
    assert reloaded.config.vocab_size > 0


@pytest.mark.parametrize("command", ["ppo", "ppo-reward-shaping"])
def test_cli_baselines(models, tmp_path, command):
    out = tmp_path / command
    args = [command, "--actor_model_name_or_path", models["actor"], "--reward_model_name_or_path", models["rm"],
            "--train_datasets", "synthetic-prompts/train:0.003", "--output_dir", str(out), "--max_length", "48",
            "--max_new_tokens", "6", "--per_device_prompt_batch_size", "4", "--progress", "false"]
    if command == "ppo-reward-shaping":
        args += ["--cost_model_name_or_path", models["cm"], "--lambda_init", "2.0"]
    assert main(args) == 0
    row = json.loads(open(out / "metrics.jsonl").readline())
    assert "train/lambda" not in row and "train/cost_critic_loss" not in row
    assert ("train/cost" in row) == (command == "ppo-reward-shaping")
    assert not os.path.exists(out / "cost_critic")
    if command == "ppo-reward-shaping":  # the reference's names for the shaped stream, and J_C of the window
        assert row["train/shaped_reward"] == pytest.approx(row["train/reward"] - 2.0 * row["train/cost"], abs=1e-5)
        for key in ("with_kl_penalty", "advantage", "return", "value"):
            assert f"train/shaped_reward_{key}" in row and f"train/reward_{key}" not in row
        assert row["train/episode_cost"] == pytest.approx(row["train/cost"], abs=1e-5)  # first rollout: the window
    else:
        assert "train/episode_cost" not in row and "train/reward_advantage" in row


def test_cli_errors(models, tmp_path, capsys):
    out = tmp_path / "never"
    rc = main(["ppo-lag", "--actor_model_name_or_path", models["actor"], "--reward_model_name_or_path", models["rm"],
               "--train_datasets", "synthetic-prompts/train", "--output_dir", str(out)])
    assert rc == 2 and "--cost_model_name_or_path" in capsys.readouterr().err
    rc = main(["ppo-lag", "--actor_model_name_or_path", models["actor"], "--reward_model_name_or_path", models["rm"],
               "--cost_model_name_or_path", models["cm"], "--train_datasets", "no-such-dataset",
               "--output_dir", str(out)])
    assert rc == 2 and "unknown dataset name" in capsys.readouterr().err
    assert not out.exists()
    rc = main(["ppo-lag", "--actor_model_name_or_path", models["actor"], "--reward_model_name_or_path",
               models["nan_rm"], "--cost_model_name_or_path", models["cm"], "--train_datasets",
               "synthetic-prompts/train:0.003", "--output_dir", str(out), "--max_new_tokens", "4",
               "--progress", "false"])
    assert rc == 3 and "non-finite reward-model end scores" in capsys.readouterr().err


def test_ptx_step_and_num_return_sequences(models, tmp_path):
    """PTX after each RL step: its own actor optimizer step, and the actor's schedule advances on it too (as
    DeepSpeed's engine.step() does in the reference); num_return_sequences repeats each prompt."""
    trainer = PPOTrainer(make_config(models, tmp_path / "out", ptx_datasets=["synthetic-sft/train:0.003"],
                                     ptx_coeff=2.0, num_return_sequences=2, per_device_prompt_batch_size=2,
                                     per_device_train_batch_size=2))
    rows = trainer.train_one_rollout(first_batch(trainer))
    assert len(rows) == 2  # 2 prompts x 2 samples, micro-batches of 2
    assert all(r["train/ptx_loss"] > 0 for r in rows)
    assert trainer.actor_scheduler.last_epoch == 4 and trainer.critic_schedulers[0].last_epoch == 2
    assert trainer.ptx_position == 4 and rows[-1]["time/ptx"] > 0


def test_lambda_overflow_is_reported(models, tmp_path):
    trainer = PPOTrainer(make_config(models, tmp_path / "out", lambda_lr=1e6, threshold=-50.0))
    micro = trainer.rollout(first_batch(trainer), seed=2)
    with pytest.raises(NonFiniteError, match="lambda overflowed.*--lambda_max"):
        trainer.rl_step(micro[0])


@pytest.mark.parametrize("accum, steps", [(1, 4), (2, 2), (3, 2)])
def test_gradient_accumulation_steps_group_rl_micro_batches(models, tmp_path, accum, steps):
    """--gradient_accumulation_steps G: the optimizers step every G RL micro-batches and at a rollout's last one
    (4 micro-batches: G=1 -> 4 steps, 2 -> 2, 3 -> 2), the schedules count those steps, and no gradient is left
    pending after the rollout (a checkpoint between rollouts holds everything)."""
    cfg = make_config(models, tmp_path / f"g{accum}", per_device_prompt_batch_size=8, per_device_train_batch_size=2,
                      gradient_accumulation_steps=accum, lambda_max=5.0)
    trainer = PPOTrainer(cfg)
    assert trainer.rl_steps_per_rollout() == 4
    assert trainer.optimizer_updates() == trainer.total_steps() * steps
    trainer.train_one_rollout(first_batch(trainer))
    adam_steps = {int(s["step"]) for s in trainer.actor_optimizer.state.values()}
    assert adam_steps == {steps} and trainer.actor_scheduler.last_epoch == steps
    for opt in trainer.critic_optimizers:
        assert {int(s["step"]) for s in opt.state.values()} == {steps}
    assert all(p.grad is None for p in trainer.actor.parameters())


def test_a_new_algorithm_is_one_entry(models, tmp_path):
    """docs/rl.md's example: a fourth algorithm is one registered strategy (with its config); its command, rollout,
    streams, critics, metrics and results follow from the entry."""
    from dataclasses import dataclass

    from saferlhf_fast.cli import build_parser
    from saferlhf_fast.trainers import algorithms as A
    from saferlhf_fast.trainers.config import ALGORITHM, option

    @dataclass
    class HingeShapingConfig(A.CostPPOConfig):
        threshold: float = option(0.0, "costs above this are penalised", group=ALGORITHM)
        lambda_init: float = option(1.0, "penalty per unit of cost above the threshold", group=ALGORITHM)
        algorithm = "ppo-hinge"

    class HingeShaping(A.Algorithm):
        name, config_class, streams, uses_cost = "ppo-hinge", HingeShapingConfig, ("shaped_reward",), True
        help = "PPO on R - nu * max(0, C - d)"

        def end_reward(self, reward, cost):
            return reward - self.config.lambda_init * (cost - self.config.threshold).clamp(min=0)

    A.register(HingeShaping)
    try:
        sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
        assert "ppo-hinge" in sub.choices
        out = tmp_path / "hinge"
        assert main(["ppo-hinge", "--actor_model_name_or_path", models["actor"], "--reward_model_name_or_path",
                     models["rm"], "--cost_model_name_or_path", models["cm"], "--threshold", "0.1",
                     "--lambda_init", "3.0", "--train_datasets", "synthetic-prompts/train:0.003", "--output_dir",
                     str(out), "--max_length", "48", "--max_new_tokens", "6", "--per_device_prompt_batch_size", "4",
                     "--progress", "false"]) == 0
    finally:
        del A.ALGORITHMS["ppo-hinge"]
    row = json.loads(open(out / "metrics.jsonl").readline())
    assert "train/shaped_reward_advantage" in row and "train/lambda" not in row
    assert os.path.isfile(out / "model.safetensors") and os.path.isdir(out / "reward_critic")
    assert json.load(open(out / "arguments.json"))["threshold"] == 0.1
