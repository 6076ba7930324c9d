"""Reward model and cost model training (``docs/algorithm.md`` section 3).

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
from ..scores import (  # noqa: F401 - re-exported
    NORMALIZER_FILE,
    ScoreNormalizer,
    collect_end_scores,
    cost_metrics,
    load_normalizer,
    pair_metrics,
    read_score_info,
    reward_metrics,
    score_forward,
)
from .config import ConfigError, TrainConfig, option
from .supervised import Trainer


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
# ------------------------------------------------------------------------------------------------ trainers
@dataclass
class ScoreConfig(TrainConfig):
    """``saferlhf-fast rm`` / ``cm`` (defaults: the reference's argparse; its RM / CM scripts pass 2 epochs, lr 2e-5
    cosine, weight decay 0.1, regularization 0.001, batch 16)."""

    weight_decay: float = option(1e-6, "AdamW weight decay (not on biases and layer-norm weights)")
    loss_type: str = option("sequence-wise", "score loss", choices=["sequence-wise", "token-wise"])
    regularization: float = option(0.0, "L2 penalty on the scores")
    normalize_score_during_training: bool = option(False, "normalize scores with running statistics while training")
    normalizer_type: str | None = option(None, "running statistics kind (none: the reference's identity normalizer)",
                                     choices=["RunningMeanStd", "ExponentialMovingAverage"])
    normalizer_momentum: float | None = option(None, "momentum of ExponentialMovingAverage (default 0.9)")

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

    def save_model(self, path: str, dtype: torch.dtype | None = None, final: bool = False) -> None:
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
        super().save_model(path, dtype=dtype, final=final)
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

