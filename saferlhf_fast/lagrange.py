"""The Lagrange multipliers of PPO-Lagrangian: the reference implementation's SGD update and a PID controller.

Both keep a window of the last ``window`` sequence end costs (``observe``); once per RL step, before the actor
loss, ``update(step)`` moves lambda from the window mean ``J_C`` (averaged across ranks when torch.distributed is
initialised, so every rank computes the same lambda).  ``--lambda_optimizer`` picks the class through
:data:`MULTIPLIERS` (:func:`make_multiplier`).

``sgd`` (:class:`LagrangeMultiplier`, the reference's exact update).  State is ``log_lambda``; ``lambda =
exp(log_lambda)``; one SGD step (lr ``lr``) on ``-(J_C - threshold) * exp(log_lambda)``::

    J_C        = mean(window)            (averaged across ranks when torch.distributed is initialised)
    log_lambda = log_lambda + lr * exp(log_lambda) * (J_C - threshold)     if step >= delay_steps
    log_lambda = min(log_lambda, log(max))                                 if max is set

``pid`` (:class:`PIDLagrangeMultiplier`): Stooke, Achiam, Abbeel, "Responsive Safety in Reinforcement Learning by
PID Lagrangian Methods" (ICML 2020), as OmniSafe's ``PIDLagrangian`` computes it; equations in its docstring.
"""
from __future__ import annotations

import math
from collections import deque

import torch
import torch.distributed as dist


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


class EpisodeCostWindow:
    """The last ``window`` sequence end costs and their mean ``J_C`` (averaged across ranks when distributed)."""

    def __init__(self, window: int):
        if window < 1:
            raise ValueError(f"episode_cost_window_size must be >= 1, got {window}")
        self.window = int(window)
        self.episode_costs: deque[float] = deque(maxlen=self.window)

    def observe(self, costs) -> None:
        """Append sequence end costs (tensor, list or float) to the window."""
        if isinstance(costs, torch.Tensor):
            costs = costs.detach().float().reshape(-1).cpu().tolist()
        elif isinstance(costs, (int, float)):
            costs = [float(costs)]
        costs = [float(c) for c in costs]
        if any(not math.isfinite(c) for c in costs):
            raise ValueError(f"non-finite episode cost observed: {costs}")
        self.episode_costs.extend(costs)

    def episode_cost(self) -> float:
        """``J_C``: the window mean, averaged across ranks when distributed."""
        if not self.episode_costs:
            raise RuntimeError(f"{type(self).__name__}.update called before any episode cost was observed")
        mean = sum(self.episode_costs) / len(self.episode_costs)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([mean], dtype=torch.float64)
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            mean = float(t.item()) / dist.get_world_size()
        return mean

    def _load_window(self, state: dict) -> None:
        self.window = int(state["window"])
        self.episode_costs = deque((float(c) for c in state["episode_costs"]), maxlen=self.window)

    @classmethod
    def _check_kind(cls, state: dict) -> None:
        kind = state.get("kind", "sgd")
        if kind != cls.kind:
            raise ValueError(f"the checkpoint's Lagrange multiplier is --lambda_optimizer {kind}, this run's is "
                             f"{cls.kind}: resume with --lambda_optimizer {kind}")


class LagrangeMultiplier(EpisodeCostWindow):
    """``--lambda_optimizer sgd``: the reference's log-space SGD step (equations in the module docstring)."""

    kind = "sgd"

    def __init__(
        self,
        init: float = 1.0,
        lr: float = 0.1,
        max: float | None = None,  # noqa: A002 - the reference's flag is lambda_max
        threshold: float = 0.0,
        window: int = 128,
        delay_steps: int = 0,
    ):
        if not init > 0.0:
            raise ValueError(f"lambda_init must be > 0 (lambda is kept in log space), got {init}")
        if max is not None and not max > 0.0:
            raise ValueError(f"lambda_max must be > 0 when set, got {max}")
        super().__init__(window)
        self.lr = float(lr)
        self.max = None if max is None else float(max)
        self.threshold = float(threshold)
        self.delay_steps = int(delay_steps)
        self.log_lambda = math.log(init)

    @classmethod
    def from_config(cls, cfg) -> LagrangeMultiplier:
        return cls(cfg.lambda_init, cfg.lambda_lr, cfg.lambda_max, cfg.threshold, cfg.episode_cost_window_size,
                   cfg.lambda_update_delay_steps)

    @property
    def value(self) -> float:
        """The current multiplier ``exp(log_lambda)`` (inf when it overflows, as torch's exp would)."""
        return _exp(self.log_lambda)

    def update(self, step: int) -> float:
        """One update at RL step ``step``; returns the new multiplier value."""
        episode_cost = self.episode_cost()
        if step >= self.delay_steps:
            self.log_lambda = self.log_lambda + self.lr * _exp(self.log_lambda) * (episode_cost - self.threshold)
            if self.max is not None:
                self.log_lambda = min(self.log_lambda, math.log(self.max))
        return self.value

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "log_lambda": self.log_lambda,
            "episode_costs": list(self.episode_costs),
            "lr": self.lr,
            "max": self.max,
            "threshold": self.threshold,
            "window": self.window,
            "delay_steps": self.delay_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self._check_kind(state)
        self.lr = float(state["lr"])
        self.max = state["max"]
        self.threshold = float(state["threshold"])
        self.delay_steps = int(state["delay_steps"])
        self.log_lambda = float(state["log_lambda"])
        self._load_window(state)

    def __repr__(self) -> str:
        return (
            f"LagrangeMultiplier(value={self.value:.6g}, lr={self.lr}, max={self.max}, threshold={self.threshold}, "
            f"window={self.window}, delay_steps={self.delay_steps}, observed={len(self.episode_costs)})"
        )


