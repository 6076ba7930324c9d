"""LagrangeMultiplier against a literal transcription of the reference implementation's update (torch SGD on
``-(J_C - threshold) * exp(log_lambda)``, window deque, delay, cap)."""
import collections
import math

import pytest
import torch

from saferlhf_fast import LagrangeMultiplier


class ReferenceLambda:
    def __init__(self, init, lr, lambda_max, threshold, window, delay):
        self.log_lambda = torch.nn.Parameter(torch.tensor(math.log(init), dtype=torch.float64))
        self.opt = torch.optim.SGD([self.log_lambda], lr=lr)
        self.log_lambda_max = math.log(lambda_max) if lambda_max is not None else None
        self.threshold = threshold
        self.delay = delay
        self.episode_costs = collections.deque(maxlen=window)

    def step(self, costs, global_step):
        self.episode_costs.extend(costs)
        episode_cost = torch.tensor(list(self.episode_costs), dtype=torch.float64).mean()
        if global_step >= self.delay:
            lambda_loss = -(episode_cost - self.threshold) * self.log_lambda.exp()
            self.opt.zero_grad()
            lambda_loss.backward()
            self.opt.step()
            if self.log_lambda_max is not None:
                with torch.no_grad():
                    self.log_lambda.clamp_(max=self.log_lambda_max)
        return float(self.log_lambda.exp())


@pytest.mark.parametrize(
    "init,lr,lambda_max,threshold,window,delay",
    [(1.0, 0.1, None, 0.0, 128, 0), (0.5, 0.05, 5.0, -1.0, 7, 3), (2.0, 0.3, 2.5, -0.2, 3, 0)],
)
def test_matches_reference_update(init, lr, lambda_max, threshold, window, delay):
    g = torch.Generator().manual_seed(0)
    ours = LagrangeMultiplier(init=init, lr=lr, max=lambda_max, threshold=threshold, window=window, delay_steps=delay)
    theirs = ReferenceLambda(init, lr, lambda_max, threshold, window, delay)
    hit_cap = False
    for step in range(40):
        costs = (0.3 * torch.randn(5, generator=g) + (0.5 if step < 10 else -1.0)).tolist()
        ours.observe(torch.tensor(costs))
        value = ours.update(step)
        expected = theirs.step(costs, step)
        assert math.isfinite(value) and value == pytest.approx(expected, rel=1e-9, abs=1e-12)
        if step < delay:
            assert value == pytest.approx(init)
        if lambda_max is not None:
            assert value <= lambda_max * (1 + 1e-12)
            hit_cap |= value == pytest.approx(lambda_max)
    if lambda_max is not None and lambda_max < 3:
        assert hit_cap


def test_direction_window_and_state_roundtrip():
    lag = LagrangeMultiplier(init=1.0, lr=0.1, threshold=0.0, window=2)
    lag.observe([10.0, 1.0, 3.0])  # window keeps [1, 3]: J = 2
    assert lag.episode_cost() == pytest.approx(2.0)
    # log_lambda = 0 + 0.1 * 1 * (2 - 0) = 0.2
    assert lag.update(0) == pytest.approx(math.exp(0.2))
    lag.observe([-5.0, -5.0])
    assert lag.update(1) < math.exp(0.2)  # cost under the threshold: lambda decreases
    clone = LagrangeMultiplier()
    clone.load_state_dict(lag.state_dict())
    assert clone.value == lag.value and list(clone.episode_costs) == list(lag.episode_costs)
    lag.observe([1.0])
    clone.observe([1.0])
    assert clone.update(2) == lag.update(2)


def test_errors():
    with pytest.raises(RuntimeError, match="before any episode cost"):
        LagrangeMultiplier().update(0)
    with pytest.raises(ValueError, match="lambda_init"):
        LagrangeMultiplier(init=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        LagrangeMultiplier().observe([float("nan")])
