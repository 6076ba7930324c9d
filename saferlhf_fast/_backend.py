"""Backend discovery and choice for the ops: one registry table, one selection function, one "has op" check.

:data:`FAMILIES` has one entry (:class:`Family`) per op family: the kernel ops of the backend contract
(``gather_logprobs`` ... ``kl_penalized_rewards``: backends ``torch``, ``cpu``, ``cuda``, ``triton``), the CPU layer
ops (``rope`` ... ``add_rms_norm``: ``torch``, ``cpu``), ``attention`` (``sdpa``, ``native``, ``flash`` ...),
``linear`` and ``matmul`` (``onednn``, ``torch``) and the engine's ``decode`` / ``sampling`` steps.  An entry lists
its backends (:class:`Impl`: the devices, extension op and package each needs), the device defaults, its
reference, the setting that names a backend, and where its pieces live (:class:`Parts`).

:func:`choose` picks one backend: the ``backend=`` argument, else what the entry's setting names (e.g.
``$SAFERLHF_BACKEND`` for the kernel ops that have that backend), else the first available of the device's
defaults, else the reference with one warning naming what is missing.  An explicitly named backend that is not
available is an error.  Adding a backend to an op family: its kernel in the family's files, one :class:`Impl` here.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from dataclasses import dataclass, replace

import torch

from .settings import settings

# The kernel-contract backends: the names of `backend=` and $SAFERLHF_BACKEND (settings().backend).
BACKENDS = ("torch", "cpu", "cuda", "triton")
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


def triton_available() -> bool:
    """Whether triton and the launchers import (the ``triton`` backend's probe)."""
    return triton_status()[0]


def cuda_built() -> bool:
    """Whether the compiled extension carries its CUDA kernels (the ``cuda`` backend's probe)."""
    mod, _ = extension()
    return bool(getattr(mod, "cuda_built", False))


def kernel_module(name: str):
    """The object holding the low-level kernels of contract backend ``name`` (see docs/kernels.md)."""
    if name in ("cpu", "cuda"):
        extension()
        return torch.ops.saferlhf
    if name == "triton":
        return importlib.import_module(TRITON_LAUNCHERS)
    raise ValueError(f"backend {name!r} has no kernel module")


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Impl:
    """What one backend of a :class:`Family` needs to run.

    ``devices``: the tensor device types it takes (None: any), each mapped to None or to a
    :class:`~saferlhf_fast.settings.Settings` flag that must be on for that device (triton on CPU tensors:
    ``triton_interpret``).  ``extension``: it needs the compiled extension; ``op``: the ``saferlhf::`` op it calls
    (checked with :func:`has_op`; implies ``extension``).  ``probe``: ``"module:function"`` returning whether its
    package / torch feature is here, looked up at each call so that the owning module has (and tests can replace)
    it; ``needs`` says what is missing when the probe fails."""

    devices: dict[str, str | None] | None = None
    extension: bool = False
    op: str | None = None
    probe: str | None = None
    needs: str = ""


@dataclass(frozen=True)
class Parts:
    """Where one op family's pieces live (paths relative to the repository root; ``"path:function"`` names a
    function in it): the readable reference, the public op (dispatch / autograd), the Triton kernel module, the
    C++ / CUDA sources, the tests and the ``saferlhf-fast bench ops`` kernel that measures it.
    tests/test_registry.py checks that every named file exists and that every kernel source belongs to a family."""

    reference: str | None
    public: str
    triton: str | None = None
    csrc: tuple[str, ...] = ()
    tests: tuple[str, ...] = ()
    bench: str | None = None

    def files(self) -> list[str]:
        named = [self.reference, self.public, self.triton, *self.csrc, *self.tests]
        return [n.partition(":")[0] for n in named if n is not None]


@dataclass(frozen=True)
class Family:
    """One op family: its backends, the device defaults (device type -> preference order), the ``reference`` that
    runs where no default is available, and ``setting``: the :class:`~saferlhf_fast.settings.Settings` field that
    names a backend, with ``setting_map`` mapping its values to a backend name or None (no preference); a value the
    map lacks is taken as a backend name (so an unknown name is an error)."""

    impls: dict[str, Impl]
    defaults: dict[str, tuple[str, ...]]
    reference: str
    parts: Parts
    setting: str | None = None
    setting_map: dict | None = None


_EXT_HINT = "the compiled extension (pip install --no-build-isolation -e .)"
_CPU_ONLY = {"cpu": None}
# The kernel contract's backends (docs/kernels.md); each family's entry adds the saferlhf:: op it calls.
CONTRACT: dict[str, Impl] = {
    "torch": Impl(),
    "cpu": Impl(devices=_CPU_ONLY, extension=True),
    "cuda": Impl(devices={"cuda": None}, extension=True, probe="saferlhf_fast._backend:cuda_built",
                 needs="saferlhf_fast._C built with its CUDA kernels (a CUDA torch and nvcc at build time)"),
    "triton": Impl(devices={"cuda": None, "cpu": "triton_interpret"}, probe="saferlhf_fast._backend:triton_available",
                   needs="a working triton (import triton, saferlhf_fast.kernels.launchers)"),
}
_CONTRACT_DEFAULTS = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}
# $SAFERLHF_BACKEND is a preference across the kernel ops: a family without that backend keeps its default.
_NAMES_A_BACKEND = "backend"


