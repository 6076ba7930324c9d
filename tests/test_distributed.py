"""torchrun + FSDP2 on CPU (gloo, 2 processes spawned by the tests themselves).

* A PPO-Lag step (two RL updates on one rollout) on 2 ranks, each with half of the rollout, gives the same lambda,
  losses and weights (fp32 tolerance) as the whole rollout on 1 rank.
* ``saferlhf-fast rm`` under ``torchrun --nproc_per_node 2`` with per-device batch 4 gives the same losses and
  final weights as one process with per-device batch 8 (same global batches, same order).
* A PPO-Lag run saved on 2 ranks (DCP shards + consolidated Hugging Face export) resumes on 2 ranks and on 1
  process with the same weights, optimizer states and Lagrange window(s), and finishes; a single-process checkpoint
  resumes on 2 ranks.
* A LoRA PPO-Lag run (adapters with dropout on actor and both critics; also with a shared critic backbone) saved on 2
  ranks resumes on 2 ranks to the uninterrupted run's adapters bit for bit (every rank's RNG states are saved), and
  on 1 process; the checkpoint's DCP shards hold no frozen base weight.
* The rollout gathers the actor's FSDP groups once (not per decode step) and frees them after.
* ``saferlhf-fast arena`` under torchrun gives the one-process table.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from saferlhf_fast import distributed
from saferlhf_fast.cli import main
from saferlhf_fast.trainers.modeling import make_tiny_model

WORLD = 2
pytestmark = pytest.mark.distributed


# ------------------------------------------------------------------------------------------------ helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


def _spawn(fn, *args):
    """``fn(rank, port, *args)`` on WORLD spawned ranks (gloo); each rank ends in :func:`_rank_main`."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(fn, _free_port(), *args), nprocs=WORLD, join=True)


