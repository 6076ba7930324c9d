"""Bad input gets one line naming what and where (file, row, field / flag), exit status 2, and nothing half-written:
non-UTF-8 data files, a config that does not match the weights, a vocabulary smaller than the tokenizer, a critic
with another tokenizer, a reward / cost model without a trained score head, an unknown --attn_backend, a missing
data file, message wording, and score / arena outputs kept inside their folder."""
import gzip
import json
import logging
import os
import shutil

import pytest
import torch

from saferlhf_fast.cli import main
from saferlhf_fast.data import DataError, PreferenceDataset, load_tokenizer, read_file
from saferlhf_fast.trainers.modeling import make_tiny_model

SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
BAD_BYTE = b"\xe9"  # latin-1 'e acute': not UTF-8 on its own


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), **SMALL)


@pytest.fixture(scope="module")
def scorers(tiny, tmp_path_factory, make_score_model):
    root = tmp_path_factory.mktemp("scorers")
    return {"rm": make_score_model(tiny, str(root / "rm"), 2), "cm": make_score_model(tiny, str(root / "cm"), 3)}


@pytest.fixture(scope="module")
def other(tmp_path_factory, make_score_model):
    """An LM and a reward model on a different (smaller) tokenizer than the bundled one."""
    from saferlhf_fast.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("other")
    train_tokenizer(["how do i bake bread ? sure . first mix the flour , then knead the dough ."] * 4,
                    str(root / "tok"), vocab_size=300)
    lm = make_tiny_model(str(root / "lm"), str(root / "tok"), **SMALL)
    return {"lm": lm, "rm": make_score_model(lm, str(root / "rm"), 5)}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and err.count("\n") == 0, err
    return err


def run(command, capsys, *args):
    """(exit status, the one line on stderr) of a command line."""
    rc = main([command, *map(str, args)])
    return rc, one_line_error(capsys)


def trainer_args(command, model, data, out, scorers=None):
    if command == "ppo-lag":
        return ["--actor_model_name_or_path", model, "--reward_model_name_or_path", scorers["rm"],
                "--cost_model_name_or_path", scorers["cm"], "--train_datasets", data, "--output_dir", out,
                "--max_length", 64, "--max_new_tokens", 4, "--per_device_prompt_batch_size", 4,
                "--per_device_train_batch_size", 4, "--progress", "false"]
    return ["--model_name_or_path", model, "--train_datasets", data, "--output_dir", out, "--max_length", 64,
            "--per_device_train_batch_size", 4, "--progress", "false"]


ROWS = {
    "sft": [{"prompt": "how do i bake bread ?", "response": "mix the flour ."},
            {"prompt": "how do i bake a cake ?", "response": "bake it caf\u00e9 style ."}],
    "pair": [{"prompt": "how do i bake bread ?", "response_0": "mix the flour .", "response_1": "no .",
              "better_response_id": 0, "safer_response_id": 0, "is_response_0_safe": True,
              "is_response_1_safe": True},
             {"prompt": "how do i bake a cake ?", "response_0": "caf\u00e9 style .", "response_1": "no .",
              "better_response_id": 0, "safer_response_id": 0, "is_response_0_safe": True,
              "is_response_1_safe": True}],
    "prompt": [{"prompt": "how do i bake bread ?"}, {"prompt": "how do i bake a caf\u00e9 cake ?"}],
}
STAGE_ROWS = {"sft": "sft", "rm": "pair", "cm": "pair", "dpo": "pair", "ppo-lag": "prompt"}


def latin1_file(path, rows, layout="jsonl"):
    """``rows`` written in latin-1 (the second row holds a non-ASCII character): (path, offset of the bad byte)."""
    if layout == "json":
        data = json.dumps(rows, indent=1, ensure_ascii=False).encode("latin-1")
    else:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("latin-1")
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)
    return str(path), data.index(BAD_BYTE)


# ------------------------------------------------------------------------------------------------ 1. not UTF-8
@pytest.mark.parametrize("command", list(STAGE_ROWS))
def test_non_utf8_data_file_is_one_line_in_every_stage(tiny, scorers, tmp_path, capsys, command):
    path, offset = latin1_file(tmp_path / "rows.jsonl", ROWS[STAGE_ROWS[command]])
    out = tmp_path / "out"
    rc, err = run(command, capsys, *trainer_args(command, tiny, path, out, scorers))
    assert rc == 2
    assert err == (f"saferlhf-fast {command}: error: {path}: row 2: not UTF-8 text: byte 0xe9 at byte offset "
                   f"{offset} (save the file as UTF-8)")
    assert not out.exists()


