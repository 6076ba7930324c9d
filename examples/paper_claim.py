"""The Safe RLHF paper's claim on the synthetic world, in one command (CPU, tens of minutes).

    python examples/paper_claim.py                          # base models from runs/demo (trained if missing),
                                                            # seeds 1 2 3, nu in 0.01 0.1 0.3 1.0, plus plain PPO
    python examples/paper_claim.py --seeds 1 2 --nus 0.05 0.5 --out runs/paper_claim

Claim (Dai et al. 2024, section 5): PPO-Lagrangian with a cost threshold drives the expected cost below the
threshold while the reward rises; reward shaping with a fixed nu is either too weak (harm stays) or over-cautious
(benign prompts refused, helpfulness lost); the dynamic lambda ends on a better reward / harm trade-off than
every fixed nu tried.

Every policy starts from the same SFT model and is judged by the same reward / cost models (those of the demo:
``saferlhf-fast demo`` builds them) and, since this is the synthetic world, by the generator's ground truth on the
held-out prompts (sampled responses, a fixed seed per run): harmful-response rate, helpfulness on benign prompts,
refusal rate on benign prompts.  All methods share the demo's PPO hyper-parameters (learning rates, KL, batch,
steps); only the advantage mix differs.  Output: ``table.md``, ``results.json`` and ``tradeoff.png`` in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def train_policy(method: str, nu: float | None, base: str, out: str, seed: int, spec: dict) -> dict:
    from saferlhf_fast.trainers.ppo import PPOConfig, PPOLagConfig, PPOTrainer, RewardShapingConfig

    kw = dict(spec)
    lag_only = ("threshold", "lambda_lr", "lambda_max", "episode_cost_window_size", "lambda_update_delay_steps")
    common = dict(actor_model_name_or_path=os.path.join(base, "sft"),
                  reward_model_name_or_path=os.path.join(base, "rm"), output_dir=out, seed=seed, progress=False)
    if method == "ppo-lag":
        cfg = PPOLagConfig(**common, cost_model_name_or_path=os.path.join(base, "cm"), **kw)
    else:
        for k in lag_only + ("lambda_init",):
            kw.pop(k, None)
        if method == "shaping":
            cfg = RewardShapingConfig(**common, cost_model_name_or_path=os.path.join(base, "cm"), lambda_init=nu, **kw)
        else:
            cfg = PPOConfig(**common, **kw)
    cfg.validate()
    return PPOTrainer(cfg).train()


def evaluate(policy: str, base: str, seed: int, max_new_tokens: int) -> dict:
    import torch

    from saferlhf_fast.data import load_records
    from saferlhf_fast.eval.arena import _load_policy, _load_scorer, generate_responses, ground_truth, score_texts

    device = torch.device("cpu")
    records = load_records(["synthetic-prompts/test"])
    model, tok = _load_policy("policy", policy, device, None, 128)
    prompts, responses = generate_responses(model, tok, records, max_length=128, max_new_tokens=max_new_tokens,
                                            batch_size=32, do_sample=True, seed=10_000 + seed)
    out = ground_truth(prompts, responses)
    for kind in ("rm", "cm"):
        scorer, stok, norm = _load_scorer(kind, os.path.join(base, kind), device, None, 128)
        s = score_texts(scorer, stok, norm, prompts, responses, max_length=128, batch_size=32)
        out["reward" if kind == "rm" else "cost"] = float(s.mean())
    return out


def final_training(path: str) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl")) if line.strip()]
    rows = [r for r in rows if "train/reward" in r]
    last = rows[-max(1, len(rows) // 5):]  # the last fifth of training
    out = {"reward_last": statistics.mean(r["train/reward"] for r in last)}
    if "train/cost" in rows[0]:
        out["cost_last"] = statistics.mean(r["train/cost"] for r in last)
        out["cost_first"] = rows[0]["train/cost"]
    out["reward_first"] = rows[0]["train/reward"]
    if "train/lambda" in rows[0]:
        out["lambda"] = [r["train/lambda"] for r in rows]
        out["episode_cost"] = [r["train/episode_cost"] for r in rows]
    return out


def run_job(job) -> dict:
    """Train (unless already done) and evaluate one policy; runs in a worker process."""
    import torch

    seed, method, nu, base, out_dir, spec, max_new, threads = job
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if method == "sft":
        path = os.path.join(base, "sft")
        row = {"method": "sft", "nu": None, "seed": seed}
    else:
        name = f"{method}" + (f"-nu{nu:g}" if nu is not None else "") + f"-seed{seed}"
        path = os.path.join(out_dir, name)
        if not os.path.isfile(os.path.join(path, "results.json")):
            train_policy(method, nu, base, path, seed, spec)
        row = {"method": method, "nu": nu, "seed": seed, "train": final_training(path)}
    ev = evaluate(path, base, seed, max_new)
    row.update(eval=ev, seconds=round(time.perf_counter() - t0, 1))
    print(f"{label(method, nu):>18} seed {seed}: harmful {ev['harmful_rate']:.1%}, benign helpfulness "
          f"{ev['helpfulness_on_benign_prompts']:.2f}, benign refusals {ev['refusal_rate_on_benign_prompts']:.1%}, "
          f"reward {ev['reward']:.3f}, cost {ev['cost']:.3f} [{row['seconds']:.0f} s]", flush=True)
    return row


def label(method: str, nu) -> str:
    if method == "shaping":
        return f"shaping nu={nu:g}"
    return {"ppo-lag": "PPO-Lag", "ppo": "PPO (reward only)", "sft": "SFT"}[method]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=os.path.join("runs", "demo"), help="folder with sft/, rm/, cm/ (a demo run); "
                                                                          "trained with the demo when missing")
    ap.add_argument("--out", default=os.path.join("runs", "paper_claim"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--nus", type=float, nargs="+", default=[0.01, 0.1, 0.3, 1.0])
    ap.add_argument("--no-ppo", action="store_true", help="skip the reward-only PPO baseline")
    ap.add_argument("--prompts", default=None, help="training prompt spec (default: the demo's)")
    ap.add_argument("--jobs", type=int, default=2, help="runs trained at the same time (processes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args()

    import torch

    from saferlhf_fast.pipeline import DEMO, run_demo

    torch.set_num_threads(args.threads)
    if not all(os.path.isdir(os.path.join(args.base, k)) for k in ("sft", "rm", "cm")):
        print(f"{args.base} has no sft/rm/cm: running the demo there first")
        run_demo(args.base)
    spec = dict(DEMO["ppo_lag"])
    spec.pop("max_steps", None)
    if args.prompts:
        spec["train_datasets"] = [args.prompts]
    threshold = spec["threshold"]
    max_new = spec["max_new_tokens"]
    os.makedirs(args.out, exist_ok=True)
    runs = [("ppo-lag", None)] + [("shaping", nu) for nu in args.nus] + ([] if args.no_ppo else [("ppo", None)])
    jobs = [(seed, "sft", None) for seed in args.seeds] + [(seed, m, nu) for seed in args.seeds for m, nu in runs]
    t_all = time.perf_counter()
    work = [(seed, method, nu, args.base, args.out, spec, max_new, args.threads) for seed, method, nu in jobs]
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(run_job, work))
    else:
        results = [run_job(w) for w in work]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"threshold": threshold, "runs": results, "seconds": time.perf_counter() - t_all}, f, indent=2)
    table = make_table(results, threshold)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    png = plot(results, threshold, os.path.join(args.out, "tradeoff.png"))
    if png:
        print(f"plot: {png}")
    return 0


def _agg(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def make_table(results, threshold) -> str:
    groups: dict = {}
    for r in results:
        groups.setdefault((r["method"], r["nu"]), []).append(r)
    order = sorted(groups, key=lambda k: ({"sft": 0, "ppo": 1, "shaping": 2, "ppo-lag": 3}[k[0]], k[1] or 0))
    seeds = sorted({r["seed"] for r in results})
    lines = [f"Synthetic world, held-out prompts (264), sampled responses; mean +- sd over seeds {seeds}. "
             f"PPO-Lag threshold {threshold}.", "",
             "| policy | harmful rate | harmful on harmful prompts | benign helpfulness | benign refusals | "
             "reward (RM) | cost (CM) | training cost first -> last |",
             "|---|---|---|---|---|---|---|---|"]
    summary, costs = {}, {}
    for key in order:
        rows = groups[key]

        def cell(field, pct=False, rows=rows):
            m, s = _agg([r["eval"][field] for r in rows])
            return f"{m:.1%} +- {s:.1%}" if pct else f"{m:.2f} +- {s:.2f}"

        tr = [r.get("train", {}) for r in rows]
        if tr and "cost_last" in tr[0]:
            a, _ = _agg([t["cost_first"] for t in tr])
            b, _ = _agg([t["cost_last"] for t in tr])
            training = f"{a:.2f} -> {b:.2f}"
        else:
            training = "-"
        lines.append(f"| {label(*key)} | {cell('harmful_rate', True)} | {cell('harmful_rate_on_harmful_prompts', True)} "
                     f"| {cell('helpfulness_on_benign_prompts')} | {cell('refusal_rate_on_benign_prompts', True)} | "
                     f"{cell('reward')} | {cell('cost')} | {training} |")
        summary[key] = (_agg([r["eval"]["harmful_rate"] for r in rows])[0],
                        _agg([r["eval"]["helpfulness_on_benign_prompts"] for r in rows])[0])
        costs[key] = _agg([r["eval"]["cost"] for r in rows])[0]
    lag = summary.get(("ppo-lag", None))
    feasible = sorted((k for k in order if costs[k] <= threshold), key=lambda k: -summary[k][1])
    lines.append("")
    lines.append(f"Constraint met (mean cost <= threshold {threshold}): " + (", ".join(
        f"{label(*k)} (benign helpfulness {summary[k][1]:.2f}, harmful {summary[k][0]:.1%})" for k in feasible)
        or "none") + ("; the most helpful of them: " + label(*feasible[0]) if feasible else ""))
    if lag:
        lines.append("")
        for key, (harm, helpf) in summary.items():
            if key[0] != "shaping":
                continue
            if lag[0] == harm and lag[1] == helpf:
                verdict = "the same point as PPO-Lag"
            elif lag[0] <= harm and lag[1] >= helpf:
                verdict = "PPO-Lag dominates it (less harm and more benign helpfulness)"
            elif lag[0] > harm and lag[1] < helpf:
                verdict = "it dominates PPO-Lag"
            elif lag[0] > harm:
                verdict = f"less harmful than PPO-Lag ({harm:.1%} vs {lag[0]:.1%}) but less helpful ({helpf:.3f} vs {lag[1]:.3f})"
            else:
                verdict = f"more helpful than PPO-Lag ({helpf:.3f} vs {lag[1]:.3f}) but more harmful ({harm:.1%} vs {lag[0]:.1%})"
            lines.append(f"- {label(*key)}: {verdict}")
    return "\n".join(lines)


def plot(results, threshold, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {}
    palette = ["tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:red"]
    for r in results:
        key = label(r["method"], r["nu"])
        if key not in colors:
            colors[key] = "tab:red" if r["method"] == "ppo-lag" else palette[len(colors) % len(palette)]
        ev = r["eval"]
        ax.scatter(ev["harmful_rate"], ev["helpfulness_on_benign_prompts"], color=colors[key],
                   marker="*" if r["method"] == "ppo-lag" else "o", s=120 if r["method"] == "ppo-lag" else 40,
                   label=key)
    handles, labels = ax.get_legend_handles_labels()
    seen = {}
    for h, lab in zip(handles, labels):
        seen.setdefault(lab, h)
    ax.legend(seen.values(), seen.keys(), fontsize=8)
    ax.set_xlabel("harmful-response rate (ground truth, held-out prompts)")
    ax.set_ylabel("helpfulness on benign prompts (ground truth)")
    ax.set_title("trade-off: up and left is better")
    ax.grid(alpha=0.3)
    ax2b = ax2.twinx()
    for r in results:
        if r["method"] == "ppo-lag":
            t = r["train"]
            steps = range(1, len(t["episode_cost"]) + 1)
            ax2.plot(steps, t["episode_cost"], color="tab:orange", alpha=0.7)
            ax2b.plot(steps, t["lambda"], color="tab:blue", alpha=0.7)
    ax2b.set_ylabel("lambda", color="tab:blue")
    ax2.axhline(threshold, color="k", ls="--", lw=1)
    ax2.set_xlabel("RL step")
    ax2.set_ylabel("J_C (window mean cost)", color="tab:orange")
    ax2.set_title("PPO-Lag: J_C vs threshold (dashed), lambda")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
