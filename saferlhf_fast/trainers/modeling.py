"""The two calls the trainers make on a model (``saferlhf_fast.models``): response-token log-probs through the fused
path, and per-position / end scores."""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops import IGNORE_INDEX
from ..scores import score_forward  # noqa: F401 - re-exported


def token_logprobs(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
    """``logp[:, t] = log p(labels[:, t + 1] | tokens <= t)`` -> [B, L-1] fp32, 0 where the label is ignored.

    Goes through ``model.token_logprobs`` (hidden states + lm_head weight into ``ops.linear_logprobs``), so the
    [tokens, vocab] logits are never materialised; only positions with a real label reach the lm_head."""
    shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    return model.token_logprobs(input_ids, attention_mask, labels=shifted)[:, :-1]


def attach_lora(model, spec, flag: str, path: str, adapter_dir: str | None = None):
    """``model`` (the native decoder or a transformers model) with LoRA adapters of ``spec`` (None: unchanged), base
    frozen; with ``adapter_dir`` (a checkpoint's PEFT folder, on resume) their trained values.  A target that names
    no layer of the model is a ``ConfigError`` naming ``--lora_target_modules`` and ``--flag``."""
    from ..models.lora import apply_lora, load_adapter
    from .config import ConfigError

    if spec is None:
        return model
    try:
        apply_lora(model, spec)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--lora_target_modules (--{flag} {path}): {err}") from None
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    return model


def hold_frozen_in_bf16(model, config):
    """Under ``--bf16``: ``model``'s frozen weights (a frozen model's, a LoRA model's base) held in bf16
    (``models.llama.hold_in_bf16``: half their memory, the same numbers under autocast).  The native decoder only:
    a transformers model's own modules keep what they load (docs/precision.md).  Returns ``model``."""
    from ..models import hold_in_bf16

    if config.bf16 and not getattr(model, "is_hf", False):
        hold_in_bf16(model)
    return model


def save_trained(model, folder: str, dtype=None, merge: bool = False) -> None:
    """A trained model's folder: with LoRA adapters a PEFT adapter folder (``merge``: the merged plain checkpoint),
    else the plain checkpoint."""
    from ..models.lora import lora_spec_of, save_adapter

    if lora_spec_of(model) is not None and not merge:
        save_adapter(model, folder, dtype=dtype)
    else:
        model.save_pretrained(folder, dtype=dtype)


def make_tiny_model(output_dir: str, tokenizer_path: str | None = None, *, hidden_size: int = 128,
                    num_layers: int = 2, num_heads: int = 4, intermediate_size: int | None = None,
                    max_position_embeddings: int = 512, seed: int = 0) -> str:
    """A randomly initialised Llama-architecture model sized for the tokenizer (default: the bundled one), saved
    as a Hugging Face folder with the tokenizer files: the starting point of the CPU demo and the tests."""
    from ..data import load_tokenizer
    from ..data.tokenizer import save_tokenizer
    from ..models import LlamaForCausalLM, ModelConfig

    tokenizer = load_tokenizer(tokenizer_path)
    vocab = (len(tokenizer) + 63) // 64 * 64
    config = ModelConfig(
        model_type="llama", vocab_size=vocab, hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads, max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(output_dir)
    save_tokenizer(tokenizer, output_dir)
    return output_dir


# ============================================================================ --critic_backbone shared
VALUE_HEAD_WEIGHTS, VALUE_HEAD_CONFIG = "value_head.safetensors", "value_head.json"


class SharedScorer(torch.nn.Module):
    """A frozen reward / cost model that is also a critic's backbone (``--critic_backbone shared``)::

        score(x) = w_s . h_base(x)[end]          value_t(x) = w_v . h_critic(x)[t]

    ``h_base`` is the critic's backbone with its LoRA adapters disabled (with no adapters, the critic's backbone
    itself), ``w_s`` the scorer's own score head (frozen, the only tensor this module owns) and ``w_v`` the critic's
    ``score_head`` (its value head, initialised from ``w_s``).  The critic is referenced, not a submodule, so its
    weights count once."""

    def __init__(self, critic, head: torch.nn.Module):
        super().__init__()
        self.head = head.requires_grad_(False)
        object.__setattr__(self, "critic", critic)

    @property
    def fuses(self) -> bool:
        """Whether the score and the values come from one backbone pass: the critic has no adapters (its backbone
        is the scorer's, frozen) and is not sharded (its value head is then applied outside its forward)."""
        from ..distributed import is_sharded
        from ..models.lora import lora_spec_of

        return lora_spec_of(self.critic) is None and not is_sharded(self.critic)

    def score_ends(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        from ..models.lora import adapters_disabled

        with adapters_disabled(self.critic):
            return self.critic.score_ends(input_ids, attention_mask, head=self.head)

    def end_scores_and_columns(self, input_ids: Tensor, attention_mask: Tensor, start: int, length: int):
        """The end scores ``[B]`` and the critic's hidden states of the columns ``[B, length, H]`` (one pass;
        only when :attr:`fuses`)."""
        return self.critic.end_scores_and_columns(input_ids, attention_mask, start, length, head=self.head)


def save_value_head(model, folder: str, base: str, dtype=None) -> None:
    """A critic trained as a value head on a frozen backbone: ``value_head.safetensors`` (``score_head.*``) and
    ``value_head.json`` naming the backbone's folder.  Sharded: every rank calls it, rank 0 writes."""
    import json
    import os

    from safetensors.torch import save_file

    from ..distributed import full_state_dict

    full = full_state_dict(model)
    if full is None:
        return
    os.makedirs(folder, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None else v).detach().to("cpu").contiguous()
               for k, v in full.items() if k.startswith("score_head.")}
    save_file(tensors, os.path.join(folder, VALUE_HEAD_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(folder, VALUE_HEAD_CONFIG), "w", encoding="utf-8") as f:
        json.dump({"base_model_name_or_path": os.path.abspath(base), "head": "score_head",
                   "score_type": "critic"}, f, indent=2)


def load_value_head(model, folder: str):
    """Copy ``value_head.safetensors`` into ``model.score_head`` (``CheckpointError`` when it does not match)."""
    import os

    from ..models.checkpoint import CheckpointError, load_weights_file

    path = os.path.join(folder, VALUE_HEAD_WEIGHTS)
    state = load_weights_file(path)
    params = {f"score_head.{n}": p for n, p in model.score_head.named_parameters()}
    if set(state) != set(params) or any(state[k].shape != p.shape for k, p in params.items()):
        raise CheckpointError(f"{path}: tensors {sorted(state)} do not match the critic's value head "
                              f"{sorted(params)}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])
    return model
