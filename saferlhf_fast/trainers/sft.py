"""Supervised fine-tuning: cross-entropy on the response tokens only (prompt tokens carry ``IGNORE_INDEX``),
computed through the fused log-prob path (no [tokens, vocab] logits)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import SupervisedDataset
from ..ops import IGNORE_INDEX
from .config import TrainConfig, option
from .modeling import token_logprobs
from .supervised import Trainer


@dataclass
class SFTConfig(TrainConfig):
    """``saferlhf-fast sft`` (defaults: the reference's argparse; its SFT script passes 3 epochs, lr 2e-5 cosine,
    batch 4 x 8)."""

    weight_decay: float = option(1e-6, "AdamW weight decay (not on biases and layer-norm weights)")

    @property
    def command(self) -> str:
        return "sft"


def sft_loss(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over the trained tokens of the micro-batch (labels != IGNORE_INDEX).

    ``logp`` [B, L-1]: log-probs of ``labels[:, 1:]`` (0 where ignored); ``labels`` [B, L]."""
    mask = labels[:, 1:] != IGNORE_INDEX
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


class SFTTrainer(Trainer):
    dataset_class = SupervisedDataset
    head = "lm"

    def loss(self, batch):
        logp = token_logprobs(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss = sft_loss(logp, batch["labels"])
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self) -> dict:
        total, tokens = 0.0, 0
        for batch in self.eval_batches():
            with self.autocast():
                logp = token_logprobs(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            mask = batch["labels"][:, 1:] != IGNORE_INDEX
            total += float(-(logp * mask).sum())
            tokens += int(mask.sum())
        loss = total / max(tokens, 1)
        return {"eval/loss": loss, "eval/perplexity": float(torch.tensor(loss).exp())}
