"""`saferlhf-fast bench generate|train-step|ppo-step`, `profile ppo-step`, `bench report --readme` and the bench/
wrappers at tiny sizes: well-formed CSV (columns, finite numbers, the reproducing command), trace JSON with our
record_function ranges, markdown tables."""
import csv
import importlib.util
import json
import math
import os

import pytest

from saferlhf_fast.benchmarks import harness
from saferlhf_fast.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == harness.COLUMNS
        return list(reader)


def check_rows(rows, command_prefix):
    assert rows
    for r in rows:
        p20, p50, p80 = float(r["p20"]), float(r["p50"]), float(r["p80"])
        assert all(math.isfinite(v) for v in (p20, p50, p80)), r
        assert p20 <= p50 <= p80, r
        assert r["metric"] == "memory" or p50 > 0, r
        assert r["device"] and r["timestamp"] and "torch=" in r["version"] and "git=" in r["version"]
        assert r["command"].startswith(command_prefix), r["command"]
        assert {"time": "s", "memory": "B", "throughput": "tokens/s"}[r["metric"]] == r["unit"]


@pytest.mark.parametrize("what", ["generate", "train-step"])
def test_bench_model_precisions_tiny(tmp_path, capsys, what):
    """--precisions fp32 bf16: every provider once per precision in one run; bf16 rows carry ``:bf16`` in their size
    label (ours under autocast, transformers in bf16), so each precision pairs ours with its own transformers row;
    --vocab sets the random checkpoint's vocabulary (named in the rows' x)."""
    path = tmp_path / "model.csv"
    extra = ["--layouts", "full"] if what == "train-step" else []
    assert main(["bench", what, "--sizes", "tiny", "--reps", "1", "--warmup", "0", "--no-memory", *extra,
                 "--precisions", "fp32", "bf16", "--vocab", "1000", "--csv", str(path)]) == 0
    rows = read_rows(path)
    check_rows(rows, f"saferlhf-fast bench {what} --sizes tiny")
    sizes = {r["x"] for r in rows}
    assert len(sizes) == 2 and all(x.startswith("llama-tiny-V1000:") for x in sizes)
    fp32 = {r["provider"] for r in rows if not r["x"].endswith(":bf16")}
    bf16 = {r["provider"] for r in rows if r["x"].endswith(":bf16")}
    assert fp32 == bf16 and "saferlhf_fast" in fp32 and len(fp32) >= 2
    assert capsys.readouterr().out.count("saferlhf_fast") >= 2
    assert main(["bench", what, "--sizes", "tiny", "--precisions", "bf16", "bf16", "--csv", str(path)]) == 2


