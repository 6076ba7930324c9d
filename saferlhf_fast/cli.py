"""``saferlhf-fast`` command line: one sub-command per job."""
from __future__ import annotations

import argparse
import os
import sys

# Benchmarks write to the untracked runs/bench/ unless --refresh asks for the committed results that the README and
# the docs are generated from: running a command never edits tracked files by default.
RUN_RESULTS = os.path.join("runs", "bench")
COMMITTED_RESULTS = os.path.join("bench", "results")


def _size(args) -> str:
    return args.sizes or ("gpu" if args.device == "cuda" else "default")


def _csv(args, family: str) -> str:
    """Where a benchmark's rows go: ``--csv``, else the committed file with ``--refresh``, else runs/bench/."""
    folder = COMMITTED_RESULTS if getattr(args, "refresh", False) else RUN_RESULTS
    return args.csv or os.path.join(folder, f"{family}-{args.device}.csv")


def _bench_ops(args) -> int:
    from .benchmarks import ops as bench_ops

    csv_path = _csv(args, "ops")
    bench_ops.run(size=_size(args), device=args.device, reps=args.reps, warmup=args.warmup,
                  memory=not args.no_memory, csv_path=csv_path, overwrite=args.overwrite, kernels=args.kernels,
                  timer=args.timer)
    print(f"rows written to {csv_path}")
    return 0


def _bench_roofline(args) -> int:
    from .benchmarks import roofline
    from .benchmarks.harness import write_rows

    rows = roofline.run(size=_size(args), device=args.device, reps=args.reps, warmup=args.warmup,
                        backend=args.backend, dtypes=args.dtypes)
    csv_path = _csv(args, "roofline")
    write_rows(csv_path, rows, overwrite=args.overwrite)
    print(f"rows written to {csv_path}")
    return 0


def _bench_model(args) -> int:
    """bench generate / train-step: ours vs transformers on the same checkpoint."""
    from .benchmarks import model as bench_model

    if args.precisions and len(set(args.precisions)) != len(args.precisions):
        print(f"saferlhf-fast bench {args.what}: error: --precisions: {' '.join(args.precisions)} repeats a precision",
              file=sys.stderr)
        return 2
    if getattr(args, "lora_rank", 0) < 0 or (getattr(args, "lora_rank", 0) > 0 and args.device != "cpu"):
        print(f"saferlhf-fast bench generate: error: --lora_rank {args.lora_rank}: a rank >= 0, measured on the CPU "
              "decode paths (--device cpu)", file=sys.stderr)
        return 2
    csv_path = _csv(args, "model")
    bench_model.run("generate" if args.what == "generate" else "train-step", size=_size(args), device=args.device,
                    reps=args.reps, warmup=args.warmup, memory=not args.no_memory, model=args.model,
                    dtype=args.dtype, batch=args.batch, prompt=args.prompt, new_tokens=args.new_tokens,
                    layouts=tuple(getattr(args, "layouts", None) or ("full", "ragged")), csv_path=csv_path,
                    overwrite=args.overwrite, precisions=args.precisions, vocab=args.vocab,
                    lora_rank=getattr(args, "lora_rank", 0))
    print(f"rows written to {csv_path}")
    return 0


def _bench_ppo_step(args) -> int:
    """bench ppo-step: our PPO(-Lag) step vs the reference-style step, per phase."""
    from dataclasses import replace

    from .benchmarks import ppo_step

    w = replace(ppo_step.SIZES[_size(args)], algorithm=args.algorithm)
    if args.lora_ranks is not None:
        return _bench_ppo_variants(args, w)
    if len(set(args.precisions)) != len(args.precisions):
        print(f"saferlhf-fast bench ppo-step: error: --precisions: {' '.join(args.precisions)} repeats a precision",
              file=sys.stderr)
        return 2
    result = ppo_step.run(w, device=args.device, reps=args.reps, warmup=args.warmup, memory=not args.no_memory,
                          echo=lambda line: print(line, flush=True), precisions=tuple(args.precisions))
    print(ppo_step.format_summary(result["summary"]))
    return _write_ppo_step(args, result, ppo_step.rows(result, args.device))


