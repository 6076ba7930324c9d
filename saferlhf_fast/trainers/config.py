"""One dataclass per command, filled from flags or a YAML file (``--config FILE.yaml``; flags given on the command
line win over the file, the file wins over the defaults).  The command-line flags are generated from the
dataclass fields, so the flag names are the field names: the reference implementation's names."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field

from ..models.attention import BACKENDS as ATTN_BACKENDS

# The reference's --lr_scheduler_type choices (transformers' get_scheduler with its default arguments).
LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]


class ConfigError(ValueError):
    """Bad configuration (unknown YAML key, missing required flag, bad value): one line, exit status 2."""


def _f(default, help: str, **meta):  # noqa: A002
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


OVERWRITE_HELP = ("replace the outputs of a previous run in a non-empty OUTPUT_DIR (only what a run writes: "
                  "checkpoints, model files, metrics; other files are kept)")
ALLOW_CHANGES_HELP = ("--resume: settings that may differ from the checkpoint's (e.g. epochs,lr); data, seed, batch "
                      "sizes and the trained model never may")


@dataclass
class TrainConfig:
    """Options shared by every training command (defaults: the reference implementation's)."""

    model_name_or_path: str | None = _f(None, "model folder (Hugging Face format) to start from", required=True)
    tokenizer_name_or_path: str | None = _f(None, "tokenizer folder (default: the model folder)")
    max_length: int = _f(512, "maximum sequence length (longer sequences are truncated)")
    trust_remote_code: bool = _f(False, "accepted for compatibility (no remote code is ever run)")
    chat_template: str = _f("reference", "prompt template: 'reference' (BEGINNING OF CONVERSATION: USER: ... "
                                         "ASSISTANT:) or 'tokenizer' (the tokenizer's own chat template, e.g. ChatML)",
                            choices=["reference", "tokenizer"])
    train_datasets: list[str] = _f([], "NAME[:PROPORTION[:PATH]] ...", required=True)
    eval_datasets: list[str] | None = _f(None, "NAME[:PROPORTION[:PATH]] ... evaluated during training")
    eval_split_ratio: float | None = _f(None, "hold out this fraction of the training rows for evaluation")
    need_eval: bool = _f(False, "evaluate during training (implied by --eval_datasets / --eval_split_ratio)")
    eval_strategy: str = _f("epoch", "when to evaluate", choices=["epoch", "steps"])
    eval_interval: int = _f(1000000, "evaluate every N optimizer steps (--eval_strategy steps)")
    epochs: int = _f(1, "passes over the training data")
    per_device_train_batch_size: int = _f(16, "micro-batch size")
    per_device_eval_batch_size: int = _f(16, "evaluation batch size")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    lr: float = _f(2e-5, "peak learning rate", aliases=("learning_rate",))
    lr_scheduler_type: str = _f("cosine", "learning-rate schedule",
                                choices=LR_SCHEDULERS)
    lr_warmup_ratio: float = _f(0.0, "fraction of the optimizer steps spent warming up linearly")
    weight_decay: float = _f(0.0, "AdamW weight decay (not on biases and layer-norm weights)")
    adam_betas: list[float] = _f([0.9, 0.95], "AdamW betas")
    max_grad_norm: float = _f(1.0, "gradient clipping (global norm; 0: off)")
    seed: int = _f(42, "random seed (data order, initialisation, sampling)")
    fp16: bool = _f(False, "fp16 autocast")
    bf16: bool = _f(False, "bf16 autocast (weights and optimizer state stay fp32)")
    tf32: bool | None = _f(None, "allow TF32 matmuls on CUDA")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")
    attn_backend: str | None = _f(None, "attention backend of the model (default: the model's choice)",
                                  choices=list(ATTN_BACKENDS))
    mixed_precision: str | None = _f(None, "under torchrun: FSDP2 mixed precision (parameters gathered and computed "
                                           "in this dtype, gradients reduced in fp32)", choices=["bf16", "fp16"])
    offload: str = _f("none", "under torchrun on GPUs: FSDP2 CPU offload of the sharded parameters, gradients and "
                              "optimizer state (FSDP2 offloads them together: every choice but 'none' is the same)",
                      choices=["none", "parameter", "optimizer", "all"])
    shard_frozen: bool = _f(True, "under torchrun: shard the frozen models (e.g. DPO's reference) with FSDP2 too "
                                  "(False: a full replica on every rank)")
    output_dir: str | None = _f(None, "where the final model, checkpoints and metrics go", required=True)
    save_16bit: bool = _f(False, "save the final model in 16 bits (bf16 with --bf16, else fp16); checkpoints stay "
                                 "fp32")
    overwrite_output_dir: bool = _f(False, OVERWRITE_HELP)
    log_type: str = _f("none", "extra metrics sink besides metrics.jsonl", choices=["none", "tensorboard", "wandb"])
    log_dir: str | None = _f(None, "TensorBoard / W&B directory (default: OUTPUT_DIR/logs)")
    log_project: str | None = _f(None, "W&B project")
    log_run_name: str | None = _f(None, "W&B run name")
    logging_steps: int = _f(1, "write train metrics every N optimizer steps")
    save_interval: int = _f(0, "also checkpoint every N optimizer steps (0: only at the end of each epoch)")
    save_total_limit: int = _f(2, "checkpoints kept (oldest removed)")
    resume: str | None = _f(None, "continue from a checkpoint folder, or 'auto': the latest in OUTPUT_DIR",
                            nargs="?", const="auto")
    resume_allow_changes: list[str] | None = _f(None, ALLOW_CHANGES_HELP)
    max_steps: int | None = _f(None, "stop after this many optimizer steps (a checkpoint is written); the "
                                     "schedule still spans all epochs, so --resume finishes the same run")
    progress: bool = _f(True, "show progress bars")

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


def _floats(cfg):
    """(name, value) of every float option (each element of a float list)."""
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        tp, is_list = _base_type(hints[f.name])
        value = getattr(cfg, f.name)
        if tp is float and value is not None:
            yield from ((f.name, v) for v in (value if is_list else [value]))


def check_finite_numbers(cfg) -> None:
    """Every float option of every command is a finite number."""
    for name, value in _floats(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"--{name} must be a finite number, got {value}")


def check_common(cfg) -> None:
    """The value checks every training command shares (one line each, exit status 2)."""
    check_finite_numbers(cfg)
    for name, value in _floats(cfg):
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


# ------------------------------------------------------------------------------------------------ argparse
def _str2bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _base_type(tp):
    """(python type, is_list) of a field annotation such as ``int``, ``str | None``, ``list[str] | None``."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (list, typing.List):
        return args[0], True
    if args and origin is not None:  # Optional / Union
        return _base_type(args[0])
    return tp, False


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field, ``--name``; booleans accept ``--flag`` and ``--flag True/False``.  Defaults are
    suppressed so that only the flags actually given override the YAML file."""
    hints = _hints(cls)
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE.yaml",
                        help="YAML file of options (keys: the flag names); flags given here win")
    for f in dataclasses.fields(cls):
        tp, is_list = _base_type(hints[f.name])
        kw = {"default": argparse.SUPPRESS, "help": f.metadata.get("help", ""), "dest": f.name}
        aliases = f.metadata.get("aliases", ())
        if aliases:
            kw["help"] += " (also " + ", ".join("--" + a for a in aliases) + ")"
        if f.default is not dataclasses.MISSING and f.default is not None:
            kw["help"] += f" (default: {f.default})"
        elif f.default_factory is not dataclasses.MISSING and f.default_factory():
            kw["help"] += f" (default: {' '.join(map(str, f.default_factory()))})"
        if tp is bool:
            kw.update(type=_str2bool, nargs="?", const=True, metavar="BOOL")
        else:
            kw["type"] = tp
            if is_list:
                kw["nargs"] = "+"
            if "nargs" in f.metadata:
                kw["nargs"] = f.metadata["nargs"]
                kw["const"] = f.metadata.get("const")
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        parser.add_argument("--" + f.name, *("--" + a for a in aliases), **kw)


