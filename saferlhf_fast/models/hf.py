"""The ``backend='hf'`` path: transformers' own model classes behind our model interface, for architectures the
native decoder does not implement (``backend='auto'`` picks it for them).  Any causal LM transformers loads works
with the trainers and the engine; our fused ops still do the heavy lifting: log-probs through ``linear_logprobs`` on
the last hidden states and the lm_head weight (never ``[B, L, V]`` logits), GAE and the losses fused.

Score models (``head='score'``) are the backbone (``AutoModel``) plus ``score_head = Linear(width, 1)``, saved in
the reference implementation's ``<Arch>ForScore`` layout: one state dict with the backbone under its
``base_model_prefix`` (``transformer.`` for GPT-2, ``gpt_neox.`` for GPT-NeoX, ``model.`` for OPT, Phi, Gemma),
``score_head.*`` and the ``normalizer.*`` buffers, and config.json with ``architectures: ["<Arch>ForScore"]``,
``score_dim``, ``bias`` / ``score_bias`` and ``score_type``, so the reference's ``AutoModelForScore`` loads it.

LoRA (:func:`.lora.apply_lora`) wraps the model's ``nn.Linear`` / ``Conv1D`` layers in place
(:class:`.lora.HFLoraLinear`); ``save_pretrained`` of an adapted model writes the merged weights."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.reference import IGNORE_INDEX
from .checkpoint import NORMALIZER_BUFFERS, score_bias_of
from .llama import CausalLMOutput, ScoreOutput, positions_from_mask


class HFModel(nn.Module):
    """Wraps a transformers model: ``forward`` / ``hidden_states`` / ``token_logprobs`` / ``save_pretrained`` as
    the native models (``head='lm'`` or ``'score'``)."""

    is_hf = True

    def __init__(self, hf_model: nn.Module, head: str = "lm", score_bias: bool = True):
        super().__init__()
        self.hf = hf_model
        self.head = head
        self.train(hf_model.training)
        c = hf_model.config
        extra = {k: v for k, v in c.to_dict().items() if k in SCORE_CONFIG_KEYS}
        self.config = SimpleNamespace(eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                                      vocab_size=c.vocab_size, hidden_size=c.hidden_size, hf=c, extra=extra,
                                      tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)))
        self.normalizer_state: dict[str, Tensor] = {}
        if head == "score":
            self.score_head = nn.Linear(backbone_width(c), 1, bias=score_bias, dtype=hf_model.dtype,
                                        device=hf_model.device)
            nn.init.normal_(self.score_head.weight, std=getattr(c, "initializer_range", 0.02))
            if score_bias:
                nn.init.zeros_(self.score_head.bias)

    @classmethod
    def from_pretrained(cls, path: str, head: str = "lm", dtype=torch.float32, device="cpu", gguf_file=None):
        from transformers import AutoModel, AutoModelForCausalLM

        kwargs = {"dtype": dtype}
        directory = path
        if gguf_file is None and os.path.isfile(path) and path.endswith(".gguf"):
            directory, gguf_file = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        if head == "lm":
            model = cls(AutoModelForCausalLM.from_pretrained(directory, **kwargs).to(device), head)
        elif head == "score":
            saved = {} if gguf_file is not None else _saved_score_head(directory)
            hf_model = AutoModel.from_pretrained(directory, **kwargs).to(device)
            score_bias, _ = score_bias_of(hf_model.config.to_dict(), saved)
            model = cls(hf_model, head, score_bias)
            _load_score_head(model.score_head, saved, directory)
            model.normalizer_state = {k: v for k, v in saved.items() if k in NORMALIZER_BUFFERS}
        else:
            raise ValueError(f"unknown head {head!r}; choose 'lm' or 'score'")
        model.source_dir = directory  # a LoRA adapter folder's base_model_name_or_path
        return model

    @property
    def device(self):
        return self.hf.device

    @property
    def dtype(self):
        return self.hf.dtype

    def set_gradient_checkpointing(self, enabled: bool = True):
        if enabled:
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.hf.gradient_checkpointing_disable()
        return self

    def _backbone(self):
        return self.hf.get_decoder() if self.head == "lm" else self.hf

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, packed=None) -> Tensor:
        if position_ids is None and attention_mask is not None:
            position_ids = positions_from_mask(attention_mask)
        out = self._backbone()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False)
        return out.last_hidden_state

    def forward(self, input_ids, attention_mask=None, position_ids=None, packed=None):
        h = self.hidden_states(input_ids, attention_mask, position_ids)
        if self.head == "lm":
            return CausalLMOutput(self.hf.get_output_embeddings()(h))
        scores = self.score_head(h).squeeze(-1).float()
        if attention_mask is None:
            end = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        else:
            end = ops.reference.end_index(attention_mask).clamp_min(0)
        return ScoreOutput(scores, scores.gather(1, end[:, None]).squeeze(1), end)

    def token_logprobs(self, input_ids, attention_mask=None, labels=None, *, temperature=1.0, return_entropy=False,
                       packed=None, ops_backend=None):
        h = self.hidden_states(input_ids, attention_mask)
        if labels is None:
            labels = input_ids[:, 1:]
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
            h = h[:, :-1]
        weight = self.hf.get_output_embeddings().weight
        # Gemma 2's final soft-capping (logits -> cap * tanh(logits / cap)) is applied inside the fused op
        softcap = getattr(self.hf.config, "final_logit_softcapping", None)
        return ops.linear_logprobs(h, weight, labels, temperature=temperature, return_entropy=return_entropy,
                                   softcap=softcap, backend=ops_backend)

    def save_pretrained(self, save_directory: str, dtype: torch.dtype | None = None, **kwargs):
        """A causal LM: transformers' own ``save_pretrained`` (weights cast to ``dtype`` when given).  A score model:
        the reference's ``<Arch>ForScore`` layout (module docstring).  With LoRA adapters: the merged weights
        ``W + scaling * B A`` (a plain checkpoint)."""
        from ..distributed import full_state_dict, is_sharded
        from .lora import lora_spec_of, merged_state_dict

        full = full_state_dict(self) if is_sharded(self) else self.state_dict()
        if full is None:  # not rank 0 of a sharded model: rank 0 writes
            return
        if lora_spec_of(self) is not None:
            full = merged_state_dict(self, full)
        tied = _tied_names(self.hf)  # consolidated shards are separate tensors: drop the tied copies by name
        state = {k.removeprefix("hf."): _cast(v, dtype) for k, v in full.items()
                 if k.startswith("hf.") and k.removeprefix("hf.") not in tied}
        if self.head == "lm":
            self.hf.save_pretrained(save_directory, state_dict=state)
            return
        from safetensors.torch import save_file

        from .checkpoint import normalizer_tensors

        os.makedirs(save_directory, exist_ok=True)
        prefix = self.hf.base_model_prefix
        tensors = {f"{prefix}.{k}": v for k, v in state.items()}
        tensors.update({k: _cast(v, dtype) for k, v in full.items() if k.startswith("score_head.")})
        tensors.update(normalizer_tensors(self))
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, os.path.join(save_directory, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(save_directory, "config.json"), "w") as f:
            json.dump(self.score_config(dtype), f, indent=2, sort_keys=True)

    def score_config(self, dtype: torch.dtype | None = None) -> dict:
        """config.json of the score model, as the reference writes it (its ``ScoreModelMixin.init_score_head``)."""
        d = self.hf.config.to_dict()
        d.update(self.config.extra)
        bias = self.score_head.bias is not None
        d.update(architectures=[type(self.hf).__name__.removesuffix("Model") + "ForScore"], score_dim=1, bias=bias,
                 score_bias=bias, score_type=d.get("score_type", "reward"))
        d["torch_dtype"] = str(dtype or self.dtype).replace("torch.", "")
        d.pop("dtype", None)
        return d


# config.json keys of the reference's score models (kept from a loaded model, written back on save).
SCORE_CONFIG_KEYS = ("score_dim", "bias", "score_bias", "score_type", "do_normalize", "normalizer_type", "momentum",
                     "mean", "var")


def backbone_width(config) -> int:
    """Width of the backbone's last hidden state: OPT projects it to ``word_embed_proj_dim``."""
    return getattr(config, "word_embed_proj_dim", None) or config.hidden_size


