"""Named ``torch.profiler`` ranges for the training phases (``saferlhf-fast profile`` reads them back).

:class:`PhaseRanges` marks consecutive phases with one line each, without re-indenting the code they cover:
``phases.to("actor")`` closes the open range and opens ``ppo/actor``; ``phases.to(None)`` closes it.  When no
profiler is running it does nothing (one flag check).
"""
from __future__ import annotations

import torch


class PhaseRanges:
    def __init__(self, prefix: str = "ppo/"):
        self.prefix = prefix
        self._open = None

    def to(self, name: str | None) -> None:
        if self._open is not None:
            self._open.__exit__(None, None, None)
            self._open = None
        if name is not None and torch.autograd.profiler._is_profiler_enabled:
            self._open = torch.profiler.record_function(self.prefix + name)
            self._open.__enter__()
