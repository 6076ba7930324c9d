"""Packaging: no top-level name of the checkout shadows an installed package, the Triton kernels ship inside
the package, and the version lives in one place.

Hugging Face's ``kernels`` package is imported by transformers at start-up.  A checkout whose top-level
``kernels/`` folder were a regular package would shadow it for every command run from the repository root
(``python -m ...`` and pytest put the root first on ``sys.path``).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Folders at the top of the checkout; none but the package may be a regular (``__init__.py``) package.
TOP_LEVEL_DIRS = sorted(d for d in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, d)) and not d.startswith("."))


def _python(code: str, cwd: str = ROOT, extra_path: str | None = None) -> str:
    """Run ``python -c code`` the way the Makefile's commands run: from ``cwd``, with ``cwd`` first on sys.path."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if extra_path:
        env["PYTHONPATH"] = extra_path
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("name", [d for d in TOP_LEVEL_DIRS if d != "saferlhf_fast"])
def test_no_top_level_folder_is_a_regular_package(name):
    assert not os.path.exists(os.path.join(ROOT, name, "__init__.py")), (
        f"{name}/__init__.py makes the checkout's {name}/ shadow an installed package named {name!r} for every "
        "command run from the repository root")


def test_installed_kernels_package_wins_over_the_checkout_folder(tmp_path):
    """An installed ``kernels`` (here a stand-in later on sys.path than the repository root) is what
    ``import kernels`` gives from the repository root."""
    fake = tmp_path / "site"
    (fake / "kernels").mkdir(parents=True)
    (fake / "kernels" / "__init__.py").write_text("MARKER = 'installed'\n")
    got = _python("import kernels; print(kernels.MARKER, kernels.__file__)", extra_path=str(fake))
    assert got.startswith("installed "), got


def test_hf_kernels_and_transformers_import_from_the_repository_root():
    """With Hugging Face's ``kernels`` installed (transformers >= 5.25 requires it), the repository root does not
    shadow it, and transformers imports."""
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("Hugging Face's kernels package is not installed here (transformers older than 5.25)")
    got = _python("import kernels, transformers; print(kernels.__file__)")
    assert not os.path.realpath(got).startswith(os.path.realpath(os.path.join(ROOT, "kernels"))), got
    assert "site-packages" in got or "dist-packages" in got, got


def test_triton_kernels_ship_inside_the_package():
    for mod in ("saferlhf_fast.kernels.gae", "saferlhf_fast.kernels.logprobs", "saferlhf_fast.kernels.losses",
                "saferlhf_fast.kernels.launchers"):
        spec = importlib.util.find_spec(mod)
        assert spec is not None and spec.origin.endswith(".py"), mod
    got = _python("import saferlhf_fast.kernels as k; print(list(k.__path__)[0])", cwd=os.path.dirname(ROOT))
    assert os.path.realpath(got) == os.path.realpath(os.path.join(ROOT, "kernels")), got


def test_version_is_defined_once():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    import saferlhf_fast

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("saferlhf-fast") == saferlhf_fast.__version__


def test_wheel_holds_only_the_package(tmp_path):
    """A built wheel (pure Python here: SAFERLHF_NO_EXT=1 skips the C++ build) has one top-level package,
    ``saferlhf_fast``, with the Triton kernels inside it."""
    env = dict(os.environ, SAFERLHF_NO_EXT="1")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path), ROOT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"saferlhf_fast"}, tops
    for f in ("gae.py", "logprobs.py", "losses.py", "launchers.py"):
        assert f"saferlhf_fast/kernels/{f}" in names, f
    assert not any(n.startswith("saferlhf_fast/kernels/__init__") for n in names)


def test_a_stale_extension_build_is_one_clear_error(monkeypatch):
    """An extension built from older sources (another op API version) is refused with the rebuild command, instead
    of silently falling back to the torch reference."""
    import types

    from saferlhf_fast import _backend

    stale = types.SimpleNamespace(api_version=_backend.API_VERSION - 1, __file__="/x/_C.so")
    monkeypatch.setattr(_backend, "_EXTENSION", None)
    monkeypatch.setattr(_backend.importlib, "import_module", lambda name: stale)
    with pytest.raises(_backend.StaleExtensionError, match=r"stale build .* pip install --no-build-isolation -e \."):
        _backend.extension()


def test_the_built_extension_has_this_codes_api_version():
    from saferlhf_fast import _backend

    mod, why = _backend.extension()
    if mod is None:
        pytest.skip(why)
    assert mod.api_version == _backend.API_VERSION
    with open(os.path.join(ROOT, "csrc", "binding.cpp")) as f:
        assert f"#define SAFERLHF_API_VERSION {_backend.API_VERSION}\n" in f.read()