def _tied_names(module: nn.Module) -> set[str]:
    """Names of parameters that are another, earlier-named parameter (tied embeddings): transformers re-ties them."""
    first: dict[int, str] = {}
    tied = set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied.add(name)
        else:
            first[id(p)] = name
    return tied


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


_SCORE_HEAD = ("score_head.weight", "score_head.bias", *NORMALIZER_BUFFERS)


def _saved_score_head(directory: str) -> dict[str, Tensor]:
    """The score head tensors of a folder: from its checkpoint (any layout), else from the
    ``score_head.safetensors`` that ``HFModel.save_pretrained`` writes; {} when it has none."""
    from .checkpoint import MissingWeightsError, load_weights_file, read_tensors

    try:
        saved = read_tensors(directory, _SCORE_HEAD)
    except MissingWeightsError:
        saved = {}
    extra = os.path.join(directory, "score_head.safetensors")
    if "score_head.weight" not in saved and os.path.isfile(extra):
        saved = {k: v for k, v in load_weights_file(extra).items() if k in _SCORE_HEAD}
    return saved


def _load_score_head(head: nn.Linear, saved: dict[str, Tensor], directory: str) -> None:
    """Copy the saved head in (a fresh head stays as initialised); a bias the head lacks, or lacks in the
    checkpoint, is a ``CheckpointError``."""
    from .checkpoint import CheckpointError

    if "score_head.weight" not in saved:
        return
    if ("score_head.bias" in saved) != (head.bias is not None):
        state = "unexpected" if "score_head.bias" in saved else "missing"
        raise CheckpointError(f"{directory}: {state} ['score_head.bias'] (the config's score_bias / bias says "
                              f"{head.bias is not None})")
    with torch.no_grad():
        head.weight.copy_(saved["score_head.weight"])
        if head.bias is not None:
            head.bias.copy_(saved["score_head.bias"])