def test_bench_generate_and_train_step_tiny(tmp_path, capsys):
    path = tmp_path / "model.csv"
    assert main(["bench", "generate", "--sizes", "tiny", "--reps", "1", "--warmup", "0", "--no-memory",
                 "--csv", str(path)]) == 0
    gen = read_rows(path)
    check_rows(gen, "saferlhf-fast bench generate --sizes tiny")
    assert {r["kernel"] for r in gen} == {"generate"}
    assert {"hf_dynamic", "saferlhf_fast"} <= {r["provider"] for r in gen}
    assert {r["metric"] for r in gen} == {"throughput"}

    assert main(["bench", "train-step", "--sizes", "tiny", "--reps", "1", "--warmup", "0", "--csv", str(path),
                 "--layouts", "full", "ragged", "--no-memory"]) == 0
    rows = read_rows(path)
    assert rows[:len(gen)] == gen  # appended
    train = rows[len(gen):]
    check_rows(train, "saferlhf-fast bench train-step")
    assert {(r["mode"], r["provider"], r["metric"]) for r in train} == {
        (layout, p, "throughput") for layout in ("full", "ragged") for p in ("hf", "saferlhf_fast")}
    out = capsys.readouterr().out
    assert "train_fwd_bwd" in out and "rows written to" in out

    # the report names machine, date and command per table; the plot command draws the rates
    assert main(["bench", "report", "--csv", str(path)]) == 0
    report = capsys.readouterr().out
    assert "`saferlhf-fast bench generate --sizes tiny" in report and "`saferlhf-fast bench train-step" in report
    assert harness.device_name("cpu") in report and "tokens/s" in report
    assert main(["bench", "plot", "--csv", str(path), "--out", str(tmp_path / "plots")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert "generate-decode-throughput.png" in pngs and "train_fwd_bwd-ragged-throughput.png" in pngs


def test_model_memory_in_a_fresh_process(tmp_path):
    """The CPU peak-memory path of the model benchmarks: the builder runs again in a spawned process (one provider
    here; the CLI measures every provider)."""
    from saferlhf_fast.benchmarks import model

    ckpt = model.make_checkpoint(str(tmp_path / "ckpt"), model.SIZES["tiny"]["model"])
    case = harness.Case("train_fwd_bwd", "saferlhf_fast", "ragged", "x",
                        "saferlhf_fast.benchmarks.model:build_train_step",
                        dict(provider="saferlhf_fast", path=ckpt, vocab=512, batch=2, prompt=8, new_tokens=8,
                             layout="ragged", dtype="fp32", device="cpu"))
    peak = harness.peak_memory(case, "cpu")
    assert isinstance(peak, int) and 0 <= peak < 2**30


def test_bench_ppo_step_tiny(tmp_path, capsys):
    path, js = tmp_path / "ppo.csv", tmp_path / "ppo.json"
    assert main(["bench", "ppo-step", "--sizes", "tiny", "--reps", "1", "--warmup", "0", "--csv", str(path),
                 "--json", str(js)]) == 0
    rows = read_rows(path)
    check_rows(rows, "saferlhf-fast bench ppo-step")
    assert {r["provider"] for r in rows} == {"saferlhf_fast", "reference-style"}
    assert {r["mode"] for r in rows} == {"step", "generation", "scoring", "gae", "actor", "critics"}
    assert {(r["mode"], r["metric"]) for r in rows if r["mode"] == "step"} == {
        ("step", "time"), ("step", "throughput"), ("step", "memory")}
    result = json.loads(js.read_text())
    assert result["summary"]["workload"]["algorithm"] == "ppo-lag" and len(result["runs"]["ours"]) == 1
    assert "speed-up" in capsys.readouterr().out


def test_bench_ppo_step_precisions(tmp_path, capsys):
    """``--precisions fp32 bf16``: both steps per precision in one run; the bf16 rows carry ``:bf16`` in their size
    label, so each precision's rows pair ours with the reference-style step of the same precision."""
    path, js = tmp_path / "ppo.csv", tmp_path / "ppo.json"
    assert main(["bench", "ppo-step", "--sizes", "tiny", "--reps", "1", "--warmup", "0", "--no-memory",
                 "--precisions", "fp32", "bf16", "--csv", str(path), "--json", str(js)]) == 0
    rows = read_rows(path)
    check_rows(rows, "saferlhf-fast bench ppo-step")
    sizes = {r["x"] for r in rows}
    assert len(sizes) == 2 and {x.endswith(":bf16") for x in sizes} == {True, False}
    for x in sizes:
        assert {r["provider"] for r in rows if r["x"] == x} == {"saferlhf_fast", "reference-style"}
    result = json.loads(js.read_text())
    assert set(result["runs"]) == {"ours", "reference-style", "ours:bf16", "reference-style:bf16"}
    assert set(result["summary"]["speedups"]) == {"fp32", "bf16"} and result["summary"]["bf16_vs_fp32"] > 0
    assert "ours in bf16 vs ours in fp32" in capsys.readouterr().out
    assert main(["bench", "ppo-step", "--sizes", "tiny", "--precisions", "bf16", "bf16", "--csv", str(path)]) == 2


def test_profile_ppo_step_tiny(tmp_path):
    out = tmp_path / "prof"
    assert main(["profile", "ppo-step", "--sizes", "tiny", "--warmup", "0", "--out", str(out)]) == 0
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    for phase in ("step", "rollout", "generation", "scoring", "rl_step", "lagrange", "actor", "critics", "gae",
                  "losses"):
        assert f"ppo/{phase}" in names, phase
    with open(out / "phases.csv", newline="") as f:
        phases = {r["phase"]: r for r in csv.DictReader(f)}
    assert {"step", "generation", "scoring", "actor", "critics", "gae"} <= set(phases)
    assert float(phases["step"]["share_of_step"]) == pytest.approx(1.0)
    assert all(math.isfinite(float(r["wall_ms"])) and float(r["wall_ms"]) >= 0 for r in phases.values())
    with open(out / "kernels.csv", newline="") as f:
        kernels = list(csv.DictReader(f))
    assert 0 < len(kernels) <= 20
    assert all(float(r["self_ms"]) > 0 for r in kernels)
    assert [float(r["self_ms"]) for r in kernels] == sorted((float(r["self_ms"]) for r in kernels), reverse=True)
    md = (out / "profile.md").read_text()
    assert "| phase |" in md and "| name |" in md


def test_report_rewrites_readme_headline_and_writes_the_document(tmp_path):
    rows = [harness.row("gae", prov, "forward", "time", "s", "streams=2,b=64,t=1024,fp32", t, t * 0.9, t * 1.1, "",
                        "cpu") for prov, t in (("baseline", 0.02), ("cpu", 0.001))]
    path = tmp_path / "ops-cpu.csv"
    harness.write_rows(str(path), rows)
    readme = tmp_path / "README.md"
    readme.write_text("# x\nbefore\n<!-- perf:begin -->\nold table\n<!-- perf:end -->\nafter\n")
    assert main(["bench", "report", "--results", str(tmp_path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\nbefore\n<!-- perf:begin -->\n") and text.endswith("<!-- perf:end -->\nafter\n")
    assert "old table" not in text and "**20.00x faster**" in text
    assert "[ops-cpu.csv](bench/results/ops-cpu.csv)" in text
    again = readme.read_text()
    assert main(["bench", "report", "--results", str(tmp_path), "--readme", str(readme)]) == 0
    assert readme.read_text() == again  # regenerating is idempotent
    doc = tmp_path / "performance.md"
    assert main(["bench", "report", "--csv", str(path), "--out", str(doc)]) == 0
    body = doc.read_text()
    assert body.startswith("# Performance") and "20.00x faster" in body and harness.device_name("cpu") in body
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit):
        main(["bench", "report", "--results", str(tmp_path), "--readme", str(readme)])


def test_headline_pairs_bf16_rows_with_their_own_baselines(tmp_path):
    """A ``:bf16`` PPO-step row is compared with the fp32 row of our step (``--bf16`` vs fp32) and with the
    reference-style bf16 row; the fp32 headline never picks a bf16 row."""
    from saferlhf_fast.benchmarks.report import headline

    label = "ppo-lag:h256,i688,L4,H4,V49152:B8xP64+T256"
    times = {("saferlhf_fast", label): 3.0, ("reference-style", label): 12.0,
             ("saferlhf_fast", label + ":bf16"): 1.5, ("reference-style", label + ":bf16"): 6.0}
    rows = [harness.row("ppo_step", prov, "step", "time", "s", x, t, t, t, "", "cpu") for (prov, x), t in times.items()]
    harness.write_rows(str(tmp_path / "ppo-step-cpu.csv"), rows)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in headline(str(tmp_path)).splitlines()[2:]}
    assert "**4.00x faster**" in lines["PPO-Lag step, realistic shape (V 49152, 8 x 64-token prompts, 256 new tokens)"]
    assert "**2.00x faster**" in lines["PPO-Lag step, realistic shape, `--bf16` vs our fp32 step"]
    assert "(saferlhf_fast, fp32)" in lines["PPO-Lag step, realistic shape, `--bf16` vs our fp32 step"]
    both = [v for k, v in lines.items() if k.startswith("same, both in bf16")]
    assert len(both) == 1 and "**4.00x faster**" in both[0] and "1.5 s" in both[0]


def test_write_rows_upgrades_csv_without_command_column(tmp_path):
    path = tmp_path / "old.csv"
    legacy = harness.COLUMNS[:-1]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=legacy)
        w.writeheader()
        w.writerow({k: "1" for k in legacy})
    harness.set_command("saferlhf-fast bench test")
    try:
        harness.write_rows(str(path), [harness.row("k", "p", "m", "time", "s", "x", 1, 1, 1, "", "cpu")])
    finally:
        harness.set_command(None)
    rows = read_rows(path)
    assert [r["command"] for r in rows] == ["", "saferlhf-fast bench test"]


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def keep_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_bench_scripts_are_thin_wrappers(tmp_path, capsys, keep_threads):
    ppo = _load_script("bench_ppo_step")
    legacy, rows_csv = tmp_path / "ppo_step.csv", tmp_path / "rows.csv"
    assert ppo.main(["--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "2", "--vocab", "1152",
                     "--batch", "2", "--prompt_len", "4", "--new_tokens", "4", "--reps", "1", "--warmup", "0",
                     "--threads", "1", "--csv", str(legacy), "--rows-csv", str(rows_csv)]) == 0
    with open(legacy, newline="") as f:
        got = list(csv.DictReader(f))
    assert [r["engine"] for r in got] == ["ours", "reference-style"] and float(got[0]["speedup"]) > 0
    check_rows(read_rows(rows_csv), "python bench/bench_ppo_step.py --hidden 32")
    for name in ("PHASES", "build", "make_trainer", "our_step"):  # used by bench/trl_compare.py
        assert hasattr(ppo, name)

    model = _load_script("bench_model")
    path = tmp_path / "model.csv"
    model.main(["--batch", "1", "--prompt", "4", "--new-tokens", "2", "--reps", "1", "--warmup", "0",
                "--csv", str(path)])
    rows = read_rows(path)
    check_rows(rows, "python bench/bench_model.py --batch 1")
    assert {r["kernel"] for r in rows} == {"generate", "train_fwd_bwd"}
    assert "vs HF" in capsys.readouterr().out


def test_bench_writes_untracked_results_unless_refresh(tmp_path, monkeypatch, capsys):
    """A plain `bench` run never edits the committed results: rows go to runs/bench/ (path printed); only
    --refresh writes bench/results/."""
    monkeypatch.chdir(tmp_path)
    args = ["bench", "ops", "--sizes", "tiny", "--reps", "1", "--warmup", "0", "--no-memory", "--kernels", "gae"]
    assert main(args) == 0
    plain = tmp_path / "runs" / "bench" / "ops-cpu.csv"
    assert plain.is_file() and not (tmp_path / "bench").exists()
    assert f"rows written to {os.path.join('runs', 'bench', 'ops-cpu.csv')}" in capsys.readouterr().out
    assert main([*args, "--refresh"]) == 0
    assert (tmp_path / "bench" / "results" / "ops-cpu.csv").is_file()
    check_rows(read_rows(plain), "saferlhf-fast bench ops")
