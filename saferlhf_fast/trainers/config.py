"""One dataclass per command, filled from flags or a YAML file (``--config FILE.yaml``; flags given on the command
line win over the file, the file wins over the defaults).  The command-line flags are generated from the
dataclass fields, so the flag names are the field names: the reference implementation's names."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..models.attention import BACKENDS as ATTN_BACKENDS
from ..options import (  # noqa: F401 - re-exported for the trainers
    ConfigError,
    add_config_arguments,
    check_choices,
    check_finite_numbers,
    config_from_args,
    float_options,
    load_yaml,
    option,
)

# The reference's --lr_scheduler_type choices (transformers' get_scheduler with its default arguments).
LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]


OVERWRITE_HELP = ("replace the outputs of a previous run in a non-empty OUTPUT_DIR (only what a run writes: "
                  "checkpoints, model files, metrics; other files are kept)")
ALLOW_CHANGES_HELP = ("--resume: settings that may differ from the checkpoint's (e.g. epochs,lr); data, seed, batch "
                      "sizes and the trained model never may")


@dataclass
class TrainConfig:
    """Options shared by every training command (defaults: the reference implementation's)."""

    model_name_or_path: str | None = option(None, "model folder (Hugging Face format) to start from", required=True)
    tokenizer_name_or_path: str | None = option(None, "tokenizer folder (default: the model folder)")
    max_length: int = option(512, "maximum sequence length (longer sequences are truncated)")
    trust_remote_code: bool = option(False, "accepted for compatibility (no remote code is ever run)")
    chat_template: str = option("reference", "prompt template: 'reference' (BEGINNING OF CONVERSATION: USER: ... "
                                         "ASSISTANT:) or 'tokenizer' (the tokenizer's own chat template, e.g. ChatML)",
                            choices=["reference", "tokenizer"])
    train_datasets: list[str] = option([], "NAME[:PROPORTION[:PATH]] ...", required=True)
    eval_datasets: list[str] | None = option(None, "NAME[:PROPORTION[:PATH]] ... evaluated during training")
    eval_split_ratio: float | None = option(None, "hold out this fraction of the training rows for evaluation")
    need_eval: bool = option(False, "evaluate during training (implied by --eval_datasets / --eval_split_ratio)")
    eval_strategy: str = option("epoch", "when to evaluate", choices=["epoch", "steps"])
    eval_interval: int = option(1000000, "evaluate every N optimizer steps (--eval_strategy steps)")
    epochs: int = option(1, "passes over the training data")
    per_device_train_batch_size: int = option(16, "micro-batch size")
    per_device_eval_batch_size: int = option(16, "evaluation batch size")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    lr: float = option(2e-5, "peak learning rate", aliases=("learning_rate",))
    lr_scheduler_type: str = option("cosine", "learning-rate schedule",
                                choices=LR_SCHEDULERS)
    lr_warmup_ratio: float = option(0.0, "fraction of the optimizer steps spent warming up linearly")
    weight_decay: float = option(0.0, "AdamW weight decay (not on biases and layer-norm weights)")
    adam_betas: list[float] = option([0.9, 0.95], "AdamW betas")
    max_grad_norm: float = option(1.0, "gradient clipping (global norm; 0: off)")
    seed: int = option(42, "random seed (data order, initialisation, sampling)")
    fp16: bool = option(False, "fp16 autocast")
    bf16: bool = option(False, "bf16 autocast (weights and optimizer state stay fp32)")
    tf32: bool | None = option(None, "allow TF32 matmuls on CUDA")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    attn_backend: str | None = option(None, "attention backend of the model (default: the model's choice)",
                                  choices=list(ATTN_BACKENDS))
    mixed_precision: str | None = option(None, "under torchrun: FSDP2 mixed precision (parameters gathered and computed "
                                           "in this dtype, gradients reduced in fp32)", choices=["bf16", "fp16"])
    offload: str = option("none", "under torchrun on GPUs: FSDP2 CPU offload of the sharded parameters, gradients and "
                              "optimizer state (FSDP2 offloads them together: every choice but 'none' is the same)",
                      choices=["none", "parameter", "optimizer", "all"])
    shard_frozen: bool = option(True, "under torchrun: shard the frozen models (e.g. DPO's reference) with FSDP2 too "
                                  "(False: a full replica on every rank)")
    output_dir: str | None = option(None, "where the final model, checkpoints and metrics go", required=True)
    save_16bit: bool = option(False, "save the final model in 16 bits (bf16 with --bf16, else fp16); checkpoints stay "
                                 "fp32")
    overwrite_output_dir: bool = option(False, OVERWRITE_HELP)
    log_type: str = option("none", "extra metrics sink besides metrics.jsonl", choices=["none", "tensorboard", "wandb"])
    log_dir: str | None = option(None, "TensorBoard / W&B directory (default: OUTPUT_DIR/logs)")
    log_project: str | None = option(None, "W&B project")
    log_run_name: str | None = option(None, "W&B run name")
    logging_steps: int = option(1, "write train metrics every N optimizer steps")
    save_interval: int = option(0, "also checkpoint every N optimizer steps (0: only at the end of each epoch)")
    save_total_limit: int = option(2, "checkpoints kept (oldest removed)")
    resume: str | None = option(None, "continue from a checkpoint folder, or 'auto': the latest in OUTPUT_DIR",
                            nargs="?", const="auto")
    resume_allow_changes: list[str] | None = option(None, ALLOW_CHANGES_HELP)
    max_steps: int | None = option(None, "stop after this many optimizer steps (a checkpoint is written); the "
                                     "schedule still spans all epochs, so --resume finishes the same run")
    progress: bool = option(True, "show progress bars")

    @property
    def command(self) -> str:
        return "train"

    def validate(self) -> None:
        missing = [f.name for f in dataclasses.fields(self) if f.metadata.get("required") and not getattr(self, f.name)]
        if missing:
            raise ConfigError("missing required option(s): " + ", ".join("--" + m for m in missing))
        check_common(self)
        for name in ("epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "max_length", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.lr_warmup_ratio <= 1.0:
            raise ConfigError(f"--lr_warmup_ratio must be in [0, 1], got {self.lr_warmup_ratio}")
        if self.eval_split_ratio is not None and not 0.0 < self.eval_split_ratio < 1.0:
            raise ConfigError(f"--eval_split_ratio must be in (0, 1), got {self.eval_split_ratio}")
        if self.fp16 and self.bf16:
            raise ConfigError("--fp16 and --bf16 are exclusive")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"--adam_betas takes two numbers, got {self.adam_betas}")
        if self.eval_datasets or self.eval_split_ratio:
            self.need_eval = True


def check_common(cfg) -> None:
    """The value checks every training command shares (one line each, exit status 2)."""
    check_finite_numbers(cfg)
    for name, value in float_options(cfg):
        if (name == "lr" or name.endswith(("_lr", "weight_decay", "max_grad_norm"))) and value < 0:
            raise ConfigError(f"--{name} must be >= 0, got {value}" +
                              (" (0 turns clipping off)" if name == "max_grad_norm" else ""))
    if not all(0.0 <= b < 1.0 for b in cfg.adam_betas):
        raise ConfigError(f"--adam_betas must both be in [0, 1), got {cfg.adam_betas}")
    for name, low in (("eval_interval", 1), ("save_interval", 0), ("save_total_limit", 0)):
        if getattr(cfg, name) < low:
            raise ConfigError(f"--{name} must be >= {low}, got {getattr(cfg, name)}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError(f"--max_steps must be >= 1, got {cfg.max_steps}")
    if cfg.overwrite_output_dir and cfg.resume:
        raise ConfigError("--overwrite_output_dir and --resume are exclusive (one replaces the run, the other "
                          "continues it)")
    _check_allow_changes(cfg)


def _check_allow_changes(cfg) -> None:
    names = [n for item in cfg.resume_allow_changes or [] for n in str(item).split(",") if n]
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = [n for n in names if n.lstrip("-") not in fields]
    if unknown:
        raise ConfigError(f"--resume_allow_changes: unknown option(s) {', '.join(unknown)}")
    cfg.resume_allow_changes = [n.lstrip("-") for n in names] or None


