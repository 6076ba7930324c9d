#!/usr/bin/env python
"""Write the bundled synthetic Safe RLHF data and its tokenizer (deterministic: same seed, same bytes).

    python scripts/make_synthetic_data.py                 # writes saferlhf_fast/data/bundled/
    python scripts/make_synthetic_data.py --check         # regenerates into a temp dir and compares

The world's rules live in saferlhf_fast/data/synthetic.py and are written out in bundled/README.md.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import sys
import tempfile
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from saferlhf_fast.data import synthetic
from saferlhf_fast.data.sources import BUNDLED_DIR
from saferlhf_fast.data.tokenizer import train_tokenizer

SIZES = {
    "preference_train": 4000, "preference_test": 800,
    "sft_train": 3000, "sft_test": 300,
    "prompts_train": 1500, "prompts_test": 300,
}


def build(seed: int) -> dict[str, list[dict]]:
    return {
        "preference_train": synthetic.make_preference_rows(SIZES["preference_train"], "train", seed, noise=True),
        "preference_test": synthetic.make_preference_rows(SIZES["preference_test"], "test", seed, noise=False),
        "sft_train": synthetic.make_sft_rows(SIZES["sft_train"], "train", seed),
        "sft_test": synthetic.make_sft_rows(SIZES["sft_test"], "test", seed),
        "prompts_train": synthetic.make_prompt_rows(SIZES["prompts_train"], "train", seed),
        "prompts_test": synthetic.make_prompt_rows(SIZES["prompts_test"], "test", seed),
    }


def write(out_dir: str, seed: int) -> dict[str, list[dict]]:
    os.makedirs(out_dir, exist_ok=True)
    sets = build(seed)
    for name, rows in sets.items():
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    # The tokenizer sees the training files only (plus every phrase of the world, so no word is split into bytes).
    texts = synthetic.tokenizer_corpus(sets["preference_train"] + sets["sft_train"] + sets["prompts_train"])
    train_tokenizer(texts, os.path.join(out_dir, "tokenizer"))
    return sets


def stats(sets: dict[str, list[dict]]) -> str:
    lines = []
    for name, rows in sets.items():
        c = Counter()
        for r in rows:
            c["harmful prompt"] += synthetic.is_harmful_prompt(r["prompt"])
            if "response" in r:
                c["refusal"] += synthetic.is_refusal(r["response"])
                c["unsafe"] += synthetic.is_unsafe(r["prompt"], r["response"])
            if "response_0" in r:
                truth_b = int(synthetic.helpfulness(r["prompt"], r["response_1"])
                              > synthetic.helpfulness(r["prompt"], r["response_0"]))
                truth_s = int(synthetic.harmlessness(r["prompt"], r["response_1"])
                              > synthetic.harmlessness(r["prompt"], r["response_0"]))
                c["better agrees with truth"] += r["better_response_id"] == truth_b
                c["safer agrees with truth"] += r["safer_response_id"] == truth_s
                c["better != safer"] += r["better_response_id"] != r["safer_response_id"]
                c["responses labelled unsafe"] += (not r["is_response_0_safe"]) + (not r["is_response_1_safe"])
        parts = ", ".join(f"{k} {v / len(rows):.3f}" for k, v in sorted(c.items()))
        lines.append(f"{name}: {len(rows)} rows; {parts}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(BUNDLED_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare with --out")
    args = parser.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            write(tmp, args.seed)
            names = sorted(f"{k}.jsonl" for k in SIZES)
            names += ["tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]
            bad = [n for n in names if not os.path.exists(os.path.join(args.out, n))
                   or not filecmp.cmp(os.path.join(tmp, n), os.path.join(args.out, n), shallow=False)]
        print("bundled data is up to date" if not bad else f"differs from the generator: {', '.join(bad)}")
        return 1 if bad else 0
    sets = write(args.out, args.seed)
    print(stats(sets))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
