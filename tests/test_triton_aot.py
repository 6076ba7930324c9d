"""The ahead-of-time compile check (saferlhf_fast/benchmarks/triton_aot.py, ``make triton-check``): a small kernel
config really goes through Triton's compiler to an sm_90 cubin here, with no GPU, and the check refuses kernels that
its AOT_KERNELS tables do not cover.

conftest.py sets TRITON_INTERPRET=1 for the interpreter tests, and a triton imported that way cannot compile (its
own tl.* helpers become interpreter functions), so the compiles run in a child process without the variable; the
coverage checks need no compile and run here (the AOT path loads its own, jit, copies of the kernel modules)."""
import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from saferlhf_fast.benchmarks import triton_aot as aot

ROOT = Path(__file__).resolve().parent.parent


def _run(args, **kw):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def jobs():
    return aot.build_jobs(aot.load_kernel_modules())


def test_every_kernel_has_jobs(jobs):
    names = {j.name for j in jobs}
    assert {"_gae_kernel", "_logprobs_fwd_kernel", "_logprobs_bwd_kernel", "_ppo_clip_kernel",
            "_clipped_value_kernel", "_kl_rewards_kernel"} <= names
    # the configs come from the launchers' own launch_config: the GPU caps are the largest blocks compiled
    from saferlhf_fast.kernels import gae, logprobs

    assert max(j.constexprs["BLOCK_T"] for j in jobs if j.name == "_gae_kernel") == gae.GPU_MAX_BLOCK_T
    fwd = [j for j in jobs if j.name == "_logprobs_fwd_kernel"]
    assert max(j.constexprs["BLOCK_V"] for j in fwd) == logprobs.GPU_MAX_BLOCK_V
    assert {j.dtype for j in fwd} == set(logprobs.LOGITS_DTYPES)
    assert all(j.options["num_warps"] == logprobs.launch_config(j.constexprs["BLOCK_V"])["num_warps"] for j in fwd)


_COMPILE_ONE = """
import json
from saferlhf_fast.benchmarks import triton_aot as aot
jobs = [j for j in aot.build_jobs(aot.load_kernel_modules(), "_gae_kernel") if j.dtype == "u8"]
job = min(jobs, key=lambda j: j.constexprs["BLOCK_T"])
with aot.compile_env():
    res = aot.compile_job(job, 90)
print(json.dumps({"error": res.error, "magic": res.cubin[:4].hex(), "cubin_bytes": res.cubin_bytes,
                  "registers": res.registers, "spill_stores": res.spill_stores, "num_warps": res.num_warps,
                  "want_warps": job.options["num_warps"]}))
"""


def test_compiles_for_sm90():
    proc = _run(["-c", _COMPILE_ONE])
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["error"] == ""
    assert res["magic"] == b"\x7fELF".hex() and res["cubin_bytes"] > 0
    assert res["registers"] > 0
    assert res["spill_stores"] >= 0 and res["num_warps"] == res["want_warps"]


def test_cli_writes_csv(tmp_path):
    out = tmp_path / "aot.csv"
    proc = _run(["-m", "saferlhf_fast.benchmarks.triton_aot", "--kernel", "_kl_rewards", "--quick", "--arch", "90",
                 "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert str(out) in proc.stdout
    rows = list(csv.DictReader(out.open()))
    assert [(r["config"], r["ints"]) for r in rows] == [
        ("BLOCK_T=16 num_warps=1", "any"), ("BLOCK_T=16 num_warps=1", "%16"),
        ("BLOCK_T=1024 num_warps=4", "any"), ("BLOCK_T=1024 num_warps=4", "%16"),
    ]
    assert all(r["arch"] == "sm_90" and r["ok"] == "1" and int(r["registers"]) > 0 for r in rows)


def test_rejected_kernel_fails_with_the_compiler_message(tmp_path):
    # tl.arange over 12 lanes: not a power of two, which the compiler refuses
    (tmp_path / "bad.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl


        @triton.jit
        def _bad(x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)


        AOT_KERNELS = [{"kernel": "_bad", "launch_config": lambda n, gpu=True: {"BLOCK": 12, "num_warps": 1},
                        "dtypes": ("fp32",), "signature": {"x_ptr": "*{dtype}"}}]
    '''))
    proc = _run(["-m", "saferlhf_fast.benchmarks.triton_aot", "--kernels-dir", str(tmp_path), "--arch", "90",
                 "--out", str(tmp_path / "bad.csv")])
    assert proc.returncode == 1
    assert "_bad" in proc.stderr and "power of 2" in proc.stderr
    assert "FAILED" in proc.stdout


def test_interpreted_triton_is_refused():
    # this process imported triton under TRITON_INTERPRET=1 (conftest.py) when it runs without a GPU
    if type(triton.language.standard.cdiv).__name__ != "InterpretedFunction":
        pytest.skip("triton is not in interpreter mode here")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with aot.compile_env():
            pass


def test_uncovered_kernel_is_refused(tmp_path):
    (tmp_path / "extra.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl


        @triton.jit
        def _helper(x):
            return x + 1


        @triton.jit
        def _covered(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, _helper(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)


        @triton.jit
        def _forgotten(x_ptr):
            tl.store(x_ptr, 1.0)


        AOT_KERNELS = [{"kernel": "_covered", "launch_config": lambda n, gpu=True: {"BLOCK": 16, "num_warps": 1},
                        "dtypes": ("fp32",), "signature": {"x_ptr": "*{dtype}", "n": "i32"}}]
    '''))
    mods = aot.load_kernel_modules(tmp_path)
    with pytest.raises(ValueError, match="_forgotten") as err:
        aot.build_jobs(mods)
    assert "_helper" not in str(err.value)  # reached from _covered
    mods["extra"].AOT_KERNELS[0]["signature"] = {"x_ptr": "*fp32", "count": "i32"}
    mods["extra"].AOT_KERNELS.append({**mods["extra"].AOT_KERNELS[0], "kernel": "_forgotten",
                                      "signature": {"x_ptr": "*fp32"}})
    with pytest.raises(ValueError, match="count"):
        aot.build_jobs(mods)
