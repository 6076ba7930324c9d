"""Native Qwen3 and Gemma 2 / 3 text against transformers on tiny random configs built here: logits parity (every
attention backend, left-padded, packed and unpadded batches), every family feature exercised (a test fails when one
is switched off), gradients equal transformers', soft-capped log-probs (chunked, with backward), generate vs the
training forward, the decode-path eligibility, save -> transformers -> load round trips, score heads, bf16 and the
config spellings of transformers 4.x."""
import json
import warnings

import pytest
import test_models
import torch
from test_models import hf_logits, masked_max

transformers = pytest.importorskip("transformers")
from saferlhf_fast import ops
from saferlhf_fast.engine import fast_decode as fd
from saferlhf_fast.engine import generate
from saferlhf_fast.models import (
    LlamaForScore,
    UnsupportedArchitectureError,
    config_from_hf,
    from_pretrained,
    positions_from_mask,
)

warnings.filterwarnings("ignore", message=".*torch reference ops.*")
transformers.logging.set_verbosity_error()

V = 101
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, pad_token_id=0, eos_token_id=3, bos_token_id=None)
LINEAR_ROPE = {"rope_type": "linear", "factor": 2.0}

ARCHS = {
    "qwen3_tied": ("Qwen3ForCausalLM", "Qwen3Config", dict(tie_word_embeddings=True)),
    "qwen3_window_bias": ("Qwen3ForCausalLM", "Qwen3Config",
                          dict(use_sliding_window=True, sliding_window=5, max_window_layers=1, attention_bias=True)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config",
               dict(sliding_window=5, query_pre_attn_scalar=12, attn_logit_softcapping=4.0,
                    final_logit_softcapping=3.0, hidden_activation="gelu_pytorch_tanh")),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig",
               dict(sliding_window=5, sliding_window_pattern=2, query_pre_attn_scalar=12, rope_theta=1000.0,
                    rope_local_base_freq=50.0, rope_scaling=LINEAR_ROPE, final_logit_softcapping=3.0)),
}
GEMMA = ("gemma2", "gemma3")


def make_hf(name, **over):
    """A transformers model with weights large enough that every feature matters: norm weights and biases away from
    their init, q / k projections x6 (scores of several units, so attention soft-capping bends them), embeddings
    x10 (logits beyond the final soft cap)."""
    model_cls, cfg_cls, extra = ARCHS[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra, **over})
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)
            if n.endswith("embed_tokens.weight") or n == "lm_head.weight":
                p.mul_(10.0)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name in ARCHS:
        d = str(tmp_path_factory.mktemp(name))
        make_hf(name).save_pretrained(d)
        out[name] = d
    return out


