"""One PPO-Lagrangian step, ours vs a straightforward reference-style step, timed interleaved in one process.

The baseline is written here the way the reference implementation does each part (``docs/algorithm.md`` sections 4
and 9): transformers ``LlamaForCausalLM.generate`` for the rollout, then six separate no-grad forwards (actor and
reference: full ``[B, L, V]`` logits -> ``log_softmax`` -> gather; reward and cost models: end scores; both
critics: values), the scatter-add KL rewards, a Python loop over time for GAE called once per stream, eager
losses, one backward + clip + AdamW step per trained model, the Lagrange multiplier as a torch parameter with an
SGD optimizer.  Score models are ``LlamaModel`` + ``Linear(H, 1)`` (the reference's ``LlamaForScore``).

Ours is the trainer itself (``saferlhf_fast.trainers.ppo.PPOTrainer``: ``rollout`` + ``rl_step``): the engine's
static-KV-cache generation, one forward per frozen model, the fused first pass (the training forwards are the
old log-probs / values), ``ops.linear_logprobs`` (no [B, L, V] logits), one ``ops.gae`` call for both streams,
fused losses.  Both start from the same weights and see the same prompts; each rep runs ours then the baseline,
so load drifts of a shared machine hit both alike.  Reported: median seconds per step and per phase
(p20 / p80), generated tokens/s, and the peak memory of one extra step per engine (CUDA: ``max_memory_allocated``
above the memory in use before the step; CPU: the peak of torch's CPU allocator over the step, from the profiler's
memory events).

``precisions=("fp32", "bf16")`` (``--precisions``) runs both steps once per precision, all repetitions interleaved:
ours with ``--bf16`` (bf16 products, fp32 masters, the frozen models held in bf16), the reference-style step as the
reference trains with ``--bf16 True`` (DeepSpeed bf16): frozen models in bf16, the trained ones under bf16 autocast
with fp32 weights and optimizer state.  bf16 rows carry ``:bf16`` in their size label, so each precision's table
compares ours with the reference-style step of the same precision.

Used by ``saferlhf-fast bench ppo-step``, ``saferlhf-fast profile ppo-step`` and ``bench/bench_ppo_step.py``.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import harness

PHASES = ("generation", "scoring", "gae", "actor", "critics")
ENGINES = ("ours", "reference-style")
PROVIDER = {"ours": "saferlhf_fast", "reference-style": "reference-style"}
PRECISIONS = ("fp32", "bf16")


def engine_key(engine: str, precision: str) -> str:
    """``ours`` / ``reference-style`` in fp32 (the historical keys), ``ours:bf16`` / ``reference-style:bf16``."""
    return engine if precision == "fp32" else f"{engine}:{precision}"


def split_key(key: str) -> tuple[str, str]:
    engine, _, precision = key.partition(":")
    return engine, precision or "fp32"


@dataclass
class Workload:
    """Model shape (Llama, untied) and rollout; defaults: the README's CPU row."""

    algorithm: str = "ppo-lag"
    hidden: int = 256
    intermediate: int = 688
    layers: int = 4
    heads: int = 4
    vocab: int = 8192
    batch: int = 16
    prompt_len: int = 16
    new_tokens: int = 64
    top_k: int = 50

    def label(self) -> str:
        return (f"{self.algorithm}:h{self.hidden},i{self.intermediate},L{self.layers},H{self.heads},V{self.vocab}:"
                f"B{self.batch}xP{self.prompt_len}+T{self.new_tokens}")


# The bundled tokenizer has 1088 tokens: the vocabulary must hold them.
SIZES = {
    "tiny": Workload(hidden=32, intermediate=64, layers=1, heads=2, vocab=1152, batch=2, prompt_len=4, new_tokens=4),
    "default": Workload(),
    # SmolLM2's vocabulary, 64-token prompts, 256 new tokens: where [B, L, V] logits dominate a reference step.
    "realistic": Workload(vocab=49152, batch=8, prompt_len=64, new_tokens=256),
    "gpu": Workload(hidden=1024, intermediate=2816, layers=8, heads=16, vocab=32000, batch=32, prompt_len=64,
                    new_tokens=128),
}


# ================================================================================================ baseline
class RefScoreModel(nn.Module):
    """The reference's ``LlamaForScore``: backbone + ``score_head = Linear(H, 1)`` on every position."""

    def __init__(self, config):
        super().__init__()
        from transformers import LlamaModel

        self.model = LlamaModel(config)
        self.score_head = nn.Linear(config.hidden_size, 1, bias=True)

    def forward(self, input_ids, attention_mask):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        scores = self.score_head(h).float()  # [B, L, 1]
        end_index = torch.cat([m.nonzero()[-1] for m in attention_mask])
        end_scores = scores.squeeze(-1).gather(1, end_index[:, None]).squeeze(1)
        return scores, end_scores


