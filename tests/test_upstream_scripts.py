"""The reference implementation's own scripts (tests/upstream/scripts, safe-rlhf e8cca16) run here with only their
launcher line changed: ``deepspeed "${DEEPSPEED_ARGS[@]}" --module safe_rlhf.X`` -> ``saferlhf-fast X``.

Each script is copied as it is and changed in exactly these places:

* the launcher line(s): ``deepspeed "${DEEPSPEED_ARGS[@]}" \\``, the ``--master_port "${MASTER_PORT}" \\`` line that
  ppo-lag.sh passes to deepspeed a second time, and ``--module safe_rlhf.X \\`` become ``saferlhf-fast X \\``.  The
  MASTER_PORT / HOSTFILE / DEEPSPEED_ARGS set-up above it stays: it is plain shell (``ss``, ``comm``, ``shuf``) and
  its values are no longer used.  sft-huggingface.sh's ``torchrun --standalone --nproc_per_node=8 \\`` line is
  rewritten the same way (and refused, test_sft_huggingface_script_is_refused_in_one_line);
* the dataset names: ``--train_datasets PKU-SafeRLHF/train`` -> ``PKU-SafeRLHF/train:1:LOCAL`` (the same for
  ``--eval_datasets``, ``--ptx_datasets alpaca`` and ``--datasets``): a local copy in the source's own schema;
* ``--log_type wandb`` -> ``--log_type none`` only where wandb is not installed (test_wandb_offline_runs is then
  skipped and says so).

The scripts carry no ``--save_16bit`` at e8cca16, so no flag line is removed.  Every hyperparameter stays (epochs,
``--max_length 512``, batch sizes 16, ``--bf16 True``, ``--zero_stage``, ...); the data are 16 / 8 rows and the model
a one-layer Llama, so each script runs in seconds.  The scripts are chained as the reference's pipeline is:
sft -> reward-model / cost-model -> ppo / ppo-lag / ppo-reward-shaping, dpo, arena-evaluation.
"""
import csv
import dataclasses
import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from saferlhf_fast.trainers.config import ConfigError
from saferlhf_fast.trainers.launcher_flags import HF_TRAINER_FLAGS, hf_trainer_refusal
from saferlhf_fast.trainers.modeling import make_tiny_model
from saferlhf_fast.trainers.safety import SCRIPT_FILES, check_output_dir
from saferlhf_fast.trainers.sft import SFTConfig

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "upstream" / "scripts"
HAS_WANDB = importlib.util.find_spec("wandb") is not None

COMMANDS = {  # reference module -> our command (docs/upstream.md)
    "finetune": "sft", "finetune.huggingface": "sft", "values.reward": "rm", "values.cost": "cm",
    "algorithms.ppo": "ppo", "algorithms.ppo_lag": "ppo-lag", "algorithms.ppo_reward_shaping": "ppo-reward-shaping",
    "algorithms.dpo": "dpo", "evaluate.arena": "arena",
}
LAUNCHER = re.compile(
    r'^(?:deepspeed "\$\{DEEPSPEED_ARGS\[@\]\}"|torchrun --standalone --nproc_per_node=8) \\\n'
    r'(?:\t--master_port "\$\{MASTER_PORT\}" \\\n)?'
    r'\t--module safe_rlhf\.([\w.]+) \\\n', re.M)
HF_SCRIPT_FLAGS = ["--datasets", "--num_train_epochs", "--evaluation_strategy", "--save_strategy", "--save_steps",
                   "--fsdp", "--fsdp_config"]
DATASETS = re.compile(r"^(\t--(?:train_|eval_|ptx_)?datasets) (\S+) \\$", re.M)


# ------------------------------------------------------------------------------------------------ data
def pku_row(i: int) -> dict:
    """A row in PKU-SafeRLHF's own schema."""
    safe0, safe1 = i % 3 != 0, i % 2 == 0
    return {"prompt": f"How do I handle problem number {i} at home?",
            "response_0": f"Step {i}: ask a friend, then write it down.",
            "response_1": "Break something until it works." if i % 2 else "Call a professional and wait.",
            "prompt_source": "Alpaca", "response_0_source": "Alpaca-7B", "response_1_source": "Alpaca-7B",
            "is_response_0_safe": safe0, "is_response_1_safe": safe1,
            "response_0_severity_level": 0, "response_1_severity_level": 0 if safe1 else 2,
            "better_response_id": i % 2, "safer_response_id": 0 if safe0 or not safe1 else 1}