def _rank_main(rank, fn, port, *args):
    """Run one rank's worker, then leave as a finished torchrun command does (``distributed.shutdown``: the
    process group torn down on every rank together, after the worker's models are gone), and end the process
    without the interpreter's teardown: the worker's results are in its files, and tearing down torch's C++
    state after gloo has run can abort a rank at exit, which would fail a test whose work is done."""
    fn(rank, port, *args)
    distributed.shutdown(synchronize=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def models(tmp_path_factory, make_score_model):
    root = tmp_path_factory.mktemp("dist_models")
    actor = make_tiny_model(str(root / "actor"), hidden_size=32, num_layers=2, num_heads=2, seed=1)
    return {"actor": actor, "rm": make_score_model(actor, str(root / "rm"), 2),
            "cm": make_score_model(actor, str(root / "cm"), 3, bias=0.3)}


def _ppo_config(models, out, **kw):
    from saferlhf_fast.trainers.ppo import PPOLagConfig

    base = dict(actor_model_name_or_path=models["actor"], reward_model_name_or_path=models["rm"],
                cost_model_name_or_path=models["cm"], train_datasets=["synthetic-prompts/train:0.008"],
                output_dir=str(out), max_length=64, max_new_tokens=8, per_device_prompt_batch_size=4,
                per_device_train_batch_size=4, progress=False, actor_lr=1e-3, critic_lr=1e-3, kl_coeff=0.1,
                lambda_lr=0.5, lambda_max=5.0, seed=3)  # lambda_max: the reference script's cap (no overflow)
    base.update(kw)
    cfg = PPOLagConfig(**base)
    cfg.validate()
    return cfg


def _full_states_from(models) -> dict:
    from saferlhf_fast.models import from_pretrained

    return {"actor": from_pretrained(models["actor"]).state_dict(),
            "reward_critic": from_pretrained(models["rm"], head="score").state_dict(),
            "cost_critic": from_pretrained(models["cm"], head="score").state_dict()}


def _first_prompts(trainer, n):
    from saferlhf_fast.trainers.base import collator_of

    ds = trainer.train_dataset
    return collator_of(ds)([ds[i] for i in range(n)])


def _full_states(trainer) -> dict:
    """Consolidated weights of the trained models (rank 0; None elsewhere)."""
    out = {"actor": distributed.full_state_dict(trainer.actor)}
    for name, critic in zip(trainer.critic_names, trainer.critics):
        out[name] = distributed.full_state_dict(critic)
    return out if distributed.is_main() else None


def _full_optim_states(trainer) -> dict:
    """Optimizer states keyed by parameter name, consolidated on rank 0 (None elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    out = {"actor": get_optimizer_state_dict(trainer.actor, trainer.actor_optimizer, options=opts)}
    for name, critic, opt in zip(trainer.critic_names, trainer.critics, trainer.critic_optimizers):
        out[name] = get_optimizer_state_dict(critic, opt, options=opts)
    return out if distributed.is_main() else None


def _actor_grads(trainer, mb) -> dict:
    """Full gradient of ``masked_mean(logp)`` (per-sequence mean, then batch mean: on equal shards the mean over
    ranks of the rank means is the global mean) w.r.t. the actor, on rank 0; gradients are cleared after."""
    from saferlhf_fast import ops

    logp = trainer._actor_logprobs(mb)
    ops.masked_mean(logp, mb.response_mask).backward()
    grads = {n: distributed.to_local(p.grad).clone() for n, p in trainer.actor.named_parameters() if p.requires_grad}
    trainer.actor_optimizer.zero_grad(set_to_none=True)
    return grads


def _run_steps(trainer, gen, steps=2):
    micro = trainer.score_rollout(gen)
    assert len(micro) == 1
    trainer.grads = _actor_grads(trainer, micro[0])
    rows = []
    for _ in range(steps):
        rows.append(trainer.rl_step(micro[0]))
        trainer.global_step += 1
    return rows


# ------------------------------------------------------------------------------------------------ unit pieces
def test_no_torchrun_environment_means_no_process_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.init("cpu") is False
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    m = {"train/loss": 0.5, "train/max_generated_length": 3.0}
    assert distributed.reduce_metrics(m) is m
    x = torch.arange(3)
    assert distributed.all_gather_tensor(x) is x and distributed.all_true(True)


def test_sampler_shards_are_the_one_rank_batches():
    """Rank r's k-th micro-batch of size g, over all ranks, is the one-rank k-th micro-batch of size 2g, and the
    one-replica sampler order is the single-process order (``epoch_order``)."""
    from saferlhf_fast.trainers.base import epoch_order

    n, g, seed, epoch = 24, 3, 11, 2
    one = distributed.epoch_indices(n, seed, epoch, 0, 1)
    assert one == epoch_order(n, seed, epoch)
    shards = [distributed.epoch_indices(n, seed, epoch, r, WORLD) for r in range(WORLD)]
    for k in range(n // (g * WORLD)):
        union = sorted(i for s in shards for i in s[k * g:(k + 1) * g])
        assert union == sorted(one[k * g * WORLD:(k + 1) * g * WORLD])


def test_redistribute_windows():
    from saferlhf_fast.trainers.ppo import redistribute_windows

    w = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert redistribute_windows(w, 1, 2) == [4.0, 5.0, 6.0]
    assert redistribute_windows(w, 0, 1) == [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
    merged = redistribute_windows([[1.0, 2.0, 3.0, 4.0]], 0, 2) + redistribute_windows([[1.0, 2.0, 3.0, 4.0]], 1, 2)
    assert sorted(merged) == [1.0, 2.0, 3.0, 4.0]


# ------------------------------------------------------------------------------------------------ PPO-Lag step
def _count_rollout_gathers(trainer, gen) -> dict:
    """All-gathers issued by the rollout's generation (``trainer._generate``), the number of FSDP groups of the actor
    and of generated steps; the actor must be sharded again afterwards."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    calls = []
    original = dist.all_gather_single

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    prompts = gen.sequences[:, :gen.prompt_length]
    prompt_mask = gen.attention_mask[:, :gen.prompt_length]
    dist.all_gather_single = counting
    try:
        out = trainer._generate(prompts, prompt_mask, seed=11)
    finally:
        dist.all_gather_single = original
    assert all(isinstance(p, DTensor) for p in trainer.actor.parameters())  # freed after the rollout
    return {"gathered": len(calls), "groups": len(distributed._fsdp_modules(trainer.actor)),
            "steps": out.response_mask.shape[1]}


def _param_dtypes(trainer) -> dict:
    """``{model: {dtype name: parameter count}}`` of the trained and frozen models (sharded: the local shards)."""
    models = {"actor": trainer.actor, "reward_model": trainer.reward_model, **dict(zip(trainer.critic_names,
                                                                                      trainer.critics))}
    out = {}
    for name, model in models.items():
        counts = out.setdefault(name, {})
        for p in model.parameters():
            counts[str(p.dtype)] = counts.get(str(p.dtype), 0) + 1
    return out


def _ppo_step_worker(rank, port, models, out, gen_path, result_path, lora_rank=0, bf16=False):
    _env(rank, port)
    from saferlhf_fast.engine.generate import GenerateOutput
    from saferlhf_fast.trainers.ppo import PPOTrainer

    trainer = PPOTrainer(_ppo_config(models, out, per_device_prompt_batch_size=2, per_device_train_batch_size=2,
                                     lora_rank=lora_rank, bf16=bf16))
    assert distributed.world_size() == WORLD and distributed.is_sharded(trainer.actor)
    assert distributed.is_sharded(trainer.reward_model)
    # a LoRA actor is its own reference (adapters disabled): no second model to shard
    assert (trainer.reference is None) if lora_rank else distributed.is_sharded(trainer.reference)
    g = torch.load(gen_path)
    rows = slice(2 * rank, 2 * rank + 2)  # this rank's half of the global batch
    gen = GenerateOutput(g["sequences"][rows], g["attention_mask"][rows], g["response_mask"][rows],
                         g["logprobs"][rows], g["prompt_length"])
    gathers = _count_rollout_gathers(trainer, gen)
    metrics = _run_steps(trainer, gen)
    states = _full_states(trainer)
    if rank == 0:
        torch.save({"metrics": metrics, "lambda": trainer.lagrange.value, "states": states, "grads": trainer.grads,
                    "gathers": gathers, "dtypes": _param_dtypes(trainer)}, result_path)


@pytest.mark.parametrize("lora_rank,bf16", [(0, False), (4, False), (4, True)], ids=["full", "lora", "lora_bf16"])
def test_ppo_lag_step_on_two_ranks_equals_one_rank(models, tmp_path, lora_rank, bf16):
    """Full fine-tuning, and LoRA on the actor and both critics (frozen sharded bases, sharded adapters); under
    --bf16 the sharded frozen bases are held in bf16 next to fp32 adapters and norms (FSDP2 gathers mixed dtypes)."""
    from saferlhf_fast.trainers.ppo import PPOTrainer

    torch.set_num_threads(1)
    one = PPOTrainer(_ppo_config(models, tmp_path / "one", lora_rank=lora_rank, bf16=bf16))
    batch = _first_prompts(one, 4)
    gen = one._generate(batch["input_ids"], batch["attention_mask"], seed=5)
    assert gen.response_mask.sum() > 8
    gen_path = str(tmp_path / "gen.pt")
    torch.save({"sequences": gen.sequences, "attention_mask": gen.attention_mask, "response_mask": gen.response_mask,
                "logprobs": gen.logprobs, "prompt_length": gen.prompt_length}, gen_path)
    ref_rows = _run_steps(one, gen)
    ref_states = _full_states(one)

    result_path = str(tmp_path / "two.pt")
    _spawn(_ppo_step_worker, models, str(tmp_path / "two"), gen_path, result_path, lora_rank, bf16)
    two = torch.load(result_path, weights_only=False)
    assert two["dtypes"] == _param_dtypes(one)  # the same models held the same way on each rank
    if bf16:  # the bases of every model (actor, critics, scorers) in bf16; adapters, heads and norms fp32
        assert all(set(d) == {"torch.bfloat16", "torch.float32"} for d in two["dtypes"].values())

    g = two["gathers"]  # the rollout gathers each FSDP group of the actor once (prefill + decode steps: >= 2 forwards)
    assert g["groups"] == 3 and g["gathered"] == g["groups"] and g["steps"] >= 2
    assert two["lambda"] == pytest.approx(one.lagrange.value, rel=1e-5)  # J_C: fp32 end costs, other padding
    assert one.lagrange.value != 1.0  # lambda moved (twice)
    # fp32: equal up to fp32 rounding.  bf16: each rank's products see 2 of the 4 rows, and a bf16 output rounded
    # the other way moves a metric by up to ~1 bf16 ulp (measured 1.7e-3 relative on reward_value) and a gradient by
    # 0.4 % of its largest entry; AdamW's m / sqrt(v) turns that into a flipped update (up to 2 lr per step) on
    # coordinates whose gradient is near zero, so there the weights must agree on all but a few coordinates.
    tol = dict(metric=1e-2, grad=5e-2) if bf16 else dict(metric=2e-5, grad=1e-4)
    for a, b in zip(ref_rows, two["metrics"]):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=tol["metric"], abs=tol["metric"] / 10), key
    # Gradients averaged over ranks = the one-rank gradient (AdamW would hide a sum-for-mean slip: it is scale-free).
    assert one.grads.keys() == two["grads"].keys()
    for key, g in one.grads.items():
        diff = float((two["grads"][key] - g).abs().max())
        assert torch.allclose(two["grads"][key], g, rtol=tol["grad"], atol=tol["grad"] * 1e-3), (key, diff)
    # Weights after two AdamW steps at lr 1e-3: equal up to rounding, which AdamW's m / sqrt(v) amplifies
    # on coordinates whose gradient is tiny (1% of one update at most).
    init = _full_states_from(models)
    for name, ref in ref_states.items():
        got = two["states"][name]
        assert ref.keys() == got.keys()
        for key in ref:
            delta = (ref[key].float() - got[key].float()).abs()
            diff = float(delta.max())
            if bf16:
                off = float((delta > 1e-4).float().mean())  # lr / 10
                assert off < 0.02 and diff <= 4e-3, (name, key, off, diff)
                continue
            start = init[name].get(key)  # adapters: not in the input models (B starts at 0, A at random)
            moved = 0.0 if start is None else float((ref[key] - start).abs().max())
            assert diff < 2e-5 and (moved == 0 or diff < 0.01 * moved + 1e-6), (name, key, diff, moved)
    if lora_rank:  # the adapters trained (B starts at 0) and the bases did not move
        assert any(float(v.abs().max()) > 0 for k, v in ref_states["actor"].items() if "lora_B" in k)
        assert all(torch.equal(v, init["actor"][k].to(v.dtype)) for k, v in ref_states["actor"].items()
                   if k in init["actor"])