def gather_log_probabilities(logits, labels):
    """The reference's function; the gathered log-probs in fp32 for the advantage math (bf16 logits give bf16)."""
    log_probs = F.log_softmax(logits, dim=-1)
    return log_probs.gather(dim=-1, index=labels.unsqueeze(-1)).squeeze(-1).float()


def masked_mean(x, mask):
    return ((x * mask).sum(dim=-1) / mask.sum(dim=-1)).mean()


class ReferenceStep:
    """A reference-style PPO-Lag (or PPO) step on transformers models."""

    def __init__(self, actor, reference, reward_model, cost_model, reward_critic, cost_critic, *, pad_token_id,
                 max_new_tokens, algorithm="ppo-lag", kl_coeff=0.01, clip_range_ratio=0.2, clip_range_score=50.0,
                 clip_range_value=5.0, gamma=1.0, gae_lambda=0.95, lr=1e-5, critic_lr=5e-6, top_k=50, bf16=False):
        self.cuda = next(actor.parameters()).is_cuda
        self.bf16 = bf16  # the whole step under bf16 autocast (trained models keep fp32 weights)
        self.actor, self.reference = actor, reference
        self.reward_model, self.cost_model = reward_model, cost_model
        self.reward_critic, self.cost_critic = reward_critic, cost_critic
        from ..trainers.algorithms import ALGORITHMS

        # The reference's PPOLagTrainer adds the cost stream, the cost critic and lambda to its PPOTrainer.
        self.lagrangian = ALGORITHMS[algorithm].lagrangian
        self.top_k = top_k
        self.pad, self.max_new = pad_token_id, max_new_tokens
        self.kl_coeff, self.eps, self.clip_score, self.clip_value = kl_coeff, clip_range_ratio, clip_range_score, \
            clip_range_value
        self.gamma, self.lam = gamma, gae_lambda
        self.actor_opt = torch.optim.AdamW(actor.parameters(), lr=lr, betas=(0.9, 0.95))
        self.critic_opts = [torch.optim.AdamW(c.parameters(), lr=critic_lr, betas=(0.9, 0.95))
                            for c in self.critics()]
        self.log_lambda = nn.Parameter(torch.tensor(0.0, device=next(actor.parameters()).device))
        self.lambda_opt = torch.optim.SGD([self.log_lambda], lr=0.1)
        self.episode_costs: list[float] = []
        self.timings: dict[str, float] = {}

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def critics(self):
        return [self.reward_critic] + ([self.cost_critic] if self.lagrangian else [])

    @torch.no_grad()
    def rollout(self, input_ids, attention_mask, seed):
        t0 = self._now()
        torch.manual_seed(seed)
        self.actor.eval()
        sequence = self.actor.generate(input_ids=input_ids, attention_mask=attention_mask,
                                       max_new_tokens=self.max_new, min_new_tokens=self.max_new, do_sample=True,
                                       temperature=1.0, top_p=1.0, top_k=self.top_k, pad_token_id=self.pad,
                                       eos_token_id=None)
        t1 = self._now()
        attention_mask = sequence.not_equal(self.pad)
        logits = self.actor(sequence, attention_mask=attention_mask).logits
        ref_logits = self.reference(sequence, attention_mask=attention_mask).logits
        # scores and values in fp32 for the advantage math (bf16 models return them in bf16)
        reward = self.reward_model(sequence, attention_mask)[1].float()
        cost = self.cost_model(sequence, attention_mask)[1].float() if self.lagrangian else None
        reward_values = self.reward_critic(sequence, attention_mask)[0].squeeze(-1)[:, :-1].float()
        cost_values = self.cost_critic(sequence, attention_mask)[0].squeeze(-1)[:, :-1].float() \
            if self.lagrangian else None
        log_probs = gather_log_probabilities(logits[:, :-1], sequence[:, 1:])
        ref_log_probs = gather_log_probabilities(ref_logits[:, :-1], sequence[:, 1:])
        if cost is not None:
            self.episode_costs = (self.episode_costs + cost.tolist())[-128:]
        self.timings = {"generation": t1 - t0, "scoring": self._now() - t1}
        return dict(prompt=input_ids, input_ids=sequence, attention_mask=attention_mask, reward=reward, cost=cost,
                    reward_values=reward_values, cost_values=cost_values, old_log_probs=log_probs,
                    ref_log_probs=ref_log_probs)

    def add_kl_divergence_regularization(self, reward, cost, log_probs, ref_log_probs, sequence_mask):
        end_index = torch.cat([m.nonzero()[-1] for m in sequence_mask])
        kl_penalty_rewards = -self.kl_coeff * (log_probs - ref_log_probs)
        rewards = torch.scatter_add(kl_penalty_rewards, -1, end_index.unsqueeze(-1), reward.unsqueeze(-1))
        out = [torch.clamp(rewards, -self.clip_score, self.clip_score)]
        if cost is not None:
            costs = torch.scatter_add(-kl_penalty_rewards, -1, end_index.unsqueeze(-1), cost.unsqueeze(-1))
            out.append(torch.clamp(costs, -self.clip_score, self.clip_score))
        return out

    def get_advantages_and_returns(self, values, rewards, sequence_mask, start):
        last_gae_lambda = 0.0
        advantages_reversed = []
        values = values * sequence_mask
        rewards = rewards * sequence_mask
        length = rewards.size(-1)
        for t in reversed(range(start, length)):
            next_values = values[:, t + 1] if t < length - 1 else 0.0
            delta = rewards[:, t] + self.gamma * next_values - values[:, t]
            last_gae_lambda = delta + self.gamma * self.lam * last_gae_lambda
            advantages_reversed.append(last_gae_lambda)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
        return advantages.detach(), advantages + values[:, start:]

    def critic_loss(self, values, old_values, returns, mask):
        values_clipped = torch.clamp(values, old_values - self.clip_value, old_values + self.clip_value)
        return 0.5 * masked_mean(torch.maximum(torch.square(values - returns), torch.square(values_clipped - returns)),
                                 mask)

    def rl_step(self, b):
        t0 = self._now()
        if self.lagrangian:
            episode_cost = torch.tensor(self.episode_costs, device=self.log_lambda.device).mean()
            lambda_loss = -(episode_cost - 0.0) * self.log_lambda.exp()
            self.lambda_opt.zero_grad()
            lambda_loss.backward()
            self.lambda_opt.step()
        prompt, input_ids, attention_mask = b["prompt"], b["input_ids"], b["attention_mask"]
        start = prompt.size(-1) - 1
        sequence_mask = attention_mask[:, 1:].float()
        streams = self.add_kl_divergence_regularization(b["reward"], b["cost"], b["old_log_probs"],
                                                        b["ref_log_probs"], sequence_mask)
        r_adv, r_ret = self.get_advantages_and_returns(b["reward_values"], streams[0], sequence_mask, start)
        if self.lagrangian:
            c_adv, c_ret = self.get_advantages_and_returns(b["cost_values"], streams[1], sequence_mask, start)
        t1 = self._now()
        # actor
        self.actor.train()
        logits = self.actor(input_ids, attention_mask=attention_mask, use_cache=False).logits
        log_probs = gather_log_probabilities(logits[:, :-1], input_ids[:, 1:])
        mask = sequence_mask[:, start:]
        if self.lagrangian:
            multiplier = self.log_lambda.exp().item()
            advantages = (r_adv - multiplier * c_adv) / (1.0 + multiplier)
        else:
            advantages = r_adv
        ratios = torch.exp(log_probs[:, start:] - b["old_log_probs"][:, start:])
        surrogate = torch.minimum(advantages * ratios,
                                  advantages * torch.clamp(ratios, 1.0 - self.eps, 1.0 + self.eps))
        actor_loss = -masked_mean(surrogate, mask)
        self.actor_opt.zero_grad()
        actor_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.actor.parameters(), 1.0)
        self.actor_opt.step()
        t2 = self._now()
        # critics
        olds = [b["reward_values"]] + ([b["cost_values"]] if self.lagrangian else [])
        rets = [r_ret] + ([c_ret] if self.lagrangian else [])
        for critic, opt, old, ret in zip(self.critics(), self.critic_opts, olds, rets):
            values = critic(input_ids, attention_mask)[0].squeeze(-1)[:, :-1].float()
            loss = self.critic_loss(values[:, start:], old[:, start:], ret, mask)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
            opt.step()
        t3 = self._now()
        self.timings.update(gae=t1 - t0, actor=t2 - t1, critics=t3 - t2)

    def step(self, input_ids, attention_mask, seed):
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            b = self.rollout(input_ids, attention_mask, seed)
            self.rl_step(b)
        return dict(self.timings)


