"""Command options as dataclass fields: ``option(default, help, ...)`` declares one, the command-line flags and the
YAML keys are generated from the fields (``add_config_arguments``, ``config_from_args``: defaults < ``--config
FILE.yaml`` < flags given), and every bad value is a ``ConfigError`` (one line, exit status 2).

Field metadata a flag can carry: ``help``; ``required``; ``choices``; ``aliases`` (other flag names, e.g. the
reference's ``--learning_rate``); ``nargs`` / ``const`` (e.g. ``--resume`` alone means ``auto``); ``group`` (the
heading the flag is listed under in ``--help``: see ``GROUPS``).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import field


class ConfigError(ValueError):
    """Bad configuration (unknown YAML key, missing required flag, bad value): one line, exit status 2."""


# ``--help`` headings, in the order they are listed (a field's ``group``; fields without one come first).
GROUPS = ("model", "data", "generation", "algorithm", "training", "precision and devices", "output and checkpoints")


def option(default, help: str, **meta):  # noqa: A002
    """A dataclass field with its flag's help text and metadata (see the module docstring)."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def float_options(cfg):
    """(name, value) of every float option (each element of a float list)."""
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        tp, is_list = _base_type(hints[f.name])
        value = getattr(cfg, f.name)
        if tp is float and value is not None:
            yield from ((f.name, v) for v in (value if is_list else [value]))


def check_finite_numbers(cfg) -> None:
    """Every float option of every command is a finite number."""
    for name, value in float_options(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"--{name} must be a finite number, got {value}")


# ------------------------------------------------------------------------------------------------ argparse
def _str2bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _base_type(tp):
    """(python type, is_list) of a field annotation such as ``int``, ``str | None``, ``list[str] | None``."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (list, typing.List):
        return args[0], True
    if args and origin is not None:  # Optional / Union
        return _base_type(args[0])
    return tp, False


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field, ``--name``; booleans accept ``--flag`` and ``--flag True/False``.  Defaults are
    suppressed so that only the flags actually given override the YAML file."""
    hints = _hints(cls)
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE.yaml",
                        help="YAML file of options (keys: the flag names); flags given here win")
    steps = getattr(cls, "STEPS", "steps")
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for f in _in_group_order(cls):
        tp, is_list = _base_type(hints[f.name])
        kw = {"default": argparse.SUPPRESS, "help": f.metadata.get("help", "").replace("{steps}", steps),
              "dest": f.name}
        aliases = f.metadata.get("aliases", ())
        if aliases:
            kw["help"] += " (also " + ", ".join("--" + a for a in aliases) + ")"
        if f.default is not dataclasses.MISSING and f.default is not None:
            kw["help"] += f" (default: {f.default})"
        elif f.default_factory is not dataclasses.MISSING and f.default_factory():
            kw["help"] += f" (default: {' '.join(map(str, f.default_factory()))})"
        if tp is bool:
            kw.update(type=_str2bool, nargs="?", const=True, metavar="BOOL")
        else:
            kw["type"] = tp
            if is_list:
                kw["nargs"] = "+"
            if "nargs" in f.metadata:
                kw["nargs"] = f.metadata["nargs"]
                kw["const"] = f.metadata.get("const")
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        group = groups.get(f.metadata.get("group"), parser)
        group.add_argument("--" + f.name, *("--" + a for a in aliases), **kw)


def _in_group_order(cls) -> list:
    """The fields of ``cls``: the command's own (no group) first, then group by group in ``GROUPS`` order, each in
    declaration order."""
    fields = dataclasses.fields(cls)
    rank = {name: i for i, name in enumerate(GROUPS)}
    return sorted(fields, key=lambda f: rank.get(f.metadata.get("group"), -1))


def _coerce(cls, name: str, value, source: str):
    tp, is_list = _base_type(_hints(cls)[name])
    if value is None:
        return None
    try:
        if is_list:
            values = value if isinstance(value, list) else [value]
            return [tp(v) for v in values]
        if tp is bool:
            return value if isinstance(value, bool) else _str2bool(value)
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return tp(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ConfigError(f"{source}: option '{name}': expected {tp.__name__}{' list' if is_list else ''}, "
                          f"got {value!r}") from None


def load_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset {e.start} "
                          "(save the file as UTF-8)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    return data


def config_from_args(cls: type, args: argparse.Namespace | dict):
    """defaults < YAML (``config``) < given flags."""
    given = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    given.pop("func", None)
    given.pop("command", None)
    names = {f.name for f in dataclasses.fields(cls)}
    aliases = {a: f.name for f in dataclasses.fields(cls) for a in f.metadata.get("aliases", ())}
    values: dict = {}
    path = given.pop("config", None)
    if path:
        for key, value in load_yaml(path).items():
            key = str(key).lstrip("-").replace("-", "_")
            key = aliases.get(key, key)
            if key not in names:
                raise ConfigError(f"{path}: unknown option '{key}'")
            values[key] = _coerce(cls, key, value, path)
    for key, value in given.items():
        if key in names:
            values[key] = value
    cfg = cls(**values)
    check_choices(cfg)
    cfg.validate()
    return cfg


def check_choices(cfg) -> None:
    """Every option with a fixed set of values (``choices``) holds one of them (flags and YAML alike)."""
    for f in dataclasses.fields(cfg):
        choices, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if choices is None or value is None:
            continue
        bad = [v for v in (value if isinstance(value, list) else [value]) if v not in choices]
        if bad:
            raise ConfigError(f"--{f.name} {bad[0]!r}: expected one of {', '.join(map(str, choices))}")
