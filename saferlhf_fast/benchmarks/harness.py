"""Timing, memory and CSV plumbing shared by every benchmark.

* Time: providers of one case are run **interleaved** (rep 1 of every provider, then rep 2, ...) after a warm-up,
  so slow drifts of a shared machine hit all of them alike; we report the median and the 20th / 80th percentiles.
  CUDA work is timed with CUDA events.
* Memory: the peak extra memory of one call.  On CUDA, ``max_memory_allocated`` above the inputs.  On CPU, the
  call runs in a fresh spawned process that builds its inputs, resets the kernel's high-water mark
  (``/proc/self/clear_refs``), and reports ``VmHWM - VmRSS`` around the call, so no provider inherits another's
  freed-but-resident pages.
* Rows: one CSV (Liger-Kernel's columns) with device name, versions, git commit (``+dirty`` when the working tree
  has uncommitted changes), timestamp, and the command line that reproduces the row; on CPU the ``config`` column
  ends with the 1-minute load average when the row was made (``load1=``), since a shared machine inflates times.
* Ratios: each row is compared with its case's baseline provider (``BASELINES``); ``time`` and ``memory`` are
  lower-is-better, ``throughput`` / ``tflops`` / ``bandwidth`` higher-is-better.
"""
from __future__ import annotations

import csv
import datetime as _dt
import functools
import importlib
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..settings import settings

COLUMNS = ["kernel", "provider", "mode", "metric", "unit", "x", "p50", "p20", "p80", "config", "device", "timestamp",
           "version", "command"]
# CSVs written before the ``command`` column existed are upgraded in place when rows are appended.
_LEGACY_COLUMNS = COLUMNS[:-1]

# The provider each row is compared with: ``baseline`` for ops, transformers for the model benchmarks (dynamic-cache
# ``generate``; ``hf`` forward + backward), the reference-style step for the PPO step, full fine-tuning for the PPO
# step's LoRA variants.
BASELINES = ("baseline", "hf_dynamic", "hf", "reference-style", "saferlhf_fast:full")
HIGHER_IS_BETTER = ("throughput", "tflops", "bandwidth")


def is_baseline(provider: str) -> bool:
    return provider in BASELINES


def ratio_to_baseline(metric: str, value: float, ref: float) -> tuple[float, str] | None:
    """(ratio, kind): kind ``speedup`` (x faster than the baseline) for time and rates, ``fraction`` (of the
    baseline) for memory.  None when undefined."""
    if not ref or value <= 0 or ref <= 0:
        return None
    if metric == "time":
        return ref / value, "speedup"
    if metric in HIGHER_IS_BETTER:
        return value / ref, "speedup"
    return value / ref, "fraction"


_COMMAND: list[str] = []


def set_command(command: str | None) -> None:
    """The command line recorded in the ``command`` column of the rows made from now on (the CLI and the bench/
    scripts set it; default: ``sys.argv``)."""
    _COMMAND[:] = [command] if command else []


def current_command() -> str:
    if _COMMAND:
        return _COMMAND[0]
    import shlex

    return " ".join(shlex.quote(a) for a in sys.argv)