def prompts(seed=0):
    """Three left-padded prompts of 7 slots with 7, 4 and 2 real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, :3] = False
    mask[2, :5] = False
    return ids.masked_fill(~mask, 0), mask


def left_padded_batch(b=3, length=12, seed=0):
    return test_models.left_padded_batch(b, length, seed, low=4)  # ids from 4: clear of the special tokens


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("backend", ["sdpa", "native", "reference", "flex"])
def test_logits_parity_left_padded(checkpoints, name, backend):
    test_models.assert_logits_parity_left_padded(checkpoints[name], backend, low=4)


def test_config_fields(checkpoints):
    q = from_pretrained(checkpoints["qwen3_window_bias"])
    assert q.config.model_type == "qwen3" and q.config.qk_norm and not q.config.gemma
    assert q.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    attn = q.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is not None and attn.q_norm.weight.shape == (16,)
    g2 = from_pretrained(checkpoints["gemma2"]).config
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping, g2.query_pre_attn_scalar) == (4.0, 3.0, 12)
    assert g2.hidden_act == "gelu_pytorch_tanh" and g2.tie_word_embeddings and not g2.qk_norm
    assert [g2.layer_window(i) for i in range(3)] == [5, None, 5]
    g3 = from_pretrained(checkpoints["gemma3"])
    c = g3.config
    assert c.rope_theta == 1000.0 and c.rope_local_theta == 50.0 and c.rope_scaling["rope_type"] == "linear"
    assert [c.layer_rope_local(i) for i in range(3)] == [True, False, True]
    assert c.attn_logit_softcapping is None and c.final_logit_softcapping == 3.0
    assert g3.lm_head.weight is g3.model.embed_tokens.weight


@pytest.mark.parametrize("feature, name, change", [
    ("attention soft-capping", "gemma2", lambda c: setattr(c, "attn_logit_softcapping", None)),
    ("final soft-capping", "gemma2", lambda c: setattr(c, "final_logit_softcapping", None)),
    ("query_pre_attn_scalar", "gemma2", lambda c: setattr(c, "query_pre_attn_scalar", None)),
    ("local RoPE base", "gemma3", lambda c: setattr(c, "rope_local_theta", c.rope_theta)),
    ("sliding windows", "gemma3", lambda c: setattr(c, "sliding_window", None)),
    ("final soft-capping", "gemma3", lambda c: setattr(c, "final_logit_softcapping", None)),
])
def test_each_feature_changes_the_logits(checkpoints, feature, name, change):
    """The parity above is not vacuous: the same weights without one feature are far from transformers."""
    from saferlhf_fast.models import build_model, read_state_dict

    config = config_from_hf(json.load(open(f"{checkpoints[name]}/config.json")))
    change(config)
    model = build_model(config, "lm", read_state_dict(checkpoints[name])).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[name]).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        assert masked_max(model(ids, mask).logits, hf_logits(hf, ids, mask), mask) > 1e-2, feature


@pytest.mark.parametrize("name, backend", [(n, None) for n in ARCHS] + [("gemma2", "sdpa")])  # flex: no CPU backward
def test_gradients_equal_transformers(checkpoints, name, backend):
    """d sum(log-probs) / d every parameter (through the fused 1 + weight norms, q/k norms, soft-capping and its
    chunked log-prob backward, gradient checkpointing on) equals autograd through transformers' model."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[name]).train()
    model = from_pretrained(checkpoints[name], attn_backend=backend).train().set_gradient_checkpointing(True)
    ids, mask = left_padded_batch()
    real = (mask[:, 1:] * mask[:, :-1]).bool()  # predicted from a real token (a pad's hidden state is garbage)
    labels = ids[:, 1:].masked_fill(~real, -100)
    model.token_logprobs(ids, mask, labels, temperature=0.7).sum().backward()
    logits = hf(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits[:, :-1].float() / 0.7
    ref = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * real
    ref.sum().backward()
    theirs = dict(hf.named_parameters())
    for n, p in model.named_parameters():
        g, r = p.grad, theirs[n].grad
        assert float(r.abs().max()) > 0, n
        assert float((g - r).abs().max()) <= 1e-4 * max(1.0, float(r.abs().max())), n


# ---------------------------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("name", GEMMA)
def test_token_logprobs_soft_capped(checkpoints, name):
    model = from_pretrained(checkpoints[name])
    ids, mask = left_padded_batch()
    logp, ent = model.token_logprobs(ids, mask, temperature=0.8, return_entropy=True)
    with torch.no_grad():
        logits = model(ids, mask).logits[:, :-1].float() / 0.8
    assert float(logits.abs().max()) <= 3.0 / 0.8 + 1e-4  # capped
    full = torch.log_softmax(logits, -1)
    ref = full.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
    ref_ent = -(full.exp() * full).sum(-1) * mask[:, 1:]
    assert float((logp - ref).abs().max()) <= 1e-5
    assert float((ent - ref_ent).abs().max()) <= 1e-5


@pytest.mark.parametrize("backend", ["torch", None])
@pytest.mark.parametrize("entropy", [False, True])
def test_linear_logprobs_softcap_chunks_and_grad(backend, entropy):
    """``linear_logprobs(softcap=)`` in several chunks (and in one) equals the explicit soft-capped log-softmax, with
    gradients for hidden and weight."""
    torch.manual_seed(0)
    hidden = torch.randn(11, 16, requires_grad=True)
    weight = (3 * torch.randn(V, 16)).requires_grad_()
    labels = torch.randint(0, V, (11,))
    labels[4] = -100
    g = torch.randn(11)
    z = torch.tanh((hidden @ weight.t()) / 2.5) * 2.5
    full = torch.log_softmax(z / 0.9, -1)
    ref = full.gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1).masked_fill(labels == -100, 0.0)
    ref_ent = -(full.exp() * full).sum(-1).masked_fill(labels == -100, 0.0)
    loss_ref = (ref * g).sum() + (ref_ent.sum() if entropy else 0)
    ref_grads = torch.autograd.grad(loss_ref, (hidden, weight))
    for chunk in (3, None):
        out = ops.linear_logprobs(hidden, weight, labels, temperature=0.9, softcap=2.5, backend=backend,
                                  chunk_rows=chunk, return_entropy=entropy)
        logp, ent = out if entropy else (out, None)
        assert float((logp - ref).abs().max()) <= 1e-5
        loss = (logp * g).sum() + (ent.sum() if entropy else 0)
        if entropy:
            assert float((ent - ref_ent).abs().max()) <= 1e-5
        for got, want in zip(torch.autograd.grad(loss, (hidden, weight)), ref_grads):
            assert float((got - want).abs().max()) <= 1e-5
    plain = ops.linear_logprobs(hidden, weight, labels, temperature=0.9, backend=backend)
    assert float((plain - ref).abs().max()) > 1e-2  # the cap matters at these logits


