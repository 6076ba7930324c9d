"""Scale-out on PyTorch's own stack: ``torchrun`` launches, ``torch.distributed`` communicates (NCCL on GPUs, gloo on
CPU), FSDP2 (``torch.distributed.fsdp.fully_shard``) shards the models, DCP (``torch.distributed.checkpoint``) saves
and reloads sharded state.  See ``docs/distributed.md``.

Without the torchrun environment (``RANK`` / ``WORLD_SIZE`` unset) nothing here does anything: no process group,
no wrapping, no collective; every helper falls through to the single-process value, so a plain run is bit for bit
what it was before this module existed.

* :func:`init` -- process group from the torchrun variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` / ``MASTER_PORT``); backend ``nccl`` when the run's device is CUDA, else ``gloo``.
* :func:`epoch_indices` -- a rank's rows for an epoch: ``DistributedSampler(shuffle=True, seed).set_epoch(e)``, so
  the union of the ranks' ``k``-th micro-batches is the ``k``-th micro-batch of a one-rank run whose per-device
  batch is ``world_size`` times larger.
* :func:`shard_model` -- FSDP2 on our decoder: every decoder layer, then the root (embeddings, final norm, heads);
  optional ``MixedPrecisionPolicy`` (bf16 parameters, fp32 gradient reduction) and ``CPUOffloadPolicy``.  The
  methods the trainers call besides ``forward`` (``token_logprobs``, ``forward_cached``) are registered as FSDP
  forward methods, so they gather and free parameters like ``forward`` does.
* :func:`gathered` -- the rollout context: all-gather the full weights once, keep them through every decode step,
  free them on exit (instead of one all-gather per layer per decode step).
* :func:`reduce_metrics`, :func:`all_true`, :func:`all_gather_tensor` -- the collectives the trainers need.
* :func:`save_sharded` / :func:`load_sharded` -- models and optimizers through DCP (each rank writes its shards;
  a load reshards to whatever the current world size is, one process without a process group included);
  :func:`full_state_dict` -- the consolidated state for the Hugging Face export.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import math
import os
import warnings

import torch
import torch.distributed as dist

from .settings import settings

SHARDED_DIR = "sharded"  # DCP folder inside a checkpoint


# ------------------------------------------------------------------------------------------------ process group
def launched() -> bool:
    """True when started by torchrun (or anything that sets ``RANK`` and ``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    """Rank 0 (or a single process): the only writer of logs, metrics and files."""
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


def init(device: str = "auto") -> bool:
    """Initialise the default process group from the torchrun environment; returns whether this run is
    distributed.  ``device`` is the run's ``--device`` (``auto`` / ``cpu`` / ``cuda[:N]``): CUDA -> ``nccl`` (and
    ``cuda:LOCAL_RANK`` becomes the current device), CPU -> ``gloo``.  Idempotent; a no-op without torchrun."""
    if is_distributed():
        return True
    if not launched():
        return False
    use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(minutes=settings().dist_timeout_min)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    atexit.register(shutdown)  # the command's process group ends with the process
    return True


def shutdown(synchronize: bool = False) -> None:
    """Destroy the process group (end of a command under torchrun); a no-op otherwise.  ``synchronize``: first wait
    for every rank (a command that finished normally), so no rank tears its gloo / NCCL communicator down while
    another still uses it -- that race could abort a rank at exit ("terminate called without an active
    exception").  The ``atexit`` fallback (error paths) does not wait: the other ranks may never arrive.  Sharded
    models and DTensors keep the process group alive through reference cycles: they are collected first, so that its
    communicator goes while the interpreter is whole rather than during its teardown."""
    if is_distributed():
        gc.collect()
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def device_for(name: str) -> torch.device | None:
    """The device of this rank when distributed on CUDA (``cuda:LOCAL_RANK``), else None (use ``--device``)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", local_rank())
    return None


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ------------------------------------------------------------------------------------------------ collectives
def reduce_metrics(metrics: dict) -> dict:
    """Metrics averaged over ranks (keys containing ``max_`` take the maximum, ``perf/`` keys the sum: the whole
    job's throughput).  Every rank must pass the same keys; the result is the same on every rank."""
    if not is_distributed() or not metrics:
        return metrics
    keys = sorted(metrics)
    n = world_size()
    device = _comm_device()

    def op_of(k):
        return "max" if "max_" in k else ("sum" if k.startswith("perf/") else "mean")

    out = {}
    for op in ("mean", "sum", "max"):
        ks = [k for k in keys if op_of(k) == op]
        if not ks:
            continue
        t = torch.tensor([float(metrics[k]) for k in ks], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            t = t / n
        out.update(zip(ks, t.cpu().tolist()))
    return {k: out[k] for k in metrics}


def all_true(flag: bool) -> bool:
    """``flag`` and-ed over ranks (so every rank takes the same branch, e.g. the non-finite guards)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks (rank order) of tensors whose first dimension may differ."""
    if not is_distributed():
        return x
    device = _comm_device()
    local = x.detach().to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.int64, device=device))
    sizes = [int(s.item()) for s in sizes]
    biggest = max(sizes)
    padded = local.new_zeros((biggest, *local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(x.device)


def all_gather_object(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def to_local(x):
    """A DTensor (e.g. the global gradient norm FSDP's ``clip_grad_norm_`` returns) as a plain full tensor."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


# ------------------------------------------------------------------------------------------------ data
def epoch_indices(n: int, seed: int, epoch: int, rank_: int | None = None, world: int | None = None) -> list[int]:
    """This rank's rows of epoch ``epoch``: ``DistributedSampler(range(n), shuffle=True, seed=seed)`` after
    ``set_epoch(epoch)`` (with one replica: ``torch.randperm(n, generator=seed + epoch)``).  Ranks get the same
    number of rows (the sampler pads by repeating the first rows of the permutation).  ``rank_`` / ``world``
    default to this process's."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world_size() if world is None else world,
                                 rank=rank() if rank_ is None else rank_, shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return list(sampler)


def rows_per_rank(n: int) -> int:
    return math.ceil(n / world_size())


# ------------------------------------------------------------------------------------------------ FSDP2
def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def decoder_layers(model) -> list:
    """The blocks FSDP2 shards one by one: our decoder's layers, or a transformers-backed model's modules of the
    classes it lists in ``_no_split_modules`` (its decoder layers)."""
    if getattr(model, "is_hf", False):
        names = set(getattr(model.hf, "_no_split_modules", None) or ())
        return [m for m in model.hf.modules() if type(m).__name__ in names]
    return list(model.model.layers)


def shard_model(model, *, mixed_precision: str | None = None, offload: bool = False,
                reshard_after_forward: bool = True):
    """FSDP2 on a model: ``fully_shard`` each decoder layer (:func:`decoder_layers`), then the root.
    ``mixed_precision`` ``"bf16"`` / ``"fp16"``: parameters all-gathered and computed in that dtype, gradients
    reduced in fp32 (the sharded master weights and the optimizer state stay fp32).  ``offload``:
    ``CPUOffloadPolicy`` (sharded parameters, gradients and optimizer state in CPU memory; the optimizer steps on the
    CPU).  Returns the model (the same object, now an ``FSDPModule``)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    kw: dict = {"reshard_after_forward": reshard_after_forward}
    if mixed_precision:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    # FSDP2 warns when a wrapped forward returns a view (an in-place op on it would skip the backward all-gather);
    # ``token_logprobs`` / ``scores`` outputs are views and the trainers only ever use them out of place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    for name in ("token_logprobs", "forward_cached", "score_ends", "score_columns", "end_scores_and_columns"):
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    return model


def set_gradient_sync(model, enabled: bool) -> None:
    """Skip (False) or do (True) the gradient reduce-scatter in the next backward (gradient accumulation)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)


@contextlib.contextmanager
def gathered(model):
    """Full weights of a sharded model for the duration of the block (the rollout): one all-gather per FSDP group
    on entry, none while decoding, freed on exit.  A no-op for a model that is not sharded."""
    if not is_sharded(model):
        yield model
        return
    modules = _fsdp_modules(model)
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
    for m in modules:
        m.unshard()
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()
        for m in modules:
            m.set_reshard_after_forward(True, recurse=False)


# ------------------------------------------------------------------------------------------------ checkpoints
def full_state_dict(model, trained_only: bool = False) -> dict | None:
    """The consolidated (full, CPU) state dict of a sharded model on rank 0, None on the other ranks (a collective:
    every rank calls it).  A model that is not sharded: its own ``state_dict()``.  ``trained_only``: only the
    parameters that train (a LoRA model's adapters and score head: what its adapter folder holds), so saving them
    gathers megabytes, not the frozen base."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trained_only)
    state = get_model_state_dict(model, options=options)
    return state if is_main() else None


# Frozen parameters (a LoRA model's base, a value-head critic's backbone) are the input model's: the shards hold only
# what training changes, and a resume takes the rest from the input model again.
_TRAINED_ONLY = dict(ignore_frozen_params=True)


def _state(items: dict) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    out = {}
    for name, (model, optimizer) in items.items():
        msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(**_TRAINED_ONLY))
        out[name] = {"model": msd, "optimizer": osd}
    return out


def save_sharded(path: str, items: dict) -> None:
    """DCP save of ``{name: (model, optimizer)}`` into ``path``: the trained parameters (those with
    ``requires_grad``) and the optimizer states; frozen weights are not written (every rank writes its own shards;
    on several nodes ``path`` must be on a shared file system)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(items), checkpoint_id=path)


def load_sharded(path: str, items: dict) -> None:
    """DCP load into ``{name: (model, optimizer)}`` of the trained parameters and optimizer states (sharded or not:
    DCP reshards from the saved world size to this one; one process without a process group loads the whole thing).
    Frozen parameters keep the values the model was built with (its input model's)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _state(items)
    with warnings.catch_warnings():  # one process: DCP says it assumes a local load, which is the point
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path)  # a trained parameter missing from the shards is an error here
    for name, (model, optimizer) in items.items():
        # strict=False: the frozen parameters are absent from the loaded state by design
        set_state_dict(model, optimizer, model_state_dict=state[name]["model"],
                       optim_state_dict=state[name]["optimizer"],
                       options=StateDictOptions(**_TRAINED_ONLY, strict=False))


def load_full_optimizer_state(model, optimizer, saved: dict) -> None:
    """Load a single-process ``optimizer.state_dict()`` (parameters by index) into the optimizer of a sharded
    model: the indices are mapped to parameter names (the optimizer's parameter order) and the full state is
    sharded by ``set_optimizer_state_dict``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    state = {order[int(i)]: v for i, v in saved["state"].items()}
    groups = []
    for g in saved["param_groups"]:
        g = dict(g)
        g["params"] = [order[int(i)] for i in g["params"]]
        groups.append(g)
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))
