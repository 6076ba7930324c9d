"""The backend registry (saferlhf_fast/_backend.py): selection order (argument > setting > device default), the
one-time fallback warning, the error for an explicit backend that is missing, the stale-extension error, and the
one ``has_op`` check."""
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
    assert _backend.select("gae", None, CPU) == "cpu"
    assert _backend.select("rope", None, CPU) == "cpu"
    with settings.override(backend="torch"):
        assert _backend.select("gae", None, CPU) == "torch"
        assert _backend.select("rope", None, CPU) == "torch"
        assert _backend.select("gae", "cpu", CPU) == "cpu"
        assert _backend.select("gae", "CPU", CPU) == "cpu"


@needs_ext
def test_a_setting_an_op_lacks_leaves_it_its_default():
    """$SAFERLHF_BACKEND=triton is a preference across ops: the CPU-only layer ops keep their device default."""
    with settings.override(backend="triton"):
        assert _backend.select("rope", None, CPU) == "cpu"
        assert _backend.select("swiglu", None, CPU) == "cpu"


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match=r"rope: unknown backend 'triton'; choose one of torch, cpu"):
        _backend.select("rope", "triton", CPU)
    with settings.override(backend="nonsense"), pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        _backend.select("gae", None, CPU)
    with pytest.raises(KeyError):
        _backend.select("no_such_op", None, CPU)


def test_missing_default_falls_back_to_torch_with_one_warning(no_extension):
    with pytest.warns(RuntimeWarning, match=r"using the torch reference ops on cpu: no _C here \(test\)"):
        assert _backend.select("gae", None, CPU) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.select("gae", None, CPU) == "torch"  # once only
        assert _backend.select("ppo_clip", None, CPU) == "torch"  # the same message: still once
        x = torch.randn(3, 4)
        assert torch.equal(ops.swiglu(x, x), torch.nn.functional.silu(x) * x)


def test_explicit_missing_backend_is_an_error(no_extension):
    with pytest.raises(RuntimeError, match=r"backend 'cpu' is not available for gae: no _C here \(test\)"):
        _backend.select("gae", "cpu", CPU)
    with settings.override(backend="cpu"), pytest.raises(RuntimeError, match="not available for rope"):
        _backend.select("rope", None, CPU)
    with pytest.raises(RuntimeError, match="backend 'cuda' needs CUDA tensors"):
        _backend.select("gae", "cuda", CPU)


@needs_ext
def test_an_op_missing_from_the_extension_is_missing_for_that_op_only(monkeypatch, fresh):
    monkeypatch.setattr(_backend, "has_op", lambda name: name != "rope")
    with pytest.warns(RuntimeWarning, match=r"no op saferlhf::rope"):
        assert _backend.select("rope", None, CPU) == "torch"
    assert _backend.select("swiglu", None, CPU) == "cpu"
    assert _backend.select("gae", None, CPU) == "cpu"
    with pytest.raises(RuntimeError, match=r"not available for rope: .*saferlhf::rope"):
        _backend.select("rope", "cpu", CPU)


def test_a_device_without_any_of_an_ops_backends_takes_torch_quietly(fresh):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.select("rope", None, torch.device("cuda")) == "torch"
        assert _backend.select("gae", None, torch.device("meta")) == "torch"


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


def test_registry_entries_name_known_backends():
    for op, impls in _backend.REGISTRY.items():
        assert "torch" in impls, op  # every op has its reference
        assert set(impls) <= set(_backend.BACKENDS), op


def test_has_op_is_the_only_extension_probe():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "saferlhf_fast").rglob("*.py")
                 if p.name != "_backend.py" and "hasattr(torch.ops.saferlhf" in p.read_text()]
    assert offenders == []
