"""The trainer of the PPO family (PPO, PPO-Lagrangian, PPO with reward shaping): the RL stage of Safe RLHF, on the
shared run (:mod:`.core`: one step = one rollout).  It keeps only what is RL: rollout, scoring, the RL step, PTX.
The algorithms are strategies (:mod:`.algorithms`); only the reward stream(s), the advantage mix and the
multiplier differ:

* ``ppo``                 reward R only; one critic; ``A = A^r``.
* ``ppo-lag``             reward R and cost C, two critics, ``A = (A^r - lam A^c) / (1 + lam)``, lam from
                          :class:`~saferlhf_fast.lagrange.LagrangeMultiplier` (``--lambda_optimizer sgd``) or
                          :class:`~saferlhf_fast.lagrange.PIDLagrangeMultiplier` (``pid``), updated once per RL step,
                          before the actor loss, from the window of rollout end costs C.
* ``ppo-reward-shaping``  one critic on the shaped reward ``R - nu C`` with nu fixed (= ``--lambda_init``).

Six roles (PPO-Lag): actor (trained), reference (frozen copy of the initial actor), reward model and cost model
(frozen score models), reward critic and cost critic (trained score models, initialised from the reward / cost
models unless ``--reward_critic_model_name_or_path`` / ``--cost_critic_model_name_or_path`` name other, e.g.
smaller, models).  With LoRA (``--actor_lora_rank`` / ``--critic_lora_rank``, default ``--lora_rank``) a trained model
is its frozen base plus adapters, and the reference is the LoRA actor with its adapters disabled (no second copy of
the actor's weights; ``docs/rl.md`` LoRA).  ``--critic_backbone shared`` does the same for each critic and the scorer
it starts from: the reward model is the reward critic's backbone with the critic's adapters disabled and the reward
model's own (frozen) score head (:class:`~.modeling.SharedScorer`); with ``--critic_lora_rank 0`` the critic is a
value head on that frozen backbone, and the scoring pass also yields the hidden states the value head reads.

Alignment (the reference implementation's, exactly).  A rollout row is ``prompt (left-padded, P tokens) + response
(T tokens, right-padded after eos)``.  Response token ``t`` sits at sequence index ``P + t``; its log-prob comes
from the logits at index ``P - 1 + t`` and the critic's value of the state *before* it is the score at index
``P - 1 + t`` (the reference slices ``values[:, :-1]`` and ``log_probs = log_softmax(logits[:, :-1])[seq[:, 1:]]``
and then keeps ``[:, start:]`` with ``start = P - 1``).  Everything per-token below is ``[B, T]`` over those
positions, masked by the response mask (eos included, pads excluded)::

    r_t, c_t   = ops.kl_penalized_rewards(R, C, logp_old, logp_ref, mask)      (KL at every response token,
                                                                               R / C added at the last one)
    A, G       = ops.gae([r; c], [V^r_old; V^c_old], mask)                     (one call, both streams)
    L_actor    = ops.ppo_lag_actor_loss(logp, logp_old, A^r, A^c, mask, multiplier=lam)
    L_critic_k = ops.critic_loss(V_k, V_k_old, G_k, mask)

Where the old quantities come from.  The reference recomputes old log-probs and old values with separate
no-grad forwards of the actor and both critics right after generation.  Here, for the first update of a
micro-batch whose weights have not moved since the rollout (the first micro-batch of the first
``update_iters`` pass; with the default batch sizes that is every micro-batch), the training forwards *are*
those forwards: their detached outputs are the old log-probs and old values, bit for bit what a separate pass
would return, so three of the reference's six scoring forwards are skipped.  Later micro-batches (the weights
have moved by then) get their old values from no-grad critic forwards at rollout time, and their old log-probs
from the engine's sampled-token log-probs when ``--temperature 1`` in fp32 (the consistency contract: the engine
returns ``log_softmax(logits / T)[token]``, the training forward's numbers up to fp32 rounding) or from a no-grad
actor forward at temperature 1 otherwise, ``--bf16`` / ``--fp16`` included (half precision rounds the two paths
differently; the reference always uses ``log_softmax(logits)`` at temperature 1, whatever the sampling
temperature).  ``--separate_scoring`` forces the reference's separate forwards everywhere, and
``--lora_dropout`` > 0 does for the first micro-batch (a training forward then drops adapter inputs; scoring runs
in eval mode).

Deviations, all deliberate: positions follow the attention mask (``cumsum(mask) - 1``) in every forward, as
transformers' ``generate`` does; the reference's scoring forwards pass no position ids, so its left-padded rows
are scored at positions shifted by the padding.  Logged steps are 1-based (the reference logs from 0).
"""
from __future__ import annotations

import copy
import math
import os

import torch
from torch import Tensor

