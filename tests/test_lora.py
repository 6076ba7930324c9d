"""LoRA on the native decoder (the transformers path: test_lora_hf.py): the adapter math, zero-init identity, what
trains, the adapter-disabled reference, PEFT-format checkpoints that ``peft`` loads onto the transformers model, merged
saves, exact resume, and the training commands from the command line."""
import json
import math
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file

from saferlhf_fast.cli import main
from saferlhf_fast.models import LlamaForCausalLM, LlamaForScore, ModelConfig, from_pretrained
from saferlhf_fast.models.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    TARGETS,
    LoraLinear,
    LoraSpec,
    adapters_disabled,
    apply_lora,
    load_adapter,
    lora_layers,
    resolve_targets,
    trainable_names,
)
from saferlhf_fast.trainers.config import config_from_args
from saferlhf_fast.trainers.modeling import make_tiny_model
from saferlhf_fast.trainers.ppo import PPOLagConfig, PPOTrainer
from saferlhf_fast.trainers.score import RewardConfig, RewardTrainer
from saferlhf_fast.trainers.sft import SFTConfig, SFTTrainer


def tiny_config(**kw):
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    base.update(kw)
    return ModelConfig(**base)


def randomise_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), hidden_size=32, num_layers=2,
                           num_heads=2, intermediate_size=64, seed=1)


@pytest.fixture(scope="module")
def scorers(tiny, tmp_path_factory, make_score_model):
    root = tmp_path_factory.mktemp("scorers")
    return make_score_model(tiny, str(root / "rm"), 2), make_score_model(tiny, str(root / "cm"), 3, bias=0.3)


