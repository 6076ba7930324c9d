"""One PPO-Lagrangian step, ours vs a straightforward reference-style step, timed interleaved in one process.

    python bench/bench_ppo_step.py                      # Llama h256/i688/4 layers/4 heads, V 8192, 16 prompts x 16
                                                         # tokens, exactly 64 new tokens, 2 threads
    python bench/bench_ppo_step.py --layers 6 --reps 7 --csv bench/results/ppo_step.csv
    python bench/bench_ppo_step.py --algorithm ppo       # reward only (one critic, no cost model)

A thin wrapper: the baseline step, the set-up and the timing loop live in ``saferlhf_fast.benchmarks.ppo_step``
(also behind ``saferlhf-fast bench ppo-step``, which writes the common benchmark CSV).  ``--csv`` here appends the
one-row-per-engine CSV of bench/results/ppo_step.csv; ``--rows-csv`` the common one.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from saferlhf_fast.benchmarks import harness
from saferlhf_fast.benchmarks.ppo_step import (
    PHASES,
    ReferenceStep,
    RefScoreModel,
    build,
    format_summary,
    make_trainer,
    our_step,
    rows,
    run,
    workload_from_args,
    write_json,
    write_legacy_csv,
)

# bench/trl_compare.py imports PHASES, build, make_trainer and our_step from here
__all__ = ["PHASES", "RefScoreModel", "ReferenceStep", "build", "make_trainer", "our_step", "main"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algorithm", choices=["ppo-lag", "ppo"], default="ppo-lag")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt_len", type=int, default=16)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--top_k", type=int, default=50, help="sampling top-k of both (the reference inherits "
                                                          "transformers' default 50)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--memory", action="store_true", help="also measure the peak memory of one step per engine")
    ap.add_argument("--csv", default=None, help="append one row per engine to this CSV")
    ap.add_argument("--rows-csv", default=None, help="append the common benchmark rows (harness columns) here")
    ap.add_argument("--json", default=None, help="write the full result here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    harness.set_command("python bench/bench_ppo_step.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None
                                                                            else argv)))
    result = run(workload_from_args(args), device=args.device, reps=args.reps, warmup=args.warmup,
                 memory=args.memory, echo=lambda s: print(s, flush=True))
    print(format_summary(result["summary"]))
    if args.json:
        write_json(args.json, result)
    if args.csv:
        write_legacy_csv(args.csv, result["summary"])
    if args.rows_csv:
        harness.write_rows(args.rows_csv, rows(result, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
