"""The run every training command shares: epochs of steps over the training rows, evaluation, progress, metrics,
signals, atomic checkpoints, exact resume and the final save.

A command (``Trainer`` for SFT / RM / CM / DPO, ``PPOTrainer`` for the PPO family) says what one *step* is and what
it trains; :class:`RunCore` does the rest:

* Data order: epoch ``e`` visits this rank's rows in ``rank_epoch_order(n, seed, e)`` order (one process:
  ``torch.randperm(n, generator=seeded(seed + e))``, what a one-replica ``DistributedSampler(shuffle=True, seed)``
  gives after ``set_epoch(e)``); step ``u`` of the epoch takes rows ``[u * R, (u + 1) * R)`` of it, ``R =
  rows_per_step()`` (SFT: micro-batch size x accumulation steps; PPO: the prompt batch), the last step of an epoch
  possibly fewer.  The position (step, epoch, index of the next step in that epoch) is all a resume needs.
* Every trained model is a :class:`Trained` (name, model, optimizer, schedule): checkpoints save and restore their
  optimizer and schedule states (DCP shards under torchrun, resumable on any number of processes).
* A checkpoint ``OUTPUT_DIR/checkpoint-<step>/`` holds the models (Hugging Face folders), ``trainer_state.pt``
  (position, optimizers, schedules, the command's own state, RNG states, the config), ``trainer_state.json``
  and ``run.json``; it is staged in a temporary folder, fsync'd and renamed into place.  ``--resume`` reloads all of
  it and continues to bit-identical final weights.
* ``--save_interval`` / ``--max_steps`` checkpoint between steps; SIGINT / SIGTERM save a checkpoint at the next
  step boundary and stop; non-finite numbers stop the run before any weight moves (``NonFiniteError``).
* Outputs appear in OUTPUT_DIR only once data and models have loaded, so bad input leaves nothing behind; the final
  models are staged in ``.final.tmp`` and moved into place file by file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import torch

from .. import distributed
from ..runtime import apply_tf32, resolve_device, rng_state, seed_everything, set_rng_state
from .base import (
    checkpoint_or_stop,
    open_run_logger,
    prune_checkpoints,
    rank_epoch_order,
    replace_dir_contents,
    stop_if_signalled,
    warn_single_process_flags,
)
from .safety import STATE_FILE, StopSignals, data_fingerprint, load_state, staged_checkpoint, write_run_info


@dataclass
class Trained:
    """A trained model with its optimizer and learning-rate schedule; ``name`` names its DCP shard group."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


