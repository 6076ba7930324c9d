"""DPO: the span of tokens (first differing token included, each sequence's pads excluded) against a hand
computation with the full log_softmax, the reference's off-by-one shown to differ, and the CLI end to end."""
import json

import pytest
import torch
import torch.nn.functional as F

from saferlhf_fast.cli import main
from saferlhf_fast.models import from_pretrained
from saferlhf_fast.ops import IGNORE_INDEX
from saferlhf_fast.trainers.dpo import dpo_loss, dpo_span_labels
from saferlhf_fast.trainers.modeling import make_tiny_model, token_logprobs

PAD = 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    return make_tiny_model(str(root / "m"), hidden_size=32, num_layers=2, num_heads=2, seed=5)


def batch():
    # prompt 11 12 13 | better: 20 21 eos(1)            | worse: 20 22 23 eos(1)
    # the first differing token is index 4 (21 vs 22); better ends at 5, worse at 6; better has one pad.
    better = [11, 12, 13, 20, 21, 1, PAD]
    worse = [11, 12, 13, 20, 22, 23, 1]
    ids = torch.tensor([better, worse])
    mask = torch.tensor([[1] * 6 + [0], [1] * 7], dtype=torch.bool)
    return ids, mask


def test_span_labels_boundary():
    ids, mask = batch()
    labels = dpo_span_labels(ids, mask)
    I = IGNORE_INDEX
    assert labels[0].tolist() == [I, I, I, I, 21, 1, I]
    assert labels[1].tolist() == [I, I, I, I, 22, 23, 1]


def test_identical_pair_is_an_error():
    ids = torch.tensor([[5, 6, 1], [5, 6, 1]])
    with pytest.raises(ValueError, match="identical"):
        dpo_span_labels(ids, torch.ones_like(ids, dtype=torch.bool))


def test_prefix_response_differs_at_eos():
    ids = torch.tensor([[5, 6, 1, PAD], [5, 6, 7, 1]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    labels = dpo_span_labels(ids, mask)
    assert labels[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 1, IGNORE_INDEX]
    assert labels[1].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7, 1]


def _full_logps(model, ids, mask):
    logits = model(ids, mask).logits.float()
    return F.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, L-1]: token t at t-1


def test_dpo_loss_matches_hand_computation(tiny):
    torch.manual_seed(0)
    policy = from_pretrained(tiny)
    ref = from_pretrained(tiny)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids, mask = batch()
    labels = dpo_span_labels(ids, mask)
    lp = token_logprobs(policy, ids, mask, labels).sum(-1)
    with torch.no_grad():
        rlp = token_logprobs(ref, ids, mask, labels).sum(-1)
    loss, metrics = dpo_loss(lp, rlp, 0.1)
    full_p, full_r = _full_logps(policy, ids, mask).detach(), _full_logps(ref, ids, mask)
    # tokens 4..5 of the better row, 4..6 of the worse row (log-prob of token t sits at index t - 1)
    d_w = (full_p[0, 3:5] - full_r[0, 3:5]).sum()
    d_l = (full_p[1, 3:6] - full_r[1, 3:6]).sum()
    expected = -F.logsigmoid(0.1 * (d_w - d_l))
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert metrics["reward_margin"] == pytest.approx(float(0.1 * (d_w - d_l)), rel=1e-4, abs=1e-7)
    assert metrics["better_sample_reward"] == pytest.approx(float(0.1 * d_w), rel=1e-4, abs=1e-7)
    assert metrics["reward"] == pytest.approx(float(0.1 * (d_w + d_l)), rel=1e-4, abs=1e-7)  # the reference's sum
    # the reference's slice [diverge, end + 1] of the log-prob array: skips token 4, counts the pad after the end
    bug_w = (full_p[0, 4:6] - full_r[0, 4:6]).sum()
    bug_l = (full_p[1, 4:7] - full_r[1, 4:7]).sum()
    assert abs(float(-F.logsigmoid(0.1 * (bug_w - bug_l))) - float(expected)) > 1e-6
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


def test_cli_dpo(tiny, tmp_path):
    out = tmp_path / "dpo"
    rc = main(["dpo", "--model_name_or_path", tiny, "--train_datasets", "synthetic-preference/train:0.008",
               "--eval_datasets", "synthetic-preference/test:0.02", "--output_dir", str(out), "--epochs", "1",
               "--per_device_train_batch_size", "8", "--lr", "1e-3", "--max_length", "96", "--progress", "false"])
    assert rc == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in rows if "train/loss" in r]
    assert len(train) == 4
    for key in ("reward", "better_sample_reward", "worse_sample_reward", "reward_accuracy", "reward_margin"):
        assert f"train/{key}" in train[0] and f"eval/{key}" in rows[-1]
    assert train[0]["train/loss"] == pytest.approx(-F.logsigmoid(torch.tensor(0.0)).item(), rel=1e-4)
    assert (out / "model.safetensors").exists()