class PIDLagrangeMultiplier(EpisodeCostWindow):
    r"""``--lambda_optimizer pid``: lambda is the output of a PID controller on the constraint violation.

    Stooke, Achiam, Abbeel (ICML 2020), Algorithm 2, in OmniSafe's ``PIDLagrangian`` form (the integral is kept
    already multiplied by ``K_i`` and starts at ``lambda_init``).  With ``d = threshold``, ``k = d_delay``,
    ``a_p, a_d`` the EMA factors and ``t = 1, 2, ...`` counting updates (RL steps ``>= delay_steps``)::

        Delta_t = J_C,t - d                                        constraint violation
        I_t     = max(0, I_{t-1} + K_i * Delta_t)                  I_0 = lambda_init     (integral, kept >= 0)
        P_t     = a_p * P_{t-1} + (1 - a_p) * Delta_t              P_0 = 0               (EMA of the violation)
        C_t     = a_d * C_{t-1} + (1 - a_d) * J_C,t                C_0 = 0               (EMA of the cost)
        D_t     = max(0, C_t - C_{t-k})                            C_s = 0 for s <= 0    (cost rise over k updates)
        lambda_t = max(0, K_p * P_t + I_t + K_d * D_t)
        lambda_t = min(lambda_t, lambda_max)                                             if lambda_max is set

    Before the first update ``lambda = lambda_init``.  ``K_p = K_d = 0`` gives gradient ascent on lambda itself
    (``lambda_t = max(0, lambda_{t-1} + K_i Delta_t)``), the non-log-space form of the SGD multiplier.  The
    proportional term reacts to the violation now (damping the integral's overshoot), the derivative term only to
    a rising cost (it never lowers lambda).
    """

    kind = "pid"

    def __init__(
        self,
        init: float = 1.0,
        kp: float = 0.1,
        ki: float = 0.01,
        kd: float = 0.01,
        d_delay: int = 10,
        delta_p_ema_alpha: float = 0.95,
        delta_d_ema_alpha: float = 0.95,
        max: float | None = None,  # noqa: A002 - the flag is lambda_max
        threshold: float = 0.0,
        window: int = 128,
        delay_steps: int = 0,
    ):
        _check_pid_options(init, kp, ki, kd, d_delay, delta_p_ema_alpha, delta_d_ema_alpha, max)
        super().__init__(window)
        self.kp, self.ki, self.kd = float(kp), float(ki), float(kd)
        self.d_delay = int(d_delay)
        self.delta_p_ema_alpha = float(delta_p_ema_alpha)
        self.delta_d_ema_alpha = float(delta_d_ema_alpha)
        self.max = None if max is None else float(max)
        self.threshold = float(threshold)
        self.delay_steps = int(delay_steps)
        self.lam = float(init) if self.max is None else min(float(init), self.max)
        self.integral = float(init)
        self.delta_p = 0.0
        self.cost_d = 0.0
        self.cost_ds: deque[float] = deque([0.0], maxlen=self.d_delay)

    @classmethod
    def from_config(cls, cfg) -> PIDLagrangeMultiplier:
        return cls(cfg.lambda_init, cfg.pid_kp, cfg.pid_ki, cfg.pid_kd, cfg.pid_d_delay, cfg.pid_delta_p_ema_alpha,
                   cfg.pid_delta_d_ema_alpha, cfg.lambda_max, cfg.threshold, cfg.episode_cost_window_size,
                   cfg.lambda_update_delay_steps)

    @property
    def value(self) -> float:
        """The current multiplier ``lambda_t``."""
        return self.lam

    def update(self, step: int) -> float:
        """One update at RL step ``step`` (no change while ``step < delay_steps``); returns the new lambda."""
        episode_cost = self.episode_cost()
        if step >= self.delay_steps:
            self._pid_step(episode_cost)
        return self.value

    def _pid_step(self, episode_cost: float) -> None:
        delta = episode_cost - self.threshold
        self.integral = max(0.0, self.integral + self.ki * delta)
        a_p, a_d = self.delta_p_ema_alpha, self.delta_d_ema_alpha
        self.delta_p = a_p * self.delta_p + (1.0 - a_p) * delta
        self.cost_d = a_d * self.cost_d + (1.0 - a_d) * episode_cost
        derivative = max(0.0, self.cost_d - self.cost_ds[0])
        lam = max(0.0, self.kp * self.delta_p + self.integral + self.kd * derivative)
        self.lam = lam if self.max is None else min(lam, self.max)
        self.cost_ds.append(self.cost_d)

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "lambda": self.lam,
            "integral": self.integral,
            "delta_p": self.delta_p,
            "cost_d": self.cost_d,
            "cost_ds": list(self.cost_ds),
            "episode_costs": list(self.episode_costs),
            "kp": self.kp,
            "ki": self.ki,
            "kd": self.kd,
            "d_delay": self.d_delay,
            "delta_p_ema_alpha": self.delta_p_ema_alpha,
            "delta_d_ema_alpha": self.delta_d_ema_alpha,
            "max": self.max,
            "threshold": self.threshold,
            "window": self.window,
            "delay_steps": self.delay_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self._check_kind(state)
        self.kp, self.ki, self.kd = float(state["kp"]), float(state["ki"]), float(state["kd"])
        self.d_delay = int(state["d_delay"])
        self.delta_p_ema_alpha = float(state["delta_p_ema_alpha"])
        self.delta_d_ema_alpha = float(state["delta_d_ema_alpha"])
        self.max = state["max"]
        self.threshold = float(state["threshold"])
        self.delay_steps = int(state["delay_steps"])
        self.lam = float(state["lambda"])
        self.integral = float(state["integral"])
        self.delta_p = float(state["delta_p"])
        self.cost_d = float(state["cost_d"])
        self.cost_ds = deque((float(c) for c in state["cost_ds"]), maxlen=self.d_delay)
        self._load_window(state)

    def __repr__(self) -> str:
        return (
            f"PIDLagrangeMultiplier(value={self.value:.6g}, kp={self.kp}, ki={self.ki}, kd={self.kd}, "
            f"d_delay={self.d_delay}, ema=({self.delta_p_ema_alpha}, {self.delta_d_ema_alpha}), max={self.max}, "
            f"threshold={self.threshold}, window={self.window}, delay_steps={self.delay_steps}, "
            f"observed={len(self.episode_costs)})"
        )


