"""PIDLagrangeMultiplier (``--lambda_optimizer pid``): hand-computed updates (P only, I only, D with its delay, the
EMAs), non-negativity and the cap, the delay steps, state round trip, against a literal transcription of OmniSafe's
``PIDLagrangian.pid_update``, rank consistency on 2 gloo processes, and PPO-Lag runs with it (CLI, resume)."""
import collections
import json
import math
import os
import socket

import pytest
import torch

from saferlhf_fast import LagrangeMultiplier, PIDLagrangeMultiplier
from saferlhf_fast.cli import main
from saferlhf_fast.lagrange import MULTIPLIERS, make_multiplier
from saferlhf_fast.trainers.config import ConfigError
from saferlhf_fast.trainers.modeling import make_tiny_model
from saferlhf_fast.trainers.ppo import PPOLagConfig, PPOTrainer


def pid(**kw):
    base = dict(init=0.0, kp=0.0, ki=0.0, kd=0.0, d_delay=1, delta_p_ema_alpha=0.0, delta_d_ema_alpha=0.0,
                threshold=0.0, window=1)
    base.update(kw)
    return PIDLagrangeMultiplier(**base)


def feed(m, costs, start_step=0):
    """One update per cost (window 1: J_C is that cost); the lambdas."""
    out = []
    for i, c in enumerate(costs):
        m.observe([c])
        out.append(m.update(start_step + i))
    return out


# ------------------------------------------------------------------------------------------------ hand computed
def test_p_only_is_the_violation():
    m = pid(kp=2.0, threshold=1.0)
    assert feed(m, [3.0, 1.5, 0.0, 4.0]) == [4.0, 1.0, 0.0, 6.0]  # max(0, 2 (J - 1)): 4, 1, -2 -> 0, 6


def test_i_only_accumulates_and_stays_non_negative():
    m = pid(init=0.5, ki=0.25, threshold=1.0)
    # I = 0.5 + 0.25 * (3 - 1) = 1.0; + 0.25 * (5 - 1) = 2.0; + 0.25 * (-11 - 1) = -1 -> 0; + 0.25 * (2 - 1) = 0.25
    assert feed(m, [3.0, 5.0, -11.0, 2.0]) == [1.0, 2.0, 0.0, 0.25]
    assert m.integral == 0.25


def test_d_with_delay_uses_the_cost_k_updates_back():
    m = pid(kd=1.0, d_delay=2)
    # C_s = 0 for s <= 0; D_t = max(0, C_t - C_{t-2}): 1-0, 3-0, 2-1, 7-3, 1-2 -> 0, 2-7 -> 0
    assert feed(m, [1.0, 3.0, 2.0, 7.0, 1.0, 2.0]) == [1.0, 3.0, 1.0, 4.0, 0.0, 0.0]
    m1 = pid(kd=0.5, d_delay=1)
    assert feed(m1, [2.0, 6.0, 4.0, 5.0]) == [1.0, 2.0, 0.0, 0.5]  # 0.5 * max(0, C_t - C_{t-1})


def test_ema_of_p_and_d_signals():
    m = pid(kp=1.0, delta_p_ema_alpha=0.5, threshold=2.0)
    # P_1 = 0.5 * 0 + 0.5 * (6 - 2) = 2; P_2 = 0.5 * 2 + 0.5 * (2 - 2) = 1; P_3 = 0.5 + 0.5 * (4 - 2) = 1.5
    assert feed(m, [6.0, 2.0, 4.0]) == [2.0, 1.0, 1.5]
    m = pid(kd=1.0, delta_d_ema_alpha=0.75, d_delay=1)
    # C_1 = 0.25 * 8 = 2, D = 2; C_2 = 0.75 * 2 + 0.25 * 8 = 3.5, D = 1.5; C_3 = 0.75 * 3.5 + 0 = 2.625, D = 0
    assert feed(m, [8.0, 8.0, 0.0]) == [2.0, 1.5, 0.0]
    assert m.cost_d == 2.625


