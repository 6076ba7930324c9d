"""Direct preference optimisation (the DPO baseline of Safe RLHF, ``docs/algorithm.md`` sections 5 and 9).

Per preference pair (better y_w, worse y_l of the same prompt), with the frozen reference = the initial model::

    Delta_y = sum_{t in S_y} [ log pi(y_t | y_<t) - log pi_ref(y_t | y_<t) ]
    loss    = -log sigmoid( beta * (Delta_w - Delta_l) )             beta = --scale_coeff (0.02)

``S_y`` runs over the token positions of sequence y from the first position where the two sequences differ
(*included*) to y's own last real token (its eos; padding excluded).  The reference implementation slices its
``[B, L-1]`` log-prob array with token indices, which shifts the span by one: it skips the first differing token
and counts one token past the end (a pad).  We sum over exactly the tokens named above.

Metrics (the reference's names): ``loss``, ``better_sample_reward = beta * Delta_w``, ``worse_sample_reward``,
``reward_accuracy = mean[Delta_w > Delta_l]``, ``reward_margin = mean(beta * (Delta_w - Delta_l))``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import PreferenceDataset
from ..loading import load_model
from ..models import freeze
from ..models.lora import adapters_disabled, lora_spec_of
from ..ops import IGNORE_INDEX
from .base import maybe_shard
from .config import ConfigError, TrainConfig, option
from .modeling import hold_frozen_in_bf16, token_logprobs
from .supervised import Trainer


@dataclass
class DPOConfig(TrainConfig):
    """``saferlhf-fast dpo``."""

    scale_coeff: float = option(0.02, "beta of the DPO loss (the reference's DPO script passes 0.1)")

    @property
    def command(self) -> str:
        return "dpo"

    def validate(self) -> None:
        super().validate()
        if not self.scale_coeff > 0:
            raise ConfigError(f"--scale_coeff must be > 0, got {self.scale_coeff}")


def _last_index(mask: Tensor) -> Tensor:
    return mask.shape[-1] - 1 - mask.flip(-1).to(torch.int64).argmax(-1)


def dpo_span_labels(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Labels ``[2B, L]`` of a stacked (better rows 0..B-1, worse rows B..2B-1) right-padded batch: the token itself
    on positions ``first differing index <= t <= the row's own last real token``, ``IGNORE_INDEX`` elsewhere.

    Raises ``ValueError`` for a pair of identical sequences (the reference asserts the same)."""
    n, length = input_ids.shape
    if n % 2:
        raise ValueError(f"expected a stacked 2B batch, got {n} rows")
    b = n // 2
    better, worse = input_ids[:b], input_ids[b:]
    m = attention_mask.bool()
    differ = (better != worse) | (m[:b] != m[b:])
    same = ~differ.any(-1)
    if bool(same.any()):
        raise ValueError(f"pair {int(same.nonzero()[0])}: the better and worse sequences are identical")
    diverge = differ.to(torch.int64).argmax(-1).repeat(2)  # first differing position, per pair
    end = _last_index(m)
    pos = torch.arange(length, device=input_ids.device)
    span = (pos >= diverge[:, None]) & (pos <= end[:, None]) & m
    return input_ids.masked_fill(~span, IGNORE_INDEX)


def dpo_loss(policy_logps: Tensor, ref_logps: Tensor, beta: float):
    """(loss, metrics) from the per-row summed span log-probs ``[2B]`` of the policy and the reference."""
    b = policy_logps.shape[0] // 2
    ratio = policy_logps - ref_logps.detach()
    better, worse = ratio[:b], ratio[b:]
    loss = -F.logsigmoid(beta * (better - worse)).mean()
    with torch.no_grad():
        br, wr = beta * better, beta * worse
        metrics = {
            "loss": float(loss),
            "reward": float((br + wr).mean()),  # the reference's train/reward: better + worse sample reward
            "better_sample_reward": float(br.mean()),
            "worse_sample_reward": float(wr.mean()),
            "reward_accuracy": float((br > wr).float().mean()),
            "reward_margin": float((br - wr).mean()),
        }
    return loss, metrics


class DPOTrainer(Trainer):
    dataset_class = PreferenceDataset
    head = "lm"

    def __init__(self, config: DPOConfig):
        super().__init__(config)
        # The frozen reference is always the initial model (also when resuming); with LoRA it is the trained model
        # with its adapters disabled (the frozen base: no second copy of the weights).
        self.reference = None
        if lora_spec_of(self.model) is None:
            self.reference = freeze(load_model(config.model_name_or_path, "lm", config.attn_backend, self.device,
                                               config.backend))
            hold_frozen_in_bf16(self.reference, config)
            self.reference = maybe_shard(self.reference, config, trainable=False)

    def _span_logps(self, model, batch, labels) -> Tensor:
        return token_logprobs(model, batch["input_ids"], batch["attention_mask"], labels).sum(-1)

    def _loss(self, batch):
        labels = dpo_span_labels(batch["input_ids"], batch["attention_mask"])
        logps = self._span_logps(self.model, batch, labels)
        with torch.no_grad():
            if self.reference is None:
                with adapters_disabled(self.model):
                    ref = self._span_logps(self.model, batch, labels)
            else:
                ref = self._span_logps(self.reference, batch, labels)
        return dpo_loss(logps, ref, self.config.scale_coeff)

    def loss(self, batch):
        return self._loss(batch)

    @torch.no_grad()
    def evaluate(self) -> dict:
        sums, n = {}, 0
        for batch in self.eval_batches():
            with self.autocast():
                _, m = self._loss(batch)
            k = batch["input_ids"].shape[0] // 2
            for key, v in m.items():
                sums[key] = sums.get(key, 0.0) + v * k
            n += k
        return {f"eval/{k}": v / max(n, 1) for k, v in sums.items()}
