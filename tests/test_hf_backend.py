"""Any transformers causal LM through every command (``--backend auto|native|hf``).

Tiny random GPT-2, OPT, GPT-NeoX, Phi and Gemma models built here (no downloads), with the bundled tokenizer:
``auto`` picks transformers for them and our decoder for the Llama family; log-probs and end scores equal
transformers' own forward; a score model saved here loads into a transcription of the reference's
``<Arch>ForScore`` with every tensor found; GPT-2 and Gemma go through sft -> rm -> cm -> score -> ppo-lag ->
arena -> dpo from the command line."""
import json
import os

import pytest
import torch
import transformers as T
from test_checkpoint_compat import reference_score_class

from saferlhf_fast.cli import main
from saferlhf_fast.data import load_tokenizer
from saferlhf_fast.data.tokenizer import save_tokenizer
from saferlhf_fast.engine import generate
from saferlhf_fast.models import DecoderModel, from_pretrained
from saferlhf_fast.models.checkpoint import resolve_backend
from saferlhf_fast.models.hf import HFModel
from saferlhf_fast.trainers.modeling import make_tiny_model

ARCHS = ("gpt2", "opt", "gpt_neox", "phi", "gemma")


def tiny_config(kind: str, vocab: int, tok) -> T.PretrainedConfig:
    ids = dict(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    return {
        # no dropout: the 1-vs-2-process comparison needs deterministic training steps
        "gpt2": lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, **ids),
        # word_embed_proj_dim != hidden_size: the score head sits on the projected width
        "opt": lambda: T.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                                   max_position_embeddings=128, word_embed_proj_dim=16, dropout=0.0, **ids),
        "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64, max_position_embeddings=128, **ids),
        "phi": lambda: T.PhiConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   max_position_embeddings=128, **ids),
        "gemma": lambda: T.GemmaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, head_dim=16, intermediate_size=64,
                                       max_position_embeddings=128, **ids),
    }[kind]()


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, tmp_path_factory):
    """(kind, folder of a random causal LM of that architecture with the bundled tokenizer)."""
    tok = load_tokenizer(None)
    vocab = (len(tok) + 63) // 64 * 64
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(tiny_config(request.param, vocab, tok))
    path = str(tmp_path_factory.mktemp(request.param) / "init")
    model.save_pretrained(path)
    save_tokenizer(tok, path)
    return request.param, path


def _batch(vocab: int, pad_left: bool = True):
    torch.manual_seed(1)
    ids = torch.randint(5, vocab, (3, 9))
    mask = torch.ones_like(ids)
    if pad_left:
        mask[0, :3] = 0
        mask[2, :1] = 0
    return ids, mask


def test_auto_picks_transformers_for_other_architectures_and_ours_for_llama(arch, tmp_path):
    kind, path = arch
    assert resolve_backend(path) == "hf"
    assert isinstance(from_pretrained(path, backend="auto"), HFModel)
    llama = make_tiny_model(str(tmp_path / "llama"), hidden_size=32, num_layers=1, num_heads=2)
    assert resolve_backend(llama) == "native"
    assert isinstance(from_pretrained(llama, backend="auto"), DecoderModel)


