"""Hugging Face checkpoints in and out: config.json <-> ``ModelConfig``, safetensors (sharded or not, fp32 / bf16 /
fp16), ``pytorch_model.bin`` (sharded or not), the reference's ``LlamaForScore`` layout (``score_head.weight``, and
``score_head.bias`` when the config's ``score_bias`` / ``bias`` says so: the released beaver models have none) and
GGUF files (dequantised by transformers).

Parameter names are the Hugging Face ones, so loading is: read tensors, drop the few keys that carry no weights
(the reference's ``normalizer.*`` statistics are read by ``trainers.score.load_normalizer``), check that nothing is
missing or left over, cast, copy.  A checkpoint that does not load raises ``CheckpointError``: one line naming the
file and the tensors.  What we save loads in ``transformers`` (``AutoModelForCausalLM.from_pretrained``), in the
reference's ``AutoModelForScore`` and back in here.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil

import torch
from torch import nn

from .llama import GEMMA_TYPES, HEADS, DecoderModel, ModelConfig

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
_CAUSAL_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
_SCORE_ARCH = {"llama": "LlamaForScore", "mistral": "MistralForScore", "qwen2": "Qwen2ForScore",
               "qwen3": "Qwen3ForScore", "gemma2": "Gemma2ForScore", "gemma3_text": "Gemma3ForScore"}
_DEFAULT_HEAD_DIM = {"qwen3": 128, "gemma2": 256, "gemma3_text": 256}  # transformers' config defaults
# transformers' defaults for Gemma keys a config.json may omit: (attn_logit_softcapping, final_logit_softcapping,
# RoPE base, sliding_window_pattern); query_pre_attn_scalar defaults to 256 for both
_GEMMA_DEFAULTS = {"gemma2": (50.0, 30.0, 10000.0, 2), "gemma3_text": (None, None, 1_000_000.0, 6)}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")
# Keys of a checkpoint that hold no weights of ours.
_IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"), re.compile(r"^normalizer\."))
# The reference's score-normalizer buffers (score_dim 1: shape [1]; count int64).
NORMALIZER_BUFFERS = ("normalizer.mean", "normalizer.var", "normalizer.count")


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture is not one the native decoder implements."""


class CheckpointError(ValueError):
    """A checkpoint that does not load: an unreadable, truncated or empty file, or tensors missing, unexpected or of
    the wrong shape.  ``str(err)`` is one line naming the file and the tensors; the command line prints it and exits
    with status 2."""


