"""`--critic_backbone shared`: a PPO critic on its scorer's frozen backbone (one copy of each scorer's weights)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_lora import parameter_bytes

from saferlhf_fast.cli import main
from saferlhf_fast.models import from_pretrained
from saferlhf_fast.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_layers
from saferlhf_fast.trainers.config import ConfigError
from saferlhf_fast.trainers.modeling import VALUE_HEAD_CONFIG, VALUE_HEAD_WEIGHTS, SharedScorer, make_tiny_model
from saferlhf_fast.trainers.ppo import PPOLagConfig, PPOTrainer
from saferlhf_fast.trainers.rollout import Rollout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), hidden_size=32, num_layers=2,
                           num_heads=2, intermediate_size=64, seed=1)


@pytest.fixture(scope="module")
def scorers(tiny, tmp_path_factory, make_score_model):
    root = tmp_path_factory.mktemp("scorers")
    return make_score_model(tiny, str(root / "rm"), 2), make_score_model(tiny, str(root / "cm"), 3, bias=0.3)


def _config(tiny, scorers, out, **kw):
    base = dict(actor_model_name_or_path=tiny, reward_model_name_or_path=scorers[0], cost_model_name_or_path=scorers[1],
                train_datasets=["synthetic-prompts/train:0.006"], output_dir=str(out), max_length=64,
                max_new_tokens=6, per_device_prompt_batch_size=4, per_device_train_batch_size=4, progress=False,
                actor_lr=1e-2, critic_lr=1e-2, seed=3, lambda_lr=0.5, actor_lora_rank=4)
    base.update(kw)
    cfg = PPOLagConfig(**base)
    cfg.validate()
    return cfg


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _rollout(vocab, seed=0, b=3, prompt=5, response=6):
    """A micro-batch with left-padded prompts and right-padded responses (rows of different lengths)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (b, prompt + response), generator=g)
    am = torch.ones(b, prompt + response, dtype=torch.bool)
    am[0, :2] = False
    am[1, prompt + 3:] = False
    rm = am[:, prompt:].float()
    return Rollout(ids, am, rm, prompt, ids, ref_logprobs=None, reward=None, cost=None)


@pytest.mark.parametrize("rank", [4, 0])
def test_shared_backbone_is_one_copy_of_each_scorer(tiny, scorers, tmp_path, rank):
    sep = PPOTrainer(_config(tiny, scorers, tmp_path / "sep", critic_lora_rank=rank))
    shared = PPOTrainer(_config(tiny, scorers, tmp_path / "shared", critic_lora_rank=rank, critic_backbone="shared"))
    assert isinstance(shared.reward_model, SharedScorer) and shared.reward_model.critic is shared.critics[0]
    assert isinstance(shared.cost_model, SharedScorer) and shared.cost_model.critic is shared.critics[1]
    # one backbone per scorer less: each scorer's weights minus its head (the shared scorer keeps a frozen copy)
    saved = sum(_bytes(m.parameters()) - _bytes(m.score_head.parameters()) for m in (sep.reward_model, sep.cost_model))
    assert parameter_bytes(sep) - parameter_bytes(shared) == saved
    trained = [n for n, p in shared.critics[0].named_parameters() if p.requires_grad]
    assert all(".lora_" in n or n.startswith("score_head.") for n in trained) and "score_head.weight" in trained
    assert (rank == 0) == (not any(".lora_" in n for n in trained))

    mb = _rollout(sep.actor.config.vocab_size)
    with torch.no_grad():
        # at init (fresh adapters, value head = the scorer's head) the critics' values are the separate ones
        for a, b in zip(sep._all_critic_values(mb), shared._all_critic_values(mb)):
            assert torch.equal(a, b)
        if rank:  # trained adapters do not reach the scorer: its scores stay the separate scorer's, bit for bit
            for critic in shared.critics:
                for m in lora_layers(critic):
                    m.lora_B.weight.normal_(0.0, 0.5)
        for name in ("reward_model", "cost_model"):
            a = sep.end_scores(getattr(sep, name), None, None, mb.input_ids, mb.attention_mask)
            b = shared.end_scores(getattr(shared, name), None, None, mb.input_ids, mb.attention_mask)
            assert torch.equal(a, b), name
        if rank:
            assert not torch.equal(sep._critic_values(sep.critics[0], mb), shared._critic_values(shared.critics[0], mb))


