"""The backend registry (saferlhf_fast/_backend.py FAMILIES, one table): selection order (argument > setting > device
default), the one-time fallback warning, the error for an explicit backend that is missing, the stale-extension
error, the one ``has_op`` check, and the map of each family's files."""
from __future__ import annotations

import types
import warnings
from pathlib import Path

import pytest
import torch

from saferlhf_fast import _backend, ops, settings

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
needs_ext = pytest.mark.skipif(_backend.extension()[0] is None, reason="the compiled extension is not built")


@pytest.fixture
def fresh(monkeypatch):
    """A clean warning memory and has_op cache, restored afterwards."""
    monkeypatch.setattr(_backend, "_warned", set())
    _backend._has_op.cache_clear()
    yield
    _backend._has_op.cache_clear()


@pytest.fixture
def no_extension(monkeypatch, fresh):
    monkeypatch.setattr(_backend, "_EXTENSION", (None, "no _C here (test)"))


@needs_ext
def test_argument_beats_setting_beats_device_default():
    assert _backend.choose("gae", None, CPU) == "cpu"
    assert _backend.choose("rope", None, CPU) == "cpu"
    with settings.override(backend="torch"):
        assert _backend.choose("gae", None, CPU) == "torch"
        assert _backend.choose("rope", None, CPU) == "torch"
        assert _backend.choose("gae", "cpu", CPU) == "cpu"
        assert _backend.choose("gae", "CPU", CPU) == "cpu"


@needs_ext
def test_a_setting_an_op_lacks_leaves_it_its_default():
    """$SAFERLHF_BACKEND=triton is a preference across ops: the CPU-only layer ops keep their device default."""
    with settings.override(backend="triton"):
        assert _backend.choose("rope", None, CPU) == "cpu"
        assert _backend.choose("swiglu", None, CPU) == "cpu"


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match=r"unknown rope backend 'triton'; choose one of torch, cpu"):
        _backend.choose("rope", "triton", CPU)
    with settings.override(backend="nonsense"), \
            pytest.raises(ValueError, match=r"unknown gae backend 'nonsense' \(\$SAFERLHF_BACKEND\)"):
        _backend.choose("gae", None, CPU)
    with pytest.raises(KeyError):
        _backend.choose("no_such_op", None, CPU)


def test_missing_default_falls_back_to_torch_with_one_warning(no_extension):
    missing = r"using the torch reference on cpu: 'cpu' needs the compiled extension: no _C here \(test\)"
    with pytest.warns(RuntimeWarning, match=missing):
        assert _backend.choose("gae", None, CPU) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.choose("gae", None, CPU) == "torch"  # once only
        assert _backend.choose("ppo_clip", None, CPU) == "torch"  # the same message: still once
        x = torch.randn(3, 4)
        assert torch.equal(ops.swiglu(x, x), torch.nn.functional.silu(x) * x)


def test_explicit_missing_backend_is_an_error(no_extension):
    with pytest.raises(RuntimeError, match=r"gae backend 'cpu' needs the compiled extension: no _C here \(test\)"):
        _backend.choose("gae", "cpu", CPU)
    with settings.override(backend="cpu"), \
            pytest.raises(RuntimeError, match=r"rope backend 'cpu' \(\$SAFERLHF_BACKEND\) needs"):
        _backend.choose("rope", None, CPU)
    with pytest.raises(RuntimeError, match="backend 'cuda' needs CUDA tensors"):
        _backend.choose("gae", "cuda", CPU)


@needs_ext
def test_an_op_missing_from_the_extension_is_missing_for_that_op_only(monkeypatch, fresh):
    monkeypatch.setattr(_backend, "has_op", lambda name: name != "rope")
    with pytest.warns(RuntimeWarning, match=r"no op saferlhf::rope"):
        assert _backend.choose("rope", None, CPU) == "torch"
    assert _backend.choose("swiglu", None, CPU) == "cpu"
    assert _backend.choose("gae", None, CPU) == "cpu"
    with pytest.raises(RuntimeError, match=r"rope backend 'cpu' needs .*saferlhf::rope"):
        _backend.choose("rope", "cpu", CPU)


def test_a_device_without_any_of_an_ops_backends_takes_torch_quietly(fresh):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.choose("rope", None, torch.device("cuda")) == "torch"
        assert _backend.choose("gae", None, torch.device("meta")) == "torch"


def test_stale_extension_is_one_clear_error(monkeypatch):
    stale = types.SimpleNamespace(api_version=_backend.API_VERSION + 1, __file__="/x/_C.so")
    monkeypatch.setattr(_backend.importlib, "import_module", lambda name: stale)
    monkeypatch.setattr(_backend, "_EXTENSION", None)
    with pytest.raises(_backend.StaleExtensionError) as err:
        _backend.extension()
    msg = str(err.value)
    assert "\n" not in msg
    assert f"op API version {_backend.API_VERSION + 1}, this code needs {_backend.API_VERSION}" in msg
    assert "pip install --no-build-isolation -e ." in msg


