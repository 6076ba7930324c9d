"""Frozen weights held in bf16 under ``--bf16`` (``models.llama.hold_in_bf16``) for LoRA models: the base of a
trained LoRA model (actor, critics, SFT / RM / CM / DPO policies) is stored in bf16 next to fp32 adapters, and
computes, trains, generates and saves what its fp32 original does under bf16 autocast."""
import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from test_bf16 import _autocast, _batch, _config  # tests/ is on sys.path (no package)
from test_lora import parameter_bytes

from saferlhf_fast.cli import main
from saferlhf_fast.models import LlamaForCausalLM, LlamaForScore, from_pretrained, hold_in_bf16
from saferlhf_fast.models.checkpoint import save_pretrained
from saferlhf_fast.models.llama import held_in_bf16
from saferlhf_fast.models.lora import (
    ADAPTER_WEIGHTS,
    LoraSpec,
    adapters_disabled,
    apply_lora,
    lora_layers,
    merged_adapters,
    merged_state_dict,
)
from saferlhf_fast.trainers.modeling import make_tiny_model


def _round_to_bf16(model):
    """Every weight made bf16-representable (a checkpoint stored in bf16, as released 7B / 8B models are)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


def _lora_model(seed=0, head="lm", rounded=True):
    torch.manual_seed(seed)
    cls = LlamaForCausalLM if head == "lm" else LlamaForScore
    model = cls(_config())
    if rounded:
        _round_to_bf16(model)
    apply_lora(model, LoraSpec(rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in lora_layers(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    return model


def test_what_is_held_in_bf16():
    """Frozen 2-D weights; never the adapters, the score head or the 1-D weights; off the CPU not the embedding and
    lm_head either (autocast leaves their products fp32 there)."""
    model = _lora_model(head="score")
    cpu = set(held_in_bf16(model, "cpu"))
    assert "model.layers.0.self_attn.q_proj.weight" in cpu and "model.embed_tokens.weight" in cpu
    assert not any(".lora_" in n or n.startswith("score_head.") or "norm" in n for n in cpu)
    cuda = set(held_in_bf16(model, "cuda"))
    assert cuda == cpu - {"model.embed_tokens.weight"}
    lm = _lora_model()
    assert "lm_head.weight" in held_in_bf16(lm, "cpu") and "lm_head.weight" not in held_in_bf16(lm, "cuda")
    full = LlamaForCausalLM(_config())  # trained in full: nothing is frozen, nothing is held
    assert held_in_bf16(full, "cpu") == []


def test_lora_base_held_in_bf16_trains_as_its_fp32_original():
    """Under autocast: the same log-probs (adapters on, off: the PPO reference) and the same adapter gradients, bit
    for bit; half the base's bytes."""
    model = _lora_model(rounded=False)  # the training forward rounds W to bf16 anyway: any base
    held = hold_in_bf16(copy.deepcopy(model))
    q = held.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.lora_A.weight.dtype == q.lora_B.weight.dtype == torch.float32
    assert held.model.norm.weight.dtype == torch.float32 and held.dtype == torch.float32
    ids, mask = _batch()
    with _autocast():
        want, got = model.token_logprobs(ids, mask), held.token_logprobs(ids, mask)
        assert got.dtype == torch.float32 and torch.equal(got, want)
        want.sum().backward()
        got.sum().backward()
        with torch.no_grad(), adapters_disabled(model), adapters_disabled(held):
            assert torch.equal(held.token_logprobs(ids, mask), model.token_logprobs(ids, mask))
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n for n, _ in trained)
    grads = dict(held.named_parameters())
    for name, p in trained:
        assert grads[name].grad.dtype == torch.float32 and torch.equal(grads[name].grad, p.grad), name
    nbytes = [sum(p.numel() * p.element_size() for p in m.parameters()) for m in (model, held)]
    assert nbytes[1] < 0.55 * nbytes[0]


def test_lora_score_model_held_in_bf16_scores_as_its_fp32_original():
    model = _lora_model(head="score", rounded=False)
    held = hold_in_bf16(copy.deepcopy(model))
    assert held.score_head.weight.dtype == torch.float32 and held.score_head.weight.requires_grad
    ids, mask = _batch(seed=3)
    with _autocast(), torch.no_grad():
        assert torch.equal(held.score_ends(ids, mask), model.score_ends(ids, mask))


@pytest.mark.parametrize("fast_decode", [False, True], ids=["eager", "compiled"])
def test_held_lora_base_generates_as_its_fp32_original(fast_decode):
    """Merged generation: ``bf16(W + s B A)`` summed in fp32 and rounded once is what the fp32 merged weight
    rounds to, so on a bf16-stored base the samples and log-probs are the fp32 model's bit for bit."""
    from saferlhf_fast.engine.fast_decode import native_step_available
    from saferlhf_fast.engine.generate import generate

    if fast_decode and not native_step_available():
        pytest.skip("compiled extension without saferlhf::decode_step")
    model = _lora_model().eval()
    held = hold_in_bf16(copy.deepcopy(model))
    ids, mask = _batch(seed=5)
    kw = dict(max_new_tokens=8, eos_token_id=[], seed=4, top_k=20, fast_decode=fast_decode, lora_merge=True)
    with _autocast(), torch.no_grad():
        a, b = generate(model, ids, mask, **kw), generate(held, ids, mask, **kw)
        with merged_adapters(held):
            m = held.model.layers[0].mlp.down_proj
            assert m.merged.dtype == torch.bfloat16
            with torch.autocast("cpu", enabled=False):
                exact = (m.weight.float() + m.delta_weight()).to(torch.bfloat16)
            assert torch.equal(m.merged, exact)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)
    assert all(m.merged is None for m in lora_layers(held))


