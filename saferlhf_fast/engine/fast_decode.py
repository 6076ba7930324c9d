"""The lean CPU decode step: one token per row through the whole decoder with as few dispatcher calls as possible.

At the sizes the engine runs on a CPU (batch 8-16, hidden 256-1024) a decode step is dominated by per-op overhead
and by how well the matmuls stream their weights, not by FLOPs.  ``DecodePlan`` prepares the weights once per
``generate`` call (they are the training weights of that moment; nothing is cached across calls, so a PPO update
in between is always seen):

* q/k/v and gate/up projections concatenated into one weight each (one matmul instead of three / two; the
  parameters themselves keep the Hugging Face layout, so checkpoint IO, optimizers and FSDP see nothing);
* every projection and the lm_head in oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, the
  layout inductor's freezing uses): a decode matmul ``[B, H] x [H, N]`` streams it faster than ``F.linear``
  on the plain row-major weight (no MKL-DNN build: a contiguous transposed copy and ``torch.mm``); packing costs
  one pass over the weights per ``generate`` call;
* the step itself is one compiled op, ``saferlhf::decode_step`` (``csrc/decode_ops.cpp``): embedding, RMSNorm,
  RoPE, in-place KV-cache writes, grouped-query attention over the filled slots, SiLU-gated MLP and residuals
  in plain loops between the oneDNN matmuls (~45 torch ops per layer become 4 matmul calls); the additive key
  mask is built once per call, not per step.  Only the Llama math: ``supported`` sends Qwen3 / Gemma models to
  ``forward_cached``.  Without the compiled extension (or with a non-SiLU activation,
  or ``$SAFERLHF_NATIVE_DECODE=0``) ``decode_steps.choose_step`` picks the eager ``forward_cached`` step instead.

Same math as ``LlamaForCausalLM.forward_cached`` (RMSNorm, the RoPE formula, softmax in fp32); only the matmul
kernels and the order of the sums differ, so logits agree to fp32 rounding and greedy tokens are the same
(``tests/test_fast_decode.py``).

bf16 (``matmul_dtype``, read once per ``generate`` call): under CPU bf16 autocast, or for a model held in bf16, the
plan packs bf16 copies of the projection and lm_head weights and the step runs every matmul in bf16 (input rounded
to bf16 just before it, fp32 accumulation, the bf16 product widened to fp32); norms, RoPE, attention, SwiGLU,
residuals and the logits stay fp32, and so does the KV cache: a model held in bf16 fills its own bf16 cache in the
prefill, which the plan widens once into an fp32 cache it decodes into (one attention kernel for every precision;
the cost is that fp32 copy of the cache, small next to the weights at decode sizes).  Its logits are within a few
bf16 ulp of the eager step's in the same precision (the eager step also rounds RoPE, attention and the residual
stream to bf16).  The prefill runs ``forward_cached`` (the training model's own modules).
``DecodePlan`` is one implementation of ``decode_steps.DecodeStep``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.attention import StaticKVCache
from ..models.llama import _ACTIVATIONS
from ..ops.dense import onednn_available, onednn_bf16_available


def native_step_available() -> bool:
    """Whether the one-op decode step (``csrc/decode_ops.cpp``) runs: the registry entry ``decode`` chooses
    ``native`` (the extension has the op and ``$SAFERLHF_NATIVE_DECODE`` is not 0)."""
    from .. import _backend

    return _backend.chosen("decode", "cpu") == "native"


def silu_activation(model) -> bool:
    """The compiled step hard-codes the SiLU-gated MLP."""
    return _ACTIVATIONS[model.config.hidden_act] is F.silu


def compiled_step_runs(model) -> bool:
    """Whether ``DecodePlan`` can decode ``model`` (given ``supported``): the extension has the step and the model's
    activation is the SiLU it hard-codes; else the eager step decodes (``decode_steps.choose_step``)."""
    return native_step_available() and silu_activation(model)


def matmul_dtype(model) -> torch.dtype | None:
    """The dtype of the compiled step's matmuls for ``model`` in the current autocast state (read once per
    ``generate`` call): bf16 under CPU bf16 autocast or for a model held in bf16, fp32 for an fp32 model without
    autocast, None for anything else (fp16, autocast to another dtype: the eager step)."""
    if torch.is_autocast_enabled("cpu"):
        return torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None
    return model.dtype if model.dtype in (torch.float32, torch.bfloat16) else None


class _Linear:
    """The weight and bias of ``y = x @ W.T + b`` prepared for the compiled step's small-batch matmuls, both in
    ``dtype`` (the step rounds its input to the weight's dtype: bf16 weights make a bf16 matmul)."""

    __slots__ = ("w", "b", "packed", "n")

    def __init__(self, weight: Tensor, bias: Tensor | None, batch: int, packed: bool,
                 dtype: torch.dtype = torch.float32):
        weight = weight.detach().to(dtype)
        self.n = weight.shape[0]
        self.b = None if bias is None else bias.detach().to(dtype).contiguous()
        self.packed = packed
        if packed:
            self.w = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch)
        else:
            self.w = weight.t().contiguous()  # [H, N] row-major: the fast side of sgemm for small M