def _contract(op: str, parts: Parts) -> Family:
    """A kernel-contract family: all four backends, the C++ / CUDA ones calling ``saferlhf::<op>``."""
    impls = {name: (replace(impl, op=op) if impl.extension else impl) for name, impl in CONTRACT.items()}
    return Family(impls, _CONTRACT_DEFAULTS, "torch", parts, _NAMES_A_BACKEND, _setting_map(impls))


def _layer(op: str, parts: Parts) -> Family:
    """A CPU layer op: the reference and the C++ kernel behind its autograd node ``saferlhf::<op>``."""
    impls = {"torch": Impl(), "cpu": Impl(devices=_CPU_ONLY, op=op)}
    return Family(impls, {"cpu": ("cpu",)}, "torch", parts, _NAMES_A_BACKEND, _setting_map(impls))


def _setting_map(impls: dict[str, Impl]) -> dict:
    """$SAFERLHF_BACKEND's values -> this family's backend: unset or a contract backend it lacks -> no preference."""
    return {None: None, "": None, **{b: (b if b in impls else None) for b in BACKENDS}}


def _contract_sources(stem: str) -> tuple[str, ...]:
    """A contract family's C++ / CUDA files: its torch-free CPU and CUDA cores, and the binding and kernel headers
    that register and declare them."""
    return (f"csrc/{stem}_cpu.cpp", f"csrc/{stem}_cuda.cu", "csrc/binding.cpp", "csrc/kernels_cpu.h",
            "csrc/kernels_cuda.h")


_LOGPROBS_C, _LOSSES_C = _contract_sources("logprobs"), _contract_sources("losses")
_CONTRACT_TESTS = ("tests/test_ops.py", "tests/test_cpu_extension.py", "tests/test_cuda_ops.py",
                   "tests/test_triton_kernels.py", "tests/test_fake_ops.py")
_LAYER_C = ("csrc/layer_ops.cpp", "csrc/autograd_ops.cpp")
_LAYER_TESTS = ("tests/test_layer_ops.py", "tests/test_fake_ops.py")
_REF = "saferlhf_fast/ops/reference.py"
_ONEDNN = Impl(probe="saferlhf_fast.ops.dense:onednn_available", needs="a torch with oneDNN (torch.ops.mkldnn)")
_ONEDNN_OFF = {False: "torch", True: None}  # $SAFERLHF_ONEDNN_LINEAR=0

