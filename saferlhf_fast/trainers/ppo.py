"""PPO, PPO-Lagrangian and PPO with reward shaping: the RL stage of Safe RLHF (spec sections 4-6).

One module, three algorithms; only the reward stream(s) and the advantage mix differ:

* ``ppo``                 reward R only; one critic; ``A = A^r``.
* ``ppo-lag``             reward R and cost C, two critics, ``A = (A^r - lam A^c) / (1 + lam)``, lam from
                          :class:`~saferlhf_fast.lagrange.LagrangeMultiplier` (``--lambda_optimizer sgd``) or
                          :class:`~saferlhf_fast.lagrange.PIDLagrangeMultiplier` (``pid``), updated once per RL step,
                          before the actor loss, from the window of rollout end costs C.
* ``ppo-reward-shaping``  one critic on the shaped reward ``R - nu C`` with nu fixed (= ``--lambda_init``).

Six roles (PPO-Lag): actor (trained), reference (frozen copy of the initial actor), reward model and cost model
(frozen score models), reward critic and cost critic (trained score models, initialised from the reward / cost
models unless ``--reward_critic_model_name_or_path`` / ``--cost_critic_model_name_or_path`` name other, e.g.
smaller, models).

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
from the engine's sampled-token log-probs when ``--temperature 1`` (the consistency contract: the engine returns
``log_softmax(logits / T)[token]``, the training forward's numbers up to float rounding) or from a no-grad actor
forward at temperature 1 otherwise (the reference always uses ``log_softmax(logits)`` at temperature 1, whatever
the sampling temperature).  ``--separate_scoring`` forces the reference's separate forwards everywhere.

Deviations, all deliberate: positions follow the attention mask (``cumsum(mask) - 1``) in every forward, as
transformers' ``generate`` does; the reference's scoring forwards pass no position ids, so its left-padded rows
are scored at positions shifted by the padding.  Logged steps are 1-based (the reference logs from 0).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import distributed, ops
from ..data import DataError, PromptOnlyDataset, SupervisedDataset, load_tokenizer
from ..engine import generate
from ..lagrange import MULTIPLIERS, EpisodeCostWindow, make_multiplier
from ..models import freeze, from_pretrained
from ..ops import IGNORE_INDEX
from ..profiling import PhaseRanges
from .base import (
    STATE_FILE,
    NonFiniteError,
    StopSignals,
    apply_tf32,
    check_finite,
    check_vocab,
    checkpoint_or_stop,
    clip_gradients,
    data_fingerprint,
    final_dtype,
    load_state,
    maybe_shard,
    open_run_logger,
    optimizer_groups,
    prune_checkpoints,
    rank_epoch_order,
    replace_dir_contents,
    require_score_head,
    resolve_device,
    resolve_resume,
    rng_state,
    schedule_lambda,
    seed_everything,
    set_rng_state,
    staged_checkpoint,
    stop_if_signalled,
    warn_single_process_flags,
    write_run_info,
)
from .config import (
    ALLOW_CHANGES_HELP,
    ATTN_BACKENDS,
    LR_SCHEDULERS,
    OVERWRITE_HELP,
    ConfigError,
    check_common,
    option,
)
from .metrics import MetricsLogger
from .score import load_normalizer
from .sft import sft_loss

GAMMA = 1.0  # fixed in the reference implementation
GAE_LAMBDA = 0.95


# ================================================================================================ configs
@dataclass
class PPOConfig:
    """``saferlhf-fast ppo`` (reward only).  Flag names and defaults: the reference implementation's argparse."""

    # ---- models
    actor_model_name_or_path: str | None = option(None, "the initial policy (also the frozen reference)", required=True)
    reward_model_name_or_path: str | None = option(None, "reward model folder (saferlhf-fast rm)", required=True)
    reward_critic_model_name_or_path: str | None = option(None, "reward critic initialisation (default: the reward "
                                                            "model; a plain LM gets a fresh score head)")
    max_length: int = option(512, "maximum total length (prompt + response) of a rollout")
    max_new_tokens: int | None = option(None, "cap on generated tokens (default: max_length - prompt length)")
    trust_remote_code: bool = option(False, "accepted for compatibility (no remote code is ever run)")
    chat_template: str = option("reference", "prompt template: 'reference' (BEGINNING OF CONVERSATION: USER: ... "
                                         "ASSISTANT:) or 'tokenizer' (the tokenizer's own chat template, e.g. ChatML)",
                            choices=["reference", "tokenizer"])
    # ---- data
    train_datasets: list[str] = option([], "prompt datasets NAME[:PROPORTION[:PATH]] ...", required=True)
    ptx_datasets: list[str] | None = option(None, "instruction datasets for the PTX (SFT) loss after each RL step")
    eval_datasets: list[str] | None = option(None, "prompt datasets evaluated during training (eval/reward, eval/cost)")
    eval_split_ratio: float | None = option(None, "hold out this fraction of the training prompts for evaluation")
    need_eval: bool = option(False, "evaluate (implied by --eval_datasets / --eval_split_ratio)")
    eval_strategy: str = option("epoch", "when to evaluate", choices=["epoch", "steps"])
    eval_interval: int = option(1000000, "evaluate every N rollout steps (--eval_strategy steps)")
    # ---- generation
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling")
    top_k: int = option(50, "top-k sampling (0: off). The reference sets no top_k in its GenerationConfig and so samples "
                        "with transformers' default of 50")
    num_return_sequences: int = option(1, "responses sampled per prompt")
    repetition_penalty: float = option(1.0, "repetition penalty")
    # ---- algorithm
    normalize_reward: bool = option(False, "normalize the reward model's scores with the statistics it was trained with "
                                       "(its normalizer); off: raw scores, as the reference")
    kl_coeff: float = option(0.02, "KL penalty coefficient beta")
    clip_range_ratio: float = option(0.2, "PPO ratio clip epsilon")
    clip_range_score: float = option(50.0, "clip of the per-token rewards / costs")
    clip_range_value: float = option(5.0, "critic value clip")
    ptx_coeff: float = option(0.0, "weight of the PTX loss (the PPO-Lag script uses 16)")
    separate_scoring: bool = option(False, "old log-probs / values from separate no-grad forwards (the reference's "
                                       "way; slower, same math)")
    # ---- optimisation
    epochs: int = option(1, "passes over the prompts")
    update_iters: int = option(1, "PPO passes over each rollout batch")
    per_device_prompt_batch_size: int = option(16, "prompts per rollout")
    per_device_train_batch_size: int = option(16, "sequences per RL update (micro-batch)")
    gradient_accumulation_steps: int = option(1, "RL micro-batches per optimizer step (losses averaged over them)")
    per_device_eval_batch_size: int = option(16, "prompts per evaluation batch")
    actor_lr: float = option(1e-5, "actor peak learning rate", aliases=("actor_learning_rate",))
    actor_weight_decay: float = option(0.0, "actor AdamW weight decay")
    actor_lr_scheduler_type: str = option("cosine", "actor schedule",
                                      choices=LR_SCHEDULERS)
    actor_lr_warmup_ratio: float = option(0.0, "fraction of actor steps spent warming up (the PPO-Lag script: 0.03)")
    actor_gradient_checkpointing: bool = option(False, "recompute actor activations in backward")
    critic_lr: float = option(5e-6, "critic peak learning rate", aliases=("critic_learning_rate",))
    critic_weight_decay: float = option(0.0, "critic AdamW weight decay")
    critic_lr_scheduler_type: str = option("cosine", "critic schedule (the reference's scripts pass constant)",
                                       choices=LR_SCHEDULERS)
    critic_lr_warmup_ratio: float = option(0.0, "fraction of critic steps spent warming up (not for 'constant')")
    critic_gradient_checkpointing: bool = option(False, "recompute critic activations in backward")
    adam_betas: list[float] = option([0.9, 0.95], "AdamW betas")
    max_grad_norm: float = option(1.0, "gradient clipping (global norm, per model; 0: off)")
    seed: int = option(42, "random seed (data order, sampling)")
    fp16: bool = option(False, "fp16 autocast")
    bf16: bool = option(False, "bf16 autocast (weights and optimizer state stay fp32)")
    tf32: bool | None = option(None, "allow TF32 matmuls on CUDA")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    attn_backend: str | None = option(None, "attention backend of the models", choices=list(ATTN_BACKENDS))
    mixed_precision: str | None = option(None, "under torchrun: FSDP2 mixed precision (parameters gathered and computed "
                                           "in this dtype, gradients reduced in fp32)", choices=["bf16", "fp16"])
    offload: str = option("none", "under torchrun on GPUs: FSDP2 CPU offload of the trained models' sharded parameters, "
                              "gradients and optimizer state (FSDP2 offloads them together: every choice but 'none' "
                              "is the same)", choices=["none", "parameter", "optimizer", "all"])
    shard_frozen: bool = option(True, "under torchrun: shard the frozen models (reference, reward, cost) with FSDP2 too "
                                  "(False: a full replica on every rank)")
    # ---- output
    output_dir: str | None = option(None, "final actor (+ critics), checkpoints and metrics", required=True)
    save_16bit: bool = option(False, "save the final actor and critics in 16 bits (bf16 with --bf16, else fp16); "
                                 "checkpoints stay fp32")
    overwrite_output_dir: bool = option(False, OVERWRITE_HELP)
    log_type: str = option("none", "extra metrics sink besides metrics.jsonl", choices=["none", "tensorboard", "wandb"])
    log_dir: str | None = option(None, "TensorBoard / W&B directory (default: OUTPUT_DIR/logs)")
    log_project: str | None = option(None, "W&B project")
    log_run_name: str | None = option(None, "W&B run name")
    save_interval: int = option(0, "also checkpoint every N rollout steps (0: only at the end of each epoch)")
    save_total_limit: int = option(2, "checkpoints kept (oldest removed)")
    resume: str | None = option(None, "continue from a checkpoint folder, or 'auto': the latest in OUTPUT_DIR",
                            nargs="?", const="auto")
    resume_allow_changes: list[str] | None = option(None, ALLOW_CHANGES_HELP)
    max_steps: int | None = option(None, "stop after this many rollout steps (a checkpoint is written); the schedule "
                                     "still spans all epochs, so --resume finishes the same run")
    progress: bool = option(True, "show a progress bar")

    algorithm = "ppo"

    @property
    def command(self) -> str:
        return self.algorithm

    @property
    def uses_cost(self) -> bool:
        return self.algorithm != "ppo"

    def validate(self) -> None:
        missing = [f.name for f in dataclasses.fields(self) if f.metadata.get("required") and not getattr(self, f.name)]
        if missing:
            raise ConfigError("missing required option(s): " + ", ".join("--" + m for m in missing))
        check_common(self)
        for name in ("epochs", "update_iters", "per_device_prompt_batch_size", "per_device_train_batch_size",
                     "per_device_eval_batch_size", "num_return_sequences", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 2:
            raise ConfigError(f"--max_length must be >= 2, got {self.max_length}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"--top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"--repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("kl_coeff", "clip_range_ratio", "clip_range_score", "clip_range_value", "ptx_coeff",
                     "actor_lr", "critic_lr", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("actor_lr_warmup_ratio", "critic_lr_warmup_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name} must be in [0, 1], got {getattr(self, name)}")
        if self.eval_split_ratio is not None and not 0.0 < self.eval_split_ratio < 1.0:
            raise ConfigError(f"--eval_split_ratio must be in (0, 1), got {self.eval_split_ratio}")
        if self.fp16 and self.bf16:
            raise ConfigError("--fp16 and --bf16 are exclusive")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"--adam_betas takes two numbers, got {self.adam_betas}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max_steps must be >= 1, got {self.max_steps}")
        if self.eval_datasets or self.eval_split_ratio:
            self.need_eval = True


@dataclass
class PPOLagConfig(PPOConfig):
    """``saferlhf-fast ppo-lag``: PPO-Lagrangian (reward and cost, two critics, adaptive lambda)."""

    cost_model_name_or_path: str | None = option(None, "cost model folder (saferlhf-fast cm)", required=True)
    cost_critic_model_name_or_path: str | None = option(None, "cost critic initialisation (default: the cost model)")
    normalize_cost: bool = option(False, "normalize the cost model's scores with the statistics it was trained with "
                                     "(its normalizer); off: raw scores, as the reference")
    threshold: float = option(0.0, "cost threshold (-d of the paper): lambda grows while J_C > threshold")
    lambda_init: float = option(1.0, "initial Lagrange multiplier")
    lambda_lr: float = option(0.1, "learning rate of log(lambda)", aliases=("lambda_learning_rate",))
    lambda_max: float | None = option(None, "cap on lambda (the PPO-Lag script uses 5.0)")
    lambda_update_delay_steps: int = option(0, "RL steps before lambda starts to move")
    episode_cost_window_size: int = option(128, "J_C is the mean of the last N rollout end costs")
    lambda_optimizer: str = option("sgd", "lambda update: 'sgd' (the reference's log-space SGD, --lambda_lr) or 'pid' "
                                      "(PID Lagrangian, --pid_*)", choices=list(MULTIPLIERS))
    pid_kp: float = option(0.1, "PID: proportional gain (on the EMA of J_C - threshold)")
    pid_ki: float = option(0.01, "PID: integral gain (the integral starts at --lambda_init)")
    pid_kd: float = option(0.01, "PID: derivative gain (on the rise of the EMA of J_C over --pid_d_delay updates)")
    pid_d_delay: int = option(10, "PID: the derivative compares the cost EMA with its value this many updates back")
    pid_delta_p_ema_alpha: float = option(0.95, "PID: EMA factor of the proportional signal (0: no smoothing)")
    pid_delta_d_ema_alpha: float = option(0.95, "PID: EMA factor of the derivative's cost signal (0: no smoothing)")

    algorithm = "ppo-lag"

    def validate(self) -> None:
        super().validate()
        try:
            make_multiplier(self)  # the multiplier's own checks, on the flags of --lambda_optimizer's choice
        except ValueError as err:
            raise ConfigError(f"--{err}") from None


@dataclass
class RewardShapingConfig(PPOConfig):
    """``saferlhf-fast ppo-reward-shaping``: PPO on ``R - nu * C`` with nu fixed (``--lambda_init``), one critic."""

    cost_model_name_or_path: str | None = option(None, "cost model folder (saferlhf-fast cm)", required=True)
    normalize_cost: bool = option(False, "normalize the cost model's scores with the statistics it was trained with "
                                     "(its normalizer); off: raw scores, as the reference")
    lambda_init: float = option(1.0, "the fixed shaping coefficient nu")
    episode_cost_window_size: int = option(128, "train/episode_cost is the mean of the last N rollout end costs")

    algorithm = "ppo-reward-shaping"

    def validate(self) -> None:
        super().validate()
        if self.lambda_init < 0:
            raise ConfigError(f"--lambda_init (nu) must be >= 0, got {self.lambda_init}")
        if self.episode_cost_window_size < 1:
            raise ConfigError(f"--episode_cost_window_size must be >= 1, got {self.episode_cost_window_size}")


CONFIGS = {"ppo": PPOConfig, "ppo-lag": PPOLagConfig, "ppo-reward-shaping": RewardShapingConfig}


# ================================================================================================ rollouts
@dataclass
class Rollout:
    """One micro-batch of experience.  Sequences ``[b, P + T]``; per-token tensors ``[b, T]`` over the response."""

    input_ids: Tensor
    attention_mask: Tensor  # bool [b, P + T]
    response_mask: Tensor  # float [b, T]
    prompt_length: int  # P
    labels: Tensor  # [b, P + T]: label of position j is token j + 1 where that is a response token, else -100
    ref_logprobs: Tensor  # [b, T]
    reward: Tensor  # [b] end scores R
    cost: Tensor | None  # [b] end scores C
    old_logprobs: Tensor | None = None  # [b, T]; None: taken from the first training forward (fused)
    old_values: Tensor | None = None  # [n_critics, b, T]; None: idem
    # filled on first use
    rewards: Tensor | None = None  # [n_streams, b, T] per-token (KL-penalised) rewards / costs
    advantages: Tensor | None = None  # [n_streams, b, T]
    returns: Tensor | None = None  # [n_streams, b, T]

    @property
    def response_length(self) -> int:
        return self.response_mask.shape[1]

    def response_slice(self, x: Tensor) -> Tensor:
        """``x[:, P - 1 : P - 1 + T]``: the per-position quantity (log-prob of the next token, value of the state)
        aligned with the response tokens."""
        p = self.prompt_length
        return x[:, p - 1:p - 1 + self.response_length]


def response_labels(sequences: Tensor, response_mask: Tensor, prompt_length: int) -> Tensor:
    """Labels for ``model.token_logprobs(..., labels=)``: position ``P - 1 + t`` predicts response token ``t``."""
    b, length = sequences.shape
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long, device=sequences.device)
    resp = sequences[:, prompt_length:]
    labels[:, prompt_length - 1:length - 1] = resp.masked_fill(~response_mask.bool(), IGNORE_INDEX)
    return labels


