"""The trainer of SFT, RM / CM and DPO: one trained model on supervised micro-batches, on the shared run
(:mod:`.core`).

* AdamW (betas 0.9 / 0.95) with weight decay on every parameter but biases and layer-norm weights (the reference
  implementation's grouping); the learning-rate schedule of ``--lr_scheduler_type`` with a linear warm-up over
  ``int(lr_warmup_ratio * total_steps)`` optimizer steps (the Hugging Face formulas).
* One step = one optimizer step over ``gradient_accumulation_steps`` micro-batches, each loss divided by that
  number; the last step of an epoch may hold fewer micro-batches.  Gradients are clipped to a global norm of
  ``max_grad_norm`` (1.0).
* Under ``torchrun`` (``saferlhf_fast.distributed``, docs/distributed.md): the model is sharded with FSDP2, each rank
  reads its ``DistributedSampler`` share of every epoch (the same permutation), gradients are averaged over ranks,
  metrics are reduced over ranks, rank 0 alone writes files.
"""
from __future__ import annotations

import math
import os

import torch
from torch.utils.data import Dataset

from .. import distributed
from ..data import DataError, load_tokenizer
from ..data.batching import batches, to_device
from ..data.tokenizer import save_tokenizer
from ..loading import check_vocab, load_model
from .base import (
    NONFINITE_HINT,
    collator_of,
    maybe_shard,
    optimizer_groups,
    resolve_resume,
    schedule_lambda,
    split_dataset,
)
from .config import ConfigError, TrainConfig
from .core import RunCore, Trained
from .modeling import attach_lora, hold_frozen_in_bf16, save_trained
from .safety import NonFiniteError, check_finite, clip_gradients