# ------------------------------------------------------------------------------------------------ rm under torchrun
def _torchrun(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "-m", "saferlhf_fast.cli", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def _jsonl(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_rm_under_torchrun_equals_one_process(tmp_path):
    torch.set_num_threads(1)
    tiny = make_tiny_model(str(tmp_path / "tiny"), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    common = ["--model_name_or_path", tiny, "--train_datasets", "synthetic-preference/test:0.04",
              "--eval_datasets", "synthetic-preference/test:0.02", "--max_length", "64", "--epochs", "2",
              "--gradient_accumulation_steps", "2", "--lr", "1e-3", "--lr_warmup_ratio", "0.2", "--seed", "7",
              "--normalize_score_during_training", "--normalizer_type", "RunningMeanStd", "--progress", "false",
              "--weight_decay", "0.1", "--regularization", "0.001"]  # the reference RM script's values
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert main(["rm", *common, "--per_device_train_batch_size", "4", "--output_dir", one]) == 0
    _torchrun(["rm", *common, "--per_device_train_batch_size", "2", "--output_dir", two])
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    for k in a:
        diff = float((a[k] - b[k]).abs().max())
        assert diff < 2e-6, (k, diff)
    ra, rb = _jsonl(one), _jsonl(two)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and len(ra) >= 4
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for key in x:
            if key != "step":
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), (x["step"], key)
    # only rank 0 wrote: one metrics file, no stray per-rank outputs; the normalizer statistics agree
    na = json.load(open(os.path.join(one, "score_normalizer.json")))
    nb = json.load(open(os.path.join(two, "score_normalizer.json")))
    assert nb["count"] == na["count"] and nb["mean"] == pytest.approx(na["mean"], abs=1e-5)
    assert sorted(os.listdir(one)) == sorted(os.listdir(two))


# ---------------------------------------------------------------------------------------------- save on 2, resume on 1
def _save_worker(rank, port, models, out, result_path):
    _env(rank, port)
    from saferlhf_fast.trainers.ppo import PPOTrainer

    trainer = PPOTrainer(_ppo_config(models, out, per_device_prompt_batch_size=2, per_device_train_batch_size=2,
                                     update_iters=2, max_steps=1))
    summary = trainer.train()
    assert summary["stopped_at"] == 1
    optim = _full_optim_states(trainer)
    windows = distributed.all_gather_object(list(trainer.lagrange.episode_costs))
    if rank == 0:
        torch.save({"optim": optim, "windows": windows, "lambda": trainer.lagrange.value,
                    "global_step": trainer.global_step}, result_path)


@pytest.fixture(scope="module")
def saved_on_two(models, tmp_path_factory):
    """A PPO-Lag run on 2 ranks stopped after rollout 1 (checkpoint-1: DCP shards + exports), and its state."""
    root = tmp_path_factory.mktemp("saved_on_two")
    out = root / "run"
    _spawn(_save_worker, models, str(out), str(root / "saved.pt"))
    ckpt = out / "checkpoint-1"
    assert (ckpt / distributed.SHARDED_DIR).is_dir() and (ckpt / "actor" / "model.safetensors").is_file()
    assert (ckpt / "reward_critic" / "config.json").is_file() and (ckpt / "cost_critic" / "config.json").is_file()
    assert not (out / "model.safetensors").exists()  # stopped: no final export yet
    return out, torch.load(root / "saved.pt", weights_only=False)


def _copy_run(src, tmp_path):
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def _trained(trainer) -> list:
    """(name, model, optimizer) of every model the trainer trains: the actor, then the critics."""
    return [("actor", trainer.actor, trainer.actor_optimizer),
            *zip(trainer.critic_names, trainer.critics, trainer.critic_optimizers)]


def _assert_same_adam(got: dict, ref: dict, name: str) -> None:
    """AdamW's moments and step of every parameter of ``ref`` (an optimizer ``state`` by parameter name) equal in
    ``got``."""
    for pname in ref:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got[pname][key].cpu(), ref[pname][key].cpu()), (name, pname, key)


def _resume_on_one(models, run, saved, tmp_path, **kw):
    """The 2-rank run folder ``run`` copied and resumed on one process, no process group, with the same global batch
    (2 x 2 -> 1 x 4): its checkpoint-1 loaded with the saved step, lambda and Lagrange windows.  Returns
    (config, trainer, run copy, checkpoint)."""
    from saferlhf_fast.trainers.ppo import PPOTrainer

    out = _copy_run(run, tmp_path)
    ckpt = out / "checkpoint-1"
    cfg = _ppo_config(models, out, **{**kw, "per_device_prompt_batch_size": 4, "per_device_train_batch_size": 4},
                      resume="auto")
    trainer = PPOTrainer(cfg)
    assert trainer.resume_from == str(ckpt) and not distributed.is_distributed()
    trainer.load_checkpoint(trainer.resume_from)
    assert trainer.step == 1 and trainer.global_step == saved["global_step"] == 2
    assert trainer.lagrange.value == saved["lambda"]
    assert sorted(trainer.lagrange.episode_costs) == sorted(c for w in saved["windows"] for c in w)
    return cfg, trainer, out, ckpt


def test_ppo_lag_saved_on_two_ranks_resumes_on_two(models, saved_on_two, tmp_path):
    """The same world size: the same optimizer states and lambda, each rank its own Lagrange window."""
    out, saved = saved_on_two
    out = _copy_run(out, tmp_path)
    again = str(tmp_path / "again.pt")
    _spawn(_resume_worker, models, str(out), again, False)
    got = torch.load(again, weights_only=False)
    assert got["step"] == 1 and got["lambda"] == saved["lambda"] and got["window"] == saved["windows"][0]
    for name in saved["optim"]:
        _assert_same_adam(got["optim"][name]["state"], saved["optim"][name]["state"], name)


def test_ppo_lag_saved_on_two_ranks_resumes_on_one(models, saved_on_two, tmp_path):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from saferlhf_fast.trainers.ppo import PPOTrainer

    torch.set_num_threads(1)
    run, saved = saved_on_two
    cfg, trainer, out, ckpt = _resume_on_one(models, run, saved, tmp_path, update_iters=2)
    exported = _weights(str(ckpt / "actor"))
    for k, v in trainer.actor.state_dict().items():
        assert torch.equal(v, exported[k]), k
    for name, model, opt in _trained(trainer):
        got, ref = get_optimizer_state_dict(model, opt)["state"], saved["optim"][name]["state"]
        assert got.keys() == ref.keys()
        _assert_same_adam(got, ref, name)
    # ... and finishes the run (3 rollouts per epoch of 12 prompts at a global batch of 4, 2 RL updates each).
    summary = PPOTrainer(cfg).train()
    assert summary["steps"] == 3 and summary["rl_steps"] == 6
    assert (out / "model.safetensors").is_file() and (out / "cost_critic" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ arena under torchrun
def test_arena_under_torchrun_equals_one_process(models, tmp_path):
    """Prompts split over the ranks, answered greedily and scored there, gathered in prompt order: the same table
    and the same per-prompt rows as one process."""
    torch.set_num_threads(1)
    blue = make_tiny_model(str(tmp_path / "blue"), hidden_size=32, num_layers=2, num_heads=2, seed=9)
    args = ["arena", "--red_corner_model_name_or_path", models["actor"], "--blue_corner_model_name_or_path", blue,
            "--reward_model_name_or_path", models["rm"], "--cost_model_name_or_path", models["cm"],
            "--datasets", "synthetic-prompts/test:0.02", "--max_length", "64", "--max_new_tokens", "6",
            "--per_device_eval_batch_size", "4", "--do_sample", "False"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert main([*args, "--output_dir", one]) == 0
    _torchrun([*args, "--output_dir", two])
    rows_a = [json.loads(x) for x in open(os.path.join(one, "arena.jsonl"))]
    rows_b = [json.loads(x) for x in open(os.path.join(two, "arena.jsonl"))]
    assert len(rows_a) == len(rows_b) >= 5
    for x, y in zip(rows_a, rows_b):
        assert (x["prompt"], x["red_response"], x["blue_response"]) == (y["prompt"], y["red_response"],
                                                                         y["blue_response"])
        for key in ("red_reward", "red_cost", "blue_reward", "blue_cost"):
            assert y[key] == pytest.approx(x[key], abs=1e-5), key
    sa, sb = json.load(open(os.path.join(one, "arena.json"))), json.load(open(os.path.join(two, "arena.json")))
    assert sa["counts"] == sb["counts"] and sa["n"] == sb["n"]


def _resume_worker(rank, port, models, out, result_path, finish=True):
    _env(rank, port)
    from saferlhf_fast.trainers.ppo import PPOTrainer

    cfg = _ppo_config(models, out, per_device_prompt_batch_size=2, per_device_train_batch_size=2, update_iters=2,
                      resume="auto")
    trainer = PPOTrainer(cfg)
    trainer.load_checkpoint(trainer.resume_from)
    optim = _full_optim_states(trainer)
    state = {"optim": optim, "window": list(trainer.lagrange.episode_costs), "lambda": trainer.lagrange.value,
             "step": trainer.step}
    states = _full_states(trainer)
    summary = PPOTrainer(cfg).train() if finish else None
    if rank == 0:
        torch.save({**state, "states": states, "summary": summary}, result_path)


def test_single_process_checkpoint_resumes_on_two_ranks(models, tmp_path):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from saferlhf_fast.trainers.ppo import PPOTrainer

    torch.set_num_threads(1)
    out = tmp_path / "run"
    kw = dict(per_device_prompt_batch_size=4, per_device_train_batch_size=4, update_iters=2)
    trainer = PPOTrainer(_ppo_config(models, out, max_steps=1, **kw))
    assert trainer.train()["stopped_at"] == 1
    assert not (out / "checkpoint-1" / distributed.SHARDED_DIR).exists()  # the single-process format
    result_path = str(tmp_path / "resumed.pt")
    _spawn(_resume_worker, models, str(out), result_path)
    got = torch.load(result_path, weights_only=False)
    assert got["step"] == 1 and got["lambda"] == trainer.lagrange.value
    assert got["window"] == list(trainer.lagrange.episode_costs)  # every rank starts from the saved window
    for name, ref in _full_states(trainer).items():
        for key in ref:
            assert torch.equal(got["states"][name][key], ref[key]), (name, key)
    for name, model, opt in _trained(trainer):
        ref = get_optimizer_state_dict(model, opt)["state"]
        assert got["optim"][name]["state"].keys() == ref.keys()
        _assert_same_adam(got["optim"][name]["state"], ref, name)
    assert got["summary"]["steps"] == 3 and got["summary"]["rl_steps"] == 6
    assert (out / "model.safetensors").is_file() and (out / "reward_critic" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ LoRA save / resume
LORA = dict(per_device_prompt_batch_size=2, per_device_train_batch_size=2, update_iters=2, lora_rank=4,
            lora_dropout=0.1)  # dropout: the adapters' training forwards draw from each rank's RNG


def _lora_runs_worker(rank, port, models, root, result_path, extra):
    """On 2 ranks: a LoRA PPO-Lag run to the end of its epoch (``whole``); the same run stopped after rollout 1
    (``part``), its state recorded and its folder copied (``copy``, for the one-process resume), then resumed to
    the end."""
    import shutil

    _env(rank, port)
    from saferlhf_fast.trainers.ppo import PPOTrainer

    kw = {**LORA, **extra}
    whole = PPOTrainer(_ppo_config(models, os.path.join(root, "whole"), **kw))
    whole.train()
    part = os.path.join(root, "part")
    stopped = PPOTrainer(_ppo_config(models, part, max_steps=1, **kw))
    assert stopped.train()["stopped_at"] == 1
    saved = {"optim": _full_optim_states(stopped), "lambda": stopped.lagrange.value,
             "windows": distributed.all_gather_object(list(stopped.lagrange.episode_costs)),
             "global_step": stopped.global_step}
    if rank == 0:
        shutil.copytree(part, os.path.join(root, "copy"))
    distributed.barrier()
    resumed = PPOTrainer(_ppo_config(models, part, resume="auto", **kw))
    summary = resumed.train()
    if rank == 0:
        torch.save({"saved": saved, "lambda": (whole.lagrange.value, resumed.lagrange.value), "summary": summary},
                   result_path)


def _file_digests(folder) -> dict:
    import hashlib

    def digest(name):
        with open(os.path.join(folder, name), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    return {n: digest(n) for n in sorted(os.listdir(folder))}


def _run_lora_on_two(models, root, **extra):
    inputs = {k: _file_digests(v) for k, v in models.items()}
    result_path = str(root / "result.pt")
    _spawn(_lora_runs_worker, models, str(root), result_path, extra)
    assert {k: _file_digests(v) for k, v in models.items()} == inputs  # the input models were never written
    return torch.load(result_path, weights_only=False)


@pytest.fixture(scope="module")
def lora_on_two(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_on_two")
    return root, _run_lora_on_two(models, root)


def _assert_peft_checkpoint(ckpt, names=("actor", "reward_critic", "cost_critic")) -> None:
    """Every trained model of the checkpoint is a PEFT adapter folder, and no base weight was written: not as a
    Hugging Face file, not in the DCP shards (which hold only the adapters, score heads and their optimizer
    states)."""
    from torch.distributed.checkpoint import FileSystemReader

    from saferlhf_fast.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    for name in names:
        files = set(os.listdir(ckpt / name))
        assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS} <= files and not any(f.startswith("model") for f in files), name
    keys = FileSystemReader(str(ckpt / distributed.SHARDED_DIR)).read_metadata().state_dict_metadata
    model_keys = {k.split(".", 2)[2] for k in keys if k.split(".")[1] == "model"}
    assert model_keys and all(".lora_" in k or k.startswith("score_head.") for k in model_keys), sorted(model_keys)


def _assert_same_adapters(a, b, subs=("", "reward_critic", "cost_critic")) -> None:
    from safetensors.torch import load_file

    from saferlhf_fast.models.lora import ADAPTER_WEIGHTS

    for sub in subs:
        x, y = load_file(str(a / sub / ADAPTER_WEIGHTS)), load_file(str(b / sub / ADAPTER_WEIGHTS))
        assert x.keys() == y.keys() and (sub != "") == ("base_model.model.score_head.weight" in x), sub
        for k in x:
            assert torch.equal(x[k], y[k]), (sub, k, float((x[k] - y[k]).abs().max()))
        assert any(float(v.abs().max()) > 0 for k, v in x.items() if ".lora_B." in k), sub  # the adapters trained


def _assert_resumed_rows(whole, part, skip: int) -> None:
    """metrics.jsonl of the resumed run is the uninterrupted run's, row for row (wall times and throughputs
    aside); ``skip``: the rows written before the stop."""
    def rows(path):
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in _jsonl(path)]

    a, b = rows(whole), rows(part)
    assert len(a) == len(b) > skip and a[skip:] == b[skip:]


def test_lora_ppo_lag_run_on_two_ranks_resumes_exactly(lora_on_two):
    """Actor and both critics LoRA (dropout on): stopped after rollout 1 and resumed on 2 ranks, the run ends with
    the adapters and score heads of the uninterrupted run bit for bit, the same lambda and the same metrics."""
    root, got = lora_on_two
    whole, part = root / "whole", root / "part"
    _assert_peft_checkpoint(part / "checkpoint-1")
    assert not (whole / "model.safetensors").exists() and not (part / "model.safetensors").exists()
    assert got["summary"]["steps"] == 3 and got["summary"]["rl_steps"] == 6
    _assert_same_adapters(whole, part)
    assert got["lambda"][0] == got["lambda"][1] != 1.0
    _assert_resumed_rows(whole, part, skip=2)


def test_lora_ppo_lag_saved_on_two_ranks_resumes_on_one(models, lora_on_two, tmp_path):
    """The same global batch (2 x 2 -> 1 x 4) on one process: the adapters, score heads, optimizer states and lambda
    of the 2-rank checkpoint, and the run finishes."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from saferlhf_fast.models.lora import ADAPTER_WEIGHTS, peft_key
    from saferlhf_fast.trainers.ppo import PPOTrainer

    torch.set_num_threads(1)
    root, got = lora_on_two
    saved = got["saved"]
    cfg, trainer, out, ckpt = _resume_on_one(models, root / "copy", saved, tmp_path, **LORA)
    init = _full_states_from(models)
    for name, model, opt in _trained(trainer):
        exported = load_file(str(ckpt / name / ADAPTER_WEIGHTS))
        state = model.state_dict()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {peft_key(model, n) for n in trainable} == exported.keys()
        for k, v in state.items():
            if k in trainable:
                assert torch.equal(v, exported[peft_key(model, k)]), (name, k)
            else:
                assert torch.equal(v, init[name][k]), (name, k)  # the frozen base: the input model's
        ref, mine = saved["optim"][name]["state"], get_optimizer_state_dict(model, opt)["state"]
        assert mine.keys() == ref.keys() == trainable
        _assert_same_adam(mine, ref, name)
    summary = PPOTrainer(cfg).train()
    assert summary["steps"] == 3 and summary["rl_steps"] == 6
    _assert_peft_checkpoint(ckpt)
    for sub in ("", "reward_critic", "cost_critic"):
        assert (out / sub / ADAPTER_WEIGHTS).is_file() and not (out / sub / "model.safetensors").exists()


@pytest.mark.parametrize("critic_lora_rank", [None, 0], ids=["lora_critics", "value_heads"])
def test_lora_ppo_lag_shared_critic_backbone_on_two_ranks_resumes_exactly(models, tmp_path, critic_lora_rank):
    """``--critic_backbone shared`` on 2 ranks: each critic is its scorer's frozen backbone with LoRA adapters and a
    score head (or, ``--critic_lora_rank 0``, a value head alone); stopped after rollout 1 and resumed, the run ends
    with the uninterrupted run's trained weights bit for bit, lambda and metrics."""
    from safetensors.torch import load_file

    got = _run_lora_on_two(models, tmp_path, critic_backbone="shared",
                           **({} if critic_lora_rank is None else {"critic_lora_rank": critic_lora_rank}))
    whole, part = tmp_path / "whole", tmp_path / "part"
    ckpt = part / "checkpoint-1"
    assert got["summary"]["steps"] == 3 and got["summary"]["rl_steps"] == 6
    if critic_lora_rank is None:
        _assert_peft_checkpoint(ckpt)
        _assert_same_adapters(whole, part)
    else:  # the checkpoint holds the value heads alone; the final critics are whole models (backbone + value head)
        _assert_peft_checkpoint(ckpt, names=("actor",))
        for name in ("reward_critic", "cost_critic"):
            assert sorted(os.listdir(ckpt / name)) == ["value_head.json", "value_head.safetensors"]
            a, b = load_file(str(whole / name / "model.safetensors")), load_file(str(part / name / "model.safetensors"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        _assert_same_adapters(whole, part, subs=("",))
    assert got["lambda"][0] == got["lambda"][1] != 1.0
    _assert_resumed_rows(whole, part, skip=2)
