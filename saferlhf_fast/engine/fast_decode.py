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
  or ``$SAFERLHF_NATIVE_DECODE=0``) ``step_python`` runs the same step in torch ops.

Same math as ``LlamaForCausalLM.forward_cached`` (RMSNorm, the RoPE formula, softmax in fp32); only the matmul
kernels and the order of the sums differ, so logits agree to fp32 rounding and greedy tokens are the same
(``tests/test_fast_decode.py``).  The prefill still runs ``forward_cached`` (the training model's own modules).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.llama import _ACTIVATIONS
from ..ops.dense import linear_pointwise, onednn_available
from ..settings import settings


def native_step_available() -> bool:
    """Whether the compiled extension has the one-op decode step (``csrc/decode_ops.cpp``)."""
    if not settings().native_decode:
        return False
    from .. import _backend

    return _backend.has_op("decode_step")


class _Linear:
    """``y = x @ W.T + b`` with the weight prepared for small-batch decode matmuls."""

    __slots__ = ("w", "b", "packed", "n")

    def __init__(self, weight: Tensor, bias: Tensor | None, batch: int, packed: bool):
        weight = weight.detach()
        self.n = weight.shape[0]
        self.b = None if bias is None else bias.detach().contiguous()
        self.packed = packed
        if packed:
            self.w = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch)
        else:
            self.w = weight.t().contiguous()  # [H, N] row-major: the fast side of sgemm for small M

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed:
            return linear_pointwise(x, self.w, self.b)
        if self.b is None:
            return torch.mm(x, self.w)
        return torch.addmm(self.b, x, self.w)


def _weight(linear) -> Tensor:
    """The weight a projection computes with: a LoRA projection's ``W + (alpha / r) B A`` (merged once per
    ``generate`` call, as the packing), else ``W``."""
    merged = getattr(linear, "merged_weight", None)
    return merged() if merged is not None and not linear.disabled else linear.weight.detach()


def _cat_bias(*linears):
    biases = [lin.bias for lin in linears]
    if all(b is None for b in biases):
        return None
    return torch.cat([b.detach() if b is not None else torch.zeros(lin.out_features, dtype=lin.weight.dtype)
                      for b, lin in zip(biases, linears)])


class _Layer:
    __slots__ = ("ln1", "ln2", "eps1", "eps2", "qkv", "o", "gate_up", "down", "window", "idx")


