"""LoRA adapters on the native decoder's projections (Hu et al., 2021, in PEFT's formulation), and their checkpoints
in PEFT's format.

A targeted projection ``y = W x + b`` becomes::

    y = W x + b + (alpha / r) * B (A dropout(x))        A: [r, in] kaiming-uniform(a=sqrt(5)), B: [out, r] zeros

so a fresh adapter leaves the model's outputs unchanged.  ``W`` and ``b`` (and every other base weight) are frozen;
``A`` and ``B`` train, and so does a score model's ``score_head`` (PEFT's ``modules_to_save``).  The adapter path is
one autograd node with the base projection (:func:`ops.lora_linear`: the up-projection accumulates into the base
output inside its GEMM, the adapter's input gradient into the base's).

Parameter names: the base weight keeps its name (``model.layers.0.self_attn.q_proj.weight``) and the adapter adds
``...q_proj.lora_A.weight`` / ``...q_proj.lora_B.weight``; PEFT's file names them
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (its prefix in front, no adapter name), so
``peft.PeftModel.from_pretrained(transformers_model, folder)`` loads what :func:`save_adapter` writes.

* :func:`apply_lora` adds the adapters and freezes the base; :func:`adapters_disabled` runs the base model alone
  (the PPO / DPO reference: no second copy of the weights).
* :func:`save_adapter` / :func:`load_adapter`: ``adapter_config.json`` + ``adapter_model.safetensors``.
* :func:`merged_state_dict`: ``W + (alpha / r) B A`` in place of each adapted weight (a plain checkpoint;
  ``save_pretrained`` of a model with adapters writes that).
* :func:`load_merged`: an adapter folder as an input model (``checkpoint.from_pretrained`` calls it): its base
  with the adapters merged in.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from .llama import DecoderModel, Linear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MODULES_TO_SAVE = ("score_head",)  # trained in full next to the adapters


@dataclass(frozen=True)
class LoraSpec:
    """Rank ``rank`` adapters scaled by ``alpha / rank`` with input dropout ``dropout`` on the projections named in
    ``targets``."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def resolve_targets(names) -> tuple[str, ...]:
    """Projection names from ``["all-linear"]`` or names (each may be comma-separated); ``ValueError`` names an
    unknown one."""
    out: list[str] = []
    for item in names:
        for name in filter(None, (s.strip() for s in str(item).split(","))):
            chosen = TARGETS if name == ALL_LINEAR else (name,)
            for n in chosen:
                if n not in TARGETS:
                    raise ValueError(f"unknown LoRA target {name!r}: choose {ALL_LINEAR} or among {', '.join(TARGETS)}")
                if n not in out:
                    out.append(n)
    if not out:
        raise ValueError(f"no LoRA target given: choose {ALL_LINEAR} or among {', '.join(TARGETS)}")
    return tuple(out)


