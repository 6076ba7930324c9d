"""``examples/paper_claim.py``'s variant axes (``--lora_ranks``, ``--precisions``) at toy size: the row names, the
run folders, the trainer options of each variant and the variant-minus-reference standard errors."""
import importlib.util
import json
import math
import os
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.fixture(scope="module")
def paper_claim():
    spec = importlib.util.spec_from_file_location("paper_claim", os.path.join(ROOT, "examples", "paper_claim.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variant_names_and_options(paper_claim):
    pc = paper_claim
    assert pc.label("ppo-lag", None) == "PPO-Lag"
    assert pc.label("ppo-lag", None, 16, "fp32") == "PPO-Lag lora-r16"
    assert pc.label("ppo-lag-pid", None, 0, "bf16") == "PPO-Lag (PID) bf16"
    assert pc.label("shaping", 0.1, 8, "bf16") == "shaping nu=0.1 lora-r8 bf16"
    assert pc.variant_name(0, "fp32") == ""  # today's run folders
    assert pc.variant_name(16, "fp32", 10.0) == "-lora-r16-lrx10"
    assert pc.variant_name(16, "bf16") == "-lora-r16-bf16"
    spec = {"actor_lr": 2e-4, "critic_lr": 1e-3}
    assert pc.variant_options(spec, 0, "fp32", 10.0) == {}
    assert pc.variant_options(spec, 0, "bf16", 10.0) == {"bf16": True}
    lora = pc.variant_options(spec, 16, "fp32", 10.0)
    assert lora["lora_rank"] == 16 and lora["merge_lora"] is True
    assert lora["actor_lr"] == pytest.approx(2e-3) and lora["critic_lr"] == pytest.approx(1e-2)


def _row(method, seed, harmful, rank=0, precision="fp32"):
    ev = {"n": 10, "harmful_rate": harmful, "harmful_rate_on_harmful_prompts": harmful,
          "helpfulness_on_benign_prompts": 2.0, "refusal_rate_on_benign_prompts": 0.0, "reward": 0.0, "cost": -5.0}
    row = {"method": method, "nu": None, "seed": seed, "eval": ev}
    if method != "sft":
        row["train"] = {"reward_first": 0.0, "reward_last": 0.0}
    if (rank, precision) != (0, "fp32"):
        row.update(lora_rank=rank, precision=precision)
    return row


def test_difference_of_means_and_its_standard_error(paper_claim):
    pc = paper_claim
    d, se = pc.mean_difference([0.3, 0.5], [0.1, 0.1, 0.1])
    assert d == pytest.approx(0.3) and se == pytest.approx(math.sqrt(0.02 / 2))
    assert math.isnan(pc.mean_difference([0.3], [0.1, 0.2])[1])
    rows = [_row("ppo", s, h) for s, h in ((1, 0.10), (2, 0.12))]
    rows += [_row("ppo", s, h, 16) for s, h in ((1, 0.11), (2, 0.13))]  # +1 point, se 1.4 points: noise
    rows += [_row("ppo", s, h, 0, "bf16") for s, h in ((1, 0.30), (2, 0.31))]  # +19.5 points: not noise
    table = pc.make_table(rows, -4.0)
    lines = {line.split(" | ")[0]: line for line in table.splitlines() if " - PPO" in line}
    assert "| +1.0% +- 1.4% |" in lines["| PPO (reward only) lora-r16 - PPO (reward only)"]
    assert lines["| PPO (reward only) lora-r16 - PPO (reward only)"].endswith("| yes |")
    assert "+19.5% +- 1.1%*" in lines["| PPO (reward only) bf16 - PPO (reward only)"]
    assert lines["| PPO (reward only) bf16 - PPO (reward only)"].endswith("| no: harmful rate |")
    assert "Variants: lora-rR" in table


def test_lora_and_bf16_axes_run_end_to_end(paper_claim, tmp_path, make_score_model, monkeypatch):
    """One seed of PPO-Lag at 2 RL steps, {full, LoRA r4} x {fp32, bf16}, on a tiny base."""
    from saferlhf_fast.trainers.modeling import make_tiny_model

    base = tmp_path / "base"
    sft = make_tiny_model(str(base / "sft"), hidden_size=32, num_layers=1, num_heads=2, seed=1)
    make_score_model(sft, str(base / "rm"), 2)
    make_score_model(sft, str(base / "cm"), 3, bias=0.3)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [
        "paper_claim.py", "--base", str(base), "--out", str(out), "--seeds", "1", "--nus", "--no-ppo",
        "--lora_ranks", "0", "4", "--precisions", "fp32", "bf16", "--lora_lr_scale", "10",
        "--prompts", "synthetic-prompts/train:0.02", "--eval_prompts", "synthetic-prompts/test:0.05", "--jobs", "1"])
    assert paper_claim.main() == 0
    names = ["PPO-Lag", "PPO-Lag bf16", "PPO-Lag lora-r4", "PPO-Lag lora-r4 bf16"]
    table = (out / "table.md").read_text()
    rows = [line.split(" | ")[0][2:] for line in table.splitlines() if line.startswith("| PPO-Lag")]
    assert rows[:4] == names and rows[4:8] == names  # main table, then the multiplier table
    assert rows[8:] == ["PPO-Lag bf16 - PPO-Lag", "PPO-Lag lora-r4 - PPO-Lag", "PPO-Lag lora-r4 bf16 - PPO-Lag",
                        "PPO-Lag lora-r4 bf16 - PPO-Lag lora-r4"]
    assert "x10 (the LoRA runs only)" in table
    assert table.count("| n/a (one seed) |") == 4
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(
        f"ppo-lag{v}-seed{s}" for s in (1,) for v in ("", "-bf16", "-lora-r4-lrx10", "-lora-r4-lrx10-bf16"))
    args = json.loads((out / "ppo-lag-lora-r4-lrx10-bf16-seed1" / "arguments.json").read_text())
    args = args.get("arguments", args)
    assert args["lora_rank"] == 4 and args["bf16"] is True and args["actor_lr"] == pytest.approx(2e-3)
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert "lora_rank" not in next(r for r in runs if r["method"] == "ppo-lag" and "precision" not in r)


@pytest.mark.parametrize("flags", [["--lora_ranks", "-1"], ["--lora_lr_scale", "0"], ["--precisions", "fp16"]])
def test_bad_axis_values_exit_2(paper_claim, flags, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["paper_claim.py", "--base", "/nonexistent", *flags])
    with pytest.raises(SystemExit) as err:
        paper_claim.main()
    assert err.value.code == 2 and flags[0] in capsys.readouterr().err