# ================================================================================================ setup
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def build_checkpoints(w, root: str):
    """Our actor, reward and cost models, randomly initialised (seed 0) and saved as Hugging Face checkpoints with the
    bundled tokenizer.  Returns (tokenizer, {"actor"|"rm"|"cm": path}, {name: model})."""
    from ..data import load_tokenizer
    from ..models import LlamaForCausalLM as OurLM
    from ..models import LlamaForScore, ModelConfig

    tok = load_tokenizer()
    mc = model_config(w, tok)
    paths = {}
    torch.manual_seed(0)
    ours = {"actor": OurLM(ModelConfig(model_type="llama", **mc))}
    for name in ("rm", "cm"):
        ours[name] = LlamaForScore(ModelConfig(model_type="llama", **mc))
        with torch.no_grad():
            ours[name].score_head.weight.normal_(0, 0.2)
    for name, m in ours.items():
        paths[name] = os.path.join(root, name)
        m.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return tok, paths, ours


def model_config(w, tok) -> dict:
    return dict(vocab_size=w.vocab, hidden_size=w.hidden, intermediate_size=w.intermediate,
                num_hidden_layers=w.layers, num_attention_heads=w.heads, num_key_value_heads=w.heads,
                max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)


def build(w, root: str, device: str = "cpu"):
    """Same initial weights on both sides: our models are built and saved (HF format); the transformers models get
    the same state dicts.  Returns (tokenizer, checkpoint paths, transformers models)."""
    tok, paths, ours = build_checkpoints(w, root)
    return tok, paths, reference_models(w, tok, ours, device)


