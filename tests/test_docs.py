"""Docs that cannot drift: docs/cli.md is the parser's own rendering, docs/performance.md and the README's
headline table are the committed CSVs' rendering, the README's layout names what exists, docs/kernels.md's backend
and op-family tables are the registry's rendering, and every command and flag the docs show exists in the parser."""
import argparse
import os
import re

from saferlhf_fast.cli import build_parser, main
from saferlhf_fast.clidoc import render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_reference_is_the_parsers_rendering():
    with open(os.path.join(ROOT, "docs", "cli.md"), encoding="utf-8") as f:
        committed = f.read()
    assert committed == render(build_parser()), "docs/cli.md is stale: saferlhf-fast docs cli --out docs/cli.md"


def test_rendering_names_every_command_and_flag():
    parser = build_parser()
    text = render(parser)
    seen = 0

    def walk(p, path):
        nonlocal seen
        assert f"## `{' '.join(path)}`" in text
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif action.option_strings and action.help != argparse.SUPPRESS and "-h" not in action.option_strings:
                assert f"`{action.option_strings[0]}`" in text, (path, action.option_strings)
                seen += 1

    walk(parser, ["saferlhf-fast"])
    assert seen > 300  # every training command's options, not only the top level


def test_docs_cli_writes_only_where_asked(tmp_path, capsys):
    assert main(["docs", "cli"]) == 0
    assert capsys.readouterr().out.startswith("# Command-line reference")
    out = tmp_path / "cli.md"
    assert main(["docs", "cli", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render(build_parser())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.md"]  # no temporary file left behind


# ------------------------------------------------------------------------------------------ README and docs/*.md
def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def _layout_block(readme: str) -> list[str]:
    section = readme.split("## Layout", 1)[1]
    return section.split("```", 2)[1].strip("\n").splitlines()


def test_readme_layout_names_paths_that_exist_and_every_top_level_part():
    lines = _layout_block(_read("README.md"))
    named, parent = set(), ""
    for line in lines:
        indent = len(line) - len(line.lstrip())
        head = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0] if indent < 20 else ""  # else: a description
        for token in re.findall(r"[A-Za-z_.][\w./-]*", head):
            token = token.rstrip(",")
            if token in ("->",) or not re.search(r"[/.]|^[a-z_]+$", token):
                continue
            path = token.rstrip("/")
            if indent == 0:
                parent = path if token.endswith("/") else parent
                full = path
            else:
                full = os.path.join(parent, path)
            assert os.path.exists(os.path.join(ROOT, full)), f"README layout names {full}, which does not exist"
            named.add(full)
    tracked_top = {p for p in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, p)) and not p.startswith(".")
                   and p not in ("build", "runs", "dist") and not p.endswith(".egg-info")
                   and os.path.exists(os.path.join(ROOT, p, ".")) and p in _git_top()}
    assert tracked_top <= named, f"README layout misses {sorted(tracked_top - named)}"
    pkg = os.path.join(ROOT, "saferlhf_fast")
    package = {p.removesuffix(".py") for p in os.listdir(pkg)
               if not p.startswith("__") and (p.endswith(".py") or os.path.isdir(os.path.join(pkg, p)))}
    in_package = {n.split("/", 1)[1].removesuffix(".py") for n in named if n.startswith("saferlhf_fast/")}
    assert package <= in_package, f"README layout misses saferlhf_fast/{sorted(package - in_package)}"


def _git_top() -> set[str]:
    import subprocess

    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a checkout (an sdist): every folder counts
        return set(os.listdir(ROOT))
    return {line.split("/", 1)[0] for line in out.stdout.splitlines() if "/" in line}


def test_readme_headline_table_is_generated_from_the_committed_csvs():
    from saferlhf_fast.benchmarks.report import headline, with_headline

    readme = _read("README.md")
    results = os.path.join(ROOT, "bench", "results")
    assert readme == with_headline(readme, "README.md", headline(results)), (
        "README's performance table is stale: saferlhf-fast bench report --readme README.md")
    table = readme.split("<!-- perf:begin -->", 1)[1].split("<!-- perf:end -->", 1)[0]
    assert table.count("\n| ") >= 5  # the headline rows are there, not an empty table


def test_performance_doc_is_generated_from_the_committed_csvs():
    from saferlhf_fast.benchmarks.report import default_csvs, performance_document

    cwd = os.getcwd()
    os.chdir(ROOT)  # the document names its sources relative to the repository
    try:
        expected = performance_document(default_csvs(os.path.join("bench", "results")))
    finally:
        os.chdir(cwd)
    assert _read("docs", "performance.md") == expected, (
        "docs/performance.md is stale: saferlhf-fast bench report --out docs/performance.md")


def _commands_in_docs():
    """(file, command words, flags) of every ``saferlhf-fast ...`` line in a fenced block of README.md / docs."""
    files = ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
                             if f.endswith(".md") and f not in ("cli.md", "performance.md", "perf-log.md")]
    for name in files:
        blocks = _read(name).split("```")[1::2]
        for block in blocks:
            text = re.sub(r"\\\n\s*", " ", block)
            for line in text.splitlines():
                m = re.search(r"(?:saferlhf-fast|-m saferlhf_fast\.cli)\s+(.*)", line)
                if not m:
                    continue
                words = m.group(1).split("#", 1)[0].split()
                yield name, words


def test_every_command_and_flag_in_the_docs_exists():
    parser = build_parser()
    checked = 0
    for name, words in _commands_in_docs():
        p, path = parser, []
        while words and not words[0].startswith("-") and "|" not in words[0] and words[0] != "...":
            sub = next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
            if sub is None or words[0] not in sub.choices:
                break
            p = sub.choices[words[0]]
            path.append(words.pop(0))
        if not path:
            continue
        known = {s for a in p._actions for s in a.option_strings}
        for w in words:
            flag = w.strip("[]()").split("=", 1)[0]
            if flag.startswith("--"):
                assert flag in known, f"{name}: `saferlhf-fast {' '.join(path)}` has no flag {flag}"
                checked += 1
    assert checked > 20


def test_no_reference_a_reader_cannot_follow():
    bad = re.compile(r"spec section|spec sections|safe-rlhf-spec|the issue\b|this issue|issue's", re.I)
    hits = []
    for top in ("saferlhf_fast", "csrc", "kernels", "bench", "examples", "scripts", "docs"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith((".py", ".cpp", ".cu", ".h", ".cuh", ".sh", ".md")) and f != "perf-log.md":
                    with open(os.path.join(dirpath, f), encoding="utf-8", errors="replace") as fh:
                        hits += [f"{os.path.relpath(os.path.join(dirpath, f), ROOT)}:{i}" for i, line in
                                 enumerate(fh, 1) if bad.search(line)]
    hits += [f"README.md:{i}" for i, line in enumerate(_read("README.md").splitlines(), 1) if bad.search(line)]
    assert not hits, hits


def test_kernels_doc_tables_are_the_registrys_rendering():
    from saferlhf_fast import _backend

    with open(os.path.join(ROOT, "docs", "kernels.md")) as f:
        text = f.read()
    choice, parts = _backend.markdown_tables()
    for table in (choice, parts):
        assert table in text, "docs/kernels.md: regenerate the table from _backend.markdown_tables()"
    for table in (choice, parts):  # one row per family, in the registry's order
        assert [row.split(" | ")[0] for row in table.splitlines()[2:]] == [f"| `{op}`" for op in _backend.FAMILIES]
