"""Backend discovery and choice for the ops: one registry, one selection function, one "has op" check.

Backends: ``torch`` (reference), ``cpu`` (C++ kernels of the compiled extension), ``cuda`` (CUDA kernels of the
compiled extension), ``triton`` (kernels in ``saferlhf_fast.kernels``, launched through
``saferlhf_fast.kernels.launchers``; on CPU tensors only under ``TRITON_INTERPRET=1``).

:data:`REGISTRY` lists, per op family, the backends that implement it and the ``saferlhf::`` op each needs from the
extension.  :func:`select` chooses one: the ``backend=`` argument, then ``$SAFERLHF_BACKEND`` (``settings().backend``;
ignored by an op that has no such backend), then the default for the tensors' device (cpu -> ``cpu``; cuda ->
``triton``, then ``cuda``; among the op's backends).  A default that is not available falls back to ``torch`` with a
one-line warning naming what is missing; a backend asked for by name that is not available is an error.
Adding a backend to an op: its kernel in the family's module, one entry here.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from dataclasses import dataclass

import torch

from .settings import settings

BACKENDS = ("torch", "cpu", "cuda", "triton")
ENV_VAR = "SAFERLHF_BACKEND"  # settings().backend
TRITON_LAUNCHERS = "saferlhf_fast.kernels.launchers"
# The op set's version the Python side calls; csrc/binding.cpp's SAFERLHF_API_VERSION must equal it.
API_VERSION = 2


# (module or None, reason): set by the first extension() call.  A plain global rather than an lru_cache, so that
# torch.compile reads it instead of tracing into the import.
_EXTENSION: tuple | None = None


def extension():
    """The compiled extension module (``saferlhf_fast._C``) or None, with the reason it is missing.  Importing it
    registers the fake implementations of its ops (``ops/fakes.py``)."""
    global _EXTENSION
    if _EXTENSION is None:
        _EXTENSION = _load_extension()
    return _EXTENSION


class StaleExtensionError(RuntimeError):
    """The compiled extension was built from other sources than this Python code (one line: how to rebuild)."""


def _load_extension():
    try:
        mod = importlib.import_module("saferlhf_fast._C")
    except Exception as exc:  # noqa: BLE001 - ImportError, or an ABI mismatch raising OSError / RuntimeError
        return None, f"compiled extension saferlhf_fast._C not importable ({type(exc).__name__}: {exc})"
    built = getattr(mod, "api_version", None)
    if built != API_VERSION:  # a stale build: its ops differ from what this Python code calls
        raise StaleExtensionError(
            f"saferlhf_fast._C ({mod.__file__}) is a stale build (op API version {built}, this code needs "
            f"{API_VERSION}); rebuild it: pip install --no-build-isolation -e . (or make install)")
    from .ops import fakes  # the ops' fake implementations, for torch.compile (docs/kernels.md)

    fakes.register()
    return mod, None


@torch.compiler.assume_constant_result
def has_op(name: str) -> bool:
    """Whether the compiled extension imports and registers ``torch.ops.saferlhf.<name>``: the one such check of the
    package.  A constant under torch.compile (evaluated once while tracing); cached, as it sits on hot paths."""
    return _has_op(name)


@functools.lru_cache(maxsize=None)
def _has_op(name: str) -> bool:
    mod, _ = extension()
    try:
        return mod is not None and hasattr(torch.ops.saferlhf, name)
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def triton_status():
    """(available, reason): whether Triton kernels can run here."""
    try:
        import triton  # noqa: F401

        importlib.import_module(TRITON_LAUNCHERS)
    except Exception as exc:  # noqa: BLE001 - any failure of triton's import means: no triton backend here
        return False, f"triton not usable ({type(exc).__name__}: {exc})"
    return True, None


def triton_interpreted() -> bool:
    return settings().triton_interpret


def availability(name: str, device_type: str) -> tuple[bool, str | None]:
    """Whether backend ``name`` can run on tensors of ``device_type``, and why not."""
    if name == "torch":
        return True, None
    if name == "cpu":
        if device_type != "cpu":
            return False, f"backend 'cpu' needs CPU tensors, got {device_type}"
        mod, why = extension()
        return (mod is not None), why
    if name == "cuda":
        if device_type != "cuda":
            return False, f"backend 'cuda' needs CUDA tensors, got {device_type}"
        mod, why = extension()
        if mod is None:
            return False, why
        if not getattr(mod, "cuda_built", False):
            return False, "saferlhf_fast._C was built without CUDA kernels"
        return True, None
    if name == "triton":
        ok, why = triton_status()
        if not ok:
            return False, why
        if device_type == "cpu" and not triton_interpreted():
            return False, "triton kernels on CPU tensors need TRITON_INTERPRET=1"
        return True, None
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def available_backends(device_type: str = "cpu") -> list[str]:
    return [b for b in BACKENDS if availability(b, device_type)[0]]


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


# op family -> backend -> the saferlhf:: op its kernel needs from the extension (None: the backend alone decides).
_CONTRACT = {"torch": None, "cpu": None, "cuda": None, "triton": None}  # the four backends of docs/kernels.md
REGISTRY: dict[str, dict[str, str | None]] = {
    "gather_logprobs": dict(_CONTRACT),
    "linear_logprobs": dict(_CONTRACT),
    "gae": dict(_CONTRACT),
    "ppo_clip": dict(_CONTRACT),
    "critic_loss": dict(_CONTRACT),
    "kl_penalized_rewards": dict(_CONTRACT),
    "rope": {"torch": None, "cpu": "rope"},
    "swiglu": {"torch": None, "cpu": "swiglu"},
    "rms_norm": {"torch": None, "cpu": "rms_norm"},
    "add_rms_norm": {"torch": None, "cpu": "add_rms_norm"},
}
# Default backends per device type, in order of preference.
DEVICE_DEFAULTS = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}


def op_availability(op: str, name: str, device_type: str) -> tuple[bool, str | None]:
    """Whether backend ``name`` of op family ``op`` can run on tensors of ``device_type``, and why not."""
    ok, why = availability(name, device_type)
    needs = REGISTRY[op][name]
    if ok and needs is not None and not has_op(needs):
        return False, f"the compiled extension has no op saferlhf::{needs} (rebuild it)"
    return ok, why


def select(op: str, backend: str | None, device: torch.device) -> str:
    """The backend of op family ``op`` for tensors on ``device``: ``backend`` if given, else
    ``settings().backend`` if the op has it, else the device's default (module docstring)."""
    impls = REGISTRY[op]
    if backend is not None:
        return _explicit(op, backend.lower(), device, impls)
    setting = settings().backend
    if setting and (setting in impls or setting not in BACKENDS):  # unknown names are an error, not skipped
        return _explicit(op, setting, device, impls)
    candidates = [b for b in DEVICE_DEFAULTS.get(device.type, ()) if b in impls]
    reasons = []
    for name in candidates:
        ok, why = op_availability(op, name, device.type)
        if ok:
            return name
        reasons.append(why)
    if candidates:
        _warn_once(f"saferlhf_fast: using the torch reference ops on {device.type}: " + "; ".join(reasons))
    return "torch"


