"""The pieces the trainers share: learning-rate schedules, AdamW parameter groups, data order, FSDP2 sharding of a
model, the run's output folder and metrics logger, checkpoint pruning and the step-boundary stops (``--save_interval``,
``--max_steps``, signals).  The run itself is :mod:`.core`."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import torch
from torch.utils.data import Dataset

from .. import distributed
from ..loading import check_vocab, load_model, require_score_head, tokenizer_size  # noqa: F401 - re-exported
from .config import LR_SCHEDULERS, ConfigError
from .metrics import MetricsLogger
from .safety import (  # noqa: F401 - re-exported: the names the trainers and tests import from here
    CHECKPOINT_RE,
    STATE_FILE,
    Interrupted,
    NonFiniteError,
    StopSignals,
    check_finite,
    claim_output_dir,
    clip_gradients,
    data_fingerprint,
    find_checkpoint,
    fsync_dir,
    fsync_tree,
    load_state,
    resolve_resume,
    staged_checkpoint,
    write_run_info,
)


# ------------------------------------------------------------------------------------------------ helpers
def final_dtype(cfg) -> torch.dtype | None:
    """dtype of the final model's weights: with ``--save_16bit`` the run's half precision (bf16 with ``--bf16``,
    else fp16), as the reference's 16-bit save; None keeps fp32.  Checkpoints always stay fp32 (exact resume)."""
    if not getattr(cfg, "save_16bit", False):
        return None
    return torch.bfloat16 if cfg.bf16 else torch.float16


POLYNOMIAL_LR_END, POLYNOMIAL_POWER = 1e-7, 1.0  # get_polynomial_decay_schedule_with_warmup's defaults


def schedule_lambda(kind: str, warmup: int, total: int, lr: float | None = None):
    """Multiplier of the peak learning rate ``lr`` after ``step`` optimizer steps (Hugging Face's formulas:
    ``cosine_with_restarts`` with one cycle; ``polynomial`` decays to 1e-7 with power 1, so it needs ``lr``)."""
    if kind not in LR_SCHEDULERS:
        raise ConfigError(f"unknown --lr_scheduler_type {kind!r}; choose one of {', '.join(LR_SCHEDULERS)}")
    if kind == "polynomial" and not (lr or 0.0) > POLYNOMIAL_LR_END:
        raise ConfigError(f"--lr_scheduler_type polynomial: the learning rate ({lr}) must be above its end value "
                          f"{POLYNOMIAL_LR_END}")

    def lr_lambda(step: int) -> float:
        if kind != "constant" and step < warmup:
            return step / max(1, warmup)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if kind == "cosine_with_restarts":
            return 0.0 if progress >= 1.0 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * (progress % 1.0))))
        if step > total:  # polynomial
            return POLYNOMIAL_LR_END / lr
        decay = (lr - POLYNOMIAL_LR_END) * (1 - (step - warmup) / (total - warmup)) ** POLYNOMIAL_POWER
        return (decay + POLYNOMIAL_LR_END) / lr

    return lr_lambda


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The reference implementation's grouping: no decay for names containing 'bias' or 'layernorm.weight'."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lname = name.lower()
        (no_decay if ("bias" in lname or "layernorm.weight" in lname) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n, generator=g).tolist()


def rank_epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """This rank's rows of epoch ``epoch``: ``epoch_order`` in one process, its ``DistributedSampler`` share (same
    permutation, rows ``rank::world_size``) under torchrun."""
    if distributed.is_distributed():
        return distributed.epoch_indices(n, seed, epoch)
    return epoch_order(n, seed, epoch)


def maybe_shard(model, config, trainable: bool = True):
    """FSDP2-shard ``model`` under torchrun (a frozen model only with ``--shard_frozen``); unchanged otherwise."""
    if not distributed.is_distributed() or (not trainable and not config.shard_frozen):
        return model
    offload = config.offload != "none" and trainable and model.device.type == "cuda"
    return distributed.shard_model(model, mixed_precision=config.mixed_precision, offload=offload)


