"""Docs that cannot drift: docs/cli.md is the parser's own rendering."""
import argparse
import os

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
