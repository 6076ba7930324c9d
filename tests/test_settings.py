"""The settings object (saferlhf_fast/settings.py): parsing, reload / override, and the table of record in
docs/settings.md against every SAFERLHF_* name the sources use."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from saferlhf_fast import settings

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"\bSAFERLHF_[A-Z0-9_]*[A-Z0-9]\b")
# Where environment variables are read or set: Python, shell scripts, the Makefile.
SOURCES = ("saferlhf_fast/**/*.py", "tests/*.py", "bench/**/*.py", "bench/**/*.sh", "examples/**/*.py", "setup.py",
           "Makefile")
# C / C++ / CMake sources: a SAFERLHF_* name there is a preprocessor macro, not an environment variable.
C_SOURCES = ("csrc/**/*", "tests/cpp/**/*", "CMakeLists.txt")


def _names(patterns) -> set[str]:
    out: set[str] = set()
    for pattern in patterns:
        for path in ROOT.glob(pattern):
            if path.is_file() and path.suffix not in (".so", ".o"):
                out |= set(NAME.findall(path.read_text(errors="replace")))
    return out


def _documented() -> set[str]:
    text = (ROOT / "docs" / "settings.md").read_text()
    return set(re.findall(r"^\| `([A-Z0-9_]+)` \|", text, flags=re.M))


def test_docs_hold_the_generated_table():
    assert settings.markdown_table() in (ROOT / "docs" / "settings.md").read_text(), \
        "docs/settings.md is stale: regenerate its table (see the file)"


def test_every_variable_in_the_sources_is_in_the_table_and_back():
    macros = _names(C_SOURCES)
    used = _names(SOURCES) - macros
    documented = _documented()
    listed = {v.name for v in settings.VARIABLES + settings.BUILD_VARIABLES}
    assert "SAFERLHF_BACKEND" in used and "SAFERLHF_NO_EXT" in used  # the scan sees both kinds
    assert used - documented == set(), "used in the sources but missing from docs/settings.md"
    assert {n for n in documented if n.startswith("SAFERLHF_")} - used == set(), "documented but never read"
    assert documented == listed


def test_no_module_reads_our_variables_from_os_environ():
    offenders = []
    for path in (ROOT / "saferlhf_fast").rglob("*.py"):
        if path.name == "settings.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if "os.environ" in line and (NAME.search(line) or "ENV_VAR" in line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}")
    assert offenders == []


def test_parsing_defaults_and_types():
    s = settings.read({})
    assert s == settings.Settings()
    s = settings.read({"SAFERLHF_BACKEND": "CPU", "SAFERLHF_ONEDNN_LINEAR": "0", "SAFERLHF_FAST_DECODE": "yes",
                       "SAFERLHF_DEMO_THREADS": "3", "SAFERLHF_BENCH_THREADS": "", "TRITON_INTERPRET": "0"})
    assert (s.backend, s.onednn_linear, s.fast_decode, s.demo_threads, s.bench_threads, s.triton_interpret) == \
        ("cpu", False, True, 3, None, False)
    assert settings.read({"TRITON_INTERPRET": "1"}).triton_interpret
    with pytest.raises(settings.SettingsError, match=r"\$SAFERLHF_DIST_TIMEOUT_MIN='x' is not an integer"):
        settings.read({"SAFERLHF_DIST_TIMEOUT_MIN": "x"})


def test_fields_match_the_table():
    assert [v.field for v in settings.VARIABLES] == [f.name for f in settings.dataclasses.fields(settings.Settings)]
    for v in settings.VARIABLES:
        assert getattr(settings.Settings(), v.field) == v.default


def test_reload_and_override(monkeypatch):
    monkeypatch.setenv("SAFERLHF_DEMO_THREADS", "5")
    assert settings.reload().demo_threads == 5
    monkeypatch.setenv("SAFERLHF_DEMO_THREADS", "6")
    assert settings.settings().demo_threads == 5  # read once, kept
    with settings.override(demo_threads=2, backend="torch") as s:
        assert settings.settings() is s and s.demo_threads == 2 and s.backend == "torch"
    assert settings.settings().demo_threads == 5
    with pytest.raises(settings.dataclasses.FrozenInstanceError):  # frozen: one object for everyone
        settings.settings().demo_threads = 1


def test_a_bad_value_stops_the_cli_with_one_line(monkeypatch, capsys):
    from saferlhf_fast import cli

    monkeypatch.setenv("SAFERLHF_DEMO_THREADS", "two")
    monkeypatch.setattr(settings, "_CURRENT", None)
    assert cli.main(["docs", "cli", "--out", "/dev/null"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "saferlhf-fast: error: $SAFERLHF_DEMO_THREADS='two' is not an integer"
