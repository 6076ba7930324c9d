"""The training loop shared by every command: optimizer, schedule, accumulation, clipping, logging, evaluation,
atomic checkpoints and exact resume.

* AdamW (betas 0.9 / 0.95) with weight decay on every parameter but biases and layer-norm weights (the reference
  implementation's grouping); learning-rate schedule cosine / linear / constant with a linear warm-up over
  ``int(lr_warmup_ratio * total_steps)`` optimizer steps (the Hugging Face formulas).
* Data order: epoch ``e`` visits the rows in ``torch.randperm(n, generator=seeded(seed + e))`` order -- what a
  one-replica ``DistributedSampler(shuffle=True, seed=seed)`` gives after ``set_epoch(e)``.
* ``gradient_accumulation_steps`` micro-batches per optimizer step, each loss divided by that number; the last
  group of an epoch may be shorter.  Gradients are clipped to a global norm of ``max_grad_norm`` (1.0).
* A checkpoint ``OUTPUT_DIR/checkpoint-<step>/`` holds the model (``save_pretrained``: config.json +
  model.safetensors), the tokenizer files and ``trainer_state.pt`` (optimizer, scheduler, step, data position,
  RNG states of python / numpy / torch); it is written to a temporary folder and renamed into place.
  ``--resume`` reloads all of it and continues to bit-identical final weights.
* Outputs (the final model, ``metrics.jsonl``, ``arguments.json``) appear in OUTPUT_DIR only once the data and the
  model have loaded, so bad input leaves no directory behind.
* Under ``torchrun`` (``saferlhf_fast.distributed``, docs/distributed.md): the model is sharded with FSDP2, each rank
  reads its ``DistributedSampler`` share of every epoch (the same permutation), gradients are averaged over ranks,
  metrics are reduced over ranks, rank 0 alone writes files; checkpoints add a DCP folder (model + optimizer
  shards) next to the consolidated Hugging Face model, and reload on any number of processes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time

import torch
from torch.utils.data import Dataset

from .. import distributed
from ..data import DataError, load_tokenizer
from ..data.batching import batches, to_device
from ..data.tokenizer import save_tokenizer
from ..loading import check_vocab, load_model, require_score_head, tokenizer_size  # noqa: F401 - re-exported
from ..runtime import (
    apply_tf32,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from .config import LR_SCHEDULERS, ConfigError, TrainConfig
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
    if not distributed.is_distributed() and (config.mixed_precision or config.offload != "none"):
        print("warning: --mixed_precision / --offload apply to FSDP2 under torchrun; ignored in a single process")


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


# ------------------------------------------------------------------------------------------------ trainer
@dataclasses.dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next micro-batch
    micro: int = 0  # index of the next micro-batch in that epoch


class Trainer:
    """Subclasses set ``head`` and implement ``build_datasets``, ``loss`` and ``evaluate``."""

    head = "lm"
    config: TrainConfig

    def __init__(self, config: TrainConfig):
        self.config = cfg = config
        distributed.init(cfg.device)
        warn_single_process_flags(cfg)
        self.device = resolve_device(cfg.device)
        apply_tf32(cfg.tf32)
        seed_everything(cfg.seed)
        tok_path = cfg.tokenizer_name_or_path or cfg.model_name_or_path
        if not os.path.isdir(tok_path):
            raise ConfigError(f"--model_name_or_path {tok_path}: no such folder")
        self.tokenizer = load_tokenizer(tok_path, cfg.max_length)
        # Data first: a bad row fails here, before the model loads and before OUTPUT_DIR exists.
        self.train_dataset, self.eval_dataset = self.build_datasets()
        if len(self.train_dataset) == 0:
            raise DataError("no training rows")
        self._fingerprint: str | None = None
        self.resume_from = resolve_resume(cfg, self.data_fingerprint)
        check_vocab(self.tokenizer, tok_path, "model_name_or_path", cfg.model_name_or_path)
        self.model = load_model(self.resume_from or cfg.model_name_or_path, self.head, cfg.attn_backend, self.device)
        if cfg.gradient_checkpointing:
            self.model.set_gradient_checkpointing(True)
        self.model = maybe_shard(self.model, cfg, trainable=True)
        self.state = TrainState()
        self.collate = collator_of(self.train_dataset)
        self.eval_collate = collator_of(self.eval_dataset) if self.eval_dataset is not None else None

    # ---- to implement -----------------------------------------------------------------------------------
    dataset_class = None  # the command's TokenizedDataset subclass (build_datasets' default)

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        """(train, eval): ``dataset_class`` over ``--train_datasets`` and ``--eval_datasets``, or a held-out
        ``--eval_split_ratio`` part of train."""
        cfg = self.config

        def make(flag):
            return self.dataset_class(getattr(cfg, flag), self.tokenizer, cfg.max_length, seed=cfg.seed,
                                      chat_template=cfg.chat_template, flag=f"--{flag}")

        return self.split_eval(make("train_datasets"), make("eval_datasets") if cfg.eval_datasets else None)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """(loss of one micro-batch, metrics as floats)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self) -> dict:
        return {}

    # ---- pieces -----------------------------------------------------------------------------------------
    def data_fingerprint(self) -> str:
        """Hash of the tokenized training rows (saved in checkpoints; a resume on other data is refused)."""
        if self._fingerprint is None:
            self._fingerprint = data_fingerprint(self.train_dataset)
        return self._fingerprint

    def split_eval(self, train: Dataset, eval_: Dataset | None):
        cfg = self.config
        if eval_ is None and cfg.eval_split_ratio:
            return split_dataset(train, cfg.eval_split_ratio, cfg.seed)
        return train, eval_

    def autocast(self):
        cfg = self.config
        if cfg.bf16 or cfg.fp16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16 if cfg.bf16 else torch.float16)
        return contextlib.nullcontext()

    def eval_batches(self):
        ds = self.eval_dataset
        for batch in batches(ds, list(range(len(ds))), self.config.per_device_eval_batch_size, self.eval_collate):
            yield to_device(batch, self.device)

    def micro_batches_per_epoch(self) -> int:
        return math.ceil(distributed.rows_per_rank(len(self.train_dataset)) / self.config.per_device_train_batch_size)

    def total_steps(self) -> int:
        return self.config.epochs * math.ceil(self.micro_batches_per_epoch() / self.config.gradient_accumulation_steps)

    def extra_state(self) -> dict:
        """Trainer-specific state saved in checkpoints (e.g. a score normalizer)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def save_model(self, path: str, dtype: torch.dtype | None = None) -> None:
        self.model.save_pretrained(path, dtype=dtype)  # sharded: every rank gathers, rank 0 writes
        if distributed.is_main():
            save_tokenizer(self.tokenizer, path)

    # ---- checkpoints ------------------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        cfg = self.config
        main, sharded = distributed.is_main(), distributed.is_distributed()
        with staged_checkpoint(cfg.output_dir, self.state.step) as tmp:
            self._write_checkpoint(tmp, main, sharded)
        if main:
            self._prune_checkpoints()
        distributed.barrier()
        return os.path.join(cfg.output_dir, f"checkpoint-{self.state.step}")

    def _write_checkpoint(self, tmp: str, main: bool, sharded: bool) -> None:
        cfg = self.config
        self.save_model(tmp)
        if sharded:  # model + optimizer shards (DCP): resumable on any number of processes
            distributed.save_sharded(os.path.join(tmp, distributed.SHARDED_DIR),
                                     {"model": (self.model, self.optimizer)})
        fingerprint = self.data_fingerprint()
        if main:
            torch.save({
                "optimizer": None if sharded else self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "state": dataclasses.asdict(self.state),
                "rng": rng_state(),
                "extra": self.extra_state(),
                "config": dataclasses.asdict(cfg),
                **({"world_size": distributed.world_size()} if sharded else {}),
            }, os.path.join(tmp, STATE_FILE))
            with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
                json.dump({**dataclasses.asdict(self.state), "total_steps": self.total_steps()}, f, indent=2)
            write_run_info(tmp, cfg, fingerprint)

    def _prune_checkpoints(self) -> None:
        prune_checkpoints(self.config.output_dir, self.config.save_total_limit)

    def _load_checkpoint(self, path: str) -> None:
        blob = load_state(path)
        shards = os.path.join(path, distributed.SHARDED_DIR)
        if os.path.isdir(shards):  # saved under torchrun: DCP reshards to this world size
            distributed.load_sharded(shards, {"model": (self.model, self.optimizer)})
        elif distributed.is_sharded(self.model):  # a single-process checkpoint resumed under torchrun
            distributed.load_full_optimizer_state(self.model, self.optimizer, blob["optimizer"])
        else:
            self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        self.state = TrainState(**blob["state"])
        self.load_extra_state(blob.get("extra", {}))
        set_rng_state(blob["rng"])

    # ---- loop -------------------------------------------------------------------------------------------
    def _log_eval(self, logger: MetricsLogger) -> dict:
        if not self.config.need_eval or self.eval_dataset is None:
            return {}
        self.model.eval()
        metrics = self.evaluate()
        self.model.train()
        logger.log(metrics, self.state.step)
        if metrics and distributed.is_main():
            print("eval @ step {}: {}".format(self.state.step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())))
        return metrics

    def train(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.config
        total = self.total_steps()
        n_micro = self.micro_batches_per_epoch()
        accum = cfg.gradient_accumulation_steps
        self.optimizer = torch.optim.AdamW(optimizer_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                           betas=tuple(cfg.adam_betas), eps=1e-8)
        warmup = int(cfg.lr_warmup_ratio * total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           schedule_lambda(cfg.lr_scheduler_type, warmup, total,
                                                                           cfg.lr))
        main = distributed.is_main()
        if self.resume_from:
            self._load_checkpoint(self.resume_from)
            distributed.print0(f"resuming from {self.resume_from} (step {self.state.step} of {total})")
        logger = open_run_logger(cfg, self.state.step if self.resume_from else None)
        last_eval: dict = {}
        signals = StopSignals()
        try:
            signals.install()
            if self.state.step == 0 and not self.resume_from:
                last_eval = self._log_eval(logger)
            self.model.train()
            bar = tqdm(total=total, initial=self.state.step, desc=f"{cfg.command} (epoch {self.state.epoch + 1})",
                       disable=not cfg.progress or not main, dynamic_ncols=True)
            t0 = time.perf_counter()
            stopped = False
            for epoch in range(self.state.epoch, cfg.epochs):
                bar.set_description(f"{cfg.command} (epoch {epoch + 1}/{cfg.epochs})")
                order = rank_epoch_order(len(self.train_dataset), cfg.seed, epoch)
                start = self.state.micro if epoch == self.state.epoch else 0
                sums: dict[str, float] = {}
                count = 0
                for mi in range(start, n_micro):
                    idx = order[mi * cfg.per_device_train_batch_size:(mi + 1) * cfg.per_device_train_batch_size]
                    batch = to_device(self.collate([self.train_dataset[i] for i in idx]), self.device)
                    with self.autocast():
                        loss, metrics = self.loss(batch)
                    self._guard(loss.detach(), "loss", epoch, mi)
                    # Sharded: every backward reduce-scatters its gradients into the sharded accumulators (as ZeRO-3
                    # does), so full-size gradients never pile up over the accumulation steps.
                    boundary = (mi + 1) % accum == 0 or mi == n_micro - 1
                    (loss / accum).backward()
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    count += 1
                    if not boundary:
                        continue
                    grad_norm = distributed.to_local(clip_gradients(self.model.parameters(), cfg.max_grad_norm))
                    self._guard(grad_norm, "gradient norm", epoch, mi)
                    self.optimizer.step()
                    self.scheduler.step()
                    lr = self.optimizer.param_groups[0]["lr"]  # after the schedule's step, as the reference logs it
                    self.optimizer.zero_grad(set_to_none=True)
                    self.state = TrainState(self.state.step + 1, epoch, mi + 1)
                    if mi + 1 == n_micro:
                        self.state = TrainState(self.state.step, epoch + 1, 0)
                    step = self.state.step
                    train_metrics = {f"train/{k}": v / count for k, v in sums.items()}
                    train_metrics.update({"train/lr": lr, "train/grad_norm": float(grad_norm), "train/epoch":
                                          epoch + (mi + 1) / n_micro})
                    sums, count = {}, 0
                    train_metrics = distributed.reduce_metrics(train_metrics)
                    if step % cfg.logging_steps == 0 or step == total:
                        logger.log(train_metrics, step)
                    bar.update(1)
                    bar.set_postfix(loss=f"{train_metrics.get('train/loss', float('nan')):.4f}")
                    if cfg.need_eval and cfg.eval_strategy == "steps" and step % cfg.eval_interval == 0:
                        last_eval = self._log_eval(logger)
                    stop_if_signalled(signals, step, total, self.save_checkpoint)
                    if checkpoint_or_stop(cfg, step, total, self.save_checkpoint):
                        stopped = True
                        break
                if stopped:
                    break
                if cfg.need_eval and cfg.eval_strategy == "epoch":
                    last_eval = self._log_eval(logger)
                if epoch + 1 < cfg.epochs:
                    self.save_checkpoint()
            signals.restore()
            bar.close()
            elapsed = time.perf_counter() - t0
            if stopped:
                distributed.print0(f"stopped after step {self.state.step} of {total} (--max_steps); continue with "
                                   "--resume")
                return {"stopped_at": self.state.step, **last_eval}
            tmp = os.path.join(cfg.output_dir, ".final.tmp")
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            distributed.barrier()
            self.save_model(tmp, dtype=final_dtype(cfg))
            summary = {"steps": self.state.step, "train_seconds": round(elapsed, 2), **last_eval}
            if main:
                replace_dir_contents(tmp, cfg.output_dir)
                with open(os.path.join(cfg.output_dir, "results.json"), "w", encoding="utf-8") as f:
                    json.dump(summary, f, indent=2)
                print(f"model saved to {cfg.output_dir} ({self.state.step} steps, {elapsed:.1f} s)")
            distributed.barrier()
            return summary
        finally:
            signals.restore()
            logger.close()

    def _guard(self, x: torch.Tensor, what: str, epoch: int, micro: int) -> None:
        """Stop (``NonFiniteError``, gradients cleared) unless ``x`` is finite: before any optimizer step."""
        where = (f"optimizer step {self.state.step + 1} of {self.total_steps()} (epoch {epoch + 1}, micro-batch "
                 f"{micro + 1})")
        try:
            check_finite(x, what, where, self.config.output_dir, NONFINITE_HINT)
        except NonFiniteError:
            self.optimizer.zero_grad(set_to_none=True)
            raise