def warn_single_process_flags(config) -> None:
    if not distributed.is_distributed() and config.offload != "none":
        print("warning: --offload applies to FSDP2 under torchrun; ignored in a single process")


class NullLogger:
    """The metrics sink of ranks other than 0 (rank 0 writes)."""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class RunLogger:
    """Rank 0's metrics logger; closing it also releases the output folder's lock."""

    def __init__(self, logger: MetricsLogger, lock):
        self.logger, self.lock = logger, lock

    def log(self, metrics: dict, step: int) -> None:
        self.logger.log(metrics, step)

    def close(self) -> None:
        try:
            self.logger.close()
        finally:
            self.lock.release()


def open_run_logger(cfg, resume_step: int | None):
    """Claim OUTPUT_DIR (create, lock, clear a previous run's files under ``--overwrite_output_dir``), then on rank 0
    write ``arguments.json`` and open the metrics logger (a fresh ``metrics.jsonl``, or the resumed one cut after
    ``resume_step``); other ranks: a ``NullLogger``.  Called only once the data and models have loaded, so bad input
    leaves no output directory behind."""
    lock = claim_output_dir(cfg, fresh=resume_step is None)
    if not distributed.is_main():
        return NullLogger()
    try:
        with open(os.path.join(cfg.output_dir, "arguments.json"), "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        logger = MetricsLogger(cfg.output_dir, cfg.log_type, cfg.log_dir, cfg.log_project, cfg.log_run_name,
                               dataclasses.asdict(cfg), resume_step=resume_step)
    except BaseException:
        lock.release()
        raise
    return RunLogger(logger, lock)


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Remove all but the newest ``keep`` (at least 1) ``checkpoint-<step>`` folders of ``output_dir``."""
    found = sorted((int(m.group(1)), n) for n in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(n)))
    for _, name in found[: max(0, len(found) - max(1, keep))]:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


NONFINITE_HINT = ("Lower --lr, check the input model and the data for NaN / inf, or --resume from the checkpoint "
                  "(--resume_allow_changes lr for a lower --lr).")


def stop_if_signalled(signals: StopSignals, step: int, total: int, save) -> None:
    """At a step boundary: after SIGINT / SIGTERM, save a checkpoint and raise ``Interrupted`` (not after the last
    step: the run then finishes)."""
    signum = signals.requested()
    if signum is not None and step < total:
        raise Interrupted(signum, save(), step, total)


def checkpoint_or_stop(cfg, step: int, total: int, save) -> bool:
    """After step ``step`` of ``total`` (optimizer steps, or rollout steps for PPO): call ``save()`` every
    ``--save_interval`` steps, and at ``--max_steps`` make sure a checkpoint of this step exists and return True
    (stop here; ``--resume`` finishes the run).  The final step is saved by the caller, not here."""
    saved = False
    if cfg.save_interval and step % cfg.save_interval == 0 and step < total:
        save()
        saved = True
    if cfg.max_steps is not None and step >= cfg.max_steps and step < total:
        if not saved:
            save()
        return True
    return False


def split_dataset(dataset: Dataset, ratio: float, seed: int):
    """(train, eval) subsets, the eval part ``ratio`` of the rows, drawn with a fixed seed."""
    n = len(dataset)
    order = epoch_order(n, seed, 0)
    n_eval = max(1, int(round(n * ratio)))
    if n_eval >= n:
        raise ConfigError(f"--eval_split_ratio {ratio} leaves no training rows out of {n}")
    subset = torch.utils.data.Subset
    return subset(dataset, sorted(order[n_eval:])), subset(dataset, sorted(order[:n_eval]))


def collator_of(dataset: Dataset):
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset.collator()


def replace_dir_contents(src: str, dst: str) -> None:
    """Make every file of ``src`` durable, move each into ``dst`` with ``os.replace`` (atomic per file), then remove
    ``src``."""
    fsync_tree(src)
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        os.replace(os.path.join(src, name), os.path.join(dst, name))
    os.rmdir(src)
    fsync_dir(dst)
