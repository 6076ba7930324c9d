"""Generation on the training model itself: same weights, same kernels, no weight sync.

One ``generate`` call: switch to eval + ``no_grad`` (the weights are not copied), set up the model's static KV cache
``[layers, B, kv_heads, P + T, head_dim]`` (``model.setup_cache``: each attention module holds its layer's views;
released when the call returns, so no cache outlives it), prefill the left-padded prompts in one batched forward, then
decode one token per step (in-place cache writes; the step is captured once in a CUDA graph on GPU and replayed; on the
CPU the lean fused step of ``fast_decode.py``, one compiled op per step, and the compiled sampler for greedy / top-k
draws; ``decode_steps.choose_step`` picks the step once per call), with finished rows masked (they emit ``pad`` and
log-prob 0). Returns the sequences, masks, and the log-prob of every sampled token under ``softmax(logits /
temperature)`` (see ``sampling.py``), which equals what ``model.token_logprobs(gen.sequences, gen.attention_mask,
temperature=T)`` computes up to fp32 rounding (bit for bit with ``exact_logprobs=True``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..models.llama import positions_from_mask
from ..models.lora import lora_layers, merged_adapters
from ..settings import settings
from . import fast_decode as fd
from .decode_steps import choose_step, has_windows
from .sampling import SamplingParams, native_sampling_ok, next_token


@dataclass
class GenerateOutput:
    sequences: Tensor  # [B, P + T] int64: prompt (left-padded) + response (pad after eos)
    attention_mask: Tensor  # [B, P + T] bool: real tokens (prompt mask, then response_mask)
    response_mask: Tensor  # [B, T] bool: generated tokens up to and including eos
    logprobs: Tensor  # [B, T] fp32: log_softmax(logits / temperature)[token]; 0 where response_mask is 0
    prompt_length: int  # P

    @property
    def responses(self) -> Tensor:
        return self.sequences[:, self.prompt_length:]


def _eos_list(eos_token_id, config) -> list[int]:
    eos = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _pad_id(pad_token_id, config, eos: list[int]) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    pad = getattr(config, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    return eos[0] if eos else 0


# Fewer new tokens than this: a LoRA model's adapters stay on the fly (see merge_lora_by_default).
MERGE_MIN_NEW_TOKENS = 4


def merge_lora_by_default(model, max_new_tokens: int, compiled_step: bool) -> bool:
    """``generate``'s default ``lora_merge``: merge a LoRA model's enabled adapters (``lora.merged_adapters``) for the
    call when the decode step is not the compiled CPU step and at least ``MERGE_MIN_NEW_TOKENS`` tokens are asked.

    Why (``bench generate --lora_rank R``, docs/rl.md): a decode step is a handful of rows through every weight, so
    on the fly costs each projection two more rank-r products (and their dispatch) per step, while a merge is one
    pass over the adapted weights per call.  On the eager step the merge paid for itself after 2-3 steps and made
    64-token generation 1.3-1.6x faster, on the transformers path 1.1-1.3x; on a GPU the same holds a fortiori
    (bandwidth-bound steps, a merge costs about two steps' weight traffic, the on-the-fly products are launch-bound
    kernels).  The compiled CPU step packs merged weights itself (``fast_decode._weight``); merging for it as well
    only changes the prefill, which then re-packs the merged weights that the frozen ``W`` has packed already
    (measured slower), so there the prefill stays on the fly.  The price of a merge is one copy of the adapted
    weights (plus, on the CPU, its oneDNN-packed copy) while the call runs: pass ``lora_merge=False`` (PPO:
    ``--lora_generation on-the-fly``) where that memory is not there."""
    if max_new_tokens < MERGE_MIN_NEW_TOKENS or compiled_step:
        return False
    return any(not m.disabled for m in lora_layers(model))


@torch.no_grad()
def generate(model, input_ids: Tensor, attention_mask: Tensor | None = None, *, max_new_tokens: int = 64,
             do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             repetition_penalty: float = 1.0, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, seed: int | None = None,
             use_cuda_graph: bool | None = None, fast_decode: bool | None = None,
             exact_logprobs: bool = False, lora_merge: bool | None = None,
             on_token: Callable[[Tensor, Tensor], None] | None = None) -> GenerateOutput:
    """Sample (or greedily decode) up to ``max_new_tokens`` after left-padded prompts ``input_ids`` [B, P].

    ``eos_token_id`` / ``pad_token_id`` default to the model config's (pad falls back to eos, then 0).  ``seed``
    makes sampling reproducible (a private ``torch.Generator``; the global RNG is untouched).  Decoding stops when
    every row has emitted eos; ``T`` is then the number of steps taken.

    ``fast_decode``: the lean CPU decode step (``fast_decode.py``: fused projections, prepacked weights, the
    compiled ``decode_step``); default on for fp32 and bf16 models on the CPU (bf16 matmuls under CPU bf16 autocast
    or for a model held in bf16, fp32 everywhere else in the step; bf16 only where oneDNN has native bf16 kernels,
    ``fast_decode.preferred``) unless ``$SAFERLHF_FAST_DECODE=0``; where the
    extension lacks the op or ``$SAFERLHF_NATIVE_DECODE=0``, and with False, the model's own ``forward_cached``
    runs every step (the eager reference path).

    ``exact_logprobs``: recompute ``logprobs`` with the training forward (``model.token_logprobs`` over the
    generated batch, one extra no-grad forward), so they are bit-identical to what a training forward computes.
    Without it the decode step's own log-probs are returned: the same quantity up to fp32 rounding of different
    matmul shapes (<= 1e-5 on small models; on SmolLM2-135M 2e-5 to 6e-5, the size of the training forward's own
    fp32 error against an fp64 forward, 3e-5: see README).  In bf16 (CPU bf16 autocast, or a model held in bf16) the
    gap is bf16 rounding of the two different computations, the same size for the compiled and the eager step
    (``bench/decode_precision.py``, 512 sampled tokens): max 4e-3 / mean 1e-3 on the 7M Llama under autocast, max
    0.23 / mean 0.04 on SmolLM2-135M under autocast (0.43 / 0.05 held in bf16); use ``exact_logprobs`` where the
    PPO ratio must start at exactly 1.

    ``lora_merge`` (a LoRA model): True computes every enabled adapted projection with one merged weight
    ``W + (alpha / r) B A`` for the call (``lora.merged_adapters``: the parameters are never written, the model after
    the call is bit for bit the one before), False applies the adapters on the fly (``x W^T + (alpha / r) (x A^T)
    B^T``) in the prefill and on the eager / CUDA-graph / transformers steps; the compiled CPU step always packs
    merged weights.  Both give the same tokens and log-probs up to rounding.  None (default):
    :func:`merge_lora_by_default` (merged except for the compiled step's prefill and very short generations); a model
    without adapters ignores it.

    ``on_token(tokens, emitted)``: called after every decode step with that step's tokens [B] and which rows
    emitted one [B] bool (False once a row has finished: its token is ``pad``), so a caller can show the text as it
    is generated (``saferlhf-fast chat``).  It only reads: the result is the same with or without it.  On the
    transformers path (``backend='hf'``) the steps are replayed after generation.
    """
    params = SamplingParams(do_sample, temperature, top_p, top_k, repetition_penalty)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model.device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask = attention_mask.to(device).bool()
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded (attention_mask[:, -1] must be 1 for every row)")
    eos = _eos_list(eos_token_id, model.config)
    pad = _pad_id(pad_token_id, model.config, eos)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))
    if getattr(model, "is_hf", False):
        merge = merge_lora_by_default(model, max_new_tokens, False) if lora_merge is None else lora_merge
        with merged_adapters(model, enabled=merge):
            out = _generate_hf(model, input_ids, attention_mask, max_new_tokens, params, eos, pad, seed)
        for t in range(out.response_mask.shape[1]) if on_token is not None else ():
            on_token(out.responses[:, t], out.response_mask[:, t])
        return out
    if use_cuda_graph is None:  # the captured step has no sliding-window masks: such models decode eagerly
        use_cuda_graph = device.type == "cuda" and not has_windows(model)
    if fast_decode is None:
        fast_decode = settings().fast_decode and fd.preferred(model)
    elif fast_decode and not fd.supported(model):
        raise ValueError("fast_decode covers the native decoder in fp32 / bf16 on the CPU; pass fast_decode=False")
    if fast_decode:
        use_cuda_graph = False
    if lora_merge is None:
        compiled = fast_decode and fd.compiled_step_runs(model)
        lora_merge = merge_lora_by_default(model, max_new_tokens, compiled)

    was_training = model.training
    model.eval()
    model.setup_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
    try:
        with merged_adapters(model, enabled=lora_merge):
            out = _decode(model, input_ids, attention_mask, max_new_tokens, params, eos, pad, generator,
                          use_cuda_graph, fast_decode, on_token)
    finally:
        model.release_cache()
        model.train(was_training)
    if exact_logprobs:
        lp = model.token_logprobs(out.sequences, out.attention_mask, temperature=params.temperature)
        out.logprobs = lp[:, out.prompt_length - 1:].masked_fill(~out.response_mask, 0.0)
    return out


def _decode(model, input_ids, prompt_mask, max_new_tokens, params, eos, pad, generator, use_cuda_graph,
            fast_decode=False, on_token=None):
    b, p = input_ids.shape
    device = input_ids.device
    cache = model.kv_cache  # set up by generate for this call
    cache.valid[:, :p] = prompt_mask
    decoder = choose_step(model, cache, b, prompt_mask, use_cuda_graph=use_cuda_graph, fast_decode=fast_decode)
    logits = decoder.prefill(input_ids, positions_from_mask(prompt_mask))

    tokens = torch.full((b, max_new_tokens), pad, dtype=torch.long, device=device)
    logprobs = torch.zeros(b, max_new_tokens, dtype=torch.float32, device=device)
    alive = torch.ones(b, dtype=torch.bool, device=device)  # not finished before this step
    response_mask = torch.zeros(b, max_new_tokens, dtype=torch.bool, device=device)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(b, model.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, input_ids, prompt_mask)  # real prompt tokens only (transformers also counts pads)
    position = prompt_mask.sum(-1)  # [B] position of the next token
    native_sampling = decoder.native and native_sampling_ok(logits.float(), params)
    check_every = 8 if device.type == "cuda" else 1

    steps = max_new_tokens
    for t in range(max_new_tokens):
        tok, lp = next_token(logits, params, seen, generator, native_sampling)
        tok = torch.where(alive, tok, pad)
        tokens[:, t] = tok
        logprobs[:, t] = lp.masked_fill(~alive, 0.0)
        response_mask[:, t] = alive
        if on_token is not None:
            on_token(tok, alive.clone())
        if eos_t is not None:
            alive = alive & ~torch.isin(tok, eos_t)
            if (t + 1) % check_every == 0 and not bool(alive.any()):
                steps = t + 1
                break
        if t == max_new_tokens - 1:
            break
        if seen is not None:
            seen.scatter_(1, tok[:, None], alive[:, None] | seen.gather(1, tok[:, None]))
        slot = p + t
        cache.valid[:, slot] = True
        logits = decoder.step(tok, position, slot)
        position = position + 1

    if check_every > 1 and steps == max_new_tokens:  # trim trailing all-finished steps (checked lazily on GPU)
        live = response_mask.any(0).nonzero()
        steps = int(live[-1]) + 1 if live.numel() else 1
    tokens, logprobs, response_mask = tokens[:, :steps], logprobs[:, :steps], response_mask[:, :steps]
    return GenerateOutput(
        sequences=torch.cat([input_ids, tokens], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
        response_mask=response_mask,
        logprobs=logprobs,
        prompt_length=p,
    )


def _generate_hf(model, input_ids, prompt_mask, max_new_tokens, params, eos, pad, seed) -> GenerateOutput:
    """backend='hf': transformers' generate (with its static KV cache where the model supports one), then one
    forward for the log-probs through ``linear_logprobs`` (same contract as the native path)."""
    if seed is not None:
        torch.manual_seed(int(seed))
    was_training = model.training
    model.eval()
    try:
        gc = copy.deepcopy(model.hf.generation_config)
        gc.update(do_sample=params.do_sample, max_new_tokens=max_new_tokens, pad_token_id=pad,
                  eos_token_id=eos or None, repetition_penalty=params.repetition_penalty,
                  temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        if getattr(model.hf, "_can_compile_fullgraph", False):  # the models that take a StaticCache
            gc.cache_implementation = "static"
        out = model.hf.generate(input_ids=input_ids, attention_mask=prompt_mask.long(), generation_config=gc)
        p = input_ids.shape[1]
        tokens = out[:, p:]
        if eos:
            is_eos = torch.isin(tokens, torch.tensor(eos, device=tokens.device))
            after = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first eos
            response_mask = ~after
        else:
            response_mask = torch.ones_like(tokens, dtype=torch.bool)
        attention_mask = torch.cat([prompt_mask, response_mask], 1)
        logp = model.token_logprobs(out, attention_mask, temperature=params.temperature)[:, p - 1:]
        return GenerateOutput(out, attention_mask, response_mask, logp * response_mask, p)
    finally:
        model.train(was_training)
