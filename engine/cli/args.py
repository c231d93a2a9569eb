"""Generates argparse flags from a config dataclass (one typed config per role, no hand-written flags)."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal


def _scalar_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) of `X | None` annotations."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One `--kebab-case` flag per field (positional where the field says so); defaults stay the config's."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        tp, _ = _scalar_type(hints[f.name])
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", ""), "default": argparse.SUPPRESS}
        if typing.get_origin(tp) is Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        elif tp is bool:
            kwargs.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        elif tp in (int, float, str):
            kwargs["type"] = tp
        elif typing.get_origin(tp) is list:
            kwargs.update(nargs="+", type=typing.get_args(tp)[0])
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="?", **kwargs)
        else:
            flag = "--" + f.name.replace("_", "-")
            if tp is bool:
                parser.add_argument(flag, **kwargs)
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                    default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            else:
                parser.add_argument(flag, **kwargs)


def config_from_args(cls: type, ns: argparse.Namespace, **overrides: Any):
    """Builds the config from the flags that were given (others keep the dataclass defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(ns).items() if k in names}
    values.update(overrides)
    return cls(**values)


def config_argv(cls: type, config) -> list[str]:
    """The flags that rebuild `config` through engine.cli.args (non-default fields only; secrets never go on
    a command line, which other local users can read)."""
    argv: list[str] = []
    for f in dataclasses.fields(cls):
        value = getattr(config, f.name)
        if value == f.default or value is None or f.metadata.get("cli") is False or f.metadata.get("secret"):
            continue
        if f.metadata.get("positional"):
            argv.insert(0, str(value))
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag, "true" if value else "false"]
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv
