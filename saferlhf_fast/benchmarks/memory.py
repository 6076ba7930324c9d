"""GPU memory of PPO-Lagrangian training from our own accounting, to size the hardware before a run.

The six models: actor and reference (decoder + untied ``lm_head``), reward and cost models, reward and cost
critics (decoder + ``score_head = Linear(H, 1)``).  With hidden size ``h``, intermediate size ``i``, ``n`` layers,
key/value width ``d_kv = kv_heads * h / heads`` and vocabulary ``V``, one decoder has

    P_backbone = V h + n (2 h^2 + 2 h d_kv + 3 h i + 2 h) + h        (embeddings, q/o, k/v, MLP, norms, final norm)
    P_lm = P_backbone + V h,   P_score = P_backbone + h + 1.

LoRA of rank ``r`` on every projection (``all-linear``) adds, per layer, ``r (in + out)`` per projection:

    P_lora = n r (2 (h + h) + 2 (h + d_kv) + 2 (h + i) + (i + h)).

Bytes (bf16 mixed precision, the reference's DeepSpeed setting without ZeRO sharding): every weight 2 B; every
trained parameter adds a bf16 gradient (2 B), an fp32 master copy (4 B) and AdamW's two fp32 moments (8 B), 14 B.
Full fine-tuning trains the actor and both critics; LoRA trains their adapters and the critics' score heads (the
bases are frozen weights); "LoRA + shared reference" drops the reference's weights: the reference is the actor's
base with the adapters disabled (what the trainer does with a LoRA actor); "... and critic backbones" also drops the
critics' bases: each critic's adapters and value head sit on the frozen reward / cost model it starts from
(``--critic_backbone shared``), which keeps a frozen copy of its own score head (``h + 1`` parameters).  Gradients
of all trained models are counted at once (an upper bound: the trainer updates actor and critics in turn).

This trainer holds exactly that under ``--bf16`` (frozen weights in bf16, ``models.llama.hold_in_bf16``; trained
weights as fp32 masters with fp32 gradients: 4 + 4 + 8 = 16 B, the same as 2 + 14) with one exception on a GPU:
there the embeddings and lm_heads of frozen models stay fp32 (autocast computes those products in fp32 on CUDA),
2 more bytes per parameter of each frozen ``V x h`` matrix:

    frozen V h matrices = 2 per frozen lm model or LoRA actor base (embedding, lm_head) + 1 per frozen score model
                          or LoRA critic base (embedding)

(full: reference 2 + reward and cost models 2; LoRA: actor base 2 + reference 2 + scorers 2 + critic bases 2; + shared
reference: 6; + shared critic backbones: 4), counted in the ``gpu_fp32_vocab`` row and the "this trainer on a GPU"
totals.

Activations: the tensors a Llama layer saves for backward, per token, in bf16 (2 B per element): the two RMSNorm
inputs and outputs (4 h), q, k, v (h + 2 d_kv), the attention output (h), gate, up and their product (3 i), plus the
adapters' ``A x`` (7 r) with LoRA; flash attention (no [L, L] scores) and fused log-probs (no [B, L, V] logits).
Per trained model ``a = 2 (6 h + 2 d_kv + 3 i + 7 r)`` bytes per token per layer; without gradient checkpointing
``B L n a``, with it ``B L (2 n h + a)`` (each layer's input, then one layer recomputed at a time).  One trained
model's activations are live at a time (actor, then each critic).  The rollout's KV cache is ``2 B L n 2 d_kv``
bytes; the peak holds the larger of activations and KV cache next to weights and optimizer state.
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30
WEIGHT_BYTES = 2  # bf16
TRAINED_EXTRA_BYTES = 2 + 4 + 8  # bf16 gradient, fp32 master weight, AdamW m and v (fp32)
ACT_BYTES = 2
LORA_PROJECTIONS = 7  # q, k, v, o, gate, up, down


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)


SHAPES = {
    "llama2-7b": Shape("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000),
    "llama3-8b": Shape("Llama-3-8B", 4096, 14336, 32, 32, 8, 128256),
}
SCENARIOS = ("full", "lora", "lora+shared-ref", "lora+shared")


def backbone_params(s: Shape) -> int:
    h, i, d = s.hidden, s.intermediate, s.kv_dim
    return s.vocab * h + s.layers * (2 * h * h + 2 * h * d + 3 * h * i + 2 * h) + h


def lm_params(s: Shape) -> int:
    return backbone_params(s) + s.vocab * s.hidden


def score_params(s: Shape, bias: bool = True) -> int:
    return backbone_params(s) + s.hidden + int(bias)


def lora_params(s: Shape, rank: int) -> int:
    h, i, d = s.hidden, s.intermediate, s.kv_dim
    return s.layers * rank * (2 * (h + h) + 2 * (h + d) + 2 * (h + i) + (i + h))


def frozen_vocab_matrices(scenario: str) -> int:
    """How many frozen ``V x h`` matrices (embeddings, lm_heads) ``scenario`` holds (module docstring)."""
    return {"full": 4, "lora": 8, "lora+shared-ref": 6, "lora+shared": 4}[scenario]


def activation_bytes(s: Shape, tokens: int, rank: int = 0, checkpointing: bool = False) -> int:
    """Saved activations of one trained model for ``tokens`` = batch x sequence tokens (module docstring)."""
    per_layer = ACT_BYTES * (6 * s.hidden + 2 * s.kv_dim + 3 * s.intermediate + LORA_PROJECTIONS * rank)
    if checkpointing:
        return tokens * (s.layers * ACT_BYTES * s.hidden + per_layer)
    return tokens * s.layers * per_layer


def kv_cache_bytes(s: Shape, tokens: int) -> int:
    return 2 * tokens * s.layers * ACT_BYTES * s.kv_dim


def account(s: Shape, scenario: str, rank: int = 16, batch: int = 8, seq: int = 512) -> dict[str, int]:
    """Bytes per component for ``scenario`` in :data:`SCENARIOS`; ``rank``: the LoRA rank (unused for full)."""
    lora = scenario != "full"
    lm, score = lm_params(s), score_params(s)
    models = 2 * lm + 4 * score
    if scenario.startswith("lora+shared"):
        models -= lm  # the reference is the actor's base
    if scenario == "lora+shared":
        models -= 2 * (score - (s.hidden + 1))  # each critic on its scorer's base; the scorer's head stays
    adapters = 3 * lora_params(s, rank) if lora else 0  # actor and both critics
    trained = adapters + 2 * (s.hidden + 1) if lora else lm + 2 * score
    r = rank if lora else 0
    tokens = batch * seq
    act = activation_bytes(s, tokens, r)
    act_ckpt = activation_bytes(s, tokens, r, checkpointing=True)
    kv = kv_cache_bytes(s, tokens)
    fixed = WEIGHT_BYTES * (models + adapters) + TRAINED_EXTRA_BYTES * trained
    gpu_fp32_vocab = (4 - WEIGHT_BYTES) * frozen_vocab_matrices(scenario) * s.vocab * s.hidden
    return {"weights": WEIGHT_BYTES * (models + adapters), "trained_parameters": trained,
            "gradients_optimizer_master": TRAINED_EXTRA_BYTES * trained, "activations": act,
            "activations_checkpointed": act_ckpt, "kv_cache": kv, "total": fixed + max(act, kv),
            "total_checkpointed": fixed + max(act_ckpt, kv), "gpu_fp32_vocab": gpu_fp32_vocab,
            "total_checkpointed_gpu": fixed + gpu_fp32_vocab + max(act_ckpt, kv)}


ROWS = (("weights", "weights, six models (bf16)"), ("gradients_optimizer_master", "gradients + fp32 master + AdamW"),
        ("activations", "activations, one trained model"),
        ("activations_checkpointed", "activations, gradient checkpointing"), ("kv_cache", "rollout KV cache"),
        ("total", "**total**"), ("total_checkpointed", "**total, gradient checkpointing**"),
        ("gpu_fp32_vocab", "this trainer on a GPU: frozen embeddings / lm_heads in fp32, extra"),
        ("total_checkpointed_gpu", "**this trainer on a GPU: total, gradient checkpointing**"))


def table(names=("llama2-7b", "llama3-8b"), rank: int = 16, batch: int = 8, seq: int = 512) -> str:
    """Markdown: one block of rows per shape, one column per scenario, GiB."""
    heads = {"full": "full fine-tuning", "lora": f"LoRA r{rank}", "lora+shared-ref": f"LoRA r{rank} + shared reference",
             "lora+shared": f"LoRA r{rank} + shared reference and critic backbones"}
    lines = [f"PPO-Lag memory, one GPU, no ZeRO sharding, bf16 weights, batch {batch} x sequence {seq} "
             f"(GiB; `saferlhf_fast/benchmarks/memory.py`)", "",
             "| model | component | " + " | ".join(heads[k] for k in SCENARIOS) + " |",
             "|---|---|" + "---|" * len(SCENARIOS)]
    for name in names:
        s = SHAPES[name]
        acc = {k: account(s, k, rank, batch, seq) for k in SCENARIOS}
        lines.append(f"| {s.name} | trained parameters | "
                     + " | ".join(f"{acc[k]['trained_parameters'] / 1e6:,.1f} M" for k in SCENARIOS) + " |")
        for key, label in ROWS:
            lines.append(f"| {s.name} | {label} | " + " | ".join(f"{acc[k][key] / GiB:.1f}" for k in SCENARIOS) + " |")
    return "\n".join(lines)
