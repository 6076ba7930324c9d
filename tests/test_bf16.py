"""bf16 mixed precision at the model level (``--bf16``: CPU autocast in bf16; ``models/llama.py`` module docstring):
products in bf16 with fp32 accumulation, an fp32 residual stream, fp32 scores and log-probs, fp32 masters; frozen
models held in bf16 compute exactly what their fp32 originals compute under autocast."""
import copy

import pytest
import torch

from saferlhf_fast.models import LlamaForCausalLM, LlamaForScore, ModelConfig, hold_in_bf16
from saferlhf_fast.ops.dense import onednn_bf16_available


def _config(**kw) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return ModelConfig(**(base | kw))


def _batch(vocab=96, b=3, n=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, :4] = False  # a left-padded row
    return ids, mask


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("tied", [False, True])
def test_frozen_model_held_in_bf16_equals_its_fp32_original_under_autocast(tied):
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(tie_word_embeddings=tied)).eval().requires_grad_(False)
    held = hold_in_bf16(copy.deepcopy(model))
    dtypes = {name: p.dtype for name, p in held.named_parameters()}
    assert dtypes["model.embed_tokens.weight"] == torch.bfloat16
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    assert dtypes["model.norm.weight"] == torch.float32  # 1-D weights stay fp32
    ids, mask = _batch()
    with _autocast(), torch.no_grad():
        want = model.token_logprobs(ids, mask, return_entropy=True)
        got = held.token_logprobs(ids, mask, return_entropy=True)
    assert got[0].dtype == torch.float32
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_score_model_held_in_bf16_and_its_fp32_head():
    torch.manual_seed(1)
    model = LlamaForScore(_config()).eval().requires_grad_(False)
    with torch.no_grad():
        model.score_head.weight.normal_(0, 0.5)
    held = hold_in_bf16(copy.deepcopy(model))
    assert held.score_head.weight.dtype == torch.float32
    ids, mask = _batch(seed=2)
    with _autocast(), torch.no_grad():
        want, got = model.score_ends(ids, mask), held.score_ends(ids, mask)
        out = model(ids, mask)
        h = model.hidden_states(ids, mask)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    # the head is an fp32 product of the (fp32) last hidden states, not a bf16 one
    head = (h.float() @ model.score_head.weight.t() + model.score_head.bias).squeeze(-1)
    torch.testing.assert_close(out.scores, head, rtol=1e-6, atol=1e-6)


def test_training_under_autocast_keeps_fp32_masters_and_tracks_fp32():
    """Under autocast the log-probs stay within bf16 rounding of the fp32 ones, and every gradient reaches its fp32
    master in fp32, close in direction to the fp32 gradient."""
    torch.manual_seed(3)
    model = LlamaForCausalLM(_config()).train()
    ids, mask = _batch(seed=4)
    lp32 = model.token_logprobs(ids, mask)
    lp32.sum().backward()
    g32 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with _autocast():
        lp16 = model.token_logprobs(ids, mask)
    assert lp16.dtype == torch.float32
    assert (lp16 - lp32).abs().max().item() < 5e-2
    lp16.sum().backward()
    for name, p in model.named_parameters():
        assert p.dtype == p.grad.dtype == torch.float32, name
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), g32[name].flatten(), dim=0).item()
        assert cos > 0.99, (name, cos)


@pytest.mark.skipif(not onednn_bf16_available(), reason="oneDNN has no native bf16 matmul on this CPU")
def test_bf16_products_run_on_the_kernels_not_f_linear(monkeypatch):
    """The projections and the lm_head of a model under autocast take the oneDNN bf16 path (F.linear never runs)."""
    from saferlhf_fast import _backend
    from saferlhf_fast.ops import dense

    if not _backend.has_op("onednn_linear"):
        pytest.skip("the compiled extension has no saferlhf::onednn_linear")
    torch.manual_seed(5)
    model = LlamaForCausalLM(_config()).train()
    ids, mask = _batch(seed=6)
    monkeypatch.setattr(dense.F, "linear", lambda *a, **k: pytest.fail("F.linear ran"))
    with _autocast():
        model.token_logprobs(ids, mask).sum().backward()
    assert model.lm_head.weight.grad is not None


