"""Score models' outputs, shared by training (``trainers.score``, ``trainers.ppo``) and evaluation (``eval``): the
forward that returns per-position and end scores, the score normalizer a score-model folder carries, and the
preference metrics (accuracy, mean, std) of reward and cost models."""
from __future__ import annotations

import json
import os

import torch
from torch import Tensor

from .options import ConfigError


def score_forward(model, input_ids: Tensor, attention_mask: Tensor, packed: bool | None = False):
    """(scores [B, L], end scores [B]) of a score model; the end score is the score at the last real token.

    Not packed by default: the token-wise losses read scores at the padded positions of the shorter sequence,
    exactly as the reference implementation does."""
    out = model(input_ids, attention_mask=attention_mask, packed=packed)
    return out.scores, out.end_scores


def reward_metrics(better_end: Tensor, worse_end: Tensor, prefix: str = "eval/") -> dict:
    scores = torch.cat([better_end, worse_end]).float()
    return {
        f"{prefix}accuracy": float((better_end > worse_end).float().mean()),
        f"{prefix}reward_mean": float(scores.mean()),
        f"{prefix}reward_std": float(scores.std()) if scores.numel() > 1 else 0.0,
    }


def cost_metrics(safer_end: Tensor, unsafer_end: Tensor, safer_sign: Tensor, unsafer_sign: Tensor,
                 prefix: str = "eval/") -> dict:
    """``accuracy``: C(unsafer) > C(safer); ``accuracy_sign``: fraction of responses whose cost sign matches its
    label (+ unsafe, - safe; a cost of exactly 0 matches neither)."""
    costs = torch.cat([safer_end, unsafer_end]).float()
    signs = torch.cat([safer_sign, unsafer_sign]).float()
    return {
        f"{prefix}accuracy": float((unsafer_end > safer_end).float().mean()),
        f"{prefix}accuracy_sign": float((torch.sign(costs) == signs).float().mean()),
        f"{prefix}cost_mean": float(costs.mean()),
        f"{prefix}cost_std": float(costs.std()) if costs.numel() > 1 else 0.0,
    }


def collect_end_scores(batches, end_scores_fn):
    """Run ``end_scores_fn`` over collated pair batches -> (first halves [N], second halves [N], cost signs [2N] or
    None), on the CPU."""
    first, second, signs = [], [], []
    for batch in batches:
        end = end_scores_fn(batch).float().cpu()
        B = end.shape[0] // 2
        first.append(end[:B])
        second.append(end[B:])
        if "cost_sign" in batch:
            signs.append(batch["cost_sign"].cpu().view(2, B))
    sign = torch.cat(signs, dim=1) if signs else None
    return torch.cat(first), torch.cat(second), sign


def pair_metrics(score_type: str, first: Tensor, second: Tensor, sign: Tensor | None, prefix: str = "eval/") -> dict:
    """Reward: first = better, second = worse.  Cost: first = safer, second = unsafer, sign [2, N]."""
    if score_type == "reward":
        return reward_metrics(first, second, prefix)
    return cost_metrics(first, second, sign[0], sign[1], prefix)


