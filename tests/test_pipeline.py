"""The demo pipeline end to end at toy sizes (seconds): every stage runs, the report, plot and command lines exist."""
import json
import os

import pytest

from saferlhf_fast.pipeline import run_demo


@pytest.mark.parametrize("parallel", [False, True])
def test_demo_quick(tmp_path, parallel):
    out = tmp_path / "demo"
    result = run_demo(str(out), quick=True, parallel=parallel)
    report = json.load(open(out / "report.json"))
    assert set(result.seconds) >= {"SFT", "PPO-Lagrangian", "total"}
    assert report["arena"]["n"] > 0 and "ground_truth" in report["arena"]
    assert len(report["lambda_over_time"]) >= 1
    assert os.path.isfile(out / "ppo_lag" / "model.safetensors") and os.path.isfile(out / "report.md")
    commands = open(out / "commands.sh").read()
    for command in ("saferlhf-fast sft", "saferlhf-fast rm", "saferlhf-fast cm", "saferlhf-fast ppo-lag",
                    "saferlhf-fast arena"):
        assert command in commands
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert os.path.isfile(out / "training.png")
