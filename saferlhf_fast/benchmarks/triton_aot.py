"""Ahead-of-time compile of every Triton kernel in kernels/ with Triton's own compiler (``make triton-check``).

The tests run the kernels under the CPU interpreter (``TRITON_INTERPRET=1``), which accepts code the real compiler
rejects.  This compiles each ``@triton.jit`` kernel for real NVIDIA targets (``GPUTarget("cuda", 80, 32)`` and
``GPUTarget("cuda", 90, 32)`` by default) through the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin),
with no GPU, no CUDA driver and no torch: ``triton.compile`` is given the target explicitly, so it never asks
``driver.active`` for one, and ptxas is the one shipped inside the triton wheel.

What is compiled is what the launchers launch.  Each kernel module lists its kernels in ``AOT_KERNELS``: the
argument types its launchers pass (``"{dtype}"`` standing for the dtypes they accept), the constexpr flags, and the
module's ``launch_config(size, gpu)``, the very function the launchers call for ``BLOCK_*`` / ``num_warps``.  Every
config that ``launch_config`` returns for some size on a GPU is compiled (sizes 1 .. 2**31, deduplicated), for every
dtype and flag combination, for every arch, and twice over the integer arguments: as any i32 (``ints=any``) and with
the JIT's multiple-of-16 hint on all of them (``ints=%16``, what T = 512 or V = 49152 and their strides get).
Pointers carry the 16-byte divisibility hint the JIT gives aligned torch tensors.  Not compiled: the JIT's ``== 1``
integer specialisation, and mixes of hinted and unhinted integers.  The check fails when a module defines a
``@triton.jit`` kernel that no ``AOT_KERNELS`` entry (or kernel, as a helper) reaches, or when an entry's argument
names drift from the kernel's.

The kernel modules are loaded from their files under private names with the interpreter switched off, so this needs
neither torch nor the saferlhf_fast package: run it as ``python -m saferlhf_fast.benchmarks.triton_aot`` or, where
torch is absent, ``python saferlhf_fast/benchmarks/triton_aot.py``.  Compiling needs a process whose triton was
imported without ``TRITON_INTERPRET`` (``compile_env`` refuses otherwise); run as a program this drops the variable
before it imports triton.

Prints one row per (kernel, config, dtype, ints, arch): registers (from the cubin), spill stores / loads and stack
frame (from the ptxas log), shared memory and num_warps (Triton's metadata); writes them as CSV (default
``runs/triton-aot/triton-aot-<triton version>.csv``).  Exits 1 with the compiler's message when a kernel fails.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    # Under TRITON_INTERPRET=1 triton's own tl.* helpers (tl.cdiv, ...) become interpreter functions when triton is
    # imported, and the compiler cannot lower them: this process compiles, so it imports triton without it.
    os.environ.pop("TRITON_INTERPRET", None)
    if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        # Run as a file: its folder (which holds profile.py, ops.py, ...) must not shadow other modules.
        sys.path.pop(0)

import argparse
import contextlib
import csv
import importlib.util
import io
import itertools
import re
import struct
import tempfile
import time
from dataclasses import dataclass

KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"
DEFAULT_ARCHS = (80, 90)
# launch_config keys that are compile options rather than kernel parameters
_OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
# How integer arguments are specialised: "any" value (plain i32) or all multiples of 16 (the JIT's "D" hint, what
# T = 512, V = 49152 and their row strides get at launch)
INT_SPECS = ("any", "%16")


@dataclass
class Job:
    module: str  # kernels/<module>.py
    kernel: object  # the JITFunction
    signature: dict  # {param: triton type or "constexpr"}, in parameter order
    constexprs: dict  # {param: value}
    options: dict  # compile options (num_warps, ...)
    dtype: str
    ints: str = "any"  # one of INT_SPECS

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def config(self) -> str:
        items = {**self.constexprs, **self.options}.items()
        return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in items)


@dataclass
class Result:
    job: Job
    arch: int
    triton_version: str
    ptxas: str = ""
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    num_warps: int = 0
    cubin_bytes: int = 0
    seconds: float = 0.0
    error: str = ""
    error_line: str = ""  # the message's last line (the cause, for a CompilationError)
    cubin: bytes = b""  # not in the CSV

    def row(self) -> dict:
        return {
            "kernel": self.job.name, "module": self.job.module, "config": self.job.config, "dtype": self.job.dtype,
            "ints": self.job.ints, "arch": f"sm_{self.arch}", "triton": self.triton_version, "ptxas": self.ptxas,
            "registers": self.registers,
            "spill_stores": self.spill_stores, "spill_loads": self.spill_loads, "stack": self.stack,
            "shared": self.shared, "num_warps": self.num_warps, "cubin_bytes": self.cubin_bytes,
            "compile_s": f"{self.seconds:.2f}", "ok": int(not self.error),
        }


COLUMNS = ["kernel", "module", "config", "dtype", "ints", "arch", "triton", "ptxas", "registers", "spill_stores",
           "spill_loads", "stack", "shared", "num_warps", "cubin_bytes", "compile_s", "ok"]


def load_kernel_modules(kernels_dir: Path = KERNELS_DIR) -> dict:
    """{module stem: module} of every kernels/*.py that defines a ``@triton.jit`` function, loaded from its file under a
    private name with the Triton interpreter off (so its functions are real ``JITFunction``s)."""
    import triton

    mods = {}
    for path in sorted(Path(kernels_dir).glob("*.py")):
        if "triton.jit" not in path.read_text():
            continue  # e.g. launchers.py, which imports the package
        name = f"_saferlhf_triton_aot.{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = False
            sys.modules[name] = mod
            try:
                spec.loader.exec_module(mod)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        mods[path.stem] = mod
    if not mods:
        raise SystemExit(f"triton_aot: no @triton.jit kernels found under {kernels_dir}")
    return mods


def _jit_functions(mod) -> dict:
    from triton.runtime.jit import JITFunction

    return {
        name: obj for name, obj in vars(mod).items()
        if isinstance(obj, JITFunction) and getattr(obj.fn, "__module__", None) == mod.__name__
    }


def _launch_configs(launch_config) -> list:
    """Every distinct config ``launch_config(size, gpu=True)`` gives, over sizes 1 .. 2**31."""
    seen = []
    for k in range(32):
        for size in ((1 << k) - 1, 1 << k, (1 << k) + 1):
            if size < 1:
                continue
            cfg = launch_config(size, True)
            if cfg not in seen:
                seen.append(cfg)
    return seen


def build_jobs(mods: dict, kernel_filter: str | None = None, quick: bool = False, ints=INT_SPECS) -> list:
    """All (kernel, dtype, flags, config, integer specialisation) jobs of the modules' ``AOT_KERNELS``; raises
    ValueError on a kernel no entry covers or an entry whose argument names do not match its kernel."""
    jobs, problems = [], []
    for stem, mod in mods.items():
        jits = _jit_functions(mod)
        entries = getattr(mod, "AOT_KERNELS", [])
        roots = []
        for entry in entries:
            kernel = jits.get(entry["kernel"])
            if kernel is None:
                problems.append(f"kernels/{stem}.py: AOT_KERNELS names {entry['kernel']!r}, not a @triton.jit function")
                continue
            roots.append(kernel)
            params = [p.name for p in kernel.params]
            constexpr = [p.name for p in kernel.params if p.is_constexpr]
            sig_names = list(entry["signature"])
            if sorted(sig_names) != sorted(p for p in params if p not in constexpr):
                problems.append(
                    f"kernels/{stem}.py: AOT_KERNELS signature of {kernel.__name__} names {sig_names}, "
                    f"the kernel's runtime parameters are {[p for p in params if p not in constexpr]}"
                )
                continue
            flags = dict(entry.get("flags", {}))
            configs = _launch_configs(entry["launch_config"])
            if quick:
                configs = [configs[0], configs[-1]] if len(configs) > 1 else configs
            for cfg in configs:
                const_keys = set(flags) | {k for k in cfg if k not in _OPTION_KEYS}
                if const_keys != set(constexpr):
                    problems.append(
                        f"kernels/{stem}.py: {kernel.__name__} has constexpr parameters {constexpr}, "
                        f"AOT_KERNELS flags + launch_config give {sorted(const_keys)}"
                    )
                    break
            else:
                for dtype, flag_vals, cfg, int_spec in itertools.product(
                    entry["dtypes"], itertools.product(*flags.values()), configs, ints
                ):
                    consts = {**dict(zip(flags, flag_vals)), **{k: v for k, v in cfg.items() if k not in _OPTION_KEYS}}
                    sig = {
                        p: "constexpr" if p in constexpr else entry["signature"][p].format(dtype=dtype) for p in params
                    }
                    jobs.append(Job(
                        module=stem, kernel=kernel, signature=sig,
                        constexprs={p: consts[p] for p in params if p in consts},
                        options={k: v for k, v in cfg.items() if k in _OPTION_KEYS}, dtype=dtype, ints=int_spec,
                    ))
        # every @triton.jit function must be an entry's kernel or reached from one (a helper it calls)
        reached = {k.__name__ for k in roots}
        frontier = list(roots)
        while frontier:
            src = frontier.pop().src
            for name, fn in jits.items():
                if name not in reached and re.search(rf"\b{re.escape(name)}\b", src):
                    reached.add(name)
                    frontier.append(fn)
        for name in sorted(set(jits) - reached):
            problems.append(
                f"kernels/{stem}.py: @triton.jit {name} is neither in AOT_KERNELS nor called by a kernel there"
            )
    if problems:
        raise ValueError("\n".join(problems))
    if kernel_filter:
        jobs = [j for j in jobs if kernel_filter in j.name]
    return jobs


EIATTR_REGCOUNT = 0x2F


def cubin_registers(cubin: bytes, name: str) -> int:
    """Registers per thread of kernel ``name``, read from the cubin as the driver does: the ``EIATTR_REGCOUNT``
    attribute of the ELF's ``.nv.info`` section (a (symbol index, count) pair, in both the sm_80 and the CUDA 13
    sm_90a layouts); -1 if absent."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:  # ELF64 only
        return -1
    e = "<" if cubin[5] == 1 else ">"
    shoff, = struct.unpack_from(e + "Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", cubin, 0x3A)
    # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info, sh_addralign, sh_entsize
    secs = [struct.unpack_from(e + "IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]

    def data(sec):
        return cubin[sec[4]:sec[4] + sec[5]]

    def cstr(buf, off):
        return buf[off:buf.index(b"\0", off)].decode(errors="replace")

    shstr = data(secs[shstrndx])
    by_name = {cstr(shstr, sec[0]): sec for sec in secs}
    symtab, info = by_name.get(".symtab"), by_name.get(".nv.info")
    if symtab is None or info is None:
        return -1
    strtab = data(secs[symtab[6]])
    syms = data(symtab)
    sym_names = [cstr(strtab, struct.unpack_from(e + "I", syms, off)[0]) for off in range(0, len(syms), 24)]
    buf, p = data(info), 0
    while p + 2 <= len(buf):
        fmt, attr = buf[p], buf[p + 1]
        p += 2
        if fmt == 0x04:  # EIFMT_SVAL: u16 size, payload
            size, = struct.unpack_from(e + "H", buf, p)
            payload = buf[p + 2:p + 2 + size]
            p += 2 + size
            if attr == EIATTR_REGCOUNT and size == 8:
                sym, count = struct.unpack(e + "II", payload)
                if sym < len(sym_names) and sym_names[sym] == name:
                    return count
        elif fmt == 0x03:  # EIFMT_HVAL
            p += 2
        elif fmt == 0x02:  # EIFMT_BVAL
            p += 1
        elif fmt != 0x01:  # EIFMT_NVAL has no payload; anything else: unknown layout
            break
    return -1


def ptxas_version(arch: int) -> str:
    """CUDA release of the ptxas this triton runs for ``arch`` (its bundled one unless TRITON_PTXAS_PATH says
    otherwise; 3.9 takes ``ptxas-blackwell`` from sm_90 on, 3.6 from sm_100 on); "" if it cannot tell."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return str(get_ptxas(arch).version)
    except Exception:  # noqa: BLE001 - a private helper; the version is only informative
        return ""


_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def compile_job(job: Job, arch: int) -> Result:
    """Compile one job for ``GPUTarget("cuda", arch, 32)``; the Result's ``error`` holds the compiler's message on
    failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    res = Result(job=job, arch=arch, triton_version=triton.__version__, ptxas=ptxas_version(arch))
    backend = make_backend(target)
    params = [p.name for p in job.kernel.params]
    # the JIT's divisibility hint: 16-byte aligned pointers (what torch allocations get) and, for ints="%16",
    # integers that are multiples of 16
    ints = ("i32", "i64", "u32", "u64") if job.ints == "%16" else ()
    attrs = {
        (i,): backend.parse_attr("D") for i, p in enumerate(params)
        if job.signature[p].startswith("*") or job.signature[p] in ints
    }
    src = ASTSource(fn=job.kernel, signature=dict(job.signature), constexprs=dict(job.constexprs), attrs=attrs)
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=dict(job.options))
    except Exception as exc:  # noqa: BLE001 - the compiler's own message is the point
        res.seconds = time.perf_counter() - t0
        captured = log.getvalue().strip()
        res.error = f"{type(exc).__name__}: {exc}" + (f"\n{captured[-4000:]}" if captured else "")
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        res.error_line = f"{type(exc).__name__}: {lines[-1].strip() if lines else ''}"
        return res
    res.seconds = time.perf_counter() - t0
    cubin = res.cubin = compiled.asm.get("cubin", b"")
    res.cubin_bytes = len(cubin)
    res.registers = cubin_registers(cubin, compiled.metadata.name) if cubin else -1
    text = log.getvalue()
    m = _PTXAS_SPILLS.search(text)
    if m:
        res.stack, res.spill_stores, res.spill_loads = (int(x) for x in m.groups())
    else:
        res.stack = res.spill_stores = res.spill_loads = -1
    m = _PTXAS_REGS.search(text)
    if m and res.registers < 0:
        res.registers = int(m.group(1))
    elif m and int(m.group(1)) != res.registers:
        print(f"triton_aot: {job.name} sm_{arch}: ptxas reports {m.group(1)} registers, the cubin {res.registers}",
              file=sys.stderr)
    res.shared = int(compiled.metadata.shared)
    res.num_warps = int(compiled.metadata.num_warps)
    if not cubin:
        res.error = "no cubin produced"
    return res


@contextlib.contextmanager
def compile_env():
    """Fresh throw-away cache (every kernel really goes through ptxas, ~/.triton is left alone) and the ptxas log
    printed (captured by compile_job).  RuntimeError if triton was imported in interpreter mode."""
    import triton
    import triton.language.standard as std

    if any(type(v).__name__ == "InterpretedFunction" for v in vars(std).values()):
        raise RuntimeError(
            "triton was imported with TRITON_INTERPRET=1, so its own tl.* helpers are interpreter functions the "
            "compiler cannot lower: run the AOT compile in a process that imports triton without it "
            "(python -m saferlhf_fast.benchmarks.triton_aot drops the variable before it imports triton)"
        )
    with tempfile.TemporaryDirectory(prefix="triton-aot-") as tmp, \
            triton.knobs.cache.scope(), triton.knobs.compilation.scope(), triton.knobs.nvidia.scope():
        triton.knobs.cache.dir = tmp
        triton.knobs.compilation.always_compile = True
        triton.knobs.nvidia.dump_ptxas_log = True
        yield


def _fmt(row: dict) -> str:
    return (f"{row['kernel']:<22} {row['config']:<45} {row['dtype']:<5} {row['ints']:<4} {row['arch']:<6} "
            f"{row['registers']:>4} "
            f"{row['spill_stores']:>6}/{row['spill_loads']:<6} {row['stack']:>5} {row['shared']:>6} "
            f"{row['num_warps']:>5} {row['compile_s']:>6}")


def _block(config: str) -> int:
    m = re.search(r"BLOCK_\w+=(\d+)", config)
    return int(m.group(1)) if m else 0


def markdown_table(csv_paths) -> str:
    """docs/kernels.md's tables from CSVs of earlier runs, per kernel (rows) and (arch, triton version) (columns):
    ``registers min-max / shared bytes max`` over all of a kernel's compiles, then ``registers / shared bytes`` at
    its largest block with the multiple-of-16 integer hint (long rows, large vocabularies), max over dtypes and
    flags.  Spills and failures are appended to a cell."""
    rows = []
    for p in csv_paths:
        with open(p, newline="") as f:
            rows += list(csv.DictReader(f))
    cols = sorted({(r["arch"], r["triton"]) for r in rows},
                  key=lambda c: (c[0], tuple(int(x) for x in re.findall(r"\d+", c[1]))))
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    head = " | ".join(f"{a} triton {v}" for a, v in cols)

    def cell(sel, span: bool) -> str:
        if not sel:
            return "-"
        regs = [int(r["registers"]) for r in sel]
        text = f"{min(regs)}-{max(regs)}" if span else f"{max(regs)}"
        text += f" / {max(int(r['shared']) for r in sel)}"
        spills = sum(int(r["spill_stores"]) + int(r["spill_loads"]) for r in sel)
        bad = sum(r["ok"] != "1" for r in sel)
        return text + (f", {spills} B spilled" if spills else "") + (f", {bad} FAILED" if bad else "")

    lines = [f"| kernel | compiles per arch (BLOCK) | {head} |", "|---|---|" + "---|" * len(cols)]
    for k in kernels:
        mine = [r for r in rows if r["kernel"] == k]
        first = [r for r in mine if (r["arch"], r["triton"]) == cols[0]]
        blocks = sorted({_block(r["config"]) for r in first})
        cells = [cell([r for r in mine if (r["arch"], r["triton"]) == c], True) for c in cols]
        lines.append(f"| `{k}` | {len(first)} ({blocks[0]}..{blocks[-1]}) | " + " | ".join(cells) + " |")
    lines += ["", f"| kernel | largest config, ints=%16 | {head} |", "|---|---|" + "---|" * len(cols)]
    for k in kernels:
        mine = [r for r in rows if r["kernel"] == k and r.get("ints", "%16") == "%16"]
        top = max(_block(r["config"]) for r in mine)
        mine = [r for r in mine if _block(r["config"]) == top]
        cfg = " ".join(t for t in mine[0]["config"].split() if t.startswith(("BLOCK_", "num_")))  # not the flags
        cells = [cell([r for r in mine if (r["arch"], r["triton"]) == c], False) for c in cols]
        lines.append(f"| `{k}` | {cfg} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="triton_aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS),
                    help="compute capabilities to compile for (default 80 90)")
    ap.add_argument("--out", default=None,
                    help="CSV path (default runs/triton-aot/triton-aot-<triton version>.csv)")
    ap.add_argument("--kernel", default=None, help="only kernels whose name contains this")
    ap.add_argument("--kernels-dir", default=str(KERNELS_DIR), help="folder of kernel modules (default: kernels/)")
    ap.add_argument("--quick", action="store_true", help="only the smallest and largest launch config per kernel")
    ap.add_argument("--ints", choices=[*INT_SPECS, "both"], default="both",
                    help="integer arguments compiled as any value, as multiples of 16 (the JIT's hint), or both")
    ap.add_argument("--table", nargs="+", metavar="CSV",
                    help="compile nothing: print the markdown table of docs/kernels.md from these CSVs")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown_table(args.table))
        return 0

    import triton

    out = Path(args.out or os.path.join("runs", "triton-aot", f"triton-aot-{triton.__version__}.csv"))
    mods = load_kernel_modules(args.kernels_dir)
    try:
        jobs = build_jobs(mods, args.kernel, args.quick, INT_SPECS if args.ints == "both" else (args.ints,))
    except ValueError as exc:
        print(f"triton_aot: kernels/ and their AOT_KERNELS disagree:\n{exc}", file=sys.stderr)
        return 1
    ptxas = ", ".join(f"sm_{a}: ptxas {ptxas_version(a) or '?'}" for a in args.arch)
    print(f"triton {triton.__version__} ({Path(triton.__file__).parent}; {ptxas}); {len(jobs)} kernel configs x "
          f"{len(args.arch)} archs from {args.kernels_dir}", flush=True)
    print(_fmt({"kernel": "kernel", "config": "config", "dtype": "dtype", "ints": "ints", "arch": "arch",
                "registers": "regs",
                "spill_stores": "spills", "spill_loads": "st/ld", "stack": "stack", "shared": "shared",
                "num_warps": "warps", "compile_s": "sec"}), flush=True)
    results, t0 = [], time.perf_counter()
    with compile_env():
        for job in jobs:
            for arch in args.arch:
                res = compile_job(job, arch)
                results.append(res)
                print(_fmt(res.row()) + ("  FAILED" if res.error else ""), flush=True)
                if res.error:
                    print(res.error, file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for res in results:
            w.writerow(res.row())
    failed = [r for r in results if r.error]
    spilled = [r for r in results if r.spill_stores > 0 or r.spill_loads > 0]
    print(f"{len(results) - len(failed)}/{len(results)} compiled in {time.perf_counter() - t0:.1f}s "
          f"({len(spilled)} with register spills); wrote {out}")
    if failed:
        print(f"triton_aot: {len(failed)} kernel configs failed to compile with triton {triton.__version__}:",
              file=sys.stderr)
        for r in failed:
            print(f"  {r.job.name} [{r.job.config}] {r.job.dtype} sm_{r.arch}: {r.error_line or r.error}",
                  file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
