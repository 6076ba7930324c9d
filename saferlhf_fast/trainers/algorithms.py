"""The algorithms of the PPO family as small registered strategies (:data:`ALGORITHMS`).

Every algorithm shares the rollout, the critics' loss and the optimisation (``trainers.ppo``); an entry says only
what differs: the critics it trains, the streams its per-token rewards are made of, its actor loss, its multiplier
and its metrics.  With per-token rewards ``r`` (one row per stream) from ``ops.kl_penalized_rewards`` (the KL
penalty ``-beta (log pi_old - log pi_ref)`` at every response token, the end score added at the last one, clipped to
``+-clip_range_score``), advantages and returns come from one ``ops.gae`` call over all streams
(gamma 1, lambda 0.95, the reference implementation's constants):

* ``ppo``                 reward R only; one critic; ``A = A^r``.
* ``ppo-lag``             reward R and cost C, two critics, ``A = (A^r - lam A^c) / (1 + lam)``, lam from
                          :class:`~saferlhf_fast.lagrange.LagrangeMultiplier` (``--lambda_optimizer sgd``) or
                          :class:`~saferlhf_fast.lagrange.PIDLagrangeMultiplier` (``pid``), updated once per RL step,
                          before the actor loss, from the window of rollout end costs C.
* ``ppo-reward-shaping``  one critic on the shaped reward ``R - nu C`` with nu fixed (= ``--lambda_init``).

A new algorithm is one :class:`Algorithm` subclass with its config class, registered with :func:`register`; its
command (``saferlhf-fast <name>``) comes from the registry (see docs/rl.md, "Adding an algorithm").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import distributed, ops
from ..lagrange import MULTIPLIERS, EpisodeCostWindow, make_multiplier
from .config import ALGORITHM, MODEL, ConfigError, PPOConfig, option

GAMMA = 1.0  # fixed in the reference implementation
GAE_LAMBDA = 0.95


# ================================================================================================ configs
@dataclass
class CostPPOConfig(PPOConfig):
    """The options of the algorithms that also score rollouts with a cost model."""

    cost_model_name_or_path: str | None = option(None, "cost model folder (saferlhf-fast cm)", required=True,
                                                 group=MODEL)
    normalize_cost: bool = option(False, "normalize the cost model's scores with the statistics it was trained with "
                                         "(its normalizer); off: raw scores, as the reference", group=ALGORITHM)


@dataclass
class PPOLagConfig(CostPPOConfig):
    """``saferlhf-fast ppo-lag``: PPO-Lagrangian (reward and cost, two critics, adaptive lambda)."""

    cost_critic_model_name_or_path: str | None = option(None, "cost critic initialisation (default: the cost model)",
                                                        group=MODEL)
    threshold: float = option(0.0, "cost threshold (-d of the paper): lambda grows while J_C > threshold",
                              group=ALGORITHM)
    lambda_init: float = option(1.0, "initial Lagrange multiplier", group=ALGORITHM)
    lambda_lr: float = option(0.1, "learning rate of log(lambda)", aliases=("lambda_learning_rate",), group=ALGORITHM)
    lambda_max: float | None = option(None, "cap on lambda (the PPO-Lag script uses 5.0)", group=ALGORITHM)
    lambda_update_delay_steps: int = option(0, "RL steps before lambda starts to move", group=ALGORITHM)
    episode_cost_window_size: int = option(128, "J_C is the mean of the last N rollout end costs", group=ALGORITHM)
    lambda_optimizer: str = option("sgd", "lambda update: 'sgd' (the reference's log-space SGD, --lambda_lr) or "
                                          "'pid' (PID Lagrangian, --pid_*)", choices=list(MULTIPLIERS),
                                   group=ALGORITHM)
    pid_kp: float = option(0.1, "PID: proportional gain (on the EMA of J_C - threshold)", group=ALGORITHM)
    pid_ki: float = option(0.01, "PID: integral gain (the integral starts at --lambda_init)", group=ALGORITHM)
    pid_kd: float = option(0.01, "PID: derivative gain (on the rise of the EMA of J_C over --pid_d_delay updates)",
                           group=ALGORITHM)
    pid_d_delay: int = option(10, "PID: the derivative compares the cost EMA with its value this many updates back",
                              group=ALGORITHM)
    pid_delta_p_ema_alpha: float = option(0.95, "PID: EMA factor of the proportional signal (0: no smoothing)",
                                          group=ALGORITHM)
    pid_delta_d_ema_alpha: float = option(0.95, "PID: EMA factor of the derivative's cost signal (0: no smoothing)",
                                          group=ALGORITHM)

    algorithm = "ppo-lag"

    def validate(self) -> None:
        super().validate()
        try:
            make_multiplier(self)  # the multiplier's own checks, on the flags of --lambda_optimizer's choice
        except ValueError as err:
            raise ConfigError(f"--{err}") from None


@dataclass
class RewardShapingConfig(CostPPOConfig):
    """``saferlhf-fast ppo-reward-shaping``: PPO on ``R - nu * C`` with nu fixed (``--lambda_init``), one critic."""

    lambda_init: float = option(1.0, "the fixed shaping coefficient nu", group=ALGORITHM)
    episode_cost_window_size: int = option(128, "train/episode_cost is the mean of the last N rollout end costs",
                                           group=ALGORITHM)

    algorithm = "ppo-reward-shaping"

    def validate(self) -> None:
        super().validate()
        if self.lambda_init < 0:
            raise ConfigError(f"--lambda_init (nu) must be >= 0, got {self.lambda_init}")
        if self.episode_cost_window_size < 1:
            raise ConfigError(f"--episode_cost_window_size must be >= 1, got {self.episode_cost_window_size}")


# ================================================================================================ strategies
class Algorithm:
    """``ppo``: the reward stream only, one critic, the clipped surrogate on ``A^r``.  Subclasses override what
    differs."""

    name = "ppo"
    help = "PPO on the reward model (RLHF baseline)"  # the command's --help line
    config_class: type = PPOConfig
    critic_names: tuple[str, ...] = ("reward_critic",)
    streams: tuple[str, ...] = ("reward",)  # the per-token streams, as their metrics are named
    uses_cost = False  # the rollout is scored by the cost model too
    lagrangian = False  # a multiplier weighs a cost stream against the reward stream

    def __init__(self, config):
        self.config = config
        self.multiplier = None  # a Lagrange multiplier, when the algorithm has one
        self.cost_window: EpisodeCostWindow | None = None  # observes every rollout's end costs

    # ---- per rollout ------------------------------------------------------------------------------------------
    def observe(self, cost: Tensor | None) -> None:
        if self.cost_window is not None:
            self.cost_window.observe(cost)

    def end_reward(self, reward: Tensor, cost: Tensor | None) -> Tensor:
        """The end score of the (single) reward stream."""
        return reward

    def per_token_rewards(self, reward: Tensor, cost: Tensor | None, old_logprobs: Tensor, ref_logprobs: Tensor,
                          mask: Tensor, *, kl_coeff: float, clip_range_score: float) -> Tensor:
        """``[n_streams, b, T]`` KL-penalised per-token rewards."""
        end = self.end_reward(reward, cost)
        r, _ = ops.kl_penalized_rewards(end, torch.zeros_like(end), old_logprobs, ref_logprobs, mask,
                                        kl_coeff=kl_coeff, clip_range_score=clip_range_score)
        return r.unsqueeze(0)

    # ---- per RL step ------------------------------------------------------------------------------------------
    def before_update(self, step: int, guard) -> None:
        """Once per RL step, before the actor loss (``guard(tensor, what)`` stops a non-finite run)."""

    def actor_loss(self, logp: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                   clip_range: float) -> Tensor:
        return ops.ppo_actor_loss(logp, old_logprobs, advantages[0], mask, clip_range=clip_range)

    def metrics(self, reward: Tensor, cost: Tensor | None) -> dict:
        """The algorithm's own train/ metrics (the shared ones are the trainer's)."""
        return {}

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Multiplier and cost window.  Under torchrun (a collective) the windows of every rank (``window_ranks``,
        dealt out again over the ranks of the run that resumes); a single process saves its one window, which every
        rank of a resuming run starts from."""
        state = {}
        if self.multiplier is not None:
            state["lagrange"] = self.multiplier.state_dict()
        if self.cost_window is not None:
            costs = list(self.cost_window.episode_costs)
            if distributed.is_distributed():
                state["window_ranks"] = distributed.all_gather_object(costs)
            else:
                state["window"] = costs
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.multiplier is not None:
            self.multiplier.load_state_dict(state["lagrange"])
        if self.cost_window is None:
            return
        if "window_ranks" in state:
            costs = redistribute_windows(state["window_ranks"], distributed.rank(), distributed.world_size())
        else:
            costs = state.get("window", list(self.cost_window.episode_costs))
        self.cost_window.episode_costs.clear()
        self.cost_window.episode_costs.extend(costs)