@pytest.mark.parametrize("layout, name", [("json", "rows.json"), ("jsonl", "rows.jsonl.gz")])
def test_non_utf8_json_and_compressed_files_name_the_offset(tmp_path, layout, name):
    path, offset = latin1_file(tmp_path / name, ROWS["sft"], layout)
    with pytest.raises(DataError) as info:
        read_file(path)
    text = str(info.value)
    assert f"byte 0xe9 at byte offset {offset}" in text and text.startswith(f"{path}: ")
    if layout == "json":
        line = open(path, "rb").read()[:offset].count(b"\n") + 1
        assert text.startswith(f"{path}: line {line}: not UTF-8 text")
    else:
        assert "of the decompressed data" in text and text.startswith(f"{path}: row 2: ")


def test_non_utf8_ptx_file_is_one_line(tiny, scorers, tmp_path, capsys):
    path, offset = latin1_file(tmp_path / "ptx.jsonl", ROWS["sft"])
    out = tmp_path / "out"
    rc, err = run("ppo-lag", capsys, *trainer_args("ppo-lag", tiny, "synthetic-prompts/train:0.003", out, scorers),
                  "--ptx_datasets", path, "--ptx_coeff", 1.0)
    assert rc == 2 and f"{path}: row 2: not UTF-8 text: byte 0xe9 at byte offset {offset}" in err
    assert not out.exists()


def test_byte_order_mark_is_read_as_utf8(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS["sft"][0]).encode() + b"\n")
    assert read_file(str(path))[0].data == ROWS["sft"][0]


def test_non_utf8_yaml_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"lr: 0.1\n# caf" + BAD_BYTE + b"\n")
    rc, err = run("sft", capsys, "--config", path)
    assert rc == 2 and err.endswith(f"{path}: line 2: not UTF-8 text: byte 0xe9 at byte offset 13 (save the file "
                                    "as UTF-8)")


# ------------------------------------------------------------------------------------------------ 2. config vs weights
def edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))
    return str(dst)


@pytest.mark.parametrize("changes, tensor", [({"hidden_size": 64}, "lm_head.weight"),
                                             ({"intermediate_size": 96}, "model.layers.0.mlp.down_proj.weight")])
def test_config_that_does_not_match_the_weights(tiny, tmp_path, capsys, changes, tensor):
    model = edited_copy(tiny, tmp_path / "edited", **changes)
    out = tmp_path / "out"
    rc, err = run("sft", capsys, *trainer_args("sft", model, "synthetic-sft/test:0.02", out))
    assert rc == 2
    assert f"error: {model}/model.safetensors: {tensor}: checkpoint shape (" in err
    assert f"that {model}/config.json gives (the config does not match the weights" in err
    assert not out.exists()


def test_config_with_more_layers_than_the_weights(tiny, tmp_path, capsys):
    model = edited_copy(tiny, tmp_path / "edited", num_hidden_layers=2)
    rc, err = run("sft", capsys, *trainer_args("sft", model, "synthetic-sft/test:0.02", tmp_path / "out"))
    assert rc == 2 and f"does not match the llama lm model of {model}/config.json: missing [" in err
    assert "model.layers.1." in err and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ 3. vocabulary
@pytest.fixture(scope="module")
def small_vocab(tiny, tmp_path_factory):
    """The tiny model cut to 512 embedding rows (its tokenizer has more tokens)."""
    from safetensors.torch import load_file, save_file

    out = str(tmp_path_factory.mktemp("small_vocab") / "model")
    shutil.copytree(tiny, out)
    state = load_file(os.path.join(out, "model.safetensors"))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = state[key][:512].clone()
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    edited = json.load(open(os.path.join(out, "config.json")))
    edited["vocab_size"] = 512
    json.dump(edited, open(os.path.join(out, "config.json"), "w"))
    return out


