"""`bench ppo-step --lora_ranks` (our step per LoRA variant, tiny size) and the memory accounting of
`saferlhf_fast/benchmarks/memory.py` against the parameter counts of real models."""
import json

import pytest
import torch
from test_bench_cli import check_rows, read_rows  # tests/ is on sys.path (no package)

from saferlhf_fast.benchmarks import memory, ppo_step
from saferlhf_fast.cli import main
from saferlhf_fast.models import LlamaForCausalLM, LlamaForScore, ModelConfig
from saferlhf_fast.models.lora import LoraSpec, apply_lora


def _param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_ppo_step_lora_variants_tiny(tmp_path, capsys):
    path, js = tmp_path / "ppo.csv", tmp_path / "ppo.json"
    assert main(["bench", "ppo-step", "--sizes", "tiny", "--reps", "2", "--warmup", "0", "--csv", str(path),
                 "--json", str(js), "--lora_ranks", "0", "4", "4:ref-copy", "4:shared"]) == 0
    rows = read_rows(path)
    check_rows(rows, "saferlhf-fast bench ppo-step --sizes tiny")
    providers = ["saferlhf_fast:full", "saferlhf_fast:lora-r4", "saferlhf_fast:lora-r4-ref-copy",
                 "saferlhf_fast:lora-r4-shared"]
    assert sorted({r["provider"] for r in rows}) == providers  # no reference-style step in this mode
    assert all(r["x"].endswith(":lora") for r in rows)
    key = {(r["provider"], r["mode"], r["metric"]): float(r["p50"]) for r in rows}
    for prov in providers:
        for mode in ("step", *ppo_step.PHASES):
            assert (prov, mode, "time") in key
        assert key[(prov, "step", "memory")] > 0
    s = json.loads(js.read_text())["summary"]
    assert s["variants"] == ["full", "lora-r4", "lora-r4-ref-copy", "lora-r4-shared"]

    # the trainable parameters: full = actor + two critics; LoRA = their adapters + the critics' score heads
    mc = ModelConfig(model_type="llama", **ppo_step.model_config(ppo_step.SIZES["tiny"], _tok()))
    lm, score = LlamaForCausalLM(mc), LlamaForScore(mc)
    n_lm, n_score = (sum(p.numel() for p in m.parameters()) for m in (lm, score))
    assert s["full"]["trainable_parameters"] == n_lm + 2 * n_score
    torch.manual_seed(0)
    lora_lm, lora_score = apply_lora(LlamaForCausalLM(mc), LoraSpec(4)), apply_lora(LlamaForScore(mc), LoraSpec(4))
    n_trained = sum(p.numel() for m in (lora_lm, lora_score, lora_score) for p in m.parameters() if p.requires_grad)
    assert s["lora-r4"]["trainable_parameters"] == n_trained < s["full"]["trainable_parameters"]
    assert s["lora-r4-shared"]["trainable_parameters"] == n_trained  # the same adapters, on the scorers' bases

    # resident memory: the shared base holds no reference copy; the copy costs exactly the actor's weights
    res = {name: s[name]["resident_bytes"] for name in s["variants"]}
    assert res["lora-r4"] < res["full"]
    extra = res["lora-r4-ref-copy"] - res["lora-r4"]
    assert _param_bytes(lm) <= extra <= _param_bytes(lm) + sum(b.numel() * b.element_size() for b in lm.buffers())
    # the shared critic backbone drops the reward and cost models' weights (their frozen score heads stay)
    saved = res["lora-r4"] - res["lora-r4-shared"]
    backbone = _param_bytes(score) - _param_bytes(score.score_head)
    assert 2 * backbone <= saved <= 2 * (backbone + sum(b.numel() * b.element_size() for b in score.buffers()))

    out = capsys.readouterr().out
    assert "| lora-r4 |" in out and "resident MiB" in out
    # the report compares each LoRA variant with full fine-tuning of the same run
    assert main(["bench", "report", "--csv", str(path)]) == 0
    report = capsys.readouterr().out
    assert "saferlhf_fast:lora-r4 " in report and "of baseline" in report


def _tok():
    from saferlhf_fast.data import load_tokenizer

    return load_tokenizer()