class MissingWeightsError(CheckpointError, FileNotFoundError):
    """A checkpoint folder without a weights file."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _names(names) -> str:
    names = sorted(names)
    return f"{names[:8]}{' ...' if len(names) > 8 else ''}"


# ============================================================================================== config
def config_from_hf(d: dict) -> ModelConfig:
    """``ModelConfig`` from a Hugging Face config.json dict (transformers 4.x and 5.x spellings)."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(d.get("architectures") or []) or "unknown"
        raise UnsupportedArchitectureError(
            f"architecture {arch!r} (model_type {model_type!r}) is not supported by the native saferlhf_fast decoder "
            f"(supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}, which covers Llama 1/2/3, Mistral, Qwen2, "
            f"Qwen3, SmolLM, Gemma 2 and Gemma 3 text); load it with backend='auto' or 'hf' (--backend auto, the "
            f"command line's default) to use transformers' own model class"
        )
    d = dict(d)
    gemma = model_type in GEMMA_TYPES
    if gemma and d.pop("use_bidirectional_attention", None):
        raise UnsupportedArchitectureError(f"{model_type} with use_bidirectional_attention is not supported (the "
                                           "native decoder is causal); use backend='hf'")
    rope_local_theta = _pop_local_rope(d) if model_type == "gemma3_text" else None
    rope = d.pop("rope_parameters", None)
    rope_theta = d.pop("rope_theta", None)
    rope_scaling = d.pop("rope_scaling", None)
    if rope is not None:
        if "rope_theta" not in rope and any(isinstance(v, dict) for v in rope.values()):
            raise UnsupportedArchitectureError("per-layer rope_parameters are not supported; use backend='hf'")
        rope = dict(rope)
        rope_theta = rope.pop("rope_theta", rope_theta)
        rope_scaling = rope if rope.get("rope_type", "default") != "default" else None
    elif rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
        rope_scaling = None
    if rope_scaling is not None:
        rope_scaling = dict(rope_scaling)
        rope_scaling.setdefault("rope_type", rope_scaling.get("type"))
        if rope_scaling.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedArchitectureError("partial rotary embeddings are not supported; use backend='hf'")

    n_layers = d.pop("num_hidden_layers")
    sliding_window = d.pop("sliding_window", 4096 if gemma else None)  # transformers' Gemma default
    layer_types = d.pop("layer_types", None)
    use_sliding = d.pop("use_sliding_window", None)
    max_window_layers = d.pop("max_window_layers", None)
    if model_type == "llama":
        sliding_window, layer_types = None, None
    elif gemma:  # explicit per-layer types, also when every layer is global
        if layer_types is None:
            pattern = d.pop("sliding_window_pattern", None) or _GEMMA_DEFAULTS[model_type][3]
            layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
        if sliding_window is None:
            layer_types = ["full_attention"] * n_layers
    elif model_type in ("qwen2", "qwen3"):
        if not use_sliding:
            sliding_window = None
        if sliding_window is None:
            layer_types = None
        elif layer_types is None:
            mwl = n_layers if max_window_layers is None else max_window_layers
            layer_types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(n_layers)]
        if max_window_layers is not None or use_sliding is not None:
            d["max_window_layers"] = max_window_layers  # kept for saving
            d["use_sliding_window"] = use_sliding
    if not gemma and layer_types is not None and all(t == "full_attention" for t in layer_types):
        layer_types = None
        if model_type in ("qwen2", "qwen3"):
            sliding_window = None
    for key in ("sliding_window_pattern", "_sliding_window_pattern"):
        d.pop(key, None)
    if gemma:
        hidden_act = d.pop("hidden_activation", None) or d.pop("hidden_act", None) or "gelu_pytorch_tanh"
        d.pop("hidden_act", None)
        attn_cap, final_cap, default_theta, _ = _GEMMA_DEFAULTS[model_type]
        gemma_keys = dict(query_pre_attn_scalar=d.pop("query_pre_attn_scalar", 256),
                          attn_logit_softcapping=d.pop("attn_logit_softcapping", attn_cap),
                          final_logit_softcapping=d.pop("final_logit_softcapping", final_cap),
                          rope_local_theta=rope_local_theta)
        rope_theta = default_theta if rope_theta is None else rope_theta
    else:
        hidden_act = d.pop("hidden_act", "silu")
        gemma_keys = {}

    hidden = d.pop("hidden_size")
    heads = d.pop("num_attention_heads")
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=d.pop("vocab_size"),
        hidden_size=hidden,
        intermediate_size=d.pop("intermediate_size"),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=d.pop("num_key_value_heads", None) or heads,
        head_dim=d.pop("head_dim", None) or _DEFAULT_HEAD_DIM.get(model_type) or hidden // heads,
        hidden_act=hidden_act,
        max_position_embeddings=d.pop("max_position_embeddings", 2048),
        rms_norm_eps=d.pop("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
        rope_scaling=rope_scaling,
        attention_bias=bool(d.pop("attention_bias", False)) if model_type not in ("mistral", "qwen2") else False,
        qkv_bias=model_type == "qwen2",
        mlp_bias=bool(d.pop("mlp_bias", False)) if model_type == "llama" else False,
        tie_word_embeddings=bool(d.pop("tie_word_embeddings", False)),
        sliding_window=sliding_window,
        layer_types=layer_types,
        initializer_range=d.pop("initializer_range", 0.02),
        bos_token_id=d.pop("bos_token_id", None),
        eos_token_id=d.pop("eos_token_id", None),
        pad_token_id=d.pop("pad_token_id", None),
        **gemma_keys,
    )
    if cfg.hidden_act not in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu"):
        raise UnsupportedArchitectureError(f"activation {cfg.hidden_act!r} is not supported; use backend='hf'")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype", "model_type", "_name_or_path",
                "quantization_config"):
        d.pop(key, None)
    cfg.extra = d
    return cfg


