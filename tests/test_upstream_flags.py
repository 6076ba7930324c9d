"""Every flag of the reference implementation's commands (tests/upstream/flags.json, read from its argparse at
commit e8cca16) parses here with its meaning: aliases fill the same option, launcher / DeepSpeed flags are
accepted and say what they map to."""
import json
import os

import pytest

from saferlhf_fast.cli import _config_commands, build_parser
from saferlhf_fast.trainers.config import config_from_args
from saferlhf_fast.trainers.launcher_flags import launcher_notes

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "upstream", "flags.json")) as f:
    UPSTREAM = json.load(f)["flags"]
CONFIGS = {name: cls for name, cls, *_ in _config_commands()}


def _subparser(command):
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return parser, sub.choices[command]


@pytest.mark.parametrize("command", sorted(UPSTREAM))
def test_every_upstream_flag_is_accepted(command):
    _, sub = _subparser(command)
    ours = {s for a in sub._actions for s in a.option_strings}
    missing = sorted(set(UPSTREAM[command]) - ours)
    assert not missing, f"{command}: the reference's {missing} are not accepted"


@pytest.mark.parametrize("command, alias, field, value", [
    ("sft", "--learning_rate", "lr", 1e-3),
    ("rm", "--learning_rate", "lr", 3e-4),
    ("dpo", "--learning_rate", "lr", 1e-6),
    ("ppo", "--actor_learning_rate", "actor_lr", 2e-6),
    ("ppo-lag", "--critic_learning_rate", "critic_lr", 4e-6),
    ("ppo-lag", "--lambda_learning_rate", "lambda_lr", 0.05),
])
def test_aliases_fill_the_same_option(command, alias, field, value, tmp_path):
    parser, _ = _subparser(command)
    required = {"sft": ["--model_name_or_path", "m", "--train_datasets", "d", "--output_dir", str(tmp_path)],
                "rm": ["--model_name_or_path", "m", "--train_datasets", "d", "--output_dir", str(tmp_path)],
                "dpo": ["--model_name_or_path", "m", "--train_datasets", "d", "--output_dir", str(tmp_path)],
                "ppo": ["--actor_model_name_or_path", "a", "--reward_model_name_or_path", "r",
                        "--train_datasets", "d", "--output_dir", str(tmp_path)]}
    required["ppo-lag"] = required["ppo"] + ["--cost_model_name_or_path", "c"]
    args = parser.parse_args([command, *required[command], alias, str(value)])
    cfg = config_from_args(CONFIGS[command], args)
    assert getattr(cfg, field) == value


def test_arena_corner_names_and_our_old_spelling(tmp_path):
    parser, _ = _subparser("arena")
    base = ["arena", "--reward_model_name_or_path", "r", "--cost_model_name_or_path", "c", "--datasets", "d"]
    new = parser.parse_args([*base, "--red_corner_model_name_or_path", "red", "--blue_corner_model_name_or_path", "b"])
    old = parser.parse_args([*base, "--red_corpus_model_name_or_path", "red", "--blue_corpus_model_name_or_path", "b"])
    for args in (new, old):
        cfg = config_from_args(CONFIGS["arena"], args)
        assert (cfg.red_corner_model_name_or_path, cfg.blue_corner_model_name_or_path) == ("red", "b")


def test_yaml_keys_may_use_the_reference_spelling(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("learning_rate: 0.001\nmodel_name_or_path: m\ntrain_datasets: [d]\noutput_dir: o\n")
    cfg = config_from_args(CONFIGS["sft"], {"config": str(path)})
    assert cfg.lr == 0.001


def test_launcher_flags_are_accepted_and_say_what_they_map_to(tmp_path):
    parser, _ = _subparser("sft")
    args = parser.parse_args(["sft", "--model_name_or_path", "m", "--train_datasets", "d", "--output_dir", "o",
                              "--local_rank", "0", "--zero_stage", "3", "--offload", "none",
                              "--deepspeed_config", "ds.json"])
    notes = launcher_notes(args, CONFIGS["sft"])
    assert any(n.startswith("--zero_stage 3:") and "FSDP2" in n for n in notes)
    assert any(n.startswith("--deepspeed_config ds.json:") for n in notes)
    assert not any("local_rank" in n for n in notes)  # what the launcher passes is silent
    assert not any(n.startswith("--offload") for n in notes)  # sft owns --offload (FSDP2 CPU offload)
    cfg = config_from_args(CONFIGS["sft"], args)
    assert cfg.offload == "none"
    parser, _ = _subparser("score")
    args = parser.parse_args(["score", "--model_name_or_path", "m", "--datasets", "d", "--offload", "all"])
    assert launcher_notes(args, CONFIGS["score"]) == [launcher_notes({"offload": "all"}, CONFIGS["score"])[0]]
    assert "no effect" in launcher_notes(args, CONFIGS["score"])[0]


def test_ppo_scores_are_raw_unless_normalization_is_asked_for():
    for command in ("ppo", "ppo-lag", "ppo-reward-shaping"):
        cfg_cls = CONFIGS[command]
        fields = {f.name: f.default for f in cfg_cls.__dataclass_fields__.values()}
        assert fields["normalize_reward"] is False
        if command != "ppo":
            assert fields["normalize_cost"] is False
        assert fields["gradient_accumulation_steps"] == 1


# Defaults we deliberately keep different (docs/upstream.md says why): W&B needs an account and a network, so
# metrics.jsonl is the default sink; the reference's save_interval 1000000 means "never mid-run", our 0 the same
# (checkpoints at epoch ends only).
DELIBERATE_DEFAULTS = {"log_type", "save_interval"}
with open(os.path.join(HERE, "upstream", "flags.json")) as f:
    UPSTREAM_DEFAULTS = json.load(f)["defaults"]


@pytest.mark.parametrize("command", sorted(UPSTREAM_DEFAULTS))
def test_defaults_are_the_reference_argparse_defaults(command):
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(CONFIGS[command])}
    differ = {}
    for flag, theirs in UPSTREAM_DEFAULTS[command].items():
        name = flag[2:]
        if name not in fields or name in DELIBERATE_DEFAULTS:
            continue
        f = fields[name]
        ours = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if ours != theirs and not (ours in (None, []) and theirs in (None, [])):
            differ[flag] = (theirs, ours)
    assert not differ, f"{command}: (reference, ours) defaults differ: {differ}"


