"""``saferlhf-fast profile ppo-step``: a torch.profiler trace of one real PPO(-Lag) step of our trainer, plus a
table of time per phase and per kernel.

The step is ``PPOTrainer.rollout`` + ``rl_step`` on a randomly initialised Llama of the chosen size (the workloads
of ``bench ppo-step``), after ``warmup`` unprofiled steps.  Ranges (``torch.profiler.record_function``):
``ppo/step`` (the whole step), ``ppo/rollout`` and ``ppo/rl_step`` (benchmark side), and inside the trainer
``ppo/generation``, ``ppo/scoring``, ``ppo/lagrange``, ``ppo/actor``, ``ppo/critics``, ``ppo/gae``, ``ppo/losses``
(a phase that occurs in several pieces, e.g. the actor's forward then its backward, is several ranges of one name).
Our ops show up under their own names (``saferlhf::*`` torch ops, the autograd functions of ``saferlhf_fast.ops``).

Writes into ``out_dir``: ``trace.json`` (Chrome trace: chrome://tracing or https://ui.perfetto.dev),
``phases.csv`` / ``kernels.csv`` and ``profile.md`` (both tables in markdown).
"""
from __future__ import annotations

import csv
import os
import shutil
import tempfile

import torch

from .harness import device_name, version_string
from .ppo_step import SIZES, _sync, build_checkpoints, make_trainer, our_step, prompts

PREFIX = "ppo/"
PHASE_ORDER = ("step", "rollout", "generation", "scoring", "rl_step", "lagrange", "actor", "critics", "gae",
               "losses")


def _phase_table(events, device: str, step_us: float) -> list[dict]:
    totals: dict[str, dict] = {}
    for e in events:
        if not e.name.startswith(PREFIX):
            continue
        name = e.name[len(PREFIX):]
        d = totals.setdefault(name, {"phase": name, "calls": 0, "wall_ms": 0.0, "device_ms": 0.0})
        d["calls"] += 1
        d["wall_ms"] += e.cpu_time_total / 1e3
        if device == "cuda":
            d["device_ms"] += e.device_time_total / 1e3
    order = {p: i for i, p in enumerate(PHASE_ORDER)}
    out = sorted(totals.values(), key=lambda d: (order.get(d["phase"], len(order)), d["phase"]))
    for d in out:
        d["share_of_step"] = d["wall_ms"] * 1e3 / step_us if step_us else 0.0
    return out


def _kernel_table(prof, device: str, top: int) -> list[dict]:
    cuda = device == "cuda"
    rows = []
    for avg in prof.key_averages():
        if avg.key.startswith(PREFIX) or avg.key.startswith("ProfilerStep"):
            continue
        if cuda and getattr(avg, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue  # on CUDA: the kernels (and memcpy / memset) themselves, not the CPU ops that launched them
        self_us = avg.self_device_time_total if cuda else avg.self_cpu_time_total
        if self_us <= 0:
            continue
        rows.append({"name": avg.key, "calls": avg.count, "self_ms": self_us / 1e3,
                     "avg_us": self_us / max(1, avg.count),
                     "total_ms": (avg.device_time_total if cuda else avg.cpu_time_total) / 1e3})
    total = sum(r["self_ms"] for r in rows) or 1.0
    rows.sort(key=lambda r: -r["self_ms"])
    for r in rows:
        r["share"] = r["self_ms"] / total
    return rows[:top]


def _write_csv(path: str, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def markdown(phases: list[dict], kernels: list[dict], device: str, header: str) -> str:
    cuda = device == "cuda"
    lines = [header, "", "Time per phase (wall time of the `ppo/*` ranges; a phase in several pieces is summed):", "",
             "| phase | ranges | wall ms | share of step |" + (" device ms |" if cuda else ""),
             "|---|---|---|---|" + ("---|" if cuda else "")]
    for d in phases:
        lines.append(f"| {d['phase']} | {d['calls']} | {d['wall_ms']:.2f} | {100 * d['share_of_step']:.1f}% |"
                     + (f" {d['device_ms']:.2f} |" if cuda else ""))
    what = "CUDA kernels, device time" if cuda else "operators, self CPU time"
    lines += ["", f"Top {len(kernels)} {what}:", "", "| name | calls | self ms | avg us | share |",
              "|---|---|---|---|---|"]
    for r in kernels:
        name = r["name"].replace("|", "\\|")
        if len(name) > 90:
            name = name[:87] + "..."
        lines.append(f"| `{name}` | {r['calls']} | {r['self_ms']:.3f} | {r['avg_us']:.1f} | {100 * r['share']:.1f}% |")
    return "\n".join(lines) + "\n"


def profile_ppo_step(out_dir: str, size: str = "tiny", device: str = "cpu", algorithm: str = "ppo-lag",
                     warmup: int = 1, top: int = 20, echo=print) -> dict:
    """Profile one step; returns {"trace", "phases", "kernels", "markdown"} (paths and tables)."""
    from dataclasses import replace

    w = replace(SIZES[size], algorithm=algorithm)
    os.makedirs(out_dir, exist_ok=True)
    root = tempfile.mkdtemp(prefix="profile_ppo_step_")
    try:
        _, paths, _ = build_checkpoints(w, root)
        trainer = make_trainer(w, paths, os.path.join(root, "out"), device)
        ids, mask = prompts(w, warmup + 1, device)
        for i in range(warmup):
            our_step(trainer, ids[i], mask, seed=i)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        _sync(device)
        with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
            with torch.profiler.record_function(PREFIX + "step"):
                timings = our_step(trainer, ids[warmup], mask, seed=warmup)
            _sync(device)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    trace = os.path.join(out_dir, "trace.json")
    prof.export_chrome_trace(trace)
    events = prof.events()
    step_us = sum(e.cpu_time_total for e in events if e.name == PREFIX + "step")
    phases = _phase_table(events, device, step_us)
    kernels = _kernel_table(prof, device, top)
    _write_csv(os.path.join(out_dir, "phases.csv"), phases,
               ["phase", "calls", "wall_ms", "share_of_step", "device_ms"])
    _write_csv(os.path.join(out_dir, "kernels.csv"), kernels, ["name", "calls", "self_ms", "avg_us", "total_ms",
                                                               "share"])
    header = (f"Profile of one {algorithm} step ({w.label()}) on {device_name(device)}; {version_string()}; "
              f"step {timings['total'] * 1e3:.1f} ms under the profiler")
    md = markdown(phases, kernels, device, header)
    with open(os.path.join(out_dir, "profile.md"), "w") as f:
        f.write(md)
    echo(md)
    echo(f"trace: {trace}")
    return {"trace": trace, "phases": phases, "kernels": kernels, "markdown": md}