def test_logprobs_equal_transformers_forward(arch):
    """``token_logprobs`` (fused, no [B, L, V] logits) equals log_softmax of transformers' logits, padded rows
    included."""
    kind, path = arch
    ours = from_pretrained(path, backend="hf")
    ref = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, mask = _batch(ours.config.vocab_size)
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = ref(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits.float()
        want = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        got = ours.token_logprobs(ids, mask)
    real = (mask[:, 1:] * mask[:, :-1]).bool()  # the token and the position predicting it are both real
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert torch.all(got[mask[:, 1:] == 0] == 0)


def test_final_logit_softcapping_on_the_transformers_path(tmp_path):
    """Gemma 2 through ``--backend hf``: the fused log-probs apply its final soft-capping as transformers does."""
    tok = load_tokenizer(None)
    cfg = T.Gemma2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, intermediate_size=64, max_position_embeddings=128, final_logit_softcapping=3.0,
                         vocab_size=(len(tok) + 63) // 64 * 64, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path / "g2"))
    ours = from_pretrained(str(tmp_path / "g2"), backend="hf")
    ref = T.AutoModelForCausalLM.from_pretrained(str(tmp_path / "g2"), dtype=torch.float32).eval()
    ids, mask = _batch(ours.config.vocab_size, pad_left=False)
    with torch.no_grad():
        logits = ref(input_ids=ids, attention_mask=mask).logits.float()
        want = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        got = ours.token_logprobs(ids, mask)
    assert float(logits.abs().max()) <= 3.0 + 1e-5  # the cap is active in transformers' logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_generate_logprobs_equal_a_training_forward(arch):
    kind, path = arch
    model = from_pretrained(path, backend="hf")
    ids, mask = _batch(model.config.vocab_size)
    out = generate(model, ids, mask, max_new_tokens=5, do_sample=True, seed=3)
    again = model.token_logprobs(out.sequences, out.attention_mask)[:, out.prompt_length - 1:]
    torch.testing.assert_close(out.logprobs, again * out.response_mask, rtol=0, atol=1e-6)
    assert out.sequences.shape[1] == ids.shape[1] + 5 or bool((~out.response_mask).any())


def test_score_model_in_the_reference_layout(arch, tmp_path):
    """A score model on any backbone saves as the reference's ``<Arch>ForScore``: its class loads every tensor,
    and end scores equal ``w . h_end + b`` on transformers' hidden states; ours loads it back identically."""
    kind, path = arch
    torch.manual_seed(5)
    ours = from_pretrained(path, head="score", backend="hf")
    with torch.no_grad():
        ours.score_head.bias.fill_(0.25)
    ours.config.extra.update(score_type="cost", do_normalize=False)
    out = str(tmp_path / "cm")
    ours.save_pretrained(out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == [type(ours.hf).__name__.removesuffix("Model") + "ForScore"]
    assert cfg["score_dim"] == 1 and cfg["bias"] is True and cfg["score_type"] == "cost"
    ref, info = reference_score_class(type(ours.hf)).from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(ref.score_head.weight, ours.score_head.weight)
    ids, mask = _batch(ours.config.vocab_size, pad_left=False)
    mask[1, 6:] = 0  # right padding, as the score models see batches
    with torch.no_grad():
        backbone = getattr(ref.eval(), ref.base_model_prefix)
        h = backbone(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0))
        end = mask.sum(1) - 1
        want = ref.score_head(h.last_hidden_state)[torch.arange(3), end, 0]
        got = ours.eval()(ids, mask).end_scores
        again = from_pretrained(out, head="score", backend="hf").eval()(ids, mask).end_scores
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(again, got)


def test_native_backend_on_another_architecture_is_one_line_and_exit_2(arch, tmp_path, capsys):
    kind, path = arch
    rc = main(["sft", "--model_name_or_path", path, "--backend", "native", "--train_datasets",
               "synthetic-sft/train:0.01", "--output_dir", str(tmp_path / "out"), "--progress", "false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--backend auto" in err[0] and kind in err[0]
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def _run(*args):
    assert main([str(a) for a in args]) == 0, args


@pytest.mark.parametrize("kind", ["gpt2", "gemma"])
def test_pipeline_from_the_command_line(kind, tmp_path):
    """sft -> rm -> cm -> score -> ppo-lag -> arena -> dpo on a GPT-2 / Gemma model, backend chosen by ``auto``; every
    output is a checkpoint transformers loads (score models into the reference's class)."""
    tok = load_tokenizer(None)
    torch.manual_seed(0)
    init = str(tmp_path / "init")
    T.AutoModelForCausalLM.from_config(tiny_config(kind, (len(tok) + 63) // 64 * 64, tok)).save_pretrained(init)
    save_tokenizer(tok, init)
    small = ["--max_length", 64, "--per_device_train_batch_size", 4, "--progress", "false"]
    out = {name: str(tmp_path / name) for name in ("sft", "rm", "cm", "score", "ppo", "arena", "dpo")}
    _run("sft", "--model_name_or_path", init, "--train_datasets", "synthetic-sft/train:0.02", "--output_dir",
         out["sft"], *small)
    for stage in ("rm", "cm"):
        _run(stage, "--model_name_or_path", out["sft"], "--train_datasets", "synthetic-preference/train:0.01",
             "--output_dir", out[stage], *small)
    _run("score", "--model_name_or_path", out["cm"], "--datasets", "synthetic-preference/test:0.01", "--output_dir",
         out["score"], "--max_length", 64)
    _run("ppo-lag", "--actor_model_name_or_path", out["sft"], "--reward_model_name_or_path", out["rm"],
         "--cost_model_name_or_path", out["cm"], "--train_datasets", "synthetic-prompts/train:0.01",
         "--output_dir", out["ppo"], "--max_new_tokens", 4, "--per_device_prompt_batch_size", 4, *small)
    _run("arena", "--red_corner_model_name_or_path", out["sft"], "--blue_corner_model_name_or_path", out["ppo"],
         "--reward_model_name_or_path", out["rm"], "--cost_model_name_or_path", out["cm"], "--datasets",
         "synthetic-prompts/test:0.02", "--max_length", 64, "--max_new_tokens", 4, "--output_dir", out["arena"])
    _run("dpo", "--model_name_or_path", out["sft"], "--train_datasets", "synthetic-preference/train:0.01",
         "--output_dir", out["dpo"], *small)

    for name in ("sft", "ppo", "dpo"):
        loaded = T.AutoModelForCausalLM.from_pretrained(out[name])
        assert loaded.config.model_type == kind
    trained = T.AutoModelForCausalLM.from_pretrained(out["ppo"]).state_dict()
    start = T.AutoModelForCausalLM.from_pretrained(out["sft"]).state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # PPO-Lag moved the actor
    metrics = [json.loads(line) for line in open(os.path.join(out["ppo"], "metrics.jsonl"))]
    assert any("train/lambda" in m for m in metrics)
    for name in ("rm", "cm", os.path.join("ppo", "reward_critic"), os.path.join("ppo", "cost_critic")):
        folder = os.path.join(str(tmp_path), name)
        cfg = json.load(open(os.path.join(folder, "config.json")))
        assert cfg["architectures"][0].endswith("ForScore") and cfg["model_type"] == kind
        base = T.AutoModel.from_config(T.AutoConfig.from_pretrained(folder))
        _, info = reference_score_class(type(base)).from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], name
    arena = json.load(open(os.path.join(out["arena"], "arena.json")))
    assert arena


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_transformers_model_under_torchrun_equals_one_process(stage, tmp_path):
    """FSDP2 over a GPT-2 (its ``_no_split_modules`` blocks sharded): 2 ranks x 2 rows train as 1 rank x 4 rows.

    Compared: the files written (rank 0 only; score models in the reference's layout) and, for ``rm`` (a loss that
    is a mean over pairs, so the same on any split), every step's loss and gradient norm.  Not the final weights:
    GPT-2's key biases get an exactly-zero gradient in theory, so their gradients are rounding noise whose sign
    Adam's first steps turn into +-lr on either side."""
    from safetensors.torch import load_file
    from test_distributed import _jsonl, _torchrun

    tok = load_tokenizer(None)
    torch.manual_seed(0)
    init = str(tmp_path / "init")
    T.AutoModelForCausalLM.from_config(tiny_config("gpt2", (len(tok) + 63) // 64 * 64, tok)).save_pretrained(init)
    save_tokenizer(tok, init)
    data = "synthetic-sft/train:0.01" if stage == "sft" else "synthetic-preference/test:0.02"
    common = ["--model_name_or_path", init, "--train_datasets", data, "--max_length", "64", "--lr", "1e-3",
              "--seed", "7", "--progress", "false"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert main([stage, *common, "--per_device_train_batch_size", "4", "--output_dir", one]) == 0
    _torchrun([stage, *common, "--per_device_train_batch_size", "2", "--output_dir", two])
    a, b = (load_file(os.path.join(p, "model.safetensors")) for p in (one, two))
    assert a.keys() == b.keys() and len(a) > 10
    assert all(a[k].shape == b[k].shape for k in a)
    assert sorted(os.listdir(one)) == sorted(os.listdir(two))
    ra, rb = _jsonl(one), _jsonl(two)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and len(ra) >= 3
    if stage == "rm":
        for x, y in zip(ra, rb):
            for key in ("train/loss", "train/grad_norm"):
                assert y[key] == pytest.approx(x[key], rel=1e-5), (x["step"], key)
        base = T.AutoModel.from_config(T.AutoConfig.from_pretrained(two))
        _, info = reference_score_class(type(base)).from_pretrained(two, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
    else:
        assert T.AutoModelForCausalLM.from_pretrained(two).config.model_type == "gpt2"