def batch(vocab, b=3, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row
    return ids, mask


def assert_same_logits(a, b, mask):
    """Equal up to float rounding on the real (non-pad) positions (pad positions of ours are 0)."""
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ the math
def test_adapter_matches_the_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    from saferlhf_fast.models.llama import Linear

    lin = Linear(16, 12)
    lin.load_state_dict(base.state_dict())
    spec = LoraSpec(rank=4, alpha=8.0)
    lora = LoraLinear(lin, spec)
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    x = torch.randn(5, 7, 16)
    a, b = lora.lora_A.weight, lora.lora_B.weight
    expected = x @ lin.weight.T + lin.bias + (alpha_over_r := 8.0 / 4) * ((x @ a.T) @ b.T)
    assert alpha_over_r == spec.scaling
    torch.testing.assert_close(lora(x), expected, rtol=1e-5, atol=1e-6)
    # A is PEFT's kaiming-uniform(a=sqrt(5)): bound 1 / sqrt(in_features); B starts at zero
    fresh = LoraLinear(lin, spec)
    assert float(fresh.lora_A.weight.detach().abs().max()) <= 1 / math.sqrt(16)
    assert float(fresh.lora_A.weight.detach().std()) > 0
    assert not fresh.lora_B.weight.any()
    with adapters_disabled(lora):
        assert torch.equal(lora(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    torch.testing.assert_close(lora.merged_weight(), lin.weight + spec.scaling * b @ a)


def test_zero_init_adapters_leave_outputs_unchanged_and_only_adapters_train():
    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_config())
    ids, mask = batch(96)
    before = lm(ids, mask).logits
    apply_lora(lm, LoraSpec(rank=4, targets=("q_proj", "v_proj")))
    assert torch.equal(lm(ids, mask).logits, before)
    assert trainable_names(lm) and all(".lora_A." in n or ".lora_B." in n for n in trainable_names(lm))
    assert len(lora_layers(lm)) == 2 * 2  # q and v of both layers
    score = LlamaForScore(tiny_config())
    apply_lora(score, LoraSpec(rank=2))
    names = trainable_names(score)
    assert {"score_head.weight", "score_head.bias"} <= set(names)
    assert len(lora_layers(score)) == 2 * len(TARGETS)
    assert all(n.startswith("score_head.") or ".lora_" in n for n in names)


def test_resolve_targets():
    assert resolve_targets(["all-linear"]) == TARGETS
    assert resolve_targets(["q_proj,v_proj"]) == ("q_proj", "v_proj")
    with pytest.raises(ValueError, match="unknown LoRA target 'lm_head'"):
        resolve_targets(["lm_head"])


# ------------------------------------------------------------------------------------------------ CLI + PEFT
def _sft_args(tiny, out, *extra):
    return ["sft", "--model_name_or_path", tiny, "--train_datasets", "synthetic-sft/train:0.01", "--max_length", "64",
            "--per_device_train_batch_size", "4", "--lr", "1e-2", "--progress", "false", "--seed", "5",
            "--lora_rank", "4", "--lora_alpha", "8", "--output_dir", str(out), *extra]


def _hf_and_peft(tiny, folder):
    peft = pytest.importorskip("peft")  # the dev extra
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, folder).eval()


def test_sft_lora_cli_peft_parity_and_merge(tiny, tmp_path):
    out, merged = tmp_path / "sft", tmp_path / "merged"
    assert main(_sft_args(tiny, out)) == 0
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "tokenizer.json"} <= set(os.listdir(out))
    assert not os.path.exists(out / "model.safetensors")
    keys = set(load_file(str(out / ADAPTER_WEIGHTS)))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 2 * len(TARGETS)  # all-linear by default: A and B of 7 projections x 2 layers
    cfg = json.load(open(out / ADAPTER_CONFIG))
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["task_type"] == "CAUSAL_LM"

    ours = apply_lora(from_pretrained(tiny), LoraSpec(rank=4, alpha=8.0))
    load_adapter(ours, str(out))
    assert any(m.lora_B.weight.abs().max() > 0 for m in lora_layers(ours))  # trained
    ids, mask = batch(ours.config.vocab_size)
    theirs = _hf_and_peft(tiny, str(out))
    with torch.no_grad():
        assert_same_logits(ours(ids, mask).logits, theirs(input_ids=ids, attention_mask=mask).logits, mask)
    # --merge_lora: a plain checkpoint with W + (alpha / r) B A, the same model
    assert main(_sft_args(tiny, merged, "--merge_lora", "true")) == 0
    assert os.path.isfile(merged / "model.safetensors") and not os.path.exists(merged / ADAPTER_WEIGHTS)
    with torch.no_grad():
        plain = transformers.AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
        assert_same_logits(plain(input_ids=ids, attention_mask=mask).logits, ours(ids, mask).logits, mask)
        peft_merged = theirs.merge_and_unload().state_dict()
        for k, v in plain.state_dict().items():
            torch.testing.assert_close(v, peft_merged[k], rtol=1e-6, atol=1e-7, msg=k)
    # the adapter folder as an input: its base with the adapters merged in, the --merge_lora weights bit for bit
    loaded = from_pretrained(str(out)).state_dict()
    saved = load_file(str(merged / "model.safetensors"))
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_lora_target_that_names_no_layer_is_one_line_and_exit_2(tiny, tmp_path, capsys):
    """Native: only the seven projections; transformers (the same Llama through --backend hf): its layers' names."""
    assert main(_sft_args(tiny, tmp_path / "a", "--lora_target_modules", "q_proj", "lm_head")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lora_target_modules" in err[0] and "'lm_head'" in err[0]
    assert main(_sft_args(tiny, tmp_path / "b", "--backend", "hf", "--lora_target_modules", "c_attn")) == 2
    # transformers prints a loading progress bar on stderr
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip() and "Loading weights" not in x]
    assert len(err) == 1 and "'c_attn' matches no linear layer of LlamaForCausalLM" in err[0] and "q_proj" in err[0]
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_lora_resume_is_bit_identical(tmp_path, tiny, kind):
    common = dict(model_name_or_path=tiny, max_length=64, epochs=2, per_device_train_batch_size=4,
                  gradient_accumulation_steps=2, lr=1e-2, progress=False, seed=7, lora_rank=4, lora_dropout=0.1)
    if kind == "sft":
        cls, trainer, data = SFTConfig, SFTTrainer, ["synthetic-sft/test:0.1"]
    else:
        cls, trainer, data = RewardConfig, RewardTrainer, ["synthetic-preference/test:0.04"]
    full = trainer(config_from_args(cls, {**common, "train_datasets": data, "output_dir": str(tmp_path / "a")}))
    full.train()
    total = full.total_steps()
    part = dict(common, train_datasets=data, output_dir=str(tmp_path / "b"))
    assert trainer(config_from_args(cls, {**part, "max_steps": total // 2 + 1})).train()["stopped_at"] > 0
    assert os.path.isfile(tmp_path / "b" / f"checkpoint-{total // 2 + 1}" / ADAPTER_WEIGHTS)
    trainer(config_from_args(cls, {**part, "resume": "auto"})).train()
    a, b = load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS)), load_file(str(tmp_path / "b" / ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and (kind == "sft") != ("base_model.model.score_head.weight" in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(a[k].abs().max() > 0 for k in a if ".lora_B." in k)
    # the base stayed frozen: the trainer's weights besides the adapters are the input model's
    start = load_file(os.path.join(tiny, "model.safetensors"))
    for name, p in full.model.named_parameters():
        if name in start:
            assert torch.equal(p.detach(), start[name]), name


# ------------------------------------------------------------------------------------------------ PPO-Lag
def _ppo_config(tiny, scorers, out, **kw):
    base = dict(actor_model_name_or_path=tiny, reward_model_name_or_path=scorers[0], cost_model_name_or_path=scorers[1],
                train_datasets=["synthetic-prompts/train:0.006"], output_dir=str(out), max_length=64,
                max_new_tokens=6, per_device_prompt_batch_size=4, per_device_train_batch_size=4, progress=False,
                actor_lr=1e-2, critic_lr=1e-2, seed=3, lambda_lr=0.5)
    base.update(kw)
    cfg = PPOLagConfig(**base)
    cfg.validate()
    return cfg


def parameter_bytes(trainer) -> int:
    """Bytes of the distinct parameter tensors the trainer's models hold (a tensor shared by two roles counts once)."""
    models = [trainer.actor, trainer.reference, trainer.reward_model, trainer.cost_model, *trainer.critics]
    seen = {p.data_ptr(): p.numel() * p.element_size() for m in models if m is not None for p in m.parameters()}
    return sum(seen.values())


def assert_lora_actor_is_its_own_reference(full, lora, base, ids, mask) -> None:
    """``lora`` (a PPO trainer with a LoRA actor) holds no reference model: its parameter bytes are ``full``'s minus
    one actor plus the adapters; after training, its reference log-probs equal ``base``'s (the input model) bit for
    bit while the actor's differ (the adapters act)."""
    assert lora.reference is None and full.reference is not None
    actor_bytes = sum(p.numel() * p.element_size() for p in full.reference.parameters())
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in lora.actor.named_parameters() if ".lora_" in n)
    assert parameter_bytes(full) - parameter_bytes(lora) == actor_bytes - adapter_bytes
    lora.train()
    assert any(m.lora_B.weight.abs().max() > 0 for m in lora_layers(lora.actor))
    labels = torch.cat([ids[:, 1:], ids.new_full((ids.shape[0], 1), -100)], dim=1)
    with torch.no_grad():
        ref = lora.reference_logprobs(ids, mask, labels)
        assert torch.equal(ref, base.token_logprobs(ids, mask, labels=labels))
        assert not torch.equal(ref, lora.actor.token_logprobs(ids, mask, labels=labels))  # the adapters act


def test_ppo_lag_lora_reference_is_the_disabled_adapter(tiny, scorers, tmp_path):
    full = PPOTrainer(_ppo_config(tiny, scorers, tmp_path / "full"))
    lora = PPOTrainer(_ppo_config(tiny, scorers, tmp_path / "lora", actor_lora_rank=4, critic_lora_rank=0))
    base = from_pretrained(tiny)
    assert_lora_actor_is_its_own_reference(full, lora, base, *batch(base.config.vocab_size, seed=4))


def test_ppo_lag_lora_rollout_generates_with_the_adapters(tiny, scorers, tmp_path, monkeypatch):
    """The trainer's rollout on the eager decode step (the GPU's path) merges the LoRA actor's adapters for the call
    (``generate``'s default) and samples what the actor samples with its adapters on the fly, not what its base
    samples; the actor's parameters are untouched by it."""
    import sys

    from saferlhf_fast.engine import fast_decode as fd
    from saferlhf_fast.engine import generate

    cfg = _ppo_config(tiny, scorers, tmp_path / "lora", actor_lora_rank=4, critic_lora_rank=0)
    lora = PPOTrainer(cfg)
    randomise_adapters(lora.actor, seed=3)
    ids, mask = batch(lora.actor.config.vocab_size, seed=4)
    before = {n: p.detach().clone() for n, p in lora.actor.named_parameters()}
    merges = []
    module = sys.modules["saferlhf_fast.engine.generate"]
    real = module.merged_adapters
    monkeypatch.setattr(module, "merged_adapters", lambda m, enabled=True: merges.append(enabled) or real(m, enabled))
    monkeypatch.setattr(fd, "supported", lambda *a, **k: False)  # the eager step, as on a GPU
    got = lora._generate(ids, mask, seed=9)
    assert merges == [True]
    kw = dict(max_new_tokens=got.response_mask.shape[1], do_sample=True, temperature=cfg.temperature,
              top_p=cfg.top_p, top_k=cfg.top_k, eos_token_id=lora.eos_token_id,
              pad_token_id=lora.tokenizer.pad_token_id, seed=9, fast_decode=False)
    fly = generate(lora.actor, ids, mask, lora_merge=False, **kw)
    assert torch.equal(got.sequences, fly.sequences)
    torch.testing.assert_close(got.logprobs, fly.logprobs, rtol=1e-4, atol=1e-5)
    with adapters_disabled(lora.actor):
        assert not torch.equal(generate(lora.actor, ids, mask, **kw).logprobs, got.logprobs)
    assert all(torch.equal(p.detach(), before[n]) for n, p in lora.actor.named_parameters())
    lora.config.lora_generation = "on-the-fly"  # --lora_generation on-the-fly: no merged copy
    merges.clear()
    again = lora._generate(ids, mask, seed=9)
    assert merges == [False] and torch.equal(again.logprobs, fly.logprobs)


def test_ppo_lag_lora_from_the_command_line(tiny, scorers, tmp_path):
    out = tmp_path / "ppo"
    assert main(["ppo-lag", "--actor_model_name_or_path", tiny, "--reward_model_name_or_path", scorers[0],
                 "--cost_model_name_or_path", scorers[1], "--train_datasets", "synthetic-prompts/train:0.006",
                 "--output_dir", str(out), "--max_length", "64", "--max_new_tokens", "6",
                 "--per_device_prompt_batch_size", "4", "--per_device_train_batch_size", "4", "--progress", "false",
                 "--actor_lr", "1e-2", "--critic_lr", "1e-2", "--lora_rank", "4",
                 "--lora_target_modules", "q_proj", "v_proj"]) == 0
    actor = load_file(str(out / ADAPTER_WEIGHTS))
    assert len(actor) == 2 * 2 * 2 and json.load(open(out / ADAPTER_CONFIG))["target_modules"] == ["q_proj", "v_proj"]
    for critic in ("reward_critic", "cost_critic"):
        weights = load_file(str(out / critic / ADAPTER_WEIGHTS))
        assert "base_model.model.score_head.weight" in weights
        assert json.load(open(out / critic / ADAPTER_CONFIG))["modules_to_save"] == ["score_head"]
    theirs = _hf_and_peft(tiny, str(out))  # the actor loads in peft
    ours = load_adapter(apply_lora(from_pretrained(tiny), LoraSpec(4, 16.0, targets=("q_proj", "v_proj"))), str(out))
    ids, mask = batch(ours.config.vocab_size, seed=2)
    with torch.no_grad():
        assert_same_logits(ours(ids, mask).logits, theirs(input_ids=ids, attention_mask=mask).logits, mask)


def test_ppo_lag_lora_resume_is_bit_identical(tiny, scorers, tmp_path):
    kw = dict(train_datasets=["synthetic-prompts/train:0.008"], per_device_train_batch_size=2, update_iters=2,
              lora_rank=4, lora_dropout=0.1)
    PPOTrainer(_ppo_config(tiny, scorers, tmp_path / "a", **kw)).train()
    assert PPOTrainer(_ppo_config(tiny, scorers, tmp_path / "b", max_steps=1, **kw)).train()["stopped_at"] == 1
    assert os.path.isfile(tmp_path / "b" / "checkpoint-1" / "actor" / ADAPTER_WEIGHTS)
    PPOTrainer(_ppo_config(tiny, scorers, tmp_path / "b", resume="auto", **kw)).train()
    for sub in ("", "reward_critic", "cost_critic"):
        a = load_file(str(tmp_path / "a" / sub / ADAPTER_WEIGHTS))
        b = load_file(str(tmp_path / "b" / sub / ADAPTER_WEIGHTS))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (sub, k)


def test_dpo_lora_reference_is_the_disabled_adapter(tiny, tmp_path):
    from saferlhf_fast.trainers.dpo import DPOConfig, DPOTrainer

    cfg = config_from_args(DPOConfig, dict(model_name_or_path=tiny, train_datasets=["synthetic-preference/train:0.01"],
                                           output_dir=str(tmp_path / "dpo"), max_length=64, lr=1e-2, progress=False,
                                           per_device_train_batch_size=4, lora_rank=4))
    trainer = DPOTrainer(cfg)
    assert trainer.reference is None
    trainer.train()
    assert os.path.isfile(tmp_path / "dpo" / ADAPTER_WEIGHTS)
    rows = [json.loads(x) for x in open(tmp_path / "dpo" / "metrics.jsonl") if "train/loss" in x]
    # step 1: the policy is the reference (B = 0), so both sample rewards are 0; then they move
    assert rows[0]["train/better_sample_reward"] == 0.0 and rows[0]["train/worse_sample_reward"] == 0.0
    assert rows[-1]["train/reward_margin"] != 0.0


def test_generation_sees_the_adapters_on_every_decode_path():
    """The fast CPU decode step packs ``W + (alpha / r) B A``; the eager path applies the adapters on the fly: both
    sample the same tokens with the same log-probs (up to rounding), and not those of the base model."""
    from saferlhf_fast.engine import generate

    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_config(num_key_value_heads=4))
    ids, mask = batch(96, seed=5)
    kw = dict(max_new_tokens=8, do_sample=True, seed=11, eos_token_id=1, pad_token_id=0)
    base = generate(lm, ids, mask, fast_decode=False, **kw)
    apply_lora(lm, LoraSpec(rank=4, alpha=64.0))
    randomise_adapters(lm)
    fast = generate(lm, ids, mask, fast_decode=True, **kw)
    eager = generate(lm, ids, mask, fast_decode=False, **kw)
    assert torch.equal(fast.sequences, eager.sequences)
    torch.testing.assert_close(fast.logprobs, eager.logprobs, rtol=1e-4, atol=1e-5)
    assert not torch.equal(fast.logprobs, base.logprobs)
    with adapters_disabled(lm):
        torch.testing.assert_close(generate(lm, ids, mask, fast_decode=True, **kw).logprobs, base.logprobs,
                                   rtol=1e-4, atol=1e-5)


def test_bf16_generation_sees_the_adapters():
    """Under CPU bf16 autocast the compiled step packs the merged ``W + (alpha / r) B A`` in bf16 (merged in fp32,
    rounded once): its greedy tokens are the eager bf16 path's (measured: all) and not the base model's, its
    log-probs the eager path's within bf16 rounding (measured max |dlogprob| 0.0024 over all 8 steps; asserted
    <= 0.05 over the first two, before a flipped token could change the rest of a row)."""
    from saferlhf_fast.engine import fast_decode as fd
    from saferlhf_fast.engine import generate

    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_config(num_key_value_heads=4))
    ids, mask = batch(96, seed=5)
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=[], pad_token_id=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = generate(lm, ids, mask, fast_decode=False, **kw)
        apply_lora(lm, LoraSpec(rank=4, alpha=64.0))
        randomise_adapters(lm)
        fast = generate(lm, ids, mask, fast_decode=fd.native_step_available(), **kw)
        eager = generate(lm, ids, mask, fast_decode=False, **kw)
    assert float((fast.sequences == eager.sequences).float().mean()) >= 0.9
    assert not torch.equal(fast.sequences, base.sequences)
    assert float((fast.logprobs - eager.logprobs)[:, :2].abs().max()) <= 0.05


def test_every_training_command_takes_the_lora_flags(tiny, tmp_path):
    from saferlhf_fast.trainers.dpo import DPOConfig
    from saferlhf_fast.trainers.ppo import CONFIGS
    from saferlhf_fast.trainers.score import CostConfig

    for cls in (SFTConfig, RewardConfig, CostConfig, DPOConfig, *CONFIGS.values()):
        names = set(cls.__dataclass_fields__)
        assert {"lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "merge_lora"} <= names, cls
        assert ("actor_lora_rank" in names) == (cls in CONFIGS.values())
    ppo = _ppo_config(tiny, ("rm", "cm"), tmp_path, lora_rank=8, critic_lora_rank=0)
    assert ppo.lora_spec("actor").rank == 8 and ppo.lora_spec("critic") is None
    for bad, match in ((dict(lora_rank=-1), "--lora_rank"), (dict(lora_dropout=1.0), "--lora_dropout"),
                       (dict(lora_alpha=0.0), "--lora_alpha")):
        with pytest.raises(ValueError, match=match):
            config_from_args(SFTConfig, dict(model_name_or_path=tiny, train_datasets=["x"], output_dir="o", **bad))


@pytest.mark.distributed
def test_lora_rm_under_torchrun_equals_one_process(tmp_path):
    """FSDP2 over a LoRA reward model (frozen base, trained adapters and score head): 2 ranks x 2 rows train as
    1 rank x 4 rows; rank 0 writes the PEFT folder."""
    tiny = make_tiny_model(str(tmp_path / "tiny"), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    rm_under_torchrun_equals_one_process(tiny, tmp_path)


def rm_under_torchrun_equals_one_process(model: str, tmp_path) -> None:
    """``rm --lora_rank 4`` from ``model``: 2 gloo ranks x 2 rows under torchrun save the adapters and score head of
    one process x 4 rows (to 2e-6), and the same files (tests/test_lora_hf.py runs it on a GPT-2)."""
    import subprocess
    import sys

    common = ["rm", "--model_name_or_path", model, "--train_datasets", "synthetic-preference/test:0.04",
              "--max_length", "64", "--epochs", "2", "--gradient_accumulation_steps", "2", "--lr", "1e-2",
              "--seed", "7", "--progress", "false", "--lora_rank", "4",
              "--regularization", "0.001"]  # else the score bias (no gradient in the pair loss) follows rounding noise
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*common, "--per_device_train_batch_size", "4", "--output_dir", str(one)]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "saferlhf_fast.cli", *common, "--per_device_train_batch_size", "2", "--output_dir", str(two)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    a, b = load_file(str(one / ADAPTER_WEIGHTS)), load_file(str(two / ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and "base_model.model.score_head.weight" in a
    for k in a:
        assert float((a[k] - b[k]).abs().max()) < 2e-6, k
    assert any(a[k].abs().max() > 0 for k in a if ".lora_B." in k)
    assert sorted(os.listdir(one)) == sorted(os.listdir(two))


def test_adapter_folders_feed_the_next_stage(tiny, tmp_path):
    """sft --lora_rank -> rm --lora_rank on the SFT adapter folder -> ppo-lag --lora_rank with the adapter folders as
    actor, reward and cost models: each loads as its base with the adapters merged in."""
    sft, rm, ppo = tmp_path / "sft", tmp_path / "rm", tmp_path / "ppo"
    assert main(_sft_args(tiny, sft)) == 0
    assert main(["rm", "--model_name_or_path", str(sft), "--train_datasets", "synthetic-preference/train:0.01",
                 "--max_length", "64", "--per_device_train_batch_size", "4", "--lr", "1e-2", "--progress", "false",
                 "--lora_rank", "4", "--output_dir", str(rm)]) == 0
    assert json.load(open(rm / ADAPTER_CONFIG))["base_model_name_or_path"] == str(sft)
    assert main(["ppo-lag", "--actor_model_name_or_path", str(sft), "--reward_model_name_or_path", str(rm),
                 "--cost_model_name_or_path", str(rm), "--train_datasets", "synthetic-prompts/train:0.006",
                 "--output_dir", str(ppo), "--max_length", "64", "--max_new_tokens", "6",
                 "--per_device_prompt_batch_size", "4", "--per_device_train_batch_size", "4", "--progress", "false",
                 "--lora_rank", "4"]) == 0
    sft_model, rm_model = from_pretrained(str(sft)), from_pretrained(str(rm), head="score")
    assert not lora_layers(sft_model) and all(p.requires_grad for p in sft_model.parameters())
    # the reward model = the SFT merge plus the RM adapters and head
    expected = apply_lora(from_pretrained(str(sft), head="score"), LoraSpec(4))
    load_adapter(expected, str(rm))
    ids, mask = batch(sft_model.config.vocab_size, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(rm_model(ids, mask).end_scores, expected(ids, mask).end_scores, rtol=1e-5,
                                   atol=1e-6)
    actor = from_pretrained(str(ppo))
    with torch.no_grad():
        assert not torch.equal(actor(ids, mask).logits, sft_model(ids, mask).logits)  # PPO moved the merged actor
    assert main(["sft", "--model_name_or_path", str(tmp_path / "nothing"), "--train_datasets",
                 "synthetic-sft/train:0.01", "--output_dir", str(tmp_path / "x")]) == 2
