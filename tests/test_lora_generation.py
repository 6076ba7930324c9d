"""Generation of a LoRA model with the adapters merged (``lora.merged_adapters``, ``generate(lora_merge=True)``) vs
applied on the fly: the same tokens and log-probs to rounding, the parameters bit for bit unchanged after (an
exception included), ``adapters_disabled`` is the base model, training inside the block stays exact, sharded layers
stay on the fly, the default follows ``merge_lora_by_default``; and ``bench generate --lora_rank`` (tiny)."""
import sys

import pytest
import torch
from test_bench_cli import check_rows, read_rows  # tests/ is on sys.path (no package)
from test_lora import randomise_adapters, tiny_config

from saferlhf_fast.cli import main
from saferlhf_fast.engine import fast_decode as fd
from saferlhf_fast.engine import generate
from saferlhf_fast.engine.generate import MERGE_MIN_NEW_TOKENS, merge_lora_by_default
from saferlhf_fast.models import LlamaForCausalLM
from saferlhf_fast.models.lora import (
    LoraLinear,
    LoraSpec,
    adapters_disabled,
    apply_lora,
    lora_layers,
    mergeable,
    merged_adapters,
)

GREEDY = dict(max_new_tokens=8, do_sample=False, eos_token_id=[], pad_token_id=0)


def lora_lm(seed=0, **cfg):
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(tiny_config(**cfg))
    base = generate(lm, *prompts(), fast_decode=False, **GREEDY)
    apply_lora(lm, LoraSpec(rank=4, alpha=64.0))
    randomise_adapters(lm, seed)
    return lm, base


def prompts():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 96, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row
    return ids, mask


def snapshot(model):
    return {n: (p.detach().clone(), p._version) for n, p in model.named_parameters()}


def assert_unchanged(model, before):
    """Every parameter bit for bit as before and never written (same version counter); no merged weight left."""
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for n, (t, version) in before.items():
        assert torch.equal(after[n].detach(), t) and after[n]._version == version, n
    assert all(m.merged is None for m in lora_layers(model))


def test_merged_generation_equals_on_the_fly_and_leaves_the_model_exact():
    lm, base = lora_lm()
    ids, mask = prompts()
    before = snapshot(lm)
    fly = generate(lm, ids, mask, fast_decode=False, lora_merge=False, **GREEDY)
    merged = generate(lm, ids, mask, fast_decode=False, lora_merge=True, **GREEDY)
    assert torch.equal(merged.sequences, fly.sequences)
    torch.testing.assert_close(merged.logprobs, fly.logprobs, rtol=0, atol=2e-6)
    assert not torch.equal(fly.sequences, base.sequences)  # the adapters act
    assert_unchanged(lm, before)
    # the training forward after generation is the one before it, bit for bit
    x = lm.token_logprobs(*prompts())
    with merged_adapters(lm):
        outer = [m.merged for m in lora_layers(lm)]
        with merged_adapters(lm):  # nested (generate inside a caller's block): the outer merge stays
            pass
        assert all(m.merged is t for m, t in zip(lora_layers(lm), outer))
    assert torch.equal(lm.token_logprobs(*prompts()), x)


def test_the_merged_forward_is_one_product_with_the_merged_weight():
    lm, _ = lora_lm()
    layer = lora_layers(lm)[0]
    x = torch.randn(5, layer.in_features)
    with torch.no_grad(), merged_adapters(lm):
        assert isinstance(layer, LoraLinear) and layer.merged is not None and not layer.merged.requires_grad
        assert torch.equal(layer.merged, layer.merged_weight())
        got = layer(x)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, layer.merged, layer.bias), rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(got, layer(x), rtol=0, atol=1e-5)  # on the fly, outside the block


def test_an_exception_inside_generation_restores_the_model():
    lm, _ = lora_lm()
    ids, mask = prompts()
    fly = generate(lm, ids, mask, fast_decode=False, lora_merge=False, **GREEDY)
    before = snapshot(lm)
    steps = []

    def stop(tok, emitted):
        steps.append(1)
        if len(steps) == 3:
            assert all(m.merged is not None for m in lora_layers(lm))  # merged while generating
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(lm, ids, mask, fast_decode=False, lora_merge=True, on_token=stop, **GREEDY)
    assert_unchanged(lm, before)
    assert torch.equal(generate(lm, ids, mask, fast_decode=False, lora_merge=False, **GREEDY).logprobs, fly.logprobs)


def test_disabled_adapters_generate_the_base_model_merged_or_not():
    lm, base = lora_lm()
    ids, mask = prompts()
    with adapters_disabled(lm):
        off = {m: generate(lm, ids, mask, fast_decode=False, lora_merge=m, **GREEDY) for m in (True, False)}
        with merged_adapters(lm):
            assert all(m.merged is None for m in lora_layers(lm))  # disabled on entry: nothing merged
    assert torch.equal(off[True].logprobs, off[False].logprobs)
    assert torch.equal(off[True].sequences, base.sequences)
    torch.testing.assert_close(off[True].logprobs, base.logprobs, rtol=0, atol=2e-6)
    # disabled inside the block: the base weights alone, whatever is merged
    x = torch.randn(2, 4, 32)
    layer = lora_layers(lm)[0]
    with torch.no_grad():
        plain = torch.nn.functional.linear(x, layer.weight, layer.bias)
        with merged_adapters(lm), adapters_disabled(lm):
            torch.testing.assert_close(layer(x), plain, rtol=0, atol=1e-6)


