"""The Llama-family decoder, readable top to bottom: Llama 1/2/3 (incl. llama3 / linear RoPE scaling), Mistral
(sliding window), Qwen2 (q/k/v bias), SmolLM.  GQA, tied or untied embeddings, RMSNorm, SwiGLU.

The same modules with a few switches (``ModelConfig.family_features``) also run Qwen3 and Gemma 2 / 3 text:

* Qwen3: RMSNorm on each query and key head before RoPE (``q_norm`` / ``k_norm``);
* Gemma 2 / 3: embeddings times ``sqrt(hidden_size)`` (rounded to the embedding dtype), RMSNorm scaling by
  ``1 + weight``, sandwich norms (``post_attention_layernorm`` on the attention output, ``pre_feedforward_layernorm``
  / ``post_feedforward_layernorm`` around the MLP), GeGLU (``gelu_pytorch_tanh``), scores scaled by
  ``query_pre_attn_scalar ** -0.5``, alternating sliding-window / global layers (``layer_types``); Gemma 2's
  attention logit soft-capping ``s -> cap * tanh(s / cap)`` (an eager attention, see ``attention.softcap_attention``)
  and final logit soft-capping; Gemma 3's q / k norms and its own RoPE base for sliding layers
  (``rope_local_theta``).

Parameter names are the Hugging Face ones (``model.embed_tokens``, ``model.layers.N.self_attn.q_proj``, ...,
``model.norm``, ``lm_head``, ``score_head``), so checkpoint IO (``checkpoint.py``) is a dict copy.

Two heads on one backbone (``LlamaModel``):

* ``LlamaForCausalLM``: ``model(ids, mask).logits`` ``[B, L, V]``; ``token_logprobs`` feeds the last hidden states
  and the lm_head weight to ``ops.linear_logprobs``, so training never materialises ``[tokens, V]`` logits;
  ``forward_cached`` is the engine's prefill / decode step on the model's KV cache.
* ``LlamaForScore``: ``score_head = Linear(H, 1)`` (with or without bias, as the checkpoint's config says) on every
  position: ``scores`` ``[B, L]`` and ``end_scores`` ``[B]`` (score at the last real token), as the reference's score
  models.

bf16 mixed precision (``--bf16``: CPU ``torch.autocast`` in bf16, or CUDA autocast): every product uses the bf16
rounding of its 2-D weight (projections, lm_head, embedding rows) with fp32 accumulation (``ops.linear``,
``ops.linear_logprobs``); the residual stream, norms, softmax, scores and log-probs stay fp32.  A model whose 2-D
weights are held in bf16 (:func:`hold_in_bf16`: the frozen reference / reward / cost models, a LoRA model's frozen
base) therefore computes exactly what its fp32 original computes under autocast.

KV cache (generation only).  The cache is owned by the attention modules, as in gpt-fast:
``LlamaForCausalLM.setup_cache(batch, max_len)`` allocates one ``StaticKVCache`` (``[layers, B, kv_heads, max_len,
head_dim]``, so the compiled CPU decode step gets whole contiguous tensors) and hands each layer's ``Attention`` its
views (``kv_cache``); ``release_cache()`` drops them.  ``forward_cached`` builds masks that carry the cache slot of
its tokens (``Mask.cache_start``), and only such a forward reads or writes the cache: ``LlamaModel.forward`` and
``DecoderLayer.forward`` take no cache argument, and the training and scoring forwards never touch one.

Positions follow the attention mask exactly as transformers does for left-padded batches:
``position_ids = cumsum(mask) - 1`` (pads get 1), so results equal ``transformers`` on padded batches too.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..ops.dense import autocast_bf16
from ..ops.reference import IGNORE_INDEX
from . import attention as attn
from .attention import LayerKVCache, Mask, StaticKVCache


# ============================================================================================== config
@dataclass
class ModelConfig:
    """Architecture hyper-parameters (the Llama family).  ``checkpoint.config_from_hf`` fills it from config.json."""

    model_type: str = "llama"  # llama | mistral | qwen2 (SmolLM is llama)
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: = num_attention_heads (MHA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", "factor": ..., ...}
    attention_bias: bool = False  # bias on q, k, v and o (Llama's flag)
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral; Qwen2 per layer through layer_types
    layer_types: list[str] | None = None  # per layer: "full_attention" | "sliding_attention"
    initializer_range: float = 0.02
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Gemma 2 / 3 (None: the Llama behaviour)
    query_pre_attn_scalar: float | None = None  # attention scale query_pre_attn_scalar ** -0.5 (else head_dim ** -0.5)
    attn_logit_softcapping: float | None = None  # attention scores s -> cap * tanh(s / cap)
    final_logit_softcapping: float | None = None  # logits z -> cap * tanh(z / cap)
    rope_local_theta: float | None = None  # RoPE base of the sliding-window layers (Gemma 3), never scaled
    extra: dict = field(default_factory=dict)  # other config.json keys, written back unchanged on save

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.gemma and self.layer_types is None:  # transformers' default: every Nth layer global
            pattern = 2 if self.model_type == "gemma2" else 6
            self.layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                for i in range(self.num_hidden_layers)]
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})"
            )

    @property
    def gemma(self) -> bool:
        """Gemma 2 / 3 layout: scaled embeddings, ``1 + weight`` RMSNorms, sandwich norms."""
        return self.model_type in GEMMA_TYPES

    @property
    def qk_norm(self) -> bool:
        """RMSNorm on every query / key head before RoPE (Qwen3, Gemma 3)."""
        return self.model_type in QK_NORM_TYPES

    def family_features(self) -> list[str]:
        """What this model computes beyond the Llama family's math (empty for Llama, Mistral, Qwen2, SmolLM).  The
        fused CPU decode step covers the Llama math only; a model with any of these decodes through
        ``forward_cached``."""
        features = []
        if self.qk_norm:
            features.append("q/k norm")
        if self.gemma:
            features += ["embedding scale", "1 + weight RMSNorm", "sandwich norms"]
        if self.query_pre_attn_scalar is not None:
            features.append("query_pre_attn_scalar")
        if self.attn_logit_softcapping is not None:
            features.append("attention logit soft-capping")
        if self.final_logit_softcapping is not None:
            features.append("final logit soft-capping")
        if self.rope_local_theta is not None:
            features.append("local RoPE base")
        return features

    def layer_rope_local(self, i: int) -> bool:
        """Whether layer ``i`` uses the local RoPE table (a sliding layer of a model with ``rope_local_theta``)."""
        return (self.rope_local_theta is not None and self.layer_types is not None
                and self.layer_types[i] == "sliding_attention")

    def layer_window(self, i: int) -> int | None:
        """Sliding window of layer ``i`` (None: full attention)."""
        if self.layer_types is not None:
            return self.sliding_window if self.layer_types[i] == "sliding_attention" else None
        return self.sliding_window

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


GEMMA_TYPES = ("gemma2", "gemma3_text")
QK_NORM_TYPES = ("qwen3", "gemma3_text")


_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


# ============================================================================================== RoPE
def rope_inv_freq(config: ModelConfig, local: bool = False) -> Tensor:
    """Inverse frequencies of the rotary embedding, with linear or llama3 scaling (transformers' formulas).
    ``local``: the sliding layers' table of a model with ``rope_local_theta`` (Gemma 3: its own base, no scaling)."""
    dim = config.head_dim
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = {} if local else (config.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise NotImplementedError(
        f"RoPE scaling {kind!r} is not implemented (supported: default, linear, llama3); use backend='hf'"
    )


class RotaryEmbedding(nn.Module):
    """cos / sin tables ``[n, head_dim]``, always fp32 (``model.to(bf16)`` does not round the frequencies), built
    on the positions' device on demand and looked up by position id.

    ``rotate_half(x) * sin == roll(x, d/2) * sin_signed`` with ``sin_signed = cat(-sin, sin)`` (exactly: negation is
    exact), which saves the slices, neg and cat of transformers' ``rotate_half`` on every layer."""

    def __init__(self, config: ModelConfig, local: bool = False):
        super().__init__()
        self.config = config
        self.local = local
        self.cos_table = self.sin_table = torch.empty(0)  # plain attributes: never cast by .to(dtype)

    def ensure(self, n: int, device) -> None:
        device = torch.device(device)
        if self.cos_table.shape[0] >= n and self.cos_table.device == device:
            return
        n = max(n, 2 * self.cos_table.shape[0] if self.cos_table.device == device else 0, 256)
        inv_freq = rope_inv_freq(self.config, self.local).to(device)
        pos = torch.arange(n, device=device, dtype=torch.int64).float()
        freqs = pos[:, None] * inv_freq[None, :]  # same products as transformers
        self.cos_table = torch.cat((freqs, freqs), dim=-1).cos()
        sin = freqs.sin()
        self.sin_table = torch.cat((-sin, sin), dim=-1)

    def forward(self, position_ids: Tensor, dtype, bound: int | None = None) -> tuple[Tensor, Tensor]:
        """``[B, L]`` positions -> cos, signed sin ``[B, L, d]`` in ``dtype``.  ``bound``: a known upper bound of
        the positions (saves a device sync); None computes it."""
        if bound is None:
            bound = int(position_ids.max()) + 1 if position_ids.numel() else 1
        self.ensure(bound, position_ids.device)
        return self.cos_table[position_ids].to(dtype), self.sin_table[position_ids].to(dtype)


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin_signed: Tensor) -> tuple[Tensor, Tensor]:
    """``x * cos + rotate_half(x) * sin`` (transformers' formula) on q ``[B, L, Hq, d]`` and k ``[B, L, Hk, d]``
    with ``[B, L, d]`` tables: :func:`ops.rope` (one fused C++ pass over both on CPU: in fp32 bit-identical to the
    torch expression; bf16 q / k computed in fp32 and rounded once, where transformers rounds each product)."""
    return ops.rope(q, k, cos, sin_signed)


# ============================================================================================== layers
class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same names) whose forward is :func:`ops.linear`: oneDNN on CPU fp32,
    ``F.linear`` elsewhere."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """``x * rsqrt(mean(x^2) + eps) * weight`` (:func:`ops.rms_norm`: fused C++ forward and backward on CPU
        fp32 / bf16; other dtypes than fp32 normalise in fp32, round, then scale, as transformers does)."""
        return ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """``(s, norm(s))`` with ``s = residual + x`` (:func:`ops.add_rms_norm`: the residual add in the norm's
        pass, bit-identical to the two ops)."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + weight)``, weight initialised to 0.  fp32: the fused
    :func:`ops.rms_norm` with ``1 + weight`` (the same products as transformers'); other dtypes as transformers'
    Gemma: normalise and scale in fp32, round once (Llama's norm rounds before scaling)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__(hidden_size, eps)
        nn.init.zeros_(self.weight)

    def _fused(self, x: Tensor) -> bool:
        return x.dtype == torch.float32 and self.weight.dtype == torch.float32

    def forward(self, x: Tensor) -> Tensor:
        if self._fused(x):
            return ops.rms_norm(x, 1.0 + self.weight, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())).to(x.dtype)

    def add_forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        if self._fused(x):
            return ops.add_rms_norm(x, residual, 1.0 + self.weight, self.eps)
        s = x + residual
        return s, self(s)


@functools.lru_cache(maxsize=None)
def _rounded(value: float, dtype: torch.dtype) -> float:
    return float(torch.tensor(value, dtype=dtype))


def norm_class(config: ModelConfig) -> type[RMSNorm]:
    return GemmaRMSNorm if config.gemma else RMSNorm


def softcap(x: Tensor, cap: float) -> Tensor:
    """``cap * tanh(x / cap)`` (transformers' order of operations, so the same rounding)."""
    return torch.tanh(x / cap) * cap


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        scalar = config.query_pre_attn_scalar
        self.scale = self.head_dim ** -0.5 if scalar is None else scalar ** -0.5
        self.softcap = config.attn_logit_softcapping
        self.window = config.layer_window(layer_idx)
        self.rope_local = config.layer_rope_local(layer_idx)
        self.layer_idx = layer_idx
        h, qkv_bias = config.hidden_size, config.attention_bias or config.qkv_bias
        self.q_proj = Linear(h, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = Linear(h, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = Linear(h, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, h, bias=config.attention_bias)
        if config.qk_norm:  # per head, before RoPE
            self.q_norm = norm_class(config)(self.head_dim, config.rms_norm_eps)
            self.k_norm = norm_class(config)(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        # this layer's keys / values while the model has a cache set up (LlamaForCausalLM.setup_cache); a plain
        # attribute, not a buffer: never in the state dict, never moved or cast with the weights
        self.kv_cache: LayerKVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Mask, backend: str,
                rows: Tensor | None = None) -> Tensor:
        """``[B, n, H]`` -> ``[B, n, H]``; with ``rows`` (indices into the ``B * n`` flattened positions) only those
        rows go through ``o_proj``: ``[len(rows), H]``.  A cached forward (``mask.cache_start`` set) writes its keys
        / values into ``kv_cache`` and attends to the cache (:meth:`LayerKVCache.update`)."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, n, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, k, cos, sin)  # [B, L, H, d] -> attention takes [B, H, L, d] views
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if mask.cache_start is not None:
            k, v = self.kv_cache.update(k, v, mask.cache_start)
        if self.softcap is None:
            out = attn.attend(backend, q, k, v, mask, self.scale)
        else:  # flex soft-caps in its score_mod; the other backends leave it to the eager formula
            out = attn.attend_softcapped(backend, q, k, v, mask, self.scale, self.softcap)
        out = out.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim)
        if rows is not None:
            out = out.reshape(b * n, -1).index_select(0, rows)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(h, i, bias=bias)
        self.up_proj = Linear(h, i, bias=bias)
        self.down_proj = Linear(i, h, bias=bias)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        if self.act is F.silu:  # fused C++ SwiGLU on CPU fp32 / bf16 (ops.swiglu), else the same torch expression
            return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = norm_class(config)(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = norm_class(config)(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, residual, cos, sin, mask, backend, rows=None):
        """Pre-norm block ``h = stream + attn(norm1(stream)); stream' = h + mlp(norm2(h))`` with each residual add
        fused into the norm that follows it.  In: ``x`` the previous block's MLP output and ``residual`` the stream
        before it (None for the first block, whose ``x`` is the embedding).  Out: ``(mlp output, h)``; the stream
        after the block is their sum, formed by the next block's input norm (or the final norm).  ``rows``: keep
        only these flattened positions after attention (every position still serves as a key): ``[len(rows), H]``."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            residual, h = self.input_layernorm.add_forward(x, residual)
        a = self.self_attn(h, cos, sin, mask, backend, rows)
        if rows is not None:
            residual = residual.reshape(-1, residual.shape[-1]).index_select(0, rows)
        residual, h = self.post_attention_layernorm.add_forward(a, residual)
        return self.mlp(h), residual


class GemmaDecoderLayer(DecoderLayer):
    """Gemma's sandwich-norm block: ``h = stream + norm2(attn(norm1(stream))); stream' = h + norm4(mlp(norm3(h)))``
    (norm2 = ``post_attention_layernorm``, norm3 / norm4 = ``pre_feedforward_layernorm`` /
    ``post_feedforward_layernorm``).  Same contract as :class:`DecoderLayer`: returns ``(norm4(mlp(...)), h)`` and the
    residual adds are fused into the norms that follow them."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, residual, cos, sin, mask, backend, rows=None):
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            residual, h = self.input_layernorm.add_forward(x, residual)
        a = self.post_attention_layernorm(self.self_attn(h, cos, sin, mask, backend, rows))
        if rows is not None:
            residual = residual.reshape(-1, residual.shape[-1]).index_select(0, rows)
        residual, h = self.pre_feedforward_layernorm.add_forward(a, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class LlamaModel(nn.Module):
    """Embedding -> N decoder layers -> final RMSNorm.  Masks come prebuilt (one per window size)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # Gemma: embeddings times sqrt(H) rounded to the embedding dtype, as transformers' scaled embedding
        self.embed_scale = config.hidden_size ** 0.5 if config.gemma else None
        layer_cls = GemmaDecoderLayer if config.gemma else DecoderLayer
        self.layers = nn.ModuleList(layer_cls(config, i) for i in range(config.num_hidden_layers))
        self.norm = norm_class(config)(config.hidden_size, config.rms_norm_eps)
        self.config = config
        self.reset_rope()
        self.gradient_checkpointing = False

    def reset_rope(self) -> None:
        """Fresh (empty) RoPE tables: the global one and, for Gemma 3's sliding layers, the local one."""
        self.rotary_emb = RotaryEmbedding(self.config)
        local = any(self.config.layer_rope_local(i) for i in range(self.config.num_hidden_layers))
        self.rotary_emb_local = RotaryEmbedding(self.config, local=True) if local else None

    def ensure_rope(self, n: int, device) -> None:
        for rope in (self.rotary_emb, self.rotary_emb_local):
            if rope is not None:
                rope.ensure(n, device)

    def embed(self, input_ids: Tensor) -> Tensor:
        x = self.embed_tokens(input_ids)
        if autocast_bf16(x):  # the bf16 table's rows, in an fp32 residual stream (module docstring)
            x = x.to(torch.bfloat16).float()
        x = x.to(self.norm.weight.dtype)  # a table held in bf16 (hold_in_bf16): its rows in the norms' fp32 stream
        if self.embed_scale is not None:
            # a Python float already rounded to the dtype: x * scale in the dtype's arithmetic, as transformers'
            x = x * _rounded(self.embed_scale, x.dtype)
        return x

    def forward(self, input_ids: Tensor, position_ids: Tensor, masks: dict, backend: str,
                pos_bound: int | None = None, last_rows: Tensor | None = None) -> Tensor:
        """``[B, L]`` ids -> ``[B, L, H]``.  ``last_rows`` (indices into the ``B * L`` flattened positions): the last
        layer computes only those rows after its attention -> ``[len(last_rows), H]`` (end scores need one row per
        sequence: the last layer's o_proj and MLP shrink from B * L rows to B)."""
        x, residual = self.embed(input_ids), None
        tables = {False: self.rotary_emb(position_ids, x.dtype, pos_bound)}
        if self.rotary_emb_local is not None:
            tables[True] = self.rotary_emb_local(position_ids, x.dtype, pos_bound)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            mask = masks[layer.self_attn.window]
            cos, sin = tables[layer.self_attn.rope_local]
            rows = last_rows if i == last else None
            if ckpt:
                x, residual = checkpoint(layer, x, residual, cos, sin, mask, backend, rows, use_reentrant=False)
            else:
                x, residual = layer(x, residual, cos, sin, mask, backend, rows)
        if residual is None:  # no layers
            return self.norm(x if last_rows is None else x.reshape(-1, x.shape[-1]).index_select(0, last_rows))
        return self.norm.add_forward(x, residual)[1]


# ============================================================================================== heads
def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """transformers' left-padding positions: ``cumsum(mask) - 1``, pads get 1."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill_(attention_mask == 0, 1)


@dataclass
class CausalLMOutput:
    logits: Tensor


@dataclass
class ScoreOutput:
    scores: Tensor  # [B, L] fp32
    end_scores: Tensor  # [B] fp32
    end_index: Tensor  # [B] int64


class DecoderModel(nn.Module):
    """Backbone plumbing shared by both heads: masks, positions, packing, checkpointing, attention backend."""

    head = "none"

    def __init__(self, config: ModelConfig, attn_backend: str | None = None):
        super().__init__()
        self.config = config
        self.attn_backend = attn_backend  # None: chosen per device at call time
        self.model = LlamaModel(config)

    # -- switches
    def set_gradient_checkpointing(self, enabled: bool = True) -> "DecoderModel":
        self.model.gradient_checkpointing = enabled
        return self

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the residual stream and the KV cache: the norms' (a model held in bf16 keeps them fp32)."""
        return self.model.norm.weight.dtype

    def backend(self) -> str:
        return attn.resolve_backend(self.attn_backend, self.device)

    def _windows(self):
        return {self.config.layer_window(i) for i in range(self.config.num_hidden_layers)}

    # -- backbone
    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      position_ids: Tensor | None = None, packed: bool | None = None,
                      rows: Tensor | None = None) -> Tensor:
        """Last hidden states ``[B, L, H]`` (after the final norm).

        ``rows`` (int64 indices into the ``B * L`` flattened positions): return only those rows, ``[len(rows), H]``;
        the last layer then runs its o_proj, MLP and the final norm on them alone (every position still serves as a
        key).  Log-probs need the labelled rows, end scores one row per sequence.

        ``packed``: run the layers on the real tokens only (one packed row; flash / xformers varlen, a flex document
        block mask, SDPA per document, or a dense document mask), so padding costs nothing; pad positions of the
        result are 0.  Default (None): on with the flash, xformers and flex backends, with native when the batch has
        any padding, and with SDPA when at least ``PACK_MIN_PADDING`` of the batch is padding."""
        backend = self.backend()
        if attention_mask is not None and position_ids is None:
            if packed is None:
                packed = backend in ("flash", "xformers", "flex") or (
                    backend == "sdpa" and float(attention_mask.float().mean()) <= 1.0 - self.PACK_MIN_PADDING) or (
                    backend == "native" and not bool(attention_mask.all()))  # native takes no padded mask
            if packed:
                return self._packed_hidden_states(input_ids, attention_mask, backend, rows)
        length = input_ids.shape[1]
        bound = None
        if position_ids is None:
            bound = length  # cumsum(mask) - 1 < length
            position_ids = (positions_from_mask(attention_mask) if attention_mask is not None
                            else torch.arange(length, device=input_ids.device).expand_as(input_ids))
        masks = {w: attn.padded_mask(attention_mask, length, input_ids.device, w) for w in self._windows()}
        return self.model(input_ids, position_ids, masks, backend, pos_bound=bound, last_rows=rows)

    PACK_MIN_PADDING = 0.1

    def _packed_hidden_states(self, input_ids: Tensor, attention_mask: Tensor, backend: str,
                              rows: Tensor | None = None) -> Tensor:
        b, length = input_ids.shape
        m = attention_mask.bool()
        flat = m.reshape(-1)
        idx = flat.nonzero().squeeze(1)
        tokens = input_ids.reshape(-1).index_select(0, idx)[None]
        positions = (m.long().cumsum(-1) - 1).reshape(-1).index_select(0, idx)[None]
        lengths = m.sum(-1)
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        n = tokens.shape[1]
        masks = {}
        # native applies windows itself; it needs the dense mask only for documents too long for it (sdpa fallback)
        dense_windows = backend == "sdpa" or (backend == "native" and int(lengths.max()) > attn.NATIVE_MAX_SEQLEN)
        # softcap_attention (every soft-capped backend but flex) takes dense masks only
        eager = backend == "reference" or (self.config.attn_logit_softcapping is not None and backend != "flex")
        for w in self._windows():
            dense = eager or (dense_windows and w is not None and n > w)
            masks[w] = attn.packed_mask(cu, n, w, dense=dense)
        if rows is not None:  # flat position -> packed position; asked-for pad rows get 0, as pads do below
            real = flat.index_select(0, rows).nonzero().squeeze(1)
            packed_rows = (flat.long().cumsum(0) - 1).index_select(0, rows.index_select(0, real))
            h = self.model(tokens, positions, masks, backend, pos_bound=length, last_rows=packed_rows)
            return h.new_zeros(rows.shape[0], h.shape[-1]).index_copy(0, real, h)
        h = self.model(tokens, positions, masks, backend, pos_bound=length)[0]
        out = h.new_zeros(b * length, h.shape[-1]).index_copy(0, idx, h)
        return out.view(b, length, -1)

    def _init_weights(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, GemmaRMSNorm):  # scales by 1 + weight
                nn.init.zeros_(module.weight)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    # -- checkpoint IO (implemented in checkpoint.py)
    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        from .checkpoint import save_pretrained

        save_pretrained(self, save_directory, **kwargs)


class LlamaForCausalLM(DecoderModel):
    head = "lm"

    def __init__(self, config: ModelConfig, attn_backend: str | None = None):
        super().__init__(config, attn_backend)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.kv_cache: StaticKVCache | None = None  # set up for one generate call (setup_cache / release_cache)
        self._init_weights()
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def logits(self, h: Tensor) -> Tensor:
        """``lm_head(h)``, soft-capped when the config has ``final_logit_softcapping`` (Gemma 2)."""
        z = self.lm_head(h)
        cap = self.config.final_logit_softcapping
        return z if cap is None else softcap(z, cap)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                packed: bool | None = None) -> CausalLMOutput:
        """Full logits ``[B, L, V]`` in the model dtype (for log-probs use ``token_logprobs``)."""
        return CausalLMOutput(self.logits(self.hidden_states(input_ids, attention_mask, position_ids, packed)))

    def token_logprobs(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                       *, temperature: float = 1.0, return_entropy: bool = False, packed: bool | None = None,
                       ops_backend: str | None = None):
        """Log-probs (fp32) of the tokens under ``softmax(logits / temperature)``, never materialising all logits.

        * ``labels=None``: next-token log-probs of ``input_ids[:, 1:]`` -> ``[B, L-1]``; targets that are padding
          (``attention_mask[:, 1:] == 0``) give 0.
        * ``labels`` ``[B, L]``: the label of position t is predicted from position t (already shifted by the
          caller); ``-100`` gives 0.  Only rows with a real label reach the lm_head.

        With ``return_entropy`` also the entropy of the same distributions.  Differentiable.  A model with
        ``final_logit_softcapping`` soft-caps each chunk of logits inside ``linear_logprobs`` (its ``softcap``).
        """
        length = input_ids.shape[1]
        if labels is None:
            labels = input_ids[:, 1:]
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
        shape = labels.shape
        flat = labels.reshape(-1)
        idx = (flat != IGNORE_INDEX).nonzero().squeeze(1)
        # only the labelled rows go through the last layer's MLP, the final norm and the lm_head
        rows = idx if shape[1] == length else idx // shape[1] * length + idx % shape[1]
        hv = self.hidden_states(input_ids, attention_mask, packed=packed, rows=rows)
        res = ops.linear_logprobs(hv, self.lm_head.weight, flat.index_select(0, idx), temperature=temperature,
                                  return_entropy=return_entropy, backend=ops_backend,
                                  softcap=self.config.final_logit_softcapping)

        def scatter(x):
            return x.new_zeros(flat.shape[0]).index_copy(0, idx, x).view(shape)

        return (scatter(res[0]), scatter(res[1])) if return_entropy else scatter(res)

    # -- generation (the engine drives these)
    def allocate_cache(self, batch: int, max_len: int) -> StaticKVCache:
        """A fresh ``StaticKVCache`` for ``batch`` rows of ``max_len`` slots (and RoPE tables that long), not set up
        on the model: :meth:`setup_cache` does both."""
        c = self.config
        self.model.ensure_rope(max_len, self.device)
        return StaticKVCache(c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim, self.dtype,
                             self.device)

    def setup_cache(self, batch: int, max_len: int) -> StaticKVCache:
        """Allocate the model's KV cache (``self.kv_cache``) and give each attention module its layer's views; the
        cache lives until :meth:`release_cache` (``generate`` calls both, so no cache outlives a call)."""
        self._attach_cache(self.allocate_cache(batch, max_len))
        return self.kv_cache

    def release_cache(self) -> None:
        """Drop the model's KV cache (the attention modules' views with it), freeing its memory."""
        self._attach_cache(None)

    def _attach_cache(self, cache: StaticKVCache | None) -> None:
        self.kv_cache = cache
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.kv_cache = None if cache is None else cache.layers[i]

    @contextlib.contextmanager
    def _cache_in_use(self, cache: StaticKVCache | None):
        """The cache of one ``forward_cached`` call: the model's own (``cache`` None or it), or for the call only
        another ``StaticKVCache`` (two caches side by side, as the decode tests compare)."""
        own = self.kv_cache
        if cache is None or cache is own:
            if own is None:
                raise RuntimeError("forward_cached needs a KV cache: call setup_cache(batch, max_len) first")
            yield own
            return
        self._attach_cache(cache)
        try:
            yield cache
        finally:
            self._attach_cache(own)

    def forward_cached(self, input_ids: Tensor, position_ids: Tensor, cache: StaticKVCache | None = None,
                       start: int | Tensor = 0) -> Tensor:
        """Run ``input_ids`` ``[B, n]`` written at cache slots ``[start, start + n)`` of the model's cache
        (``cache.valid`` already marks them; positions must be < ``cache.max_len``) and return the logits of the
        last position ``[B, V]`` (model dtype).  ``start`` a tensor: the static-shape decode step for CUDA graphs
        (n = 1, attends to the whole cache under ``cache.valid``).  ``cache``: None or the model's own
        (:meth:`setup_cache`), or another cache used for this call only."""
        n = input_ids.shape[1]
        static = isinstance(start, Tensor)
        if static and (n != 1 or any(w is not None for w in self._windows())):
            raise NotImplementedError("the static-shape step decodes one token and has no sliding window")
        with self._cache_in_use(cache) as cache:
            if static:
                masks = {None: attn.static_cached_mask(cache.valid, start)}
            else:
                masks = {w: attn.cached_mask(cache.valid, start, n, w) for w in self._windows()}
            backend = self.backend()
            if backend == "flash":
                backend = "sdpa"
            h = self.model(input_ids, position_ids, masks, backend, pos_bound=cache.max_len)
        return self.logits(h[:, -1])


class ScoreHead(nn.Linear):
    """``nn.Linear(H, 1)`` computed in fp32 whatever the precision around it: scores are rewards, costs and values,
    the inputs of the advantage and loss math (a bf16 score of 2.3 would be rounded to a multiple of 1/64)."""

    def forward(self, h: Tensor) -> Tensor:
        with torch.autocast(h.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(h.float(), self.weight.float(), bias)


# Off the CPU, autocast leaves the embedding lookup and the fused log-probs (lm_head) in fp32: a bf16 copy of those
# weights would change what the model computes there, so only the projections are held in bf16.
_FP32_PRODUCTS_OFF_CPU = ("model.embed_tokens.", "lm_head.")


def held_in_bf16(model: nn.Module, device_type: str | None = None) -> list[str]:
    """The parameters :func:`hold_in_bf16` stores in bf16: frozen (``requires_grad`` False) 2-D weights but the score
    head's; on ``device_type`` other than CPU (default: the model's device) not the embedding and lm_head either."""
    device_type = device_type or next(model.parameters()).device.type
    skip = ("score_head.",) + (() if device_type == "cpu" else _FP32_PRODUCTS_OFF_CPU)
    return [name for name, p in model.named_parameters()
            if p.dim() >= 2 and not p.requires_grad and not name.startswith(skip)]


def hold_in_bf16(model: nn.Module) -> nn.Module:
    """Frozen weights under bf16 mixed precision: the frozen 2-D weights (:func:`held_in_bf16`: a frozen model's
    projections, lm_head and embedding; a LoRA model's base projections) stored in bf16, halving their memory; the
    rest (norm weights, biases, the score head, anything trained such as LoRA adapters) kept as it is.  Every product
    with such a weight is a bf16 product under autocast anyway, so the model computes what its fp32 original computes
    there (module docstring); the residual stream stays in the norms' fp32.  In place; returns ``model``."""
    names = set(held_in_bf16(model))
    for name, p in model.named_parameters():
        if name in names:
            p.data = p.data.to(torch.bfloat16)
    return model


class LlamaForScore(DecoderModel):
    """Backbone + ``score_head = Linear(H, 1, bias=score_bias)`` (the reference's ``LlamaForScore``; its released
    beaver models have no bias: ``score = w . h``)."""

    head = "score"

    def __init__(self, config: ModelConfig, attn_backend: str | None = None, score_bias: bool = True):
        super().__init__(config, attn_backend)
        self.score_head = ScoreHead(config.hidden_size, 1, bias=score_bias)
        self._init_weights()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                packed: bool | None = None) -> ScoreOutput:
        h = self.hidden_states(input_ids, attention_mask, position_ids, packed)
        scores = self.score_head(h).squeeze(-1).float()
        end = self._end_index(input_ids, attention_mask)
        return ScoreOutput(scores=scores, end_scores=scores.gather(1, end[:, None]).squeeze(1), end_index=end)

    @staticmethod
    def _end_index(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """``[B]`` int64: each row's last real token (0 for an empty row; the last position without a mask)."""
        if attention_mask is None:
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        return ops.reference.end_index(attention_mask).clamp_min(0)

    def score_columns(self, input_ids: Tensor, attention_mask: Tensor | None, start: int, length: int,
                      head: nn.Module | None = None) -> Tensor:
        """``forward(...).scores[:, start:start + length]`` ``[B, length]`` fp32, with the last layer's o_proj, MLP,
        the final norm and the head on those columns only (PPO critics: the response positions' values).  ``head``:
        another score head on this backbone (default ``score_head``)."""
        h = self.hidden_states(input_ids, attention_mask, rows=self._column_rows(input_ids, start, length))
        return (head or self.score_head)(h).squeeze(-1).float().view(input_ids.shape[0], length)

    @staticmethod
    def _column_rows(input_ids: Tensor, start: int, length: int) -> Tensor:
        b, total = input_ids.shape
        cols = torch.arange(start, start + length, device=input_ids.device)
        return (torch.arange(b, device=input_ids.device)[:, None] * total + cols).reshape(-1)

    def _end_rows(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        b, length = input_ids.shape
        end = self._end_index(input_ids, attention_mask)
        return torch.arange(b, device=end.device) * length + end

    def score_ends(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                   head: nn.Module | None = None) -> Tensor:
        """``forward(...).end_scores`` ``[B]`` fp32 without the other positions' scores: the last layer's o_proj,
        MLP, the final norm and the head run on the B end rows only (frozen reward / cost models in PPO).  ``head``:
        another score head on this backbone (default ``score_head``)."""
        h = self.hidden_states(input_ids, attention_mask, rows=self._end_rows(input_ids, attention_mask))
        return (head or self.score_head)(h).squeeze(-1).float()

    def end_scores_and_columns(self, input_ids: Tensor, attention_mask: Tensor | None, start: int, length: int,
                               head: nn.Module) -> tuple[Tensor, Tensor]:
        """One backbone pass for two heads: ``head``'s end scores ``[B]`` fp32 (as :meth:`score_ends` with
        ``head``) and the hidden states of columns ``start .. start + length - 1`` ``[B, length, H]``, on which
        ``score_head`` gives :meth:`score_columns`.  The last layer runs on the ``B`` end rows and the ``B * length``
        column rows together (a PPO scorer and the value head of a critic on the same frozen backbone)."""
        b = input_ids.shape[0]
        rows = torch.cat([self._end_rows(input_ids, attention_mask), self._column_rows(input_ids, start, length)])
        h = self.hidden_states(input_ids, attention_mask, rows=rows)
        return head(h[:b]).squeeze(-1).float(), h[b:].view(b, length, -1)


HEADS = {"lm": LlamaForCausalLM, "score": LlamaForScore}