def _pop_local_rope(d: dict) -> float:
    """Gemma 3: pop the sliding layers' RoPE base (transformers 5: ``rope_parameters["sliding_attention"]``; 4.x:
    ``rope_local_base_freq``) and leave the global layers' parameters where ``config_from_hf`` reads them."""
    local_theta = d.pop("rope_local_base_freq", None)
    rope = d.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
        local = rope.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise UnsupportedArchitectureError(f"RoPE scaling {local['rope_type']!r} on sliding layers is not "
                                               "supported; use backend='hf'")
        local_theta = local.get("rope_theta", local_theta)
        d["rope_parameters"] = rope["full_attention"]
    return float(local_theta if local_theta is not None else 10000.0)


def config_to_hf(cfg: ModelConfig, head: str = "lm", dtype: torch.dtype | None = None, *,
                 score_bias: bool = True) -> dict:
    """config.json dict for ``cfg`` that transformers (4.45+ and 5.x) reads back to the same model (``score_bias``:
    whether a score head has a bias)."""
    d = dict(cfg.extra)
    arch = (_SCORE_ARCH if head == "score" else _CAUSAL_ARCH)[cfg.model_type]
    d.update(
        architectures=[arch],
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        rope_scaling=cfg.rope_scaling,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )
    if cfg.model_type == "llama":
        d.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    elif cfg.model_type == "mistral":
        d.update(sliding_window=cfg.sliding_window)
    elif cfg.gemma:
        d.update(hidden_activation=cfg.hidden_act, attention_bias=cfg.attention_bias,
                 query_pre_attn_scalar=cfg.query_pre_attn_scalar, attn_logit_softcapping=cfg.attn_logit_softcapping,
                 final_logit_softcapping=cfg.final_logit_softcapping, sliding_window=cfg.sliding_window,
                 layer_types=cfg.layer_types or ["full_attention"] * cfg.num_hidden_layers)
        if cfg.model_type == "gemma3_text":
            d["rope_local_base_freq"] = cfg.rope_local_theta
    elif cfg.model_type in ("qwen2", "qwen3"):
        if cfg.model_type == "qwen3":
            d["attention_bias"] = cfg.attention_bias
        d.update(sliding_window=cfg.sliding_window, use_sliding_window=cfg.sliding_window is not None)
        if cfg.layer_types is not None:
            d["layer_types"] = cfg.layer_types
            d["max_window_layers"] = next(
                (i for i, t in enumerate(cfg.layer_types) if t == "sliding_attention"), cfg.num_hidden_layers)
        elif d.get("max_window_layers") is None:
            d["max_window_layers"] = cfg.num_hidden_layers
    if head == "score":  # "bias": the reference's released models; "score_bias": its later code
        d.update(score_dim=1, bias=score_bias, score_bias=score_bias, score_type=d.get("score_type", "reward"))
    if dtype is not None:
        d["torch_dtype"] = str(dtype).replace("torch.", "")
    return d


# ============================================================================================== tensors in
def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def read_config(path: str) -> dict:
    """config.json as a dict; ``CheckpointError`` when it is not valid JSON."""
    try:
        return _read_json(path)
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({_one_line(exc)})") from exc


_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                 "pytorch_model.bin")


def weight_files(directory: str) -> tuple[str, dict | None, list[str]]:
    """(the file naming the weights: the index or the single file, the index's weight_map or None, the weight
    files), in the order transformers prefers: safetensors (sharded, single), then pytorch_model.bin."""
    label = next((os.path.join(directory, n) for n in _WEIGHT_FILES if os.path.exists(os.path.join(directory, n))),
                 None)
    if label is None:
        raise MissingWeightsError(f"no weights in {directory!r} (looked for model.safetensors[.index.json] and "
                                  "pytorch_model.bin[.index.json])")
    if not label.endswith(".index.json"):
        return label, None, [label]
    try:
        weight_map = read_config(label)["weight_map"]
        files = sorted(set(weight_map.values()))
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{label}: no weight_map of tensor name -> file ({_one_line(exc)})") from exc
    return label, weight_map, [os.path.join(directory, f) for f in files]


