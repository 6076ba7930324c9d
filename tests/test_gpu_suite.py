"""bench/gpu_suite.sh rehearsed on the CPU (--quick, the extension already built, tests skipped): one call leaves
at most 8 files, what a lent GPU machine returns, with the CSV rows, the report and the packed logs."""
import csv
import os
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_suite_quick_rehearsal_fits_in_eight_files(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, SUITE_SKIP_BUILD="1", SUITE_SKIP_TESTS="1", TMPDIR=str(tmp_path))
    run = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_suite.sh"), str(out), "--quick"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert len(files) <= 8, files
    assert {"suite.log", "performance.md", "suite.tar.gz"} <= set(files), files
    csvs = [f for f in files if f.endswith(".csv")]
    assert {"ops-cpu.csv", "model-cpu.csv", "ppo-step-cpu.csv"} <= set(csvs), files
    for name in csvs:
        with open(out / name, newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows and all(r["device"] and r["timestamp"] for r in rows), name
    with tarfile.open(out / "suite.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("bench_ops.log") for n in names) and any("/plots/" in n for n in names), names
    log = (out / "suite.log").read_text()
    assert "FAIL" not in log and "files in" in log
    assert not any(p.name.startswith("gpu_suite.") for p in tmp_path.iterdir())  # the work folder is removed
