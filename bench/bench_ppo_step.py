"""One PPO-Lagrangian step, ours vs a straightforward reference-style step, timed interleaved in one process.

    python bench/bench_ppo_step.py                      # Llama h256/i688/4 layers/4 heads, V 8192, 16 prompts x 16
                                                         # tokens, exactly 64 new tokens, 2 threads
    python bench/bench_ppo_step.py --layers 6 --reps 7 --csv bench/results/ppo_step.csv
    python bench/bench_ppo_step.py --algorithm ppo       # reward only (one critic, no cost model)

The baseline is written here the way the reference implementation does each part (spec sections 4 and 8):
transformers ``LlamaForCausalLM.generate`` for the rollout, then six separate no-grad forwards (actor and
reference: full ``[B, L, V]`` logits -> ``log_softmax`` -> gather; reward and cost models: end scores; both
critics: values), the scatter-add KL rewards, a Python loop over time for GAE called once per stream, eager
losses, one backward + clip + AdamW step per trained model, the Lagrange multiplier as a torch parameter with an
SGD optimizer.  Score models are ``LlamaModel`` + ``Linear(H, 1)`` (the reference's ``LlamaForScore``).

Ours is the trainer itself (``saferlhf_fast.trainers.ppo.PPOTrainer``: ``rollout`` + ``rl_step``): the engine's
static-KV-cache generation, one forward per frozen model, the fused first pass (the training forwards are the
old log-probs / values), ``ops.linear_logprobs`` (no [B, L, V] logits), one ``ops.gae`` call for both streams,
fused losses.  Both start from the same weights and see the same prompts; each rep runs ours then the baseline,
so load drifts of a shared machine hit both alike.  Reported: median seconds per step, generated tokens/s, and the
per-phase split.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PHASES = ("generation", "scoring", "gae", "actor", "critics")


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
    log_probs = F.log_softmax(logits, dim=-1)
    return log_probs.gather(dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)


def masked_mean(x, mask):
    return ((x * mask).sum(dim=-1) / mask.sum(dim=-1)).mean()


class ReferenceStep:
    """A reference-style PPO-Lag (or PPO) step on transformers models."""

    def __init__(self, actor, reference, reward_model, cost_model, reward_critic, cost_critic, *, pad_token_id,
                 max_new_tokens, algorithm="ppo-lag", kl_coeff=0.01, clip_range_ratio=0.2, clip_range_score=50.0,
                 clip_range_value=5.0, gamma=1.0, gae_lambda=0.95, lr=1e-5, critic_lr=5e-6, top_k=50):
        self.actor, self.reference = actor, reference
        self.reward_model, self.cost_model = reward_model, cost_model
        self.reward_critic, self.cost_critic = reward_critic, cost_critic
        self.algorithm = algorithm
        self.top_k = top_k
        self.pad, self.max_new = pad_token_id, max_new_tokens
        self.kl_coeff, self.eps, self.clip_score, self.clip_value = kl_coeff, clip_range_ratio, clip_range_score, \
            clip_range_value
        self.gamma, self.lam = gamma, gae_lambda
        self.actor_opt = torch.optim.AdamW(actor.parameters(), lr=lr, betas=(0.9, 0.95))
        self.critic_opts = [torch.optim.AdamW(c.parameters(), lr=critic_lr, betas=(0.9, 0.95))
                            for c in self.critics()]
        self.log_lambda = nn.Parameter(torch.tensor(0.0))
        self.lambda_opt = torch.optim.SGD([self.log_lambda], lr=0.1)
        self.episode_costs: list[float] = []
        self.timings: dict[str, float] = {}

    def critics(self):
        return [self.reward_critic] + ([self.cost_critic] if self.algorithm == "ppo-lag" else [])

    @torch.no_grad()
    def rollout(self, input_ids, attention_mask, seed):
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        self.actor.eval()
        sequence = self.actor.generate(input_ids=input_ids, attention_mask=attention_mask,
                                       max_new_tokens=self.max_new, min_new_tokens=self.max_new, do_sample=True,
                                       temperature=1.0, top_p=1.0, top_k=self.top_k, pad_token_id=self.pad,
                                       eos_token_id=None)
        t1 = time.perf_counter()
        attention_mask = sequence.not_equal(self.pad)
        logits = self.actor(sequence, attention_mask=attention_mask).logits
        ref_logits = self.reference(sequence, attention_mask=attention_mask).logits
        _, reward = self.reward_model(sequence, attention_mask)
        cost = self.cost_model(sequence, attention_mask)[1] if self.algorithm == "ppo-lag" else None
        reward_values = self.reward_critic(sequence, attention_mask)[0].squeeze(-1)[:, :-1]
        cost_values = self.cost_critic(sequence, attention_mask)[0].squeeze(-1)[:, :-1] \
            if self.algorithm == "ppo-lag" else None
        log_probs = gather_log_probabilities(logits[:, :-1], sequence[:, 1:])
        ref_log_probs = gather_log_probabilities(ref_logits[:, :-1], sequence[:, 1:])
        if cost is not None:
            self.episode_costs = (self.episode_costs + cost.tolist())[-128:]
        self.timings = {"generation": t1 - t0, "scoring": time.perf_counter() - t1}
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
        t0 = time.perf_counter()
        if self.algorithm == "ppo-lag":
            episode_cost = torch.tensor(self.episode_costs).mean()
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
        if self.algorithm == "ppo-lag":
            c_adv, c_ret = self.get_advantages_and_returns(b["cost_values"], streams[1], sequence_mask, start)
        t1 = time.perf_counter()
        # actor
        self.actor.train()
        logits = self.actor(input_ids, attention_mask=attention_mask, use_cache=False).logits
        log_probs = gather_log_probabilities(logits[:, :-1], input_ids[:, 1:])
        mask = sequence_mask[:, start:]
        if self.algorithm == "ppo-lag":
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
        t2 = time.perf_counter()
        # critics
        olds = [b["reward_values"]] + ([b["cost_values"]] if self.algorithm == "ppo-lag" else [])
        rets = [r_ret] + ([c_ret] if self.algorithm == "ppo-lag" else [])
        for critic, opt, old, ret in zip(self.critics(), self.critic_opts, olds, rets):
            values = critic(input_ids, attention_mask)[0].squeeze(-1)[:, :-1]
            loss = self.critic_loss(values[:, start:], old[:, start:], ret, mask)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
            opt.step()
        t3 = time.perf_counter()
        self.timings.update(gae=t1 - t0, actor=t2 - t1, critics=t3 - t2)

    def step(self, input_ids, attention_mask, seed):
        b = self.rollout(input_ids, attention_mask, seed)
        self.rl_step(b)
        return dict(self.timings)


# ================================================================================================ setup
def build(args, root: str):
    """Same initial weights on both sides: our models are built and saved (HF format); the transformers models get
    the same state dicts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from saferlhf_fast.data import load_tokenizer
    from saferlhf_fast.models import LlamaForCausalLM as OurLM
    from saferlhf_fast.models import LlamaForScore, ModelConfig

    tok = load_tokenizer()
    pad = tok.pad_token_id
    mc = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
              num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
              max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=pad,
              eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
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
    hf_cfg = LlamaConfig(**mc, attn_implementation="sdpa")
    hf = {}
    for name in ("actor", "reference"):
        m = LlamaForCausalLM(hf_cfg)
        m.load_state_dict(ours["actor"].state_dict(), strict=False)
        hf[name] = m.float()
    for name, src in (("reward_model", "rm"), ("cost_model", "cm"), ("reward_critic", "rm"), ("cost_critic", "cm")):
        m = RefScoreModel(hf_cfg)
        missing, unexpected = m.load_state_dict(ours[src].state_dict(), strict=False)
        assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
        hf[name] = m.float()
    for name in ("reference", "reward_model", "cost_model"):
        hf[name].eval().requires_grad_(False)
    return tok, paths, hf