# ---------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("sampling", [
    dict(do_sample=True),
    dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3),
    dict(do_sample=False, temperature=1.5),
])
def test_generate_logprobs_equal_training_forward(checkpoints, name, sampling):
    model = from_pretrained(checkpoints[name])
    assert not fd.supported(model)  # these features decode through forward_cached
    ids, mask = prompts()
    gen = generate(model, ids, mask, max_new_tokens=12, seed=0, eos_token_id=[], **sampling)
    assert gen.sequences.shape == (3, 19) and gen.response_mask.all()
    p = gen.prompt_length
    temperature = sampling.get("temperature", 1.0)
    logp = model.token_logprobs(gen.sequences, gen.attention_mask, temperature=temperature)[:, p - 1:]
    assert float(((logp - gen.logprobs) * gen.response_mask).abs().max()) <= 1e-5


@pytest.mark.parametrize("backend", ["flex", "sdpa", "reference"])
def test_generate_soft_capped_attention_on_each_backend(checkpoints, backend):
    """Gemma 2's soft-capped attention in the prefill (flex's score_mod, or the eager formula) and the decode step
    (the eager formula): log-probs equal the training forward's, greedy tokens equal transformers'."""
    model = from_pretrained(checkpoints["gemma2"], attn_backend=backend)
    ids, mask = prompts()
    gen = generate(model, ids, mask, max_new_tokens=8, do_sample=False, eos_token_id=[])
    p = gen.prompt_length
    with torch.no_grad():  # flex has no CPU backward
        logp = model.token_logprobs(gen.sequences, gen.attention_mask)[:, p - 1:]
    assert float(((logp - gen.logprobs) * gen.response_mask).abs().max()) <= 1e-5
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["gemma2"]).eval()
    ref = hf.generate(ids, attention_mask=mask.long(), max_new_tokens=8, do_sample=False, pad_token_id=0,
                      eos_token_id=None)
    assert torch.equal(gen.sequences, ref)


@pytest.mark.parametrize("name", list(ARCHS))
def test_greedy_matches_transformers(checkpoints, name):
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[name]).eval()
    model = from_pretrained(checkpoints[name])
    ids, mask = prompts(seed=1)
    gen = generate(model, ids, mask, max_new_tokens=10, do_sample=False, eos_token_id=[])
    ref = hf.generate(ids, attention_mask=mask.long(), max_new_tokens=10, do_sample=False, pad_token_id=0,
                      eos_token_id=None)
    assert torch.equal(gen.sequences, ref)


def test_fast_decode_eligibility(checkpoints, tmp_path):
    """Llama-family models keep the fused decode step; the new families are routed away from it, and forcing it
    is an error, not wrong math."""
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**COMMON, "num_hidden_layers": 1}))
    llama.save_pretrained(str(tmp_path))
    assert fd.supported(from_pretrained(str(tmp_path)))
    assert from_pretrained(str(tmp_path)).config.family_features() == []
    for name in ARCHS:
        model = from_pretrained(checkpoints[name])
        assert model.config.family_features() and not fd.supported(model)
        with pytest.raises(ValueError, match="fast_decode"):
            generate(model, torch.tensor([[5, 6]]), max_new_tokens=2, fast_decode=True)


# ---------------------------------------------------------------------------------------------- IO
@pytest.mark.parametrize("name", list(ARCHS))
def test_save_then_transformers_loads_same_logits(checkpoints, tmp_path, name):
    model = from_pretrained(checkpoints[name]).eval()
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)  # differ from the source checkpoint
    model.save_pretrained(str(tmp_path))
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["architectures"] == [ARCHS[name][0]]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(hf).__name__ == ARCHS[name][0]
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ours = model(ids, mask).logits
    assert masked_max(ours, hf_logits(hf, ids, mask), mask) <= 1e-4
    again = from_pretrained(str(tmp_path)).eval()
    assert again.config.to_dict() | {"extra": None} == model.config.to_dict() | {"extra": None}
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


