"""Next-token choice from one step's logits, applied exactly as transformers' logits processors do, in their order:
repetition penalty, then (sampling only) temperature, top-k, top-p; then one categorical draw (inverse CDF, see
``sample_categorical``) or ``argmax`` when greedy.  All math in fp32.

The log-prob returned with each token is ``log_softmax(logits / temperature)[token]`` of the *raw* logits: before
the repetition penalty and the top-k / top-p filters.  That is the distribution the training forward
(``model.token_logprobs(..., temperature=T)``) computes, so PPO's old log-probs equal a recomputation exactly; with
the reference's defaults (temperature 1, top_p 1, no top-k, no penalty) it is also the sampling distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _backend


@dataclass
class SamplingParams:
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(scores: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor over the tokens marked in ``seen`` [B, V]."""
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def apply_top_k(scores: Tensor, k: int) -> Tensor:
    k = min(k, scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def apply_top_p(scores: Tensor, top_p: float) -> Tensor:
    """transformers' TopPLogitsWarper (keeps at least one token)."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, sorted_indices, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def process(logits: Tensor, params: SamplingParams, seen: Tensor | None) -> Tensor:
    """The scores the next token is drawn from (fp32 [B, V])."""
    scores = logits
    if params.repetition_penalty != 1.0 and seen is not None:
        scores = apply_repetition_penalty(scores, seen, params.repetition_penalty)
    if not params.do_sample:
        return scores
    if params.temperature != 1.0:
        scores = scores / params.temperature
    if params.top_k > 0:
        scores = apply_top_k(scores, params.top_k)
    if params.top_p < 1.0:
        scores = apply_top_p(scores, params.top_p)
    return scores


def sample_categorical(weights: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row from unnormalised non-negative ``weights`` [B, V]: inverse CDF on an fp64 cumulative sum
    (one uniform per row).  Exact sampling (zero-weight tokens are never drawn) and much cheaper on CPU than
    ``torch.multinomial``, which draws V exponentials per row."""
    cdf = weights.double().cumsum_(-1)
    u = torch.rand(weights.shape[0], 1, dtype=torch.float64, device=weights.device, generator=generator)
    return torch.searchsorted(cdf, u.mul_(cdf[:, -1:]), right=True).squeeze(1).clamp_(max=weights.shape[1] - 1)


def native_sampling_ok(logits: Tensor, params: SamplingParams) -> bool:
    """Whether ``saferlhf::sample_tokens`` (csrc/decode_ops.cpp) covers this step and pays: fp32 CPU logits, no
    top-p, no repetition penalty, and greedy or top-k (where it beats the torch ops; plain full-vocabulary sampling
    stays on the vectorised torch ops, which are faster there)."""
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and params.top_p == 1.0
            and params.repetition_penalty == 1.0 and (not params.do_sample or params.top_k > 0)
            and _backend.chosen("sampling", "cpu") == "native")


def next_token(logits: Tensor, params: SamplingParams, seen: Tensor | None, generator: torch.Generator | None,
               native: bool = False):
    """(tokens [B] int64, log-probs [B] fp32) for one step's logits [B, V].

    ``native``: one compiled op (``saferlhf::sample_tokens``: the same draw -- one fp64 uniform per row, inverse
    CDF over the vocabulary in index order -- and the log-prob from the training forward's log-prob kernel) when
    ``native_sampling_ok``; the caller checks that once per generate call.  Logits of any float dtype (bf16 / fp16
    under autocast) are read as fp32: the op takes contiguous fp32 rows, the torch path computes in fp32."""
    if native:
        b = logits.shape[0]
        greedy = not params.do_sample
        u = (logits.new_empty(0, dtype=torch.float64) if greedy
             else torch.rand(b, dtype=torch.float64, device=logits.device, generator=generator))
        return torch.ops.saferlhf.sample_tokens(logits.float().contiguous(), u, float(params.temperature),
                                                int(params.top_k), greedy)
    logits = logits.float()
    tempered = logits / params.temperature if params.temperature != 1.0 else logits
    logp_all = torch.log_softmax(tempered, dim=-1)
    plain = params.repetition_penalty == 1.0 and params.top_k == 0 and params.top_p == 1.0
    if not params.do_sample:
        tokens = process(logits, params, seen).argmax(dim=-1)
    elif plain:  # the sampling distribution is the tempered one itself
        tokens = sample_categorical(logp_all.exp(), generator)
    else:
        tokens = sample_categorical(torch.softmax(process(logits, params, seen), dim=-1), generator)
    return tokens, logp_all.gather(1, tokens[:, None]).squeeze(1)