def trim(sequences: Tensor, attention_mask: Tensor, response_mask: Tensor, prompt_length: int):
    """Drop leading prompt columns that are padding in every row and trailing response columns that are padding in
    every row (exact: masked positions contribute nothing).  Returns (sequences, attention_mask, response_mask,
    prompt_length, kept response columns)."""
    prompt_cols = attention_mask[:, :prompt_length].any(0)
    first = int(prompt_cols.nonzero()[0]) if bool(prompt_cols.any()) else prompt_length - 1
    first = min(first, prompt_length - 1)
    resp_cols = response_mask.bool().any(0)
    t = int(resp_cols.nonzero()[-1]) + 1 if bool(resp_cols.any()) else 1
    end = prompt_length + t
    return (sequences[:, first:end], attention_mask[:, first:end], response_mask[:, :t], prompt_length - first, t)


def compute_advantages(algorithm: str, reward: Tensor, cost: Tensor | None, old_logprobs: Tensor,
                       ref_logprobs: Tensor, old_values: Tensor, mask: Tensor, *, kl_coeff: float,
                       clip_range_score: float, nu: float = 0.0):
    """Per-token rewards, advantages and returns ``[n_streams, b, T]`` (streams: reward[, cost]).

    ppo-lag: ``ops.kl_penalized_rewards(R, C, ...)`` then one ``ops.gae`` call on the stacked streams;
    ppo: reward stream only; ppo-reward-shaping: one stream on ``R - nu * C``."""
    if algorithm == "ppo-lag":
        r, c = ops.kl_penalized_rewards(reward, cost, old_logprobs, ref_logprobs, mask, kl_coeff=kl_coeff,
                                        clip_range_score=clip_range_score)
        rewards = torch.stack([r, c])
    else:
        shaped = reward - nu * cost if algorithm == "ppo-reward-shaping" else reward
        r, _ = ops.kl_penalized_rewards(shaped, torch.zeros_like(shaped), old_logprobs, ref_logprobs, mask,
                                        kl_coeff=kl_coeff, clip_range_score=clip_range_score)
        rewards = r.unsqueeze(0)
    advantages, returns = ops.gae(rewards, old_values.float(), mask, gamma=GAMMA, lam=GAE_LAMBDA)
    return rewards, advantages, returns


