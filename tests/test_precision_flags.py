"""``--bf16 True`` / ``--fp16 True`` (the flags the reference's scripts pass) on the CPU: every command runs end to end
under autocast on a tiny model and reports finite metrics; the sampler takes half-precision logits."""
import json
import math

import pytest
import torch

from saferlhf_fast.cli import main
from saferlhf_fast.engine.sampling import SamplingParams, native_sampling_ok, next_token
from saferlhf_fast.trainers.modeling import make_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory, make_score_model):
    root = tmp_path_factory.mktemp("precision_models")
    actor = make_tiny_model(str(root / "actor"), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                            seed=1)
    return {"actor": actor, "rm": make_score_model(actor, str(root / "rm"), 2),
            "cm": make_score_model(actor, str(root / "cm"), 3, bias=0.3)}


def _args(command: str, m: dict) -> list[str]:
    """Flags of a few-second run of ``command`` on the tiny models."""
    pairs = ["--train_datasets", "synthetic-preference/train:0.005", "--per_device_train_batch_size", "4",
             "--epochs", "1", "--progress", "false"]
    rl = ["--actor_model_name_or_path", m["actor"], "--reward_model_name_or_path", m["rm"], "--train_datasets",
          "synthetic-prompts/train:0.003", "--eval_datasets", "synthetic-prompts/test:0.003", "--max_new_tokens", "6",
          "--per_device_prompt_batch_size", "4", "--per_device_train_batch_size", "4", "--progress", "false"]
    return {
        "sft": ["--model_name_or_path", m["actor"], "--train_datasets", "synthetic-sft/train:0.002",
                "--per_device_train_batch_size", "4", "--epochs", "1", "--progress", "false"],
        "rm": ["--model_name_or_path", m["actor"], *pairs, "--eval_datasets", "synthetic-preference/test:0.01"],
        "cm": ["--model_name_or_path", m["actor"], *pairs, "--eval_datasets", "synthetic-preference/test:0.01"],
        "dpo": ["--model_name_or_path", m["actor"], *pairs],
        "ppo": rl,
        "ppo-lag": [*rl, "--cost_model_name_or_path", m["cm"]],
        "ppo-reward-shaping": [*rl, "--cost_model_name_or_path", m["cm"]],
        "score": ["--model_name_or_path", m["rm"], "--datasets", "synthetic-preference/test:0.01"],
        "arena": ["--red_corner_model_name_or_path", m["actor"], "--blue_corner_model_name_or_path", m["actor"],
                  "--reward_model_name_or_path", m["rm"], "--cost_model_name_or_path", m["cm"],
                  "--datasets", "synthetic-prompts/test:0.005", "--max_new_tokens", "6"],
    }[command] + ["--max_length", "48"]


def _numbers(obj):
    """Every int / float in a JSON value (booleans excluded)."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def _metrics(command: str, out) -> list[dict]:
    """The metric records the run wrote."""
    if command == "score":
        return [json.load(open(out / "eval_results.json"))["metrics"]]
    if command == "arena":
        summary = json.load(open(out / "arena.json"))
        return [{side: summary[side] for side in ("red", "blue")}]
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def _expected_keys(command: str) -> set[str]:
    return {"sft": {"train/loss"}, "rm": {"eval/accuracy", "eval/reward_mean"}, "cm": {"eval/cost_mean"},
            "dpo": {"train/loss"}, "ppo": {"train/actor_loss", "train/reward_critic_loss", "train/reward"},
            "ppo-lag": {"train/actor_loss", "train/cost_critic_loss", "train/lambda", "train/cost"},
            "ppo-reward-shaping": {"train/actor_loss", "train/cost"}, "score": {"accuracy", "reward_mean"},
            "arena": {"red", "blue"}}[command]


CASES = [(c, "--bf16") for c in ("sft", "rm", "cm", "dpo", "ppo", "ppo-lag", "ppo-reward-shaping", "score", "arena")]
CASES += [(c, "--fp16") for c in ("sft", "ppo-lag", "score", "arena")]


@pytest.mark.parametrize("command, flag", CASES)
def test_command_runs_under_autocast(models, tmp_path, command, flag):
    out = tmp_path / "out"
    rc = main([command, *_args(command, models), flag, "True", "--output_dir", str(out)])
    assert rc == 0
    records = _metrics(command, out)
    seen = set().union(*(r.keys() for r in records))
    assert _expected_keys(command) <= seen, seen
    values = [v for r in records for v in _numbers(r)]
    assert values and all(math.isfinite(v) for v in values)


@pytest.mark.parametrize("flag", ["--bf16", "--fp16"])
def test_score_flag_is_applied(models, tmp_path, flag):
    """The half-precision scores are the fp32 ones up to that format's rounding, and not the fp32 ones."""
    runs = {}
    for name, extra in (("fp32", []), ("half", [flag, "True"])):
        out = tmp_path / name
        assert main(["score", *_args("score", models), *extra, "--output_dir", str(out)]) == 0
        rows = [json.loads(line) for line in open(out / "scores.jsonl")]
        runs[name] = torch.tensor([[r["better"], r["worse"]] for r in rows])
    diff = (runs["half"] - runs["fp32"]).abs().max()
    tol = 0.05 if flag == "--bf16" else 0.01  # |score| ~ 5: bf16 keeps 8 bits, fp16 11 bits of mantissa
    assert 0 < float(diff) <= tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("params", [SamplingParams(do_sample=False), SamplingParams(top_k=5, temperature=0.7)])
def test_native_sampler_takes_half_logits(dtype, params):
    """bf16 / fp16 logits through the compiled sampler: the tokens and log-probs of the same values in fp32."""
    torch.manual_seed(0)
    logits = (torch.randn(4, 96) * 3).to(dtype)
    if not native_sampling_ok(logits.float(), params):
        pytest.skip("the compiled sampler is not built")
    half = next_token(logits, params, None, torch.Generator().manual_seed(5), native=True)
    full = next_token(logits.float(), params, None, torch.Generator().manual_seed(5), native=True)
    assert half[1].dtype == torch.float32
    assert torch.equal(half[0], full[0]) and torch.equal(half[1], full[1])


def test_mixed_precision_in_a_single_process_is_the_autocast_flag(monkeypatch):
    """``--mixed_precision bf16`` outside torchrun means ``--bf16`` (FSDP2's policy needs torchrun); combined with
    the other dtype's flag it is one clear error."""
    from saferlhf_fast.trainers.config import ConfigError
    from saferlhf_fast.trainers.sft import SFTConfig

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    base = dict(model_name_or_path="m", train_datasets=["synthetic-sft/train"], output_dir="o")
    cfg = SFTConfig(**base, mixed_precision="bf16")
    cfg.validate()
    assert cfg.bf16 and not cfg.fp16
    cfg = SFTConfig(**base, mixed_precision="bf16", fp16=True)
    with pytest.raises(ConfigError, match="--mixed_precision bf16 means --bf16"):
        cfg.validate()