def _same_rows(a, b):
    """The fused pass runs the last layer on the end and column rows together, the separate ones on each set alone:
    equal bit for bit on the CPU (row-independent GEMMs); a GPU library may pick another kernel per row count."""
    if a.device.type == "cpu":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_value_head_critic_shares_the_scoring_pass(tiny, scorers, tmp_path):
    """--critic_lora_rank 0: the scorer's pass also yields the critic's hidden states; the value head on them gives
    the values of the critic's own forward."""
    trainer = PPOTrainer(_config(tiny, scorers, tmp_path / "o", critic_lora_rank=0, critic_backbone="shared"))
    assert trainer.reward_model.fuses and trainer.cost_model.fuses
    mb = _rollout(trainer.actor.config.vocab_size, seed=5)
    hidden = {}
    with torch.no_grad():
        for name, critic in zip(("reward_model", "cost_model"), trainer.critics):
            scorer = getattr(trainer, name)
            fused = trainer._rollout_scores(scorer, None, None, mb, hidden)
            alone = trainer.end_scores(scorer, None, None, mb.input_ids, mb.attention_mask)
            _same_rows(fused, alone)
            values = trainer._critic_values(critic, mb, hidden[id(critic)])
            _same_rows(values, trainer._critic_values(critic, mb))
    assert len(hidden) == 2


def _cli(tiny, scorers, out, *extra):
    return ["ppo-lag", "--actor_model_name_or_path", tiny, "--reward_model_name_or_path", scorers[0],
            "--cost_model_name_or_path", scorers[1], "--train_datasets", "synthetic-prompts/train:0.008",
            "--output_dir", str(out), "--max_length", "64", "--max_new_tokens", "6", "--per_device_prompt_batch_size",
            "4", "--per_device_train_batch_size", "2", "--update_iters", "2", "--progress", "false",
            "--actor_lr", "1e-2", "--critic_lr", "1e-2", "--seed", "3", "--critic_backbone", "shared", *extra]


def test_shared_lora_critics_from_the_command_line_resume_exactly(tiny, scorers, tmp_path):
    lora = ["--lora_rank", "4", "--critic_lora_rank", "8", "--lora_dropout", "0.1"]
    assert main(_cli(tiny, scorers, tmp_path / "a", *lora)) == 0
    assert main(_cli(tiny, scorers, tmp_path / "b", *lora, "--max_steps", "1")) == 0
    assert os.path.isfile(tmp_path / "b" / "checkpoint-1" / "reward_critic" / ADAPTER_WEIGHTS)
    assert main(_cli(tiny, scorers, tmp_path / "b", *lora, "--resume", "auto")) == 0
    # the same math as a separate-backbone LoRA critic (the scorer is the critic's base with adapters disabled)
    assert main(_cli(tiny, scorers, tmp_path / "sep", *lora, "--critic_backbone", "separate")) == 0
    args = json.load(open(tmp_path / "a" / "arguments.json"))
    assert args["critic_backbone"] == "shared"
    for sub, scorer in (("", None), ("reward_critic", scorers[0]), ("cost_critic", scorers[1])):
        if scorer is not None:  # the critic's adapters name the scorer as their base: the user reloads it from there
            cfg = json.load(open(tmp_path / "a" / sub / ADAPTER_CONFIG))
            assert cfg["base_model_name_or_path"] == os.path.abspath(scorer) and cfg["r"] == 8
        a = load_file(str(tmp_path / "a" / sub / ADAPTER_WEIGHTS))
        for other in ("b", "sep"):
            b = load_file(str(tmp_path / other / sub / ADAPTER_WEIGHTS))
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]), (other, sub, k)
    critic = load_file(str(tmp_path / "a" / "reward_critic" / ADAPTER_WEIGHTS))
    assert any(v.abs().max() > 0 for k, v in critic.items() if ".lora_B." in k)