def _explicit(op: str, name: str, device: torch.device, impls: dict) -> str:
    if name not in impls:
        raise ValueError(f"{op}: unknown backend {name!r}; choose one of {', '.join(impls)}")
    ok, why = op_availability(op, name, device.type)
    if not ok:
        raise RuntimeError(f"saferlhf_fast: backend {name!r} is not available for {op}: {why}")
    return name


def resolve(backend: str | None, device: torch.device) -> str:
    """The backend of the ops of the backend contract (all four backends) for tensors on ``device``."""
    return select("gae", backend, device)


def kernel_module(name: str):
    """The object holding the low-level kernels of backend ``name`` (see docs/kernels.md)."""
    if name in ("cpu", "cuda"):
        extension()
        return torch.ops.saferlhf
    if name == "triton":
        return importlib.import_module(TRITON_LAUNCHERS)
    raise ValueError(f"backend {name!r} has no kernel module")


# ------------------------------------------------------------------------------------------------------------------
# Op families whose backends carry names of their own (attention: sdpa / native / flash ...; linear: onednn / torch).
# Same rules as select(): an explicit name, then what the settings name, then the device's defaults in order; a
# missing default moves on to the next one, and past the last to the family's reference with one warning (unless
# the reference is itself a listed default); an explicit backend that is missing is an error.


@dataclass(frozen=True)
class Impl:
    """What one backend of a :data:`FAMILIES` entry needs: ``op`` from the extension (checked with :func:`has_op`),
    and ``probe`` -- ``"module:function"`` returning whether its package / torch feature is here, looked up at each
    call so that the family's module owns (and tests can replace) it; ``needs`` says what is missing when the probe
    fails."""

    op: str | None = None
    probe: str | None = None
    needs: str = ""


@dataclass(frozen=True)
class Family:
    """The backends of one op family, the device defaults (device type -> preference order), the reference that runs
    where no default is available, and ``setting``: which :class:`~saferlhf_fast.settings.Settings` field names a
    backend, with ``setting_value`` mapping that field's value to a backend name (or None: no preference)."""

    impls: dict[str, Impl]
    defaults: dict[str, tuple[str, ...]]
    reference: str
    setting: str | None = None
    setting_value: dict | None = None