def test_save_16bit_writes_the_final_model_in_half_precision(tmp_path):
    """--save_16bit (with --bf16 True, as the reference's scripts): the final weights are bf16, checkpoints fp32."""
    import torch
    from safetensors import safe_open

    from saferlhf_fast.cli import main
    from saferlhf_fast.trainers.modeling import make_tiny_model

    base = make_tiny_model(str(tmp_path / "base"), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    out = tmp_path / "sft"
    rc = main(["sft", "--model_name_or_path", base, "--train_datasets", "synthetic-sft/train:0.004",
               "--output_dir", str(out), "--max_length", "64", "--bf16", "True", "--save_16bit", "True",
               "--per_device_train_batch_size", "2",
               "--save_interval", "1", "--progress", "false"])
    assert rc == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    (ckpt,) = sorted(p for p in out.iterdir() if p.name.startswith("checkpoint-"))[-1:]
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_logged_lr_is_after_the_schedule_step(tmp_path):
    """The reference logs param_groups[0]['lr'] after engine.step() (which steps the schedule), with
    int(ratio * steps) warm-up steps: at step s the logged lr is lr * schedule(s)."""
    import json
    import math

    from saferlhf_fast.cli import main
    from saferlhf_fast.trainers.modeling import make_tiny_model

    base = make_tiny_model(str(tmp_path / "base"), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    out = tmp_path / "sft"
    assert main(["sft", "--model_name_or_path", base, "--train_datasets", "synthetic-sft/train:0.004",
                 "--output_dir", str(out), "--max_length", "64", "--per_device_train_batch_size", "2",
                 "--lr", "1e-3", "--lr_scheduler_type", "linear", "--lr_warmup_ratio", "0.3",
                 "--progress", "false"]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if "train/lr" in line]
    total = len(rows)
    warmup = int(0.3 * total)
    for step, row in enumerate(rows, start=1):
        expected = step / max(1, warmup) if step < warmup else max(0.0, 1 - (step - warmup) / max(1, total - warmup))
        assert math.isclose(row["train/lr"], 1e-3 * expected, rel_tol=1e-6, abs_tol=1e-12), (step, row["train/lr"])


def test_normalize_score_without_a_type_is_the_identity_normalizer(tmp_path):
    """The reference: --normalize_score_during_training without --normalizer_type instantiates its
    IdentityNormalizer (it counts; scores pass unchanged)."""
    from saferlhf_fast.cli import main
    from saferlhf_fast.trainers.modeling import make_tiny_model
    from saferlhf_fast.trainers.score import read_score_info

    base = make_tiny_model(str(tmp_path / "base"), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    out = tmp_path / "rm"
    assert main(["rm", "--model_name_or_path", base, "--train_datasets", "synthetic-preference/train:0.002",
                 "--output_dir", str(out), "--max_length", "64", "--per_device_train_batch_size", "4",
                 "--normalize_score_during_training", "True", "--progress", "false"]) == 0
    info = read_score_info(str(out))
    assert info["do_normalize"] and info["normalizer_type"] is None
    assert (info["mean"], info["var"]) == (0.0, 1.0) and info["count"] > 0


@pytest.mark.parametrize("kind", ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                  "constant_with_warmup"])
def test_every_scheduler_choice_is_transformers_schedule(kind):
    """The reference's six --lr_scheduler_type choices follow transformers' get_scheduler step by step."""
    import torch
    from transformers import get_scheduler

    from saferlhf_fast.trainers.base import schedule_lambda

    for command in ("sft", "ppo-lag"):
        names = [f for f in CONFIGS[command].__dataclass_fields__ if f.endswith("lr_scheduler_type")]
        for name in names:
            assert kind in CONFIGS[command].__dataclass_fields__[name].metadata["choices"], (command, name)
    lr, warmup, total = 2e-5, 3, 17
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    hf = get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=total)
    ours = schedule_lambda(kind, warmup, total, lr)
    for step in range(total + 3):
        assert ours(step) * lr == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15), (kind, step)
        opt.step()
        hf.step()