def test_training_inside_the_block_is_exact():
    """A forward that wants gradients (or has active dropout) applies the adapters on the fly: the same loss and
    adapter gradients bit for bit as outside the block."""
    torch.manual_seed(0)
    lm = apply_lora(LlamaForCausalLM(tiny_config()), LoraSpec(rank=4, dropout=0.1))
    randomise_adapters(lm)
    ids, mask = prompts()

    def grads():
        torch.manual_seed(1)  # the same dropout masks
        lm.zero_grad(set_to_none=True)
        lm.token_logprobs(ids, mask).sum().backward()
        return {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}

    lm.train()
    outside = grads()
    with merged_adapters(lm):
        inside = grads()
        lm.eval()
        with torch.no_grad():
            assert all(m.use_merged() for m in lora_layers(lm))
        assert not any(m.use_merged() for m in lora_layers(lm))  # grad enabled
        lm.train()
        with torch.no_grad():
            assert not any(m.use_merged() for m in lora_layers(lm))  # dropout active
    assert outside.keys() == inside.keys() and any(".lora_A." in n for n in outside)
    assert all(torch.equal(outside[n], inside[n]) for n in outside)


def test_bf16_autocast_merges_in_the_weights_dtype():
    lm, _ = lora_lm()
    ids, mask = prompts()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with merged_adapters(lm):
            for m in lora_layers(lm):
                assert m.merged.dtype == torch.float32  # the fp32 master merged, rounded once by the product
                with torch.autocast("cpu", enabled=False):
                    assert torch.equal(m.merged, m.merged_weight())
        fly = generate(lm, ids, mask, fast_decode=False, lora_merge=False, **GREEDY)
        merged = generate(lm, ids, mask, fast_decode=False, lora_merge=True, **GREEDY)
    # bf16 rounding of two computations: the first two steps, before a flipped token could change the rest of a row
    assert float((merged.logprobs - fly.logprobs)[:, :2].abs().max()) <= 0.05
    assert float((merged.sequences == fly.sequences).float().mean()) >= 0.9


def test_sharded_layers_stay_on_the_fly():
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    lm, _ = lora_lm()
    layer = lora_layers(lm)[0]
    assert mergeable(layer)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        layer.weight = torch.nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(0)]),
                                          requires_grad=False)
        assert not mergeable(layer)
        with merged_adapters(lm):
            assert layer.merged is None and all(m.merged is not None for m in lora_layers(lm)[1:])
    finally:
        dist.destroy_process_group()


def test_default_merges_except_for_the_compiled_step_and_short_generations(monkeypatch):
    lm, _ = lora_lm()
    assert merge_lora_by_default(lm, 64, compiled_step=False)
    assert not merge_lora_by_default(lm, 64, compiled_step=True)
    assert not merge_lora_by_default(lm, MERGE_MIN_NEW_TOKENS - 1, compiled_step=False)
    with adapters_disabled(lm):
        assert not merge_lora_by_default(lm, 64, compiled_step=False)
    assert not merge_lora_by_default(LlamaForCausalLM(tiny_config()), 64, compiled_step=False)
    # what generate passes: record the blocks it enters
    seen = []
    real = merged_adapters

    def spy(model, enabled=True):
        seen.append(enabled)
        return real(model, enabled)

    monkeypatch.setattr(sys.modules["saferlhf_fast.engine.generate"], "merged_adapters", spy)
    ids, mask = prompts()
    generate(lm, ids, mask, fast_decode=False, **GREEDY)
    assert seen == [True]
    if fd.native_step_available():
        seen.clear()
        generate(lm, ids, mask, fast_decode=True, **GREEDY)
        assert seen == [False]


def test_bench_generate_lora_tiny(tmp_path):
    path = tmp_path / "gen.csv"
    assert main(["bench", "generate", "--sizes", "tiny", "--lora_rank", "4", "--reps", "1", "--warmup", "0",
                 "--no-memory", "--csv", str(path)]) == 0
    rows = read_rows(path)
    check_rows(rows, "saferlhf-fast bench generate --sizes tiny")
    got = {(r["provider"], r["mode"], r["metric"]) for r in rows}
    assert {("eager:on-the-fly", "decode", "throughput"), ("eager:merged", "decode", "throughput"),
            ("hf:on-the-fly", "decode", "throughput"), ("hf:merged", "decode", "throughput"),
            ("merge", "merge", "time")} <= got
    if fd.native_step_available():
        assert {("fast:merged-step", "decode", "throughput"), ("fast:plan", "merge", "time")} <= got
    assert all(r["kernel"] == "generate_lora" and r["x"].endswith(":lora-r4") and float(r["p50"]) > 0 for r in rows)
    for bad in (["--lora_rank", "-1"], ["--lora_rank", "4", "--device", "cuda"]):
        assert main(["bench", "generate", "--sizes", "tiny", *bad, "--csv", str(path)]) == 2
    assert len(read_rows(path)) == len(rows)
