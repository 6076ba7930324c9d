"""``bench generate --lora_rank R``: generation of a LoRA actor with the adapters merged vs applied on the fly, per
decode path, repetitions interleaved in one run.

The actor is the preset's random Llama with rank-R adapters on every projection (``all-linear``, alpha 16) and
``B`` drawn nonzero (a fresh adapter has ``B = 0``, which would hide the adapters' arithmetic behind exact zeros), the
same adapters for every variant.  Rows (``kernel`` ``generate_lora``; the ``provider`` column names the variant):

* ``mode=decode``, ``metric=throughput``: B * T generated tokens per second of one ``generate`` call (exactly T new
  tokens, sampling, no stop token), everything included (the merge, the compiled step's packing, the prefill):

  - ``eager:on-the-fly`` / ``eager:merged``: the model's own ``forward_cached`` every step (``fast_decode=False``:
    the path of GPUs, CUDA graphs and non-SiLU models), adapters applied per projection per token
    (``ops.lora_linear``) or merged once per call (``lora.merged_adapters``, ``lora_merge=True``);
  - ``fast:merged-step`` / ``fast:merged``: the compiled CPU step, which always packs merged weights; the prefill on
    the fly (``lora_merge=False``) or merged as well (``lora_merge=True``: the plan reuses the block's merged weights);
  - ``hf:on-the-fly`` / ``hf:merged``: the same checkpoint on the transformers path (``backend='hf'``,
    ``lora.HFLoraLinear``, transformers' ``generate``);
  - ``eager:no-lora`` / ``fast:no-lora``: the base model without adapters (what LoRA costs at all).
* ``mode=merge``, ``metric=time``: what one call pays up front: ``merge`` = ``merged_adapters`` entered and left
  (``W + (alpha / r) B A`` for every projection), ``fast:plan`` / ``fast:plan:no-lora`` = the compiled step's plan
  built with the adapters (merge + concatenation + packing) / without them (the packing alone).
* ``metric=memory`` (unless ``--no-memory``): torch's CPU allocator peak of one call above what the model holds
  (``harness.allocator_peak``): the merged copy of the adapted weights shows here.

``--precisions bf16``: under CPU bf16 autocast as the trainers run ``--bf16``: a native LoRA model's frozen base held
in bf16 next to its fp32 adapters (``models.llama.hold_in_bf16``), the no-adapter and transformers models as loaded
(fp32); rows labelled ``:bf16``.
"""
from __future__ import annotations

import torch

from .harness import format_table, rate_row, row, summarize, time_fns

KERNEL = "generate_lora"
BASELINE = "eager:on-the-fly"
# variant -> (backend, adapters, fast_decode, lora_merge)
VARIANTS = {
    "eager:on-the-fly": ("native", True, False, False),
    "eager:merged": ("native", True, False, True),
    "fast:merged-step": ("native", True, True, False),
    "fast:merged": ("native", True, True, True),
    "hf:on-the-fly": ("hf", True, None, False),
    "hf:merged": ("hf", True, None, True),
    "eager:no-lora": ("native", False, False, None),
    "fast:no-lora": ("native", False, True, None),
}
COSTS = ("merge", "fast:plan", "fast:plan:no-lora")


def lora_actor(path: str, rank: int, backend: str = "native", adapters: bool = True, seed: int = 0,
               bf16: bool = False):
    """The checkpoint at ``path`` with rank-``rank`` all-linear adapters, ``A`` and ``B`` drawn from ``seed`` (the
    same adapters on every backend: they are drawn in the native decoder's layer order and copied by name).
    ``bf16``: the frozen base held in bf16, as the trainers hold it under ``--bf16`` (native models)."""
    from ..models import from_pretrained, hold_in_bf16
    from ..models.lora import LoraSpec, apply_lora

    model = from_pretrained(path, backend=backend).eval()
    if not adapters:
        return model
    torch.manual_seed(seed)
    apply_lora(model, LoraSpec(rank))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return hold_in_bf16(model) if bf16 and backend == "native" else model


def fast_available(model) -> bool:
    from ..engine import fast_decode as fd

    return fd.supported(model) and fd.compiled_step_runs(model)


