"""One dataclass per command, filled from flags or a YAML file (``--config FILE.yaml``; flags given on the command
line win over the file, the file wins over the defaults).  The command-line flags are generated from the
dataclass fields, so the flag names are the field names: the reference implementation's names."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ..distributed import launched
from ..models.attention import BACKENDS as ATTN_BACKENDS
from ..models.checkpoint import MODEL_BACKENDS
from ..options import (  # noqa: F401 - re-exported for the trainers
    ConfigError,
    add_config_arguments,
    check_choices,
    check_finite_numbers,
    config_from_args,
    float_options,
    load_yaml,
    option,
)

# The reference's --lr_scheduler_type choices (transformers' get_scheduler with its default arguments).
LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]


OVERWRITE_HELP = ("replace the outputs of a previous run in a non-empty OUTPUT_DIR (only what a run writes: "
                  "checkpoints, model files, metrics; other files are kept)")
ALLOW_CHANGES_HELP = ("--resume: settings that may differ from the checkpoint's (e.g. epochs,lr); data, seed, batch "
                      "sizes and the trained model never may")


MODEL, DATA, TRAINING, DEVICES, OUTPUT = "model", "data", "training", "precision and devices", "output and checkpoints"


@dataclass
class RunConfig:
    """Options every training command shares, declared once (defaults: the reference implementation's).  A "step"
    is an optimizer step for SFT / RM / CM / DPO and a rollout step for the PPO family (``STEPS``)."""

    STEPS = "optimizer steps"

    max_length: int = option(512, "maximum sequence length in tokens (PPO: prompt + response); longer ones are "
                                  "truncated", group=DATA)
    trust_remote_code: bool = option(False, "accepted for compatibility (no remote code is ever run)", group=MODEL)
    chat_template: str = option("reference", "prompt template: 'reference' (BEGINNING OF CONVERSATION: USER: ... "
                                             "ASSISTANT:) or 'tokenizer' (the tokenizer's own chat template, e.g. "
                                             "ChatML)", choices=["reference", "tokenizer"], group=DATA)
    train_datasets: list[str] = option([], "NAME[:PROPORTION[:PATH]] ... (PPO: prompt datasets)", required=True,
                                       group=DATA)
    eval_datasets: list[str] | None = option(None, "NAME[:PROPORTION[:PATH]] ... evaluated during training",
                                             group=DATA)
    eval_split_ratio: float | None = option(None, "hold out this fraction of the training rows for evaluation",
                                            group=DATA)
    need_eval: bool = option(False, "evaluate during training (implied by --eval_datasets / --eval_split_ratio)",
                             group=DATA)
    eval_strategy: str = option("epoch", "when to evaluate", choices=["epoch", "steps"], group=DATA)
    eval_interval: int = option(1000000, "evaluate every N {steps} (--eval_strategy steps)", group=DATA)
    epochs: int = option(1, "passes over the training data", group=TRAINING)
    per_device_train_batch_size: int = option(16, "micro-batch size (sequences per forward / backward)",
                                              group=TRAINING)
    per_device_eval_batch_size: int = option(16, "evaluation batch size", group=TRAINING)
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step (losses averaged over them)",
                                              group=TRAINING)
    adam_betas: list[float] = option([0.9, 0.95], "AdamW betas", group=TRAINING)
    max_grad_norm: float = option(1.0, "gradient clipping (global norm, per trained model; 0: off)", group=TRAINING)
    seed: int = option(42, "random seed (data order, initialisation, sampling)", group=TRAINING)
    fp16: bool = option(False, "fp16 autocast", group=DEVICES)
    bf16: bool = option(False, "bf16 mixed precision (docs/precision.md): bf16 products with fp32 accumulation, fp32 "
                               "master weights, optimizer state, norms, log-probs and losses; frozen weights (frozen "
                               "models, LoRA bases) held in bf16", group=DEVICES)
    tf32: bool | None = option(None, "allow TF32 matmuls on CUDA", group=DEVICES)
    device: str = option("auto", "cpu, cuda, cuda:N or auto", group=DEVICES)
    backend: str = option("auto", "model implementation: native (our decoder: Llama, Mistral, Qwen2 / 3, SmolLM, "
                                  "Gemma 2 / 3), hf (transformers' own classes, any causal LM) or auto (native when "
                                  "the architecture is ours, else hf)", choices=list(MODEL_BACKENDS), group=DEVICES)
    attn_backend: str | None = option(None, "attention backend of the models (default: the model's choice)",
                                      choices=list(ATTN_BACKENDS), group=DEVICES)
    mixed_precision: str | None = option(None, "mixed precision in this dtype: under torchrun FSDP2's (parameters "
                                               "gathered and computed in this dtype, gradients reduced in fp32); "
                                               "in a single process the same as --bf16 / --fp16",
                                         choices=["bf16", "fp16"], group=DEVICES)
    offload: str = option("none", "under torchrun on GPUs: FSDP2 CPU offload of the trained models' sharded "
                                  "parameters, gradients and optimizer state (FSDP2 offloads them together: every "
                                  "choice but 'none' is the same)", choices=["none", "parameter", "optimizer", "all"],
                          group=DEVICES)
    shard_frozen: bool = option(True, "under torchrun: shard the frozen models (reference, reward, cost) with FSDP2 "
                                      "too (False: a full replica on every rank)", group=DEVICES)
    lora_rank: int = option(0, "LoRA rank r of the trained model(s): frozen base weights plus rank-r adapters on "
                               "--lora_target_modules (0: full fine-tuning; PPO family: the default of "
                               "--actor_lora_rank / --critic_lora_rank)", group=TRAINING)
    lora_alpha: float = option(16.0, "LoRA scale numerator: the adapted projection is W x + (alpha / r) B A x",
                               group=TRAINING)
    lora_dropout: float = option(0.0, "dropout on the adapters' input while training", group=TRAINING)
    lora_target_modules: list[str] = option(["all-linear"], "layers that get adapters: all-linear (native "
                                                            "decoder: q_proj, k_proj, v_proj, o_proj, gate_proj, "
                                                            "up_proj, down_proj; a transformers model: every Linear / "
                                                            "Conv1D but the lm_head) or layer names (PEFT's Llama "
                                                            "default: q_proj v_proj; GPT-2: c_attn c_proj c_fc)",
                                            group=TRAINING)
    merge_lora: bool = option(False, "LoRA: save the final model(s) with the adapters merged into the weights (a "
                                     "plain checkpoint) instead of PEFT adapter folders (checkpoint-N/ always holds "
                                     "adapters)", group=OUTPUT)
    output_dir: str | None = option(None, "where the final model(s), checkpoints and metrics go", required=True,
                                    group=OUTPUT)
    save_16bit: bool = option(False, "save the final model(s) in 16 bits (bf16 with --bf16, else fp16); checkpoints "
                                     "stay fp32", group=OUTPUT)
    overwrite_output_dir: bool = option(False, OVERWRITE_HELP, group=OUTPUT)
    log_type: str = option("none", "extra metrics sink besides metrics.jsonl", choices=["none", "tensorboard", "wandb"],
                           group=OUTPUT)
    log_dir: str | None = option(None, "TensorBoard / W&B directory (default: OUTPUT_DIR/logs)", group=OUTPUT)
    log_project: str | None = option(None, "W&B project", group=OUTPUT)
    log_run_name: str | None = option(None, "W&B run name", group=OUTPUT)
    save_interval: int = option(0, "also checkpoint every N {steps} (0: only at the end of each epoch)", group=OUTPUT)
    save_total_limit: int = option(2, "checkpoints kept (oldest removed)", group=OUTPUT)
    resume: str | None = option(None, "continue from a checkpoint folder, or 'auto': the latest in OUTPUT_DIR",
                                nargs="?", const="auto", group=OUTPUT)
    resume_allow_changes: list[str] | None = option(None, ALLOW_CHANGES_HELP, group=OUTPUT)
    max_steps: int | None = option(None, "stop after this many {steps} (a checkpoint is written); the schedule still "
                                         "spans all epochs, so --resume finishes the same run", group=OUTPUT)
    progress: bool = option(True, "show progress bars", group=OUTPUT)

    @property
    def command(self) -> str:
        return "train"

    def validate(self) -> None:
        """The checks every command shares (one line each, exit status 2); commands add their own."""
        missing = [f.name for f in dataclasses.fields(self) if f.metadata.get("required") and not getattr(self, f.name)]
        if missing:
            raise ConfigError("missing required option(s): " + ", ".join("--" + m for m in missing))
        check_common(self)
        for name in ("epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_split_ratio is not None and not 0.0 < self.eval_split_ratio < 1.0:
            raise ConfigError(f"--eval_split_ratio must be in (0, 1), got {self.eval_split_ratio}")
        if self.mixed_precision and not launched():  # a single process: the autocast flag of that dtype
            setattr(self, self.mixed_precision, True)
        if self.fp16 and self.bf16:
            raise ConfigError("--fp16 and --bf16 are exclusive" + (
                f" (--mixed_precision {self.mixed_precision} means --{self.mixed_precision} in a single process)"
                if self.mixed_precision else ""))
        if len(self.adam_betas) != 2:
            raise ConfigError(f"--adam_betas takes two numbers, got {self.adam_betas}")
        if self.eval_datasets or self.eval_split_ratio:
            self.need_eval = True
        self.check_lora()

    def lora_ranks(self) -> dict[str, int]:
        """The LoRA rank of each trained role (0: trained in full)."""
        return {"model": self.lora_rank}

    def check_lora(self) -> None:
        from ..models.lora import target_names

        for role, rank in self.lora_ranks().items():
            if rank < 0:
                flag = "lora_rank" if role == "model" else f"{role}_lora_rank"
                raise ConfigError(f"--{flag} must be >= 0, got {rank}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"--lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        try:
            target_names(self.lora_target_modules)  # which layers they name: checked on the loaded model
        except ValueError as err:
            raise ConfigError(f"--lora_target_modules: {err}") from None

    def lora_spec(self, role: str = "model"):
        """The adapters of ``role`` (``model``; PPO: ``actor`` / ``critic``), None when it trains in full."""
        from ..models.lora import LoraSpec, target_names

        rank = self.lora_ranks()[role]
        if not rank:
            return None
        return LoraSpec(rank, float(self.lora_alpha), float(self.lora_dropout),
                        target_names(self.lora_target_modules))


@dataclass
class TrainConfig(RunConfig):
    """SFT, RM / CM and DPO: one trained model on supervised batches."""

    model_name_or_path: str | None = option(None, "model folder (Hugging Face format) to start from", required=True,
                                            group=MODEL)
    tokenizer_name_or_path: str | None = option(None, "tokenizer folder (default: the model folder)", group=MODEL)
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory", group=TRAINING)
    lr: float = option(2e-5, "peak learning rate", aliases=("learning_rate",), group=TRAINING)
    lr_scheduler_type: str = option("cosine", "learning-rate schedule", choices=LR_SCHEDULERS, group=TRAINING)
    lr_warmup_ratio: float = option(0.0, "fraction of the optimizer steps spent warming up linearly", group=TRAINING)
    weight_decay: float = option(0.0, "AdamW weight decay (not on biases and layer-norm weights)", group=TRAINING)
    logging_steps: int = option(1, "write train metrics every N optimizer steps", group=OUTPUT)

    def validate(self) -> None:
        super().validate()
        if self.logging_steps < 1:
            raise ConfigError(f"--logging_steps must be >= 1, got {self.logging_steps}")
        if not 0.0 <= self.lr_warmup_ratio <= 1.0:
            raise ConfigError(f"--lr_warmup_ratio must be in [0, 1], got {self.lr_warmup_ratio}")


GENERATION, ALGORITHM = "generation", "algorithm"


@dataclass
class PPOConfig(RunConfig):
    """``saferlhf-fast ppo`` (reward only), and the options the whole PPO family shares.  Flag names and defaults:
    the reference implementation's argparse.  The algorithms' own options: ``trainers.algorithms``."""

    STEPS = "rollout steps"

    actor_model_name_or_path: str | None = option(None, "the initial policy (also the frozen reference)",
                                                  required=True, group=MODEL)
    reward_model_name_or_path: str | None = option(None, "reward model folder (saferlhf-fast rm)", required=True,
                                                   group=MODEL)
    reward_critic_model_name_or_path: str | None = option(None, "reward critic initialisation (default: the reward "
                                                                "model; a plain LM gets a fresh score head)",
                                                          group=MODEL)
    ptx_datasets: list[str] | None = option(None, "instruction datasets for the PTX (SFT) loss after each RL step",
                                            group=DATA)
    max_new_tokens: int | None = option(None, "cap on generated tokens (default: max_length - prompt length)",
                                        group=GENERATION)
    temperature: float = option(1.0, "sampling temperature", group=GENERATION)
    top_p: float = option(1.0, "nucleus sampling", group=GENERATION)
    top_k: int = option(50, "top-k sampling (0: off). The reference sets no top_k in its GenerationConfig and so "
                            "samples with transformers' default of 50", group=GENERATION)
    num_return_sequences: int = option(1, "responses sampled per prompt", group=GENERATION)
    repetition_penalty: float = option(1.0, "repetition penalty", group=GENERATION)
    lora_generation: str = option("auto", "a LoRA actor's adapters during the rollout: merged (one merged copy of "
                                          "the adapted weights while it generates), on-the-fly (no copy), auto: "
                                          "generate's measured default (merged except the compiled CPU step's "
                                          "prefill; docs/rl.md)", choices=["auto", "merged", "on-the-fly"],
                                  group=GENERATION)
    normalize_reward: bool = option(False, "normalize the reward model's scores with the statistics it was trained "
                                           "with (its normalizer); off: raw scores, as the reference",
                                    group=ALGORITHM)
    kl_coeff: float = option(0.02, "KL penalty coefficient beta", group=ALGORITHM)
    clip_range_ratio: float = option(0.2, "PPO ratio clip epsilon", group=ALGORITHM)
    clip_range_score: float = option(50.0, "clip of the per-token rewards / costs", group=ALGORITHM)
    clip_range_value: float = option(5.0, "critic value clip", group=ALGORITHM)
    ptx_coeff: float = option(0.0, "weight of the PTX loss (the PPO-Lag script uses 16)", group=ALGORITHM)
    separate_scoring: bool = option(False, "old log-probs / values from separate no-grad forwards (the reference's "
                                           "way; slower, same math)", group=ALGORITHM)
    update_iters: int = option(1, "PPO passes over each rollout batch", group=TRAINING)
    per_device_prompt_batch_size: int = option(16, "prompts per rollout", group=TRAINING)
    actor_lr: float = option(1e-5, "actor peak learning rate", aliases=("actor_learning_rate",), group=TRAINING)
    actor_weight_decay: float = option(0.0, "actor AdamW weight decay", group=TRAINING)
    actor_lr_scheduler_type: str = option("cosine", "actor schedule", choices=LR_SCHEDULERS, group=TRAINING)
    actor_lr_warmup_ratio: float = option(0.0, "fraction of actor steps spent warming up (the PPO-Lag script: "
                                               "0.03)", group=TRAINING)
    actor_gradient_checkpointing: bool = option(False, "recompute actor activations in backward", group=TRAINING)
    critic_lr: float = option(5e-6, "critic peak learning rate", aliases=("critic_learning_rate",), group=TRAINING)
    critic_weight_decay: float = option(0.0, "critic AdamW weight decay", group=TRAINING)
    critic_lr_scheduler_type: str = option("cosine", "critic schedule (the reference's scripts pass constant)",
                                           choices=LR_SCHEDULERS, group=TRAINING)
    critic_lr_warmup_ratio: float = option(0.0, "fraction of critic steps spent warming up (not for 'constant')",
                                           group=TRAINING)
    critic_gradient_checkpointing: bool = option(False, "recompute critic activations in backward", group=TRAINING)
    actor_lora_rank: int | None = option(None, "LoRA rank of the actor (default: --lora_rank; 0: full); with "
                                               "adapters the reference is the actor with them disabled (no second "
                                               "copy of the weights)", group=TRAINING)
    critic_lora_rank: int | None = option(None, "LoRA rank of the critics (default: --lora_rank; 0: full, or the "
                                                "value head alone with --critic_backbone shared); their score heads "
                                                "always train in full", group=TRAINING)
    critic_backbone: str = option("separate", "separate: each critic holds its own copy of the model it starts "
                                              "from; shared: a critic starting from the reward / cost model uses "
                                              "that scorer's frozen backbone (its own LoRA adapters and value head "
                                              "on it; --critic_lora_rank 0: the value head alone trains)",
                                  choices=["separate", "shared"], group=TRAINING)

    algorithm = "ppo"

    def lora_ranks(self) -> dict[str, int]:
        return {role: self.lora_rank if own is None else own
                for role, own in (("actor", self.actor_lora_rank), ("critic", self.critic_lora_rank))}

    @property
    def command(self) -> str:
        return self.algorithm

    def validate(self) -> None:
        super().validate()
        for name in ("update_iters", "per_device_prompt_batch_size", "num_return_sequences"):
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
        for name in ("kl_coeff", "clip_range_ratio", "clip_range_score", "clip_range_value", "ptx_coeff"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("actor_lr_warmup_ratio", "critic_lr_warmup_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name} must be in [0, 1], got {getattr(self, name)}")
        self.check_critic_backbone()

    def check_critic_backbone(self) -> None:
        """``--critic_backbone shared`` needs each critic to start from its scorer (the critic flag unset or the
        same folder as the reward / cost model)."""
        if self.critic_backbone != "shared":
            return
        for scorer in ("reward", "cost"):
            flag, own = f"{scorer}_critic_model_name_or_path", f"{scorer}_model_name_or_path"
            path, base = getattr(self, flag, None), getattr(self, own, None)
            if path and (base is None or os.path.realpath(path) != os.path.realpath(base)):
                raise ConfigError(f"--critic_backbone shared: --{flag} {path} is not --{own} {base} (a shared "
                                  f"critic uses its scorer's backbone: drop --{flag} or pass --critic_backbone "
                                  "separate)")


def check_common(cfg) -> None:
    """The value checks every training command shares (one line each, exit status 2)."""
    check_finite_numbers(cfg)
    for name, value in float_options(cfg):
        if (name == "lr" or name.endswith(("_lr", "weight_decay", "max_grad_norm"))) and value < 0:
            raise ConfigError(f"--{name} must be >= 0, got {value}" +
                              (" (0 turns clipping off)" if name == "max_grad_norm" else ""))
    if not all(0.0 <= b < 1.0 for b in cfg.adam_betas):
        raise ConfigError(f"--adam_betas must both be in [0, 1), got {cfg.adam_betas}")
    for name, low in (("eval_interval", 1), ("save_interval", 0), ("save_total_limit", 0)):
        if getattr(cfg, name) < low:
            raise ConfigError(f"--{name} must be >= {low}, got {getattr(cfg, name)}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError(f"--max_steps must be >= 1, got {cfg.max_steps}")
    if cfg.overwrite_output_dir and cfg.resume:
        raise ConfigError("--overwrite_output_dir and --resume are exclusive (one replaces the run, the other "
                          "continues it)")
    _check_allow_changes(cfg)


def _check_allow_changes(cfg) -> None:
    names = [n for item in cfg.resume_allow_changes or [] for n in str(item).split(",") if n]
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = [n for n in names if n.lstrip("-") not in fields]
    if unknown:
        raise ConfigError(f"--resume_allow_changes: unknown option(s) {', '.join(unknown)}")
    cfg.resume_allow_changes = [n.lstrip("-") for n in names] or None