@pytest.mark.parametrize("bad", [["4", "4"], ["0:ref-copy"], ["0:shared"], ["4:both"], ["-1"], ["x"]])
def test_ppo_step_lora_variants_bad(bad, capsys):
    assert main(["bench", "ppo-step", "--sizes", "tiny", "--lora_ranks", *bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lora_ranks" in err[0]


SHAPE = memory.Shape("tiny", hidden=48, intermediate=80, layers=2, heads=4, kv_heads=2, vocab=120)


def _config(s):
    return ModelConfig(model_type="llama", vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                       num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                       tie_word_embeddings=False)


def test_memory_accounting_counts_real_parameters():
    mc = _config(SHAPE)
    lm, score = LlamaForCausalLM(mc), LlamaForScore(mc)
    assert memory.lm_params(SHAPE) == sum(p.numel() for p in lm.parameters())
    assert memory.score_params(SHAPE) == sum(p.numel() for p in score.parameters())
    for rank in (1, 8):
        model = apply_lora(LlamaForScore(mc), LoraSpec(rank))
        adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        assert memory.lora_params(SHAPE, rank) == adapters
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trained == adapters + SHAPE.hidden + 1  # the score head trains in full


def test_memory_accounting_scenarios():
    lm, score = memory.lm_params(SHAPE), memory.score_params(SHAPE)
    full, lora, shared, critics = (memory.account(SHAPE, k, rank=4, batch=2, seq=16) for k in memory.SCENARIOS)
    assert full["trained_parameters"] == lm + 2 * score
    assert full["weights"] == 2 * (2 * lm + 4 * score)
    assert full["gradients_optimizer_master"] == 14 * full["trained_parameters"]
    assert lora["trained_parameters"] == 3 * memory.lora_params(SHAPE, 4) + 2 * (SHAPE.hidden + 1)
    assert lora["weights"] - shared["weights"] == 2 * lm  # the reference's copy
    assert full["activations_checkpointed"] < full["activations"]
    assert lora["total"] < full["total"] and shared["total"] < lora["total"]
    # the shared critic backbone: two scorer bases less, their heads kept; the same trained parameters
    assert shared["weights"] - critics["weights"] == 2 * 2 * (score - (SHAPE.hidden + 1))
    assert critics["trained_parameters"] == lora["trained_parameters"] and critics["total"] < shared["total"]
    # 7B: the parameter count of Llama-2-7B (6.74 B) and Llama-3-8B (8.03 B)
    assert round(memory.lm_params(memory.SHAPES["llama2-7b"]) / 1e9, 2) == 6.74
    assert round(memory.lm_params(memory.SHAPES["llama3-8b"]) / 1e9, 2) == 8.03


def test_bench_memory_command(capsys):
    assert main(["bench", "memory", "--models", "llama2-7b", "--lora_rank", "8"]) == 0
    out = capsys.readouterr().out
    assert "Llama-2-7B" in out and "LoRA r8 + shared reference" in out and "Llama-3-8B" not in out
    assert main(["bench", "memory", "--batch", "0"]) == 2
    assert "--batch" in capsys.readouterr().err


@pytest.mark.parametrize("scenario", ["full", "lora+shared-ref", "lora+shared"])
def test_gpu_fp32_vocab_matrices_are_what_the_trainer_keeps_fp32_on_a_gpu(tmp_path, scenario):
    """The table's GPU row against the trainer: under --bf16, the frozen 2-D weights that ``held_in_bf16`` leaves in
    fp32 on a GPU (over every distinct parameter of the six roles) are ``frozen_vocab_matrices`` V x h matrices."""
    from saferlhf_fast.models.llama import held_in_bf16
    from saferlhf_fast.trainers.ppo import PPOLagConfig, PPOTrainer

    w = ppo_step.SIZES["tiny"]
    _, paths, ours = ppo_step.build_checkpoints(w, str(tmp_path))
    lora = dict(lora_rank=4, critic_backbone="shared" if scenario == "lora+shared" else "separate")
    cfg = PPOLagConfig(actor_model_name_or_path=paths["actor"], reward_model_name_or_path=paths["rm"],
                       cost_model_name_or_path=paths["cm"], train_datasets=["synthetic-prompts/train:0.05"],
                       output_dir=str(tmp_path / "out"), max_new_tokens=4, progress=False, bf16=True,
                       **({} if scenario == "full" else lora))
    cfg.validate()
    trainer = PPOTrainer(cfg)
    fp32_on_gpu = {}  # what the CPU holds in bf16 and a GPU would not, per distinct tensor
    for model in (trainer.actor, *trainer.critics, trainer.reference, trainer.reward_model, trainer.cost_model):
        if model is None or not hasattr(model, "lm_head") and not hasattr(model, "score_head"):
            continue  # the reference of a LoRA actor; a shared scorer (its backbone is a critic's, counted there)
        params = dict(model.named_parameters())
        for name in set(held_in_bf16(model, "cpu")) - set(held_in_bf16(model, "cuda")):
            fp32_on_gpu[params[name].data_ptr()] = params[name].numel()
    vocab_h = ours["actor"].config.vocab_size * ours["actor"].config.hidden_size
    assert sum(fp32_on_gpu.values()) == memory.frozen_vocab_matrices(scenario) * vocab_h
