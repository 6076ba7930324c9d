"""The rollout record of the PPO family and the re-tokenisation between tokenizers.

A rollout row is ``prompt (left-padded, P tokens) + response (T tokens, right-padded after eos)``.  Response token
``t`` sits at sequence index ``P + t``; its log-prob comes from the logits at index ``P - 1 + t`` and the critic's
value of the state *before* it is the score at index ``P - 1 + t`` (the reference implementation slices
``values[:, :-1]`` and ``log_probs = log_softmax(logits[:, :-1])[seq[:, 1:]]`` and then keeps ``[:, start:]`` with
``start = P - 1``).  Everything per-token is ``[B, T]`` over those positions, masked by the response mask (eos
included, pads excluded).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops import IGNORE_INDEX


@dataclass
class Rollout:
    """One micro-batch of experience.  Sequences ``[b, P + T]``; per-token tensors ``[b, T]`` over the response."""

    input_ids: Tensor
    attention_mask: Tensor  # bool [b, P + T]
    response_mask: Tensor  # float [b, T]
    prompt_length: int  # P
    labels: Tensor  # [b, P + T]: label of position j is token j + 1 where that is a response token, else -100
    ref_logprobs: Tensor  # [b, T]
    reward: Tensor  # [b] end scores R
    cost: Tensor | None  # [b] end scores C
    old_logprobs: Tensor | None = None  # [b, T]; None: taken from the first training forward (fused)
    old_values: Tensor | None = None  # [n_critics, b, T]; None: idem
    # filled on first use
    rewards: Tensor | None = None  # [n_streams, b, T] per-token (KL-penalised) rewards / costs
    advantages: Tensor | None = None  # [n_streams, b, T]
    returns: Tensor | None = None  # [n_streams, b, T]
    critic_hidden: list | None = None  # per critic: its frozen backbone's states [b, T, H] of the response columns

    @property
    def response_length(self) -> int:
        return self.response_mask.shape[1]

    def response_slice(self, x: Tensor) -> Tensor:
        """``x[:, P - 1 : P - 1 + T]``: the per-position quantity (log-prob of the next token, value of the state)
        aligned with the response tokens."""
        p = self.prompt_length
        return x[:, p - 1:p - 1 + self.response_length]


def response_labels(sequences: Tensor, response_mask: Tensor, prompt_length: int) -> Tensor:
    """Labels for ``model.token_logprobs(..., labels=)``: position ``P - 1 + t`` predicts response token ``t``."""
    b, length = sequences.shape
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long, device=sequences.device)
    resp = sequences[:, prompt_length:]
    labels[:, prompt_length - 1:length - 1] = resp.masked_fill(~response_mask.bool(), IGNORE_INDEX)
    return labels


def trim(sequences: Tensor, attention_mask: Tensor, response_mask: Tensor, prompt_length: int):
    """Drop leading prompt columns that are padding in every row and trailing response columns that are padding in
    every row (exact: masked positions contribute nothing).  Returns (sequences, attention_mask, response_mask,
    prompt_length, kept response columns)."""
    prompt_cols = attention_mask[:, :prompt_length].any(0)
    first = int(prompt_cols.nonzero()[0]) if bool(prompt_cols.any()) else prompt_length - 1
    first = min(first, prompt_length - 1)
    resp_cols = response_mask.bool().any(0)
    t = int(resp_cols.nonzero()[-1]) + 1 if bool(resp_cols.any()) else 1
    end = prompt_length + t
    return (sequences[:, first:end], attention_mask[:, first:end], response_mask[:, :t], prompt_length - first, t)


def same_tokenizer(a, b) -> bool:
    """The reference's ``is_same_tokenizer``: same vocabulary and special tokens."""
    if a is b:
        return True
    try:
        return (a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id
                and a.pad_token_id == b.pad_token_id and a.bos_token_id == b.bos_token_id)
    except Exception:  # noqa: BLE001 - exotic tokenizers: treat as different, re-tokenising is always correct
        return False


def retokenize(sequences: Tensor, attention_mask: Tensor, src_tokenizer, dest_tokenizer, max_length: int):
    """The reference's ``batch_retokenize``: decode each row (special tokens skipped), append the destination
    tokenizer's eos, tokenize, pad (right).  Returns (input_ids, attention_mask) on the CPU."""
    texts = []
    for row, m in zip(sequences.cpu(), attention_mask.cpu().bool()):
        texts.append(src_tokenizer.decode(row[m].tolist(), skip_special_tokens=True) + dest_tokenizer.eos_token)
    enc = dest_tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"].bool()