def test_full_pid_sum_and_window_mean():
    m = pid(init=1.0, kp=0.5, ki=0.1, kd=2.0, d_delay=1, threshold=1.0, window=2)
    m.observe([10.0, 2.0, 4.0])  # window [2, 4]: J = 3, Delta = 2
    # I = 1 + 0.1 * 2 = 1.2; P = 2; D = 3 - 0 = 3; lambda = 0.5 * 2 + 1.2 + 2 * 3 = 8.2
    assert m.update(0) == pytest.approx(8.2, abs=1e-15)


def test_non_negative_and_cap():
    m = pid(init=0.2, kp=1.0, ki=1.0, threshold=0.0)
    assert feed(m, [-5.0]) == [0.0]  # I = max(0, 0.2 - 5) = 0, P = -5: max(0, -5) = 0
    m = pid(init=1.0, kp=10.0, ki=1.0, max=2.5)
    assert feed(m, [1.0, 3.0]) == [2.5, 2.5] and m.integral == 5.0  # the cap bounds lambda, not the integral
    assert feed(m, [-0.5], 2) == [0.0] and m.integral == 4.5  # 10 * (-0.5) + 4.5 = -0.5 -> 0
    assert PIDLagrangeMultiplier(init=4.0, max=2.0).value == 2.0


def test_init_and_delay_steps():
    m = pid(init=0.7, ki=1.0, threshold=0.0, delay_steps=2)
    assert m.value == 0.7
    assert feed(m, [1.0, 1.0]) == [0.7, 0.7]  # steps 0, 1 < delay: no state moves
    assert m.integral == 0.7 and list(m.cost_ds) == [0.0] and m.delta_p == m.cost_d == 0.0
    assert feed(m, [1.0], 2) == [1.7]


# ------------------------------------------------------------------------------------------------ OmniSafe
class OmniSafePID:
    """omnisafe/common/pid_lagrange.py ``PIDLagrangian.pid_update`` (sum_norm=True, diff_norm=False), verbatim."""

    def __init__(self, kp, ki, kd, d_delay, a_p, a_d, init, cost_limit):
        self._pid_kp, self._pid_ki, self._pid_kd = kp, ki, kd
        self._pid_delta_p_ema_alpha, self._pid_delta_d_ema_alpha = a_p, a_d
        self._pid_i = init
        self._cost_ds = collections.deque(maxlen=d_delay)
        self._cost_ds.append(0.0)
        self._delta_p = 0.0
        self._cost_d = 0.0
        self._cost_limit = cost_limit
        self._cost_penalty = 0.0

    def pid_update(self, ep_cost_avg):
        delta = float(ep_cost_avg - self._cost_limit)
        self._pid_i = max(0.0, self._pid_i + delta * self._pid_ki)
        a_p = self._pid_delta_p_ema_alpha
        self._delta_p *= a_p
        self._delta_p += (1 - a_p) * delta
        a_d = self._pid_delta_d_ema_alpha
        self._cost_d *= a_d
        self._cost_d += (1 - a_d) * float(ep_cost_avg)
        pid_d = max(0.0, self._cost_d - self._cost_ds[0])
        pid_o = self._pid_kp * self._delta_p + self._pid_i + self._pid_kd * pid_d
        self._cost_penalty = max(0.0, pid_o)
        self._cost_ds.append(self._cost_d)
        return self._cost_penalty


@pytest.mark.parametrize("kp,ki,kd,d_delay,a_p,a_d,init,threshold",
                         [(0.1, 0.01, 0.01, 10, 0.95, 0.95, 0.001, 0.0), (1.0, 0.3, 0.5, 3, 0.5, 0.8, 1.0, -0.5)])