class LoraLinear(Linear):
    """A :class:`~.llama.Linear` (the same ``weight`` / ``bias`` parameters, the same names) plus ``lora_A``,
    ``lora_B``: ``ops.linear(x, W, b) + scaling * B(A(dropout(x)))`` in one autograd node (:func:`ops.lora_linear`);
    with ``disabled`` the base projection alone."""

    def __init__(self, base: Linear, spec: LoraSpec):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, spec.rank, bias=False, **factory)
        self.lora_B = nn.Linear(spec.rank, self.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.dropout_p = spec.dropout
        self.scaling = spec.scaling
        self.disabled = False
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """PEFT's initialisation: A kaiming-uniform (as ``nn.Linear``), B zeros (the update starts at 0)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.disabled:
            return ops.linear(x, self.weight, self.bias)
        return ops.lora_linear(x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scaling,
                               self.lora_dropout, self.dropout_p)

    def delta_weight(self) -> Tensor:
        """``scaling * B A`` ``[out, in]`` (PEFT's ``get_delta_weight``: the product, then the scale)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged_weight(self) -> Tensor:
        """``W + scaling * B A`` (detached; the generation engine packs this once per ``generate`` call)."""
        with torch.no_grad():
            return self.weight.detach() + self.delta_weight().to(self.weight.dtype)


# ============================================================================================== the model
def lora_spec_of(model) -> LoraSpec | None:
    return getattr(model, "lora_spec", None)


def lora_layers(model: nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def apply_lora(model: DecoderModel, spec: LoraSpec) -> DecoderModel:
    """Add adapters to ``model``'s targeted projections (A drawn from the global RNG), freeze every base weight and
    leave the adapters and a score head trainable.  ``TypeError`` for a model that is not the native decoder."""
    if not isinstance(model, DecoderModel):
        raise TypeError(f"LoRA adapts the native decoder's projections; {type(model).__name__} is not one")
    if spec.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {spec.rank}")
    model.requires_grad_(False)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in spec.targets:
                base = getattr(parent, name, None)
                if isinstance(base, Linear) and not isinstance(base, LoraLinear):
                    setattr(parent, name, LoraLinear(base, spec))
    for name in MODULES_TO_SAVE:
        head = getattr(model, name, None)
        if head is not None:
            head.requires_grad_(True)
    model.lora_spec = spec
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block the model computes with its base weights alone (the frozen reference of PPO / DPO)."""
    layers = lora_layers(model)
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, flag in zip(layers, before):
            m.disabled = flag


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Eval mode (no adapter dropout) inside the block, each model's own mode restored after it."""
    before = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(models, before):
            m.train(flag)


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _is_adapter_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or name.split(".")[0] in MODULES_TO_SAVE


def merged_state_dict(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` (the model's full state dict) with each adapted ``W`` replaced by ``W + scaling * B A`` and the
    adapter tensors dropped: a plain checkpoint of the model the adapters compute."""
    out = {k: v for k, v in state.items() if ".lora_A." not in k and ".lora_B." not in k}
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            a, b, w = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"], state[f"{name}.weight"]
            with torch.no_grad():
                out[f"{name}.weight"] = w + ((b @ a) * m.scaling).to(w.dtype)
    return out


# ============================================================================================== PEFT files
def adapter_config(spec: LoraSpec, head: str, base_model: str | None) -> dict:
    """PEFT's ``LoraConfig`` fields for these adapters (the fields PEFT reads; the rest keep its defaults)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if head == "lm" else None,
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(spec.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": list(MODULES_TO_SAVE) if head == "score" else None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
        "revision": None,
    }


def save_adapter(model: DecoderModel, folder: str, dtype: torch.dtype | None = None) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's key names) of ``model``'s adapters and score
    head.  A model sharded with FSDP2 is consolidated first: every rank must call this, rank 0 writes."""
    from safetensors.torch import save_file

    from ..distributed import full_state_dict, is_sharded

    full = full_state_dict(model) if is_sharded(model) else model.state_dict()
    if full is None:
        return
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for name, t in full.items():
        if _is_adapter_key(name):
            t = t.detach()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            tensors[PEFT_PREFIX + name] = t.to("cpu").contiguous()
    save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    base = getattr(model, "source_dir", None)
    with open(os.path.join(folder, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(adapter_config(model.lora_spec, model.head, os.path.abspath(base) if base else None), f, indent=2)


def is_adapter_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, ADAPTER_CONFIG))


def read_adapter_config(folder: str) -> dict:
    from .checkpoint import read_config

    return read_config(os.path.join(folder, ADAPTER_CONFIG))


def load_adapter(model: DecoderModel, folder: str, keep_head: bool = False) -> DecoderModel:
    """Copy the adapters (and score head) of a PEFT folder into ``model`` (which carries adapters of the same
    rank and targets).  ``CheckpointError`` naming the file and the tensors when they do not match.  ``keep_head``:
    a folder without a score head (a causal LM's adapters) leaves the model's own head as it is."""
    from .checkpoint import CheckpointError, load_weights_file

    path = os.path.join(folder, ADAPTER_WEIGHTS)
    state = load_weights_file(path)
    state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
    params = dict(model.named_parameters())
    expected = {n for n in params if _is_adapter_key(n)}
    if keep_head and not any(k.split(".")[0] in MODULES_TO_SAVE for k in state):
        expected = {n for n in expected if n.split(".")[0] not in MODULES_TO_SAVE}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(f"{path}: adapters do not match the model's (--lora_rank / --lora_target_modules "
                              f"changed?): missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
    with torch.no_grad():
        for name in expected:
            if params[name].shape != state[name].shape:
                raise CheckpointError(f"{path}: {name}: shape {tuple(state[name].shape)} != the model's "
                                      f"{tuple(params[name].shape)} (--lora_rank changed?)")
            params[name].copy_(state[name])
    return model


# ======================================================================================= adapter folders as inputs
def base_of(folder: str) -> str:
    """The base model folder of a PEFT adapter folder (its ``base_model_name_or_path``)."""
    from .checkpoint import CheckpointError

    base = read_adapter_config(folder).get("base_model_name_or_path")
    if not base or not os.path.isdir(base):
        raise CheckpointError(f"{os.path.join(folder, ADAPTER_CONFIG)}: base_model_name_or_path {base!r} is not a "
                              "folder here (pass the adapters' base model, or save the run with --merge_lora True)")
    return base


def config_folder(path: str) -> str:
    """The folder whose config.json describes ``path``'s architecture: ``path`` itself, or for an adapter folder its
    base's (followed through adapters trained on adapters)."""
    seen = set()
    while is_adapter_folder(path) and not os.path.isfile(os.path.join(path, "config.json")) and path not in seen:
        seen.add(path)
        path = base_of(path)
    return path


def spec_from_config(config: dict) -> LoraSpec:
    return LoraSpec(int(config["r"]), float(config.get("lora_alpha", 8)), float(config.get("lora_dropout", 0.0)),
                    resolve_targets(config.get("target_modules") or TARGETS))


def merge_adapters(model: DecoderModel) -> DecoderModel:
    """Fold every adapter into its weight (``W <- W + scaling * B A``) and turn the model back into a plain one,
    every parameter trainable again (as a freshly loaded model)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLinear):
                with torch.no_grad():
                    child.weight += child.delta_weight().to(child.weight.dtype)
                plain = Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, name, plain)
    model.lora_spec = None
    model.requires_grad_(True)
    return model


def load_merged(folder: str, head: str, **kwargs) -> DecoderModel:
    """A PEFT adapter folder as a plain model: its base (``from_pretrained(base, head, **kwargs)``) with the adapters
    (and score head) merged in; it saves and trains as any loaded model."""
    from .checkpoint import CheckpointError, from_pretrained

    base = base_of(folder)
    model = from_pretrained(base, head=head, **kwargs)
    if not isinstance(model, DecoderModel):
        raise CheckpointError(f"{folder}: LoRA adapters apply to the native decoder, and {base} loads with "
                              "transformers")
    apply_lora(model, spec_from_config(read_adapter_config(folder)))
    load_adapter(model, folder, keep_head=True)  # an LM's adapters under a score head: the head stays fresh
    model = merge_adapters(model)
    model.source_dir = folder  # its tokenizer files
    return model.eval()


def has_adapter_score_head(folder: str) -> bool:
    """Whether an adapter folder carries a trained score head (reads the key list only)."""
    from safetensors import safe_open

    from .checkpoint import CheckpointError

    path = os.path.join(folder, ADAPTER_WEIGHTS)
    try:
        with safe_open(path, framework="pt") as f:
            return PEFT_PREFIX + "score_head.weight" in f.keys()
    except Exception as exc:  # a missing or unreadable file alike: not a usable adapter folder
        raise CheckpointError(f"{path}: cannot read the adapters ({type(exc).__name__})") from exc