def _check_pid_options(init, kp, ki, kd, d_delay, delta_p_ema_alpha, delta_d_ema_alpha, max):  # noqa: A002
    if not init >= 0.0:
        raise ValueError(f"lambda_init must be >= 0, got {init}")
    if max is not None and not max > 0.0:
        raise ValueError(f"lambda_max must be > 0 when set, got {max}")
    for name, gain in (("pid_kp", kp), ("pid_ki", ki), ("pid_kd", kd)):
        if not (math.isfinite(gain) and gain >= 0.0):
            raise ValueError(f"{name} must be a finite number >= 0, got {gain}")
    if d_delay < 1:
        raise ValueError(f"pid_d_delay must be >= 1, got {d_delay}")
    for name, alpha in (("pid_delta_p_ema_alpha", delta_p_ema_alpha), ("pid_delta_d_ema_alpha", delta_d_ema_alpha)):
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {alpha}")


MULTIPLIERS: dict[str, type] = {"sgd": LagrangeMultiplier, "pid": PIDLagrangeMultiplier}


def make_multiplier(cfg):
    """The multiplier ``cfg.lambda_optimizer`` names, built from the PPO-Lag config's flags."""
    kind = getattr(cfg, "lambda_optimizer", "sgd")
    if kind not in MULTIPLIERS:
        raise ValueError(f"lambda_optimizer must be one of {', '.join(MULTIPLIERS)}, got {kind!r}")
    return MULTIPLIERS[kind].from_config(cfg)
