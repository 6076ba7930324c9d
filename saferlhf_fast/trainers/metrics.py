"""Metrics sinks: ``metrics.jsonl`` always; TensorBoard or W&B when asked (imported lazily)."""
from __future__ import annotations

import json
import math
import os

from .config import ConfigError

_LOG_EXTRA = "(the 'log' extra: pip install 'saferlhf-fast[log]')"


def _clean(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a blank or partial one."""
    try:
        return int(json.loads(line).get("step", 0)) if line.endswith("\n") else None
    except (ValueError, AttributeError):
        return None


class MetricsLogger:
    """``log({"train/loss": 0.69, ...}, step)`` appends ``{"step": step, ...}`` to ``OUTPUT_DIR/metrics.jsonl``."""

    def __init__(self, output_dir: str, log_type: str = "none", log_dir: str | None = None,
                 project: str | None = None, run_name: str | None = None, config: dict | None = None,
                 resume_step: int | None = None):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            self._truncate_after(resume_step)
        self._file = open(self.path, "a" if resume_step is not None else "w", encoding="utf-8")  # fresh: empty
        self._tb = self._wandb = None
        log_dir = log_dir or os.path.join(output_dir, "logs")
        if log_type == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(f"--log_type tensorboard needs the 'tensorboard' package {_LOG_EXTRA}") from None
            self._tb = SummaryWriter(log_dir=log_dir)
        elif log_type == "wandb":
            try:
                import wandb
            except ImportError:
                raise ConfigError(f"--log_type wandb needs the 'wandb' package {_LOG_EXTRA}") from None
            os.makedirs(log_dir, exist_ok=True)
            self._wandb = wandb.init(project=project, name=run_name, dir=log_dir, config=config)

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint (a line cut short by a kill is dropped too); the
        shortened file replaces the old one atomically."""
        with open(self.path, encoding="utf-8") as f:
            keep = [ln for ln in f if _step_of(ln) is not None and _step_of(ln) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def log(self, metrics: dict, step: int) -> None:
        if not metrics:
            return
        row = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), step)
        if self._wandb is not None:
            self._wandb.log({k: float(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