from .. import distributed, ops
from ..data import DataError, PromptOnlyDataset, SupervisedDataset, load_tokenizer
from ..data.tokenizer import save_tokenizer
from ..engine import generate
from ..loading import check_vocab, is_model_folder, require_score_head
from ..models import LlamaForScore, freeze, from_pretrained
from ..models.checkpoint import resolve_backend
from ..models.lora import adapters_disabled, eval_mode, lora_spec_of
from ..profiling import Phases
from ..scores import load_normalizer
from .algorithms import (  # noqa: F401 - re-exported: the configs and helpers tests and examples import from here
    ALGORITHMS,
    CONFIGS,
    GAE_LAMBDA,
    GAMMA,
    PPOLagConfig,
    RewardShapingConfig,
    compute_advantages,
    make_algorithm,
    redistribute_windows,
)
from .base import (
    collator_of,
    maybe_shard,
    optimizer_groups,
    rank_epoch_order,
    resolve_resume,
    schedule_lambda,
    split_dataset,
)
from .config import ConfigError, PPOConfig
from .core import RunCore, Trained
from .modeling import SharedScorer, attach_lora, hold_frozen_in_bf16, load_value_head, save_trained, save_value_head
from .rollout import Rollout, response_labels, retokenize, same_tokenizer, trim
from .safety import NonFiniteError, check_finite, clip_gradients, data_fingerprint  # noqa: F401 - re-exported
from .sft import sft_loss


