"""Every environment variable the package reads, read once into one frozen :class:`Settings` object.

``settings()`` returns the current object.  It is read from ``os.environ`` on first use and kept, so hot paths pay
an attribute read, not an environment lookup; ``reload()`` reads the environment again (tests that ``setenv``) and
``override(**fields)`` replaces fields inside a ``with`` block.  :data:`VARIABLES` is the table of record:
``docs/settings.md`` lists the same names (``tests/test_settings.py`` checks both ways), together with the
build-time variables that only ``setup.py`` reads (:data:`BUILD_VARIABLES`; it runs before the package exists).

Parsing: a flag is off only for ``0`` (any other value, or unset, keeps its default on); an integer that does not
parse is an error naming the variable.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Iterator


class SettingsError(ValueError):
    """An environment variable holds a value of the wrong type (one line naming it)."""


@dataclass(frozen=True)
class Variable:
    """One environment variable: the :class:`Settings` field it sets, its type, default and meaning."""

    name: str
    field: str
    type: str  # "flag" (off only for "0"), "int", "str" (empty = unset)
    default: object
    doc: str


VARIABLES: tuple[Variable, ...] = (
    Variable("SAFERLHF_BACKEND", "backend", "str", None,
             "Backend of the ops when no `backend=` argument is given: torch, cpu, cuda or triton (unset: the "
             "device's default, docs/kernels.md). An op without that backend takes its device default."),
    Variable("SAFERLHF_ONEDNN_LINEAR", "onednn_linear", "flag", True,
             "`0` sends the decoder's fp32 CPU projections to `F.linear` instead of oneDNN (ops/dense.py)."),
    Variable("SAFERLHF_FAST_DECODE", "fast_decode", "flag", True,
             "`0` makes `generate` run the model's own forward per step instead of the fast decode path "
             "(engine/fast_decode.py) when `fast_decode=None`."),
    Variable("SAFERLHF_NATIVE_DECODE", "native_decode", "flag", True,
             "`0` decodes through the model's own `forward_cached` instead of the extension's `decode_step`."),
    Variable("SAFERLHF_TUNE_MALLOC", "tune_malloc", "flag", True,
             "`0` leaves glibc malloc's mmap / trim thresholds alone (runtime.py)."),
    Variable("SAFERLHF_DEMO_THREADS", "demo_threads", "int", 1,
             "Torch threads per process of `saferlhf-fast demo` (pipeline.py)."),
    Variable("SAFERLHF_DIST_TIMEOUT_MIN", "dist_timeout_min", "int", 30,
             "Minutes a distributed collective waits before the process group gives up (distributed.py)."),
    Variable("SAFERLHF_BENCH_THREADS", "bench_threads", "int", None,
             "Torch threads of the child process that measures CPU peak memory in the benchmarks (unset: torch's "
             "default)."),
    Variable("TRITON_INTERPRET", "triton_interpret", "flag", False,
             "Triton's own switch (`1`: run Triton kernels on CPU tensors in its interpreter); read here to decide "
             "whether the triton backend takes CPU tensors."),
)

# Read by setup.py only (build time, before this package is importable); listed for the docs table.
BUILD_VARIABLES: tuple[Variable, ...] = (
    Variable("SAFERLHF_NO_EXT", "", "flag", False, "`1`: build no C++ extension (pure Python package)."),
    Variable("SAFERLHF_NO_CUDA", "", "flag", False, "`1`: build the CPU kernels only, no CUDA sources."),
    Variable("SAFERLHF_FORCE_CUDA", "", "flag", False,
             "`1`: compile the CUDA kernels even without a visible GPU (`make cuda-check`)."),
    Variable("SAFERLHF_PORTABLE", "", "flag", False, "`1`: compile without `-march=native`."),
)


@dataclass(frozen=True)
class Settings:
    """The values of :data:`VARIABLES` (field names and defaults as listed there)."""

    backend: str | None = None
    onednn_linear: bool = True
    fast_decode: bool = True
    native_decode: bool = True
    tune_malloc: bool = True
    demo_threads: int = 1
    dist_timeout_min: int = 30
    bench_threads: int | None = None
    triton_interpret: bool = False


def _parse(var: Variable, raw: str | None) -> object:
    if raw is None or raw == "":
        return var.default
    if var.type == "flag":
        # TRITON_INTERPRET is on only for "1" (Triton's rule); our flags are off only for "0".
        return raw == "1" if var.default is False else raw != "0"
    if var.type == "int":
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"${var.name}={raw!r} is not an integer") from None
    return raw.lower()


def read(environ: dict | None = None) -> Settings:
    """A :class:`Settings` from ``environ`` (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    return Settings(**{v.field: _parse(v, env.get(v.name)) for v in VARIABLES})


# A plain module global (not an lru_cache) so that torch.compile reads the object instead of tracing a call.
_CURRENT: Settings | None = None


def settings() -> Settings:
    """The current settings (read from the environment on first use)."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = read()
    return _CURRENT


def reload() -> Settings:
    """Read the environment again (after ``monkeypatch.setenv`` and the like)."""
    global _CURRENT
    _CURRENT = read()
    return _CURRENT


@contextlib.contextmanager
def override(**fields) -> Iterator[Settings]:
    """``with override(backend="torch"): ...``: these fields replaced, the previous settings back afterwards."""
    global _CURRENT
    before = settings()
    _CURRENT = dataclasses.replace(before, **fields)
    try:
        yield _CURRENT
    finally:
        _CURRENT = before


def markdown_table(rows: tuple[Variable, ...] = VARIABLES + BUILD_VARIABLES) -> str:
    """The docs table of ``rows`` (docs/settings.md embeds it)."""
    def default(v: Variable) -> str:
        if v.default is None:
            return "unset"
        if v.type == "flag":
            return "on" if v.default else "off"
        return str(v.default)

    lines = ["| variable | type | default | read by | meaning |", "|---|---|---|---|---|"]
    for v in rows:
        where = "setup.py (build)" if not v.field else f"`settings().{v.field}`"
        lines.append(f"| `{v.name}` | {v.type} | {default(v)} | {where} | {v.doc} |")
    return "\n".join(lines) + "\n"