@pytest.mark.parametrize("name", list(ARCHS))
def test_score_head_on_backbone(checkpoints, tmp_path, name):
    """head="score" on these backbones: a fresh head on the LM checkpoint, scores = w . h (+ b) on transformers'
    last hidden states, and the score checkpoint round trip."""
    model = from_pretrained(checkpoints[name], head="score").eval()
    assert isinstance(model, LlamaForScore)
    torch.manual_seed(2)
    with torch.no_grad():
        model.score_head.weight.normal_()
        model.score_head.bias.fill_(0.25)
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[name]).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        out = model(ids, mask)
        h = hf.model(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).last_hidden_state
        ends = model.score_ends(ids, mask)
    ref = (h @ model.score_head.weight.t()).squeeze(-1) + 0.25
    last = torch.tensor([int(torch.nonzero(m)[-1]) for m in mask])
    assert float((out.end_scores - ref[torch.arange(3), last]).abs().max()) <= 1e-4
    assert float((ends - out.end_scores).abs().max()) <= 1e-5
    model.save_pretrained(str(tmp_path))
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["model_type"] == model.config.model_type and cfg["score_dim"] == 1
    again = from_pretrained(str(tmp_path), head="score").eval()
    with torch.no_grad():
        assert torch.equal(again(ids, mask).end_scores, out.end_scores)


@pytest.mark.parametrize("name", GEMMA)
def test_bf16_close_to_transformers(checkpoints, name):
    """bf16: Gemma's norms round once after scaling by 1 + weight (not Llama's round-then-scale).  Our bf16 kernels
    compute in fp32 and round once (the fused RoPE; the native attention's fp32 softmax and accumulation), where
    transformers' bf16 expressions round after every product, so both are compared with the fp32 model: ours
    within 1.25x of transformers' bf16 error against it, and within 0.15 of transformers' bf16 logits."""
    model = from_pretrained(checkpoints[name], dtype=torch.bfloat16).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[name], dtype=torch.bfloat16).eval()
    truth = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[name], dtype=torch.float32).eval()
    ids, mask = left_padded_batch()
    hf_out = hf_logits(hf, ids, mask)
    hf_err = masked_max(hf_out, hf_logits(truth, ids, mask), mask)
    with torch.no_grad():
        ours, theirs, exact = model(ids, mask).logits, hf_out, hf_logits(truth, ids, mask)
    assert masked_max(ours.float(), exact, mask) <= 1.25 * hf_err
    assert masked_max(ours, theirs, mask) <= 0.15


def test_transformers4_config_spellings():
    """config.json as transformers 4.x wrote Gemma 3 (rope_theta, rope_local_base_freq, sliding_window_pattern, no
    layer_types) and Gemma 2 (no layer_types: alternating, sliding first); bidirectional attention is refused."""
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                head_dim=16, sliding_window=8)
    g3 = config_from_hf(dict(base, model_type="gemma3_text", rope_theta=1e6, rope_local_base_freq=1e4,
                             sliding_window_pattern=3, rope_scaling={"rope_type": "linear", "factor": 8.0}))
    assert g3.layer_types == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert (g3.rope_theta, g3.rope_local_theta, g3.rope_scaling["factor"]) == (1e6, 1e4, 8.0)
    assert g3.query_pre_attn_scalar == 256 and g3.attn_logit_softcapping is None
    g2 = config_from_hf(dict(base, model_type="gemma2", hidden_act="gelu_pytorch_tanh"))
    assert [g2.layer_window(i) for i in range(4)] == [8, None, 8, None]
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping) == (50.0, 30.0)
    no_head_dim = {k: v for k, v in base.items() if k != "head_dim"}
    assert config_from_hf(dict(no_head_dim, model_type="qwen3")).head_dim == 128  # transformers' defaults
    assert config_from_hf(dict(no_head_dim, model_type="gemma2")).head_dim == 256
    with pytest.raises(UnsupportedArchitectureError, match="bidirectional"):
        config_from_hf(dict(base, model_type="gemma3_text", use_bidirectional_attention=True))