def reference_models(w, tok, ours: dict, device: str = "cpu", precision: str = "fp32") -> dict:
    """The reference-style step's six transformers models with the weights of ``ours``; ``precision`` bf16: the
    frozen ones (reference, reward, cost) held in bf16, as DeepSpeed's bf16 engine holds them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .model import _quiet

    _quiet()
    hf_cfg = LlamaConfig(**model_config(w, tok), attn_implementation="sdpa")
    hf = {}
    for name in ("actor", "reference"):
        m = LlamaForCausalLM(hf_cfg)
        m.load_state_dict(ours["actor"].state_dict(), strict=False)
        hf[name] = m.float().to(device)
    for name, src in (("reward_model", "rm"), ("cost_model", "cm"), ("reward_critic", "rm"), ("cost_critic", "cm")):
        m = RefScoreModel(hf_cfg)
        missing, unexpected = m.load_state_dict(ours[src].state_dict(), strict=False)
        assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
        hf[name] = m.float().to(device)
    for name in ("reference", "reward_model", "cost_model"):
        hf[name].eval().requires_grad_(False)
        if precision == "bf16":
            hf[name].to(torch.bfloat16)
    return hf


def make_trainer(w, paths, out, device: str = "cpu", lora_rank: int = 0, precision: str = "fp32",
                 critic_backbone: str = "separate"):
    """Our PPO trainer on the saved checkpoints, configured for exactly ``new_tokens`` new tokens per response;
    ``lora_rank`` > 0: LoRA actor and critics of that rank (the reference is then the actor with adapters off);
    ``critic_backbone``: the trainer's ``--critic_backbone``."""
    from ..trainers.algorithms import ALGORITHMS
    from ..trainers.ppo import PPOTrainer

    algorithm = ALGORITHMS[w.algorithm]
    cls = algorithm.config_class
    kw = dict(actor_model_name_or_path=paths["actor"], reward_model_name_or_path=paths["rm"],
              train_datasets=["synthetic-prompts/train:0.05"], output_dir=out, max_length=512,
              max_new_tokens=w.new_tokens, per_device_prompt_batch_size=w.batch,
              per_device_train_batch_size=w.batch, kl_coeff=0.01, progress=False, actor_lr_warmup_ratio=0.0,
              top_k=getattr(w, "top_k", 50), device=device, lora_rank=lora_rank, bf16=precision == "bf16",
              critic_backbone=critic_backbone)
    if algorithm.uses_cost:
        kw["cost_model_name_or_path"] = paths["cm"]
    cfg = cls(**kw)
    cfg.validate()
    trainer = PPOTrainer(cfg)
    trainer.eos_token_id = []  # exactly new_tokens tokens, as the baseline (no stop token)
    return trainer