class Trainer(RunCore):
    """Subclasses set ``head`` and ``dataset_class`` (or override ``build_datasets``) and implement ``loss`` and
    ``evaluate``."""

    head = "lm"
    dataset_class = None  # the command's TokenizedDataset subclass (build_datasets' default)
    config: TrainConfig

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        cfg = self.config
        tok_path = cfg.tokenizer_name_or_path or cfg.model_name_or_path
        if not os.path.isdir(tok_path):
            raise ConfigError(f"--model_name_or_path {tok_path}: no such folder")
        self.tokenizer = load_tokenizer(tok_path, cfg.max_length)
        # Data first: a bad row fails here, before the model loads and before OUTPUT_DIR exists.
        self.train_dataset, self.eval_dataset = self.build_datasets()
        if len(self.train_dataset) == 0:
            raise DataError("no training rows")
        self.resume_from = resolve_resume(cfg, self.data_fingerprint)
        check_vocab(self.tokenizer, tok_path, "model_name_or_path", cfg.model_name_or_path)
        spec = cfg.lora_spec()
        # LoRA: the base is always the input model (frozen); a checkpoint holds the adapters only
        self.model = load_model(cfg.model_name_or_path if spec else self.resume_from or cfg.model_name_or_path,
                                self.head, cfg.attn_backend, self.device, cfg.backend)
        self.model = attach_lora(self.model, spec, "model_name_or_path", cfg.model_name_or_path, self.resume_from)
        hold_frozen_in_bf16(self.model, cfg)  # LoRA: the frozen base (full fine-tuning freezes nothing)
        if cfg.gradient_checkpointing:
            self.model.set_gradient_checkpointing(True)
        self.model = maybe_shard(self.model, cfg, trainable=True)
        self.collate = collator_of(self.train_dataset)
        self.eval_collate = collator_of(self.eval_dataset) if self.eval_dataset is not None else None
        self.optimizer = self.scheduler = None

    # ---- to implement -----------------------------------------------------------------------------------
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

    def extra_state(self) -> dict:
        """Trainer-specific state saved in checkpoints (e.g. a score normalizer)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # ---- pieces -----------------------------------------------------------------------------------------
    def split_eval(self, train: Dataset, eval_: Dataset | None):
        cfg = self.config
        if eval_ is None and cfg.eval_split_ratio:
            return split_dataset(train, cfg.eval_split_ratio, cfg.seed)
        return train, eval_

    def eval_batches(self):
        ds = self.eval_dataset
        for batch in batches(ds, list(range(len(ds))), self.config.per_device_eval_batch_size, self.eval_collate):
            yield to_device(batch, self.device)

    def micro_batches_per_epoch(self) -> int:
        return math.ceil(distributed.rows_per_rank(len(self.train_dataset)) / self.config.per_device_train_batch_size)

    def save_model(self, path: str, dtype: torch.dtype | None = None, final: bool = False) -> None:
        """The model folder (sharded: every rank gathers, rank 0 writes); with LoRA the adapters (PEFT format),
        merged into a plain checkpoint for the final save with ``--merge_lora``."""
        save_trained(self.model, path, dtype=dtype, merge=final and self.config.merge_lora)
        if distributed.is_main():
            save_tokenizer(self.tokenizer, path)

    # ---- the core's hooks -------------------------------------------------------------------------------
    def rows_per_step(self) -> int:
        return self.config.per_device_train_batch_size * self.config.gradient_accumulation_steps

    def trained(self) -> list[Trained]:
        return [Trained("model", self.model, self.optimizer, self.scheduler)]

    def write_models(self, folder: str, dtype: torch.dtype | None = None, final: bool = False) -> None:
        self.save_model(folder, dtype=dtype, final=final)

    def state_dict(self) -> dict:
        return {"extra": self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        self.load_extra_state(state.get("extra", {}))

    def prepare(self) -> None:
        cfg = self.config
        total = self.total_steps()
        self.optimizer = torch.optim.AdamW(optimizer_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                           betas=tuple(cfg.adam_betas), eps=1e-8)
        warmup = int(cfg.lr_warmup_ratio * total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, schedule_lambda(cfg.lr_scheduler_type, warmup, total, cfg.lr))
        self.model.train()

    def _log_eval(self, logger) -> dict:
        self.model.eval()
        try:
            return super()._log_eval(logger)
        finally:
            self.model.train()

    def progress_postfix(self, logged) -> dict:
        return {"loss": logged[-1][1].get("train/loss", float("nan"))} if logged else {}

    def train_step(self, rows: list[int]) -> list[tuple[int, dict]]:
        """One optimizer step over the micro-batches of ``rows``."""
        cfg = self.config
        size, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
        n_micro = self.micro_batches_per_epoch()
        first = self.index * accum  # index of the first micro-batch in the epoch
        sums: dict[str, float] = {}
        count = 0
        for k, start in enumerate(range(0, len(rows), size)):
            batch = to_device(self.collate([self.train_dataset[i] for i in rows[start:start + size]]), self.device)
            with self.autocast():
                loss, metrics = self.loss(batch)
            self._guard(loss.detach(), "loss", first + k)
            # Sharded: every backward reduce-scatters its gradients into the sharded accumulators (as ZeRO-3
            # does), so full-size gradients never pile up over the accumulation steps.
            (loss / accum).backward()
            for name, v in metrics.items():
                sums[name] = sums.get(name, 0.0) + float(v)
            count += 1
        last = first + count - 1
        grad_norm = distributed.to_local(clip_gradients(self.model.parameters(), cfg.max_grad_norm))
        self._guard(grad_norm, "gradient norm", last)
        self.optimizer.step()
        self.scheduler.step()
        lr = self.optimizer.param_groups[0]["lr"]  # after the schedule's step, as the reference logs it
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {f"train/{name}": v / count for name, v in sums.items()}
        metrics.update({"train/lr": lr, "train/grad_norm": float(grad_norm),
                        "train/epoch": self.epoch + (last + 1) / n_micro})
        metrics = distributed.reduce_metrics(metrics)
        step = self.step + 1
        return [(step, metrics)] if step % cfg.logging_steps == 0 or step == self.total_steps() else []

    def _guard(self, x: torch.Tensor, what: str, micro: int) -> None:
        """Stop (``NonFiniteError``, gradients cleared) unless ``x`` is finite: before any optimizer step."""
        where = (f"optimizer step {self.step + 1} of {self.total_steps()} (epoch {self.epoch + 1}, micro-batch "
                 f"{micro + 1})")
        try:
            check_finite(x, what, where, self.config.output_dir, NONFINITE_HINT)
        except NonFiniteError:
            self.optimizer.zero_grad(set_to_none=True)
            raise