FAMILIES: dict[str, Family] = {
    "gather_logprobs": _contract("logprobs_forward", Parts(
        f"{_REF}:gather_logprobs", "saferlhf_fast/ops/logprobs.py:gather_logprobs", "kernels/logprobs.py",
        _LOGPROBS_C, _CONTRACT_TESTS + ("tests/cpp/test_logprobs.cpp",), "gather_logprobs")),
    "linear_logprobs": _contract("logprobs_forward", Parts(
        f"{_REF}:linear_logprobs", "saferlhf_fast/ops/logprobs.py:linear_logprobs", "kernels/logprobs.py",
        _LOGPROBS_C, _CONTRACT_TESTS + ("tests/test_dense.py",), "linear_logprobs")),
    "gae": _contract("gae_forward", Parts(
        f"{_REF}:gae", "saferlhf_fast/ops/gae.py:gae", "kernels/gae.py",
        _contract_sources("gae"),
        _CONTRACT_TESTS + ("tests/cpp/test_gae.cpp",), "gae")),
    "ppo_clip": _contract("ppo_clip_objective", Parts(
        f"{_REF}:ppo_lag_actor_loss", "saferlhf_fast/ops/losses.py:ppo_lag_actor_loss", "kernels/losses.py",
        _LOSSES_C, _CONTRACT_TESTS + ("tests/cpp/test_losses.cpp",), "ppo_losses")),
    "critic_loss": _contract("clipped_value_objective", Parts(
        f"{_REF}:critic_loss", "saferlhf_fast/ops/losses.py:critic_loss", "kernels/losses.py",
        _LOSSES_C, _CONTRACT_TESTS + ("tests/cpp/test_losses.cpp",), "ppo_losses")),
    "kl_penalized_rewards": _contract("kl_penalized_rewards", Parts(
        f"{_REF}:kl_penalized_rewards", "saferlhf_fast/ops/losses.py:kl_penalized_rewards", "kernels/losses.py",
        _LOSSES_C, _CONTRACT_TESTS + ("tests/cpp/test_losses.cpp",))),
    "rope": _layer("rope", Parts(
        "saferlhf_fast/ops/layers.py:rope_reference", "saferlhf_fast/ops/layers.py:rope", None, _LAYER_C,
        _LAYER_TESTS, "rope")),
    "swiglu": _layer("swiglu", Parts(
        "saferlhf_fast/ops/layers.py:swiglu_reference", "saferlhf_fast/ops/layers.py:swiglu", None, _LAYER_C,
        _LAYER_TESTS, "swiglu")),
    "rms_norm": _layer("rms_norm", Parts(
        "saferlhf_fast/ops/layers.py:rms_norm_reference", "saferlhf_fast/ops/layers.py:rms_norm", None, _LAYER_C,
        _LAYER_TESTS, "rms_norm")),
    "add_rms_norm": _layer("add_rms_norm", Parts(
        "saferlhf_fast/ops/layers.py:add_rms_norm_reference", "saferlhf_fast/ops/layers.py:add_rms_norm", None,
        _LAYER_C, _LAYER_TESTS, "rms_norm")),
    # models/attention.py: attn_backend= / --attn_backend; sdpa is a default of its own, so a default never warns
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
        parts=Parts("saferlhf_fast/models/attention.py:reference_attention", "saferlhf_fast/models/attention.py:attend",
                    None, ("csrc/attention_ops.cpp", "csrc/autograd_ops.cpp"),
                    ("tests/test_native_attention.py", "tests/test_attention_ext.py", "tests/test_fake_ops.py"),
                    "attention"),
    ),
    # ops/dense.py: ops.linear(backend=), its autograd node in the extension
    "linear": Family(
        impls={"onednn": Impl(op="onednn_linear", probe=_ONEDNN.probe, needs=_ONEDNN.needs), "torch": Impl()},
        defaults={"cpu": ("onednn",)}, reference="torch",
        parts=Parts(None, "saferlhf_fast/ops/dense.py:linear", None, ("csrc/linear_ops.cpp",),
                    ("tests/test_dense.py", "tests/test_bf16.py", "tests/test_fake_ops.py")),
        setting="onednn_linear", setting_map=_ONEDNN_OFF,
    ),
    # ops/dense.py: the products without autograd (matmul_nt / matmul_nn / matmul_tn: linear_logprobs' chunks)
    "matmul": Family(
        impls={"onednn": _ONEDNN, "torch": Impl()},
        defaults={"cpu": ("onednn",)}, reference="torch",
        parts=Parts(None, "saferlhf_fast/ops/dense.py:matmul_nt", None, ("csrc/linear_ops.cpp",),
                    ("tests/test_dense.py",)),
        setting="onednn_linear", setting_map=_ONEDNN_OFF,
    ),
    # ops/lora.py: a LoRA projection in one autograd node on oneDNN (onednn) or PEFT's composition (torch)
    "lora_linear": Family(
        impls={"onednn": _ONEDNN, "torch": Impl()},
        defaults={"cpu": ("onednn",)}, reference="torch",
        parts=Parts("saferlhf_fast/ops/reference.py:lora_linear", "saferlhf_fast/ops/lora.py:lora_linear", None, (),
                    ("tests/test_lora_linear.py", "tests/test_lora.py"), "lora_linear"),
        setting="onednn_linear", setting_map=_ONEDNN_OFF,
    ),
    # engine/fast_decode.py: the one-op decode step (native) or the model's own forward_cached (eager, a default of
    # its own: no warning); $SAFERLHF_NATIVE_DECODE=0 -> eager
    "decode": Family(
        impls={"native": Impl(devices=_CPU_ONLY, op="decode_step"), "eager": Impl()},
        defaults={"cpu": ("native", "eager")}, reference="eager",
        parts=Parts("saferlhf_fast/models/llama.py", "saferlhf_fast/engine/fast_decode.py", None,
                    ("csrc/decode_ops.cpp",), ("tests/test_fast_decode.py", "tests/test_fake_ops.py")),
        setting="native_decode", setting_map={False: "eager", True: None},
    ),
    # engine/sampling.py: one op for a greedy / top-k step (native) or the torch ops (a default of its own)
    "sampling": Family(
        impls={"native": Impl(devices=_CPU_ONLY, op="sample_tokens"), "torch": Impl()},
        defaults={"cpu": ("native", "torch")}, reference="torch",
        parts=Parts("saferlhf_fast/engine/sampling.py:next_token", "saferlhf_fast/engine/sampling.py:next_token",
                    None, ("csrc/decode_ops.cpp",), ("tests/test_fast_decode.py", "tests/test_fake_ops.py")),
    ),
}