def load_weights_file(path: str, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file or torch pickle; ``CheckpointError`` when it is absent, unreadable
    (truncated, empty, not a checkpoint) or holds no tensors.  ``mmap``: a zip-format pickle is mapped, not read,
    so picking a few tensors out of it costs only those."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: weights file not found")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = _torch_load(path, mmap)
    except Exception as exc:  # safetensors, pickle and zip errors alike: the file is not a readable checkpoint
        raise CheckpointError(f"{path}: cannot read the tensors ({type(exc).__name__}: {_one_line(exc)})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a dict of tensor name -> tensor (got {type(state).__name__})")
    if not state:
        raise CheckpointError(f"{path}: holds no tensors")
    return state


def _torch_load(path: str, mmap: bool) -> dict:
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (non-zip) pickle cannot be mapped
            pass
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(directory: str) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(tensors, the file each tensor came from, the file naming the weights) of a checkpoint folder."""
    label, weight_map, files = weight_files(directory)
    state: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for path in files:
        tensors = load_weights_file(path)
        state.update(tensors)
        sources.update(dict.fromkeys(tensors, path))
    absent = set(weight_map or ()) - set(state)
    if absent:
        shard = os.path.join(directory, weight_map[min(absent)])
        raise CheckpointError(f"{shard}: missing {_names(absent)} (listed in {os.path.basename(label)})")
    return state, sources, label


def read_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (safetensors, sharded or not; else pytorch_model.bin, sharded or
    not)."""
    return read_checkpoint(directory)[0]


def read_tensors(directory: str, names) -> dict[str, torch.Tensor]:
    """Those of ``names`` that a checkpoint folder holds, reading only the files that hold them (safetensors: only
    those tensors)."""
    label, weight_map, files = weight_files(directory)
    if weight_map is not None:
        files = sorted({os.path.join(directory, weight_map[n]) for n in names if n in weight_map})
    out = {}
    for path in files:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(path, framework="pt") as f:
                    out.update({n: f.get_tensor(n) for n in names if n in f.keys()})
            except Exception as exc:
                raise CheckpointError(f"{path}: cannot read the tensors ({type(exc).__name__}: "
                                      f"{_one_line(exc)})") from exc
        else:
            state = load_weights_file(path, mmap=True)
            out.update({n: state[n].clone() for n in names if n in state})
    return out


def has_score_head(directory: str) -> bool:
    """Whether a model folder holds a trained score head: ``score_head.weight`` in its checkpoint, or the
    ``score_head.safetensors`` a transformers-backed score model saves (reads that one tensor only).  A folder
    without weights raises ``MissingWeightsError``."""
    if read_tensors(directory, ("score_head.weight",)):
        return True
    return os.path.isfile(os.path.join(directory, "score_head.safetensors"))