def build(variant: str, path: str, vocab: int, batch: int, prompt: int, new_tokens: int, rank: int, bf16: bool,
          seed: int = 0):
    """The zero-argument callable of one variant (a decode variant or a cost of ``COSTS``)."""
    from ..engine import generate
    from ..models.lora import merged_adapters

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, prompt), generator=g)
    mask = torch.ones(batch, prompt, dtype=torch.bool)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    if variant in COSTS:
        model = lora_actor(path, rank, adapters=variant != "fast:plan:no-lora", bf16=bf16)
        if variant == "merge":
            def run():
                with torch.no_grad(), autocast, merged_adapters(model):
                    pass
            return run
        from ..engine.fast_decode import DecodePlan

        def run():
            with torch.no_grad(), autocast:
                model.setup_cache(batch, prompt + new_tokens)
                try:
                    DecodePlan(model, model.kv_cache, batch, mask)
                finally:
                    model.release_cache()
        return run
    backend, adapters, fast, merge = VARIANTS[variant]
    model = lora_actor(path, rank, backend, adapters, bf16=bf16)
    kw = dict(max_new_tokens=new_tokens, do_sample=True, top_k=0, top_p=1.0, eos_token_id=[], pad_token_id=0, seed=1,
              lora_merge=merge)
    if backend == "native":
        kw["fast_decode"] = fast
    else:
        model.hf.generation_config.eos_token_id = None
        kw.pop("eos_token_id")  # transformers' generate: no stop token, exactly T tokens

    @torch.no_grad()
    def run():
        with autocast:
            return generate(model, ids, mask, **kw)

    return run


def variants_here(path: str, rank: int) -> tuple[list[str], list[str]]:
    """(decode variants, cost variants) this machine runs: the compiled step's only where it is available."""
    fast = fast_available(lora_actor(path, rank, adapters=False))
    decode = [v for v in VARIANTS if fast or not v.startswith("fast:")]
    costs = [c for c in COSTS if fast or c == "merge"]
    return decode, costs


def run(path: str, name: str, rank: int, batch: int, prompt: int, new_tokens: int, config: str,
        precisions=("fp32",), reps: int = 5, warmup: int = 1, memory: bool = True, echo=print) -> list[dict]:
    """Every variant of ``VARIANTS`` / ``COSTS`` this machine runs, for each precision, all timed interleaved in one
    group; returns the rows (module docstring)."""
    from ..models.checkpoint import read_config

    vocab = int(read_config(f"{path}/config.json")["vocab_size"])
    decode, costs = variants_here(path, rank)
    x0 = f"{name}:B{batch}xP{prompt}+T{new_tokens}:lora-r{rank}"
    fns, keys = {}, {}
    for precision in precisions:
        x = x0 if precision == "fp32" else f"{x0}:{precision}"
        for v in decode + costs:
            key = f"{v}@{precision}"
            fns[key] = build(v, path, vocab, batch, prompt, new_tokens, rank, precision == "bf16")
            keys[key] = (v, x)
    times = time_fns(fns, "cpu", reps=reps, warmup=warmup)
    rows = []
    for key, (v, x) in keys.items():
        if v in COSTS:
            p50, p20, p80 = summarize(times[key])
            rows.append(row(KERNEL, v, "merge", "time", "s", x, p50, p20, p80, config, "cpu"))
        else:
            rows.append(rate_row(KERNEL, v, "decode", "throughput", "tokens/s", x, batch * new_tokens, times[key],
                                 config, "cpu"))
    if memory:
        from .harness import allocator_peak

        for key, (v, x) in keys.items():
            if v not in COSTS:
                peak = float(allocator_peak(fns[key]))
                rows.append(row(KERNEL, v, "decode", "memory", "B", x, peak, peak, peak, config, "cpu"))
    for x in dict.fromkeys(r["x"] for r in rows):
        echo(format_table([r for r in rows if r["x"] == x], baseline=BASELINE))
        echo(break_even_note([r for r in rows if r["x"] == x], batch, new_tokens))
    return rows


def break_even_note(rows: list[dict], batch: int, new_tokens: int) -> str:
    """One line from the rows of one size label: the merge time, on the fly's extra time per decode step on the eager
    path (the merge excluded), and how many decode steps pay for one merge."""
    rate = {r["provider"]: float(r["p50"]) for r in rows if r["metric"] == "throughput"}
    merge = next((float(r["p50"]) for r in rows if r["provider"] == "merge" and r["metric"] == "time"), None)
    if merge is None or "eager:on-the-fly" not in rate or "eager:merged" not in rate:
        return ""
    tokens = batch * new_tokens
    t_fly, t_merged = tokens / rate["eager:on-the-fly"], tokens / rate["eager:merged"]
    per_step = (t_fly - t_merged + merge) / new_tokens
    steps = merge / per_step if per_step > 0 else float("inf")
    return (f"merge {merge * 1e3:.3g} ms per call; on the fly {per_step * 1e3:.3g} ms more per decode step of "
            f"{batch} rows (eager step): the merge pays for itself after {steps:.3g} steps")