def _masked_mean(x: Tensor, mask: Tensor) -> float:
    return float(ops.masked_mean(x, mask))


# ================================================================================================ trainer
class PPOTrainer:
    """PPO / PPO-Lag / reward shaping, chosen by the config class (``config.algorithm``)."""

    def __init__(self, config: PPOConfig):
        self.config = cfg = config
        self.algorithm = cfg.algorithm
        distributed.init(cfg.device)
        warn_single_process_flags(cfg)
        self.device = resolve_device(cfg.device)
        apply_tf32(cfg.tf32)
        seed_everything(cfg.seed)
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
        self._fingerprint: str | None = None
        self.resume_from = resolve_resume(cfg, self.data_fingerprint)
        self._tokenizers: dict = {}  # model folder -> its tokenizer (None: it has none)
        self._load_models()
        self.lagrange = None
        if self.algorithm == "ppo-lag":
            self.lagrange = make_multiplier(cfg)
        # J_C of the last --episode_cost_window_size end costs: the multiplier's own window for PPO-Lag; reward
        # shaping keeps one to log train/episode_cost, as the reference.
        self.cost_window = self.lagrange
        if self.algorithm == "ppo-reward-shaping":
            self.cost_window = EpisodeCostWindow(cfg.episode_cost_window_size)
        self.nu = float(cfg.lambda_init) if self.algorithm == "ppo-reward-shaping" else 0.0
        self.step = 0  # rollout steps done
        self.global_step = 0  # RL (micro-batch) updates done
        self.epoch = 0  # epoch of the next rollout
        self.batch_index = 0  # index of the next rollout batch in that epoch
        self.ptx_position = 0  # rows of the PTX stream consumed
        self.ptx_steps = 0
        self._build_optimizers()
        self.timings: dict[str, float] = {}
        self.phases = PhaseRanges("ppo/")  # profiler ranges ppo/generation, ppo/scoring, ppo/actor, ...

    # ---------------------------------------------------------------------------------------------- setup
    @staticmethod
    def _check_folder(flag: str, path: str | None) -> None:
        if not path or not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
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
            from .base import split_dataset

            train, eval_ = split_dataset(train, cfg.eval_split_ratio, cfg.seed)
        return train, eval_

    def data_fingerprint(self) -> str:
        """Hash of the tokenized prompt (and PTX) rows (saved in checkpoints; a resume on other data is refused)."""
        if self._fingerprint is None:
            self._fingerprint = data_fingerprint(self.train_dataset, self.ptx_dataset)
        return self._fingerprint

    def _load(self, flag: str, path: str, head: str, trainable: bool):
        self._check_folder(flag, path)
        model = from_pretrained(path, head=head, dtype=torch.float32, attn_backend=self.config.attn_backend)
        model = model.to(self.device)
        if trainable:
            model.train()
        else:
            freeze(model)
        return maybe_shard(model, self.config, trainable)  # FSDP2 under torchrun

    def _load_models(self) -> None:
        cfg = self.config
        ckpt = self.resume_from
        self.critic_names = ["reward_critic"] + (["cost_critic"] if self.algorithm == "ppo-lag" else [])
        self._check_inputs()
        self.actor = self._load("actor_model_name_or_path",
                                os.path.join(ckpt, "actor") if ckpt else cfg.actor_model_name_or_path, "lm", True)
        if cfg.actor_gradient_checkpointing:
            self.actor.set_gradient_checkpointing(True)
        self.reference = self._load("actor_model_name_or_path", cfg.actor_model_name_or_path, "lm", False)
        self.reward_model = self._load("reward_model_name_or_path", cfg.reward_model_name_or_path, "score", False)
        self.reward_normalizer = self._normalizer(cfg.reward_model_name_or_path) if cfg.normalize_reward else None
        self.cost_model = self.cost_normalizer = None
        if cfg.uses_cost:
            self.cost_model = self._load("cost_model_name_or_path", cfg.cost_model_name_or_path, "score", False)
            self.cost_normalizer = self._normalizer(cfg.cost_model_name_or_path) if cfg.normalize_cost else None
        self.critics = []
        for name in self.critic_names:
            flag = f"{name}_model_name_or_path"
            critic = self._load(flag, os.path.join(ckpt, name) if ckpt else self._critic_init(name)[1], "score", True)
            critic.config.extra.update(score_type="critic", do_normalize=False)  # saved as the reference saves critics
            if cfg.critic_gradient_checkpointing:
                critic.set_gradient_checkpointing(True)
            self.critics.append(critic)

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
        self.cost_tokenizer = self._check_scorer("cost_model_name_or_path", "cm") if cfg.uses_cost else None
        for name in self.critic_names:
            self._check_critic_tokenizer(name)

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
        if own is not None and not _same_tokenizer(own, self.tokenizer):
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
        if tok is None or _same_tokenizer(tok, self.tokenizer):
            return None
        return tok

    def rl_steps_per_rollout(self) -> int:
        cfg = self.config
        return math.ceil(cfg.per_device_prompt_batch_size * cfg.num_return_sequences / cfg.per_device_train_batch_size)

    def rollouts_per_epoch(self) -> int:
        return math.ceil(distributed.rows_per_rank(len(self.train_dataset)) / self.config.per_device_prompt_batch_size)

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

    def total_steps(self) -> int:
        return self.rollouts_per_epoch() * self.config.epochs

    def _build_optimizers(self) -> None:
        cfg = self.config
        total = self.optimizer_updates()
        betas = tuple(cfg.adam_betas)

        def make(model, lr, wd, kind, warmup_ratio):
            # Fused AdamW (one pass per tensor; on CPU 4x faster than the per-op loop, same formula up to rounding).
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

    def autocast(self):
        import contextlib

        cfg = self.config
        if cfg.bf16 or cfg.fp16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16 if cfg.bf16 else torch.float16)
        return contextlib.nullcontext()

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
                            seed=seed)

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
        t0 = time.perf_counter()
        self.phases.to("generation")
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        if cfg.num_return_sequences > 1:
            ids = ids.repeat_interleave(cfg.num_return_sequences, 0)
            mask = mask.repeat_interleave(cfg.num_return_sequences, 0)
        gen = self._generate(ids, mask, seed)
        t1 = time.perf_counter()
        self.phases.to("scoring")
        self.timings["generation"] = t1 - t0
        self.timings["generated_tokens"] = float(gen.response_mask.sum())
        out = self.score_rollout(gen)
        self.timings["scoring"] = time.perf_counter() - t1
        self.phases.to(None)
        return out

    @torch.no_grad()
    def score_rollout(self, gen) -> list[Rollout]:
        """Score generated sequences (``engine.GenerateOutput``), split them into micro-batches and observe the end
        costs in the Lagrange window."""
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
            with self.autocast():
                ref_lp = self.reference.token_logprobs(seq, am, labels=labels)
            mb = Rollout(seq, am, rmf, p, labels, ref_logprobs=None, reward=None, cost=None)
            mb.ref_logprobs = mb.response_slice(ref_lp).float() * rmf
            mb.reward = self.end_scores(self.reward_model, self.reward_normalizer, self.reward_tokenizer, seq, am)
            if self.cost_model is not None:
                mb.cost = self.end_scores(self.cost_model, self.cost_normalizer, self.cost_tokenizer, seq, am)
            self._guard(mb.reward, "reward-model end scores")
            if mb.cost is not None:
                self._guard(mb.cost, "cost-model end scores")
            fused = k == 0 and not cfg.separate_scoring
            if not fused:
                # The weights move after the first micro-batch's update: take the old quantities now.
                if cfg.temperature == 1.0 and not cfg.separate_scoring:
                    mb.old_logprobs = gen.logprobs[sl][:, :t].float() * rmf
                else:
                    with self.autocast():
                        lp = self.actor.token_logprobs(seq, am, labels=labels)
                    mb.old_logprobs = mb.response_slice(lp).float() * rmf
                mb.old_values = torch.stack([self._critic_values(c, mb) for c in self.critics])
            out.append(mb)
        if self.cost_window is not None:
            for mb in out:
                self.cost_window.observe(mb.cost)
        return out

    # ---------------------------------------------------------------------------------------------- updates
    def _guard(self, x: Tensor, what: str) -> None:
        check_finite(x, what, f"rollout step {self.step + 1} (RL step {self.global_step + 1})", self.config.output_dir,
                     "Lower --actor_lr / --critic_lr, check the reward and cost models, or resume from the checkpoint.")

    def _actor_logprobs(self, mb: Rollout) -> Tensor:
        with self.autocast():
            lp = self.actor.token_logprobs(mb.input_ids, mb.attention_mask, labels=mb.labels)
        return mb.response_slice(lp).float()

    def _critic_values(self, critic, mb: Rollout) -> Tensor:
        """Values of the response positions ``[b, T]`` (our score models compute only those rows in their last
        layer; transformers-backed ones the full forward)."""
        columns = getattr(critic, "score_columns", None)
        with self.autocast():
            if columns is not None:
                return columns(mb.input_ids, mb.attention_mask, mb.prompt_length - 1, mb.response_length).float()
            return mb.response_slice(critic(mb.input_ids, mb.attention_mask).scores).float()

    def rl_step(self, mb: Rollout, boundary: bool = True) -> dict:
        """One PPO update (actor + critics) on a micro-batch; returns the spec's metrics.

        With ``--gradient_accumulation_steps G`` the losses are scaled by ``1 / G`` (as DeepSpeed's engine does) and
        the optimizers step only at a ``boundary``: every G-th RL micro-batch of a rollout and its last one."""
        cfg = self.config
        timings = self.timings
        mask = mb.response_mask
        # 1. Lagrange multiplier: once per RL step, before the actor loss (the reference's order).
        episode_cost = None
        if self.lagrange is not None:
            self.phases.to("lagrange")
            episode_cost = self.lagrange.episode_cost()
            self.lagrange.update(self.global_step)
            if not math.isfinite(self.lagrange.value):
                self._guard(torch.tensor(self.lagrange.value), "Lagrange multiplier (lambda overflowed: J_C stayed "
                            f"above the threshold, mean {episode_cost:.4g}; set --lambda_max, e.g. 5.0 as the "
                            "reference's script, or lower --lambda_lr)")
        # 2. Forwards with gradient.
        t0 = time.perf_counter()
        self.phases.to("actor")
        self.actor.train()
        logp = self._actor_logprobs(mb)
        t1 = time.perf_counter()
        self.phases.to("critics")
        values = [self._critic_values(c, mb) for c in self.critics]
        t2 = time.perf_counter()
        self.phases.to("gae")
        timings["actor"] = timings.get("actor", 0.0) + t1 - t0
        timings["critics"] = timings.get("critics", 0.0) + t2 - t1
        # 3. Old quantities (fused first pass) and advantages, once per micro-batch.
        if mb.advantages is None:
            if mb.old_logprobs is None:
                mb.old_logprobs = logp.detach() * mask
            if mb.old_values is None:
                mb.old_values = torch.stack([v.detach() for v in values])
            mb.rewards, mb.advantages, mb.returns = compute_advantages(
                self.algorithm, mb.reward, mb.cost, mb.old_logprobs, mb.ref_logprobs, mb.old_values, mask,
                kl_coeff=cfg.kl_coeff, clip_range_score=cfg.clip_range_score, nu=self.nu)
            self._guard(mb.rewards, "per-token rewards / costs")
        t3 = time.perf_counter()
        self.phases.to("losses")
        timings["gae"] = timings.get("gae", 0.0) + t3 - t2
        # 4. Losses.
        multiplier = self.lagrange.value if self.lagrange is not None else None
        if self.algorithm == "ppo-lag":
            actor_loss = ops.ppo_lag_actor_loss(logp, mb.old_logprobs, mb.advantages[0], mb.advantages[1], mask,
                                                multiplier=multiplier, clip_range=cfg.clip_range_ratio)
        else:
            actor_loss = ops.ppo_actor_loss(logp, mb.old_logprobs, mb.advantages[0], mask,
                                            clip_range=cfg.clip_range_ratio)
        critic_losses = [ops.critic_loss(v, mb.old_values[i], mb.returns[i], mask, clip_range=cfg.clip_range_value)
                         for i, v in enumerate(values)]
        self._guard(actor_loss.detach(), "actor loss")
        for name, loss in zip(self.critic_names, critic_losses):
            self._guard(loss.detach(), f"{name} loss")
        # 5. Backward, clip, check, then step (no model moves unless every gradient is finite).
        accum = cfg.gradient_accumulation_steps
        t4 = time.perf_counter()
        self.phases.to("actor")
        (actor_loss / accum if accum > 1 else actor_loss).backward()
        t5 = time.perf_counter()
        self.phases.to("critics")
        (sum(critic_losses) / accum if accum > 1 else sum(critic_losses)).backward()
        t6 = time.perf_counter()
        timings["actor"] += t5 - t4
        timings["critics"] += t6 - t5
        if boundary:
            self._apply_updates(timings)
        self.phases.to(None)
        # The learning rates after the schedulers' step, as the reference logs them.
        return distributed.reduce_metrics(self._metrics(mb, values, actor_loss, critic_losses, episode_cost,
                                                        self._lrs()))

    def _apply_updates(self, timings: dict) -> None:
        """Clip, check, then step the actor and the critics (no model moves unless every gradient is finite); the
        time of each model's share goes to its phase."""
        max_norm = self.config.max_grad_norm
        t0 = time.perf_counter()
        self.phases.to("actor")
        actor_norm = clip_gradients(self.actor.parameters(), max_norm)
        t1 = time.perf_counter()
        self.phases.to("critics")
        critic_norms = [clip_gradients(c.parameters(), max_norm) for c in self.critics]
        t2 = time.perf_counter()
        self.phases.to("actor")
        try:
            self._guard(actor_norm, "actor gradient")
            for name, norm in zip(self.critic_names, critic_norms):
                self._guard(norm, f"{name} gradient")
        except NonFiniteError:
            self._zero_grads()
            raise
        self.actor_optimizer.step()
        self.actor_scheduler.step()
        self.actor_optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        self.phases.to("critics")
        for opt, sched in zip(self.critic_optimizers, self.critic_schedulers):
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        timings["actor"] += (t1 - t0) + (t3 - t2)
        timings["critics"] += (t2 - t1) + (t4 - t3)

    def _lrs(self) -> dict:
        lrs = {"actor_lr": self.actor_optimizer.param_groups[0]["lr"]}
        lrs.update({f"{name}_lr": opt.param_groups[0]["lr"] for name, opt in zip(self.critic_names,
                                                                                  self.critic_optimizers)})
        return lrs

    def _zero_grads(self) -> None:
        self.actor_optimizer.zero_grad(set_to_none=True)
        for opt in self.critic_optimizers:
            opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def _metrics(self, mb: Rollout, values, actor_loss, critic_losses, episode_cost, lrs) -> dict:
        mask = mb.response_mask
        lengths = mask.sum(-1)
        kl = ((mb.old_logprobs - mb.ref_logprobs) * mask).sum(-1).mean()
        m = {
            "train/actor_loss": float(actor_loss),
            "train/reward_critic_loss": float(critic_losses[0]),
        }
        if self.algorithm == "ppo-lag":
            m["train/cost_critic_loss"] = float(critic_losses[1])
            m["train/lambda"] = self.lagrange.value
            m["train/episode_cost"] = episode_cost
        elif self.algorithm == "ppo-reward-shaping":
            m["train/episode_cost"] = self.cost_window.episode_cost()
        m["train/reward"] = float(mb.reward.mean())
        if mb.cost is not None:
            m["train/cost"] = float(mb.cost.mean())
        # The reward stream's name: reward shaping trains on R - nu * C, logged as the reference names it.
        stream = "reward"
        if self.algorithm == "ppo-reward-shaping":
            stream = "shaped_reward"
            m["train/shaped_reward"] = float((mb.reward - self.nu * mb.cost).mean())
        m.update({
            f"train/{stream}_with_kl_penalty": float((mb.rewards[0] * mask).sum(-1).mean()),
            f"train/{stream}_advantage": _masked_mean(mb.advantages[0], mask),
            f"train/{stream}_return": _masked_mean(mb.returns[0], mask),
            f"train/{stream}_value": _masked_mean(values[0].detach(), mask),
        })
        if self.algorithm == "ppo-lag":
            m.update({
                "train/cost_with_kl_penalty": float((mb.rewards[1] * mask).sum(-1).mean()),
                "train/cost_advantage": _masked_mean(mb.advantages[1], mask),
                "train/cost_return": _masked_mean(mb.returns[1], mask),
                "train/cost_value": _masked_mean(values[1].detach(), mask),
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
        t0 = time.perf_counter()
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
            self._zero_grads()
            raise
        self.actor_optimizer.step()
        self.actor_scheduler.step()
        self.actor_optimizer.zero_grad(set_to_none=True)
        self.ptx_steps += 1
        self.timings["ptx"] = self.timings.get("ptx", 0.0) + time.perf_counter() - t0
        return distributed.reduce_metrics({"train/ptx_loss": float(loss.detach())})

    # ---------------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict:
        """eval/reward and eval/cost: mean end scores of responses sampled (fixed seed) on the eval prompts."""
        ds = self.eval_dataset
        collate = _collator_of(ds)
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

    # ---------------------------------------------------------------------------------------------- checkpoints
    def _save_models(self, path: str, with_critics: bool = True, dtype: torch.dtype | None = None) -> None:
        self.actor.save_pretrained(path, dtype=dtype)  # sharded: every rank gathers, rank 0 writes
        if distributed.is_main():
            self.tokenizer.save_pretrained(path)
        if with_critics:
            for name, critic in zip(self.critic_names, self.critics):
                critic.save_pretrained(os.path.join(path, name), dtype=dtype)

    def _sharded_items(self) -> dict:
        items = {"actor": (self.actor, self.actor_optimizer)}
        items.update({name: (c, o) for name, c, o in zip(self.critic_names, self.critics, self.critic_optimizers)})
        return items

    def state_dict(self) -> dict:
        """Everything but the weights.  Under torchrun (a collective: every rank calls it) the optimizer states are
        left to the DCP shards, and the Lagrange windows of every rank are kept (``lagrange_ranks``)."""
        sharded = distributed.is_distributed()
        extra = {}
        if sharded:
            extra["world_size"] = distributed.world_size()
            if self.lagrange is not None:
                extra["lagrange_ranks"] = distributed.all_gather_object(list(self.lagrange.episode_costs))
        return {
            **extra,
            "actor_optimizer": None if sharded else self.actor_optimizer.state_dict(),
            "actor_scheduler": self.actor_scheduler.state_dict(),
            "critic_optimizers": [None if sharded else o.state_dict() for o in self.critic_optimizers],
            "critic_schedulers": [s.state_dict() for s in self.critic_schedulers],
            "lagrange": self.lagrange.state_dict() if self.lagrange is not None else None,
            "counters": {"step": self.step, "global_step": self.global_step, "epoch": self.epoch,
                         "batch_index": self.batch_index, "ptx_position": self.ptx_position,
                         "ptx_steps": self.ptx_steps},
            "rng": rng_state(),
            "config": dataclasses.asdict(self.config),
            "algorithm": self.algorithm,
        }

    def save_checkpoint(self) -> str:
        """``OUTPUT_DIR/checkpoint-<step>/``: actor/, reward_critic/ [, cost_critic/], trainer_state.pt; written to a
        temporary folder and renamed into place, so a kill leaves either the old or the new checkpoint."""
        cfg = self.config
        main = distributed.is_main()
        with staged_checkpoint(cfg.output_dir, self.step) as tmp:
            self._write_checkpoint(tmp, main)
        if main:
            self._prune_checkpoints()
        distributed.barrier()
        return os.path.join(cfg.output_dir, f"checkpoint-{self.step}")

    def _write_checkpoint(self, tmp: str, main: bool) -> None:
        self.actor.save_pretrained(os.path.join(tmp, "actor"))  # consolidated Hugging Face export (rank 0 writes)
        if main:
            self.tokenizer.save_pretrained(os.path.join(tmp, "actor"))
        for name, critic in zip(self.critic_names, self.critics):
            critic.save_pretrained(os.path.join(tmp, name))
        if distributed.is_distributed():  # model + optimizer shards (DCP): resumable on any number of processes
            distributed.save_sharded(os.path.join(tmp, distributed.SHARDED_DIR), self._sharded_items())
        state = self.state_dict()
        fingerprint = self.data_fingerprint()
        if main:
            torch.save(state, os.path.join(tmp, STATE_FILE))
            with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
                json.dump({"step": self.step, "global_step": self.global_step, "total_steps": self.total_steps(),
                           "lambda": self.lagrange.value if self.lagrange is not None else None}, f, indent=2)
            write_run_info(tmp, self.config, fingerprint)

    def _prune_checkpoints(self) -> None:
        prune_checkpoints(self.config.output_dir, self.config.save_total_limit)

    def load_checkpoint(self, path: str) -> None:
        blob = load_state(path)
        if blob.get("algorithm", self.algorithm) != self.algorithm:
            raise ConfigError(f"--resume {path}: a {blob['algorithm']} checkpoint, not {self.algorithm}")
        shards = os.path.join(path, distributed.SHARDED_DIR)
        if os.path.isdir(shards):  # saved under torchrun: DCP reshards to this world size (one process included)
            distributed.load_sharded(shards, self._sharded_items())
        elif distributed.is_sharded(self.actor):  # a single-process checkpoint resumed under torchrun
            distributed.load_full_optimizer_state(self.actor, self.actor_optimizer, blob["actor_optimizer"])
            for critic, opt, state in zip(self.critics, self.critic_optimizers, blob["critic_optimizers"]):
                distributed.load_full_optimizer_state(critic, opt, state)
        else:
            self.actor_optimizer.load_state_dict(blob["actor_optimizer"])
            for opt, state in zip(self.critic_optimizers, blob["critic_optimizers"]):
                opt.load_state_dict(state)
        self.actor_scheduler.load_state_dict(blob["actor_scheduler"])
        for sched, state in zip(self.critic_schedulers, blob["critic_schedulers"]):
            sched.load_state_dict(state)
        if self.lagrange is not None:
            self.lagrange.load_state_dict(blob["lagrange"])
            if "lagrange_ranks" in blob:  # the windows of the saving ranks, redistributed over this run's ranks
                self.lagrange.episode_costs.clear()
                self.lagrange.episode_costs.extend(
                    redistribute_windows(blob["lagrange_ranks"], distributed.rank(), distributed.world_size()))
        saved_global = blob["config"]["per_device_prompt_batch_size"] * blob.get("world_size", 1)
        if saved_global != self.config.per_device_prompt_batch_size * distributed.world_size():
            distributed.print0(f"warning: --resume {path}: the global prompt batch changed ({saved_global} -> "
                               f"{self.config.per_device_prompt_batch_size * distributed.world_size()}); the data "
                               "position is counted in batches, so the rest of the epoch is not the same rows")
        c = blob["counters"]
        self.step, self.global_step, self.epoch = c["step"], c["global_step"], c["epoch"]
        self.batch_index, self.ptx_position, self.ptx_steps = c["batch_index"], c["ptx_position"], c["ptx_steps"]
        set_rng_state(blob["rng"])

    # ---------------------------------------------------------------------------------------------- loop
    def _log_eval(self, logger: MetricsLogger) -> dict:
        if not self.config.need_eval or self.eval_dataset is None:
            return {}
        metrics = self.evaluate()
        logger.log(metrics, self.global_step)
        distributed.print0(f"eval @ step {self.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    def train_one_rollout(self, batch: dict, logger: MetricsLogger | None = None) -> list[dict]:
        """Rollout + ``update_iters`` passes of RL steps (+ PTX).  Returns the logged rows."""
        cfg = self.config
        self.timings = {}
        t0 = time.perf_counter()
        micro = self.rollout(batch, self._rollout_seed(self.epoch, self.batch_index))
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
        total = time.perf_counter() - t0
        t = self.timings
        perf = {f"time/{k}": t.get(k, 0.0) for k in ("generation", "scoring", "gae", "actor", "critics")}
        if self.ptx_dataset is not None:
            perf["time/ptx"] = t.get("ptx", 0.0)
        perf["time/step"] = total
        perf["perf/generated_tokens"] = t.get("generated_tokens", 0.0)
        perf["perf/tokens_per_s"] = t.get("generated_tokens", 0.0) / max(total, 1e-9)
        perf["perf/generation_tokens_per_s"] = t.get("generated_tokens", 0.0) / max(t.get("generation", 0.0), 1e-9)
        rows[-1].update(distributed.reduce_metrics(perf))  # time/ averaged over ranks, perf/ summed
        if logger is not None:
            for i, row in enumerate(rows):
                logger.log(row, self.global_step - len(rows) + 1 + i)
        return rows

    def train(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.config
        main = distributed.is_main()
        if self.resume_from:
            self.load_checkpoint(self.resume_from)
            distributed.print0(f"resuming from {self.resume_from} (rollout step {self.step} of {self.total_steps()})")
        logger = open_run_logger(cfg, self.global_step if self.resume_from else None)
        total = self.total_steps()
        n_batches = self.rollouts_per_epoch()
        size = cfg.per_device_prompt_batch_size
        collate = _collator_of(self.train_dataset)
        last_eval: dict = {}
        history = []
        signals = StopSignals()
        try:
            signals.install()
            if self.step == 0 and not self.resume_from:
                last_eval = self._log_eval(logger)
            bar = tqdm(total=total, initial=self.step, desc=cfg.command, disable=not cfg.progress or not main,
                       dynamic_ncols=True)
            t0 = time.perf_counter()
            stopped = False
            for epoch in range(self.epoch, cfg.epochs):
                order = rank_epoch_order(len(self.train_dataset), cfg.seed, epoch)
                start = self.batch_index if epoch == self.epoch else 0
                self.epoch = epoch
                for bi in range(start, n_batches):
                    self.batch_index = bi
                    idx = order[bi * size:(bi + 1) * size]
                    batch = collate([self.train_dataset[i] for i in idx])
                    rows = self.train_one_rollout(batch, logger)
                    self.step += 1
                    self.batch_index = bi + 1
                    if bi + 1 == n_batches:
                        self.epoch, self.batch_index = epoch + 1, 0
                    history.append(rows[-1])
                    bar.update(1)
                    post = {"reward": rows[-1]["train/reward"]}
                    if "train/cost" in rows[-1]:
                        post["cost"] = rows[-1]["train/cost"]
                    if self.lagrange is not None:
                        post["lambda"] = self.lagrange.value
                    bar.set_postfix({k: f"{v:.3f}" for k, v in post.items()})
                    if cfg.need_eval and cfg.eval_strategy == "steps" and self.step % cfg.eval_interval == 0:
                        last_eval = self._log_eval(logger)
                    stop_if_signalled(signals, self.step, total, self.save_checkpoint)
                    if checkpoint_or_stop(cfg, self.step, total, self.save_checkpoint):
                        stopped = True
                        break
                if stopped:
                    break
                if cfg.need_eval and cfg.eval_strategy == "epoch":
                    last_eval = self._log_eval(logger)
                if epoch + 1 < cfg.epochs:
                    self.save_checkpoint()
            signals.restore()
            bar.close()
            elapsed = time.perf_counter() - t0
            if stopped:
                distributed.print0(f"stopped after rollout step {self.step} of {total} (--max_steps); continue "
                                   "with --resume")
                return {"stopped_at": self.step, **last_eval}
            tmp = os.path.join(cfg.output_dir, ".final.tmp")
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            distributed.barrier()
            self._save_models(tmp, dtype=final_dtype(cfg))
            if main:
                for name in self.critic_names:  # replace whole critic folders
                    shutil.rmtree(os.path.join(cfg.output_dir, name), ignore_errors=True)
                replace_dir_contents(tmp, cfg.output_dir)
            summary = {"steps": self.step, "rl_steps": self.global_step, "train_seconds": round(elapsed, 2)}
            if self.lagrange is not None:
                summary["lambda"] = self.lagrange.value
            summary.update(last_eval)
            if main:
                with open(os.path.join(cfg.output_dir, "results.json"), "w", encoding="utf-8") as f:
                    json.dump(summary, f, indent=2)
            distributed.barrier()
            distributed.print0(f"actor saved to {cfg.output_dir} ({self.step} rollouts, {self.global_step} RL "
                               f"steps, {elapsed:.1f} s)")
            return summary
        finally:
            signals.restore()
            logger.close()


# ================================================================================================ helpers
def redistribute_windows(windows: list[list[float]], rank: int, world_size: int) -> list[float]:
    """The Lagrange window of ``rank`` of ``world_size`` from the windows saved by the ranks of another run: the same
    window when the world size is unchanged, else the saved windows interleaved (oldest first) and dealt out
    ``rank::world_size``, so the mean over ranks of the window means is kept when the windows have equal lengths."""
    if len(windows) == world_size:
        return list(windows[rank])
    longest = max((len(w) for w in windows), default=0)
    merged = [w[i] for i in range(longest) for w in windows if i < len(w)]
    return merged[rank::world_size]


def _collator_of(dataset):
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset.collator()


def _same_tokenizer(a, b) -> bool:
    """The reference's ``is_same_tokenizer``: same vocabulary and special tokens."""
    if a is b:
        return True
    try:
        return (a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id
                and a.pad_token_id == b.pad_token_id and a.bos_token_id == b.bos_token_id)
    except Exception:  # noqa: BLE001 - exotic tokenizers: treat as different, re-tokenising is always correct
        return False


def retokenize(sequences: Tensor, attention_mask: Tensor, src_tokenizer, dest_tokenizer, max_length: int):
    """The reference's ``batch_retokenize``: decode each row (special tokens skipped), append the destination
    tokenizer's eos, tokenize, pad (right).  Returns (input_ids, attention_mask) on the CPU."""
    texts = []
    for row, m in zip(sequences.cpu(), attention_mask.cpu().bool()):
        texts.append(src_tokenizer.decode(row[m].tolist(), skip_special_tokens=True) + dest_tokenizer.eos_token)
    enc = dest_tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"].bool()


def run(config: PPOConfig) -> dict:
    return PPOTrainer(config).train()