def _weight(linear) -> Tensor:
    """The weight a projection computes with: a LoRA projection's ``W + (alpha / r) B A`` (merged once per
    ``generate`` call, as the packing, in the weights' own dtype even under autocast, so a bf16 plan rounds the
    merged weight once; inside ``lora.merged_adapters`` the merged weight the block already holds), else ``W``."""
    merge = getattr(linear, "merged_weight", None)
    if merge is None or linear.disabled:
        return linear.weight.detach()
    if linear.merged is not None:
        return linear.merged
    with torch.autocast("cpu", enabled=False):
        return merge()


def _cat_bias(*linears):
    biases = [lin.bias for lin in linears]
    if all(b is None for b in biases):
        return None
    return torch.cat([b.detach() if b is not None else torch.zeros(lin.out_features, dtype=lin.weight.dtype)
                      for b, lin in zip(biases, linears)])


def _fp32(t: Tensor) -> Tensor:
    """An fp32 copy of a small tensor (norm weights) of a model held in bf16; an fp32 tensor as it is."""
    return t.detach().float()


class _Layer:
    __slots__ = ("ln1", "ln2", "eps1", "qkv", "o", "gate_up", "down", "window")


class DecodePlan:
    """Prepared weights + the compiled step for one ``generate`` call (``batch`` rows, ``cache``: the model's own
    in ``generate``, whose whole ``[layers, B, kv_heads, S, d]`` tensors the step takes; the attention modules'
    per-layer views of it are what the prefill fills).  Built by
    ``decode_steps.choose_step`` only where the extension has ``decode_step`` and the activation is SiLU."""

    native = True

    def __init__(self, model, cache, batch: int, prompt_valid: Tensor, packed: bool | None = None):
        mm = matmul_dtype(model)
        if not compiled_step_runs(model) or mm is None:
            raise RuntimeError("DecodePlan needs saferlhf::decode_step, a SiLU model and fp32 / bf16 matmuls; use "
                               "decode_steps.EagerStep")
        cfg = model.config
        # oneDNN packs bf16 weights only where it has bf16 kernels; elsewhere the step's bf16 matmuls run on plain
        # row-major weights
        packable = onednn_available() and native_matmuls(mm)
        if packed is None:
            packed = packable
        elif packed and not packable:
            raise RuntimeError(f"DecodePlan: oneDNN cannot pack {mm} weights on this CPU; pass packed=False")
        self.packed = packed
        self.model = model
        self.matmul_dtype = mm
        self.cache = cache
        # the step keeps its KV cache in fp32 (one attention kernel for every precision); a model held in bf16 has a
        # bf16 cache, which its own prefill fills: the plan then decodes into an fp32 copy (see prefill)
        self.kv = cache if cache.k.dtype == torch.float32 else StaticKVCache(
            cache.k.shape[0], batch, cache.k.shape[2], cache.max_len, cache.k.shape[4], torch.float32, cache.k.device)
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.inter = cfg.intermediate_size
        lm = model.model
        self.embed = lm.embed_tokens.weight.detach()  # fp32 or bf16: the step widens the rows it reads to fp32
        self.layers = []
        for layer in lm.layers:
            a, m = layer.self_attn, layer.mlp
            L = _Layer()
            L.ln1, L.eps1 = _fp32(layer.input_layernorm.weight), layer.input_layernorm.eps
            L.ln2 = _fp32(layer.post_attention_layernorm.weight)
            qkv_w = torch.cat([_weight(a.q_proj), _weight(a.k_proj), _weight(a.v_proj)])
            L.qkv = _Linear(qkv_w, _cat_bias(a.q_proj, a.k_proj, a.v_proj), batch, packed, mm)
            L.o = _Linear(_weight(a.o_proj), a.o_proj.bias, batch, packed, mm)
            gu_w = torch.cat([_weight(m.gate_proj), _weight(m.up_proj)])
            L.gate_up = _Linear(gu_w, _cat_bias(m.gate_proj, m.up_proj), batch, packed, mm)
            L.down = _Linear(_weight(m.down_proj), m.down_proj.bias, batch, packed, mm)
            L.window = a.window
            self.layers.append(L)
        self.norm_w = _fp32(lm.norm.weight)
        self.lm_head = _Linear(model.lm_head.weight, None, batch, packed, mm)
        rope = lm.rotary_emb
        rope.ensure(cache.max_len, self.embed.device)
        self.cos, self.sin = rope.cos_table, rope.sin_table
        # additive key mask over the whole cache: -inf at prompt padding, 0 elsewhere (generated slots are valid
        # for every row: finished rows keep writing pad tokens, as the eager path does)
        add = torch.zeros(batch, cache.max_len, dtype=torch.float32, device=self.embed.device)
        p = prompt_valid.shape[1]
        add[:, :p].masked_fill_(~prompt_valid.bool(), float("-inf"))
        self.additive2d = add
        self.weights, self.biases = [], []
        for L in self.layers:
            self.weights += [L.ln1, L.qkv.w, L.o.w, L.ln2, L.gate_up.w, L.down.w]
            self.biases += [L.qkv.b, L.o.b, L.gate_up.b, L.down.b]
        self.window_list = [L.window or 0 for L in self.layers]

    def prefill(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """The prompts through the model's own ``forward_cached`` (fills the cache the compiled step reads; a bf16
        cache is widened once into the step's fp32 one, prompt slots only)."""
        logits = self.model.forward_cached(input_ids, positions, self.cache, 0)
        if self.kv is not self.cache:
            p = input_ids.shape[1]
            self.kv.k[..., :p, :].copy_(self.cache.k[..., :p, :])
            self.kv.v[..., :p, :].copy_(self.cache.v[..., :p, :])
        return logits

    @torch.no_grad()
    def step(self, tok: Tensor, pos: Tensor, slot: int) -> Tensor:
        """``tok`` [B] int64 written at cache slot ``slot``, position ``pos`` [B] -> logits [B, V] fp32."""
        return torch.ops.saferlhf.decode_step(
            tok, pos, self.embed, self.weights, self.biases, self.norm_w, self.lm_head.w, self.kv.k,
            self.kv.v, self.cos, self.sin, self.additive2d, self.window_list, slot, self.nh, self.nkv,
            self.inter, float(self.layers[0].eps1), self.packed)


def supported(model, dtype=None) -> bool:
    """The fast step covers the native Llama-family decoder on the CPU with fp32 or bf16 matmuls (``matmul_dtype``:
    an fp32 model, under bf16 autocast or not, or a model held in bf16): models whose config has no
    ``family_features`` (Qwen3's q/k norms, Gemma's scaled embeddings, sandwich norms, soft-capping, local RoPE
    decode through the model's own ``forward_cached``)."""
    if getattr(model, "is_hf", False) or not hasattr(model, "lm_head"):
        return False
    if model.config.family_features():
        return False
    if any(type(p.data).__name__ == "DTensor" for p in (model.lm_head.weight, model.model.embed_tokens.weight)):
        return False  # sharded (FSDP2) weights: the eager path
    return model.device.type == "cpu" and matmul_dtype(model) is not None


def native_matmuls(dtype: torch.dtype) -> bool:
    """Whether this CPU runs the step's ``dtype`` matmuls natively: fp32 always, bf16 where oneDNN has bf16 kernels
    (AVX512-BF16 / AMX); elsewhere bf16 matmuls are emulated."""
    return dtype == torch.float32 or onednn_bf16_available()


def preferred(model) -> bool:
    """Whether ``generate`` decodes ``model`` with the compiled step by default: :func:`supported` with
    :func:`native_matmuls`.  With emulated bf16 matmuls the step runs several times slower than the eager step,
    whose products take torch's kernels (docs/precision.md); ``fast_decode=True`` still forces the compiled step."""
    return supported(model) and native_matmuls(matmul_dtype(model))