def score_bias_of(extra: dict, state: dict[str, torch.Tensor]) -> tuple[bool, str]:
    """(whether the score head has a bias, where that was read): config ``score_bias`` (the reference's later code),
    else config ``bias`` (its released models), else whether the checkpoint holds ``score_head.bias`` (a fresh head:
    with bias)."""
    for key in ("score_bias", "bias"):
        if extra.get(key) is not None:
            return bool(extra[key]), f"config.json \"{key}\": {json.dumps(bool(extra[key]))}"
    if "score_head.weight" in state:
        return "score_head.bias" in state, "the checkpoint's tensors"
    return True, "the default for a fresh head"


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept backbone-only checkpoints saved without the ``model.`` prefix."""
    if not any(k.startswith("model.") for k in state) and "embed_tokens.weight" in state:
        state = {(k if k.startswith(("lm_head.", "score_head.")) else "model." + k): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not any(p.match(k) for p in _IGNORED)}


def _materialise(model: DecoderModel, device) -> None:
    """Give a model built on the meta device real (uninitialised) storage and fresh RoPE tables."""
    model.to_empty(device=device)
    model.model.reset_rope()


def build_model(config: ModelConfig, head: str, state: dict[str, torch.Tensor], *, dtype=torch.float32,
                device="cpu", attn_backend: str | None = None, strict: bool = True, source: str | None = None,
                sources: dict[str, str] | None = None, config_source: str | None = None) -> DecoderModel:
    """A model of ``head`` with the weights of ``state`` (HF names).  ``source`` / ``sources``: the file naming the
    weights and the file of each tensor; ``config_source``: the config.json ``config`` was read from (for the
    errors)."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose 'lm' or 'score'")
    normalizer_state = {k: state[k] for k in NORMALIZER_BUFFERS if k in state}
    state = _normalise_keys(state)
    kwargs, bias_from = {}, ""
    if head == "score":
        kwargs["score_bias"], bias_from = score_bias_of(config.extra, state)
    with torch.device("meta"):
        model = HEADS[head](config, attn_backend=attn_backend, **kwargs)
    _materialise(model, device)
    model.to(dtype)
    expected = set(model.state_dict().keys())
    dropped = []
    if head == "lm" and config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        state.pop("lm_head.weight", None)
    if head == "score":
        dropped = [k for k in state if k.startswith("lm_head.")]
    else:
        dropped = [k for k in state if k.startswith("score_head.")]
    for k in dropped:
        state.pop(k)
    missing = expected - set(state)
    init_score_head = head == "score" and missing == {k for k in expected if k.startswith("score_head.")}
    if init_score_head:
        missing = set()
    unexpected = set(state) - expected
    if missing or (unexpected and strict):
        _raise_mismatch(config, head, missing, unexpected, source, sources or {}, bias_from, config_source)
    _check_shapes(model, state, source, sources or {}, config_source)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, tensor in state.items():
            if name in params:
                params[name].copy_(tensor)
        if head == "lm":
            model.tie_weights()
        if init_score_head:
            logger.info("score_head not in the checkpoint: initialised (normal(0, %g) weight, zero bias)",
                        config.initializer_range)
            nn.init.normal_(model.score_head.weight, std=config.initializer_range)
            if model.score_head.bias is not None:
                nn.init.zeros_(model.score_head.bias)
    if head == "score":
        model.normalizer_state = normalizer_state  # written back on save (not a buffer of ours: not trained)
    return model


def _check_shapes(model: DecoderModel, state: dict[str, torch.Tensor], source: str | None, sources: dict[str, str],
                  config_source: str | None) -> None:
    """``CheckpointError`` naming the file and the first tensor whose shape differs from the one the config gives."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in state.items():
        target = params.get(name)
        if target is None or target.shape == tensor.shape:
            continue
        where = sources.get(name, source)
        built = (f"the shape {tuple(target.shape)} that {config_source} gives (the config does not match the "
                 "weights: was hidden_size, intermediate_size, a head count or vocab_size edited?)"
                 if config_source else f"model shape {tuple(target.shape)}")
        raise CheckpointError(f"{where + ': ' if where else ''}{name}: checkpoint shape {tuple(tensor.shape)} != "
                              f"{built}")


def _raise_mismatch(config: ModelConfig, head: str, missing: set, unexpected: set, source: str | None,
                    sources: dict[str, str], bias_from: str, config_source: str | None = None) -> None:
    """``CheckpointError``: one line naming the file(s) and the missing / unexpected tensors."""
    parts = []
    if missing:
        parts.append(f"missing {_names(missing)}")
    if unexpected:
        files = sorted({sources[k] for k in unexpected if k in sources} - {source})
        parts.append(f"unexpected {_names(unexpected)}" + (f" (in {', '.join(files)})" if files else ""))
    hint = ""
    if "lm_head.weight" in missing:
        hint = " (a score checkpoint has no lm_head: load it with head='score')"
    elif "score_head.bias" in missing | unexpected:
        hint = f" (score head {'with' if 'score_head.bias' in missing else 'without'} bias per {bias_from})"
    prefix = f"{source}: " if source else ""
    built = f" of {config_source}" if config_source else ""
    raise CheckpointError(f"{prefix}checkpoint does not match the {config.model_type} {head} model{built}: "
                          f"{'; '.join(parts)}{hint}")


# ============================================================================================== public
def _check_score_config(d: dict, config_path: str) -> None:
    """The reference's score-model fields our score head covers: ``score_dim`` 1."""
    if d.get("score_dim", 1) != 1:
        raise CheckpointError(f"{config_path}: score_dim {d['score_dim']!r} is not supported (the score head has one "
                              "output)")