def our_step(trainer, input_ids, attention_mask, seed):
    """One rollout + its RL updates; per-phase seconds (the trainer's own timers) and the total."""
    from torch.profiler import record_function

    trainer.timings = {}
    device = trainer.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    _sync(device)
    t0 = time.perf_counter()
    with record_function("ppo/rollout"):
        micro = trainer.rollout({"input_ids": input_ids, "attention_mask": attention_mask}, seed)
    for mb in micro:
        with record_function("ppo/rl_step"):
            trainer.rl_step(mb)
        trainer.global_step += 1
    _sync(device)
    total = time.perf_counter() - t0
    return {k: trainer.timings.get(k, 0.0) for k in PHASES} | {"total": total}


def prompts(w, n: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(1)
    special = 4
    ids = [torch.randint(special, w.vocab, (w.batch, w.prompt_len), generator=g).to(device) for _ in range(n)]
    return ids, torch.ones(w.batch, w.prompt_len, dtype=torch.bool, device=device)


# ================================================================================================ run
def _peak(fn, device: str) -> int:
    if torch.device(device).type == "cuda":
        return harness.cuda_peak(fn)
    return harness.allocator_peak(fn)


def run(w, device: str = "cpu", reps: int = 5, warmup: int = 1, memory: bool = True, echo=print,
        precisions=("fp32",)) -> dict:
    """Both steps once per precision in ``precisions``, repetitions interleaved (per rep: ours then the baseline,
    precision by precision, same prompts and seed).  Returns the summary (``summary``: per engine key
    (:func:`engine_key`) medians and per-phase split; ``speedup_median_of_ratios`` of the first precision,
    ``speedups`` per precision, ``bf16_vs_fp32`` when both ran; ``runs``: every rep; peak memory of one step)."""
    root = tempfile.mkdtemp(prefix="bench_ppo_step_")
    try:
        tok, paths, ours_models = build_checkpoints(w, root)
        steps = {}
        for precision in precisions:
            hf = reference_models(w, tok, ours_models, device, precision)
            trainer = make_trainer(w, paths, os.path.join(root, f"out-{precision}"), device, precision=precision)
            ref_step = ReferenceStep(hf["actor"], hf["reference"], hf["reward_model"], hf["cost_model"],
                                     hf["reward_critic"], hf["cost_critic"], pad_token_id=tok.pad_token_id,
                                     max_new_tokens=w.new_tokens, algorithm=w.algorithm, top_k=w.top_k,
                                     bf16=precision == "bf16")
            steps[engine_key("ours", precision)] = lambda ids, mask, seed, t=trainer: our_step(t, ids, mask, seed)
            steps[engine_key("reference-style", precision)] = \
                lambda ids, mask, seed, r=ref_step: _timed_reference(r, ids, mask, seed, device)
        del ours_models
        ids_list, mask = prompts(w, warmup + reps + (1 if memory else 0), device)
        results = {key: [] for key in steps}
        for i, ids in enumerate(ids_list[:warmup + reps]):
            times = {key: step(ids, mask, i) for key, step in steps.items()}
            tag = "warmup" if i < warmup else f"rep {i - warmup + 1}"
            echo(f"{tag}: " + ", ".join(f"{key} {t['total']:.3f} s" for key, t in times.items()))
            if i >= warmup:
                for key, t in times.items():
                    results[key].append(t)
        peaks = {}
        if memory:
            i = warmup + reps
            for key, step in steps.items():
                peaks[key] = _peak(lambda step=step: step(ids_list[i], mask, i), device)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"summary": _summary(w, results, peaks, precisions, reps, device), "runs": results}


def _timed_reference(ref_step, ids, mask, seed, device) -> dict:
    t0 = time.perf_counter()
    row = ref_step.step(ids, mask.long(), seed=seed)
    _sync(device)
    row["total"] = time.perf_counter() - t0
    return row