def test_matches_omnisafe_bit_for_bit(kp, ki, kd, d_delay, a_p, a_d, init, threshold):
    g = torch.Generator().manual_seed(0)
    ours = PIDLagrangeMultiplier(init, kp, ki, kd, d_delay, a_p, a_d, threshold=threshold, window=6)
    theirs = OmniSafePID(kp, ki, kd, d_delay, a_p, a_d, init, threshold)
    window = collections.deque(maxlen=6)
    for step in range(60):
        costs = (0.5 * torch.randn(3, generator=g, dtype=torch.float64) + math.sin(step / 6)).tolist()
        window.extend(costs)
        ours.observe(costs)
        assert ours.update(step) == theirs.pid_update(sum(window) / len(window))


# ------------------------------------------------------------------------------------------------ state
def test_state_roundtrip_continues_identically():
    g = torch.Generator().manual_seed(1)
    costs = (torch.randn(40, generator=g, dtype=torch.float64) + 0.3).tolist()
    a = PIDLagrangeMultiplier(init=0.5, kp=0.7, ki=0.2, kd=0.4, d_delay=4, delta_p_ema_alpha=0.6,
                              delta_d_ema_alpha=0.3, max=3.0, threshold=0.1, window=5, delay_steps=2)
    feed(a, costs[:17])
    b = PIDLagrangeMultiplier()  # other options: all of them come from the state
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() and b.cost_ds.maxlen == 4 and b.episode_costs.maxlen == 5
    assert feed(b, costs[17:], 17) == feed(a, costs[17:], 17)
    loaded = torch.load(_saved(a.state_dict()), weights_only=False)
    c = PIDLagrangeMultiplier()
    c.load_state_dict(loaded)
    assert c.state_dict() == a.state_dict()