def _resolve_gguf(path: str, gguf_file: str | None) -> tuple[str, str] | None:
    if gguf_file is not None:
        return path, gguf_file
    if os.path.isfile(path) and path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    return None


MODEL_BACKENDS = ("auto", "native", "hf")


def resolve_backend(path: str, gguf_file: str | None = None) -> str:
    """``"native"`` when the checkpoint's config is one the native decoder implements (:func:`config_from_hf`
    accepts it), else ``"hf"``.  A folder without config.json (or a GGUF file) is left to the native loader, which
    names what is missing."""
    config_path = os.path.join(path, "config.json")
    if _resolve_gguf(path, gguf_file) is not None or not os.path.isfile(config_path):
        return "native"
    try:
        config_from_hf(read_config(config_path))
    except UnsupportedArchitectureError:
        return "hf"
    return "native"


def load_gguf_hf(directory: str, gguf_file: str):
    """(config dict, state dict) of a GGUF file, dequantised to fp32 by transformers (needs the gguf package)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:  # pragma: no cover
        raise ImportError("loading GGUF needs transformers and gguf: pip install 'saferlhf-fast[hf]'") from exc
    hf_config = AutoConfig.from_pretrained(directory, gguf_file=gguf_file)
    config_dict = hf_config.to_dict()
    if config_dict.get("model_type") not in SUPPORTED_MODEL_TYPES:
        config_from_hf(config_dict)  # raises the clear error
    hf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    del hf_model
    return config_dict, state


def from_pretrained(path: str, head: str = "lm", dtype: torch.dtype = torch.float32, attn_backend: str | None = None,
                    *, device="cpu", backend: str = "native", gguf_file: str | None = None):
    """Load a Hugging Face checkpoint (directory with config.json + weights, or a ``.gguf`` file).

    head: ``"lm"`` (``LlamaForCausalLM``) or ``"score"`` (``LlamaForScore``: loads the reference's score
    checkpoints; from a plain LM checkpoint the score head is freshly initialised).  backend: ``"native"`` (our
    decoder), ``"hf"`` (transformers' own model class, any architecture, slower) or ``"auto"`` (native when the
    architecture is one the native decoder implements, else transformers; :func:`resolve_backend`).  A PEFT adapter
    folder (``adapter_config.json``, no config.json) loads as its base with the adapters merged in
    (:func:`.lora.load_merged`).
    """
    from . import lora

    if gguf_file is None and lora.is_adapter_folder(path) and not os.path.isfile(os.path.join(path, "config.json")):
        return lora.load_merged(path, head, dtype=dtype, attn_backend=attn_backend, device=device, backend=backend)
    if backend == "auto":
        backend = resolve_backend(path, gguf_file)
    if backend == "hf":
        from .hf import HFModel

        return HFModel.from_pretrained(path, head=head, dtype=dtype, device=device, gguf_file=gguf_file).eval()
    if backend != "native":
        raise ValueError(f"unknown model backend {backend!r}; choose one of {', '.join(MODEL_BACKENDS)}")
    gguf = _resolve_gguf(path, gguf_file)
    if gguf is not None:
        config_dict, state = load_gguf_hf(*gguf)
        source, sources, label = None, None, None
    else:
        config_path = os.path.join(path, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{config_path} not found (pass a checkpoint directory or a .gguf file)")
        config_dict = read_config(config_path)
        config_from_hf(config_dict)  # architecture check before reading gigabytes
        if head == "score":
            _check_score_config(config_dict, config_path)
        state, sources, label = read_checkpoint(path)
        source = path
    config = config_from_hf(config_dict)
    model = build_model(config, head, state, dtype=dtype, device=device, attn_backend=attn_backend, source=label,
                        sources=sources, config_source=None if gguf is not None else config_path)
    model.source_dir = source
    return model.eval()  # as transformers: call .train() to train


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)\s*", str(size), flags=re.I)
    if not m:
        raise ValueError(f"cannot parse shard size {size!r} (e.g. '5GB', '500MB', or bytes)")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base ** power)


def save_pretrained(model: DecoderModel, save_directory: str, *, max_shard_size="5GB", dtype: torch.dtype | None = None,
                    copy_tokenizer: bool = True) -> None:
    """Write config.json + safetensors (sharded above ``max_shard_size``, with model.safetensors.index.json).

    A model sharded with FSDP2 (``saferlhf_fast.distributed``) is consolidated first: every rank must call this,
    rank 0 writes."""
    from safetensors.torch import save_file

    from ..distributed import full_state_dict, is_sharded

    full = full_state_dict(model) if is_sharded(model) else model.state_dict()
    if full is None:  # not rank 0 of a sharded model: rank 0 writes
        return
    if dtype is None:  # one dtype on disk, the widest held (frozen weights held in bf16 save as their fp32 model)
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in full.values() if t.is_floating_point()),
                                 model.dtype)
    if getattr(model, "lora_spec", None) is not None:  # LoRA: the adapters merged into the weights they adapt
        from .lora import merged_state_dict

        full = merged_state_dict(model, full)
    os.makedirs(save_directory, exist_ok=True)
    state = {}
    for name, tensor in full.items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # tied: transformers re-ties it from model.embed_tokens.weight
        t = tensor.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[name] = t.to("cpu").contiguous()
    if model.head == "score":
        state.update(normalizer_tensors(model))
    limit = _parse_size(max_shard_size)
    shards: list[dict] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for stale in os.listdir(save_directory):  # old shards would confuse a reader of the index
        if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", stale):
            os.remove(os.path.join(save_directory, stale))
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(save_directory, "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(save_directory, fname), metadata=meta)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(os.path.join(save_directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    saved_dtype = dtype or model.dtype
    with open(os.path.join(save_directory, "config.json"), "w") as f:
        score_head = getattr(model, "score_head", None)
        score_bias = score_head is not None and score_head.bias is not None
        json.dump(config_to_hf(model.config, model.head, saved_dtype, score_bias=score_bias), f, indent=2,
                  sort_keys=True)
    source = getattr(model, "source_dir", None)
    if copy_tokenizer and source and os.path.abspath(source) != os.path.abspath(save_directory):
        for name in _TOKENIZER_FILES:
            if os.path.exists(os.path.join(source, name)):
                shutil.copy2(os.path.join(source, name), os.path.join(save_directory, name))


def normalizer_tensors(model) -> dict[str, torch.Tensor]:
    """The reference's ``normalizer.*`` buffers for a saved score model, so that its ``from_pretrained`` finds every
    tensor: the statistics the model carries (``model.normalizer_state``: loaded with it, or set by the score
    trainer), else config.json's ``mean`` / ``var``, else mean 0, var 1; count 0 when unknown."""
    carried = getattr(model, "normalizer_state", None) or {}
    extra = model.config.extra
    defaults = {"normalizer.mean": (extra.get("mean") or [0.0], torch.float32),
                "normalizer.var": (extra.get("var") or [1.0], torch.float32),
                "normalizer.count": ([0], torch.int64)}
    out = {}
    for name, (value, dtype) in defaults.items():
        t = carried.get(name)
        out[name] = (t if t is not None else torch.tensor(value)).detach().to("cpu", dtype).reshape(1).contiguous()
    return out


def convert_gguf(gguf_path: str, save_directory: str, *, dtype: torch.dtype = torch.float32,
                 with_tokenizer: bool = True) -> DecoderModel:
    """GGUF file -> a normal safetensors checkpoint (+ the tokenizer transformers extracts from the GGUF)."""
    model = from_pretrained(gguf_path, head="lm", dtype=dtype)
    model.save_pretrained(save_directory)
    if with_tokenizer:
        try:
            from transformers import AutoTokenizer

            directory, name = _resolve_gguf(gguf_path, None)
            AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(save_directory)
        except Exception as exc:  # noqa: BLE001 - tokenizer extraction is a convenience, the weights are what matter
            logger.warning("could not extract the tokenizer from %s: %s", gguf_path, exc)
    return model