def _summary(w, results: dict, peaks: dict, precisions, reps: int, device: str) -> dict:
    tokens = w.batch * w.new_tokens
    summary = {"engines": list(results), "precisions": list(precisions)}
    for name, rows_ in results.items():
        med = {k: statistics.median(r[k] for r in rows_) for k in (*PHASES, "total")}
        summary[name] = {"median_s": med["total"], "min_s": min(r["total"] for r in rows_),
                         "max_s": max(r["total"] for r in rows_), "tokens_per_s": tokens / med["total"],
                         "phases_median_s": {k: med[k] for k in PHASES}}
        if name in peaks:
            summary[name]["peak_memory_bytes"] = peaks[name]

    def median_ratio(slow: str, fast: str) -> float:
        return statistics.median(s["total"] / f["total"] for f, s in zip(results[fast], results[slow]))

    summary["speedups"] = {p: median_ratio(engine_key("reference-style", p), engine_key("ours", p))
                           for p in precisions}
    first = precisions[0]
    summary["speedup_median_of_ratios"] = summary["speedups"][first]
    summary["speedup_of_medians"] = (summary[engine_key("reference-style", first)]["median_s"]
                                     / summary[engine_key("ours", first)]["median_s"])
    if "fp32" in precisions and "bf16" in precisions:
        summary["bf16_vs_fp32"] = median_ratio("ours", "ours:bf16")
    summary["workload"] = asdict(w) | {"threads": torch.get_num_threads(), "reps": reps, "device": device}
    summary["ops_backend"] = _ops_backend(device)
    summary["versions"] = {"torch": torch.__version__}
    try:
        import transformers

        summary["versions"]["transformers"] = transformers.__version__
    except ImportError:
        pass
    summary["date"] = _dt.datetime.now().isoformat(timespec="seconds")
    return summary


def rows(result: dict, device: str) -> list[dict]:
    """CSV rows (harness columns): kernel ``ppo_step``; mode ``step`` (whole step) or a phase; metric ``time``
    (seconds, p50 / p20 / p80 over reps), ``throughput`` (generated tokens/s, mode ``step``), ``memory``."""
    s, runs = result["summary"], result["runs"]
    w = s["workload"]
    label = Workload(**{k: w[k] for k in Workload.__dataclass_fields__}).label()
    config = f"threads={w['threads']} reps={w['reps']} ops={s['ops_backend']}"
    out = []
    for name in s.get("engines", ENGINES):
        engine, precision = split_key(name)
        prov = PROVIDER[engine]
        x = label if precision == "fp32" else f"{label}:{precision}"
        for mode, key in (("step", "total"), *((p, p) for p in PHASES)):
            out.append(harness.row("ppo_step", prov, mode, "time", "s", x,
                                   *harness.summarize([r[key] for r in runs[name]]), config, device))
        out.append(harness.rate_row("ppo_step", prov, "step", "throughput", "tokens/s", x,
                                    w["batch"] * w["new_tokens"], [r["total"] for r in runs[name]], config, device))
        if "peak_memory_bytes" in s[name]:
            peak = float(s[name]["peak_memory_bytes"])
            out.append(harness.row("ppo_step", prov, "step", "memory", "B", x, peak, peak, peak, config, device))
    return out


def format_summary(s) -> str:
    w = s["workload"]
    lines = [f"\n{w['algorithm']} step: Llama h{w['hidden']}/i{w['intermediate']}/{w['layers']} layers/{w['heads']} "
             f"heads, V {w['vocab']}, {w['batch']} prompts x {w['prompt_len']} tokens, {w['new_tokens']} new tokens, "
             f"{w['threads']} threads, {w['reps']} reps (ops backend: {s['ops_backend']})",
             "| engine | s / step (median) | min-max | generated tokens/s | " + " | ".join(PHASES) + " |",
             "|---|---|---|---|" + "---|" * len(PHASES)]
    for name in s.get("engines", ENGINES):
        d = s[name]
        lines.append(f"| {name} | {d['median_s']:.3f} | {d['min_s']:.3f}-{d['max_s']:.3f} | {d['tokens_per_s']:.0f} | "
                     + " | ".join(f"{d['phases_median_s'][k]:.3f}" for k in PHASES) + " |")
    for precision, speedup in s.get("speedups", {}).items():
        lines.append(f"speed-up over the reference-style step, {precision}: x{speedup:.2f} (median of per-rep ratios)")
    if "bf16_vs_fp32" in s:
        lines.append(f"ours in bf16 vs ours in fp32: x{s['bf16_vs_fp32']:.2f} (median of per-rep ratios)")
    lines.append(f"x{s['speedup_of_medians']:.2f} (ratio of medians, {s.get('precisions', ['fp32'])[0]})")
    engines = [name for name in s.get("engines", ENGINES) if "peak_memory_bytes" in s[name]]
    if engines:
        lines.append("peak memory of one step: " + ", ".join(
            f"{name} {s[name]['peak_memory_bytes'] / 2**20:.1f} MiB" for name in engines))
    return "\n".join(lines)