def test_value_head_critics_checkpoint_the_head_and_resume_exactly(tiny, scorers, tmp_path):
    kw = dict(train_datasets=["synthetic-prompts/train:0.008"], per_device_train_batch_size=2, update_iters=2,
              critic_lora_rank=0, critic_backbone="shared")
    PPOTrainer(_config(tiny, scorers, tmp_path / "a", **kw)).train()
    assert PPOTrainer(_config(tiny, scorers, tmp_path / "b", max_steps=1, **kw)).train()["stopped_at"] == 1
    ckpt = tmp_path / "b" / "checkpoint-1" / "cost_critic"
    assert sorted(load_file(str(ckpt / VALUE_HEAD_WEIGHTS))) == ["score_head.bias", "score_head.weight"]
    assert json.load(open(ckpt / VALUE_HEAD_CONFIG))["base_model_name_or_path"] == os.path.abspath(scorers[1])
    assert not os.path.exists(ckpt / "model.safetensors")  # no copy of the backbone per checkpoint
    PPOTrainer(_config(tiny, scorers, tmp_path / "b", resume="auto", **kw)).train()
    start = load_file(os.path.join(scorers[1], "model.safetensors"))
    for sub in ("reward_critic", "cost_critic"):
        a = load_file(str(tmp_path / "a" / sub / "model.safetensors"))  # the final critic: a plain score model
        b = load_file(str(tmp_path / "b" / sub / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (sub, k)
    final = load_file(str(tmp_path / "a" / "cost_critic" / "model.safetensors"))
    assert not torch.equal(final["score_head.weight"], start["score_head.weight"])  # the value head trained
    for k, v in start.items():  # the backbone did not
        if not k.startswith("score_head."):
            assert torch.equal(final[k], v), k
    critic = from_pretrained(str(tmp_path / "a" / "cost_critic"), head="score")
    assert torch.equal(critic.score_head.weight.detach(), final["score_head.weight"])


def test_bad_combinations_exit_2_with_one_line(tiny, scorers, tmp_path, capsys):
    assert main(_cli(tiny, scorers, tmp_path / "x", "--reward_critic_model_name_or_path", tiny)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--critic_backbone shared" in err and "--reward_critic_model_name_or_path" in err
    assert not os.path.exists(tmp_path / "x")
    with pytest.raises(SystemExit) as exit_:
        main(_cli(tiny, scorers, tmp_path / "y", "--critic_backbone", "both"))
    assert exit_.value.code == 2
    assert "--critic_backbone" in capsys.readouterr().err
    assert main(_cli(tiny, scorers, tmp_path / "z", "--backend", "hf")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--critic_backbone shared" in err
    with pytest.raises(ConfigError, match="--cost_critic_model_name_or_path"):
        _config(tiny, scorers, tmp_path / "w", critic_backbone="shared", cost_critic_model_name_or_path=scorers[0])
    _config(tiny, scorers, tmp_path / "v", critic_backbone="shared", reward_critic_model_name_or_path=scorers[0])
    # the same from a YAML config
    yaml = tmp_path / "ppo.yaml"
    yaml.write_text(f"critic_backbone: shared\ncost_critic_model_name_or_path: {tiny}\n")
    assert main([*_cli(tiny, scorers, tmp_path / "u")[:-2], "--config", str(yaml)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--cost_critic_model_name_or_path" in err


def test_resume_refuses_a_change_of_critic_backbone(tiny, scorers, tmp_path):
    PPOTrainer(_config(tiny, scorers, tmp_path / "r", max_steps=1, critic_lora_rank=4)).train()
    with pytest.raises(ConfigError, match="critic_backbone 'separate' -> 'shared'"):
        PPOTrainer(_config(tiny, scorers, tmp_path / "r", resume="auto", critic_lora_rank=4,
                           critic_backbone="shared"))


@pytest.mark.parametrize("command", ["ppo", "ppo-reward-shaping"])
def test_shared_critic_on_the_other_algorithms(tiny, scorers, tmp_path, command):
    out = tmp_path / command
    args = _cli(tiny, scorers, out, "--critic_lora_rank", "0")
    args[0] = command
    if command == "ppo":
        i = args.index("--cost_model_name_or_path")
        del args[i:i + 2]
    assert main(args) == 0
    assert os.path.isfile(out / "reward_critic" / "model.safetensors")


def _torchrun(args):
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "saferlhf_fast.cli", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.distributed
def test_shared_critics_under_torchrun(tiny, scorers, tmp_path):
    """FSDP2 (2 gloo ranks): the critics are sharded and their scorers run the sharded backbone.  LoRA critics train
    as separate-backbone ones under the same launch; value-head critics keep the scorer's backbone."""
    fast = ["--update_iters", "1", "--max_new_tokens", "4", "--per_device_train_batch_size", "2", "--save_interval",
            "1"]
    lora = ["--lora_rank", "4", *fast]
    _torchrun(_cli(tiny, scorers, tmp_path / "sep", *lora, "--critic_backbone", "separate"))
    _torchrun(_cli(tiny, scorers, tmp_path / "shared", *lora))
    for sub in ("reward_critic", "cost_critic"):
        a = load_file(str(tmp_path / "sep" / sub / ADAPTER_WEIGHTS))
        b = load_file(str(tmp_path / "shared" / sub / ADAPTER_WEIGHTS))
        assert a.keys() == b.keys()
        for k in a:
            assert float((a[k] - b[k]).abs().max()) < 2e-6, (sub, k)
    out = tmp_path / "head"
    _torchrun(_cli(tiny, scorers, out, "--actor_lora_rank", "4", "--critic_lora_rank", "0", *fast))
    assert os.path.isfile(out / "checkpoint-1" / "cost_critic" / VALUE_HEAD_WEIGHTS)
    final, start = load_file(str(out / "cost_critic" / "model.safetensors")), load_file(
        os.path.join(scorers[1], "model.safetensors"))
    assert not torch.equal(final["score_head.weight"], start["score_head.weight"])
    assert all(torch.equal(final[k], v) for k, v in start.items() if not k.startswith("score_head."))