def test_vocabulary_smaller_than_the_tokenizer_fails_at_start(tiny, small_vocab, tmp_path, capsys):
    size = len(load_tokenizer(tiny))
    assert size > 512
    out = tmp_path / "out"
    rc, err = run("sft", capsys, *trainer_args("sft", small_vocab, "synthetic-sft/test:0.02", out),
                  "--tokenizer_name_or_path", tiny)
    assert rc == 2
    assert err == (f"saferlhf-fast sft: error: --model_name_or_path {small_vocab}: the model's vocab_size 512 "
                   f"({small_vocab}/config.json) is smaller than the tokenizer's {size} tokens ({tiny}): ids "
                   f"512..{size - 1} have no embedding; use the model's own tokenizer, or a model whose vocabulary "
                   "covers it")
    assert not out.exists()


def test_critic_with_a_smaller_vocabulary_fails_at_start(tiny, scorers, small_vocab, tmp_path, capsys):
    critic = str(tmp_path / "critic")
    shutil.copytree(small_vocab, critic, ignore=shutil.ignore_patterns("tokenizer*"))  # it gets the actor's ids
    out = tmp_path / "out"
    rc, err = run("ppo-lag", capsys, *trainer_args("ppo-lag", tiny, "synthetic-prompts/train:0.003", out, scorers),
                  "--cost_critic_model_name_or_path", critic)
    assert rc == 2 and f"--cost_critic_model_name_or_path {critic}: the model's vocab_size 512" in err
    assert f"tokens ({tiny})" in err and not out.exists()


