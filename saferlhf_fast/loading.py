"""Model folders, checked before any weights load and then loaded: shared by training and evaluation.  Every check
fails with a ``ConfigError`` naming the flag, the folder and the fix."""
from __future__ import annotations

import os

import torch

from .options import ConfigError


def tokenizer_size(tokenizer) -> int:
    """One more than the largest id the tokenizer can produce (added tokens included)."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def check_vocab(tokenizer, tokenizer_dir: str, flag: str, model_dir: str) -> None:
    """The model's embedding has a row for every id of the tokenizer (read from config.json, before any weights):
    else a ``ConfigError`` naming both sizes and both folders."""
    from .models.checkpoint import read_config
    from .models.lora import config_folder

    config_path = os.path.join(config_folder(model_dir), "config.json")
    vocab = read_config(config_path).get("vocab_size") if os.path.isfile(config_path) else None
    size = tokenizer_size(tokenizer)
    if isinstance(vocab, int) and size > vocab:
        raise ConfigError(f"--{flag} {model_dir}: the model's vocab_size {vocab} ({config_path}) is smaller than the "
                          f"tokenizer's {size} tokens ({tokenizer_dir}): ids {vocab}..{size - 1} have no embedding; "
                          "use the model's own tokenizer, or a model whose vocabulary covers it")


def require_score_head(flag: str, path: str, trained_by: str) -> None:
    """A frozen scorer (reward or cost model) carries a trained score head: else a ``ConfigError`` with the fix
    (read before the model loads)."""
    from .models.checkpoint import has_score_head
    from .models.lora import has_adapter_score_head, is_adapter_folder

    if is_adapter_folder(path) and not os.path.isfile(os.path.join(path, "config.json")):
        found = has_adapter_score_head(path)
    else:
        found = not os.path.isfile(os.path.join(path, "config.json")) or has_score_head(path)
    if not found:
        raise ConfigError(f"--{flag} {path} has no trained score head (score_head.weight missing): train one with "
                          f"`saferlhf-fast {trained_by}` first")


def is_model_folder(path: str | None) -> bool:
    """A folder with config.json, or a PEFT adapter folder (``adapter_config.json``: loaded as its base with the
    adapters merged in)."""
    return bool(path) and os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("config.json", "adapter_config.json"))


def load_model(path: str, head: str, attn_backend: str | None, device: torch.device, backend: str = "auto"):
    from .models import from_pretrained

    if not is_model_folder(path):
        raise ConfigError(f"--model_name_or_path {path}: not a model folder (no config.json)")
    model = from_pretrained(path, head=head, dtype=torch.float32, attn_backend=attn_backend, backend=backend)
    return model.to(device)
