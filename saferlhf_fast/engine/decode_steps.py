"""The decode step of one ``generate`` call: one interface, three implementations, chosen once by ``choose_step``.

Every implementation runs the same math (``LlamaForCausalLM.forward_cached``'s: RMSNorm, RoPE, softmax in fp32)
on the same static KV cache, the model's own (``generate`` sets it up with ``model.setup_cache`` for the call; its
attention modules hold the per-layer views, the compiled step takes the whole ``[layers, ...]`` tensors):

* ``EagerStep``: the model's own ``forward_cached``, one token per row (the reference path; any model, any device);
* ``CudaGraphStep``: that step captured once in a CUDA graph and replayed (GPU, no sliding-window layers);
* ``fast_decode.DecodePlan``: the compiled CPU step ``saferlhf::decode_step`` over fused, prepacked weights
  (Llama-family models on the CPU in fp32, under bf16 autocast or held in bf16, when the extension has the op and
  ``$SAFERLHF_NATIVE_DECODE`` is on).

The prefill is always ``forward_cached`` on the model's own modules; only the one-token step differs.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ..models.attention import StaticKVCache
from . import fast_decode as fd


class DecodeStep(Protocol):
    """What ``generate`` needs from a decode step.  ``native``: the logits come from the compiled step (then the
    compiled sampler may draw from them)."""

    native: bool

    def prefill(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """Left-padded prompts ``[B, P]`` at cache slots ``[0, P)`` -> logits of the last position ``[B, V]``."""

    def step(self, tok: Tensor, pos: Tensor, slot: int) -> Tensor:
        """Tokens ``[B]`` at positions ``[B]`` written at cache slot ``slot`` -> logits ``[B, V]``."""


class EagerStep:
    """``forward_cached`` every step.  ``cache``: the cache decoded into, the model's own in ``generate`` (another
    one is used for each call only, see ``forward_cached``)."""

    native = False

    def __init__(self, model, cache: StaticKVCache):
        self.model, self.cache = model, cache

    def prefill(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        return self.model.forward_cached(input_ids, positions, self.cache, 0)

    def step(self, tok: Tensor, pos: Tensor, slot: int) -> Tensor:
        return self.model.forward_cached(tok[:, None], pos[:, None], self.cache, slot)


class CudaGraphStep(EagerStep):
    """The one-token step captured once in a CUDA graph and replayed: static input buffers, the cache slot as a
    tensor (``index_copy_`` writes), attention over the whole cache under ``cache.valid``."""

    def __init__(self, model, cache: StaticKVCache, batch: int):
        if has_windows(model):
            raise NotImplementedError("CUDA-graph decode does not support sliding-window layers; use_cuda_graph=False")
        super().__init__(model, cache)
        device = cache.k.device
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = None

    def _capture(self, slot: int):
        self.slot.fill_(slot)  # warm-up and capture write this slot; the real step overwrites it
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.model.forward_cached(self.tok, self.pos, self.cache, self.slot)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.model.forward_cached(self.tok, self.pos, self.cache, self.slot)

    def step(self, tok: Tensor, pos: Tensor, slot: int) -> Tensor:
        self.tok.copy_(tok[:, None])
        self.pos.copy_(pos[:, None])
        if self.graph is None:
            self._capture(slot)
        self.slot.fill_(slot)
        self.graph.replay()
        return self.out


def has_windows(model) -> bool:
    return any(model.config.layer_window(i) is not None for i in range(model.config.num_hidden_layers))


def choose_step(model, cache: StaticKVCache, batch: int, prompt_mask: Tensor, *, use_cuda_graph: bool,
                fast_decode: bool, packed: bool | None = None) -> DecodeStep:
    """The decode step for one ``generate`` call on ``cache`` (``generate`` passes the model's own,
    ``model.kv_cache``).  ``fast_decode`` (the caller checked ``fd.supported``): the
    compiled CPU step where the extension has it and the activation is SiLU, else the eager step (the same math on
    the model's own modules).  ``use_cuda_graph``: the captured eager step.  ``packed``: the compiled step's
    weights in oneDNN's blocked layout (default: where this torch build has MKL-DNN)."""
    if fast_decode and fd.compiled_step_runs(model):
        return fd.DecodePlan(model, cache, batch, prompt_mask, packed=packed)
    if use_cuda_graph:
        return CudaGraphStep(model, cache, batch)
    return EagerStep(model, cache)