def _write_ppo_step(args, result: dict, rows: list) -> int:
    """The rows of a ``bench ppo-step`` run to its CSV and, with ``--json``, every rep to the JSON file."""
    from .benchmarks import ppo_step
    from .benchmarks.harness import write_rows

    csv_path = _csv(args, "ppo-step")
    write_rows(csv_path, rows, overwrite=args.overwrite)
    if args.json:
        ppo_step.write_json(args.json, result)
    print(f"rows written to {csv_path}")
    return 0


def _bench_ppo_variants(args, w) -> int:
    """bench ppo-step --lora_ranks: our step per LoRA rank (0: full fine-tuning), no reference-style step."""
    from .benchmarks import ppo_step

    try:
        names = [ppo_step.variant_name(v) for v in args.lora_ranks]
        if len(set(names)) != len(names):
            raise ValueError(f"{' '.join(args.lora_ranks)} repeats a variant")
    except ValueError as err:
        print(f"saferlhf-fast bench ppo-step: error: --lora_ranks: {err}", file=sys.stderr)
        return 2
    result = ppo_step.run_variants(w, args.lora_ranks, device=args.device, reps=args.reps, warmup=args.warmup,
                                   memory=not args.no_memory, echo=lambda line: print(line, flush=True))
    print(ppo_step.format_variants(result["summary"]))
    return _write_ppo_step(args, result, ppo_step.variant_rows(result, args.device))


def _bench_memory(args) -> int:
    """bench memory: the PPO-Lag memory table of 7B / 8B shapes from our accounting (no measurement)."""
    from .benchmarks.memory import table

    for name, value in (("batch", args.batch), ("seq", args.seq), ("lora_rank", args.lora_rank)):
        if value < 1:
            print(f"saferlhf-fast bench memory: error: --{name} must be >= 1, got {value}", file=sys.stderr)
            return 2
    print(table(args.models, rank=args.lora_rank, batch=args.batch, seq=args.seq))
    return 0


def _profile_ppo_step(args) -> int:
    from .benchmarks.profile import profile_ppo_step

    out = args.out or os.path.join("runs", "profile", f"ppo-step-{args.device}")
    profile_ppo_step(out, size=_size(args), device=args.device, algorithm=args.algorithm,
                     warmup=args.warmup, top=args.top)
    return 0


def _bench_plot(args) -> int:
    from .benchmarks.plot import plot

    for path in args.csv:
        for png in plot(path, args.out):
            print(png)
    return 0


def _bench_report(args) -> int:
    from .benchmarks.report import default_csvs, headline, markdown, performance_document, update_readme, write_atomic

    paths = args.csv or default_csvs(args.results)
    if args.readme:
        update_readme(args.readme, headline(args.results))
        print(f"headline table of {args.readme} regenerated from {args.results}/")
    if args.out:
        write_atomic(args.out, performance_document(paths))
        print(f"{args.out} regenerated from {', '.join(paths)}")
    if not args.readme and not args.out:
        print(markdown(paths, command=args.command))
    return 0


def _demo(args) -> int:
    """The whole Safe RLHF pipeline on the bundled synthetic world: SFT -> RM -> CM -> PPO-Lag -> arena."""
    from .data import DataError
    from .pipeline import run_demo
    from .trainers.config import ConfigError

    print("saferlhf-fast demo: tiny Llama, synthetic world, SFT -> reward model -> cost model -> PPO-Lagrangian -> "
          f"arena (output: {args.output_dir})")
    try:
        return _guarded("demo", lambda: run_demo(args.output_dir, quick=args.quick, seed=args.seed,
                                                 progress=args.progress, overwrite=args.overwrite_output_dir))
    except (DataError, ConfigError) as err:
        print(f"saferlhf-fast demo: error: {err}", file=sys.stderr)
        return 2


