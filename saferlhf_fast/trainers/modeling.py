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
