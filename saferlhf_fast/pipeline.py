"""The whole Safe RLHF pipeline on the bundled synthetic world, sized for a CPU (``saferlhf-fast demo``).

tiny Llama (random init, bundled tokenizer) -> SFT -> reward model -> cost model -> PPO-Lagrangian, then an arena
evaluation of the SFT model against the PPO-Lag model on held-out prompts (``docs/algorithm.md`` section 8), judged
both by the reward / cost models and by the generator's ground truth (``data.synthetic``).  Prints a short report and
writes ``report.json``, ``report.md`` and ``training.png`` (reward, cost and lambda per RL step) into the output folder.

Every stage runs through the same trainers and configs as the command line (``saferlhf-fast sft|rm|cm|ppo-lag|
arena``), so the report is what those commands produce; ``commands.sh`` in the output folder lists the
equivalent command lines.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass, field

from .settings import settings

# Hyper-parameters of the demo.  The reference's values are for 7B models; a 0.5M-parameter model on a toy language
# needs larger learning rates and fewer steps.  The cost model of the synthetic world scores safe responses around
# -5 and unsafe ones around +6, so the threshold asks for an expected cost that only a policy refusing most harmful
# prompts meets (the SFT policy starts near -2).
DEMO = {
    "model": dict(hidden_size=128, num_layers=2, num_heads=4),
    "sft": dict(train_datasets=["synthetic-sft/train"], eval_datasets=["synthetic-sft/test"], epochs=2,
                per_device_train_batch_size=16, gradient_accumulation_steps=1, lr=2e-3, weight_decay=0.0,
                lr_warmup_ratio=0.03, max_length=128),
    "rm": dict(train_datasets=["synthetic-preference/train"], eval_datasets=["synthetic-preference/test:0.25"],
               epochs=1, per_device_train_batch_size=16, lr=1e-3, max_length=128, weight_decay=0.1,
               regularization=0.001, lr_warmup_ratio=0.03),
    "cm": dict(train_datasets=["synthetic-preference/train"], eval_datasets=["synthetic-preference/test:0.25"],
               epochs=1, per_device_train_batch_size=16, lr=1e-3, max_length=128, weight_decay=0.1,
               regularization=0.001, lr_warmup_ratio=0.03),
    "ppo_lag": dict(train_datasets=["synthetic-prompts/train"], epochs=2, max_length=128, max_new_tokens=48,
                    per_device_prompt_batch_size=32, per_device_train_batch_size=32, actor_lr=2e-4, critic_lr=1e-3,
                    actor_lr_warmup_ratio=0.03, actor_weight_decay=0.01, critic_lr_scheduler_type="constant",
                    kl_coeff=0.02, threshold=-4.0, lambda_init=0.25, lambda_lr=0.2, lambda_max=10.0,
                    episode_cost_window_size=64, max_steps=None),
    "arena": dict(datasets=["synthetic-prompts/test"], max_length=128, max_new_tokens=48,
                  per_device_eval_batch_size=32, do_sample=True),
}
QUICK = {  # seconds, for smoke tests: everything tiny, the numbers mean nothing
    "model": dict(hidden_size=32, num_layers=1, num_heads=2),
    "sft": dict(train_datasets=["synthetic-sft/train:0.02"], eval_datasets=["synthetic-sft/test:0.1"], epochs=1),
    "rm": dict(train_datasets=["synthetic-preference/train:0.01"], eval_datasets=["synthetic-preference/test:0.02"]),
    "cm": dict(train_datasets=["synthetic-preference/train:0.01"], eval_datasets=["synthetic-preference/test:0.02"]),
    "ppo_lag": dict(train_datasets=["synthetic-prompts/train:0.03"], per_device_prompt_batch_size=16,
                    per_device_train_batch_size=16, max_new_tokens=12),
    "arena": dict(datasets=["synthetic-prompts/test:0.1"], max_new_tokens=12),
}


@dataclass
class DemoResult:
    output_dir: str
    seconds: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)


def _merge(base: dict, over: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for k, v in over.items():
        out.setdefault(k, {}).update(v)
    return out


def _command_line(command: str, cfg) -> str:
    """The command line equivalent to a config (options left at their defaults omitted)."""
    import dataclasses

    parts = ["saferlhf-fast", command]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        if value is None or value == default or f.name == "progress":
            continue
        if isinstance(value, list):
            parts += [f"--{f.name}"] + [shlex.quote(str(v)) for v in value]
        else:
            parts += [f"--{f.name}", shlex.quote(str(value))]
    return " ".join(parts)


_TRAINERS = {
    "sft": ("saferlhf_fast.trainers.sft", "SFTConfig", "SFTTrainer"),
    "rm": ("saferlhf_fast.trainers.score", "RewardConfig", "RewardTrainer"),
    "cm": ("saferlhf_fast.trainers.score", "CostConfig", "CostTrainer"),
    "ppo-lag": ("saferlhf_fast.trainers.ppo", "PPOLagConfig", "PPOTrainer"),
}


def _make_config(command: str, kw: dict):
    import importlib

    module, cfg_name, _ = _TRAINERS[command]
    cfg = getattr(importlib.import_module(module), cfg_name)(**kw)
    cfg.validate()
    return cfg


def _train_stage(command: str, kw: dict, threads: int) -> dict:
    """One training stage (in this process or a worker process)."""
    import importlib

    import torch

    torch.set_num_threads(threads)
    module, _, trainer_name = _TRAINERS[command]
    trainer_cls = getattr(importlib.import_module(module), trainer_name)
    return trainer_cls(_make_config(command, kw)).train()


def default_threads() -> int:
    """Threads per process of the demo: 1 unless ``SAFERLHF_DEMO_THREADS`` says otherwise.  For models this small,
    one thread per process is about as fast as two on an idle machine and many times faster on a busy one (a
    two-thread OpenMP team stalls at every barrier when another process holds a core)."""
    return max(1, settings().demo_threads)


DEMO_MARKER = ".saferlhf-demo"  # written into the output folder the demo uses: its entries below are the demo's
DEMO_ENTRIES = ("init", "sft", "rm", "cm", "ppo_lag", "arena", "commands.sh", "report.md", "report.json",
                "training.png")


def prepare_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse a non-empty folder (``overwrite``: remove only the entries a previous demo wrote there, and only in a
    folder carrying the demo's marker), then create it and mark it."""
    from .trainers.config import ConfigError
    from .trainers.safety import LOCK_FILE, lock_holder

    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"--output_dir {output_dir}: exists and is not a folder")
    holder = lock_holder(output_dir)
    if holder is not None:
        raise ConfigError(f"--output_dir {output_dir} is in use by another run (pid {holder}, {LOCK_FILE})")
    entries = sorted(n for n in os.listdir(output_dir) if n != LOCK_FILE) if os.path.isdir(output_dir) else []
    if entries and not overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ConfigError(f"--output_dir {output_dir} is not empty ({shown}); pass --overwrite_output_dir to replace "
                          "a previous demo's outputs there (nothing else is removed), or choose another folder")
    ours = [e for e in entries if e in DEMO_ENTRIES]
    if ours and not os.path.isfile(os.path.join(output_dir, DEMO_MARKER)):
        raise ConfigError(f"--output_dir {output_dir}: {', '.join(ours)} not written by the demo (no {DEMO_MARKER}); "
                          "choose another folder")
    for name in ours:
        path = os.path.join(output_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, DEMO_MARKER), "w", encoding="utf-8") as f:
        f.write("saferlhf-fast demo output folder\n")