def test_kernel_families_name_known_backends():
    kernel_families = {op: f for op, f in _backend.FAMILIES.items() if f.setting == "backend"}
    assert set(kernel_families) == {"gather_logprobs", "linear_logprobs", "gae", "ppo_clip", "critic_loss",
                                    "kl_penalized_rewards", "rope", "swiglu", "rms_norm", "add_rms_norm"}
    for op, family in kernel_families.items():
        assert family.reference == "torch", op  # every kernel op has its reference
        assert set(family.impls) <= set(_backend.BACKENDS), op


def test_device_needs_are_the_entrys():
    """cpu takes CPU tensors only, triton takes CPU tensors only under TRITON_INTERPRET=1, cuda needs a CUDA build."""
    with settings.override(triton_interpret=False):
        assert _backend.availability("triton", "cpu") == (False, "TRITON_INTERPRET=1 for cpu tensors")
        with pytest.raises(RuntimeError, match=r"gae backend 'triton' needs TRITON_INTERPRET=1 for cpu tensors"):
            _backend.choose("gae", "triton", CPU)
    assert _backend.availability("cpu", "cuda") == (False, "CPU tensors, got cuda")
    assert _backend.FAMILIES["rope"].impls["cpu"].devices == {"cpu": None}
    mod = _backend.extension()[0]
    if mod is not None and not getattr(mod, "cuda_built", False):
        ok, why = _backend.availability("cuda", "cuda")
        assert not ok and why.startswith("saferlhf_fast._C built with its CUDA kernels")


def test_decode_and_sampling_entries(monkeypatch, fresh):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eager / torch are defaults of their own: never a warning
        with settings.override(native_decode=False):
            assert _backend.choose("decode", None, CPU) == "eager"
        monkeypatch.setattr(_backend, "has_op", lambda name: False)
        assert _backend.choose("decode", None, CPU) == "eager"
        assert _backend.choose("sampling", None, CPU) == "torch"
    monkeypatch.setattr(_backend, "has_op", lambda name: True)
    assert _backend.choose("decode", None, CPU) == "native"
    assert _backend.choose("sampling", None, CPU) == "native"
    with pytest.raises(RuntimeError, match=r"decode backend 'native' needs CPU tensors, got cuda"):
        _backend.choose("decode", "native", torch.device("cuda"))


def test_has_op_is_the_only_extension_probe():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "saferlhf_fast").rglob("*.py")
                 if p.name != "_backend.py" and "hasattr(torch.ops.saferlhf" in p.read_text()]
    assert offenders == []


# --------------------------------------------------------------------- families with backend names of their own
CUDA = torch.device("cuda")


@pytest.fixture
def probes(monkeypatch, fresh):
    """Replace the registry's package probes: ``probes(flash=True, ...)``; names not given keep their probe."""
    real = _backend._probe
    paths = {"flash": "saferlhf_fast.models.attention:flash_available",
             "xformers": "saferlhf_fast.models.attention_ext:xformers_available",
             "native": "saferlhf_fast.models.attention:native_available",
             "onednn": "saferlhf_fast.ops.dense:onednn_available"}

    def install(**present):
        answers = {paths[k]: v for k, v in present.items()}
        monkeypatch.setattr(_backend, "_probe", lambda spec: answers[spec] if spec in answers else real(spec))
    return install


