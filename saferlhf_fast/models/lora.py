"""LoRA adapters (Hu et al., 2021, in PEFT's formulation) on the native decoder's projections and on the linear
layers of a transformers model (``backend='hf'``), and their checkpoints in PEFT's format.

A targeted projection ``y = W x + b`` becomes::

    y = W x + b + (alpha / r) * B (A dropout(x))        A: [r, in] kaiming-uniform(a=sqrt(5)), B: [out, r] zeros

so a fresh adapter leaves the model's outputs unchanged.  ``W`` and ``b`` (and every other base weight) are frozen;
``A`` and ``B`` train, and so does a score model's ``score_head`` (PEFT's ``modules_to_save``).  The adapter path is
one autograd node with the base projection (:func:`ops.lora_linear`: the up-projection accumulates into the base
output inside its GEMM, the adapter's input gradient into the base's).

On the transformers path (:class:`HFLoraLinear`) the adapted layers are ``nn.Linear`` or transformers' ``Conv1D``
(GPT-2: weight stored ``[in, out]``, PEFT's ``fan_in_fan_out``, so the merged weight is ``W + scaling (B A)^T``).
``all-linear`` there is PEFT's: every ``nn.Linear`` / ``Conv1D`` of the model but the output layer (``lm_head``; a
score model's ``score_head`` is ours and never adapted); explicit names match a layer's last name component (PEFT's
suffix match: ``c_proj`` adapts GPT-2's attention and MLP output projections).  No ``peft`` is needed at run time;
it is the reference the tests load our folders with.

Parameter names: the base weight keeps its name (``model.layers.0.self_attn.q_proj.weight``) and the adapter adds
``...q_proj.lora_A.weight`` / ``...q_proj.lora_B.weight``; PEFT's file names them
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (its prefix in front, no adapter name), so
``peft.PeftModel.from_pretrained(transformers_model, folder)`` loads what :func:`save_adapter` writes.  A
transformers model's names drop our ``hf.`` wrapper prefix; a score model's backbone keys get its
``base_model_prefix`` (``transformer.`` for GPT-2), as in its ``<Arch>ForScore`` checkpoint.

* :func:`apply_lora` adds the adapters and freezes the base; :func:`adapters_disabled` runs the base model alone
  (the PPO / DPO reference: no second copy of the weights).
* :func:`merged_adapters`: for the duration of a block (generation), each enabled adapted projection computes with
  one merged weight ``W + (alpha / r) B A`` instead of applying its adapter on the fly; the parameters are never
  written, so the model after the block is bit for bit the model before it.
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
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
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
    ``targets`` (``all-linear`` or layer names; an adapted model's spec holds the names it resolved to).
    ``fan_in_fan_out``: the adapted weights are stored ``[in, out]`` (transformers' ``Conv1D``)."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = (ALL_LINEAR,)
    fan_in_fan_out: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def target_names(names) -> tuple[str, ...]:
    """The names of ``--lora_target_modules`` (each item may be comma-separated), ``all-linear`` kept as it is, in
    order, without repeats; ``ValueError`` when there is none.  Which layers they name depends on the model."""
    out: list[str] = []
    for item in [names] if isinstance(names, str) else names:
        for name in filter(None, (s.strip() for s in str(item).split(","))):
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError(f"no LoRA target given: choose {ALL_LINEAR} or layer names")
    return tuple(out)


def resolve_targets(names) -> tuple[str, ...]:
    """The native decoder's projection names from ``["all-linear"]`` or names (each may be comma-separated);
    ``ValueError`` names an unknown one."""
    out: list[str] = []
    for name in target_names(names):
        for n in TARGETS if name == ALL_LINEAR else (name,):
            if n not in TARGETS:
                raise ValueError(f"unknown LoRA target {name!r}: choose {ALL_LINEAR} or among {', '.join(TARGETS)}")
            if n not in out:
                out.append(n)
    return tuple(out)


class _Adapter:
    """The adapter half of a LoRA layer: ``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]``, the input dropout, the scale
    and the ``disabled`` switch, next to the base layer's own ``weight`` / ``bias`` (kept under their names).
    ``fan_in_fan_out``: the base weight is stored ``[in, out]`` (transformers' ``Conv1D``)."""

    fan_in_fan_out = False

    def _add_adapter(self, base: nn.Module, in_features: int, out_features: int, spec: LoraSpec) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.weight, self.bias = base.weight, base.bias
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(in_features, spec.rank, bias=False, **factory)
        self.lora_B = nn.Linear(spec.rank, out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.scaling = spec.scaling
        self.disabled = False
        self.merged = None  # W + scaling * B A while merged_adapters is active (a plain tensor, never a parameter)
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """PEFT's initialisation: A kaiming-uniform (as ``nn.Linear``), B zeros (the update starts at 0)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> Tensor:
        """``scaling * B A`` (PEFT's ``get_delta_weight``: the product, then the scale) in the base weight's layout:
        ``[out, in]``, transposed for a ``Conv1D``."""
        return _oriented((self.lora_B.weight @ self.lora_A.weight) * self.scaling, self.fan_in_fan_out)

    def merged_weight(self) -> Tensor:
        """``W + scaling * B A`` in ``W``'s dtype (detached; the generation engine packs this once per ``generate``
        call).  Summed in fp32 and rounded once: a base held in bf16 (``--bf16``) gives ``bf16(W + scaling B A)``,
        what the fp32-merged weight rounds to in a bf16 product."""
        with torch.no_grad():
            w = self.weight.detach()
            return (w.float() + self.delta_weight().float()).to(w.dtype)

    def use_merged(self) -> bool:
        """Whether this forward computes with ``self.merged``: inside :func:`merged_adapters`, adapters enabled, no
        gradient wanted (a merged weight is detached: a forward that trains ``A`` / ``B`` applies them on the fly,
        so training inside the block is exact too) and no active dropout (it reaches the adapter's input only)."""
        return (self.merged is not None and not self.disabled and not torch.is_grad_enabled()
                and not (self.training and isinstance(self.lora_dropout, nn.Dropout)))


class LoraLinear(_Adapter, Linear):
    """A :class:`~.llama.Linear` (the same ``weight`` / ``bias`` parameters, the same names) plus ``lora_A``,
    ``lora_B``: ``ops.linear(x, W, b) + scaling * B(A(dropout(x)))`` in one autograd node (:func:`ops.lora_linear`);
    with ``disabled`` the base projection alone."""

    def __init__(self, base: Linear, spec: LoraSpec):
        nn.Module.__init__(self)
        self._add_adapter(base, base.in_features, base.out_features, spec)

    def forward(self, x: Tensor) -> Tensor:
        if self.disabled:
            return ops.linear(x, self.weight, self.bias)
        if self.use_merged():
            return ops.linear(x, self.merged, self.bias)
        return ops.lora_linear(x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scaling,
                               self.lora_dropout)

    def plain(self) -> Linear:
        """A plain :class:`~.llama.Linear` holding this layer's (possibly merged) weight and bias (built on the meta
        device: no second copy of the weight)."""
        plain = Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain


class HFLoraLinear(_Adapter, nn.Module):
    """A transformers ``nn.Linear`` or ``Conv1D`` (the same ``weight`` / ``bias`` parameters, the same names) plus
    ``lora_A``, ``lora_B``: the layer's own product (``x W^T + b``, or ``Conv1D``'s ``b + x W`` with ``W`` stored
    ``[in, out]``) ``+ scaling * B(A(dropout(x)))``; with ``disabled`` the layer alone, bit for bit."""

    def __init__(self, base: nn.Module, spec: LoraSpec):
        nn.Module.__init__(self)
        self.fan_in_fan_out = not isinstance(base, nn.Linear)  # Conv1D
        out_features, in_features = base.weight.shape[::-1] if self.fan_in_fan_out else base.weight.shape
        self._add_adapter(base, in_features, out_features, spec)

    def base_forward(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """The layer's own product with ``weight`` (default: its own ``W``; :func:`merged_adapters` passes the
        merged one, in the same layout)."""
        weight = self.weight if weight is None else weight
        if not self.fan_in_fan_out:
            return F.linear(x, weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])  # Conv1D.forward, op for op
        y = torch.addmm(self.bias, flat, weight) if self.bias is not None else flat @ weight
        return y.view(*x.shape[:-1], self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_merged():
            return self.base_forward(x, self.merged)
        y = self.base_forward(x)
        if self.disabled:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def plain(self) -> nn.Module:
        """A plain ``nn.Linear`` / ``Conv1D`` holding this layer's (possibly merged) weight and bias (built on the meta
        device: no second copy of the weight, at no point)."""
        from transformers.pytorch_utils import Conv1D

        with torch.device("meta"):
            if self.fan_in_fan_out:
                base = Conv1D(self.out_features, self.in_features)
            else:
                base = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        base.weight, base.bias = self.weight, self.bias
        return base


def _oriented(delta: Tensor, fan_in_fan_out: bool) -> Tensor:
    return delta.t() if fan_in_fan_out else delta


ADAPTED = (LoraLinear, HFLoraLinear)


# ============================================================================================== the model
def lora_spec_of(model) -> LoraSpec | None:
    return getattr(model, "lora_spec", None)


def lora_layers(model: nn.Module) -> list[LoraLinear | HFLoraLinear]:
    return [m for m in model.modules() if isinstance(m, ADAPTED)]


def apply_lora(model, spec: LoraSpec):
    """Add adapters to ``model``'s targeted layers (A drawn from the global RNG), freeze every base weight and
    leave the adapters and a score head trainable; ``model.lora_spec`` holds the layer names it resolved.
    ``ValueError`` for a target that names no layer, ``TypeError`` for a model that is neither the native decoder nor
    a transformers one (:class:`~.hf.HFModel`)."""
    if spec.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {spec.rank}")
    if isinstance(model, DecoderModel):
        spec = _apply_native(model, spec)
    elif getattr(model, "is_hf", False):
        spec = _apply_hf(model, spec)
    else:
        raise TypeError(f"LoRA adapts the native decoder or a transformers model; {type(model).__name__} is neither")
    for name in MODULES_TO_SAVE:
        head = getattr(model, name, None)
        if head is not None:
            head.requires_grad_(True)
    model.lora_spec = spec
    return model


def _apply_native(model: DecoderModel, spec: LoraSpec) -> LoraSpec:
    spec = replace(spec, targets=resolve_targets(spec.targets))
    model.requires_grad_(False)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in spec.targets:
                base = getattr(parent, name, None)
                if isinstance(base, Linear) and not isinstance(base, LoraLinear):
                    setattr(parent, name, LoraLinear(base, spec))
    return spec


def hf_linear_layers(model) -> list[tuple[str, nn.Module]]:
    """(name in ``model.hf``, layer) of every ``nn.Linear`` / ``Conv1D`` of a transformers model but its output layer
    (PEFT's ``all-linear``) and the adapters' own."""
    from transformers.pytorch_utils import Conv1D

    out_layer = model.hf.get_output_embeddings() if model.head == "lm" else None
    return [(n, m) for n, m in model.hf.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and m is not out_layer and not n.endswith((".lora_A", ".lora_B"))]


def _apply_hf(model, spec: LoraSpec) -> LoraSpec:
    """Adapters on the layers of ``hf_linear_layers`` whose last name component is a target (all of them for
    ``all-linear``); ``ValueError`` for a name that matches none."""
    layers = hf_linear_layers(model)
    leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in layers})
    wanted = set(leaves) if ALL_LINEAR in spec.targets else set(spec.targets)
    for name in spec.targets:
        if name != ALL_LINEAR and name not in leaves:
            raise ValueError(f"{name!r} matches no linear layer of {type(model.hf).__name__}: choose {ALL_LINEAR} or "
                             f"among {', '.join(leaves)}")
    model.requires_grad_(False)
    conv = False
    for name, base in layers:
        parent_name, _, leaf = name.rpartition(".")
        if leaf in wanted:
            adapted = HFLoraLinear(base, spec)
            conv |= adapted.fan_in_fan_out
            setattr(model.hf.get_submodule(parent_name), leaf, adapted)
    return replace(spec, targets=tuple(sorted(wanted)), fan_in_fan_out=conv)


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


def mergeable(layer) -> bool:
    """Whether :func:`merged_adapters` can merge ``layer``: its weight and adapters are plain tensors.  FSDP2's
    sharded parameters (DTensors: each rank holds rows of ``W`` and of ``A`` / ``B``, and ``B A`` would need the
    ranks' ``A`` gathered) are not; inside ``distributed.gathered`` (the rollout) they are unsharded, plain again."""
    return all(type(t) in (Tensor, nn.Parameter) for t in (layer.weight, layer.lora_A.weight, layer.lora_B.weight))


@contextlib.contextmanager
def merged_adapters(model: nn.Module, enabled: bool = True):
    """Inside the block each enabled, :func:`mergeable` adapted projection of ``model`` computes
    ``x @ M.T + b`` with one merged weight ``M = W + (alpha / r) B A`` (made on entry) instead of
    ``x @ W.T + b + (alpha / r) (x @ A.T) @ B.T``: the same function up to rounding, one product per projection.

    * Exact after: no parameter is written (no in-place merge and unmerge, which would not give ``W`` back in
      floating point); ``M`` is a separate tensor each layer holds in ``merged`` and drops on exit, exception or
      not.  The cost is one copy of the adapted weights for the duration of the block.
    * ``M`` is summed in fp32 with autocast off and kept in the weights' own dtype (under bf16 autocast the fp32
      master is merged, then rounded once to bf16 by the product, as the compiled decode step's ``_weight`` does; a
      base held in bf16 gets that rounding at once).
    * A layer disabled on entry (:func:`adapters_disabled`) is not merged; a layer disabled inside the block
      computes with its base weight alone (``disabled`` is checked first).
    * Only no-grad forwards without active dropout use ``M`` (:meth:`_Adapter.use_merged`): a training forward
      inside the block still trains ``A`` and ``B``.
    * Sharded (DTensor) layers stay on the fly (:func:`mergeable`).
    * Nested blocks: the outermost one merges and unmerges.
    ``enabled=False``: a no-op (the caller's switch)."""
    # a layer merged by an enclosing block keeps that block's M (and leaves it to that block to drop)
    layers = [m for m in lora_layers(model) if not m.disabled and m.merged is None and mergeable(m)] if enabled else []
    try:
        for m in layers:
            with torch.autocast(m.weight.device.type, enabled=False):
                m.merged = m.merged_weight()
        yield model
    finally:
        for m in layers:
            m.merged = None


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
    adapter tensors dropped: a plain checkpoint of the model the adapters compute.  The sum is taken in fp32 and kept
    in the wider of ``W``'s and the adapters' dtypes (a base held in bf16 under ``--bf16`` merges into fp32: the
    rounding of the base the adapters were trained on, plus the exact update)."""
    out = {k: v for k, v in state.items() if ".lora_A." not in k and ".lora_B." not in k}
    for name, m in model.named_modules():
        if isinstance(m, ADAPTED):
            a, b, w = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"], state[f"{name}.weight"]
            dtype = torch.promote_types(w.dtype, a.dtype)
            with torch.no_grad():
                delta = _oriented((b.float() @ a.float()) * m.scaling, m.fan_in_fan_out)
                out[f"{name}.weight"] = (w.float() + delta).to(dtype)
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
        "fan_in_fan_out": spec.fan_in_fan_out,
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


def peft_key(model, name: str) -> str:
    """PEFT's file key of our parameter ``name``: its prefix in front; a transformers model's ``hf.`` dropped and, for
    a score model, its backbone's ``base_model_prefix`` added (the ``<Arch>ForScore`` layout)."""
    if getattr(model, "is_hf", False) and name.startswith("hf."):
        name = name[len("hf."):]
        if model.head == "score":
            name = f"{model.hf.base_model_prefix}.{name}"
    return PEFT_PREFIX + name


def save_adapter(model, folder: str, dtype: torch.dtype | None = None) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's key names) of ``model``'s adapters and score
    head.  A model sharded with FSDP2 gathers those (its trained parameters) on rank 0 first: every rank must call
    this, rank 0 writes."""
    from safetensors.torch import save_file

    from ..distributed import full_state_dict, is_sharded

    full = full_state_dict(model, trained_only=True) if is_sharded(model) else model.state_dict()
    if full is None:
        return
    tensors = {}
    for name, t in full.items():
        if _is_adapter_key(name):
            t = t.detach()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            tensors[peft_key(model, name)] = t.to("cpu").contiguous()
    missing = {peft_key(model, n) for n, _ in model.named_parameters() if _is_adapter_key(n)} - tensors.keys()
    if missing:  # a frozen adapter would be left out of a trained-only gather: never write an incomplete folder
        raise RuntimeError(f"save_adapter {folder}: adapter tensors not gathered: {sorted(missing)[:3]}")
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    base = getattr(model, "source_dir", None)
    with open(os.path.join(folder, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(adapter_config(model.lora_spec, model.head, os.path.abspath(base) if base else None), f, indent=2)


def is_adapter_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, ADAPTER_CONFIG))


def read_adapter_config(folder: str) -> dict:
    from .checkpoint import read_config

    return read_config(os.path.join(folder, ADAPTER_CONFIG))


def load_adapter(model, folder: str, keep_head: bool = False):
    """Copy the adapters (and score head) of a PEFT folder into ``model`` (which carries adapters of the same
    rank and targets).  ``CheckpointError`` naming the file and the tensors when they do not match.  ``keep_head``:
    a folder without a score head (a causal LM's adapters) leaves the model's own head as it is."""
    from .checkpoint import CheckpointError, load_weights_file

    path = os.path.join(folder, ADAPTER_WEIGHTS)
    params = dict(model.named_parameters())
    ours = {peft_key(model, n): n for n in params if _is_adapter_key(n)}  # PEFT's key -> our name
    state = {ours.get(k, k.removeprefix(PEFT_PREFIX)): v for k, v in load_weights_file(path).items()}
    expected = set(ours.values())
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
                    target_names(config.get("target_modules") or ALL_LINEAR))


def merge_adapters(model):
    """Fold every adapter into its weight (``W <- W + scaling * B A``) and turn the model back into a plain one,
    every parameter trainable again (as a freshly loaded model)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ADAPTED):
                with torch.no_grad():
                    child.weight += child.delta_weight().to(child.weight.dtype)
                setattr(parent, name, child.plain())
    model.lora_spec = None
    model.requires_grad_(True)
    return model


def load_merged(folder: str, head: str, **kwargs):
    """A PEFT adapter folder as a plain model: its base (``from_pretrained(base, head, **kwargs)``) with the adapters
    (and score head) merged in; it saves and trains as any loaded model."""
    from .checkpoint import CheckpointError, from_pretrained

    model = from_pretrained(base_of(folder), head=head, **kwargs)
    try:
        apply_lora(model, spec_from_config(read_adapter_config(folder)))
    except ValueError as err:  # target names of another architecture
        raise CheckpointError(f"{os.path.join(folder, ADAPTER_CONFIG)}: {err}") from None
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