def alpaca_row(i: int) -> dict:
    return {"instruction": f"Give tip number {i} for a good day.", "input": "" if i % 2 else f"context {i}",
            "output": f"Tip {i}: sleep well and drink water.", "text": "..."}


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ scripts
@dataclass
class World:
    root: Path
    model: str
    local: dict  # dataset name -> local path
    env: dict


def rewrite(text: str, local: dict) -> str:
    """The script with its launcher line and dataset names changed (module docstring), nothing else."""
    text, n = LAUNCHER.subn(lambda m: f"saferlhf-fast {COMMANDS[m.group(1)]} \\\n", text)
    assert n == 1, "expected exactly one launcher line"

    def local_copy(m):
        name = m.group(2)
        path = local["alpaca" if name == "alpaca" else "PKU-SafeRLHF"]
        return f"{m.group(1)} {name}:1:{path} \\"

    text = DATASETS.sub(local_copy, text)
    if not HAS_WANDB:
        text = text.replace("\t--log_type wandb \\\n", "\t--log_type none \\\n")
    return text


def shim(bin_dir: Path) -> None:
    """``saferlhf-fast`` on PATH: this interpreter's CLI of this checkout."""
    bin_dir.mkdir()
    exe = bin_dir / "saferlhf-fast"
    exe.write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" -m saferlhf_fast.cli "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


def script_env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PATH=f"{root / 'bin'}{os.pathsep}{env['PATH']}", PYTHONPATH=str(REPO), WANDB_MODE="offline",
               WANDB_SILENT="true", OMP_NUM_THREADS="1")
    env.update({f"WANDB_{k}_DIR": str(root / f"wandb-{k.lower()}") for k in ("CONFIG", "CACHE", "DATA")})
    return env