def _coerce(cls, name: str, value, source: str):
    tp, is_list = _base_type(_hints(cls)[name])
    if value is None:
        return None
    try:
        if is_list:
            values = value if isinstance(value, list) else [value]
            return [tp(v) for v in values]
        if tp is bool:
            return value if isinstance(value, bool) else _str2bool(value)
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return tp(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ConfigError(f"{source}: option '{name}': expected {tp.__name__}{' list' if is_list else ''}, "
                          f"got {value!r}") from None


def load_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset {e.start} "
                          "(save the file as UTF-8)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    return data


def config_from_args(cls: type, args: argparse.Namespace | dict):
    """defaults < YAML (``config``) < given flags."""
    given = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    given.pop("func", None)
    given.pop("command", None)
    names = {f.name for f in dataclasses.fields(cls)}
    aliases = {a: f.name for f in dataclasses.fields(cls) for a in f.metadata.get("aliases", ())}
    values: dict = {}
    path = given.pop("config", None)
    if path:
        for key, value in load_yaml(path).items():
            key = str(key).lstrip("-").replace("-", "_")
            key = aliases.get(key, key)
            if key not in names:
                raise ConfigError(f"{path}: unknown option '{key}'")
            values[key] = _coerce(cls, key, value, path)
    for key, value in given.items():
        if key in names:
            values[key] = value
    cfg = cls(**values)
    check_choices(cfg)
    cfg.validate()
    return cfg


def check_choices(cfg) -> None:
    """Every option with a fixed set of values (``choices``) holds one of them (flags and YAML alike)."""
    for f in dataclasses.fields(cfg):
        choices, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if choices is None or value is None:
            continue
        bad = [v for v in (value if isinstance(value, list) else [value]) if v not in choices]
        if bad:
            raise ConfigError(f"--{f.name} {bad[0]!r}: expected one of {', '.join(map(str, choices))}")