def _saved(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_kind_mismatch_and_errors():
    with pytest.raises(ValueError, match="--lambda_optimizer sgd"):
        PIDLagrangeMultiplier().load_state_dict(LagrangeMultiplier().state_dict())
    with pytest.raises(ValueError, match="--lambda_optimizer pid"):
        LagrangeMultiplier().load_state_dict(PIDLagrangeMultiplier().state_dict())
    with pytest.raises(RuntimeError, match="PIDLagrangeMultiplier.update called before any episode cost"):
        PIDLagrangeMultiplier().update(0)
    for kw, match in [(dict(init=-1.0), "lambda_init"), (dict(kp=-0.1), "pid_kp"), (dict(ki=float("inf")), "pid_ki"),
                      (dict(d_delay=0), "pid_d_delay"), (dict(delta_p_ema_alpha=1.0), "pid_delta_p_ema_alpha"),
                      (dict(delta_d_ema_alpha=-0.1), "pid_delta_d_ema_alpha"), (dict(max=0.0), "lambda_max"),
                      (dict(window=0), "episode_cost_window_size")]:
        with pytest.raises(ValueError, match=match):
            PIDLagrangeMultiplier(**kw)
    assert PIDLagrangeMultiplier(init=0.0).value == 0.0  # unlike sgd, lambda may start at 0


def test_registry_builds_from_config():
    assert set(MULTIPLIERS) == {"sgd", "pid"}
    cfg = PPOLagConfig(lambda_optimizer="pid", lambda_init=0.3, pid_kp=0.2, pid_ki=0.05, pid_kd=0.4, pid_d_delay=3,
                       pid_delta_p_ema_alpha=0.1, pid_delta_d_ema_alpha=0.2, lambda_max=4.0, threshold=-1.0,
                       episode_cost_window_size=7, lambda_update_delay_steps=5)
    m = make_multiplier(cfg)
    assert isinstance(m, PIDLagrangeMultiplier) and m.value == 0.3
    assert (m.kp, m.ki, m.kd, m.d_delay, m.delta_p_ema_alpha, m.delta_d_ema_alpha, m.max, m.threshold, m.window,
            m.delay_steps) == (0.2, 0.05, 0.4, 3, 0.1, 0.2, 4.0, -1.0, 7, 5)
    assert isinstance(make_multiplier(PPOLagConfig()), LagrangeMultiplier)  # the default: sgd


@pytest.mark.parametrize("kw,match", [(dict(lambda_optimizer="adam"), "--lambda_optimizer must be one of sgd, pid"),
                                      (dict(lambda_optimizer="pid", pid_kd=-1.0), "--pid_kd must be"),
                                      (dict(lambda_init=0.0), "--lambda_init must be > 0"),
                                      (dict(episode_cost_window_size=0), "--episode_cost_window_size must be >= 1")])
def test_config_errors(kw, match):
    base = dict(actor_model_name_or_path="a", reward_model_name_or_path="r", cost_model_name_or_path="c",
                train_datasets=["x"], output_dir="o")
    with pytest.raises(ConfigError, match=match):
        PPOLagConfig(**base, **kw).validate()
    PPOLagConfig(**base, lambda_optimizer="pid", lambda_init=0.0).validate()  # pid: lambda_init 0 is allowed


# ------------------------------------------------------------------------------------------------ ranks
def _rank_worker(rank, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        m = PIDLagrangeMultiplier(init=0.1, kp=0.5, ki=0.3, kd=0.7, d_delay=2, delta_p_ema_alpha=0.4,
                                  delta_d_ema_alpha=0.2, threshold=0.25, window=4)
        g = torch.Generator().manual_seed(10 + rank)  # each rank its own costs
        values = []
        for step in range(8):
            m.observe((torch.randn(3, generator=g, dtype=torch.float64) + rank).tolist())
            values.append(m.update(step))
        torch.save({"values": values, "windows": list(m.episode_costs)}, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while another still uses it
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_same_lambda_on_every_rank_from_the_global_mean(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["values"] == r1["values"] and r0["windows"] != r1["windows"]
    # one process fed the per-rank means in turn gives the same lambdas
    ref = PIDLagrangeMultiplier(init=0.1, kp=0.5, ki=0.3, kd=0.7, d_delay=2, delta_p_ema_alpha=0.4,
                                delta_d_ema_alpha=0.2, threshold=0.25, window=4)
    gens = [torch.Generator().manual_seed(10 + r) for r in (0, 1)]
    wins = [collections.deque(maxlen=4), collections.deque(maxlen=4)]
    for step in range(8):
        for r in (0, 1):
            wins[r].extend((torch.randn(3, generator=gens[r], dtype=torch.float64) + r).tolist())
        ref.episode_costs.clear()
        ref.observe([sum(w) / len(w) for w in wins])
        assert r0["values"][step] == pytest.approx(ref.update(step), rel=1e-12)


# ------------------------------------------------------------------------------------------------ PPO-Lag with pid
@pytest.fixture(scope="module")
def models(tmp_path_factory, make_score_model):
    root = tmp_path_factory.mktemp("pid_models")
    actor = make_tiny_model(str(root / "actor"), hidden_size=32, num_layers=2, num_heads=2, seed=1)
    return {"actor": actor, "rm": make_score_model(actor, str(root / "rm"), 2),
            "cm": make_score_model(actor, str(root / "cm"), 3, bias=0.3)}


PID_FLAGS = dict(lambda_optimizer="pid", lambda_init=0.5, pid_kp=0.5, pid_ki=0.2, pid_kd=0.3, pid_d_delay=2,
                 pid_delta_p_ema_alpha=0.5, pid_delta_d_ema_alpha=0.5, threshold=-0.5)


def _config(models, out, **kw):
    base = dict(actor_model_name_or_path=models["actor"], reward_model_name_or_path=models["rm"],
                cost_model_name_or_path=models["cm"], train_datasets=["synthetic-prompts/train:0.008"],
                output_dir=str(out), max_length=64, max_new_tokens=8, per_device_prompt_batch_size=4,
                per_device_train_batch_size=2, update_iters=2, progress=False, actor_lr=1e-3, critic_lr=1e-3,
                actor_lr_warmup_ratio=0.3, kl_coeff=0.1, seed=3, **PID_FLAGS)
    base.update(kw)
    cfg = PPOLagConfig(**base)
    cfg.validate()
    return cfg


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "perf/"))}
                for line in f if line.strip()]