# Files of csrc/, kernels/ and saferlhf_fast/ops/ that serve every family rather than one (tests/test_registry.py:
# every file of those folders is here or in some family's Parts).
SHARED_FILES = (
    "csrc/binding.cpp",  # the op library, its API version, the contract ops' schemas
    "csrc/common.h",  # torch-free definitions shared by the C++ core
    "csrc/fp_contract_off.h",  # the bit-exactness switch of the CPU kernels
    "csrc/simd_cpu.h",  # the CPU kernels' vector helpers (logprobs, layer ops, attention)
    "csrc/cuda_check.cuh",  # the CUDA kernels' launch check
    "kernels/launchers.py",  # the triton backend's kernel module
    "saferlhf_fast/ops/__init__.py",
    "saferlhf_fast/ops/fakes.py",  # every op's fake implementation (torch.compile)
)


# ---------------------------------------------------------------------------------------------------- the choice
def _variable(field: str) -> str:
    """The environment variable of a Settings field (for messages)."""
    from .settings import VARIABLES

    return next(v.name for v in VARIABLES if v.field == field)


@torch.compiler.assume_constant_result
def _probe(spec: str) -> bool:
    """The probe ``"module:function"``'s answer; a constant under torch.compile (evaluated once while tracing)."""
    module, _, func = spec.partition(":")
    return bool(getattr(importlib.import_module(module), func)())


def _device_needs(impl: Impl, device_type: str) -> str | None:
    """What backend ``impl`` needs to take tensors of ``device_type`` (None: nothing)."""
    if impl.devices is None:
        return None
    if device_type not in impl.devices:
        return f"{' or '.join(d.upper() for d in impl.devices)} tensors, got {device_type}"
    flag = impl.devices[device_type]
    if flag is not None and not getattr(settings(), flag):
        return f"{_variable(flag)}=1 for {device_type} tensors"
    return None


def impl_availability(impl: Impl, device_type: str) -> tuple[bool, str | None]:
    """Whether ``impl`` can run on tensors of ``device_type``, and what it needs if not."""
    why = _device_needs(impl, device_type)
    if why is not None:
        return False, why
    if impl.op is not None and not has_op(impl.op):
        return False, f"the compiled extension: {extension()[1] or f'it has no op saferlhf::{impl.op} (rebuild it)'}"
    if impl.extension and extension()[0] is None:
        return False, f"the compiled extension: {extension()[1]}"
    if impl.probe is not None and not _probe(impl.probe):
        return False, impl.needs
    return True, None


def availability(name: str, device_type: str) -> tuple[bool, str | None]:
    """Whether contract backend ``name`` (:data:`BACKENDS`) can run on tensors of ``device_type``, and why not."""
    if name not in CONTRACT:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return impl_availability(CONTRACT[name], device_type)


def available_backends(device_type: str = "cpu") -> list[str]:
    return [b for b in BACKENDS if availability(b, device_type)[0]]