def test_packed_sdpa_fallback_keeps_the_window():
    """Packed documents given by boundaries only (what the native kernel gets) keep their sliding window when the
    native kernel hands them to SDPA (bf16, long documents): same as the dense document mask."""
    from saferlhf_fast.models import attention as attn

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    cu = torch.tensor([0, 7, 12], dtype=torch.int32)
    sparse = attn.packed_mask(cu, 12, window=3, dense=False)
    dense = attn.packed_mask(cu, 12, window=3, dense=True)
    got = attn.varlen_sdpa_attention(q, k, v, sparse, 8 ** -0.5)
    want = attn.reference_attention(q, k, v, dense, 8 ** -0.5)
    assert float((got - want).abs().max()) <= 1e-5
    unwindowed = attn.reference_attention(q, k, v, attn.packed_mask(cu, 12, dense=True), 8 ** -0.5)
    assert float((got - unwindowed).abs().max()) > 1e-2


# ---------------------------------------------------------------------------------------------- command line
FAMILY_CONFIGS = {
    "qwen3": dict(),
    "gemma2": dict(sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, hidden_act="gelu_pytorch_tanh"),
    "gemma3_text": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16,
                        rope_theta=1e6, rope_local_theta=1e4, hidden_act="gelu_pytorch_tanh",
                        tie_word_embeddings=True),
}


def make_tiny_family(out, model_type):
    """A random tiny model of ``model_type`` with the bundled tokenizer (what ``make_tiny_model`` does for Llama)."""
    from saferlhf_fast.data import load_tokenizer
    from saferlhf_fast.data.tokenizer import save_tokenizer
    from saferlhf_fast.models import LlamaForCausalLM, ModelConfig

    tok = load_tokenizer(None)
    config = ModelConfig(model_type=model_type, vocab_size=(len(tok) + 63) // 64 * 64, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **FAMILY_CONFIGS[model_type])
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    save_tokenizer(tok, out)
    return out


@pytest.mark.parametrize("model_type", list(FAMILY_CONFIGS))
def test_cli_pipeline_on_native_family(tmp_path, model_type):
    """sft -> rm -> cm -> ppo-lag -> arena from the command line on a tiny native Qwen3 / Gemma model (the demo's
    quick sizes); every checkpoint keeps its model_type and loads in transformers."""
    import shlex

    from saferlhf_fast import cli
    from saferlhf_fast.pipeline import QUICK, _command_line, _make_config

    p = {k: str(tmp_path / k) for k in ("init", "sft", "rm", "cm", "ppo_lag", "arena")}
    make_tiny_family(p["init"], model_type)
    common = dict(max_length=96, seed=1, progress=False)
    stages = [
        ("sft", dict(QUICK["sft"], model_name_or_path=p["init"], output_dir=p["sft"], lr=2e-3, **common)),
        ("rm", dict(QUICK["rm"], model_name_or_path=p["sft"], output_dir=p["rm"], **common)),
        ("cm", dict(QUICK["cm"], model_name_or_path=p["sft"], output_dir=p["cm"], **common)),
        ("ppo-lag", dict(QUICK["ppo_lag"], actor_model_name_or_path=p["sft"], reward_model_name_or_path=p["rm"],
                         cost_model_name_or_path=p["cm"], output_dir=p["ppo_lag"], threshold=0.0, **common)),
    ]
    for command, kw in stages:
        argv = shlex.split(_command_line(command, _make_config(command, kw)))[1:]
        assert cli.main(argv) == 0, argv
    assert cli.main(["arena", "--red_corner_model_name_or_path", p["sft"], "--blue_corner_model_name_or_path",
                     p["ppo_lag"], "--reward_model_name_or_path", p["rm"], "--cost_model_name_or_path", p["cm"],
                     "--datasets", "synthetic-prompts/test:0.05", "--max_new_tokens", "8", "--output_dir",
                     p["arena"]]) == 0
    for stage in ("sft", "rm", "cm", "ppo_lag"):
        assert json.load(open(f"{p[stage]}/config.json"))["model_type"] == model_type, stage
    hf = transformers.AutoModelForCausalLM.from_pretrained(p["ppo_lag"]).eval()
    ours = from_pretrained(p["ppo_lag"]).eval()
    ids = torch.tensor([[5, 9, 14, 20, 7]])
    with torch.no_grad():
        assert float((ours(ids).logits - hf(ids).logits).abs().max()) <= 1e-4