class RunCore:
    """Subclasses implement ``rows_per_step``, ``train_step``, ``trained``, ``write_models`` and may override the
    hooks below (``prepare``, ``evaluate``, ``state_dict`` / ``load_state_dict``, ``summary``, ...)."""

    step_name = "step"  # what a step is called in messages ("rollout step" for the PPO family)

    def __init__(self, config):
        self.config = cfg = config
        distributed.init(cfg.device)
        warn_single_process_flags(cfg)
        self.device = resolve_device(cfg.device)
        apply_tf32(cfg.tf32)
        seed_everything(cfg.seed)
        self.step = 0  # steps done
        self.epoch = 0  # epoch of the next step
        self.index = 0  # index of the next step in that epoch
        self.train_dataset = self.eval_dataset = None
        self._fingerprint: str | None = None

    # ---- what a command implements --------------------------------------------------------------------------
    def rows_per_step(self) -> int:
        raise NotImplementedError

    def train_step(self, rows: list[int]) -> list[tuple[int, dict]]:
        """Train on the dataset rows ``rows``; returns the (log step, metrics) rows to log."""
        raise NotImplementedError

    def trained(self) -> list[Trained]:
        raise NotImplementedError

    def write_models(self, folder: str, dtype: torch.dtype | None = None, final: bool = False) -> None:
        """Save the models (Hugging Face folders) and tokenizer into ``folder`` (every rank calls it): a checkpoint's
        layout, or with ``final`` the run's output layout, in ``dtype`` (None: as trained)."""
        raise NotImplementedError

    def fingerprinted(self) -> tuple:
        """The datasets whose tokenized rows a resume must find unchanged."""
        return (self.train_dataset,)

    def prepare(self) -> None:
        """Called once before the first step (e.g. to build optimizers once the step count is known)."""

    def evaluate(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        """The command's own state saved in checkpoints (every rank calls it)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def log_step(self) -> int:
        """The metrics step evaluation rows are logged at."""
        return self.step

    def progress_postfix(self, logged: list[tuple[int, dict]]) -> dict:
        return {}

    def summary(self) -> dict:
        """Extra entries of results.json."""
        return {}

    def replaced_folders(self) -> list[str]:
        """Sub-folders of OUTPUT_DIR that the final save replaces whole."""
        return []

    # ---- counting -------------------------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return math.ceil(distributed.rows_per_rank(len(self.train_dataset)) / self.rows_per_step())

    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch()

    def position(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "index": self.index}

    def data_fingerprint(self) -> str:
        """Hash of the tokenized rows (saved in checkpoints; a resume on other data is refused)."""
        if self._fingerprint is None:
            self._fingerprint = data_fingerprint(*self.fingerprinted())
        return self._fingerprint

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        cfg = self.config
        main = distributed.is_main()
        with staged_checkpoint(cfg.output_dir, self.step) as tmp:
            self._write_checkpoint(tmp, main)
        if main:
            prune_checkpoints(cfg.output_dir, cfg.save_total_limit)
        distributed.barrier()
        return os.path.join(cfg.output_dir, f"checkpoint-{self.step}")

    def _write_checkpoint(self, tmp: str, main: bool) -> None:
        sharded = distributed.is_distributed()
        self.write_models(tmp)  # consolidated Hugging Face export (rank 0 writes)
        if sharded:  # model + optimizer shards (DCP): resumable on any number of processes
            distributed.save_sharded(os.path.join(tmp, distributed.SHARDED_DIR), self._sharded_items())
        state = {
            "position": self.position(),
            "optimizers": {t.name: None if sharded else t.optimizer.state_dict() for t in self.trained()},
            "schedulers": {t.name: t.scheduler.state_dict() for t in self.trained()},
            **self.state_dict(),
            "rng": rng_state(),
            "config": dataclasses.asdict(self.config),
            # Every rank's RNG states: the ranks draw different amounts (LoRA dropout on micro-batches trimmed to
            # their own longest response, ...), so rank 0's states would not continue the other ranks' streams.
            **({"world_size": distributed.world_size(), "rng_ranks": distributed.all_gather_object(rng_state())}
               if sharded else {}),
        }
        fingerprint = self.data_fingerprint()
        if main:
            torch.save(state, os.path.join(tmp, STATE_FILE))
            with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
                json.dump({**self.position(), "total_steps": self.total_steps(), **self.summary()}, f, indent=2)
            write_run_info(tmp, self.config, fingerprint)

    def _sharded_items(self) -> dict:
        return {t.name: (t.model, t.optimizer) for t in self.trained()}

    def load_checkpoint(self, path: str) -> None:
        blob = load_state(path)
        shards = os.path.join(path, distributed.SHARDED_DIR)
        trained = self.trained()
        if os.path.isdir(shards):  # saved under torchrun: DCP reshards to this world size (one process included)
            distributed.load_sharded(shards, self._sharded_items())
        elif trained and distributed.is_sharded(trained[0].model):  # a single-process checkpoint under torchrun
            for t in trained:
                distributed.load_full_optimizer_state(t.model, t.optimizer, blob["optimizers"][t.name])
        else:
            for t in trained:
                t.optimizer.load_state_dict(blob["optimizers"][t.name])
        for t in trained:
            t.scheduler.load_state_dict(blob["schedulers"][t.name])
        pos = blob["position"]
        self.step, self.epoch, self.index = pos["step"], pos["epoch"], pos["index"]
        self.load_state_dict(blob)
        set_rng_state(self._own_rng_state(blob))

    @staticmethod
    def _own_rng_state(blob: dict) -> dict:
        """This rank's RNG states of a checkpoint: its own when saved on as many ranks as now run (an exact resume),
        else rank 0's (another world size sees other data per rank anyway)."""
        ranks = blob.get("rng_ranks")
        if ranks is not None and len(ranks) == distributed.world_size():
            return ranks[distributed.rank()]
        return blob["rng"]

    def autocast(self):
        """``--bf16`` / ``--fp16``: the forward passes under torch autocast (weights and optimizer state stay fp32)."""
        cfg = self.config
        if cfg.bf16 or cfg.fp16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16 if cfg.bf16 else torch.float16)
        return contextlib.nullcontext()

    def zero_grads(self) -> None:
        for t in self.trained():
            t.optimizer.zero_grad(set_to_none=True)

    # ---- the run --------------------------------------------------------------------------------------------
    def _log_eval(self, logger) -> dict:
        if not self.config.need_eval or self.eval_dataset is None:
            return {}
        metrics = self.evaluate()
        logger.log(metrics, self.log_step())
        if metrics:
            distributed.print0(f"eval @ {self.step_name} {self.step}: " +
                               ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    def train(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.config
        self.prepare()
        total = self.total_steps()
        if self.resume_from:
            self.load_checkpoint(self.resume_from)
            distributed.print0(f"resuming from {self.resume_from} ({self.step_name} {self.step} of {total})")
        logger = open_run_logger(cfg, self.log_step() if self.resume_from else None)
        last_eval: dict = {}
        signals = StopSignals()
        try:
            signals.install()
            if self.step == 0 and not self.resume_from:
                last_eval = self._log_eval(logger)
            bar = tqdm(total=total, initial=self.step, desc=cfg.command,
                       disable=not cfg.progress or not distributed.is_main(), dynamic_ncols=True)
            t0 = time.perf_counter()
            stopped = False
            size, per_epoch = self.rows_per_step(), self.steps_per_epoch()
            for epoch in range(self.epoch, cfg.epochs):
                bar.set_description(f"{cfg.command} (epoch {epoch + 1}/{cfg.epochs})")
                order = rank_epoch_order(len(self.train_dataset), cfg.seed, epoch)
                for index in range(self.index if epoch == self.epoch else 0, per_epoch):
                    self.epoch, self.index = epoch, index
                    logged = self.train_step(order[index * size:(index + 1) * size])
                    self.step += 1
                    self.epoch, self.index = (epoch + 1, 0) if index + 1 == per_epoch else (epoch, index + 1)
                    for step, metrics in logged:
                        logger.log(metrics, step)
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in self.progress_postfix(logged).items()})
                    if cfg.need_eval and cfg.eval_strategy == "steps" and self.step % cfg.eval_interval == 0:
                        last_eval = self._log_eval(logger)
                    stop_if_signalled(signals, self.step, total, self.save_checkpoint)
                    if checkpoint_or_stop(cfg, self.step, total, self.save_checkpoint):
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
                distributed.print0(f"stopped after {self.step_name} {self.step} of {total} (--max_steps); continue "
                                   "with --resume")
                return {"stopped_at": self.step, **last_eval}
            return self._save_final(elapsed, last_eval)
        finally:
            signals.restore()
            logger.close()

    def _save_final(self, elapsed: float, last_eval: dict) -> dict:
        from .base import final_dtype

        cfg = self.config
        main = distributed.is_main()
        tmp = os.path.join(cfg.output_dir, ".final.tmp")
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier()
        self.write_models(tmp, dtype=final_dtype(cfg), final=True)
        summary = {"steps": self.step, **self.summary(), "train_seconds": round(elapsed, 2), **last_eval}
        if main:
            for name in self.replaced_folders():
                shutil.rmtree(os.path.join(cfg.output_dir, name), ignore_errors=True)
            replace_dir_contents(tmp, cfg.output_dir)
            with open(os.path.join(cfg.output_dir, "results.json"), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
        distributed.barrier()
        distributed.print0(f"saved to {cfg.output_dir} ({self.step} {self.step_name}s, {elapsed:.1f} s)")
        return summary