class DecodePlan:
    """Prepared weights + the step function for one ``generate`` call (batch ``b``, cache ``cache``)."""

    def __init__(self, model, cache, batch: int, prompt_valid: Tensor, packed: bool | None = None):
        cfg = model.config
        if packed is None:
            packed = onednn_available()
        self.packed = packed
        self.cfg = cfg
        self.cache = cache
        self.b = batch
        self.nh, self.nkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = self.d ** -0.5
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.silu = self.act is F.silu
        self.inter = cfg.intermediate_size
        lm = model.model
        self.embed = lm.embed_tokens.weight.detach()
        self.layers = []
        for i, layer in enumerate(lm.layers):
            a, m = layer.self_attn, layer.mlp
            L = _Layer()
            L.idx = i
            L.ln1, L.eps1 = layer.input_layernorm.weight.detach(), layer.input_layernorm.eps
            L.ln2, L.eps2 = layer.post_attention_layernorm.weight.detach(), layer.post_attention_layernorm.eps
            qkv_w = torch.cat([_weight(a.q_proj), _weight(a.k_proj), _weight(a.v_proj)])
            L.qkv = _Linear(qkv_w, _cat_bias(a.q_proj, a.k_proj, a.v_proj), batch, packed)
            L.o = _Linear(_weight(a.o_proj), a.o_proj.bias, batch, packed)
            gu_w = torch.cat([_weight(m.gate_proj), _weight(m.up_proj)])
            L.gate_up = _Linear(gu_w, _cat_bias(m.gate_proj, m.up_proj), batch, packed)
            L.down = _Linear(_weight(m.down_proj), m.down_proj.bias, batch, packed)
            L.window = a.window
            self.layers.append(L)
        self.norm_w, self.norm_eps = lm.norm.weight.detach(), lm.norm.eps
        self.lm_head = _Linear(model.lm_head.weight, None, batch, packed)
        rope = lm.rotary_emb
        rope.ensure(cache.max_len, self.embed.device)
        self.cos, self.sin = rope.cos_table, rope.sin_table
        # additive key mask over the whole cache: -inf at prompt padding, 0 elsewhere (generated slots are valid
        # for every row: finished rows keep writing pad tokens, as the eager path does)
        add = torch.zeros(batch, cache.max_len, dtype=torch.float32, device=self.embed.device)
        p = prompt_valid.shape[1]
        add[:, :p].masked_fill_(~prompt_valid.bool(), float("-inf"))
        self.additive2d = add
        self.additive = add[:, None, None, :]  # [B, 1, 1, S]
        self.windows = any(L.window is not None for L in self.layers)
        self.native = native_step_available() and self.silu and self.cos.dtype == torch.float32
        if self.native:
            self.weights, self.biases = [], []
            for L in self.layers:
                self.weights += [L.ln1, L.qkv.w, L.o.w, L.ln2, L.gate_up.w, L.down.w]
                self.biases += [L.qkv.b, L.o.b, L.gate_up.b, L.down.b]
            self.window_list = [L.window or 0 for L in self.layers]

    def _mask(self, total: int, window: int | None) -> Tensor:
        m = self.additive[..., :total]
        if window is not None and total > window:
            m = m.clone()
            m[..., : total - window] = float("-inf")
        return m

    @torch.no_grad()
    def step(self, tok: Tensor, pos: Tensor, slot: int) -> Tensor:
        """``tok`` [B] int64 written at cache slot ``slot``, position ``pos`` [B] -> logits [B, V] fp32."""
        if self.native:
            return torch.ops.saferlhf.decode_step(
                tok, pos, self.embed, self.weights, self.biases, self.norm_w, self.lm_head.w, self.cache.k,
                self.cache.v, self.cos, self.sin, self.additive2d, self.window_list, slot, self.nh, self.nkv,
                self.inter, float(self.layers[0].eps1), self.packed)
        return self.step_python(tok, pos, slot)

    def step_python(self, tok: Tensor, pos: Tensor, slot: int) -> Tensor:
        """The same step in torch ops (no compiled extension, or an activation other than SiLU)."""
        b, nh, nkv, d = self.b, self.nh, self.nkv, self.d
        g = nh // nkv
        total = slot + 1
        x = F.embedding(tok, self.embed)  # [B, H]
        h_dim = x.shape[-1]
        cos = self.cos[pos][:, None, :]  # [B, 1, d]
        sin = self.sin[pos][:, None, :]
        masks = {None: self.additive[..., :total]}
        k_layers, v_layers = self.cache.k_layers, self.cache.v_layers
        nq = nh * d
        for L in self.layers:
            h = F.rms_norm(x, (h_dim,), L.ln1, L.eps1)
            qkv = L.qkv(h)  # [B, (nh + 2 nkv) d]
            qk = qkv[:, : nq + nkv * d].view(b, nh + nkv, d)
            qk = qk * cos + torch.roll(qk, d // 2, dims=-1) * sin
            q = qk[:, :nh]  # [B, nh, d]
            ck, cv = k_layers[L.idx], v_layers[L.idx]  # [B, nkv, S, d]
            ck[:, :, slot] = qk[:, nh:]
            cv[:, :, slot] = qkv[:, nq + nkv * d:].view(b, nkv, d)
            mask = masks.get(L.window)
            if mask is None:
                mask = masks[L.window] = self._mask(total, L.window)
            scores = torch.matmul(q.reshape(b, nkv, g, d), ck[:, :, :total].transpose(-1, -2))
            scores = scores.mul_(self.scale).add_(mask)
            probs = torch.softmax(scores, dim=-1)
            att = torch.matmul(probs, cv[:, :, :total])  # [B, nkv, g, d]
            x = x + L.o(att.reshape(b, nq))
            h = F.rms_norm(x, (h_dim,), L.ln2, L.eps2)
            gu = L.gate_up(h)
            gate, up = gu[:, : self.inter], gu[:, self.inter:]
            x = x + L.down(self.act(gate) * up)
        x = F.rms_norm(x, (h_dim,), self.norm_w, self.norm_eps)
        return self.lm_head(x)


def supported(model, dtype=None) -> bool:
    """The fast step covers the native Llama-family decoder in fp32 on the CPU: models whose config has no
    ``family_features`` (Qwen3's q/k norms, Gemma's scaled embeddings, sandwich norms, soft-capping, local RoPE
    decode through the model's own ``forward_cached``)."""
    if getattr(model, "is_hf", False) or not hasattr(model, "lm_head"):
        return False
    if model.config.family_features():
        return False
    if any(type(p.data).__name__ == "DTensor" for p in (model.lm_head.weight, model.model.embed_tokens.weight)):
        return False  # sharded (FSDP2) weights: the eager path
    return model.device.type == "cpu" and model.dtype == torch.float32