# ------------------------------------------------------------------------------------------------ 4. critic tokenizer
def test_default_critic_with_another_tokenizer_names_the_fix(tiny, scorers, other, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run("ppo", capsys, "--actor_model_name_or_path", tiny, "--reward_model_name_or_path", other["rm"],
                  "--train_datasets", "synthetic-prompts/train:0.003", "--output_dir", out)
    assert rc == 2
    assert err == (f"saferlhf-fast ppo: error: --reward_model_name_or_path {other['rm']} (the default reward critic): "
                   f"its tokenizer differs from the actor's ({tiny}), and a critic scores the actor's tokens: pass "
                   "--reward_critic_model_name_or_path a model with the actor's tokenizer, e.g. the actor itself")
    assert not out.exists()


def test_given_critic_with_another_tokenizer_is_refused(tiny, scorers, other, tmp_path, capsys):
    rc, err = run("ppo-lag", capsys, *trainer_args("ppo-lag", tiny, "synthetic-prompts/train:0.003",
                                                   tmp_path / "out", scorers),
                  "--cost_critic_model_name_or_path", other["lm"])
    assert rc == 2 and err.startswith(f"saferlhf-fast ppo-lag: error: --cost_critic_model_name_or_path {other['lm']}:"
                                      " its tokenizer differs from the actor's")


def test_reward_model_with_another_tokenizer_is_retokenised(tiny, other, tmp_path, capsys):
    """The fix the message names: the actor as the critic; the reward model keeps its own tokenizer."""
    from saferlhf_fast.trainers.ppo import PPOConfig, PPOTrainer

    cfg = PPOConfig(actor_model_name_or_path=tiny, reward_model_name_or_path=other["rm"],
                    reward_critic_model_name_or_path=tiny, train_datasets=["synthetic-prompts/train:0.003"],
                    output_dir=str(tmp_path / "out"), max_length=64, max_new_tokens=4, per_device_prompt_batch_size=4,
                    per_device_train_batch_size=4, progress=False)
    cfg.validate()
    trainer = PPOTrainer(cfg)
    assert trainer.reward_tokenizer is not None and len(trainer.reward_tokenizer) < len(trainer.tokenizer)
    batch = trainer.train_dataset.collator()([trainer.train_dataset[i] for i in range(4)])
    rows = trainer.train_one_rollout(batch)
    assert rows and all(torch.isfinite(torch.tensor(r["train/reward"])) for r in rows)


# ------------------------------------------------------------------------------------------------ 5. score heads
@pytest.mark.parametrize("role, fix", [("reward", "rm"), ("cost", "cm")])
def test_lm_as_reward_or_cost_model_is_refused(tiny, scorers, tmp_path, capsys, role, fix):
    args = trainer_args("ppo-lag", tiny, "synthetic-prompts/train:0.003", tmp_path / "out", {**scorers, fix: tiny})
    rc, err = run("ppo-lag", capsys, *args)
    assert rc == 2
    assert err == (f"saferlhf-fast ppo-lag: error: --{role}_model_name_or_path {tiny} has no trained score head "
                   f"(score_head.weight missing): train one with `saferlhf-fast {fix}` first")
    assert not (tmp_path / "out").exists()


def test_lm_in_score_and_arena_is_refused(tiny, scorers, tmp_path, capsys):
    rc, err = run("score", capsys, "--model_name_or_path", tiny, "--score_type", "reward", "--datasets",
                  "synthetic-preference/test:0.01", "--output_dir", tmp_path / "score")
    assert rc == 2 and err.endswith(f"--model_name_or_path {tiny} has no trained score head (score_head.weight "
                                    "missing): train one with `saferlhf-fast rm` / `cm` first")
    rc, err = run("arena", capsys, "--red_corner_model_name_or_path", tiny, "--blue_corner_model_name_or_path", tiny,
                  "--reward_model_name_or_path", scorers["rm"], "--cost_model_name_or_path", tiny, "--datasets",
                  "synthetic-prompts/test:0.01", "--output_dir", tmp_path / "arena")
    assert rc == 2 and f"--cost_model_name_or_path {tiny} has no trained score head" in err
    assert not (tmp_path / "score").exists() and not (tmp_path / "arena").exists()


def test_critic_from_the_actor_is_still_supported(tiny, scorers, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["ppo-lag", *map(str, trainer_args("ppo-lag", tiny, "synthetic-prompts/train:0.003", out, scorers)),
               "--reward_critic_model_name_or_path", tiny, "--cost_critic_model_name_or_path", tiny])
    assert rc == 0, capsys.readouterr().err
    from safetensors.torch import load_file

    assert "score_head.weight" in load_file(str(out / "reward_critic" / "model.safetensors"))


# ------------------------------------------------------------------------------------------------ 6. --attn_backend
@pytest.mark.parametrize("command", ["sft", "rm", "cm", "dpo", "score", "ppo", "ppo-lag", "ppo-reward-shaping",
                                     "arena"])
def test_unknown_attn_backend_lists_the_choices(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--attn_backend", "fast"])
    assert info.value.code == 2
    err = one_line_error(capsys)
    assert err.startswith(f"saferlhf-fast {command}: error: argument --attn_backend: invalid choice: 'fast'")
    assert all(f"'{name}'" in err for name in ("sdpa", "native", "flash", "flex", "xformers", "reference"))


def test_unknown_attn_backend_in_yaml(tiny, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("attn_backend: fast\n")
    rc, err = run("sft", capsys, "--config", path, *trainer_args("sft", tiny, "synthetic-sft/test:0.02",
                                                                 tmp_path / "out"))
    assert rc == 2 and err.endswith("--attn_backend 'fast': expected one of sdpa, native, flash, flex, xformers, "
                                    "reference")


# ------------------------------------------------------------------------------------------------ 7. missing data
@pytest.mark.parametrize("spec", ["{missing}", "mine:1.0:{missing}", "PKU-SafeRLHF/train:0.5:{missing}"])
def test_missing_data_file_names_the_flag_and_the_path(tiny, tmp_path, capsys, spec):
    missing = str(tmp_path / "nowhere" / "rows.jsonl")
    out = tmp_path / "out"
    rc, err = run("sft", capsys, *trainer_args("sft", tiny, spec.format(missing=missing), out))
    assert rc == 2 and err == f"saferlhf-fast sft: error: --train_datasets: no such file or folder: {missing}"
    assert not out.exists()


def test_missing_relative_path_and_unknown_name(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    rc, err = run("sft", capsys, *trainer_args("sft", tiny, "data/train", tmp_path / "out"))
    assert rc == 2 and err.endswith("--train_datasets: no such file or folder: data/train")
    rc, err = run("sft", capsys, *trainer_args("sft", tiny, "synthetic-sft/tset", tmp_path / "out"),
                  "--eval_datasets", "synthetic-sft/test")
    assert rc == 2 and "--train_datasets: unknown dataset name 'synthetic-sft/tset' (known: " in err


def test_missing_eval_file_names_its_flag(tiny, scorers, tmp_path, capsys):
    missing = str(tmp_path / "eval.jsonl")
    rc, err = run("ppo-lag", capsys, *trainer_args("ppo-lag", tiny, "synthetic-prompts/train:0.003",
                                                   tmp_path / "out", scorers), "--eval_datasets", missing)
    assert rc == 2 and err.endswith(f"--eval_datasets: no such file or folder: {missing}")


# ------------------------------------------------------------------------------------------------ 8. wording
@pytest.mark.parametrize("line, message", [('{"prompt": "abc', "Unterminated string starting at column 12"),
                                           ('{"prompt": "a\tb"}', "Invalid control character at column 14")])
def test_json_errors_say_at_once(tmp_path, line, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS["sft"][0]) + "\n" + line)  # the last line: no newline inside the string
    with pytest.raises(DataError) as info:
        read_file(str(path))
    assert str(info.value) == f"{path}: row 2: invalid JSON ({message})"


def test_truncation_counts_every_sequence(tiny, caplog):
    tok = load_tokenizer(tiny)
    with caplog.at_level(logging.WARNING, logger="saferlhf_fast.data.datasets"):
        ds = PreferenceDataset(["synthetic-preference/test:0.02"], tok, max_length=28)
    assert ds.num_sequences == 2 * len(ds) and len(ds) < ds.num_truncated <= ds.num_sequences  # more than the pairs
    assert f"{ds.num_truncated} of {ds.num_sequences} sequences were truncated to max_length=28" in caplog.text


def test_no_doubled_words_in_messages():
    """Every string literal of the package (f-strings with their fields as '{}')."""
    import ast
    import pathlib
    import re

    import saferlhf_fast

    doubled = re.compile(r"\b([A-Za-z]+)\s+\1\b", re.IGNORECASE)
    found = []
    for path in pathlib.Path(saferlhf_fast.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            else:
                continue
            found += [f"{path.name}:{node.lineno}: {m.group(0)}" for m in doubled.finditer(text)]
    assert not found


# ------------------------------------------------------------------------------------------------ 9. outputs
def test_score_and_arena_write_only_inside_their_folder(tiny, scorers, tmp_path, capsys, monkeypatch):
    moved, replace = [], os.replace

    def spy(src, dst):
        moved.append((os.path.dirname(os.path.dirname(src)), os.path.dirname(dst)))
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    parent = tmp_path / "results"
    parent.mkdir()
    assert main(["score", "--model_name_or_path", scorers["rm"], "--datasets", "synthetic-preference/test:0.01",
                 "--max_length", "48", "--output_dir", str(parent / "score")]) == 0
    assert main(["arena", "--red_corner_model_name_or_path", tiny, "--blue_corner_model_name_or_path", tiny,
                 "--reward_model_name_or_path", scorers["rm"], "--cost_model_name_or_path", scorers["cm"],
                 "--datasets", "synthetic-prompts/test:0.01", "--max_length", "48", "--max_new_tokens", "4",
                 "--output_dir", str(parent / "arena")]) == 0
    capsys.readouterr()
    assert len(moved) == 4 and all(src == dst for src, dst in moved)  # staged in a folder inside the output folder
    assert sorted(os.listdir(parent)) == ["arena", "score"]
    assert sorted(os.listdir(parent / "score")) == ["eval_results.json", "scores.jsonl"]
    # and the reference's RED_vs_BLUE/table.csv (both corners are the folder "model" here)
    assert sorted(os.listdir(parent / "arena")) == ["arena.json", "arena.jsonl", "model_vs_model"]
    assert os.listdir(parent / "arena" / "model_vs_model") == ["table.csv"]


def test_a_failed_score_write_leaves_nothing_behind(scorers, tmp_path, capsys, monkeypatch):
    from saferlhf_fast.eval import score

    def half_written(folder, *args):
        open(os.path.join(folder, "eval_results.json"), "w").write("{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(score, "_write_files", half_written)
    out = tmp_path / "score"
    rc, err = run("score", capsys, "--model_name_or_path", scorers["rm"], "--datasets",
                  "synthetic-preference/test:0.01", "--max_length", 48, "--output_dir", out)
    assert rc == 1 and "No space left on device" in err
    assert os.listdir(tmp_path) == []  # the folder it made is gone
    out.mkdir()
    rc, err = run("score", capsys, "--model_name_or_path", scorers["rm"], "--datasets",
                  "synthetic-preference/test:0.01", "--max_length", 48, "--output_dir", out)
    assert rc == 1 and os.listdir(out) == []  # a folder it did not make stays, empty