def run_demo(output_dir: str = os.path.join("runs", "demo"), *, quick: bool = False, seed: int = 42,
             overrides: dict | None = None, progress: bool = False, plot: bool = True,
             threads: int | None = None, parallel: bool = True, overwrite: bool = False) -> DemoResult:
    """``parallel``: train the reward and the cost model at the same time in two processes (both only need the SFT
    model), one core each.  ``overwrite``: reuse a previous demo's folder (see :func:`prepare_output_dir`)."""
    import torch

    from .trainers.safety import RunLock

    prepare_output_dir(output_dir, overwrite)
    lock = RunLock(output_dir)
    lock.acquire()
    threads = threads or default_threads()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_demo(output_dir, quick, seed, overrides, progress, plot, threads, parallel)
    finally:
        torch.set_num_threads(previous_threads)
        lock.release()


def _run_demo(output_dir, quick, seed, overrides, progress, plot, threads, parallel) -> DemoResult:
    from .eval.arena import ArenaConfig, run_arena
    from .trainers.modeling import make_tiny_model

    spec = _merge(DEMO, QUICK) if quick else _merge(DEMO, {})
    if overrides:
        spec = _merge(spec, overrides)
    paths = {k: os.path.join(output_dir, k) for k in ("init", "sft", "rm", "cm", "ppo_lag", "arena")}
    result = DemoResult(output_dir)
    commands = []
    t_all = time.perf_counter()

    def stage(name, fn):
        t0 = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        out = fn()
        result.seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"--- {name}: {result.seconds[name]:.1f} s", flush=True)
        return out

    stage("init: tiny Llama + bundled tokenizer",
          lambda: make_tiny_model(paths["init"], seed=seed, max_position_embeddings=256, **spec["model"]))

    def train(command, **kw):
        kw.update(seed=seed, progress=progress)
        commands.append(_command_line(command, _make_config(command, kw)))
        return _train_stage(command, kw, threads)

    sft = stage("SFT", lambda: train("sft", model_name_or_path=paths["init"], output_dir=paths["sft"], **spec["sft"]))
    rm_kw = dict(model_name_or_path=paths["sft"], output_dir=paths["rm"], seed=seed, progress=progress, **spec["rm"])
    cm_kw = dict(model_name_or_path=paths["sft"], output_dir=paths["cm"], seed=seed, progress=progress, **spec["cm"])
    commands.append(_command_line("rm", _make_config("rm", rm_kw)))
    commands.append(_command_line("cm", _make_config("cm", cm_kw)))

    def score_models():
        if not parallel:
            return _train_stage("rm", rm_kw, threads), _train_stage("cm", cm_kw, threads)
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as pool:
            rm_f = pool.submit(_train_stage, "rm", rm_kw, threads)
            cm_f = pool.submit(_train_stage, "cm", cm_kw, threads)
            return rm_f.result(), cm_f.result()

    rm, cm = stage("reward model + cost model" + (" (in parallel)" if parallel else ""), score_models)
    ppo_kw = dict(spec["ppo_lag"])
    lag = stage("PPO-Lagrangian", lambda: train(
        "ppo-lag", actor_model_name_or_path=paths["sft"], reward_model_name_or_path=paths["rm"],
        cost_model_name_or_path=paths["cm"], output_dir=paths["ppo_lag"], **ppo_kw))

    def arena():
        cfg = ArenaConfig(red_corner_model_name_or_path=paths["sft"], blue_corner_model_name_or_path=paths["ppo_lag"],
                          reward_model_name_or_path=paths["rm"], cost_model_name_or_path=paths["cm"],
                          output_dir=paths["arena"], seed=seed, **spec["arena"])
        cfg.validate()
        commands.append(_command_line("arena", cfg))
        return run_arena(cfg)

    summary = stage("arena: SFT (red) vs PPO-Lag (blue)", arena)
    result.seconds["total"] = round(time.perf_counter() - t_all, 1)

    history = read_history(os.path.join(paths["ppo_lag"], "metrics.jsonl"))
    result.report = {
        "seconds": result.seconds, "sft": sft, "reward_model": rm, "cost_model": cm, "ppo_lag": lag,
        "arena": {k: v for k, v in summary.items() if k != "config"},
        "lambda_over_time": [(h["step"], h["train/lambda"]) for h in history],
        "threshold": ppo_kw["threshold"], "torch_threads": threads,
    }
    with open(os.path.join(output_dir, "commands.sh"), "w", encoding="utf-8") as f:
        f.write("#!/bin/sh\n# The stages of this demo as command lines (same configs).\nset -e\n")
        f.write("\n".join(commands) + "\n")
    text = format_report(result.report, summary)
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(os.path.join(output_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(result.report, f, indent=2)
    if plot:
        png = plot_history(history, os.path.join(output_dir, "training.png"), threshold=ppo_kw["threshold"])
        if png:
            text += f"\nplot: {png}"
    print("\n" + text)
    return result


def read_history(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if "train/reward" in row:
                    rows.append(row)
    return rows


def format_report(report: dict, summary: dict) -> str:
    from .eval.arena import format_summary

    s = report["seconds"]
    lines = ["# saferlhf-fast demo: Safe RLHF on the synthetic world", ""]
    lines.append("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in s.items()))
    sft, rm, cm = report["sft"], report["reward_model"], report["cost_model"]
    nan = float("nan")
    lines.append(f"SFT eval loss {sft.get('eval/loss', nan):.3f}; reward model accuracy "
                 f"{rm.get('eval/accuracy', nan):.3f}; cost model accuracy {cm.get('eval/accuracy', nan):.3f}, "
                 f"sign accuracy {cm.get('eval/accuracy_sign', nan):.3f}")
    lam = report["lambda_over_time"]
    if lam:
        picks = sorted({0, len(lam) // 4, len(lam) // 2, 3 * len(lam) // 4, len(lam) - 1})
        lines.append(f"PPO-Lag ({len(lam)} RL steps, threshold {report['threshold']}): lambda over time "
                     + ", ".join(f"step {lam[i][0]}: {lam[i][1]:.3f}" for i in picks))
    lines.append("")
    lines.append(format_summary(summary, "SFT", "PPO-Lag"))
    gt = summary.get("ground_truth")
    if gt:
        r, b = gt["red"], gt["blue"]
        lines.append("")
        lines.append(f"harmful-response rate (ground truth): SFT {r['harmful_rate']:.1%} -> PPO-Lag "
                     f"{b['harmful_rate']:.1%}  (on harmful prompts {r['harmful_rate_on_harmful_prompts']:.1%} -> "
                     f"{b['harmful_rate_on_harmful_prompts']:.1%}); benign helpfulness "
                     f"{r['helpfulness_on_benign_prompts']:.2f} -> {b['helpfulness_on_benign_prompts']:.2f}; "
                     f"benign refusals {r['refusal_rate_on_benign_prompts']:.1%} -> "
                     f"{b['refusal_rate_on_benign_prompts']:.1%}")
    return "\n".join(lines)


def plot_history(history: list[dict], path: str, threshold: float | None = None) -> str | None:
    """PNG of reward, cost (with the threshold and the window mean J_C) and lambda per RL step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return None
    steps = [h["step"] for h in history]

    def smooth(xs, k=5):
        return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    rewards = [h["train/reward"] for h in history]
    axes[0].plot(steps, rewards, color="tab:green", alpha=0.35, label="rollout mean")
    axes[0].plot(steps, smooth(rewards), color="tab:green", label="moving average (5)")
    axes[0].legend(fontsize=8)
    axes[0].set_title("reward")
    costs = [h["train/cost"] for h in history]
    axes[1].plot(steps, costs, color="tab:red", alpha=0.35, label="cost (rollout mean)")
    if history and "train/episode_cost" in history[0]:
        axes[1].plot(steps, [h["train/episode_cost"] for h in history], color="tab:orange", label="J_C (window)")
    if threshold is not None:
        axes[1].axhline(threshold, color="k", ls="--", lw=1, label="threshold")
    axes[1].legend(fontsize=8)
    axes[1].set_title("cost")
    if history and "train/lambda" in history[0]:
        axes[2].plot(steps, [h["train/lambda"] for h in history], color="tab:blue")
    axes[2].set_title("lambda")
    for ax in axes:
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
