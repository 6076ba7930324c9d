"""A user's work is never lost or corrupted: owned output folders (refusal, --overwrite_output_dir, inputs, lock),
NaN guards and flag checks for every trainer, SIGINT / SIGTERM checkpoints, resume checks (settings, data, damaged
checkpoints), durable checkpoint writes and injected faults (kill points, disk full, read-only folder)."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from saferlhf_fast.cli import main
from saferlhf_fast.trainers import SFTConfig, SFTTrainer, config_from_args, safety
from saferlhf_fast.trainers.modeling import make_tiny_model
from saferlhf_fast.trainers.safety import NonFiniteError, RunLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), hidden_size=32, num_layers=1,
                           num_heads=2, intermediate_size=64)


def common(tiny, **kw):
    base = dict(model_name_or_path=tiny, train_datasets=["synthetic-sft/test:0.1"], max_length=64, epochs=2,
                per_device_train_batch_size=4, gradient_accumulation_steps=1, lr=1e-3, progress=False, seed=7)
    base.update(kw)
    return base


def argv(command, kw):
    out = [command]
    for key, value in kw.items():
        out.append(f"--{key}")
        out.extend(str(v) for v in value) if isinstance(value, list) else out.append(str(value))
    return out


def sft(kw):
    return SFTTrainer(config_from_args(SFTConfig, kw))


def weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def tree_bytes(folder):
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, files in os.walk(folder) for n in files}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """An uninterrupted run (the target of every interrupted-and-resumed run)."""
    out = str(tmp_path_factory.mktemp("reference") / "run")
    summary = sft(common(tiny, output_dir=out)).train()
    return out, summary["steps"]


def train_rows(out):
    return [json.loads(x)["step"] for x in open(os.path.join(out, "metrics.jsonl")) if "train/loss" in x]


# ------------------------------------------------------------------------------------------------ 1. owned folders
def test_non_empty_output_dir_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(argv("sft", common(tiny, output_dir=str(out)))) == 2
    err = one_line_error(capsys)
    assert "is not empty (notes.txt)" in err and "--overwrite_output_dir" in err
    assert sorted(os.listdir(out)) == ["notes.txt"]


def test_reused_folder_needs_resume_or_overwrite(tiny, tmp_path, capsys):
    out = str(tmp_path / "out")
    sft(common(tiny, output_dir=out, max_steps=2)).train()
    assert main(argv("sft", common(tiny, output_dir=out))) == 2
    assert "--resume to continue the run it holds" in one_line_error(capsys)


def test_overwrite_removes_only_what_a_run_writes(tiny, reference, tmp_path, capsys):
    out = tmp_path / "out"
    sft(common(tiny, output_dir=str(out), max_steps=3, save_interval=1, save_total_limit=5)).train()
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    (out / "data" / "rows.jsonl").write_text("{}\n")
    assert {"checkpoint-1", "checkpoint-3"} <= set(os.listdir(out))
    assert main(argv("sft", common(tiny, output_dir=str(out), overwrite_output_dir=True))) == 0
    names = set(os.listdir(out))
    assert {"notes.txt", "data", "model.safetensors", "metrics.jsonl"} <= names
    assert (out / "data" / "rows.jsonl").read_text() == "{}\n"
    assert not {"checkpoint-1", "checkpoint-2", "checkpoint-3", safety.LOCK_FILE} & names
    assert train_rows(out) == list(range(1, reference[1] + 1))  # metrics.jsonl started fresh
    assert_same_weights(out, reference[0])


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_dir_never_over_an_input_model(tiny, tmp_path, capsys, where):
    before = tree_bytes(tiny)
    out = tiny if where == "same" else os.path.join(tiny, "run")
    assert main(argv("sft", common(tiny, output_dir=out))) == 2
    err = one_line_error(capsys)
    assert "the input model folder --model_name_or_path" in err
    assert tree_bytes(tiny) == before


def test_ppo_output_dir_over_the_reward_model_is_refused(tiny, tmp_path, capsys):
    actor = make_tiny_model(str(tmp_path / "actor"), hidden_size=32, num_layers=1, num_heads=2)
    rc = main(["ppo", "--actor_model_name_or_path", actor, "--reward_model_name_or_path", tiny, "--train_datasets",
               "synthetic-prompts/train:0.003", "--output_dir", os.path.join(tiny, "ppo")])
    assert rc == 2 and "--reward_model_name_or_path" in one_line_error(capsys)


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from saferlhf_fast.trainers.safety import RunLock
    RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def test_lock_keeps_a_second_run_out_and_a_dead_holder_does_not(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(argv("sft", common(tiny, output_dir=str(out)))) == 2
        assert f"is in use by another run (pid {holder.pid}" in one_line_error(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert os.listdir(out) == [safety.LOCK_FILE]  # a killed holder leaves its file, not its lock
    assert main(argv("sft", common(tiny, output_dir=str(out), max_steps=1))) == 0
    assert safety.LOCK_FILE not in os.listdir(out)


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    first = RunLock(str(tmp_path))
    first.acquire()
    with pytest.raises(safety.ConfigError, match=f"in use by another run \\(pid {os.getpid()}"):
        RunLock(str(tmp_path)).acquire()
    first.release()
    second = RunLock(str(tmp_path))
    second.acquire()
    second.release()
    assert not os.path.exists(tmp_path / safety.LOCK_FILE)


def test_resume_drops_partial_and_later_metrics_lines(tiny, reference, tmp_path):
    out = tmp_path / "out"
    sft(common(tiny, output_dir=str(out), max_steps=3)).train()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train/loss": 1.0}\n{"step": 5, "train/lo')  # a later step, then a kill mid-line
    sft(common(tiny, output_dir=str(out), resume="auto")).train()
    assert train_rows(out) == list(range(1, reference[1] + 1))
    assert_same_weights(out, reference[0])


def test_demo_never_deletes_what_it_did_not_create(tmp_path, capsys):
    from saferlhf_fast.pipeline import DEMO_MARKER, prepare_output_dir

    out = tmp_path / "here"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["demo", "--quick", "--output_dir", str(out)]) == 2
    assert "is not empty (notes.txt)" in capsys.readouterr().err
    (out / "sft").mkdir()
    assert main(["demo", "--quick", "--output_dir", str(out), "--overwrite_output_dir"]) == 2
    assert f"sft not written by the demo (no {DEMO_MARKER})" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["notes.txt", "sft"]
    (out / DEMO_MARKER).write_text("")
    prepare_output_dir(str(out), overwrite=True)  # a previous demo's folder: its stage folders go, nothing else
    assert sorted(os.listdir(out)) == [DEMO_MARKER, "notes.txt"]


# ------------------------------------------------------------------------------------------------ 2. NaN guards, flags
@pytest.fixture(scope="module")
def nan_model(tiny, tmp_path_factory):
    import shutil

    from safetensors.torch import load_file, save_file

    out = str(tmp_path_factory.mktemp("nan") / "model")
    shutil.copytree(tiny, out)
    state = load_file(os.path.join(out, "model.safetensors"))
    key = next(k for k in state if "layers.0.mlp" in k)
    state[key][0, 0] = float("nan")
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("command, data", [("sft", "synthetic-sft/test:0.05"), ("rm", "synthetic-preference/test:0.02"),
                                           ("cm", "synthetic-preference/test:0.02"),
                                           ("dpo", "synthetic-preference/test:0.02")])
def test_nan_weight_stops_every_trainer_with_exit_3(nan_model, tmp_path, capsys, command, data):
    out = tmp_path / "out"
    rc = main([command, "--model_name_or_path", nan_model, "--train_datasets", data, "--max_length", "64",
               "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--output_dir", str(out),
               "--progress", "false"])
    err = one_line_error(capsys)
    assert rc == 3, err
    assert "non-finite loss at optimizer step 1 of" in err and "none written yet" in err
    assert not (out / "model.safetensors").exists()


def test_nan_loss_mid_run_keeps_the_last_checkpoint(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    trainer = sft(common(tiny, output_dir=str(out), save_interval=1))
    calls = {"n": 0}
    loss_fn = trainer.loss

    def poisoned(batch):
        calls["n"] += 1
        loss, metrics = loss_fn(batch)
        return (loss * float("nan"), metrics) if calls["n"] == 4 else (loss, metrics)

    monkeypatch.setattr(trainer, "loss", poisoned)
    with pytest.raises(NonFiniteError, match=r"loss at optimizer step 4 of \d+ .*checkpoint-3"):
        trainer.train()
    assert safety.checkpoint_damage(str(out / "checkpoint-3")) is None
    saved = weights(out / "checkpoint-3")
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, saved[k]), k  # no optimizer step after the checkpoint
    assert not (out / "model.safetensors").exists()


def test_nan_gradient_stops_before_the_step(tiny, tmp_path):
    trainer = sft(common(tiny, output_dir=str(tmp_path / "out")))
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    next(trainer.model.parameters()).register_hook(lambda g: g * float("nan"))
    with pytest.raises(NonFiniteError, match="gradient norm at optimizer step 1"):
        trainer.train()
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, start[k]), k
    assert all(p.grad is None for p in trainer.model.parameters())


@pytest.mark.parametrize("flags, message", [
    (["--max_grad_norm", "-1"], "--max_grad_norm must be >= 0, got -1.0 (0 turns clipping off)"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "-0.1"], "--lr must be >= 0, got -0.1"),
    (["--adam_betas", "0.9", "1.0"], "--adam_betas must both be in [0, 1), got [0.9, 1.0]"),
    (["--eval_strategy", "steps", "--eval_interval", "0"], "--eval_interval must be >= 1, got 0"),
    (["--weight_decay", "inf"], "--weight_decay must be a finite number, got inf"),
    (["--max_steps", "0"], "--max_steps must be >= 1, got 0"),
    (["--resume", "--overwrite_output_dir"], "--overwrite_output_dir and --resume are exclusive"),
    (["--resume_allow_changes", "epochs,learning_rate"], "--resume_allow_changes: unknown option(s) learning_rate"),
])
def test_bad_flags_exit_2_with_one_line(tiny, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    for command in ("sft", "dpo"):
        assert main([command, "--model_name_or_path", tiny, "--train_datasets", "synthetic-sft/test",
                     "--output_dir", str(out), *flags]) == 2
        assert message in one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--threshold", "nan"], "--threshold must be a finite number, got nan"),
    (["--max_grad_norm", "-1"], "--max_grad_norm must be >= 0"),
    (["--actor_lr", "nan"], "--actor_lr must be a finite number"),
    (["--adam_betas", "-0.1", "0.9"], "--adam_betas must both be in [0, 1)"),
    (["--eval_interval", "0"], "--eval_interval must be >= 1, got 0"),
])
def test_bad_ppo_lag_flags_exit_2(tiny, tmp_path, capsys, flags, message):
    rc = main(["ppo-lag", "--actor_model_name_or_path", tiny, "--reward_model_name_or_path", tiny,
               "--cost_model_name_or_path", tiny, "--train_datasets", "synthetic-prompts/train",
               "--output_dir", str(tmp_path / "out"), *flags])
    assert rc == 2 and message in one_line_error(capsys)


def test_max_grad_norm_zero_means_no_clipping():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([30.0, 40.0, 0.0])
    norm = safety.clip_gradients([p], 0.0)
    assert float(norm) == 50.0 and torch.equal(p.grad, torch.tensor([30.0, 40.0, 0.0]))
    safety.clip_gradients([p], 5.0)
    assert torch.allclose(p.grad, torch.tensor([3.0, 4.0, 0.0]), rtol=1e-5)


# ------------------------------------------------------------------------------------------------ 3. signals
SLOW_SFT = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(int(sys.argv[1]))
    from saferlhf_fast.trainers.sft import SFTTrainer
    loss = SFTTrainer.loss
    def slow(self, batch):
        time.sleep(0.3)
        return loss(self, batch)
    SFTTrainer.loss = slow
    from saferlhf_fast.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def start_slow_sft(kw):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, "-c", SLOW_SFT, str(torch.get_num_threads()), *argv("sft", kw)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_step(out, proc, timeout=120):
    path = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and train_rows(out):
            return
        time.sleep(0.02)
    raise AssertionError(f"no training step seen (rc {proc.poll()})")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_that_resumes_to_the_same_weights(tiny, reference, tmp_path, sig, code):
    out = str(tmp_path / "out")
    proc = start_slow_sft(common(tiny, output_dir=out))
    wait_for_step(out, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    last = err.strip().splitlines()[-1]
    step = int(last.split("after step ")[1].split()[0])
    assert 1 <= step < reference[1]
    assert f"checkpoint saved to {out}/checkpoint-{step}; run the same command with --resume" in last
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    sft(common(tiny, output_dir=out, resume="auto")).train()
    assert_same_weights(out, reference[0])
    assert train_rows(out) == list(range(1, reference[1] + 1))


def test_second_sigint_aborts_at_once(tiny, tmp_path):
    out = str(tmp_path / "out")
    proc = start_slow_sft(common(tiny, output_dir=out, epochs=20))
    wait_for_step(out, proc)
    proc.send_signal(signal.SIGINT)
    line = ""
    while "SIGINT received" not in line:
        line = proc.stderr.readline()
        assert line, "the process ended before acknowledging SIGINT"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGINT


# ------------------------------------------------------------------------------------------------ 4. resume checks
def test_resume_with_other_settings_is_refused(tiny, reference, tmp_path, capsys):
    out = str(tmp_path / "out")
    sft(common(tiny, output_dir=out, max_steps=2)).train()
    assert main(argv("sft", common(tiny, output_dir=out, resume="auto", lr=2e-3, seed=8))) == 2
    err = one_line_error(capsys)
    # the seed also draws the 10% of the rows: the data changed with it
    assert "settings differ from the saved run: lr 0.001 -> 0.002, seed 7 -> 8, the training data" in err
    assert "seed, the training data cannot change within a run" in err
    assert "--resume_allow_changes lr accepts" in err
    assert main(argv("sft", common(tiny, output_dir=out, resume="auto", seed=8, resume_allow_changes=["seed"]))) == 2
    assert "seed, the training data cannot change" in one_line_error(capsys)
    assert main(argv("sft", common(tiny, output_dir=out, resume="auto", per_device_train_batch_size=2))) == 2
    assert "per_device_train_batch_size 4 -> 2" in one_line_error(capsys)
    assert main(argv("sft", common(tiny, output_dir=out, resume="auto", epochs=3))) == 2
    assert "--resume_allow_changes epochs" in one_line_error(capsys)
    assert main(argv("sft", common(tiny, output_dir=out, resume="auto", epochs=3,
                                   resume_allow_changes=["epochs"]))) == 0
    assert train_rows(out)[-1] == reference[1] * 3 // 2


def test_resume_on_changed_data_is_refused(tiny, tmp_path, capsys):
    rows = [{"prompt": f"question {i} ?", "answer": f"answer {i} ."} for i in range(12)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "out")
    sft(common(tiny, output_dir=out, train_datasets=[str(data)], max_steps=1)).train()
    rows[5]["answer"] = "another answer ."
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(argv("sft", common(tiny, output_dir=out, train_datasets=[str(data)], resume="auto"))) == 2
    assert "the training data (its tokenized rows changed)" in one_line_error(capsys)


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tiny, reference, tmp_path, capsys):
    out = tmp_path / "out"
    sft(common(tiny, output_dir=str(out), max_steps=3, save_interval=1)).train()
    state = out / "checkpoint-3" / "model.safetensors"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    capsys.readouterr()
    trainer = sft(common(tiny, output_dir=str(out), resume="auto"))
    assert trainer.resume_from == str(out / "checkpoint-2")
    assert "checkpoint-3 is damaged (model.safetensors is 100 bytes, expected" in capsys.readouterr().out
    trainer.train()
    assert_same_weights(out, reference[0])
    assert (out / "checkpoint-3.damaged").is_dir()


def test_checkpoint_files_and_folders_are_fsynced_before_the_rename(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    synced, renamed = [], []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def rename(src, dst):
        renamed.append((str(src), str(dst), len(synced)))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    sft(common(tiny, output_dir=str(out), max_steps=1)).train()
    tmp = os.path.realpath(out / ".checkpoint-1.tmp")
    n_before = next(n for _, dst, n in renamed if dst.endswith("checkpoint-1"))
    before = set(synced[:n_before])
    for name in ("model.safetensors", "trainer_state.pt", "manifest.json", "run.json"):
        assert os.path.join(tmp, name) in before, name
    assert tmp in before  # the folder itself
    assert os.path.realpath(out) in synced[n_before:]  # the rename, made durable


class Killed(BaseException):
    """Stands for the process dying at a kill point (nothing after it runs)."""


@pytest.mark.parametrize("point", ["model write", "manifest", "rename"])
def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tiny, reference, tmp_path, monkeypatch, point):
    out = tmp_path / "out"
    trainer = sft(common(tiny, output_dir=str(out), save_interval=2))
    saves = {"n": 0}

    def kill_at(real):
        def wrapped(*args, **kwargs):
            if saves["n"] == 1:
                raise Killed
            return real(*args, **kwargs)
        return wrapped

    real_save = trainer.save_checkpoint

    def counting_save():
        path = real_save()
        saves["n"] += 1
        return path

    monkeypatch.setattr(trainer, "save_checkpoint", counting_save)
    if point == "model write":
        monkeypatch.setattr(trainer, "save_model", kill_at(trainer.save_model))
    elif point == "manifest":
        monkeypatch.setattr(safety, "write_manifest", kill_at(safety.write_manifest))
    else:
        monkeypatch.setattr(os, "rename", kill_at(os.rename))
    with pytest.raises(Killed):
        trainer.train()
    monkeypatch.undo()
    assert safety.find_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert safety.checkpoint_damage(str(out / "checkpoint-2")) is None
    sft(common(tiny, output_dir=str(out), resume="auto")).train()
    assert_same_weights(out, reference[0])


def test_disk_full_during_a_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real_save = torch.save

    def save(obj, path, *a, **kw):
        if ".checkpoint-2.tmp" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    rc = main(argv("sft", common(tiny, output_dir=str(out), save_interval=1)))
    err = one_line_error(capsys)
    assert rc == 1
    assert "could not write checkpoint" in err and "checkpoint-2: No space left on device" in err
    assert safety.checkpoint_damage(str(out / "checkpoint-1")) is None
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert not (out / "model.safetensors").exists()


def test_read_only_output_folder(tiny, tmp_path, monkeypatch, capsys):
    real_open = os.open

    def read_only(path, flags, *a, **kw):
        if str(path).endswith(safety.LOCK_FILE) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", read_only)
    out = tmp_path / "out"
    assert main(argv("sft", common(tiny, output_dir=str(out)))) == 2
    assert f"--output_dir {out}: cannot write (Read-only file system)" in one_line_error(capsys)


def test_ppo_lag_sigint_checkpoint_resumes_to_the_same_weights(tiny, tmp_path, make_score_model):
    from saferlhf_fast.trainers.ppo import PPOLagConfig, PPOTrainer
    from saferlhf_fast.trainers.safety import Interrupted

    rm = make_score_model(tiny, str(tmp_path / "rm"), 2)
    cm = make_score_model(tiny, str(tmp_path / "cm"), 3, bias=0.3)

    def trainer(out, **kw):
        cfg = PPOLagConfig(actor_model_name_or_path=tiny, reward_model_name_or_path=rm, cost_model_name_or_path=cm,
                           train_datasets=["synthetic-prompts/train:0.008"], output_dir=str(out), max_length=64,
                           max_new_tokens=6, per_device_prompt_batch_size=4, per_device_train_batch_size=4,
                           progress=False, actor_lr=1e-3, critic_lr=1e-3, kl_coeff=0.1, lambda_lr=0.5, seed=3, **kw)
        cfg.validate()
        return PPOTrainer(cfg)

    trainer(tmp_path / "a").train()
    interrupted = trainer(tmp_path / "b")
    one_rollout = interrupted.train_one_rollout

    def rollout_then_sigint(batch, logger=None):
        rows = one_rollout(batch, logger)
        os.kill(os.getpid(), signal.SIGINT)  # delivered to the handler train() installed
        return rows

    interrupted.train_one_rollout = rollout_then_sigint
    before = signal.getsignal(signal.SIGINT)  # Python's handler, or SIG_IGN in a background job
    with pytest.raises(Interrupted, match="SIGINT after step 1 of 3: checkpoint saved to .*checkpoint-1") as info:
        interrupted.train()
    assert info.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before  # restored
    trainer(tmp_path / "b", resume="auto").train()
    for name in ("", "reward_critic", "cost_critic"):
        assert_same_weights(tmp_path / "a" / name, tmp_path / "b" / name)


def test_unreadable_trainer_state_is_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    sft(common(tiny, output_dir=str(out), max_steps=1)).train()
    state = out / "checkpoint-1" / "trainer_state.pt"
    state.write_bytes(b"\0" * state.stat().st_size)  # same size: the manifest cannot tell
    assert main(argv("sft", common(tiny, output_dir=str(out), resume="auto"))) == 2
    err = one_line_error(capsys)
    assert f"--resume {out}/checkpoint-1: trainer_state.pt is unreadable" in err


def test_demo_keeps_out_of_a_folder_in_use(tmp_path, capsys):
    lock = RunLock(str(tmp_path))
    lock.acquire()
    try:
        assert main(["demo", "--quick", "--output_dir", str(tmp_path), "--overwrite_output_dir"]) == 2
        assert f"is in use by another run (pid {os.getpid()}" in capsys.readouterr().err
    finally:
        lock.release()


def test_arena_rejects_a_nan_temperature(tiny, capsys):
    rc = main(["arena", "--red_corpus_model_name_or_path", tiny, "--blue_corpus_model_name_or_path", tiny,
               "--reward_model_name_or_path", tiny, "--cost_model_name_or_path", tiny, "--datasets",
               "synthetic-prompts/test", "--temperature", "nan"])
    assert rc == 2 and "--temperature must be a finite number, got nan" in one_line_error(capsys)


def test_interrupted_crosses_a_process_boundary():
    import pickle

    from saferlhf_fast.trainers.safety import Interrupted

    err = pickle.loads(pickle.dumps(Interrupted(signal.SIGTERM, "out/checkpoint-3", 3, 9)))
    assert err.exit_code == 143 and str(err).startswith("interrupted by SIGTERM after step 3 of 9")


def test_run_file_names():
    ours = ["checkpoint-12", "checkpoint-3.damaged", ".checkpoint-4.tmp", ".final.tmp", "model.safetensors",
            "model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json",
            "tokenizer_config.json", "metrics.jsonl", "arguments.json", "results.json", "reward_critic", "cost_critic",
            "score_normalizer.json", safety.LOCK_FILE]
    theirs = ["notes.txt", "data", "checkpoint-x", "checkpoints", "sft", "train.jsonl", "logs", "config.yaml"]
    assert all(safety.is_run_file(n) for n in ours)
    assert not any(safety.is_run_file(n) for n in theirs)


KILLED_IN_COMMIT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(int(sys.argv[1]))
    from saferlhf_fast.trainers import safety
    commit, calls = safety.commit_folder, []
    def killed_in_second_commit(tmp, final):
        calls.append(final)
        if len(calls) == 2:  # the new checkpoint is complete and durable, not yet renamed into place
            safety.write_manifest(tmp)
            safety.fsync_tree(tmp)
            os.kill(os.getpid(), signal.SIGKILL)
        return commit(tmp, final)
    safety.commit_folder = killed_in_second_commit
    from saferlhf_fast.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_sigkill_before_the_rename_resumes_to_the_same_weights(tiny, reference, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILLED_IN_COMMIT, str(torch.get_num_threads()),
                           *argv("sft", common(tiny, output_dir=str(out), save_interval=2))],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert {"checkpoint-2", ".checkpoint-4.tmp", safety.LOCK_FILE} <= set(os.listdir(out))
    sft(common(tiny, output_dir=str(out), resume="auto")).train()  # the dead run's lock does not block
    assert_same_weights(out, reference[0])
    assert train_rows(out) == list(range(1, reference[1] + 1))