def make_trainer(args, paths, out):
    from saferlhf_fast.trainers.ppo import PPOConfig, PPOLagConfig, PPOTrainer

    cls = PPOLagConfig if args.algorithm == "ppo-lag" else PPOConfig
    kw = dict(actor_model_name_or_path=paths["actor"], reward_model_name_or_path=paths["rm"],
              train_datasets=["synthetic-prompts/train:0.05"], output_dir=out, max_length=512,
              max_new_tokens=args.new_tokens, per_device_prompt_batch_size=args.batch,
              per_device_train_batch_size=args.batch, kl_coeff=0.01, progress=False, actor_lr_warmup_ratio=0.0,
              top_k=getattr(args, "top_k", 50))
    if cls is PPOLagConfig:
        kw["cost_model_name_or_path"] = paths["cm"]
    cfg = cls(**kw)
    cfg.validate()
    trainer = PPOTrainer(cfg)
    trainer.eos_token_id = []  # exactly new_tokens tokens, as the baseline (no stop token)
    return trainer


def our_step(trainer, input_ids, attention_mask, seed):
    trainer.timings = {}
    t0 = time.perf_counter()
    micro = trainer.rollout({"input_ids": input_ids, "attention_mask": attention_mask}, seed)
    for mb in micro:
        trainer.rl_step(mb)
        trainer.global_step += 1
    total = time.perf_counter() - t0
    return {k: trainer.timings.get(k, 0.0) for k in PHASES} | {"total": total}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algorithm", choices=["ppo-lag", "ppo"], default="ppo-lag")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt_len", type=int, default=16)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--top_k", type=int, default=50, help="sampling top-k of both (the reference inherits "
                                                          "transformers' default 50)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--csv", default=None, help="append one row per engine to this CSV")
    ap.add_argument("--json", default=None, help="write the full result here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from saferlhf_fast import _backend

    root = tempfile.mkdtemp(prefix="bench_ppo_step_")
    tok, paths, hf = build(args, root)
    trainer = make_trainer(args, paths, os.path.join(root, "out"))
    ref_step = ReferenceStep(hf["actor"], hf["reference"], hf["reward_model"], hf["cost_model"],
                             hf["reward_critic"], hf["cost_critic"], pad_token_id=tok.pad_token_id,
                             max_new_tokens=args.new_tokens, algorithm=args.algorithm, top_k=args.top_k)
    g = torch.Generator().manual_seed(1)
    special = 4
    prompts = [torch.randint(special, args.vocab, (args.batch, args.prompt_len), generator=g)
               for _ in range(args.warmup + args.reps)]
    mask = torch.ones(args.batch, args.prompt_len, dtype=torch.bool)
    results = {"ours": [], "reference-style": []}
    for i, ids in enumerate(prompts):
        row_ours = our_step(trainer, ids, mask, seed=i)
        t0 = time.perf_counter()
        row_ref = ref_step.step(ids, mask.long(), seed=i)
        row_ref["total"] = time.perf_counter() - t0
        tag = "warmup" if i < args.warmup else f"rep {i - args.warmup + 1}"
        print(f"{tag}: ours {row_ours['total']:.3f} s, reference-style {row_ref['total']:.3f} s "
              f"(x{row_ref['total'] / row_ours['total']:.2f})", flush=True)
        if i >= args.warmup:
            results["ours"].append(row_ours)
            results["reference-style"].append(row_ref)
    tokens = args.batch * args.new_tokens
    summary = {}
    for name, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in (*PHASES, "total")}
        summary[name] = {"median_s": med["total"], "min_s": min(r["total"] for r in rows),
                         "max_s": max(r["total"] for r in rows), "tokens_per_s": tokens / med["total"],
                         "phases_median_s": {k: med[k] for k in PHASES}}
    ratios = [r["total"] / o["total"] for o, r in zip(results["ours"], results["reference-style"])]
    summary["speedup_median_of_ratios"] = statistics.median(ratios)
    summary["speedup_of_medians"] = summary["reference-style"]["median_s"] / summary["ours"]["median_s"]
    summary["workload"] = {k: getattr(args, k) for k in ("algorithm", "hidden", "intermediate", "layers", "heads",
                                                        "vocab", "batch", "prompt_len", "new_tokens", "top_k",
                                                        "threads", "reps")}
    summary["ops_backend"] = _backend.resolve(None, torch.device("cpu"))
    summary["versions"] = {"torch": torch.__version__}
    try:
        import transformers

        summary["versions"]["transformers"] = transformers.__version__
    except ImportError:
        pass
    summary["date"] = _dt.datetime.now().isoformat(timespec="seconds")
    print_table(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "runs": results}, f, indent=2)
    if args.csv:
        write_csv(args.csv, summary)
    return 0


