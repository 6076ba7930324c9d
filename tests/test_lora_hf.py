"""LoRA on the transformers path (``--backend hf``): adapters on a GPT-2's ``Conv1D`` layers and an OPT's
``nn.Linear`` ones load in ``peft`` with the same logits, the disabled adapters are the base model bit for bit, merged
saves load in transformers; sft and ppo-lag from the command line save PEFT folders, resume exactly, and PPO's
reference is the actor with its adapters disabled (no second copy)."""
import json
import os

import pytest
import torch
import transformers as T
from safetensors.torch import load_file
from test_hf_backend import tiny_config
from test_lora import assert_lora_actor_is_its_own_reference, rm_under_torchrun_equals_one_process

from saferlhf_fast.cli import main
from saferlhf_fast.data import load_tokenizer
from saferlhf_fast.data.tokenizer import save_tokenizer
from saferlhf_fast.models import from_pretrained
from saferlhf_fast.models.llama import positions_from_mask
from saferlhf_fast.models.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    HFLoraLinear,
    LoraSpec,
    adapters_disabled,
    apply_lora,
    load_adapter,
    lora_layers,
    trainable_names,
)
from saferlhf_fast.trainers.modeling import save_trained
from saferlhf_fast.trainers.ppo import PPOLagConfig, PPOTrainer

peft = pytest.importorskip("peft")  # the dev extra: the reference for the folders' format


def _init(kind: str, folder: str) -> str:
    tok = load_tokenizer(None)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(tiny_config(kind, (len(tok) + 63) // 64 * 64, tok)).save_pretrained(folder)
    save_tokenizer(tok, folder)
    return folder


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return _init("gpt2", str(tmp_path_factory.mktemp("gpt2") / "init"))


@pytest.fixture(scope="module")
def scorers(gpt2, tmp_path_factory):
    """A GPT-2 reward and cost model (random heads) in the reference's ``GPT2ForScore`` layout."""
    out = []
    for seed, name in ((2, "rm"), (3, "cm")):
        torch.manual_seed(seed)
        m = from_pretrained(gpt2, head="score", backend="hf")
        with torch.no_grad():
            m.score_head.weight.normal_(0.0, 0.5)
        folder = str(tmp_path_factory.mktemp(name))
        m.save_pretrained(folder)
        save_tokenizer(load_tokenizer(gpt2), folder)
        out.append(folder)
    return out


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    return ids, mask


def _peft(base: str, folder: str):
    return peft.PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                          folder).eval()


def _logits(hf_model, ids, mask):
    """A transformers model's logits with our positions (counted over the real tokens of a left-padded row)."""
    return hf_model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits


def _same(a, b, mask):
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "opt"])
def test_adapters_load_in_peft_disable_to_the_base_and_merge(kind, tmp_path):
    init = _init(kind, str(tmp_path / "init"))
    ours = apply_lora(from_pretrained(init, backend="hf"), LoraSpec(4, 8.0))
    layers = lora_layers(ours)
    assert layers and all(isinstance(m, HFLoraLinear) for m in layers)
    assert all(".lora_" in n for n in trainable_names(ours))  # the base is frozen
    assert ours.lora_spec.fan_in_fan_out == (kind == "gpt2")  # GPT-2's Conv1D stores W as [in, out]
    assert "lm_head" not in ours.lora_spec.targets
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in layers:
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    save_trained(ours, str(tmp_path / "ad"))
    cfg = json.load(open(tmp_path / "ad" / ADAPTER_CONFIG))
    assert cfg["target_modules"] == list(ours.lora_spec.targets) and cfg["fan_in_fan_out"] == (kind == "gpt2")
    theirs = _peft(init, str(tmp_path / "ad"))
    ids, mask = _batch(ours.config.vocab_size)
    plain = T.AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = ours.eval()(ids, mask).logits
        _same(logits, _logits(theirs, ids, mask), mask)
        with adapters_disabled(ours):  # the reference: the base layers' own products, bit for bit
            assert torch.equal(ours(ids, mask).logits, _logits(plain, ids, mask))
        assert not torch.equal(logits, _logits(plain, ids, mask))
        save_trained(ours, str(tmp_path / "merged"), merge=True)
        merged = T.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
        _same(_logits(merged, ids, mask), logits, mask)
        peft_merged = theirs.merge_and_unload().state_dict()
        for k, v in merged.state_dict().items():
            torch.testing.assert_close(v, peft_merged[k], rtol=1e-6, atol=1e-7, msg=k)
        # the adapter folder as an input model: its base with the adapters merged in, as --merge_lora saved it
        loaded = from_pretrained(str(tmp_path / "ad"), backend="auto")
        assert not lora_layers(loaded) and loaded.source_dir == str(tmp_path / "ad")
        saved = merged.state_dict()
        assert all(torch.equal(v, saved[k.removeprefix("hf.")]) for k, v in loaded.state_dict().items())