def test_cli_ppo_lag_pid_runs_and_logs_lambda(models, tmp_path):
    out = tmp_path / "run"
    flags = [x for k, v in PID_FLAGS.items() for x in ("--" + k, str(v))]
    rc = main(["ppo-lag", "--actor_model_name_or_path", models["actor"], "--reward_model_name_or_path", models["rm"],
               "--cost_model_name_or_path", models["cm"], "--train_datasets", "synthetic-prompts/train:0.006",
               "--output_dir", str(out), "--max_length", "48", "--max_new_tokens", "6",
               "--per_device_prompt_batch_size", "4", "--per_device_train_batch_size", "4", "--kl_coeff", "0.01",
               "--progress", "false", *flags])
    assert rc == 0
    train = [r for r in _rows(out) if "train/actor_loss" in r]
    assert len(train) == 3
    # replay the controller on the logged J_C: the logged lambdas are its outputs
    replay = PIDLagrangeMultiplier(0.5, 0.5, 0.2, 0.3, 2, 0.5, 0.5, threshold=-0.5, window=1)
    for step, row in enumerate(train):
        replay.episode_costs.clear()
        replay.observe([row["train/episode_cost"]])
        assert row["train/lambda"] == pytest.approx(replay.update(step), rel=1e-6)
    assert len({r["train/lambda"] for r in train}) == 3  # it moved every step
    assert json.load(open(out / "arguments.json"))["lambda_optimizer"] == "pid"


def test_pid_resume_equals_uninterrupted_run(models, tmp_path):
    from safetensors.torch import load_file

    PPOTrainer(_config(models, tmp_path / "a")).train()
    r = PPOTrainer(_config(models, tmp_path / "b", max_steps=1)).train()
    assert r["stopped_at"] == 1
    state = torch.load(tmp_path / "b" / "checkpoint-1" / "trainer_state.pt", weights_only=False)["lagrange"]
    assert state["kind"] == "pid" and len(state["cost_ds"]) == 2 and state["delta_p"] != 0.0
    probe = PPOTrainer(_config(models, tmp_path / "b", resume="auto"))
    probe.load_checkpoint(str(tmp_path / "b" / "checkpoint-1"))
    assert probe.lagrange.state_dict() == state
    PPOTrainer(_config(models, tmp_path / "b", resume="auto")).train()
    for name in ("model.safetensors", "reward_critic/model.safetensors", "cost_critic/model.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ra, rb = (json.load(open(tmp_path / x / "results.json")) for x in "ab")
    assert ra["lambda"] == rb["lambda"] and ra["rl_steps"] == rb["rl_steps"] == 12
    rows_a, rows_b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert rows_a == rows_b
    assert len({r["train/lambda"] for r in rows_a if "train/lambda" in r}) > 4


def test_resume_with_the_other_optimizer_is_refused(models, tmp_path):
    PPOTrainer(_config(models, tmp_path / "c", max_steps=1)).train()
    # The run-settings check names the change first; allowed through, the multiplier's own state check refuses it.
    with pytest.raises(ValueError, match="lambda_optimizer 'pid' -> 'sgd'"):
        PPOTrainer(_config(models, tmp_path / "c", resume="auto", lambda_optimizer="sgd", lambda_init=1.0)).train()
    with pytest.raises(ValueError, match="resume with --lambda_optimizer pid"):
        PPOTrainer(_config(models, tmp_path / "c", resume="auto", lambda_optimizer="sgd", lambda_init=1.0,
                           resume_allow_changes=["lambda_optimizer", "lambda_init"])).train()