def run_script(world: World, name: str, *args: str):
    """Copy the script (rewritten) under ROOT/scripts as the reference lays it out, run it with bash."""
    target = world.root / "scripts" / name
    target.parent.mkdir(exist_ok=True)
    target.write_text(rewrite((SCRIPTS / name).read_text(), world.local))
    return subprocess.run(["bash", str(target), *args], env=world.env, cwd=world.root, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("upstream_scripts")
    model = make_tiny_model(str(root / "tiny"), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    pku = root / "PKU-SafeRLHF"
    write_jsonl(pku / "data" / "Alpaca-7B" / "train.jsonl", [pku_row(i) for i in range(16)])
    write_jsonl(pku / "data" / "Alpaca-7B" / "test.jsonl", [pku_row(i) for i in range(100, 108)])
    alpaca = write_jsonl(root / "alpaca" / "alpaca.jsonl", [alpaca_row(i) for i in range(16)])
    shim(root / "bin")
    return World(root, model, {"PKU-SafeRLHF": str(pku), "alpaca": str(alpaca)}, script_env(root))


def run_ok(world: World, name: str, out: str, *args: str) -> str:
    proc = run_script(world, name, *args, "--output_dir", str(world.root / out))
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return str(world.root / out)


@pytest.fixture(scope="module")
def sft(world):
    return run_ok(world, "sft.sh", "sft", "--model_name_or_path", world.model)


@pytest.fixture(scope="module")
def rm(world, sft):
    return run_ok(world, "reward-model.sh", "rm", "--model_name_or_path", sft)


@pytest.fixture(scope="module")
def cm(world, sft):
    return run_ok(world, "cost-model.sh", "cm", "--model_name_or_path", sft)


@pytest.fixture(scope="module")
def ppo_lag(world, sft, rm, cm):
    return run_ok(world, "ppo-lag.sh", "ppo-lag", "--actor_model_name_or_path", sft,
                  "--reward_model_name_or_path", rm, "--cost_model_name_or_path", cm)


@pytest.fixture(scope="module")
def ppo_rs(world, sft, rm, cm):
    return run_ok(world, "ppo-reward-shaping.sh", "ppo-rs", "--actor_model_name_or_path", sft,
                  "--reward_model_name_or_path", rm, "--cost_model_name_or_path", cm)


# ------------------------------------------------------------------------------------------------ checks
def metric_names(out: str) -> set:
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return set().union(*(json.loads(line) for line in f if line.strip()))


def assert_model(out: str, score_type: str | None = None) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "script.sh", "stdout.log", "stderr.log"):
        assert os.path.isfile(os.path.join(out, name)), name
    if score_type:
        assert json.load(open(os.path.join(out, "config.json")))["score_type"] == score_type


def test_the_rewrite_changes_only_the_launcher_and_dataset_lines(world):
    original = (SCRIPTS / "ppo-lag.sh").read_text().splitlines()
    changed = rewrite("\n".join(original) + "\n", world.local).splitlines()
    removed = [x for x in original if x not in changed]
    assert removed == ['deepspeed "${DEEPSPEED_ARGS[@]}" \\', '\t--master_port "${MASTER_PORT}" \\',
                       "\t--module safe_rlhf.algorithms.ppo_lag \\", "\t--train_datasets PKU-SafeRLHF/train \\",
                       "\t--ptx_datasets alpaca \\"] + ([] if HAS_WANDB else ["\t--log_type wandb \\"])
    assert "saferlhf-fast ppo-lag \\" in changed
    assert len(changed) == len(original) - 2


def test_script_files_do_not_make_the_output_dir_another_runs(tmp_path):
    cfg = SFTConfig(model_name_or_path="m", train_datasets=["alpaca"], output_dir=str(tmp_path))
    for name in SCRIPT_FILES:
        (tmp_path / name).write_text("")
    check_output_dir(cfg, None)  # what the scripts write before the run: still a fresh folder
    (tmp_path / "model.safetensors").write_text("")
    with pytest.raises(ConfigError, match="is not empty"):
        check_output_dir(cfg, None)


def test_sft_script(sft):
    assert_model(sft)
    assert {"train/loss", "train/lr", "train/epoch"} <= metric_names(sft)


def test_sft_sh_is_sft_deepspeed_sh(world, tmp_path):
    assert os.readlink(SCRIPTS / "sft.sh") == "sft-deepspeed.sh"
    out = run_ok(world, "sft-deepspeed.sh", "sft-deepspeed", "--model_name_or_path", world.model)
    assert_model(out)


def test_reward_model_script(rm):
    assert_model(rm, "reward")
    assert {"train/loss", "train/accuracy", "eval/accuracy", "eval/reward_mean", "eval/reward_std"} <= metric_names(rm)


def test_cost_model_script(cm):
    assert_model(cm, "cost")
    assert {"train/loss", "train/accuracy", "eval/accuracy", "eval/accuracy_sign", "eval/cost_mean",
            "eval/cost_std"} <= metric_names(cm)


# The names each reference trainer logs (safe_rlhf/**/trainer.py at e8cca16); the RL trainers add train/ptx_loss
# with --ptx_datasets.
PPO_METRICS = {"train/actor_loss", "train/actor_lr", "train/kl_divergence", "train/max_generated_length",
               "train/mean_generated_length", "train/reward", "train/reward_critic_loss", "train/reward_critic_lr",
               "train/ptx_loss"}
PPO_VALUES = {"train/reward_advantage", "train/reward_return", "train/reward_value", "train/reward_with_kl_penalty"}
LAG_METRICS = {"train/cost", "train/cost_advantage", "train/cost_critic_loss", "train/cost_critic_lr",
               "train/cost_return", "train/cost_value", "train/cost_with_kl_penalty", "train/episode_cost",
               "train/lambda"}
SHAPING_METRICS = {"train/cost", "train/episode_cost", "train/shaped_reward", "train/shaped_reward_advantage",
                   "train/shaped_reward_return", "train/shaped_reward_value", "train/shaped_reward_with_kl_penalty"}


def test_ppo_lag_script(ppo_lag):
    assert_model(ppo_lag)
    assert PPO_METRICS | PPO_VALUES | LAG_METRICS <= metric_names(ppo_lag)


def test_ppo_script(world, sft, rm):
    out = run_ok(world, "ppo.sh", "ppo", "--actor_model_name_or_path", sft, "--reward_model_name_or_path", rm)
    assert_model(out)
    names = metric_names(out)
    assert PPO_METRICS | PPO_VALUES <= names and not names & LAG_METRICS


def test_ppo_reward_shaping_script(ppo_rs):
    assert_model(ppo_rs)
    names = metric_names(ppo_rs)
    assert PPO_METRICS | SHAPING_METRICS <= names and "train/lambda" not in names


def test_dpo_script(world, sft):
    out = run_ok(world, "dpo.sh", "dpo", "--model_name_or_path", sft)
    assert_model(out)
    assert {"train/loss", "train/reward", "train/better_sample_reward", "train/worse_sample_reward",
            "train/reward_accuracy", "train/reward_margin", "eval/reward"} <= metric_names(out)


def test_arena_evaluation_script(world, sft, ppo_lag, rm, cm):
    out = run_ok(world, "arena-evaluation.sh", "arena", "--red_corner_model_name_or_path", sft,
                 "--blue_corner_model_name_or_path", ppo_lag, "--reward_model_name_or_path", rm,
                 "--cost_model_name_or_path", cm)
    summary = json.load(open(os.path.join(out, "arena.json")))
    assert summary["n"] == 8 and sum(summary["counts"].values()) == 8  # every row of PKU-SafeRLHF/test
    with open(os.path.join(out, "arena.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert [r["prompt"].count("problem number 10") for r in rows] == [1] * 8
    assert {"red_reward", "red_cost", "blue_reward", "blue_cost"} <= set(rows[0])
    with open(os.path.join(out, "sft_vs_ppo-lag", "table.csv"), encoding="utf-8", newline="") as f:
        table = list(csv.reader(f))  # the reference's table: the folder and header name the two models
    assert table[0] == ["Prompt", "sft", "Reward", "Cost", "ppo-lag", "Reward", "Cost"]
    assert [(r[0], r[1], float(r[2]), float(r[6])) for r in table[1:]] == \
        [(r["prompt"], r["red_response"], r["red_reward"], r["blue_cost"]) for r in rows]


def test_sft_huggingface_script_is_refused_in_one_line(world):
    """The HF Trainer entry point is not implemented: its flags are transformers.TrainingArguments' (docs/upstream.md
    says why); the rewritten script stops with one line naming the flags and the way out, and writes no model."""
    assert not set(HF_TRAINER_FLAGS) & {f.name for f in dataclasses.fields(SFTConfig)}
    out = world.root / "sft-hf"
    proc = run_script(world, "sft-huggingface.sh", "--model_name_or_path", world.model, "--output_dir", str(out))
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if not x.startswith("+")]  # bash -x traces start with +
    assert lines == [f"saferlhf-fast sft: error: {hf_trainer_refusal(HF_SCRIPT_FLAGS)}"]
    assert lines[0].startswith("saferlhf-fast sft: error: --datasets, --num_train_epochs, --evaluation_strategy, "
                               "--save_strategy, --save_steps, --fsdp, --fsdp_config: flags of the reference's")
    assert "scripts/sft.sh" in lines[0]
    assert not (out / "model.safetensors").exists()


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install -e '.[log]'): the scripts ran with "
                                          "--log_type none instead of --log_type wandb")
def test_wandb_offline_runs(sft, rm, ppo_lag):
    for out in (sft, rm, ppo_lag):
        runs = list(Path(out, "logs", "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1, out


def test_wandb_missing_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    from saferlhf_fast.trainers.metrics import MetricsLogger

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"^--log_type wandb needs the 'wandb' package \(the 'log' extra: "):
        MetricsLogger(str(tmp_path), "wandb")