class PPOLag(Algorithm):
    """``ppo-lag``: reward and cost streams, two critics, the Lagrangian actor loss with lam from the multiplier."""

    name = "ppo-lag"
    help = "PPO-Lagrangian: maximise reward subject to expected cost <= threshold"
    config_class = PPOLagConfig
    critic_names = ("reward_critic", "cost_critic")
    streams = ("reward", "cost")
    uses_cost = True
    lagrangian = True

    def __init__(self, config):
        super().__init__(config)
        self.multiplier = self.cost_window = make_multiplier(config)  # J_C is the multiplier's own window
        self.episode_cost = None

    def per_token_rewards(self, reward, cost, old_logprobs, ref_logprobs, mask, *, kl_coeff, clip_range_score):
        r, c = ops.kl_penalized_rewards(reward, cost, old_logprobs, ref_logprobs, mask, kl_coeff=kl_coeff,
                                        clip_range_score=clip_range_score)
        return torch.stack([r, c])

    def before_update(self, step, guard):
        self.episode_cost = self.multiplier.episode_cost()
        value = self.multiplier.update(step)
        guard(torch.tensor(value), "Lagrange multiplier (lambda overflowed: J_C stayed above the threshold, mean "
              f"{self.episode_cost:.4g}; set --lambda_max, e.g. 5.0 as the reference's script, or lower --lambda_lr)")

    def actor_loss(self, logp, old_logprobs, advantages, mask, *, clip_range):
        return ops.ppo_lag_actor_loss(logp, old_logprobs, advantages[0], advantages[1], mask,
                                      multiplier=self.multiplier.value, clip_range=clip_range)

    def metrics(self, reward, cost):
        return {"train/lambda": self.multiplier.value, "train/episode_cost": self.episode_cost}


