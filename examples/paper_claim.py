"""The Safe RLHF paper's claim on the synthetic world, in one command (CPU, tens of minutes).

    python examples/paper_claim.py                          # base models from runs/demo (trained if missing),
                                                            # seeds 1 2 3, nu in 0.01 0.1 0.3 1.0, plus plain PPO
    python examples/paper_claim.py --seeds 1 2 --nus 0.05 0.5 --out runs/paper_claim
    python examples/paper_claim.py --lambda_optimizers sgd pid --nus --no-ppo --out runs/pid_vs_sgd
                                                            # PPO-Lag with the SGD and the PID multiplier only
    python examples/paper_claim.py --seeds 1 2 3 4 5 6 --nus --no-ppo --lora_ranks 0 16 --out runs/lora_vs_full
                                                            # PPO-Lag trained in full and with LoRA rank 16

Claim (Dai et al. 2024, section 5): PPO-Lagrangian with a cost threshold drives the expected cost below the
threshold while the reward rises; reward shaping with a fixed nu is either too weak (harm stays) or over-cautious
(benign prompts refused, helpfulness lost); the dynamic lambda ends on a better reward / harm trade-off than
every fixed nu tried.

Every policy starts from the same SFT model and is judged by the same reward / cost models (those of the demo:
``saferlhf-fast demo`` builds them) and, since this is the synthetic world, by the generator's ground truth on the
held-out prompts (sampled responses, a fixed seed per run): harmful-response rate, helpfulness on benign prompts,
refusal rate on benign prompts.  All methods share the demo's PPO hyper-parameters (learning rates, KL, batch,
steps); only the advantage mix differs.  Output: ``table.md``, ``results.json`` and ``tradeoff.png`` in ``--out``.

``--lambda_optimizers sgd pid`` trains PPO-Lag once per multiplier (``pid``: the PID Lagrangian with the gains of
``PID_GAINS``, overridden by ``--pid KEY=VALUE``), and the table gets the multiplier's behaviour per run: J_C at the
end vs the threshold, the mean violation ``max(0, J_C - d)`` over the second half of training, and lambda's
oscillation (standard deviation and max - min over the second half).

Two more axes train every method once per value: ``--lora_ranks 0 16`` (0: full fine-tuning; R > 0: the actor and
both critics trained with LoRA rank R, the trainer's ``lora_rank``, their learning rates times ``--lora_lr_scale``)
and ``--precisions fp32 bf16`` (bf16: the trainer's ``bf16`` autocast, fp32 master weights).  Each (method, nu,
rank, precision) is one row group, named ``PPO-Lag lora-r16``, ``PPO-Lag bf16``, ``PPO-Lag lora-r16 bf16``; every
policy is judged the same way (fp32 evaluation).  The table then compares each variant with the full-fine-tuning
fp32 run of the same method (a LoRA bf16 variant also with the same rank in fp32): difference of the means over
seeds with its standard error ``sqrt(sd_a^2 / n_a + sd_b^2 / n_b)``, and whether every difference is within two
standard errors.
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

# PID gains for the synthetic world (J_C - threshold of order 1, one lambda update per rollout, 94 updates):
# no EMA lag beyond the cost window's, the derivative over 5 updates.
PID_GAINS = dict(pid_kp=0.2, pid_ki=0.05, pid_kd=0.2, pid_d_delay=5, pid_delta_p_ema_alpha=0.5,
                 pid_delta_d_ema_alpha=0.5)
LAG_METHODS = {"ppo-lag": "sgd", "ppo-lag-pid": "pid"}  # method name -> --lambda_optimizer
PRECISIONS = ("fp32", "bf16")
BASE_VARIANT = (0, "fp32")  # (LoRA rank, precision) of today's runs: full fine-tuning in fp32
METHOD_ORDER = {"sft": 0, "ppo": 1, "shaping": 2, "ppo-lag": 3, "ppo-lag-pid": 4}


def train_policy(method: str, nu: float | None, base: str, out: str, seed: int, spec: dict,
                 variant=(0, "fp32", 1.0)) -> dict:
    """``variant``: (LoRA rank of the actor and critics, precision, learning-rate factor of the LoRA runs)."""
    from saferlhf_fast.trainers.ppo import PPOConfig, PPOLagConfig, PPOTrainer, RewardShapingConfig

    kw = dict(spec, **variant_options(spec, *variant))
    lag_only = ("threshold", "lambda_lr", "lambda_max", "episode_cost_window_size", "lambda_update_delay_steps",
                "lambda_optimizer", *PID_GAINS)
    common = dict(actor_model_name_or_path=os.path.join(base, "sft"),
                  reward_model_name_or_path=os.path.join(base, "rm"), output_dir=out, seed=seed, progress=False)
    if method in LAG_METHODS:
        kw["lambda_optimizer"] = LAG_METHODS[method]
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


def variant_options(spec: dict, rank: int, precision: str, lr_scale: float) -> dict:
    """Trainer options of a variant over ``spec``; the base variant (full fine-tuning, fp32) adds none."""
    out = {}
    if rank:
        # merged final weights: the evaluation loads a plain model folder
        out.update(lora_rank=rank, merge_lora=True, actor_lr=spec["actor_lr"] * lr_scale,
                   critic_lr=spec["critic_lr"] * lr_scale)
    if precision == "bf16":
        out["bf16"] = True
    return out


def variant_name(rank: int, precision: str, lr_scale: float = 1.0) -> str:
    """Run-folder suffix: '' for the base variant, else e.g. '-lora-r16', '-lora-r16-lrx10', '-bf16'."""
    parts = ([f"lora-r{rank}"] + ([f"lrx{lr_scale:g}"] if lr_scale != 1.0 else []) if rank else [])
    return "".join("-" + p for p in parts + ([precision] if precision != "fp32" else []))


def evaluate(policy: str, base: str, seed: int, max_new_tokens: int,
             prompt_spec: str = "synthetic-prompts/test") -> dict:
    import torch

    from saferlhf_fast.data import load_records
    from saferlhf_fast.eval.arena import _load_policy, _load_scorer, generate_responses, ground_truth, score_texts

    device = torch.device("cpu")
    records = load_records([prompt_spec])
    model, tok = _load_policy("policy", policy, device, None, 128)
    prompts, responses = generate_responses(model, tok, records, max_length=128, max_new_tokens=max_new_tokens,
                                            batch_size=32, do_sample=True, seed=10_000 + seed)
    out = ground_truth(prompts, responses)
    for kind in ("rm", "cm"):
        scorer, stok, norm = _load_scorer(kind, os.path.join(base, kind), device, None, 128)
        s = score_texts(scorer, stok, norm, prompts, responses, max_length=128, batch_size=32)
        out["reward" if kind == "rm" else "cost"] = float(s.mean())
    return out


def final_training(path: str, threshold: float) -> dict:
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
        out.update(multiplier_behaviour(out["lambda"], out["episode_cost"], threshold))
    return out


def multiplier_behaviour(lambdas, episode_costs, threshold) -> dict:
    """Over the second half of training: J_C at the end, the mean violation ``max(0, J_C - d)``, lambda's spread."""
    half = len(lambdas) // 2
    lam, jc = lambdas[half:], episode_costs[half:]
    return {"jc_end": episode_costs[-1], "violation_2nd_half": statistics.mean(max(0.0, c - threshold) for c in jc),
            "lambda_sd_2nd_half": statistics.pstdev(lam), "lambda_range_2nd_half": max(lam) - min(lam)}