# ------------------------------------------------------------------------------------------------ normalizer
class ScoreNormalizer(torch.nn.Module):
    """Running statistics of end scores, updated on every training batch when
    ``--normalize_score_during_training``; the loss then sees normalized scores.  Reward: affine
    ``(x - mu) / (sigma + 1e-8)``; cost: scale-only ``x / (sigma + 1e-8)`` (0 stays the safe/unsafe boundary);
    critic: identity; ``translate``: ``x - mu``.  ``RunningMeanStd`` merges batch moments exactly (parallel
    Welford); ``ExponentialMovingAverage`` blends them with ``momentum``; ``None`` (the reference's identity
    normalizer) only counts.  The statistics are constants for the gradient."""

    KINDS = ("RunningMeanStd", "ExponentialMovingAverage", None)
    FUNCTIONS = ("affine", "scale", "translate", "identity")

    def __init__(self, kind: str | None = "RunningMeanStd", function: str = "affine", momentum: float | None = None):
        super().__init__()
        if kind not in self.KINDS:
            raise ConfigError(f"--normalizer_type {kind!r}: expected RunningMeanStd or ExponentialMovingAverage")
        if function not in self.FUNCTIONS:
            raise ConfigError(f"normalize function {function!r}: expected one of {', '.join(self.FUNCTIONS)}")
        self.kind, self.function = kind, function
        self.momentum = 0.9 if momentum is None else float(momentum)
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("var", torch.ones(()))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        x = x.detach().float().reshape(-1)
        n = x.numel()
        batch_mean = x.mean()
        batch_var = x.var() if n > 1 else torch.zeros_like(batch_mean)
        if self.kind == "RunningMeanStd":
            total = self.count + n
            delta = batch_mean - self.mean
            new_mean = self.mean + delta * n / total
            m2 = self.var * self.count + batch_var * n + delta.square() * self.count * n / total
            self.mean.copy_(new_mean)
            self.var.copy_(m2 / total)
        elif self.kind == "ExponentialMovingAverage":
            self.mean.mul_(self.momentum).add_((1 - self.momentum) * batch_mean)
            self.var.mul_(self.momentum).add_((1 - self.momentum) * batch_var)
        self.count += n

    @property
    def std(self) -> Tensor:
        return self.var.sqrt()

    def forward(self, x: Tensor) -> Tensor:
        if self.function == "affine":
            return (x - self.mean) / (self.std + 1e-8)
        if self.function == "translate":
            return x - self.mean
        if self.function == "identity":
            return x
        return x / (self.std + 1e-8)

    def as_dict(self) -> dict:
        return {"normalizer_type": self.kind, "normalize_function": self.function, "momentum": self.momentum,
                "mean": float(self.mean), "var": float(self.var), "count": int(self.count)}


NORMALIZER_FILE = "score_normalizer.json"


def read_score_info(path: str) -> dict:
    """``score_normalizer.json`` of a score-model folder ({} when absent): score_type, do_normalize, statistics."""
    file = os.path.join(path, NORMALIZER_FILE)
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        return json.load(f)


# The reference's score types and the normalize function each implies.
NORMALIZE_FUNCTIONS = {"reward": "affine", "cost": "scale", "critic": "identity"}


def load_normalizer(path: str) -> ScoreNormalizer | None:
    """The normalizer inference applies to a score-model folder's scores, or None.  Ours: ``score_normalizer.json``;
    else the reference's format (``reference_normalizer``)."""
    info = read_score_info(path)
    if not info:
        return reference_normalizer(path)
    if not info.get("do_normalize"):
        return None
    norm = ScoreNormalizer(info["normalizer_type"], info["normalize_function"], info.get("momentum"))
    norm.mean.fill_(info["mean"])
    norm.var.fill_(info["var"])
    norm.count.fill_(info["count"])
    return norm


def reference_normalizer(path: str) -> ScoreNormalizer | None:
    """The reference's normalizer of a score-model folder: applied when config.json has ``do_normalize``, with the
    function of its ``score_type`` and the statistics of the weights' ``normalizer.mean`` / ``var`` / ``count``
    buffers, else of config.json's ``mean`` / ``var`` (as the reference's ``from_pretrained``: the buffers
    overwrite what the config set), else mean 0, var 1."""
    from .models.checkpoint import NORMALIZER_BUFFERS, CheckpointError, read_config, read_tensors

    config_path = os.path.join(path, "config.json")
    cfg = read_config(config_path) if os.path.isfile(config_path) else {}
    if not cfg.get("do_normalize"):
        return None
    score_type = cfg.get("score_type", "reward")
    if score_type not in NORMALIZE_FUNCTIONS:
        raise CheckpointError(f"{config_path}: score_type {score_type!r}: expected reward, cost or critic")
    try:
        norm = ScoreNormalizer(cfg.get("normalizer_type"), NORMALIZE_FUNCTIONS[score_type], cfg.get("momentum"))
    except ConfigError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc
    saved = read_tensors(path, NORMALIZER_BUFFERS)
    for name, value in (("mean", cfg.get("mean")), ("var", cfg.get("var")), ("count", None)):
        value = saved.get(f"normalizer.{name}", value)
        if value is None:
            continue
        value = torch.as_tensor(value)
        if value.numel() != 1:
            raise CheckpointError(f"{path}: normalizer.{name} has {value.numel()} values (score_dim 1 expected)")
        getattr(norm, name).fill_(value.reshape(()).item())
    return norm
