"""``docs/cli.md``: every command and flag of ``saferlhf-fast``, rendered from the argument parser itself, so the
reference cannot drift from the code (``tests/test_docs.py`` compares the committed file with a fresh rendering).

    saferlhf-fast docs cli                    # print the reference
    saferlhf-fast docs cli --out docs/cli.md  # refresh the committed file
"""
from __future__ import annotations

import argparse

HEADER = """# Command-line reference

Generated from the parser by `saferlhf-fast docs cli --out docs/cli.md`; do not edit by hand
(`tests/test_docs.py` fails when this file and the parser disagree). Every training command also reads a YAML
file of the same options (`--config FILE`), and upstream's script flags are accepted where they mean the same thing
(see `docs/upstream.md`).
"""


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    """(name, parser, help) of each sub-command of ``parser``, in the order they were added."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            out += [(name, sub, helps.get(name, "")) for name, sub in action.choices.items()]
    return out


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _flag_row(action: argparse.Action) -> str | None:
    if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
        return None
    name = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
    if action.choices is not None:
        name += " " + "\\|".join(str(c) for c in action.choices)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) or action.default in (None, ""):
        default = ""
    elif action.default is argparse.SUPPRESS:
        default = ""
    else:
        default = f"`{_cell(action.default)}`"
    return f"| {name} | {default} | {_cell(action.help or '')} |"


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for group in parser._action_groups:
        rows = [r for r in map(_flag_row, group._group_actions) if r]
        if not rows:
            continue
        title = group.title if group.title not in ("options", "optional arguments") else "options"
        lines += ["", f"*{title}*", "", "| flag | default | meaning |", "|---|---|---|", *rows]
    return lines


def _command(path: list[str], parser: argparse.ArgumentParser, text: str) -> list[str]:
    subs = _subcommands(parser)
    lines = [f"\n## `{' '.join(path)}`", ""]
    if text or parser.description:
        lines.append(_cell(parser.description or text))
    if subs:
        lines += ["", "| sub-command | what it does |", "|---|---|"]
        lines += [f"| `{name}` | {_cell(help_)} |" for name, _, help_ in subs]
    lines += _flags(parser)
    for name, sub, help_ in subs:
        lines += _command([*path, name], sub, help_)
    return lines


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The markdown reference of ``parser`` (default: the CLI's), every sub-command depth-first."""
    if parser is None:
        from .cli import build_parser

        parser = build_parser()
    return HEADER + "\n".join(_command(["saferlhf-fast"], parser, "")) + "\n"
