"""Training phases, timed and marked for the profiler, kept out of the code they measure.

``with phases("actor"): ...`` adds the block's wall time to ``phases.times["actor"]`` and, while a
``torch.profiler`` session runs, wraps it in the range ``<prefix>actor`` (``saferlhf-fast profile`` reads the
ranges back).  Without a profiler the cost is one flag check and two clock reads.
"""
from __future__ import annotations

import contextlib
import time

import torch


class Phases:
    def __init__(self, prefix: str = "ppo/"):
        self.prefix = prefix
        self.times: dict[str, float] = {}

    def reset(self) -> None:
        self.times = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        marked = torch.autograd.profiler._is_profiler_enabled
        rng = torch.profiler.record_function(self.prefix + name) if marked else contextlib.nullcontext()
        t0 = time.perf_counter()
        try:
            with rng:
                yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