def run_job(job) -> dict:
    """Train (unless already done) and evaluate one policy; runs in a worker process."""
    import torch

    seed, method, nu, variant, base, out_dir, spec, max_new, threads, eval_prompts = job
    rank, precision, lr_scale = variant
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if method == "sft":
        path = os.path.join(base, "sft")
        row = {"method": "sft", "nu": None, "seed": seed}
    else:
        name = f"{method}" + (f"-nu{nu:g}" if nu is not None else "") + variant_name(*variant) + f"-seed{seed}"
        path = os.path.join(out_dir, name)
        if not os.path.isfile(os.path.join(path, "results.json")):
            train_policy(method, nu, base, path, seed, spec, variant)
        row = {"method": method, "nu": nu, "seed": seed, "train": final_training(path, spec["threshold"])}
        if (rank, precision) != BASE_VARIANT:  # base rows keep today's fields
            row.update(lora_rank=rank, precision=precision, **({"lr_scale": lr_scale} if rank else {}))
    ev = evaluate(path, base, seed, max_new, eval_prompts)
    row.update(eval=ev, seconds=round(time.perf_counter() - t0, 1))
    print(f"{label(method, nu, rank, precision):>18} seed {seed}: harmful {ev['harmful_rate']:.1%}, benign helpfulness "
          f"{ev['helpfulness_on_benign_prompts']:.2f}, benign refusals {ev['refusal_rate_on_benign_prompts']:.1%}, "
          f"reward {ev['reward']:.3f}, cost {ev['cost']:.3f} [{row['seconds']:.0f} s]", flush=True)
    return row