def test_generation_runs_the_adapters_on_the_fly_or_merged(gpt2, tmp_path):
    """transformers' ``generate`` through the adapted layers, on the fly and merged for the call
    (``lora_merge``, GPT-2's ``Conv1D`` layout): the merged model's tokens and log-probs (up to rounding), not the
    base model's, and the parameters bit for bit unchanged after; with the adapters disabled the base model's, bit
    for bit."""
    from saferlhf_fast.engine import generate

    ours = apply_lora(from_pretrained(gpt2, backend="hf"), LoraSpec(4, 64.0))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora_layers(ours):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    save_trained(ours, str(tmp_path / "merged"), merge=True)
    merged, base = from_pretrained(str(tmp_path / "merged"), backend="hf"), from_pretrained(gpt2, backend="hf")
    ids, mask = _batch(ours.config.vocab_size, seed=6)
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=1, pad_token_id=0)
    want, plain = (generate(m, ids, mask, **kw) for m in (merged, base))
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    for lora_merge in (False, True):
        got = generate(ours, ids, mask, lora_merge=lora_merge, **kw)
        assert torch.equal(got.sequences, want.sequences) and not torch.equal(got.sequences, plain.sequences)
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(p.detach(), before[n]) for n, p in ours.named_parameters())
    assert all(m.merged is None for m in lora_layers(ours))
    with adapters_disabled(ours):
        off = generate(ours, ids, mask, **kw)
    assert torch.equal(off.sequences, plain.sequences) and torch.equal(off.logprobs, plain.logprobs)


def test_score_model_adapters_round_trip_with_the_head(gpt2, tmp_path):
    torch.manual_seed(4)
    ours = apply_lora(from_pretrained(gpt2, head="score", backend="hf"), LoraSpec(2, targets=("c_attn",)))
    assert {n for n in trainable_names(ours) if ".lora_" not in n} == {"score_head.weight", "score_head.bias"}
    with torch.no_grad():
        for m in lora_layers(ours):
            m.lora_B.weight.normal_()
        ours.score_head.weight.normal_()
    save_trained(ours, str(tmp_path / "critic"))
    keys = set(load_file(str(tmp_path / "critic" / ADAPTER_WEIGHTS)))
    # the GPT2ForScore layout: the backbone under ``transformer.``, the head as PEFT's modules_to_save
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    assert {"base_model.model.score_head.weight", "base_model.model.score_head.bias"} <= keys and len(keys) == 2 + 4
    assert json.load(open(tmp_path / "critic" / ADAPTER_CONFIG))["modules_to_save"] == ["score_head"]
    again = apply_lora(from_pretrained(gpt2, head="score", backend="hf"), LoraSpec(2, targets=("c_attn",)))
    load_adapter(again, str(tmp_path / "critic"))
    ids, mask = _batch(ours.config.vocab_size, seed=2)
    with torch.no_grad():
        assert torch.equal(again.eval()(ids, mask).end_scores, ours.eval()(ids, mask).end_scores)


# ------------------------------------------------------------------------------------------------ the commands
def _sft(gpt2, out, *extra):
    return ["sft", "--model_name_or_path", gpt2, "--backend", "hf", "--train_datasets", "synthetic-sft/train:0.01",
            "--max_length", "64", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
            "--lr", "1e-2", "--progress", "false", "--seed", "5", "--lora_rank", "8", "--lora_dropout", "0.1",
            "--output_dir", str(out), *extra]


def test_sft_from_the_command_line_loads_in_peft_merges_and_resumes_exactly(gpt2, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_sft(gpt2, a)) == 0
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "tokenizer.json"} <= set(os.listdir(a))
    assert not os.path.exists(a / "model.safetensors")
    final = load_file(str(a / ADAPTER_WEIGHTS))
    assert len(final) == 2 * 2 * 4  # A, B x 2 blocks x 4 layers (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
    assert any(final[k].abs().max() > 0 for k in final if ".lora_B." in k)  # trained
    ours = from_pretrained(str(a), backend="hf").eval()  # the folder as an input model (merged)
    ids, mask = _batch(ours.config.vocab_size, seed=3)
    with torch.no_grad():
        _same(ours(ids, mask).logits, _logits(_peft(gpt2, str(a)), ids, mask), mask)
    # interrupted after step 1, resumed: the uninterrupted run's adapters bit for bit
    assert main(_sft(gpt2, b, "--max_steps", "1")) == 0
    assert os.path.isfile(b / "checkpoint-1" / ADAPTER_WEIGHTS)
    assert main(_sft(gpt2, b, "--resume", "auto")) == 0
    resumed = load_file(str(b / ADAPTER_WEIGHTS))
    assert resumed.keys() == final.keys() and all(torch.equal(final[k], resumed[k]) for k in final)
    # --merge_lora: a plain checkpoint transformers loads, the same model
    assert main(_sft(gpt2, tmp_path / "m", "--merge_lora", "true")) == 0
    plain = T.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).eval()
    with torch.no_grad():
        _same(_logits(plain, ids, mask), ours(ids, mask).logits, mask)


