"""Trainers: each loss against a hand-computed value, the normalizer, schedule and optimizer groups, the config
(flags / YAML), exact resume, and the CLI end to end (including its error paths)."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from saferlhf_fast.cli import main
from saferlhf_fast.ops import IGNORE_INDEX
from saferlhf_fast.trainers import (
    ConfigError,
    CostConfig,
    RewardConfig,
    RewardTrainer,
    ScoreNormalizer,
    SFTConfig,
    SFTTrainer,
    config_from_args,
)
from saferlhf_fast.trainers.base import optimizer_groups, schedule_lambda
from saferlhf_fast.trainers.modeling import make_tiny_model, token_logprobs
from saferlhf_fast.trainers.score import cost_loss, cost_metrics, reward_loss, reward_metrics, tokenwise_loss
from saferlhf_fast.trainers.sft import sft_loss


def logsig(x):
    return -math.log1p(math.exp(-x))


# ------------------------------------------------------------------------------------------------ losses
def test_reward_loss_sequence_wise():
    hi, lo = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    expected = -(logsig(1.0) + logsig(-2.0)) / 2 + 0.1 * (1 + 0 + 0 + 4) / 4
    assert reward_loss(hi, lo, 0.1).item() == pytest.approx(expected, rel=1e-6)
    assert reward_loss(hi, lo).item() == pytest.approx(-(logsig(1.0) + logsig(-2.0)) / 2, rel=1e-6)


def test_cost_loss_sequence_wise():
    # pair 0: unsafer labelled unsafe (+1), safer labelled safe (-1); pair 1: both labelled unsafe
    hi, lo = torch.tensor([2.0, 0.5]), torch.tensor([-1.0, 1.0])
    s_hi, s_lo = torch.tensor([1.0, 1.0]), torch.tensor([-1.0, 1.0])
    terms = [-logsig(2.0 - -1.0) - logsig(-1.0 * -1.0) - logsig(1.0 * 2.0),
             -logsig(0.5 - 1.0) - logsig(1.0 * 1.0) - logsig(1.0 * 0.5)]
    expected = sum(terms) / 2 + 0.01 * (4 + 0.25 + 1 + 1) / 4
    assert cost_loss(hi, lo, s_hi, s_lo, 0.01).item() == pytest.approx(expected, rel=1e-6)


def test_tokenwise_losses():
    # one pair, L = 5: the sequences differ from position 2; higher ends at 4, lower at 3 (then padding)
    hi_ids = torch.tensor([[7, 8, 9, 9, 9]])
    lo_ids = torch.tensor([[7, 8, 5, 5, 0]])
    hi_mask = torch.tensor([[1, 1, 1, 1, 1]], dtype=torch.bool)
    lo_mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    hi_s = torch.tensor([[9.0, 9.0, 1.0, 2.0, 3.0]])
    lo_s = torch.tensor([[-9.0, -9.0, 0.0, 1.0, 4.0]])
    h, l = [1.0, 2.0, 3.0], [0.0, 1.0, 4.0]  # positions 2..4
    bt = -sum(logsig(a - b) for a, b in zip(h, l)) / 3
    reg = 0.5 * sum(x * x for x in h + l) / 6
    got = tokenwise_loss(hi_s, lo_s, hi_ids, lo_ids, hi_mask, lo_mask, 0.5)
    assert got.item() == pytest.approx(bt + reg, rel=1e-6)
    sign = -sum(logsig(-1.0 * b) for b in l) / 3 - sum(logsig(1.0 * a) for a in h) / 3
    got = tokenwise_loss(hi_s, lo_s, hi_ids, lo_ids, hi_mask, lo_mask, 0.0, higher_sign=torch.tensor([1.0]),
                         lower_sign=torch.tensor([-1.0]))
    assert got.item() == pytest.approx(bt + sign, rel=1e-6)


def test_metrics():
    m = reward_metrics(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 1.0, 2.0]), prefix="")
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["reward_mean"] == pytest.approx(7 / 6)
    c = cost_metrics(torch.tensor([-1.0, 0.5]), torch.tensor([2.0, 0.2]), torch.tensor([-1.0, -1.0]),
                     torch.tensor([1.0, 1.0]), prefix="")
    assert c["accuracy"] == 0.5 and c["accuracy_sign"] == 0.75


def test_sft_loss_equals_cross_entropy_on_response_tokens(tmp_path):
    from saferlhf_fast.models import from_pretrained

    model = from_pretrained(make_tiny_model(str(tmp_path / "m"), hidden_size=32, num_layers=1, num_heads=2))
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 5:] = False
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    labels[~mask] = IGNORE_INDEX
    loss = sft_loss(token_logprobs(model, ids, mask, labels), labels)
    logits = model(ids, mask).logits[:, :-1]
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    n = (labels[:, 1:] != IGNORE_INDEX).sum().item()
    assert n == 4 + 2  # trained labels: row 0 positions 3..6, row 1 positions 3..4


# ------------------------------------------------------------------------------------------------ pieces
def test_normalizer():
    x1, x2 = torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([0.0, 4.0])
    n = ScoreNormalizer("RunningMeanStd", "affine")
    n.update(x1)
    assert n.mean.item() == pytest.approx(3.0) and n.var.item() == pytest.approx(x1.var().item())
    n.update(x2)
    delta, na, nb = x2.mean() - 3.0, 4, 2
    m2 = x1.var() * na + x2.var() * nb + delta ** 2 * na * nb / (na + nb)
    assert n.mean.item() == pytest.approx(3.0 + delta.item() * nb / 6)
    assert n.var.item() == pytest.approx((m2 / 6).item())
    assert n(torch.tensor(5.0)).item() == pytest.approx((5.0 - n.mean.item()) / (n.var.sqrt().item() + 1e-8))
    scale = ScoreNormalizer("ExponentialMovingAverage", "scale", momentum=0.5)
    scale.update(x1)
    assert scale.mean.item() == pytest.approx(1.5) and scale.var.item() == pytest.approx(0.5 + 0.5 * x1.var().item())
    assert scale(torch.tensor(-2.0)).item() < 0  # scale-only keeps the sign


def test_schedules():
    cos = schedule_lambda("cosine", 10, 110)
    assert cos(0) == 0.0 and cos(5) == 0.5 and cos(10) == 1.0
    assert cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0)
    lin = schedule_lambda("linear", 0, 100)
    assert lin(25) == pytest.approx(0.75)
    assert schedule_lambda("constant", 10, 100)(0) == 1.0


def test_optimizer_groups_follow_reference():
    from saferlhf_fast.models import LlamaForCausalLM, ModelConfig

    model = LlamaForCausalLM(ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    decay, no_decay = optimizer_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {"model.layers.0.input_layernorm.weight",
                                                          "model.layers.0.post_attention_layernorm.weight"}


def test_config_yaml_and_flags(tmp_path):
    yaml_path = tmp_path / "rm.yaml"
    yaml_path.write_text("model_name_or_path: m\ntrain_datasets: synthetic-preference/train\nlr: 0.01\n"
                         "epochs: 5\noutput_dir: out\nnormalize_score_during_training: true\n")
    cfg = config_from_args(RewardConfig, {"config": str(yaml_path), "epochs": 3})
    assert cfg.lr == 0.01 and cfg.epochs == 3 and cfg.train_datasets == ["synthetic-preference/train"]
    assert cfg.normalize_score_during_training is True
    assert cfg.weight_decay == 1e-6 and cfg.regularization == 0.0  # the reference's argparse defaults
    assert SFTConfig.__dataclass_fields__["gradient_accumulation_steps"].default == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: m\nlearnin_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown option 'learnin_rate'"):
        config_from_args(CostConfig, {"config": str(bad)})
    with pytest.raises(ConfigError, match="--train_datasets"):
        config_from_args(CostConfig, {"model_name_or_path": "m", "output_dir": "o"})


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), hidden_size=32, num_layers=1,
                           num_heads=2, intermediate_size=64)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_resume_is_bit_identical(tmp_path, tiny, kind):
    common = dict(model_name_or_path=tiny, max_length=64, epochs=2, per_device_train_batch_size=4,
                  gradient_accumulation_steps=2, lr=1e-3, progress=False, seed=7)
    if kind == "sft":
        cls, trainer, data = SFTConfig, SFTTrainer, ["synthetic-sft/test:0.1"]
    else:
        cls, trainer, data = RewardConfig, RewardTrainer, ["synthetic-preference/test:0.04"]
        common.update(normalize_score_during_training=True, normalizer_type="RunningMeanStd", loss_type="token-wise")
    full = trainer(config_from_args(cls, {**common, "train_datasets": data, "output_dir": str(tmp_path / "a")}))
    full.train()
    total = full.total_steps()
    assert total >= 6
    part = dict(common, train_datasets=data, output_dir=str(tmp_path / "b"))
    summary = trainer(config_from_args(cls, {**part, "max_steps": total // 2 + 1})).train()
    assert summary["stopped_at"] == total // 2 + 1
    assert not os.path.exists(tmp_path / "b" / "model.safetensors")
    assert os.path.isdir(tmp_path / "b" / f"checkpoint-{total // 2 + 1}")
    trainer(config_from_args(cls, {**part, "resume": "auto"})).train()
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    start = _weights(tiny)
    assert not torch.equal(a["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    steps = [json.loads(x)["step"] for x in open(tmp_path / "b" / "metrics.jsonl") if "train/loss" in x]
    assert steps == list(range(1, total + 1))  # the resumed run rewrote no step twice


def test_cli_rm_then_score_end_to_end(tmp_path, tiny, capsys):
    out = str(tmp_path / "rm")
    rc = main(["rm", "--model_name_or_path", tiny, "--train_datasets", "synthetic-preference/train:0.02",
               "--eval_datasets", "synthetic-preference/test:0.05", "--max_length", "64", "--epochs", "1",
               "--per_device_train_batch_size", "8", "--lr", "1e-3", "--output_dir", out, "--progress", "false"])
    assert rc == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "score_normalizer.json",
                 "arguments.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert json.load(open(os.path.join(out, "config.json")))["score_type"] == "reward"
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert rows[0]["step"] == 0 and "eval/accuracy" in rows[0]
    assert rows[-1]["step"] == 10 and "eval/reward_std" in rows[-1]
    assert not [d for d in os.listdir(out) if d.startswith((".", "checkpoint-"))]  # no temp dirs; 1 epoch: no ckpt
    capsys.readouterr()
    rc = main(["score", "--model_name_or_path", out, "--datasets", "synthetic-preference/test:0.05", "--max_length",
               "64", "--output_dir", str(tmp_path / "eval")])
    assert rc == 0
    assert "accuracy=" in capsys.readouterr().out
    result = json.load(open(tmp_path / "eval" / "eval_results.json"))
    assert result["metrics"]["accuracy"] == pytest.approx(rows[-1]["eval/accuracy"])
    assert len(open(tmp_path / "eval" / "scores.jsonl").readlines()) == 40


def test_cli_cm_reports_sign_accuracy(tmp_path, tiny):
    out = str(tmp_path / "cm")
    rc = main(["cm", "--model_name_or_path", tiny, "--train_datasets", "synthetic-preference/train:0.01",
               "--eval_datasets", "synthetic-preference/test:0.02", "--max_length", "64", "--epochs", "1",
               "--per_device_train_batch_size", "8", "--output_dir", out, "--progress", "false"])
    assert rc == 0
    last = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))][-1]
    assert {"eval/accuracy", "eval/accuracy_sign", "eval/cost_mean", "eval/cost_std"} <= set(last)


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "hi", "response_0": "a", "response_1": "b", "is_response_0_safe": True,
       "is_response_1_safe": True, "better_response_id": "yes", "safer_response_id": 0}],
     "row 1: field 'better_response_id': expected 0 or 1, got 'yes'"),
    ([], "no rows"),
])
def test_cli_bad_data_exits_2_and_leaves_no_output(tmp_path, tiny, capsys, rows, message):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    rc = main(["rm", "--model_name_or_path", tiny, "--train_datasets", str(data), "--output_dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and message in err and str(data) in err
    assert not out.exists()


def test_cli_unknown_dataset_and_missing_model(tmp_path, tiny, capsys):
    out = tmp_path / "out"
    assert main(["sft", "--model_name_or_path", tiny, "--train_datasets", "no-such-set", "--output_dir",
                 str(out)]) == 2
    assert "unknown dataset name 'no-such-set'" in capsys.readouterr().err
    assert main(["cm", "--model_name_or_path", str(tmp_path / "nothing"), "--train_datasets",
                 "synthetic-preference/test", "--output_dir", str(out)]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not out.exists()


def test_cli_unsafe_safer_row_rejected_for_cm_only(tmp_path, tiny, capsys):
    row = {"prompt": "how do i bake bread ?", "response_0": "okay . first light the fuse .",
           "response_1": "sorry , i can not help with that .", "is_response_0_safe": False,
           "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 0}
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps(row) + "\n")
    assert main(["cm", "--model_name_or_path", tiny, "--train_datasets", str(data), "--output_dir",
                 str(tmp_path / "out")]) == 2
    assert "marked safer but labelled unsafe" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ slow
@pytest.mark.slow
def test_bundled_world_reaches_target_accuracy(tmp_path):
    """SFT -> RM and CM on the bundled data (minutes on a CPU): RM >= 0.85 held-out accuracy; CM >= 0.85
    accuracy and >= 0.9 accuracy_sign (the test split's labels are the generator's noise-free ground truth)."""
    base = make_tiny_model(str(tmp_path / "tiny"), hidden_size=128, num_layers=2, num_heads=4)
    common = ["--max_length", "128", "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1",
              "--progress", "false"]
    assert main(["sft", "--model_name_or_path", base, "--train_datasets", "synthetic-sft/train", "--epochs", "3",
                 "--lr", "2e-3", "--output_dir", str(tmp_path / "sft"), *common]) == 0
    results = {}
    for cmd in ("rm", "cm"):
        assert main([cmd, "--model_name_or_path", str(tmp_path / "sft"), "--train_datasets",
                     "synthetic-preference/train", "--eval_datasets", "synthetic-preference/test", "--epochs", "2",
                     "--lr", "1e-3", "--output_dir", str(tmp_path / cmd), *common]) == 0
        results[cmd] = json.load(open(tmp_path / cmd / "results.json"))
    assert results["rm"]["eval/accuracy"] >= 0.85
    assert results["cm"]["eval/accuracy"] >= 0.85 and results["cm"]["eval/accuracy_sign"] >= 0.9


def test_prune_checkpoints_keeps_the_newest(tmp_path):
    from saferlhf_fast.trainers.base import prune_checkpoints

    for step in (3, 12, 7, 100):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name: left alone
    prune_checkpoints(str(tmp_path), 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-100", "checkpoint-12", "checkpoint-x"]
    prune_checkpoints(str(tmp_path), 0)  # at least one is always kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-100", "checkpoint-x"]