def choose(op: str, backend: str | None, device: torch.device) -> str:
    """The backend of op family ``op`` for tensors on ``device``: ``backend`` if given, else the one the entry's
    setting names, else the first available of the device's defaults, else the family's reference (module
    docstring)."""
    family = FAMILIES[op]
    if backend is not None:
        return _explicit(op, family, backend.lower(), device.type, None)
    if family.setting is not None:
        value = getattr(settings(), family.setting)
        name = family.setting_map.get(value, value)
        if name is not None:
            return _explicit(op, family, name, device.type, family.setting)
    candidates = family.defaults.get(device.type, ())
    reasons = []
    for name in candidates:
        ok, why = impl_availability(family.impls[name], device.type)
        if ok:
            return name
        reasons.append(f"{name!r} needs {why}")
    if candidates:
        _warn_once(f"saferlhf_fast: using the {family.reference} reference on {device.type}: " + "; ".join(reasons))
    return family.reference


def _explicit(op: str, family: Family, name: str, device_type: str, setting: str | None) -> str:
    """``name`` if family ``op`` has it and it can run, else the error (naming the setting it came from, if any)."""
    if name in family.impls:
        ok, why = impl_availability(family.impls[name], device_type)
        if ok:
            return name
    source = "" if setting is None else f" (${_variable(setting)})"
    if name not in family.impls:
        raise ValueError(f"unknown {op} backend {name!r}{source}; choose one of {', '.join(family.impls)}")
    raise RuntimeError(f"{op} backend {name!r}{source} needs {why}")


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


# ---------------------------------------------------------------------------------------------- docs/kernels.md
def _needs(impl: Impl) -> str:
    """One cell: what ``impl`` needs (devices, extension op, package)."""
    out = []
    if impl.devices is not None:
        out.append(" or ".join(d.upper() + ("" if flag is None else f" ({_variable(flag)}=1)")
                               for d, flag in impl.devices.items()) + " tensors")
    if impl.op is not None:
        out.append(f"`saferlhf::{impl.op}`")
    elif impl.extension:
        out.append("the extension")
    if impl.probe is not None and impl.needs != _EXT_HINT:
        out.append(impl.needs.split(" (")[0])
    return ", ".join(out)


def _choice_row(op: str, family: Family) -> str:
    needs = "; ".join(f"{name}: {_needs(impl)}" for name, impl in family.impls.items() if _needs(impl))
    setting = "none"
    if family.setting == _NAMES_A_BACKEND:
        setting = f"`${_variable(family.setting)}` (a backend it has)"
    elif family.setting is not None:
        off = [k for k, v in family.setting_map.items() if v is not None]
        setting = f"`${_variable(family.setting)}={int(off[0])}` -> `{family.setting_map[off[0]]}`"
    defaults = [", ".join(f"`{n}`" for n in family.defaults.get(d, ())) or "none" for d in ("cpu", "cuda")]
    cells = [f"`{op}`", ", ".join(f"`{n}`" for n in family.impls), needs, *defaults, f"`{family.reference}`",
             setting]
    return "| " + " | ".join(cells) + " |"


def _code(paths) -> str:
    return ", ".join(f"`{p}`" for p in paths) or "none"


def _parts_row(op: str, family: Family) -> str:
    p = family.parts
    cells = [f"`{op}`", _code([p.reference] if p.reference else []), _code([p.public]),
             _code([p.triton] if p.triton else []), _code(p.csrc), _code(p.tests), _code([p.bench] if p.bench else [])]
    return "| " + " | ".join(cells) + " |"


def markdown_tables() -> tuple[str, str]:
    """docs/kernels.md's two tables of :data:`FAMILIES` (tests/test_docs.py checks that the doc holds them): the
    backend choice (backends, what each needs, defaults, reference, setting) and the op families' files."""
    choice = ["| family | backends | needs | default: cpu | default: cuda | reference | setting |",
              "|---|---|---|---|---|---|---|"] + [_choice_row(op, f) for op, f in FAMILIES.items()]
    parts = ["| family | reference | public op | Triton | C++ / CUDA | tests | `bench ops` |",
             "|---|---|---|---|---|---|---|"] + [_parts_row(op, f) for op, f in FAMILIES.items()]
    return "\n".join(choice) + "\n", "\n".join(parts) + "\n"
