"""The KV cache is owned by the attention modules: ``setup_cache`` hands each layer its views of one allocation,
only ``forward_cached`` reads or writes it, the training forward has no cache plumbing, and ``generate`` frees the
cache when it returns (also when it raises)."""
from __future__ import annotations

import gc
import inspect
import weakref

import pytest
import torch

from saferlhf_fast.engine import generate
from saferlhf_fast.models.llama import (
    DecoderLayer,
    GemmaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    ModelConfig,
    positions_from_mask,
)


def tiny(**extra) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, eos_token_id=[], **extra))


def prompts():
    ids = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :2] = False
    return ids, mask


def test_setup_cache_gives_each_attention_its_layer_view():
    model = tiny()
    cache = model.setup_cache(2, 8)
    assert model.kv_cache is cache and cache.k.is_contiguous() and cache.k.shape == (3, 2, 2, 8, 8)
    for i, layer in enumerate(model.model.layers):
        own = layer.self_attn.kv_cache
        assert own.k.data_ptr() == cache.k[i].data_ptr() and own.v.data_ptr() == cache.v[i].data_ptr()
        assert own.k.shape == cache.k[i].shape
    assert not any("cache" in name for name in model.state_dict())  # not buffers: never saved or loaded
    model.release_cache()
    assert model.kv_cache is None and all(layer.self_attn.kv_cache is None for layer in model.model.layers)


def test_prefill_fills_the_model_cache_and_matches_the_full_forward():
    model = tiny().eval()
    ids, mask = prompts()
    cache = model.setup_cache(2, 8)
    cache.valid[:, :5] = mask
    with torch.no_grad():
        logits = model.forward_cached(ids, positions_from_mask(mask), start=0)
        full = model(ids, mask).logits[:, -1]
    assert torch.allclose(logits, full, atol=1e-5)
    assert bool(cache.k[:, :, :, :5].abs().sum(-1).gt(0).all()) and not bool(cache.k[:, :, :, 5:].any())


def test_another_cache_is_used_for_one_call_only():
    model = tiny().eval()
    ids, mask = prompts()
    own = model.setup_cache(2, 8)
    other = model.allocate_cache(2, 8)
    for c in (own, other):
        c.valid[:, :5] = mask
    with torch.no_grad():
        a = model.forward_cached(ids, positions_from_mask(mask), other, 0)
        assert model.kv_cache is own and model.model.layers[0].self_attn.kv_cache.k.data_ptr() == own.k.data_ptr()
        assert not bool(own.k.any()) and bool(other.k.any())
        b = model.forward_cached(ids, positions_from_mask(mask), start=0)
    assert torch.equal(a, b) and torch.equal(own.k, other.k) and torch.equal(own.v, other.v)


def test_forward_cached_without_a_cache_says_so():
    model = tiny().eval()
    ids, mask = prompts()
    with pytest.raises(RuntimeError, match="setup_cache"):
        model.forward_cached(ids, positions_from_mask(mask), start=0)


def test_training_forward_never_touches_a_set_up_cache():
    model = tiny()
    ids, mask = prompts()
    cache = model.setup_cache(2, 8)
    logp = model.token_logprobs(ids, mask)
    logp.sum().backward()
    assert not bool(cache.k.any()) and not bool(cache.v.any())
    for fn in (DecoderLayer.forward, GemmaDecoderLayer.forward, LlamaModel.forward):
        assert not any("cache" in p or p == "start" for p in inspect.signature(fn).parameters)


@pytest.mark.parametrize("extra", [{}, {"model_type": "gemma2", "sliding_window": 3, "attn_logit_softcapping": 50.0}])
@pytest.mark.parametrize("fast_decode", [False, None])
def test_generate_frees_its_cache(extra, fast_decode, monkeypatch):
    model = tiny(**extra)
    ids, mask = prompts()
    made = []
    setup = model.setup_cache

    def recording_setup(batch, max_len):
        made.append(weakref.ref(setup(batch, max_len)))
        return made[-1]()

    monkeypatch.setattr(model, "setup_cache", recording_setup)
    out = generate(model, ids, mask, max_new_tokens=4, seed=0, fast_decode=fast_decode)
    assert out.sequences.shape == (2, 9) and len(made) == 1
    gc.collect()
    assert made[0]() is None and model.kv_cache is None
    assert all(layer.self_attn.kv_cache is None for layer in model.model.layers)

    def failing(tokens, emitted):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(model, ids, mask, max_new_tokens=4, seed=0, fast_decode=fast_decode, on_token=failing)
    assert model.kv_cache is None and all(layer.self_attn.kv_cache is None for layer in model.model.layers)