# ================================================================================================ LoRA variants
# A variant: ``"0"`` full fine-tuning; ``"R"`` LoRA rank R with the reference being the actor's base with adapters off
# (the trainer's way: one copy of the base); ``"R:ref-copy"`` the same with a second frozen copy of the base loaded as
# the reference (what a trainer without the shared base holds; the log-probs are the same); ``"R:shared"`` LoRA rank R
# with ``--critic_backbone shared`` too (each critic's adapters on its scorer's frozen base: one copy of each scorer).
REF_COPY, SHARED = "ref-copy", "shared"
MODES = {"": "", REF_COPY: "-ref-copy", SHARED: "-shared"}


def parse_variant(text: str) -> tuple[int, str]:
    """``"R"``, ``"R:ref-copy"`` or ``"R:shared"`` -> (rank, mode); ValueError naming the text."""
    rank, _, mode = str(text).partition(":")
    if not rank.isdigit() or mode not in MODES or (mode and int(rank) == 0):
        raise ValueError(f"{text!r} is not a rank >= 0, R:{REF_COPY} or R:{SHARED} with R > 0")
    return int(rank), mode


def variant_name(variant: str) -> str:
    rank, mode = parse_variant(variant)
    return "full" if rank == 0 else f"lora-r{rank}" + MODES[mode]


def variant_provider(variant: str) -> str:
    """The ``provider`` of a variant's rows; full fine-tuning (``saferlhf_fast:full``) is their baseline."""
    return f"saferlhf_fast:{variant_name(variant)}"


