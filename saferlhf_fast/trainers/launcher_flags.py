"""Flags of the reference implementation's launcher and DeepSpeed set-up, accepted by every configured command so
that its scripts run with only the launcher line changed (``deepspeed ... --module safe_rlhf.X`` ->
``saferlhf-fast X``).

They have no field of their own: sharding here is FSDP2 under torchrun, so each is either what the launcher passes
(``--local_rank``) or a DeepSpeed setting whose FSDP2 equivalent is fixed; each one given prints one line saying
what it maps to (docs/upstream.md has the whole table, flag by flag).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Callable


def _zero_stage(value) -> str:
    return (f"--zero_stage {value}: under torchrun every trained model is sharded with FSDP2 (parameters, gradients "
            "and optimizer state, as ZeRO-3) whatever the stage; a single process shards nothing")


def _offload(value) -> str:
    return f"--offload {value}: no effect for this command (it trains nothing; FSDP2 CPU offload is a training flag)"


def _deepspeed(value) -> str:
    return f"--deepspeed {value}: ignored (no DeepSpeed engine here: sharding is FSDP2 under torchrun)"


def _deepspeed_config(value) -> str:
    return (f"--deepspeed_config {value}: ignored (the DeepSpeed JSON is not read; its settings are this command's "
            "own flags)")


@dataclass(frozen=True)
class LauncherFlag:
    name: str
    kwargs: dict
    note: Callable[[object], str | None]  # the line printed when the flag is given (None: silent)


LAUNCHER_FLAGS = (
    # The deepspeed launcher passes --local_rank to every process; torchrun's LOCAL_RANK is what is used.
    LauncherFlag("local_rank", {"type": int, "metavar": "N",
                                "help": "set by the DeepSpeed launcher; accepted and unused (the rank comes from "
                                        "torchrun's environment)"}, lambda v: None),
    LauncherFlag("zero_stage", {"type": int, "choices": [0, 1, 2, 3], "metavar": "STAGE",
                                "help": "DeepSpeed ZeRO stage: accepted; FSDP2 under torchrun shards as ZeRO-3"},
                 _zero_stage),
    LauncherFlag("offload", {"choices": ["none", "parameter", "optimizer", "all"],
                             "help": "DeepSpeed offload: accepted; no effect for this command"}, _offload),
    LauncherFlag("deepspeed", {"type": str, "nargs": "?", "const": "True", "metavar": "BOOL",
                               "help": "DeepSpeed switch: accepted and ignored"}, _deepspeed),
    LauncherFlag("deepspeed_config", {"metavar": "FILE", "help": "DeepSpeed JSON: accepted and ignored"},
                 _deepspeed_config),
)


def add_launcher_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """The launcher flags that ``cls`` does not have as fields of its own (e.g. training commands own
    ``--offload``)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    group = parser.add_argument_group("reference-implementation launcher flags (accepted for drop-in scripts)")
    for flag in LAUNCHER_FLAGS:
        if flag.name not in fields:
            group.add_argument("--" + flag.name, default=argparse.SUPPRESS, **flag.kwargs)


def launcher_notes(args: argparse.Namespace | dict, cls: type) -> list[str]:
    """The lines to print for the launcher flags given (and not fields of ``cls``), in flag order."""
    given = vars(args) if isinstance(args, argparse.Namespace) else args
    fields = {f.name for f in dataclasses.fields(cls)}
    notes = [flag.note(given[flag.name]) for flag in LAUNCHER_FLAGS if flag.name in given and flag.name not in fields]
    return [n for n in notes if n]


# Flags of the reference's Hugging Face Trainer entry point (safe_rlhf.finetune.huggingface, run by its
# scripts/sft-huggingface.sh): transformers.TrainingArguments that neither safe_rlhf.finetune nor ``sft`` has.
HF_TRAINER_FLAGS = ("datasets", "num_train_epochs", "evaluation_strategy", "save_strategy", "save_steps", "fsdp",
                    "fsdp_config", "model_max_length", "cache_dir", "optim", "warmup_ratio", "warmup_steps")


def hf_trainer_refusal(argv: list[str]) -> str | None:
    """The one-line error for ``sft`` given the Hugging Face Trainer entry point's flags (None: none given)."""
    given = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    flags = [f"--{name}" for name in HF_TRAINER_FLAGS if name in given]
    if not flags:
        return None
    return (f"{', '.join(flags)}: flags of the reference's Hugging Face Trainer entry point "
            "(safe_rlhf.finetune.huggingface, scripts/sft-huggingface.sh), which saferlhf-fast does not implement; "
            "use the flags of scripts/sft.sh (safe_rlhf.finetune): --train_datasets, --epochs, --lr_warmup_ratio, "
            "--zero_stage (docs/upstream.md)")