def print_table(s) -> None:
    w = s["workload"]
    print(f"\n{w['algorithm']} step: Llama h{w['hidden']}/i{w['intermediate']}/{w['layers']} layers/{w['heads']} heads, "
          f"V {w['vocab']}, {w['batch']} prompts x {w['prompt_len']} tokens, {w['new_tokens']} new tokens, "
          f"{w['threads']} threads, {w['reps']} reps (ops backend: {s['ops_backend']})")
    print("| engine | s / step (median) | min-max | generated tokens/s | " + " | ".join(PHASES) + " |")
    print("|---|---|---|---|" + "---|" * len(PHASES))
    for name in ("ours", "reference-style"):
        d = s[name]
        print(f"| {name} | {d['median_s']:.3f} | {d['min_s']:.3f}-{d['max_s']:.3f} | {d['tokens_per_s']:.0f} | "
              + " | ".join(f"{d['phases_median_s'][k]:.3f}" for k in PHASES) + " |")
    print(f"speed-up: x{s['speedup_median_of_ratios']:.2f} (median of per-rep ratios), "
          f"x{s['speedup_of_medians']:.2f} (ratio of medians)")


def write_csv(path, s) -> None:
    import csv

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path)
    w = s["workload"]
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["date", "algorithm", "engine", "layers", "hidden", "vocab", "batch", "prompt_len",
                             "new_tokens", "threads", "median_s", "min_s", "max_s", "tokens_per_s", *PHASES,
                             "speedup"])
        for name in ("ours", "reference-style"):
            d = s[name]
            writer.writerow([s["date"], w["algorithm"], name, w["layers"], w["hidden"], w["vocab"], w["batch"],
                             w["prompt_len"], w["new_tokens"], w["threads"], f"{d['median_s']:.4f}",
                             f"{d['min_s']:.4f}", f"{d['max_s']:.4f}", f"{d['tokens_per_s']:.1f}",
                             *(f"{d['phases_median_s'][k]:.4f}" for k in PHASES),
                             f"{s['speedup_median_of_ratios']:.3f}" if name == "ours" else ""])


if __name__ == "__main__":
    sys.exit(main())