@dataclass
class Case:
    """One measurement: ``builder`` (importable ``module:function``) is called as ``builder(**args)`` and returns a
    zero-argument callable (inputs already built) to time."""

    kernel: str
    provider: str
    mode: str
    x: str
    builder: str
    args: dict = field(default_factory=dict)
    config: str = ""

    def build(self) -> Callable[[], object]:
        module, func = self.builder.split(":")
        return getattr(importlib.import_module(module), func)(**self.args)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_once(fn, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    pos = (len(values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def time_interleaved(cases: list[Case], device: str, reps: int = 10, warmup: int = 2,
                     timer: str = "events") -> dict[str, list[float]]:
    """Seconds per call for each case (keyed by provider), repetitions interleaved across cases."""
    return time_fns({c.provider: c.build() for c in cases}, device, reps=reps, warmup=warmup, timer=timer)


def _do_bench_once(fn) -> float:
    """One repetition measured by ``triton.testing.do_bench`` (CUDA only): the median of its own inner runs (it
    flushes the L2 cache between them), in seconds."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=1, rep=20, return_mode="median") / 1e3


def time_fns(fns: dict[str, Callable[[], object]], device: str, reps: int = 10,
             warmup: int = 2, timer: str = "events") -> dict[str, list[float]]:
    """Seconds per call of each already-built callable, after ``warmup`` rounds, repetitions interleaved.
    ``timer``: ``events`` (CUDA events / ``perf_counter`` on CPU) or ``do_bench`` (on CUDA, every repetition is one
    ``triton.testing.do_bench`` median, still interleaved across providers)."""
    if timer not in ("events", "do_bench"):
        raise ValueError(f"unknown timer {timer!r}")
    once = _do_bench_once if (timer == "do_bench" and device == "cuda") else (lambda fn: _time_once(fn, device))
    for _ in range(warmup):
        for fn in fns.values():
            fn()
        _sync(device)
    times: dict[str, list[float]] = {p: [] for p in fns}
    for _ in range(reps):
        for provider, fn in fns.items():
            times[provider].append(once(fn))
    return times


def summarize(times: list[float]) -> tuple[float, float, float]:
    return statistics.median(times), percentile(times, 0.2), percentile(times, 0.8)


# ---------------------------------------------------------------------------------------------- memory
def _read_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _cpu_peak_child(case: Case, queue) -> None:
    try:
        torch.set_num_threads(settings().bench_threads or torch.get_num_threads())
        fn = case.build()
        fn()  # warm-up: lazy init, allocator pools
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _read_status("VmRSS")
        fn()
        queue.put(max(0, _read_status("VmHWM") - base))
    except Exception as exc:  # noqa: BLE001 - whatever the child hit is reported to the parent
        queue.put(exc)


def allocator_peak(fn: Callable[[], object]) -> int:
    """Peak extra bytes held by torch's CPU allocator while ``fn`` runs, from ``torch.profiler``'s memory events
    (``profile_memory=True``: every tensor allocation and free, in order).  Independent of what ran before in the
    process (unlike an RSS high-water mark, which freed-but-resident pages hide); counts tensors only."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak


def cuda_peak(fn) -> int:
    """Peak CUDA bytes allocated during one call of ``fn`` beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def peak_memory(case: Case, device: str) -> int:
    """Peak extra bytes of one call of ``case`` beyond its inputs."""
    if device == "cuda":
        fn = case.build()
        fn()  # warm-up: lazy allocations (workspaces, autotuning) are not the op's footprint
        return cuda_peak(fn)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cpu_peak_child, args=(case, queue))
    proc.start()
    result = queue.get(timeout=600)
    proc.join()
    if isinstance(result, Exception):
        raise result
    return int(result)


# ---------------------------------------------------------------------------------------------- rows
def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{_cpu_model()} ({os.cpu_count()} cpus, {torch.get_num_threads()} threads)"


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return model


@functools.lru_cache(maxsize=None)
def version_string() -> str:
    parts = [f"torch={torch.__version__}"]
    try:
        import triton

        parts.append(f"triton={triton.__version__}")
    except Exception:  # noqa: BLE001 - a version label is optional
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
        if commit:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10,
                cwd=os.path.dirname(os.path.abspath(__file__)),
            ).stdout.strip()
            parts.append(f"git={commit}{'+dirty' if dirty else ''}")
    except Exception:  # noqa: BLE001 - no git, or not a checkout: no label
        pass
    from .. import __version__

    parts.append(f"saferlhf_fast={__version__}")
    return " ".join(parts)


def make_row(case: Case, metric: str, unit: str, p50: float, p20: float, p80: float, device: str) -> dict:
    return row(case.kernel, case.provider, case.mode, metric, unit, case.x, p50, p20, p80, case.config, device)


def row(kernel: str, provider: str, mode: str, metric: str, unit: str, x: str, p50: float, p20: float, p80: float,
        config: str, device: str) -> dict:
    if device != "cuda" and hasattr(os, "getloadavg"):  # a shared CPU: say how busy it was
        config = f"{config} load1={os.getloadavg()[0]:.1f}".strip()
    return {
        "kernel": kernel, "provider": provider, "mode": mode, "metric": metric, "unit": unit,
        "x": x, "p50": f"{p50:.6g}", "p20": f"{p20:.6g}", "p80": f"{p80:.6g}", "config": config,
        "device": device_name(device), "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "version": version_string(), "command": current_command(),
    }


def rate_row(kernel: str, provider: str, mode: str, metric: str, unit: str, x: str, amount: float,
             seconds: list[float], config: str, device: str) -> dict:
    """A derived higher-is-better row (tokens/s, GB/s, TFLOP/s): ``amount`` per second; its p20 is ``amount`` over
    the p80 time and its p80 ``amount`` over the p20 time."""
    p50, t20, t80 = summarize(seconds)
    return row(kernel, provider, mode, metric, unit, x, amount / p50, amount / t80, amount / t20, config, device)


def write_rows(path: str, rows: list[dict], overwrite: bool = False) -> None:
    """Append rows to ``path`` (or replace it with ``overwrite``), atomically: temp file + rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    existing: list[dict] = []
    if not overwrite and os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames not in (COLUMNS, _LEGACY_COLUMNS):
                raise ValueError(f"{path}: unexpected header {reader.fieldnames}, expected {COLUMNS}")
            existing = [dict(r, command=r.get("command") or "") for r in reader]
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(existing + rows)
    os.replace(tmp, path)


def format_table(rows: list[dict], baseline: str = "baseline") -> str:
    """Plain-text table, one line per row.  'vs base': speed-up (baseline time / time) for time rows, fraction of the
    baseline (memory / baseline memory) for memory rows."""
    base = {(r["kernel"], r["mode"], r["metric"], r["x"]): float(r["p50"]) for r in rows
            if r["provider"] == baseline or (baseline == "baseline" and is_baseline(r["provider"]))}
    lines = [f"{'kernel':<18} {'mode':<10} {'metric':<10} {'x':<30} {'provider':<15} {'p50':>14} {'vs base':>9}"]
    for r in rows:
        ref = base.get((r["kernel"], r["mode"], r["metric"], r["x"]))
        p50 = float(r["p50"])
        got = None if is_baseline(r["provider"]) else ratio_to_baseline(r["metric"], p50, ref or 0.0)
        ratio = "" if got is None else f"{got[0]:7.2f}x" if got[1] == "speedup" else f"{got[0]:7.3f}"
        value = (f"{p50 * 1e3:.4g} ms" if r["unit"] == "s" else f"{p50 / 2**20:.4g} MiB" if r["unit"] == "B"
                 else f"{p50:.4g} {r['unit']}")
        lines.append(f"{r['kernel']:<18} {r['mode']:<10} {r['metric']:<10} {r['x']:<30} {r['provider']:<15} "
                     f"{value:>14} {ratio:>9}")
    return "\n".join(lines)