def resident_bytes(trainer) -> int:
    """Bytes of the distinct tensors the trainer keeps between steps: the parameters and buffers of all six models
    plus the AdamW state, a storage counted once however many models hold it (a LoRA actor is also the reference:
    its base weights count once)."""
    models = [trainer.actor, trainer.reference, trainer.reward_model, trainer.cost_model, *trainer.critics]
    tensors = [t for m in models if m is not None for t in (*m.parameters(), *m.buffers())]
    for opt in (trainer.actor_optimizer, *trainer.critic_optimizers):
        tensors += [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def trainable_parameters(trainer) -> int:
    return sum(p.numel() for m in (trainer.actor, *trainer.critics) for p in m.parameters() if p.requires_grad)


def run_variants(w, variants, device: str = "cpu", reps: int = 5, warmup: int = 1, memory: bool = True,
                 echo=print) -> dict:
    """Our step once per variant in ``variants`` (:func:`parse_variant`; ``"0"``: full fine-tuning), all from the
    same checkpoints, repetitions interleaved across the variants (same prompts and seed per rep).  Per variant:
    medians as :func:`run`, the peak memory of one extra step, the resident bytes after it (:func:`resident_bytes`)
    and the trainable parameters."""
    root = tempfile.mkdtemp(prefix="bench_ppo_lora_")
    try:
        _, paths, _ = build_checkpoints(w, root)
        trainers = {}
        for n, v in enumerate(variants):
            rank, mode = parse_variant(v)
            trainers[v] = make_trainer(w, paths, os.path.join(root, f"out{n}"), device, lora_rank=rank,
                                       critic_backbone="shared" if mode == SHARED else "separate")
            if mode == REF_COPY:
                trainers[v].reference = trainers[v]._load("actor_model_name_or_path", paths["actor"], "lm", False)
        ids_list, mask = prompts(w, warmup + reps + (1 if memory else 0), device)
        results = {v: [] for v in variants}
        for i, ids in enumerate(ids_list[:warmup + reps]):
            times = {r: our_step(t, ids, mask, seed=i) for r, t in trainers.items()}
            tag = "warmup" if i < warmup else f"rep {i - warmup + 1}"
            echo(f"{tag}: " + ", ".join(f"{variant_name(v)} {times[v]['total']:.3f} s" for v in variants))
            if i >= warmup:
                for v in variants:
                    results[v].append(times[v])
        extra = {r: {"trainable_parameters": trainable_parameters(t)} for r, t in trainers.items()}
        if memory:
            i = warmup + reps
            for r, t in trainers.items():
                extra[r]["peak_memory_bytes"] = _peak(lambda t=t: our_step(t, ids_list[i], mask, seed=i), device)
                extra[r]["resident_bytes"] = resident_bytes(t)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    tokens = w.batch * w.new_tokens
    summary = {"variants": [variant_name(v) for v in variants], "specs": list(variants)}
    for r, rows_ in results.items():
        med = {k: statistics.median(x[k] for x in rows_) for k in (*PHASES, "total")}
        summary[variant_name(r)] = {"median_s": med["total"], "min_s": min(x["total"] for x in rows_),
                                    "max_s": max(x["total"] for x in rows_), "tokens_per_s": tokens / med["total"],
                                    "phases_median_s": {k: med[k] for k in PHASES}} | extra[r]
    summary["workload"] = asdict(w) | {"threads": torch.get_num_threads(), "reps": reps, "device": device}
    summary["ops_backend"] = _ops_backend(device)
    summary["date"] = _dt.datetime.now().isoformat(timespec="seconds")
    return {"summary": summary, "runs": {variant_name(r): rows_ for r, rows_ in results.items()}}


def _ops_backend(device: str) -> str:
    from .. import _backend

    return _backend.choose("gae", None, torch.device(device))


def variant_rows(result: dict, device: str) -> list[dict]:
    """CSV rows of :func:`run_variants`: as :func:`rows`, provider :func:`variant_provider`, size the workload label
    plus ``:lora``; memory rows: mode ``step`` (peak of one step) and ``resident`` (held between steps)."""
    s, runs = result["summary"], result["runs"]
    w = s["workload"]
    x = Workload(**{k: w[k] for k in Workload.__dataclass_fields__}).label() + ":lora"
    config = f"threads={w['threads']} reps={w['reps']} ops={s['ops_backend']}"
    out = []
    for spec, name in zip(s["specs"], s["variants"]):
        prov = variant_provider(spec)
        for mode, key in (("step", "total"), *((p, p) for p in PHASES)):
            out.append(harness.row("ppo_step", prov, mode, "time", "s", x,
                                   *harness.summarize([r[key] for r in runs[name]]), config, device))
        out.append(harness.rate_row("ppo_step", prov, "step", "throughput", "tokens/s", x,
                                    w["batch"] * w["new_tokens"], [r["total"] for r in runs[name]], config, device))
        for mode, key in (("step", "peak_memory_bytes"), ("resident", "resident_bytes")):
            if key in s[name]:
                v = float(s[name][key])
                out.append(harness.row("ppo_step", prov, mode, "memory", "B", x, v, v, v, config, device))
    return out


def format_variants(s) -> str:
    w = s["workload"]
    full = s.get("full")
    lines = [f"\n{w['algorithm']} step, ours per variant: Llama h{w['hidden']}/i{w['intermediate']}/{w['layers']} "
             f"layers/{w['heads']} heads, V {w['vocab']}, {w['batch']} prompts x {w['prompt_len']} tokens, "
             f"{w['new_tokens']} new tokens, {w['threads']} threads, {w['reps']} reps",
             "| variant | trainable params | s / step (median) | min-max | vs full | " + " | ".join(PHASES)
             + " | peak MiB | resident MiB |", "|---|---|---|---|---|" + "---|" * len(PHASES) + "---|---|"]
    for name in s["variants"]:
        d = s[name]
        ratio = f"x{d['median_s'] / full['median_s']:.2f}" if full else ""
        mem = [f"{d[k] / 2**20:.1f}" if k in d else "" for k in ("peak_memory_bytes", "resident_bytes")]
        lines.append(f"| {name} | {d['trainable_parameters']:,} | {d['median_s']:.3f} | {d['min_s']:.3f}-"
                     f"{d['max_s']:.3f} | {ratio} | " + " | ".join(f"{d['phases_median_s'][k]:.3f}" for k in PHASES)
                     + f" | {mem[0]} | {mem[1]} |")
    return "\n".join(lines)


def write_legacy_csv(path, s) -> None:
    """The one-row-per-engine CSV of ``bench/bench_ppo_step.py --csv`` (bench/results/ppo_step.csv)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path)
    w = s["workload"]
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["date", "algorithm", "engine", "layers", "hidden", "vocab", "batch", "prompt_len",
                             "new_tokens", "threads", "median_s", "min_s", "max_s", "tokens_per_s", *PHASES,
                             "speedup"])
        for name in (n for n in ENGINES if n in s):
            d = s[name]
            writer.writerow([s["date"], w["algorithm"], name, w["layers"], w["hidden"], w["vocab"], w["batch"],
                             w["prompt_len"], w["new_tokens"], w["threads"], f"{d['median_s']:.4f}",
                             f"{d['min_s']:.4f}", f"{d['max_s']:.4f}", f"{d['tokens_per_s']:.1f}",
                             *(f"{d['phases_median_s'][k]:.4f}" for k in PHASES),
                             f"{s['speedup_median_of_ratios']:.3f}" if name == "ours" else ""])


def write_json(path, result) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def workload_from_args(args: argparse.Namespace) -> Workload:
    return Workload(**{k: getattr(args, k) for k in Workload.__dataclass_fields__ if hasattr(args, k)})