def _ppo(gpt2, scorers, out, **kw):
    cfg = PPOLagConfig(actor_model_name_or_path=gpt2, reward_model_name_or_path=scorers[0], backend="hf",
                       cost_model_name_or_path=scorers[1], train_datasets=["synthetic-prompts/train:0.008"],
                       output_dir=str(out), max_length=64, max_new_tokens=6, per_device_prompt_batch_size=4,
                       per_device_train_batch_size=2, update_iters=2, progress=False, actor_lr=1e-2, critic_lr=1e-2,
                       seed=3, lambda_lr=0.5, lambda_max=5.0, lora_dropout=0.1, **kw)
    cfg.validate()
    return PPOTrainer(cfg)


def test_ppo_lag_reference_is_the_actor_with_adapters_disabled(gpt2, scorers, tmp_path):
    full = _ppo(gpt2, scorers, tmp_path / "full")
    lora = _ppo(gpt2, scorers, tmp_path / "lora", actor_lora_rank=8, critic_lora_rank=0)
    base = from_pretrained(gpt2, backend="hf")
    assert_lora_actor_is_its_own_reference(full, lora, base, *_batch(base.config.vocab_size, seed=4))


def test_ppo_lag_from_the_command_line_loads_in_peft_and_resumes_exactly(gpt2, scorers, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["ppo-lag", "--actor_model_name_or_path", gpt2, "--reward_model_name_or_path", scorers[0],
            "--cost_model_name_or_path", scorers[1], "--backend", "hf", "--train_datasets",
            "synthetic-prompts/train:0.008", "--max_length", "64", "--max_new_tokens", "6",
            "--per_device_prompt_batch_size", "4", "--per_device_train_batch_size", "2", "--update_iters", "2",
            "--progress", "false", "--actor_lr", "1e-2", "--critic_lr", "1e-2", "--seed", "3", "--lambda_lr", "0.5",
            "--lambda_max", "5.0", "--lora_rank", "8", "--lora_dropout", "0.1"]
    assert main([*args, "--output_dir", str(a)]) == 0
    assert main([*args, "--output_dir", str(b), "--max_steps", "1"]) == 0
    assert os.path.isfile(b / "checkpoint-1" / "actor" / ADAPTER_WEIGHTS)
    assert main([*args, "--output_dir", str(b), "--resume", "auto"]) == 0
    for sub in ("", "reward_critic", "cost_critic"):
        x, y = load_file(str(a / sub / ADAPTER_WEIGHTS)), load_file(str(b / sub / ADAPTER_WEIGHTS))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), sub
        assert any(x[k].abs().max() > 0 for k in x if ".lora_B." in k), sub
        assert ("base_model.model.score_head.weight" in x) == (sub != "")
    ours = from_pretrained(str(a), backend="hf").eval()
    ids, mask = _batch(ours.config.vocab_size, seed=5)
    with torch.no_grad():
        _same(ours(ids, mask).logits, _logits(_peft(gpt2, str(a)), ids, mask), mask)
    # a critic's folder as the next stage's input: its base (the reward model) with the adapters and head merged in
    critic = from_pretrained(str(a / "reward_critic"), head="score", backend="hf")
    head = load_file(str(a / "reward_critic" / ADAPTER_WEIGHTS))["base_model.model.score_head.weight"]
    assert torch.equal(critic.score_head.weight.detach(), head)


@pytest.mark.parametrize("command", ["rm", "dpo"])
def test_other_training_commands_train_adapters(command, gpt2, tmp_path):
    data = "synthetic-preference/train:0.01"
    assert main([command, "--model_name_or_path", gpt2, "--backend", "hf", "--train_datasets", data, "--max_length",
                 "64", "--per_device_train_batch_size", "4", "--lr", "1e-2", "--progress", "false", "--lora_rank",
                 "8", "--lora_target_modules", "c_attn", "--output_dir", str(tmp_path / "out")]) == 0
    saved = load_file(str(tmp_path / "out" / ADAPTER_WEIGHTS))
    assert len(saved) == 2 * 2 + (2 if command == "rm" else 0)  # A, B of c_attn x 2 blocks (+ the score head)
    assert any(saved[k].abs().max() > 0 for k in saved if ".lora_B." in k)
    if command == "dpo":  # step 1: the policy is its reference (the adapters disabled, B = 0): both rewards are 0
        rows = [json.loads(x) for x in open(tmp_path / "out" / "metrics.jsonl") if "train/loss" in x]
        assert rows[0]["train/better_sample_reward"] == 0.0 and rows[0]["train/worse_sample_reward"] == 0.0


@pytest.mark.distributed
def test_lora_rm_under_torchrun_equals_one_process(gpt2, tmp_path):
    """FSDP2 over a GPT-2 LoRA reward model (its blocks sharded, adapters inside them): 2 ranks x 2 rows train as
    1 rank x 4 rows (the same bound as the native decoder's test); rank 0 writes the PEFT folder."""
    rm_under_torchrun_equals_one_process(gpt2, tmp_path)