class RewardShaping(Algorithm):
    """``ppo-reward-shaping``: PPO on the shaped reward ``R - nu C`` (nu fixed), one critic."""

    name = "ppo-reward-shaping"
    help = "PPO on R - nu*C with a fixed nu (--lambda_init)"
    config_class = RewardShapingConfig
    streams = ("shaped_reward",)
    uses_cost = True

    def __init__(self, config):
        super().__init__(config)
        self.nu = float(config.lambda_init)
        self.cost_window = EpisodeCostWindow(config.episode_cost_window_size)  # logs train/episode_cost

    def end_reward(self, reward, cost):
        return reward - self.nu * cost

    def metrics(self, reward, cost):
        return {"train/episode_cost": self.cost_window.episode_cost(),
                "train/shaped_reward": float(self.end_reward(reward, cost).mean())}


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    ALGORITHMS[cls.name] = cls
    return cls


for _cls in (Algorithm, PPOLag, RewardShaping):
    register(_cls)

CONFIGS = {name: cls.config_class for name, cls in ALGORITHMS.items()}


def make_algorithm(config) -> Algorithm:
    """The strategy of ``config.algorithm``."""
    return ALGORITHMS[config.algorithm](config)


# ================================================================================================ shared math
def compute_advantages(algorithm: Algorithm, reward: Tensor, cost: Tensor | None, old_logprobs: Tensor,
                       ref_logprobs: Tensor, old_values: Tensor, mask: Tensor, *, kl_coeff: float,
                       clip_range_score: float):
    """Per-token rewards, advantages and returns ``[n_streams, b, T]``: the algorithm's streams, then one
    ``ops.gae`` call over all of them."""
    rewards = algorithm.per_token_rewards(reward, cost, old_logprobs, ref_logprobs, mask, kl_coeff=kl_coeff,
                                          clip_range_score=clip_range_score)
    advantages, returns = ops.gae(rewards, old_values.float(), mask, gamma=GAMMA, lam=GAE_LAMBDA)
    return rewards, advantages, returns


def redistribute_windows(windows: list[list[float]], rank: int, world_size: int) -> list[float]:
    """The cost window of ``rank`` of ``world_size`` from the windows saved by the ranks of another run: the same
    window when the world size is unchanged, else the saved windows interleaved (oldest first) and dealt out
    ``rank::world_size``, so the mean over ranks of the window means is kept when the windows have equal lengths."""
    if len(windows) == world_size:
        return list(windows[rank])
    longest = max((len(w) for w in windows), default=0)
    merged = [w[i] for i in range(longest) for w in windows if i < len(w)]
    return merged[rank::world_size]