def _chat(args) -> int:
    """``chat``: bad input (flags, model folders, the prompts file) is one line on stderr and exit status 2;
    Ctrl-C outside an answer leaves with 130."""
    from .data import DataError
    from .eval.chat import ChatConfig, run_chat
    from .models.checkpoint import CheckpointError, UnsupportedArchitectureError
    from .trainers.config import ConfigError, config_from_args

    try:
        return run_chat(config_from_args(ChatConfig, args))
    except (DataError, ConfigError, CheckpointError, UnsupportedArchitectureError) as err:
        print(f"saferlhf-fast chat: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saferlhf-fast chat: interrupted", file=sys.stderr)
        return 130


def _config_command(command: str):
    """(config class, runner) of a configured job (``_config_commands``)."""
    return next((cls, runner) for name, cls, _, runner in _config_commands() if name == command)


def _run_config_command(args) -> int:
    """Every configured job.  Bad input, configuration or checkpoint (an output folder that is not this run's
    included): one line on stderr, exit status 2, and no output folder left behind by this run.  A NaN / inf in
    rewards, costs, losses or gradients: one line, exit status 3, the last checkpoint untouched.  SIGINT / SIGTERM: a
    checkpoint, one line, exit status 130 / 143.  A failed write (disk full, read-only): one line, exit status 1."""
    import shutil

    from .data import DataError
    from .models.checkpoint import CheckpointError, UnsupportedArchitectureError
    from .trainers.config import ConfigError, config_from_args
    from .trainers.launcher_flags import launcher_notes

    config_cls, runner = _config_command(args.command)
    for note in launcher_notes(args, config_cls):
        print(f"saferlhf-fast {args.command}: {note}", file=sys.stderr)
    out_dir, existed = None, True
    try:
        cfg = config_from_args(config_cls, args)
        out_dir = cfg.output_dir
        existed = out_dir is None or os.path.exists(out_dir)
        return _guarded(args.command, lambda: runner(cfg))
    except (DataError, ConfigError, CheckpointError, UnsupportedArchitectureError) as err:
        if not existed and out_dir and os.path.isdir(out_dir):
            shutil.rmtree(out_dir, ignore_errors=True)
        print(f"saferlhf-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


def _guarded(command: str, job) -> int:
    """Run ``job``; the run-time failures of a training job as one line on stderr and an exit status (bad input is
    the caller's: a checkpoint folder without weights is an ``OSError`` too, yet exit status 2)."""
    from .models.checkpoint import CheckpointError
    from .trainers.safety import Interrupted, NonFiniteError

    try:
        job()
    except NonFiniteError as err:
        print(f"saferlhf-fast {command}: stopped: {err}", file=sys.stderr)
        return 3
    except Interrupted as err:
        print(f"saferlhf-fast {command}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"saferlhf-fast {command}: interrupted (no checkpoint written at this point)", file=sys.stderr)
        return 130
    except CheckpointError:
        raise
    except OSError as err:
        print(f"saferlhf-fast {command}: error: {err}", file=sys.stderr)
        return 1
    return 0


def _config_commands():
    """(name, config class, help, runner) of every configured job, in the order of ``--help``; the PPO family's
    commands are its registered algorithms (``trainers.algorithms.ALGORITHMS``)."""
    from .eval.arena import ArenaConfig, run_arena
    from .eval.score import ScoreEvalConfig, evaluate_score_model
    from .trainers import CostConfig, CostTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
    from .trainers.algorithms import ALGORITHMS
    from .trainers.dpo import DPOConfig, DPOTrainer
    from .trainers.ppo import PPOTrainer

    def train(trainer):
        return lambda cfg: trainer(cfg).train()

    return (
        ("sft", SFTConfig, "supervised fine-tuning (loss on response tokens only)", train(SFTTrainer)),
        ("rm", RewardConfig, "reward model: Bradley-Terry on helpfulness preferences", train(RewardTrainer)),
        ("cm", CostConfig, "cost model: Bradley-Terry on harmlessness preferences + safety-sign terms",
         train(CostTrainer)),
        ("score", ScoreEvalConfig, "evaluate a reward or cost model on a preference set", evaluate_score_model),
        *((name, algo.config_class, algo.help, train(PPOTrainer)) for name, algo in ALGORITHMS.items()),
        ("dpo", DPOConfig, "direct preference optimisation on helpfulness pairs", train(DPOTrainer)),
        ("arena", ArenaConfig, "two policies, same prompts, judged by the reward and cost models", run_arena),
    )


def _add_config_commands(sub) -> None:
    from .trainers.config import add_config_arguments
    from .trainers.launcher_flags import add_launcher_arguments

    for name, cls, text, _ in _config_commands():
        p = sub.add_parser(name, help=text, description=text)
        add_config_arguments(p, cls)
        add_launcher_arguments(p, cls)
        p.set_defaults(func=_run_config_command)


class OneLineParser(argparse.ArgumentParser):
    """A bad flag or value: one line on stderr naming it (the choices, for a value outside them), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="saferlhf-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="benchmarks against their baselines, rows appended to a CSV")
    bench_sub = bench.add_subparsers(dest="what", required=True)

    def measured(name: str, text: str, family: str, func, reps: int, warmup: int, memory: bool = True,
                 presets=("tiny", "default", "gpu")):
        """A benchmark sub-command with the options every one of them has."""
        p = bench_sub.add_parser(name, help=text, description=text)
        p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
        p.add_argument("--sizes", choices=presets, default=None,
                       help="size preset (default: 'default' on cpu, 'gpu' on cuda)")
        p.add_argument("--reps", type=int, default=reps, help="timed repetitions (interleaved across providers)")
        p.add_argument("--warmup", type=int, default=warmup)
        if memory:
            p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
        p.add_argument("--csv", default=None, help=f"CSV path (default {RUN_RESULTS}/{family}-<device>.csv)")
        p.add_argument("--refresh", action="store_true",
                       help=f"write the committed {COMMITTED_RESULTS}/{family}-<device>.csv instead (the file the "
                            "README and docs/performance are generated from)")
        p.add_argument("--overwrite", action="store_true", help="replace the CSV instead of appending")
        p.set_defaults(func=func)
        return p

    ops = measured("ops", "log-prob, GAE and loss kernels vs the reference implementation's way", "ops",
                   _bench_ops, reps=7, warmup=2)
    ops.add_argument("--kernels", nargs="*", default=None, help="only these kernels")
    ops.add_argument("--timer", choices=["events", "do_bench"], default="events",
                     help="CUDA timing: CUDA events around one call (default) or one triton.testing.do_bench median "
                          "per repetition (L2 flushed between its runs); CPU: perf_counter either way")
    roof = measured("roofline", "log-prob kernels next to the matmul and bandwidth floors", "roofline",
                    _bench_roofline, reps=5, warmup=1, memory=False)
    roof.add_argument("--backend", default=None, help="op backend to measure (default: the device default)")
    roof.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=None,
                      help="measure each dtype against its own floors: the same device's matmul rate and copy "
                           "bandwidth in that dtype (default: the preset's dtype)")
    for name, text in (("generate", "generation tokens/s and memory: engine.generate vs transformers generate"),
                       ("train-step", "training forward + backward tokens/s and memory, full and ragged batches: "
                                      "our model vs transformers")):
        p = measured(name, text + " (same checkpoint)", "model", _bench_model, reps=5, warmup=1)
        p.add_argument("--model", default=None, help="a Hugging Face checkpoint folder (default: a randomly "
                                                     "initialised Llama of the preset's shape)")
        p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None)
        p.add_argument("--batch", type=int, default=None)
        p.add_argument("--prompt", type=int, default=None, help="prompt tokens")
        p.add_argument("--new-tokens", type=int, default=None, help="generated / response tokens")
        if name == "train-step":
            p.add_argument("--layouts", nargs="+", choices=["full", "ragged"], default=None)
        else:
            p.add_argument("--lora_rank", type=int, default=0,
                           help="R > 0: a LoRA actor (rank-R all-linear adapters, nonzero B) generating with the "
                                "adapters merged vs applied on the fly, on each decode path, plus the merge / packing "
                                "cost of one call (provider = variant; 0: ours vs transformers)")
        p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=None,
                       help="every provider once per precision, repetitions interleaved: bf16 is ours under CPU bf16 "
                            "autocast (fp32 masters, bf16 matmuls) and transformers with bf16 weights; bf16 rows "
                            "carry ':bf16' in their size label")
        p.add_argument("--vocab", type=int, default=None,
                       help="vocabulary of the random checkpoint (default: the preset's; 49152: SmolLM2's)")
    ppo = measured("ppo-step", "one PPO-Lag step vs the reference-style step, per phase", "ppo-step",
                   _bench_ppo_step, reps=5, warmup=1, presets=("tiny", "default", "realistic", "gpu"))
    ppo.add_argument("--algorithm", choices=["ppo-lag", "ppo"], default="ppo-lag")
    ppo.add_argument("--json", default=None, help="also write every rep and the summary here")
    ppo.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                     help="run both steps once per precision, repetitions interleaved: bf16 is our --bf16 (bf16 "
                          "products, fp32 masters, frozen models held in bf16) and the reference's --bf16 True "
                          "(frozen models in bf16, trained ones under bf16 autocast); bf16 rows carry ':bf16' in "
                          "their size label")
    ppo.add_argument("--lora_ranks", nargs="+", default=None, metavar="R[:ref-copy|:shared]",
                     help="measure our step once per variant instead, repetitions interleaved, peak and resident "
                          "memory per variant: 0 full fine-tuning, R LoRA rank R (the reference is the actor's base "
                          "with adapters off), R:ref-copy the same with a second copy of the base as the reference, "
                          "R:shared LoRA rank R with --critic_backbone shared (the critics' adapters on the reward / "
                          "cost models' bases)")
    mem_text = ("PPO-Lag GPU memory of 7B / 8B shapes, full fine-tuning vs LoRA vs LoRA + shared reference (and "
                "critic backbones), from our accounting (saferlhf_fast/benchmarks/memory.py: parameters, gradients, "
                "optimizer state, activations)")
    mem = bench_sub.add_parser("memory", help=mem_text, description=mem_text)
    mem.add_argument("--models", nargs="+", choices=["llama2-7b", "llama3-8b"], default=["llama2-7b", "llama3-8b"])
    mem.add_argument("--lora_rank", type=int, default=16)
    mem.add_argument("--batch", type=int, default=8, help="sequences per training micro-batch")
    mem.add_argument("--seq", type=int, default=512, help="tokens per sequence (prompt + response)")
    mem.set_defaults(func=_bench_memory)
    plot = bench_sub.add_parser("plot", help="PNG charts (speed-up, memory ratio) from benchmark CSVs")
    plot.add_argument("--csv", required=True, nargs="+")
    plot.add_argument("--out", default=os.path.join(RUN_RESULTS, "plots"))
    plot.set_defaults(func=_bench_plot)
    report = bench_sub.add_parser("report", help="markdown tables from benchmark CSVs (docs/performance.md, the "
                                                 "README's headline table)")
    report.add_argument("--csv", nargs="+", default=None,
                        help="CSV files for the document (default: RESULTS/{ops,model,ppo-step,roofline}-"
                             "{cpu,cuda}.csv)")
    report.add_argument("--command", default=None, help="the command that reproduces rows with none recorded")
    report.add_argument("--readme", default=None,
                        help="rewrite the headline table between this file's <!-- perf:begin --> / end markers")
    report.add_argument("--results", default=COMMITTED_RESULTS,
                        help="folder of the CSVs the headline table (and, without --csv, the document) is made from")
    report.add_argument("--out", default=None, help="write the whole performance document here (docs/performance.md) "
                                                    "instead of printing")
    report.set_defaults(func=_bench_report)

    prof = sub.add_parser("profile", help="torch.profiler trace + per-phase and per-kernel tables")
    prof_sub = prof.add_subparsers(dest="what", required=True)
    pp = prof_sub.add_parser("ppo-step", help="one real PPO(-Lag) step of our trainer under torch.profiler")
    pp.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    pp.add_argument("--sizes", choices=["tiny", "default", "realistic", "gpu"], default=None,
                    help="workload of bench ppo-step (default: 'default' on cpu, 'gpu' on cuda)")
    pp.add_argument("--algorithm", choices=["ppo-lag", "ppo"], default="ppo-lag")
    pp.add_argument("--warmup", type=int, default=1, help="unprofiled steps first")
    pp.add_argument("--top", type=int, default=20, help="rows of the kernel table")
    pp.add_argument("--threads", type=int, default=None)
    pp.add_argument("--out", default=None, help="output folder (default runs/profile/ppo-step-<device>)")
    pp.set_defaults(func=_profile_ppo_step)

    demo = sub.add_parser("demo", help="the embedded default job (CPU, minutes)")
    demo.add_argument("--quick", action="store_true", help="tiny sizes (seconds; the numbers mean nothing)")
    demo.add_argument("--output_dir", default=os.path.join("runs", "demo"), help="where every stage and the report go")
    demo.add_argument("--overwrite_output_dir", action="store_true",
                      help="replace a previous demo's stage folders and reports there (nothing else)")
    demo.add_argument("--seed", type=int, default=42)
    demo.add_argument("--progress", action="store_true", help="show progress bars")
    demo.set_defaults(func=_demo)

    _add_config_commands(sub)

    from .eval.chat import ChatConfig
    from .trainers.config import add_config_arguments

    chat_help = ("talk to a model (or two, side by side) in the terminal, streaming its answers; --prompts / --output: "
                 "answer a prompt file into JSONL")
    chat = sub.add_parser("chat", help=chat_help, description=chat_help)
    add_config_arguments(chat, ChatConfig)
    chat.set_defaults(func=_chat)

    docs = sub.add_parser("docs", help="reference documents generated from the code")
    docs_sub = docs.add_subparsers(dest="what", required=True)
    cli_doc = docs_sub.add_parser("cli", help="every command and flag (docs/cli.md), rendered from this parser")
    cli_doc.add_argument("--out", default=None, help="write here (e.g. docs/cli.md) instead of printing")
    cli_doc.set_defaults(func=_docs_cli)
    return parser


def _docs_cli(args) -> int:
    from .clidoc import render

    text = render(build_parser())
    if args.out is None:
        sys.stdout.write(text)
        return 0
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import shlex

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sft"]:
        from .trainers.launcher_flags import hf_trainer_refusal

        refusal = hf_trainer_refusal(argv[1:])
        if refusal:
            print(f"saferlhf-fast sft: error: {refusal}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    from .settings import SettingsError, settings

    try:
        settings()  # every environment variable, read (and checked) once, before any command runs
    except SettingsError as err:
        print(f"saferlhf-fast: error: {err}", file=sys.stderr)
        return 2
    from .runtime import tune_allocator

    tune_allocator()  # keep freed activations in the heap instead of page-faulting them in every step
    if args.command in ("bench", "profile"):
        from .benchmarks.harness import set_command

        set_command(" ".join(shlex.quote(a) for a in ["saferlhf-fast", *argv]))
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
    from ._backend import StaleExtensionError

    try:
        rc = args.func(args)
    except StaleExtensionError as err:
        print(f"saferlhf-fast: error: {err}", file=sys.stderr)
        return 2
    from . import distributed

    distributed.shutdown(synchronize=True)  # under torchrun: every rank leaves together
    return rc


if __name__ == "__main__":
    sys.exit(main())