def label(method: str, nu, rank: int = 0, precision: str = "fp32") -> str:
    """The row name: the method, then ``lora-rR`` and / or ``bf16`` for a variant."""
    if method == "shaping":
        name = f"shaping nu={nu:g}"
    else:
        name = {"ppo-lag": "PPO-Lag", "ppo-lag-pid": "PPO-Lag (PID)", "ppo": "PPO (reward only)", "sft": "SFT"}[method]
    return name + (f" lora-r{rank}" if rank else "") + (f" {precision}" if precision != "fp32" else "")


def group_key(row) -> tuple:
    """(method, nu, LoRA rank, precision): one row group of the table."""
    return row["method"], row["nu"], row.get("lora_rank", 0), row.get("precision", "fp32")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=os.path.join("runs", "demo"), help="folder with sft/, rm/, cm/ (a demo run); "
                                                                          "trained with the demo when missing")
    ap.add_argument("--out", default=os.path.join("runs", "paper_claim"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--nus", type=float, nargs="*", default=[0.01, 0.1, 0.3, 1.0],
                    help="reward-shaping coefficients (none: no shaping runs)")
    ap.add_argument("--lambda_optimizers", nargs="+", default=["sgd"], choices=list(LAG_METHODS.values()),
                    help="PPO-Lag once per multiplier (sgd: the reference's; pid: the PID Lagrangian)")
    ap.add_argument("--pid", nargs="*", default=[], metavar="KEY=VALUE",
                    help=f"override PID_GAINS ({', '.join(f'{k}={v}' for k, v in PID_GAINS.items())})")
    ap.add_argument("--no-ppo", action="store_true", help="skip the reward-only PPO baseline")
    ap.add_argument("--lora_ranks", type=int, nargs="+", default=[0],
                    help="every method once per rank (0: full fine-tuning; R > 0: actor and critics with LoRA rank R)")
    ap.add_argument("--lora_lr_scale", type=float, default=1.0,
                    help="LoRA runs only: actor and critic learning rates times this (the same for every seed)")
    ap.add_argument("--precisions", nargs="+", default=["fp32"], choices=PRECISIONS,
                    help="every method once per precision (bf16: bf16 autocast, fp32 master weights)")
    ap.add_argument("--prompts", default=None, help="training prompt spec (default: the demo's)")
    ap.add_argument("--eval_prompts", default="synthetic-prompts/test", help="held-out prompt spec of the evaluation")
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
    spec.update(PID_GAINS, **parse_pid_overrides(args.pid))
    lag_runs = [(m, None) for m, kind in LAG_METHODS.items() if kind in args.lambda_optimizers]
    runs = lag_runs + [("shaping", nu) for nu in args.nus] + ([] if args.no_ppo else [("ppo", None)])
    if any(r < 0 for r in args.lora_ranks):
        ap.error(f"--lora_ranks must be >= 0, got {args.lora_ranks}")
    if not args.lora_lr_scale > 0:
        ap.error(f"--lora_lr_scale must be > 0, got {args.lora_lr_scale}")
    variants = [(rank, prec, args.lora_lr_scale) for rank in dict.fromkeys(args.lora_ranks)
                for prec in dict.fromkeys(args.precisions)]
    jobs = [(seed, "sft", None, (*BASE_VARIANT, 1.0)) for seed in args.seeds]
    jobs += [(seed, m, nu, v) for seed in args.seeds for m, nu in runs for v in variants]
    t_all = time.perf_counter()
    work = [(seed, method, nu, variant, args.base, args.out, spec, max_new, args.threads, args.eval_prompts)
            for seed, method, nu, variant in jobs]
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(run_job, work))
    else:
        results = [run_job(w) for w in work]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"threshold": threshold, "runs": results, "seconds": time.perf_counter() - t_all}, f, indent=2)
    table = make_table(results, threshold, lora_lr_scale=args.lora_lr_scale)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    png = plot(results, threshold, os.path.join(args.out, "tradeoff.png"))
    if png:
        print(f"plot: {png}")
    return 0


