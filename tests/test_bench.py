"""The benchmark commands run at tiny sizes and write well-formed CSV, plots and markdown."""
import csv

import pytest

from saferlhf_fast import _backend
from saferlhf_fast.benchmarks import harness
from saferlhf_fast.cli import main


def test_bench_ops_tiny_writes_csv_plot_and_report(tmp_path, capsys):
    path = tmp_path / "ops.csv"
    assert main(["bench", "ops", "--sizes", "tiny", "--reps", "2", "--warmup", "1", "--csv", str(path)]) == 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == harness.COLUMNS
        rows = list(reader)
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"gather_logprobs", "linear_logprobs", "gae", "ppo_losses", "attention", "lora_linear"}
    providers = {r["provider"] for r in rows}
    assert "baseline" in providers
    if _backend.availability("cpu", "cpu")[0]:
        assert "cpu" in providers
    for r in rows:
        assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"])
        assert r["device"] and r["timestamp"] and "torch=" in r["version"]
        assert r["metric"] in ("time", "memory") and r["unit"] == ("s" if r["metric"] == "time" else "B")
    assert {r["metric"] for r in rows if r["kernel"] == "gather_logprobs"} == {"time", "memory"}
    # appending keeps earlier rows; --overwrite replaces them
    main(["bench", "ops", "--sizes", "tiny", "--kernels", "gae", "--reps", "1", "--warmup", "0", "--csv", str(path)])
    with open(path, newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows) + len([r for r in rows if r["kernel"] == "gae"])
    main(["bench", "ops", "--sizes", "tiny", "--kernels", "gae", "--reps", "1", "--warmup", "0", "--csv", str(path),
          "--overwrite"])
    with open(path, newline="") as f:
        assert {r["kernel"] for r in csv.DictReader(f)} == {"gae"}

    capsys.readouterr()
    assert main(["bench", "report", "--csv", str(path), "--command", "saferlhf-fast bench ops"]) == 0
    out = capsys.readouterr().out
    assert "| kernel | mode |" in out and "saferlhf-fast bench ops" in out
    plots = tmp_path / "plots"
    assert main(["bench", "plot", "--csv", str(path), "--out", str(plots)]) == 0
    if _backend.availability("cpu", "cpu")[0]:
        pngs = list(plots.glob("*.png"))
        assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_write_rows_refuses_foreign_csv(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="unexpected header"):
        harness.write_rows(str(path), [])
    assert path.read_text() == "a,b\n1,2\n"


def test_percentiles():
    assert harness.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert harness.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.2) == pytest.approx(1.8)


def test_roofline_tiny(tmp_path, capsys):
    path = tmp_path / "roof.csv"
    assert main(["bench", "roofline", "--sizes", "tiny", "--reps", "1", "--csv", str(path)]) == 0
    out = capsys.readouterr().out
    assert "x the matmul alone" in out and "bandwidth floor" in out
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    metrics = {(r["kernel"], r["metric"]) for r in rows}
    assert ("linear_logprobs", "tflops") in metrics and ("gather_logprobs", "bandwidth") in metrics
    assert {r["provider"] for r in rows} >= {"matmul", "copy"}
    assert all(float(r["p50"]) > 0 for r in rows)


def test_roofline_per_dtype(tmp_path, capsys):
    """``--dtypes fp32 bf16``: each dtype against its own floors (its own matmul rate and copy bandwidth)."""
    path = tmp_path / "roof.csv"
    assert main(["bench", "roofline", "--sizes", "tiny", "--reps", "1", "--dtypes", "fp32", "bf16",
                 "--csv", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("x the matmul alone") == 2 and ",bf16:" in out and ",fp32:" in out
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for dtype in ("fp32", "bf16"):
        floors = {r["provider"] for r in rows if r["x"].endswith(dtype)}
        assert {"matmul", "copy"} <= floors, dtype