class PPOTrainer(RunCore):
    """PPO / PPO-Lag / reward shaping: the strategy of ``config.algorithm`` (``trainers.algorithms``)."""

    step_name = "rollout step"

    def __init__(self, config: PPOConfig):
        super().__init__(config)
        cfg = self.config
        self.algorithm = make_algorithm(cfg)
        self._check_folder("actor_model_name_or_path", cfg.actor_model_name_or_path)
        self.tokenizer = load_tokenizer(cfg.actor_model_name_or_path, cfg.max_length)
        self.eos_token_id = self.tokenizer.eos_token_id  # generation stops here ([]: never, as benchmarks want)
        # Data first: bad rows fail before any model loads and before OUTPUT_DIR exists.
        self.train_dataset, self.eval_dataset = self._build_datasets()
        self.ptx_dataset = (SupervisedDataset(cfg.ptx_datasets, self.tokenizer, cfg.max_length, seed=cfg.seed,
                                              chat_template=cfg.chat_template, flag="--ptx_datasets")
                            if cfg.ptx_datasets else None)
        if self.ptx_dataset is not None and cfg.ptx_coeff == 0:
            distributed.print0("warning: --ptx_datasets given with --ptx_coeff 0: the PTX loss has no effect")
        self.resume_from = resolve_resume(cfg, self.data_fingerprint)
        self._tokenizers: dict = {}  # model folder -> its tokenizer (None: it has none)
        self._load_models()
        self.global_step = 0  # RL (micro-batch) updates done
        self.ptx_position = 0  # rows of the PTX stream consumed
        self.ptx_steps = 0
        self._build_optimizers()
        self.phases = Phases("ppo/")  # wall time and profiler ranges ppo/generation, ppo/scoring, ppo/actor, ...
        self.generated_tokens = 0.0

    @property
    def critic_names(self) -> list[str]:
        return list(self.algorithm.critic_names)

    @property
    def lagrange(self):
        """The Lagrange multiplier (PPO-Lag), else None."""
        return self.algorithm.multiplier

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per phase since the last reset (one rollout and its RL steps)."""
        return self.phases.times

    @timings.setter
    def timings(self, value: dict) -> None:
        self.phases.times = dict(value)

    # ---------------------------------------------------------------------------------------------- setup
    @staticmethod
    def _check_folder(flag: str, path: str | None) -> None:
        if not is_model_folder(path):
            raise ConfigError(f"--{flag} {path}: not a model folder (no config.json)")

    def _build_datasets(self):
        cfg = self.config
        train = PromptOnlyDataset(cfg.train_datasets, self.tokenizer, cfg.max_length, seed=cfg.seed,
                                  chat_template=cfg.chat_template, flag="--train_datasets")
        if len(train) == 0:
            raise DataError("no training prompts")
        eval_ = PromptOnlyDataset(cfg.eval_datasets, self.tokenizer, cfg.max_length, seed=cfg.seed,
                                  chat_template=cfg.chat_template, flag="--eval_datasets") \
            if cfg.eval_datasets else None
        if eval_ is None and cfg.eval_split_ratio:
            train, eval_ = split_dataset(train, cfg.eval_split_ratio, cfg.seed)
        return train, eval_

    def fingerprinted(self) -> tuple:
        return (self.train_dataset, self.ptx_dataset)

    def _load(self, flag: str, path: str, head: str, trainable: bool, lora=None, adapter_dir: str | None = None):
        """A model of ``head`` from ``path``; ``lora``: with adapters of that spec on the frozen ``path`` base (their
        trained values from ``adapter_dir`` on resume)."""
        self._check_folder(flag, path)
        model = from_pretrained(path, head=head, dtype=torch.float32, attn_backend=self.config.attn_backend,
                                backend=self.config.backend)
        model = attach_lora(model.to(self.device), lora, flag, path, adapter_dir)
        if trainable:
            model.train()
        else:
            freeze(model)
        # frozen weights (a frozen model's, a LoRA base's) only ever run under bf16 autocast: half the memory
        hold_frozen_in_bf16(model, self.config)
        return maybe_shard(model, self.config, trainable)  # FSDP2 under torchrun

    def _load_trained(self, flag: str, path: str, head: str, role: str, name: str):
        """A trained model (``role``: actor / critic) from ``path``, or from checkpoint folder ``name`` on resume:
        the whole model, or with LoRA the ``path`` base plus the checkpoint's adapters."""
        ckpt = os.path.join(self.resume_from, name) if self.resume_from else None
        spec = self.config.lora_spec(role)
        if spec is None:
            return self._load(flag, ckpt or path, head, True)
        return self._load(flag, path, head, True, lora=spec, adapter_dir=ckpt)

    def _load_models(self) -> None:
        cfg = self.config
        self._check_inputs()
        self.actor = self._load_trained("actor_model_name_or_path", cfg.actor_model_name_or_path, "lm", "actor",
                                        "actor")
        if cfg.actor_gradient_checkpointing:
            self.actor.set_gradient_checkpointing(True)
        # A LoRA actor is its own reference with the adapters disabled: no second copy of the weights.
        self.reference = None if lora_spec_of(self.actor) is not None else self._load(
            "actor_model_name_or_path", cfg.actor_model_name_or_path, "lm", False)
        # --critic_backbone shared: a critic's scorer is that critic's backbone with the scorer's own head, so the
        # critics load first; separate: the scorers first (the order, and so the adapters' random draws, as always).
        shared_backbone = cfg.critic_backbone == "shared"
        if not shared_backbone:
            self._load_scorers({})
        scorers, self.critics = {}, []
        for name in self.critic_names:
            if shared_backbone:
                critic, scorers[name.replace("_critic", "")] = self._load_shared_critic(name)
            else:
                critic = self._load_trained(f"{name}_model_name_or_path", self._critic_init(name)[1], "score",
                                            "critic", name)
            critic.config.extra.update(score_type="critic", do_normalize=False)  # saved as the reference saves critics
            if cfg.critic_gradient_checkpointing:
                critic.set_gradient_checkpointing(True)
            self.critics.append(critic)
        if shared_backbone:
            self._load_scorers(scorers)

    def _load_scorers(self, shared: dict) -> None:
        """The frozen reward (and cost) model: ``shared[reward / cost]`` when a critic holds it, else loaded."""
        cfg = self.config
        self.reward_model = shared.get("reward")
        if self.reward_model is None:
            self.reward_model = self._load("reward_model_name_or_path", cfg.reward_model_name_or_path, "score", False)
        self.reward_normalizer = self._normalizer(cfg.reward_model_name_or_path) if cfg.normalize_reward else None
        self.cost_model = self.cost_normalizer = None
        if self.algorithm.uses_cost:
            self.cost_model = shared.get("cost")
            if self.cost_model is None:
                self.cost_model = self._load("cost_model_name_or_path", cfg.cost_model_name_or_path, "score", False)
            self.cost_normalizer = self._normalizer(cfg.cost_model_name_or_path) if cfg.normalize_cost else None

    def _load_shared_critic(self, name: str):
        """(critic, its scorer) for ``--critic_backbone shared``: the scorer's model, trained as the critic (its
        LoRA adapters and score head, or with ``--critic_lora_rank 0`` the score head alone: the value head), and a
        :class:`SharedScorer` holding a frozen copy of the scorer's head.  On resume the adapters / value head come
        from the checkpoint's ``name`` folder."""
        cfg = self.config
        flag, path = self._critic_init(name)
        self._check_folder(flag, path)
        model = from_pretrained(path, head="score", dtype=torch.float32, attn_backend=cfg.attn_backend,
                                backend=cfg.backend).to(self.device)
        if not isinstance(model, LlamaForScore):
            raise ConfigError(f"--critic_backbone shared: --{flag} {path} is not loaded by the native decoder; pass "
                              "--critic_backbone separate")
        scorer_head = copy.deepcopy(model.score_head)
        ckpt = os.path.join(self.resume_from, name) if self.resume_from else None
        spec = cfg.lora_spec("critic")
        if spec is not None:
            model = attach_lora(model, spec, flag, path, ckpt)
        else:
            model.requires_grad_(False)
            model.score_head.requires_grad_(True)
            if ckpt is not None:
                load_value_head(model, ckpt)
        model.shared_base = path  # the folder a value-head checkpoint names as its backbone
        model.train()
        hold_frozen_in_bf16(model, cfg)  # the frozen backbone the critic and its scorer share
        model = maybe_shard(model, cfg, True)
        return model, SharedScorer(model, scorer_head)

    def _critic_init(self, name: str) -> tuple[str, str]:
        """(flag, folder) a critic starts from: its own flag, else the reward / cost model's."""
        flag = f"{name}_model_name_or_path"
        if getattr(self.config, flag):
            return flag, getattr(self.config, flag)
        flag = flag.replace("_critic", "")
        return flag, getattr(self.config, flag)

    def _check_inputs(self) -> None:
        """Before any weights load: every model has an embedding row for every id it is given; the reward / cost
        models carry trained score heads; the critics share the actor's tokenizer (they score the actor's tokens);
        a reward / cost model with its own tokenizer re-tokenises (its tokenizer is kept here)."""
        cfg = self.config
        actor = cfg.actor_model_name_or_path
        check_vocab(self.tokenizer, actor, "actor_model_name_or_path", actor)
        self.reward_tokenizer = self._check_scorer("reward_model_name_or_path", "rm")
        self.cost_tokenizer = self._check_scorer("cost_model_name_or_path", "cm") if self.algorithm.uses_cost else None
        for name in self.critic_names:
            self._check_critic_tokenizer(name)
            if cfg.critic_backbone == "shared":
                self._check_native(name)

    def _check_native(self, name: str) -> None:
        """A shared critic runs its scorer's backbone with other heads: the native decoder's (not transformers')."""
        flag, path = self._critic_init(name)
        backend = self.config.backend
        if (resolve_backend(path) if backend == "auto" else backend) != "native":
            raise ConfigError(f"--critic_backbone shared: --{flag} {path} loads with transformers (--backend "
                              f"{backend}); the shared backbone needs the native decoder: pass --critic_backbone "
                              "separate")

    def _check_scorer(self, flag: str, trained_by: str):
        """The tokenizer to re-tokenise with for a reward / cost model (None: the actor's)."""
        path = getattr(self.config, flag)
        self._check_folder(flag, path)
        require_score_head(flag, path, trained_by)
        tok = self._score_tokenizer(path)
        check_vocab(tok or self.tokenizer, path if tok is not None else self.config.actor_model_name_or_path, flag,
                    path)
        return tok

    def _check_critic_tokenizer(self, name: str) -> None:
        flag, path = self._critic_init(name)
        self._check_folder(flag, path)
        actor = self.config.actor_model_name_or_path
        own = self._own_tokenizer(path)
        if own is not None and not same_tokenizer(own, self.tokenizer):
            critic_flag = f"{name}_model_name_or_path"
            what = f"--{flag} {path}" + ("" if flag == critic_flag else f" (the default {name.replace('_', ' ')})")
            raise ConfigError(f"{what}: its tokenizer differs from the actor's ({actor}), and a critic scores the "
                              f"actor's tokens: pass --{critic_flag} a model with the actor's tokenizer, e.g. the "
                              "actor itself")
        check_vocab(self.tokenizer, actor, flag, path)

    def _normalizer(self, path: str):
        norm = load_normalizer(path)
        return norm.to(self.device) if norm is not None else None

    def _own_tokenizer(self, path: str):
        """The tokenizer of a model folder (None when it has no tokenizer files), read once per folder."""
        cache = self._tokenizers
        if path not in cache:
            has_tok = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                           "tokenizer.model", "vocab.json"))
            cache[path] = load_tokenizer(path, self.config.max_length) if has_tok else None
        return cache[path]

    def _score_tokenizer(self, path: str):
        """None when the score model shares the actor's tokenizer (then sequences are scored as they are), else its
        own tokenizer (sequences are decoded and re-tokenised, as the reference does)."""
        tok = self._own_tokenizer(path)
        if tok is None or same_tokenizer(tok, self.tokenizer):
            return None
        return tok

    def rl_steps_per_rollout(self) -> int:
        cfg = self.config
        return math.ceil(cfg.per_device_prompt_batch_size * cfg.num_return_sequences / cfg.per_device_train_batch_size)

    def rollouts_per_epoch(self) -> int:
        return self.steps_per_epoch()

    def total_rl_steps(self) -> int:
        """The reference's ``total_training_steps``: prompt batches x epochs x update_iters x micro-batches."""
        return self.rollouts_per_epoch() * self.config.epochs * self.config.update_iters * self.rl_steps_per_rollout()

    def optimizer_updates(self) -> int:
        """Optimizer steps of each schedule: one per ``--gradient_accumulation_steps`` RL micro-batches, the last
        group of a rollout included (the reference: ``total_training_steps // gradient_accumulation_steps``; the
        same when a rollout's micro-batches divide evenly)."""
        per_rollout = self.config.update_iters * self.rl_steps_per_rollout()
        groups = math.ceil(per_rollout / self.config.gradient_accumulation_steps)
        return self.rollouts_per_epoch() * self.config.epochs * groups

    def _build_optimizers(self) -> None:
        cfg = self.config
        total = self.optimizer_updates()
        betas = tuple(cfg.adam_betas)

        def make(model, lr, wd, kind, warmup_ratio):
            # Fused AdamW: one pass per tensor instead of a loop of ops; the same formula up to rounding.
            try:
                opt = torch.optim.AdamW(optimizer_groups(model, wd), lr=lr, betas=betas, eps=1e-8, fused=True)
            except (RuntimeError, TypeError, ValueError):
                opt = torch.optim.AdamW(optimizer_groups(model, wd), lr=lr, betas=betas, eps=1e-8)
            warmup = int(total * warmup_ratio)  # the reference's int(), not a ceiling
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule_lambda(kind, warmup, total, lr))

        self.actor_optimizer, self.actor_scheduler = make(self.actor, cfg.actor_lr, cfg.actor_weight_decay,
                                                          cfg.actor_lr_scheduler_type, cfg.actor_lr_warmup_ratio)
        self.critic_optimizers, self.critic_schedulers = [], []
        for critic in self.critics:
            opt, sched = make(critic, cfg.critic_lr, cfg.critic_weight_decay, cfg.critic_lr_scheduler_type,
                              cfg.critic_lr_warmup_ratio)
            self.critic_optimizers.append(opt)
            self.critic_schedulers.append(sched)

    # ---------------------------------------------------------------------------------------------- rollout
    def _rollout_seed(self, epoch: int, batch_index: int) -> int:
        seed = (self.config.seed * 1_000_003 + epoch * 100_003 + batch_index) % (2 ** 63)
        return (seed + distributed.rank() * 998_244_353) % (2 ** 63)  # ranks sample independently

    def _generate(self, input_ids: Tensor, attention_mask: Tensor, seed: int):
        cfg = self.config
        p = input_ids.shape[1]
        max_new = cfg.max_length - p
        if cfg.max_new_tokens is not None:
            max_new = min(max_new, cfg.max_new_tokens) if max_new >= 1 else cfg.max_new_tokens
        max_new = max(1, max_new)
        # Sharded actor: its full weights are gathered once here and freed after the last decode step.
        with distributed.gathered(self.actor), self.autocast():
            return generate(self.actor, input_ids, attention_mask, max_new_tokens=max_new, do_sample=True,
                            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                            repetition_penalty=cfg.repetition_penalty,
                            eos_token_id=self.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                            seed=seed, lora_merge={"merged": True, "on-the-fly": False}.get(cfg.lora_generation))

    @torch.no_grad()
    def end_scores(self, model, normalizer, tokenizer, sequences: Tensor, attention_mask: Tensor) -> Tensor:
        """End scores [B] fp32 of a frozen score model (re-tokenised when it has its own tokenizer)."""
        if tokenizer is not None:
            sequences, attention_mask = retokenize(sequences, attention_mask, self.tokenizer, tokenizer,
                                                   self.config.max_length)
            sequences, attention_mask = sequences.to(self.device), attention_mask.to(self.device)
        with self.autocast():
            # Our score models compute the end rows only; transformers-backed ones (--backend hf) the full forward.
            score_ends = getattr(model, "score_ends", None)
            end = (score_ends(sequences, attention_mask) if score_ends is not None
                   else model(sequences, attention_mask).end_scores).float()
        return normalizer(end) if normalizer is not None else end

    @torch.no_grad()
    def rollout(self, batch: dict, seed: int) -> list[Rollout]:
        """Generate, score, split into micro-batches.  ``batch``: the prompt collator's output."""
        cfg = self.config
        with self.phases("generation"):
            ids = batch["input_ids"].to(self.device)
            mask = batch["attention_mask"].to(self.device)
            if cfg.num_return_sequences > 1:
                ids = ids.repeat_interleave(cfg.num_return_sequences, 0)
                mask = mask.repeat_interleave(cfg.num_return_sequences, 0)
            gen = self._generate(ids, mask, seed)
        self.generated_tokens = float(gen.response_mask.sum())
        with self.phases("scoring"):
            return self.score_rollout(gen)

    @torch.no_grad()
    def reference_logprobs(self, seq: Tensor, am: Tensor, labels: Tensor) -> Tensor:
        """The frozen reference's log-probs of ``labels``: the reference model, or the LoRA actor with its adapters
        disabled (the same base weights)."""
        with self.autocast():
            if self.reference is not None:
                return self.reference.token_logprobs(seq, am, labels=labels)
            with adapters_disabled(self.actor):
                return self.actor.token_logprobs(seq, am, labels=labels)

    @torch.no_grad()
    def score_rollout(self, gen) -> list[Rollout]:
        """Score generated sequences (``engine.GenerateOutput``), split them into micro-batches and observe the end
        costs in the Lagrange window.  Scoring runs in eval mode (no LoRA dropout)."""
        with eval_mode(self.actor, *self.critics):
            return self._score_rollout(gen)

    def _adapter_dropout(self) -> bool:
        return any(getattr(lora_spec_of(m), "dropout", 0.0) > 0 for m in (self.actor, *self.critics))

    def _score_rollout(self, gen) -> list[Rollout]:
        cfg = self.config
        n = gen.sequences.shape[0]
        size = cfg.per_device_train_batch_size
        out = []
        for k, start in enumerate(range(0, n, size)):
            sl = slice(start, start + size)
            seq, am, rm, p, t = trim(gen.sequences[sl], gen.attention_mask[sl], gen.response_mask[sl],
                                     gen.prompt_length)
            labels = response_labels(seq, rm, p)
            rmf = rm.float()
            ref_lp = self.reference_logprobs(seq, am, labels)
            mb = Rollout(seq, am, rmf, p, labels, ref_logprobs=None, reward=None, cost=None)
            mb.ref_logprobs = mb.response_slice(ref_lp).float() * rmf
            hidden: dict = {}  # id(critic) -> its value head's input, where a scorer shares its backbone pass
            mb.reward = self._rollout_scores(self.reward_model, self.reward_normalizer, self.reward_tokenizer, mb,
                                             hidden)
            if self.cost_model is not None:
                mb.cost = self._rollout_scores(self.cost_model, self.cost_normalizer, self.cost_tokenizer, mb, hidden)
            if hidden:
                mb.critic_hidden = [hidden.get(id(c)) for c in self.critics]
            self._guard(mb.reward, "reward-model end scores")
            if mb.cost is not None:
                self._guard(mb.cost, "cost-model end scores")
            # LoRA dropout makes a training forward differ from a scoring one: the old quantities are then scored
            fused = k == 0 and not cfg.separate_scoring and not self._adapter_dropout()
            if not fused:
                # The weights move after the first micro-batch's update: take the old quantities now.
                # the engine's log-probs are the training forward's up to fp32 rounding; in half precision their
                # gap is bf16's own rounding (docs/precision.md), so the actor scores them instead
                if cfg.temperature == 1.0 and not cfg.separate_scoring and not (cfg.bf16 or cfg.fp16):
                    mb.old_logprobs = gen.logprobs[sl][:, :t].float() * rmf
                else:
                    with self.autocast():
                        lp = self.actor.token_logprobs(seq, am, labels=labels)
                    mb.old_logprobs = mb.response_slice(lp).float() * rmf
                mb.old_values = torch.stack(self._all_critic_values(mb))
            out.append(mb)
        for mb in out:
            self.algorithm.observe(mb.cost)
        return out

    def _rollout_scores(self, scorer, normalizer, tokenizer, mb: Rollout, hidden: dict) -> Tensor:
        """End scores of a micro-batch; a scorer that shares a value-head critic's frozen backbone
        (:attr:`SharedScorer.fuses`) also returns the critic's hidden states of the response columns, kept in
        ``hidden``: the critic's values are then its value head on them, with no critic forward."""
        if not (isinstance(scorer, SharedScorer) and scorer.fuses):
            return self.end_scores(scorer, normalizer, tokenizer, mb.input_ids, mb.attention_mask)
        with self.autocast():
            end, h = scorer.end_scores_and_columns(mb.input_ids, mb.attention_mask, mb.prompt_length - 1,
                                                   mb.response_length)
        hidden[id(scorer.critic)] = h
        end = end.float()
        return normalizer(end) if normalizer is not None else end

    # ---------------------------------------------------------------------------------------------- updates
    def _guard(self, x: Tensor, what: str) -> None:
        check_finite(x, what, f"rollout step {self.step + 1} (RL step {self.global_step + 1})", self.config.output_dir,
                     "Lower --actor_lr / --critic_lr, check the reward and cost models, or resume from the checkpoint.")

    def _actor_logprobs(self, mb: Rollout) -> Tensor:
        with self.autocast():
            lp = self.actor.token_logprobs(mb.input_ids, mb.attention_mask, labels=mb.labels)
        return mb.response_slice(lp).float()

    def _all_critic_values(self, mb: Rollout) -> list[Tensor]:
        hidden = mb.critic_hidden or [None] * len(self.critics)
        return [self._critic_values(c, mb, h) for c, h in zip(self.critics, hidden)]

    def _critic_values(self, critic, mb: Rollout, hidden: Tensor | None = None) -> Tensor:
        """Values of the response positions ``[b, T]`` (our score models compute only those rows in their last
        layer; transformers-backed ones the full forward).  ``hidden``: the frozen backbone's states of those
        positions (a value-head critic sharing its scorer's pass): the value head alone runs."""
        if hidden is not None:
            return critic.score_head(hidden).squeeze(-1).float()
        columns = getattr(critic, "score_columns", None)
        with self.autocast():
            if columns is not None:
                return columns(mb.input_ids, mb.attention_mask, mb.prompt_length - 1, mb.response_length).float()
            return mb.response_slice(critic(mb.input_ids, mb.attention_mask).scores).float()

    def rl_step(self, mb: Rollout, boundary: bool = True) -> dict:
        """One PPO update (actor + critics) on a micro-batch; returns the reference's metrics
        (``docs/algorithm.md`` section 7).

        With ``--gradient_accumulation_steps G`` the losses are scaled by ``1 / G`` (as DeepSpeed's engine does) and
        the optimizers step only at a ``boundary``: every G-th RL micro-batch of a rollout and its last one."""
        cfg, algorithm, phase = self.config, self.algorithm, self.phases
        mask = mb.response_mask
        with phase("lagrange"):  # once per RL step, before the actor loss (the reference's order)
            algorithm.before_update(self.global_step, self._guard)
        with phase("actor"):  # forwards with gradient
            self.actor.train()
            logp = self._actor_logprobs(mb)
        with phase("critics"):
            values = self._all_critic_values(mb)
        with phase("gae"):  # old quantities (fused first pass) and advantages, once per micro-batch
            if mb.advantages is None:
                if mb.old_logprobs is None:
                    mb.old_logprobs = logp.detach() * mask
                if mb.old_values is None:
                    mb.old_values = torch.stack([v.detach() for v in values])
                mb.rewards, mb.advantages, mb.returns = compute_advantages(
                    algorithm, mb.reward, mb.cost, mb.old_logprobs, mb.ref_logprobs, mb.old_values, mask,
                    kl_coeff=cfg.kl_coeff, clip_range_score=cfg.clip_range_score)
                self._guard(mb.rewards, "per-token rewards / costs")
        with phase("losses"):
            actor_loss = algorithm.actor_loss(logp, mb.old_logprobs, mb.advantages, mask,
                                              clip_range=cfg.clip_range_ratio)
            critic_losses = [ops.critic_loss(v, mb.old_values[i], mb.returns[i], mask,
                                             clip_range=cfg.clip_range_value) for i, v in enumerate(values)]
            self._guard(actor_loss.detach(), "actor loss")
            for name, loss in zip(self.critic_names, critic_losses):
                self._guard(loss.detach(), f"{name} loss")
        accum = cfg.gradient_accumulation_steps
        with phase("actor"):
            (actor_loss / accum if accum > 1 else actor_loss).backward()
        with phase("critics"):
            (sum(critic_losses) / accum if accum > 1 else sum(critic_losses)).backward()
        if boundary:
            self._apply_updates()
        # The learning rates after the schedulers' step, as the reference logs them.
        return distributed.reduce_metrics(self._metrics(mb, values, actor_loss, critic_losses, self._lrs()))

    def _apply_updates(self) -> None:
        """Clip, check, then step the actor and the critics (no model moves unless every gradient is finite); the
        time of each model's share goes to its phase."""
        max_norm = self.config.max_grad_norm
        with self.phases("actor"):
            actor_norm = clip_gradients(self.actor.parameters(), max_norm)
        with self.phases("critics"):
            critic_norms = [clip_gradients(c.parameters(), max_norm) for c in self.critics]
        try:
            self._guard(actor_norm, "actor gradient")
            for name, norm in zip(self.critic_names, critic_norms):
                self._guard(norm, f"{name} gradient")
        except NonFiniteError:
            self.zero_grads()
            raise
        with self.phases("actor"):
            self.actor_optimizer.step()
            self.actor_scheduler.step()
            self.actor_optimizer.zero_grad(set_to_none=True)
        with self.phases("critics"):
            for opt, sched in zip(self.critic_optimizers, self.critic_schedulers):
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)

    def _lrs(self) -> dict:
        lrs = {"actor_lr": self.actor_optimizer.param_groups[0]["lr"]}
        lrs.update({f"{name}_lr": opt.param_groups[0]["lr"] for name, opt in zip(self.critic_names,
                                                                                  self.critic_optimizers)})
        return lrs

    @torch.no_grad()
    def _metrics(self, mb: Rollout, values, actor_loss, critic_losses, lrs) -> dict:
        """The reference's train/ metrics: losses, the algorithm's own (lambda, episode cost, ...), end scores, each
        stream's KL-penalised reward / advantage / return / value, KL, learning rates, lengths."""
        mask = mb.response_mask
        lengths = mask.sum(-1)
        kl = ((mb.old_logprobs - mb.ref_logprobs) * mask).sum(-1).mean()
        m = {"train/actor_loss": float(actor_loss)}
        m.update({f"train/{name}_loss": float(loss) for name, loss in zip(self.critic_names, critic_losses)})
        m.update(self.algorithm.metrics(mb.reward, mb.cost))
        m["train/reward"] = float(mb.reward.mean())
        if mb.cost is not None:
            m["train/cost"] = float(mb.cost.mean())
        for i, stream in enumerate(self.algorithm.streams):
            m.update({
                f"train/{stream}_with_kl_penalty": float((mb.rewards[i] * mask).sum(-1).mean()),
                f"train/{stream}_advantage": float(ops.masked_mean(mb.advantages[i], mask)),
                f"train/{stream}_return": float(ops.masked_mean(mb.returns[i], mask)),
                f"train/{stream}_value": float(ops.masked_mean(values[i].detach(), mask)),
            })
        m["train/kl_divergence"] = float(kl)
        m.update({f"train/{k}": v for k, v in lrs.items()})
        m["train/mean_generated_length"] = float(lengths.float().mean())
        m["train/max_generated_length"] = float(lengths.max())
        return m

    # ---------------------------------------------------------------------------------------------- PTX
    def _ptx_batch(self):
        ds = self.ptx_dataset
        n = len(ds)
        m = distributed.rows_per_rank(n)  # this rank's rows per PTX epoch (n in one process)
        size = self.config.per_device_train_batch_size
        rows = []
        while len(rows) < min(size, m):
            epoch, pos = divmod(self.ptx_position, m)
            order = rank_epoch_order(n, self.config.seed + 7919, epoch)
            take = min(size - len(rows), m - pos)
            rows.extend(ds[i] for i in order[pos:pos + take])
            self.ptx_position += take
        batch = ds.collator()(rows)
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def ptx_step(self) -> dict:
        """The reference's PTX step: ``ptx_coeff * SFT loss`` on an instruction batch, its own actor optimizer step
        (the actor's schedule advances on it too, as DeepSpeed's ``engine.step()`` does)."""
        from .modeling import token_logprobs

        cfg = self.config
        with self.phases("ptx"):
            batch = self._ptx_batch()
            with self.autocast():
                logp = token_logprobs(self.actor, batch["input_ids"], batch["attention_mask"], batch["labels"])
            loss = sft_loss(logp, batch["labels"])
            self._guard(loss.detach(), "PTX loss")
            (cfg.ptx_coeff * loss).backward()
            norm = distributed.to_local(clip_gradients(self.actor.parameters(), cfg.max_grad_norm))
            try:
                self._guard(norm, "actor gradient (PTX)")
            except NonFiniteError:
                self.zero_grads()
                raise
            self.actor_optimizer.step()
            self.actor_scheduler.step()
            self.actor_optimizer.zero_grad(set_to_none=True)
            self.ptx_steps += 1
        return distributed.reduce_metrics({"train/ptx_loss": float(loss.detach())})

    # ---------------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict:
        """eval/reward and eval/cost: mean end scores of responses sampled (fixed seed) on the eval prompts."""
        ds = self.eval_dataset
        collate = collator_of(ds)
        rewards, costs = [], []
        size = self.config.per_device_eval_batch_size
        for bi, start in enumerate(range(0, len(ds), size)):
            batch = collate([ds[i] for i in range(start, min(len(ds), start + size))])
            ids, am = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            gen = self._generate(ids, am, seed=self.config.seed + 12345 + bi)
            rewards.append(self.end_scores(self.reward_model, self.reward_normalizer, self.reward_tokenizer,
                                           gen.sequences, gen.attention_mask).cpu())
            if self.cost_model is not None:
                costs.append(self.end_scores(self.cost_model, self.cost_normalizer, self.cost_tokenizer,
                                             gen.sequences, gen.attention_mask).cpu())
        out = {"eval/reward": float(torch.cat(rewards).mean())}
        if costs:
            out["eval/cost"] = float(torch.cat(costs).mean())
        return out

    # ---------------------------------------------------------------------------------------------- the core's hooks
    def rows_per_step(self) -> int:
        return self.config.per_device_prompt_batch_size

    def trained(self) -> list[Trained]:
        out = [Trained("actor", self.actor, self.actor_optimizer, self.actor_scheduler)]
        out += [Trained(*t) for t in zip(self.critic_names, self.critics, self.critic_optimizers,
                                         self.critic_schedulers)]
        return out

    def log_step(self) -> int:
        return self.global_step

    def write_models(self, folder: str, dtype: torch.dtype | None = None, final: bool = False) -> None:
        """Checkpoint: ``actor/`` (+ tokenizer) and one folder per critic; final: the actor (+ tokenizer) at the top
        of ``folder`` and the critics in sub-folders."""
        actor_dir = folder if final else os.path.join(folder, "actor")
        merge = final and self.config.merge_lora  # LoRA: adapter folders, merged for the final save on request
        save_trained(self.actor, actor_dir, dtype=dtype, merge=merge)  # sharded: every rank gathers, rank 0 writes
        if distributed.is_main():
            save_tokenizer(self.tokenizer, actor_dir)
        for name, critic in zip(self.critic_names, self.critics):
            base = getattr(critic, "shared_base", None)
            if base is not None and lora_spec_of(critic) is None and not final:
                save_value_head(critic, os.path.join(folder, name), base, dtype=dtype)  # the backbone is the input's
            else:
                save_trained(critic, os.path.join(folder, name), dtype=dtype, merge=merge)

    def replaced_folders(self) -> list[str]:
        return self.critic_names

    def state_dict(self) -> dict:
        """The algorithm's state (multiplier, cost windows: a collective under torchrun) and the RL counters."""
        return {
            **self.algorithm.state_dict(),
            "counters": {"global_step": self.global_step, "ptx_position": self.ptx_position,
                         "ptx_steps": self.ptx_steps},
            "algorithm": self.algorithm.name,
            "prompt_batch": self.config.per_device_prompt_batch_size * distributed.world_size(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["algorithm"] != self.algorithm.name:
            raise ConfigError(f"--resume {self.resume_from}: a {state['algorithm']} checkpoint, not "
                              f"{self.algorithm.name}")
        self.algorithm.load_state_dict(state)
        global_batch = self.config.per_device_prompt_batch_size * distributed.world_size()
        if state["prompt_batch"] != global_batch:
            distributed.print0(f"warning: --resume {self.resume_from}: the global prompt batch changed "
                               f"({state['prompt_batch']} -> {global_batch}); the data position is counted in "
                               "batches, so the rest of the epoch is not the same rows")
        c = state["counters"]
        self.global_step, self.ptx_position, self.ptx_steps = c["global_step"], c["ptx_position"], c["ptx_steps"]

    def summary(self) -> dict:
        out = {"rl_steps": self.global_step}
        if self.lagrange is not None:
            out["lambda"] = self.lagrange.value
        return out

    def progress_postfix(self, logged) -> dict:
        last = logged[-1][1]
        post = {"reward": last["train/reward"]}
        if "train/cost" in last:
            post["cost"] = last["train/cost"]
        if self.lagrange is not None:
            post["lambda"] = self.lagrange.value
        return post

    def train_step(self, rows: list[int]) -> list[tuple[int, dict]]:
        """One rollout on the prompts ``rows`` and its RL steps; returns the (RL step, metrics) rows."""
        batch = collator_of(self.train_dataset)([self.train_dataset[i] for i in rows])
        logged = self.train_one_rollout(batch)
        return [(self.global_step - len(logged) + 1 + i, row) for i, row in enumerate(logged)]

    def train_one_rollout(self, batch: dict, logger=None) -> list[dict]:
        """Rollout + ``update_iters`` passes of RL steps (+ PTX).  Returns the rows to log (the last one with the
        rollout's time/ and perf/ metrics); with ``logger``, also logs them."""
        cfg = self.config
        self.phases.reset()
        with self.phases("step"):
            micro = self.rollout(batch, self._rollout_seed(self.epoch, self.index))
            rows = []
            n, k = cfg.update_iters * len(micro), 0
            for _ in range(cfg.update_iters):
                for mb in micro:
                    k += 1
                    info = self.rl_step(mb, boundary=k % cfg.gradient_accumulation_steps == 0 or k == n)
                    if self.ptx_dataset is not None:
                        info.update(self.ptx_step())
                    self.global_step += 1
                    rows.append(info)
        rows[-1].update(distributed.reduce_metrics(self._perf()))  # time/ averaged over ranks, perf/ summed
        if logger is not None:
            for i, row in enumerate(rows):
                logger.log(row, self.global_step - len(rows) + 1 + i)
        return rows

    def _perf(self) -> dict:
        t, tokens = self.timings, self.generated_tokens
        perf = {f"time/{k}": t.get(k, 0.0) for k in ("generation", "scoring", "gae", "actor", "critics")}
        if self.ptx_dataset is not None:
            perf["time/ptx"] = t.get("ptx", 0.0)
        perf["time/step"] = t["step"]
        perf["perf/generated_tokens"] = tokens
        perf["perf/tokens_per_s"] = tokens / max(t["step"], 1e-9)
        perf["perf/generation_tokens_per_s"] = tokens / max(t.get("generation", 0.0), 1e-9)
        return perf


def run(config: PPOConfig) -> dict:
    return PPOTrainer(config).train()