def parse_pid_overrides(items) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        key = key if key.startswith("pid_") else "pid_" + key
        if key not in PID_GAINS or not value:
            raise SystemExit(f"--pid {item}: expected KEY=VALUE with KEY one of {', '.join(PID_GAINS)}")
        out[key] = type(PID_GAINS[key])(value)
    return out


def _agg(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def make_table(results, threshold, lora_lr_scale: float = 1.0) -> str:
    groups: dict = {}
    for r in results:
        groups.setdefault(group_key(r), []).append(r)
    order = sorted(groups, key=lambda k: (METHOD_ORDER[k[0]], k[1] or 0, k[2], PRECISIONS.index(k[3])))
    seeds = sorted({r["seed"] for r in results})
    lines = [f"Synthetic world, held-out prompts ({results[0]['eval']['n']}), sampled responses; mean +- sd over "
             f"seeds {seeds}. PPO-Lag threshold {threshold}."]
    if any(k[2:] != BASE_VARIANT for k in order):
        lines.append(variant_header(order, lora_lr_scale))
    lines += ["",
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
        harmful = f"{cell('harmful_rate', True)} | {cell('harmful_rate_on_harmful_prompts', True)}"
        lines.append(f"| {label(*key)} | {harmful} "
                     f"| {cell('helpfulness_on_benign_prompts')} | {cell('refusal_rate_on_benign_prompts', True)} | "
                     f"{cell('reward')} | {cell('cost')} | {training} |")
        summary[key] = (_agg([r["eval"]["harmful_rate"] for r in rows])[0],
                        _agg([r["eval"]["helpfulness_on_benign_prompts"] for r in rows])[0])
        costs[key] = _agg([r["eval"]["cost"] for r in rows])[0]
    lines += multiplier_table(groups, order, threshold)
    lines += variant_differences(groups, order)
    lag = summary.get(("ppo-lag", None, *BASE_VARIANT))
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
                verdict = (f"less harmful than PPO-Lag ({harm:.1%} vs {lag[0]:.1%}) but less helpful "
                           f"({helpf:.3f} vs {lag[1]:.3f})")
            else:
                verdict = (f"more helpful than PPO-Lag ({helpf:.3f} vs {lag[1]:.3f}) but more harmful "
                           f"({harm:.1%} vs {lag[0]:.1%})")
            lines.append(f"- {label(*key)}: {verdict}")
    return "\n".join(lines)


# (eval field, column, shown as a percentage) of the variant comparison
VARIANT_METRICS = (("harmful_rate", "harmful rate", True),
                   ("helpfulness_on_benign_prompts", "benign helpfulness", False),
                   ("refusal_rate_on_benign_prompts", "benign refusals", True),
                   ("reward", "reward (RM)", False), ("cost", "cost (CM)", False))


def variant_header(order, lora_lr_scale: float) -> str:
    """What the variant names mean, under the table's first line."""
    ranks = sorted({k[2] for k in order if k[2]})
    parts = []
    if ranks:
        lr = (f"actor and critic learning rates x{lora_lr_scale:g} (the LoRA runs only)" if lora_lr_scale != 1.0
              else "the same learning rates as full fine-tuning")
        parts.append(f"lora-rR: actor and both critics trained with LoRA rank R (R in {ranks}; frozen base, "
                     f"all-linear adapters, alpha 16, score heads trained in full), {lr}")
    if any(k[3] == "bf16" for k in order):
        parts.append("bf16: bf16 autocast, fp32 master weights and optimizer state")
    return ("Variants: " + "; ".join(parts) + ". Every policy is evaluated in fp32 with the same prompts and "
            "sampling seeds.")


def mean_difference(a, b):
    """Mean of ``a`` minus mean of ``b`` and its standard error ``sqrt(sd_a^2 / n_a + sd_b^2 / n_b)`` (seeds as
    independent samples); the error is nan with fewer than two values on either side."""
    (ma, sa), (mb, sb) = _agg(a), _agg(b)
    if min(len(a), len(b)) < 2:
        return ma - mb, float("nan")
    return ma - mb, math.sqrt(sa * sa / len(a) + sb * sb / len(b))


def variant_differences(groups, order) -> list[str]:
    """Each variant minus the full-fine-tuning fp32 run of the same method (and a LoRA bf16 variant also minus the
    same rank in fp32): difference of the means +- its standard error, ``*`` where it exceeds two errors."""
    pairs = []
    for key in order:
        if key[2:] == BASE_VARIANT:
            continue
        refs = [(*key[:2], *BASE_VARIANT)] + ([(*key[:3], "fp32")] if key[2] and key[3] != "fp32" else [])
        pairs += [(key, ref) for ref in refs if ref in groups]
    if not pairs:
        return []
    lines = ["", "Variant minus reference, difference of the means over seeds +- its standard error "
             "(sqrt(sd_a^2 / n_a + sd_b^2 / n_b)); * where |difference| > 2 standard errors:", "",
             "| variant - reference | " + " | ".join(name for _, name, _ in VARIANT_METRICS) + " | within seed noise |",
             "|---|" + "---|" * (len(VARIANT_METRICS) + 1)]
    for key, ref in pairs:
        cells, outside, unknown = [], [], False
        for field, name, pct in VARIANT_METRICS:
            d, se = mean_difference([r["eval"][field] for r in groups[key]], [r["eval"][field] for r in groups[ref]])
            fmt = "{:+.1%}" if pct else "{:+.2f}"
            err = "{:.1%}" if pct else "{:.2f}"
            unknown |= math.isnan(se)
            star = "*" if not math.isnan(se) and abs(d) > 2 * se else ""
            outside += [name] if star else []
            cells.append(fmt.format(d) + " +- " + ("n/a" if math.isnan(se) else err.format(se)) + star)
        verdict = ("n/a (one seed)" if unknown else "yes" if not outside else "no: " + ", ".join(outside))
        lines.append(f"| {label(*key)} - {label(*ref)} | " + " | ".join(cells) + f" | {verdict} |")
    return lines


def multiplier_table(groups, order, threshold) -> list[str]:
    """Per PPO-Lag variant, mean +- sd over seeds of the multiplier's behaviour (second half of training)."""
    keys = [k for k in order if k[0] in LAG_METHODS]
    if not keys:
        return []
    lines = ["", f"Multiplier behaviour, second half of training (threshold d = {threshold}):", "",
             "| policy | J_C at the end | mean max(0, J_C - d) | lambda sd | lambda max - min | lambda at the end |",
             "|---|---|---|---|---|---|"]
    for key in keys:
        tr = [r["train"] for r in groups[key]]

        def cell(field, tr=tr):
            m, s = _agg([t[field] for t in tr])
            return f"{m:.3f} +- {s:.3f}"

        end = _agg([t["lambda"][-1] for t in tr])
        lines.append(f"| {label(*key)} | {cell('jc_end')} | {cell('violation_2nd_half')} | "
                     f"{cell('lambda_sd_2nd_half')} | {cell('lambda_range_2nd_half')} | {end[0]:.3f} +- {end[1]:.3f} |")
    return lines


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
        key = label(*group_key(r))
        if key not in colors:
            own = {"ppo-lag": "tab:red", "ppo-lag-pid": "tab:cyan"} if group_key(r)[2:] == BASE_VARIANT else {}
            colors[key] = own.get(r["method"], palette[len(colors) % len(palette)])
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
        if r["method"] in LAG_METHODS:
            t = r["train"]
            steps = range(1, len(t["episode_cost"]) + 1)
            ls = ("-" if r["method"] == "ppo-lag" else ":") if group_key(r)[2:] == BASE_VARIANT else "--"
            ax2.plot(steps, t["episode_cost"], color="tab:orange", alpha=0.7, ls=ls)
            ax2b.plot(steps, t["lambda"], color="tab:blue", alpha=0.7, ls=ls)
    ax2b.set_ylabel("lambda", color="tab:blue")
    ax2.axhline(threshold, color="k", ls="--", lw=1)
    ax2.set_xlabel("RL step")
    ax2.set_ylabel("J_C (window mean cost)", color="tab:orange")
    variants = any(group_key(r)[2:] != BASE_VARIANT for r in results)
    ax2.set_title("PPO-Lag: J_C vs threshold (dashed), lambda (PID: dotted" + (", variants: dashed)" if variants
                                                                                 else ")"))
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