def test_attention_default_per_device(probes):
    probes(flash=True, xformers=True, native=True)
    assert _backend.choose("attention", None, CUDA) == "flash"
    probes(flash=False, xformers=True, native=True)
    assert _backend.choose("attention", None, CUDA) == "xformers"
    probes(flash=False, xformers=False, native=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sdpa is a default of its own: no warning when the others are missing
        assert _backend.choose("attention", None, CUDA) == "sdpa"
        assert _backend.choose("attention", None, torch.device("meta")) == "sdpa"
        probes(native=False)
        assert _backend.choose("attention", None, CPU) == "sdpa"
    probes(native=True, flash=True)
    assert _backend.choose("attention", None, CPU) == ("native" if _backend.has_op("attention") else "sdpa")


def test_attention_explicit_choice_and_errors(probes):
    probes(flash=False, xformers=True)
    assert _backend.choose("attention", "SDPA", CPU) == "sdpa"
    assert _backend.choose("attention", "reference", CUDA) == "reference"
    assert _backend.choose("attention", "xformers", CPU) == "xformers"
    with pytest.raises(RuntimeError, match=r"attention backend 'flash' needs the flash-attn package"):
        _backend.choose("attention", "flash", CUDA)
    with pytest.raises(ValueError, match=r"unknown attention backend 'cpu'; choose one of sdpa, native, flash"):
        _backend.choose("attention", "cpu", CPU)
    with settings.override(backend="torch"):  # $SAFERLHF_BACKEND names kernel backends: attention ignores it
        assert _backend.choose("attention", "sdpa", CPU) == "sdpa"


def test_attention_native_needs_the_extensions_op(no_extension):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.choose("attention", None, CPU) == "sdpa"
    with pytest.raises(RuntimeError, match=r"'native' needs the compiled extension: no _C here \(test\)"):
        _backend.choose("attention", "native", CPU)


@needs_ext
def test_linear_default_explicit_and_setting(probes):
    probes(onednn=True)
    assert _backend.choose("linear", None, CPU) == "onednn"
    assert _backend.choose("matmul", None, CPU) == "onednn"
    assert _backend.choose("linear", None, CUDA) == "torch"  # no default on CUDA: quietly the reference
    assert _backend.choose("linear", "torch", CPU) == "torch"
    with settings.override(onednn_linear=False):  # $SAFERLHF_ONEDNN_LINEAR=0
        assert _backend.choose("linear", None, CPU) == "torch"
        assert _backend.choose("matmul", None, CPU) == "torch"
    with settings.override(backend="torch"):  # not linear's switch
        assert _backend.choose("linear", None, CPU) == "onednn"
    with pytest.raises(ValueError, match=r"unknown linear backend 'mkl'; choose one of onednn, torch"):
        _backend.choose("linear", "mkl", CPU)


def test_linear_without_onednn_warns_once_and_by_name_is_an_error(probes):
    probes(onednn=False)
    with pytest.warns(RuntimeWarning, match=r"using the torch reference on cpu: 'onednn' needs a torch with oneDNN"):
        assert _backend.choose("linear", None, CPU) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.choose("linear", None, CPU) == "torch"  # once only
    with pytest.raises(RuntimeError, match=r"linear backend 'onednn' needs a torch with oneDNN"):
        _backend.choose("linear", "onednn", CPU)


def test_linear_needs_the_extensions_op_the_products_do_not(no_extension, probes):
    probes(onednn=True)
    with pytest.warns(RuntimeWarning, match=r"using the torch reference on cpu: 'onednn' needs the compiled extension"):
        assert _backend.choose("linear", None, CPU) == "torch"
    assert _backend.choose("matmul", None, CPU) == "onednn"


def test_the_cached_choice_follows_settings_and_extension(monkeypatch, fresh):
    monkeypatch.setattr(_backend, "_CHOSEN", {})
    first = _backend.chosen("linear", "cpu")
    assert _backend.chosen("linear", "cpu") == first == _backend.choose("linear", None, CPU)
    with settings.override(onednn_linear=False):
        assert _backend.chosen("linear", "cpu") == "torch"
    assert _backend.chosen("linear", "cpu") == first
    monkeypatch.setattr(_backend, "_EXTENSION", (None, "no _C here (test)"))
    monkeypatch.setattr(_backend, "has_op", lambda name: False)
    with pytest.warns(RuntimeWarning, match="'onednn' needs the compiled extension"):
        assert _backend.chosen("linear", "cpu") == "torch"


def test_the_modules_take_their_names_from_the_registry():
    from saferlhf_fast.models import attention
    from saferlhf_fast.ops import dense

    assert attention.BACKENDS == ("sdpa", "native", "flash", "flex", "xformers", "reference")
    assert dense.BACKENDS == ("onednn", "torch")
    for family in _backend.FAMILIES.values():
        assert family.reference in family.impls
        for names in family.defaults.values():
            assert set(names) <= set(family.impls)


# ------------------------------------------------------------------------------------ op families as units (Parts)
def test_every_named_file_exists_and_every_kernel_file_has_a_family():
    named = set(_backend.SHARED_FILES)
    for op, family in _backend.FAMILIES.items():
        for path in family.parts.files():
            assert (ROOT / path).is_file(), f"{op}: {path}"
        named |= set(family.parts.files())
    for path in _backend.SHARED_FILES:
        assert (ROOT / path).is_file(), path
    sources = [p for pattern in ("csrc/*.cpp", "csrc/*.cu", "csrc/*.cuh", "csrc/*.h", "kernels/*.py",
                                 "saferlhf_fast/ops/*.py") for p in ROOT.glob(pattern)]
    assert len(sources) > 20
    orphans = sorted(str(p.relative_to(ROOT)) for p in sources if str(p.relative_to(ROOT)) not in named)
    assert orphans == [], "files of no op family and not in _backend.SHARED_FILES"


def test_named_functions_exist_and_bench_names_are_bench_ops_kernels():
    import importlib

    from saferlhf_fast.benchmarks import ops as bench_ops

    for op, family in _backend.FAMILIES.items():
        for spec in (family.parts.reference, family.parts.public):
            if spec is not None and ":" in spec:
                path, _, func = spec.partition(":")
                module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
                assert callable(getattr(module, func)), f"{op}: {spec}"
        assert family.parts.bench is None or family.parts.bench in bench_ops._BUILDERS, op