def test_merging_a_held_base_saves_one_fp32_checkpoint(tmp_path):
    """``--merge_lora`` of a base held in bf16: ``W + s B A`` summed in fp32 and saved in fp32 with every other
    tensor (one dtype on disk), loadable as the plain model it computes."""
    model = _lora_model(rounded=False)
    held = hold_in_bf16(copy.deepcopy(model))
    merged = merged_state_dict(held, held.state_dict())
    q = held.model.layers[1].self_attn.q_proj
    w = merged["model.layers.1.self_attn.q_proj.weight"]
    assert w.dtype == torch.float32 and torch.equal(w, q.weight.float() + q.delta_weight())
    save_pretrained(held, str(tmp_path / "m"), copy_tokenizer=False)
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert json.load(open(tmp_path / "m" / "config.json"))["torch_dtype"] == "float32"
    plain = from_pretrained(str(tmp_path / "m")).eval()
    ids, mask = _batch(seed=6)
    with _autocast(), torch.no_grad():
        torch.testing.assert_close(plain.token_logprobs(ids, mask), held.token_logprobs(ids, mask),
                                   rtol=0, atol=0.05)  # merged vs on the fly: one bf16 product against two


# ------------------------------------------------------------------------------------------------ trainers
@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory, make_score_model):
    """A tiny actor stored with bf16-representable weights, and reward / cost models on it."""
    root = tmp_path_factory.mktemp("tiny_bf16")
    path = make_tiny_model(str(root / "model"), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                           seed=1)
    save_pretrained(_round_to_bf16(from_pretrained(path)), path)
    return path, make_score_model(path, str(root / "rm"), 2), make_score_model(path, str(root / "cm"), 3, bias=0.3)


def _no_holding(monkeypatch, *modules):
    for module in modules:
        monkeypatch.setattr(module, "hold_frozen_in_bf16", lambda model, config: model)


@pytest.mark.parametrize("critic_backbone", ["separate", "shared"])
def test_ppo_lag_lora_bf16_holds_bases_in_bf16_and_trains_as_fp32_bases(tiny_bf16, tmp_path, monkeypatch,
                                                                        critic_backbone):
    """A LoRA PPO-Lag step under --bf16 (rollout with merged adapters, actor and critic updates, lambda) with the
    bases held in bf16 equals the same step with fp32 bases bit for bit, in fewer bytes."""
    from saferlhf_fast.trainers import ppo
    from saferlhf_fast.trainers.ppo import PPOLagConfig, PPOTrainer

    actor, rm, cm = tiny_bf16

    def run(out):
        cfg = PPOLagConfig(actor_model_name_or_path=actor, reward_model_name_or_path=rm, cost_model_name_or_path=cm,
                           train_datasets=["synthetic-prompts/train:0.006"], output_dir=str(out), max_length=64,
                           max_new_tokens=6, per_device_prompt_batch_size=4, per_device_train_batch_size=2,
                           progress=False, actor_lr=1e-2, critic_lr=1e-2, seed=3, lambda_lr=0.5, lora_rank=4,
                           bf16=True, critic_backbone=critic_backbone, max_steps=1)
        cfg.validate()
        trainer = PPOTrainer(cfg)
        trainer.train()
        return trainer, parameter_bytes(trainer)

    held, held_bytes = run(tmp_path / "held")
    q = held.actor.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.lora_B.weight.dtype == torch.float32
    scorers = [] if critic_backbone == "shared" else [held.reward_model, held.cost_model]  # shared: the critics'
    for m in (*scorers, *held.critics):
        assert m.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        assert m.score_head.weight.dtype == torch.float32
    _no_holding(monkeypatch, ppo)
    plain, plain_bytes = run(tmp_path / "plain")
    assert plain.actor.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert held_bytes < 0.6 * plain_bytes
    assert held.lagrange.value == plain.lagrange.value
    for a, b in zip([held.actor, *held.critics], [plain.actor, *plain.critics]):
        trained = {n: p for n, p in b.named_parameters() if p.requires_grad}
        assert trained
        for n, p in a.named_parameters():
            if n in trained:
                assert torch.equal(p, trained[n]), n
    assert any(float(m.lora_B.weight.detach().abs().max()) > 0 for m in lora_layers(held.actor))  # the adapters trained


def _sft(tiny, out, *extra):
    return main(["sft", "--model_name_or_path", tiny, "--train_datasets", "synthetic-sft/train:0.01", "--max_length",
                 "64", "--per_device_train_batch_size", "4", "--lr", "1e-2", "--progress", "false", "--seed", "5",
                 "--lora_rank", "4", "--bf16", "true", "--output_dir", str(out), *extra])


def test_sft_lora_bf16_base_held_in_bf16_same_adapters_and_fp32_merge(tiny_bf16, tmp_path, monkeypatch):
    """SFT with LoRA under --bf16: the adapters trained on a base held in bf16 equal those trained on the fp32 base
    bit for bit, and --merge_lora saves one fp32 checkpoint."""
    from safetensors.torch import load_file

    from saferlhf_fast.trainers import supervised

    tiny = tiny_bf16[0]
    assert _sft(tiny, tmp_path / "held") == 0
    assert _sft(tiny, tmp_path / "merged", "--merge_lora", "true") == 0
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    _no_holding(monkeypatch, supervised)
    assert _sft(tiny, tmp_path / "plain") == 0
    held, plain = (load_file(str(tmp_path / d / ADAPTER_WEIGHTS)) for d in ("held", "plain"))
    assert held.keys() == plain.keys() and all(torch.equal(held[k], plain[k]) for k in held)
    assert any(float(v.abs().max()) > 0 for k, v in held.items() if "lora_B" in k)
    assert os.path.isfile(tmp_path / "merged" / "config.json")