def test_ppo_bf16_never_takes_the_engines_logprobs_as_old_logprobs(tmp_path):
    """Under --bf16 a later micro-batch's old log-probs come from a no-grad actor forward (the engine's differ from
    the training forward by bf16 rounding), and the frozen models are held in bf16 while the actor keeps fp32."""
    from saferlhf_fast.benchmarks import ppo_step as P
    from saferlhf_fast.trainers.ppo import PPOLagConfig, PPOTrainer

    w = P.SIZES["tiny"]
    _, paths, _ = P.build_checkpoints(w, str(tmp_path))
    cfg = PPOLagConfig(actor_model_name_or_path=paths["actor"], reward_model_name_or_path=paths["rm"],
                       cost_model_name_or_path=paths["cm"], train_datasets=["synthetic-prompts/train:0.05"],
                       output_dir=str(tmp_path / "out"), max_new_tokens=4, per_device_prompt_batch_size=4,
                       per_device_train_batch_size=2, progress=False, bf16=True)
    cfg.validate()
    trainer = PPOTrainer(cfg)
    assert trainer.actor.lm_head.weight.dtype == torch.float32
    assert trainer.reference.lm_head.weight.dtype == trainer.reward_model.model.embed_tokens.weight.dtype == \
        torch.bfloat16
    ids = torch.randint(4, 1000, (4, 5), generator=torch.Generator().manual_seed(0))
    micro = trainer.rollout({"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool)}, 0)
    assert len(micro) == 2
    mb = micro[1]
    with _autocast(), torch.no_grad():
        lp = trainer.actor.token_logprobs(mb.input_ids, mb.attention_mask, labels=mb.labels)
    assert torch.equal(mb.old_logprobs, mb.response_slice(lp).float() * mb.response_mask.float())


def test_linear_logprobs_without_native_bf16_gemms(monkeypatch):
    """On a CPU without native bf16 GEMMs (as if AVX2 only) the lm_head's weight enters as its bf16 values in fp32:
    a weight held in bf16 and its fp32 original give the same log-probs and hidden-state gradients bit for bit under
    autocast, the forward's logits still bf16 products, and a trainable fp32 master still gets its fp32 gradient."""
    from saferlhf_fast import ops
    from saferlhf_fast.ops import logprobs

    monkeypatch.setattr(logprobs, "onednn_bf16_available", lambda: False)
    torch.manual_seed(7)
    n, h, v = 37, 48, 200
    weight = torch.randn(v, h) * 0.1
    labels = torch.randint(0, v, (n,))
    hidden = torch.randn(n, h)
    out = {}
    for name, w in (("fp32", weight), ("held", weight.to(torch.bfloat16)), ("master", weight.clone().requires_grad_())):
        x = hidden.clone().requires_grad_()
        with _autocast():
            lp = ops.linear_logprobs(x, w, labels)
        lp.sum().backward()
        out[name] = (lp, x.grad, w.grad if w.requires_grad else None)
    assert all(torch.equal(out["held"][i], out["fp32"][i]) and torch.equal(out["master"][i], out["fp32"][i])
               for i in (0, 1))
    def logprobs_of(logits):
        return torch.log_softmax(logits.float(), -1).gather(1, labels[:, None])[:, 0]

    bf16 = logprobs_of(hidden.bfloat16() @ weight.bfloat16().t())
    torch.testing.assert_close(out["fp32"][0], bf16, rtol=0, atol=2e-2)  # bf16 logits, not fp32 ones
    assert (out["fp32"][0] - logprobs_of(hidden @ weight.t())).abs().max() > 0
    g = out["master"][2]
    assert g is not None and g.dtype == torch.float32 and g.abs().max() > 0
