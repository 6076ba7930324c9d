"""Reward model and cost model training (spec section 3).

Batches are the collators' ``2B`` stacks: rows ``0..B-1`` the preferred responses (better / safer), rows
``B..2B-1`` the others.  For the reward model "higher" is the better response; for the cost model "higher" is the
unsafer one (C > 0 means unsafe).

Reward, sequence-wise:  ``-mean log sigmoid(R_w - R_l) + reg * mean([R_w, R_l]^2)`` on end scores.
Cost, sequence-wise:    ``mean[-log sigmoid(C_h - C_l) - log sigmoid(s_l C_l) - log sigmoid(s_h C_h)]
                        + reg * mean([C_h, C_l]^2)``, s = +1 for a response labelled unsafe, -1 for safe.
Token-wise variants: the same terms on every position from the first token where the two sequences differ to
the larger of their end indices, averaged per sample (regulariser per sample too), then over the batch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import distributed
from ..data import PreferenceDataset, SafetyPreferenceDataset
from .base import Trainer
from .config import ConfigError, TrainConfig, _f
from .modeling import score_forward


# ------------------------------------------------------------------------------------------------ losses
def _last_index(mask: Tensor) -> Tensor:
    """Index of the last non-padding position of each row of a [N, L] mask."""
    L = mask.shape[-1]
    return L - 1 - mask.flip(-1).to(torch.int64).argmax(-1)


def _tokenwise_spans(higher_ids, lower_ids, higher_mask, lower_mask):
    """Per sample: (first differing position, max end index)."""
    h_end, l_end = _last_index(higher_mask), _last_index(lower_mask)
    spans = []
    for i in range(higher_ids.shape[0]):
        diff = (higher_ids[i] != lower_ids[i]).nonzero()
        if diff.numel() == 0:
            raise ValueError(f"pair {i}: the two sequences are identical")
        spans.append((int(diff[0]), int(max(h_end[i], l_end[i]))))
    return spans


def reward_loss(higher_end: Tensor, lower_end: Tensor, regularization: float = 0.0) -> Tensor:
    """Sequence-wise Bradley-Terry loss of the reward model (end scores [B])."""
    loss = -F.logsigmoid(higher_end - lower_end).mean()
    if regularization > 0.0:
        loss = loss + regularization * torch.stack([lower_end, higher_end]).square().mean()
    return loss


def cost_loss(higher_end: Tensor, lower_end: Tensor, higher_sign: Tensor, lower_sign: Tensor,
              regularization: float = 0.0) -> Tensor:
    """Sequence-wise cost-model loss: Bradley-Terry (unsafer above safer) plus the two sign terms."""
    loss = (-F.logsigmoid(higher_end - lower_end) - F.logsigmoid(lower_sign * lower_end)
            - F.logsigmoid(higher_sign * higher_end)).mean()
    if regularization > 0.0:
        loss = loss + regularization * torch.stack([lower_end, higher_end]).square().mean()
    return loss


def tokenwise_loss(higher_scores: Tensor, lower_scores: Tensor, higher_ids: Tensor, lower_ids: Tensor,
                   higher_mask: Tensor, lower_mask: Tensor, regularization: float = 0.0,
                   higher_sign: Tensor | None = None, lower_sign: Tensor | None = None) -> Tensor:
    """Token-wise loss (reward without signs, cost with them); scores / ids / masks [B, L]."""
    losses = []
    for i, (start, end) in enumerate(_tokenwise_spans(higher_ids, lower_ids, higher_mask, lower_mask)):
        h, l = higher_scores[i, start:end + 1], lower_scores[i, start:end + 1]
        loss = -F.logsigmoid(h - l).mean()
        if higher_sign is not None:
            loss = loss - F.logsigmoid(lower_sign[i] * l).mean() - F.logsigmoid(higher_sign[i] * h).mean()
        if regularization > 0.0:
            loss = loss + regularization * torch.stack([l, h]).square().mean()
        losses.append(loss)
    return torch.stack(losses).mean()


# ------------------------------------------------------------------------------------------------ metrics
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
    from ..models.checkpoint import NORMALIZER_BUFFERS, CheckpointError, read_config, read_tensors

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


# ------------------------------------------------------------------------------------------------ trainers
@dataclass
class ScoreConfig(TrainConfig):
    """``saferlhf-fast rm`` / ``cm`` (defaults: the reference's argparse; its RM / CM scripts pass 2 epochs, lr 2e-5
    cosine, weight decay 0.1, regularization 0.001, batch 16)."""

    weight_decay: float = _f(1e-6, "AdamW weight decay (not on biases and layer-norm weights)")
    loss_type: str = _f("sequence-wise", "score loss", choices=["sequence-wise", "token-wise"])
    regularization: float = _f(0.0, "L2 penalty on the scores")
    normalize_score_during_training: bool = _f(False, "normalize scores with running statistics while training")
    normalizer_type: str | None = _f(None, "running statistics kind (none: the reference's identity normalizer)",
                                     choices=["RunningMeanStd", "ExponentialMovingAverage"])
    normalizer_momentum: float | None = _f(None, "momentum of ExponentialMovingAverage (default 0.9)")

    def validate(self) -> None:
        super().validate()
        if self.regularization < 0:
            raise ConfigError(f"--regularization must be >= 0, got {self.regularization}")


@dataclass
class RewardConfig(ScoreConfig):
    @property
    def command(self) -> str:
        return "rm"


@dataclass
class CostConfig(ScoreConfig):
    @property
    def command(self) -> str:
        return "cm"


class ScoreTrainer(Trainer):
    head = "score"
    score_type = "reward"
    dataset_class = PreferenceDataset
    normalize_function = "affine"

    def __init__(self, config: ScoreConfig):
        super().__init__(config)
        self.normalizer = None
        if config.normalize_score_during_training:
            # No --normalizer_type: the reference's identity normalizer (counts only; scores pass unchanged).
            self.normalizer = ScoreNormalizer(config.normalizer_type, self.normalize_function,
                                              config.normalizer_momentum).to(self.device)

    def save_model(self, path: str, dtype: torch.dtype | None = None) -> None:
        """The model folder plus ``score_normalizer.json`` (score type and, when trained with one, the normalizer's
        statistics, which inference must apply: ``load_normalizer``)."""
        # config.json carries the reference's score-model keys too.
        extra = self.model.config.extra
        extra.update(score_type=self.score_type, do_normalize=self.normalizer is not None)
        if self.normalizer is not None:  # the reference's layout: config mean / var and the normalizer.* buffers
            n = self.normalizer
            extra.update(normalizer_type=n.kind, momentum=n.momentum, mean=[float(n.mean)], var=[float(n.var)])
            self.model.normalizer_state = {f"normalizer.{k}": getattr(n, k).detach().reshape(1).cpu()
                                           for k in ("mean", "var", "count")}
        super().save_model(path, dtype=dtype)
        if not distributed.is_main():
            return
        info = {"score_type": self.score_type, "do_normalize": self.normalizer is not None}
        if self.normalizer is not None:
            info.update(self.normalizer.as_dict())
        with open(os.path.join(path, NORMALIZER_FILE), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)

    def extra_state(self) -> dict:
        return {"normalizer": self.normalizer.state_dict()} if self.normalizer is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if self.normalizer is not None and "normalizer" in state:
            self.normalizer.load_state_dict(state["normalizer"])

    # ---- forward ----------------------------------------------------------------------------------------
    def scores(self, batch: dict, update_normalizer: bool = False) -> tuple[Tensor, Tensor]:
        """(per-position scores [2B, L], end scores [2B]) in fp32, normalized when asked."""
        scores, end_scores = score_forward(self.model, batch["input_ids"], batch["attention_mask"])
        scores, end_scores = scores.float(), end_scores.float()
        if self.normalizer is not None:
            if update_normalizer:  # under torchrun: on every rank's scores, so every rank keeps the same statistics
                self.normalizer.update(distributed.all_gather_tensor(end_scores))
            scores, end_scores = self.normalizer(scores), self.normalizer(end_scores)
        return scores, end_scores

    @torch.no_grad()
    def evaluate(self) -> dict:
        def end_scores(batch):
            with self.autocast():
                return self.scores(batch)[1]

        return pair_metrics(self.score_type, *collect_end_scores(self.eval_batches(), end_scores))

    def _halves(self, batch):
        scores, end = self.scores(batch, update_normalizer=self.model.training)
        B = end.shape[0] // 2
        ids, mask = batch["input_ids"], batch["attention_mask"]
        return (scores[:B], scores[B:]), (end[:B], end[B:]), (ids[:B], ids[B:]), (mask[:B], mask[B:])


class RewardTrainer(ScoreTrainer):
    score_type = "reward"
    dataset_class = PreferenceDataset
    normalize_function = "affine"

    def loss(self, batch):
        cfg = self.config
        (s_w, s_l), (e_w, e_l), (i_w, i_l), (m_w, m_l) = self._halves(batch)
        if cfg.loss_type == "token-wise":
            loss = tokenwise_loss(s_w, s_l, i_w, i_l, m_w, m_l, cfg.regularization)
        else:
            loss = reward_loss(e_w, e_l, cfg.regularization)
        metrics = reward_metrics(e_w.detach(), e_l.detach(), prefix="")
        return loss, {"loss": loss.detach(), "accuracy": metrics["accuracy"]}



class CostTrainer(ScoreTrainer):
    score_type = "cost"
    dataset_class = SafetyPreferenceDataset
    normalize_function = "scale"

    def loss(self, batch):
        cfg = self.config
        (s_safe, s_unsafe), (e_safe, e_unsafe), (i_safe, i_unsafe), (m_safe, m_unsafe) = self._halves(batch)
        B = e_safe.shape[0]
        sign_safe, sign_unsafe = batch["cost_sign"][:B], batch["cost_sign"][B:]
        if cfg.loss_type == "token-wise":
            loss = tokenwise_loss(s_unsafe, s_safe, i_unsafe, i_safe, m_unsafe, m_safe, cfg.regularization,
                                  higher_sign=sign_unsafe, lower_sign=sign_safe)
        else:
            loss = cost_loss(e_unsafe, e_safe, sign_unsafe, sign_safe, cfg.regularization)
        m = cost_metrics(e_safe.detach(), e_unsafe.detach(), sign_safe, sign_unsafe, prefix="")
        return loss, {"loss": loss.detach(), "accuracy": m["accuracy"], "accuracy_sign": m["accuracy_sign"]}