_EXT_HINT = "the compiled extension (pip install --no-build-isolation -e .)"
_ONEDNN = Impl(probe="saferlhf_fast.ops.dense:onednn_available", needs="a torch with oneDNN (torch.ops.mkldnn)")
_ONEDNN_OFF = {False: "torch"}  # $SAFERLHF_ONEDNN_LINEAR=0
FAMILIES: dict[str, Family] = {
    # models/attention.py: attn_backend= / --attn_backend
    "attention": Family(
        impls={
            "sdpa": Impl(),
            "native": Impl(op="attention", probe="saferlhf_fast.models.attention:native_available", needs=_EXT_HINT),
            "flash": Impl(probe="saferlhf_fast.models.attention:flash_available",
                          needs="the flash-attn package (pip install flash-attn)"),
            "flex": Impl(probe="saferlhf_fast.models.attention_ext:flex_available",
                         needs=f"torch.nn.attention.flex_attention (torch {torch.__version__} lacks it)"),
            "xformers": Impl(probe="saferlhf_fast.models.attention_ext:xformers_available",
                             needs="the xformers package (pip install xformers)"),
            "reference": Impl(),
        },
        defaults={"cpu": ("native", "sdpa"), "cuda": ("flash", "xformers", "sdpa")},
        reference="sdpa",
    ),
    # ops/dense.py: ops.linear(backend=), its autograd node in the extension
    "linear": Family(
        impls={"onednn": Impl(op="onednn_linear", probe=_ONEDNN.probe, needs=_ONEDNN.needs), "torch": Impl()},
        defaults={"cpu": ("onednn",)}, reference="torch", setting="onednn_linear", setting_value=_ONEDNN_OFF,
    ),
    # ops/dense.py: the products without autograd (matmul_nt / matmul_nn / matmul_tn: linear_logprobs' chunks)
    "matmul": Family(
        impls={"onednn": _ONEDNN, "torch": Impl()},
        defaults={"cpu": ("onednn",)}, reference="torch", setting="onednn_linear", setting_value=_ONEDNN_OFF,
    ),
}


@torch.compiler.assume_constant_result
def _probe(spec: str) -> bool:
    """The probe ``"module:function"``'s answer; a constant under torch.compile (evaluated once while tracing)."""
    module, _, func = spec.partition(":")
    return bool(getattr(importlib.import_module(module), func)())


def impl_availability(op: str, name: str) -> tuple[bool, str | None]:
    """Whether backend ``name`` of :data:`FAMILIES` entry ``op`` can run here, and what it needs if not."""
    impl = FAMILIES[op].impls[name]
    if impl.op is not None and not has_op(impl.op):
        why = extension()[1] or f"it has no op saferlhf::{impl.op} (rebuild it)"
        return False, f"the compiled extension: {why}"
    if impl.probe is not None and not _probe(impl.probe):
        return False, impl.needs
    return True, None


def choose(op: str, backend: str | None, device: torch.device) -> str:
    """The backend of :data:`FAMILIES` entry ``op`` for tensors on ``device``: ``backend`` if given, else the one the
    settings name, else the first available of the device's defaults, else the family's reference."""
    family = FAMILIES[op]
    if backend is None and family.setting is not None:
        backend = family.setting_value.get(getattr(settings(), family.setting))
    if backend is not None:
        name = backend.lower()
        if name not in family.impls:
            raise ValueError(f"unknown {op} backend {backend!r}; choose one of {', '.join(family.impls)}")
        ok, why = impl_availability(op, name)
        if not ok:
            raise RuntimeError(f"{op} backend {name!r} needs {why}")
        return name
    candidates = family.defaults.get(device.type, ())
    reasons = []
    for name in candidates:
        ok, why = impl_availability(op, name)
        if ok:
            return name
        reasons.append(f"{name}: needs {why}")
    if candidates:
        _warn_once(f"saferlhf_fast: {op} uses {family.reference} on {device.type}: " + "; ".join(reasons))
    return family.reference


# (op, device type) -> (what the choice was made under, the choice): the hot paths' default choice.
_CHOSEN: dict[tuple[str, str], tuple] = {}


def chosen(op: str, device_type: str) -> str:
    """:func:`choose` with no explicit backend, cached (ops.linear asks this on every projection) while what it
    depends on is the same object: the settings (``reload`` / ``override`` make new ones), the extension and the
    ``has_op`` check (tests replace both)."""
    current = settings()
    hit = _CHOSEN.get((op, device_type))
    if hit is not None and hit[0] is current and hit[1] is _EXTENSION and hit[2] is has_op:
        return hit[3]
    name = choose(op, None, torch.device(device_type))
    _CHOSEN[(op, device_type)] = (settings(), _EXTENSION, has_op, name)
    return name
