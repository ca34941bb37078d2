"""Paper configs: a dataclass whose fields document themselves, a command line built from it, one-line errors.

Every paper's `Config` is a plain dataclass whose fields are declared with `option`:

    @dataclass
    class Config:
        group_size: int = option(16, "images per prompt (G); official config grpo.py")

`parse_config(Config)` turns it into `--group-size 16` flags whose `--help` shows every field's text and
default, and `run_main` turns a ValueError raised by the config's `__post_init__` (or by loading a model or
reward) into one clear line on stderr and exit status 2. The docs generator reads the same metadata for
each paper's Config table.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, *, choices: Sequence[Any] | None = None) -> Any:
    """A dataclass field with its help text (and allowed values) attached."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None}
    if isinstance(default, list | dict | set):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _field_type(cls: type, field: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    return hints.get(field.name, str)


def _parser_for(tp: Any) -> tuple[Callable[[str], Any], str | None]:
    """A string converter for a field's annotation, and argparse's nargs for lists."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner, nargs = _parser_for(args[0])
        return (lambda s: None if s.lower() == "none" else inner(s)), nargs
    if origin in (list, tuple):
        (inner, _), = [_parser_for(typing.get_args(tp)[0])]
        return inner, "*"
    if tp is bool:
        def to_bool(s: str) -> bool:
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")
        return to_bool, None
    if tp in (int, float, str):
        return tp, None
    return str, None


def describe(cls: type) -> list[dict[str, str]]:
    """One row per field: name, type, default, help (the docs' Config table)."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = _field_type(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
        name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        rows.append({"name": f.name, "type": name, "default": repr(default),
                     "help": f.metadata.get("help", "")})
    return rows


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Build `cls` from command-line flags (`--field-name VALUE`); unknown flags are an error."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        convert, nargs = _parser_for(_field_type(cls, f))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=convert, nargs=nargs,
                            default=default, choices=f.metadata.get("choices"),
                            help=f.metadata.get("help", ""))
    args = parser.parse_args(argv)
    return cls(**vars(args))


def require(condition: bool, field: str, reason: str) -> None:
    """Config validation: raise ValueError("field: reason") unless condition holds."""
    if not condition:
        raise ValueError(f"{field}: {reason}")


def run_main(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> Any:
    """Call main(argv); a ValueError (bad config, bad model path, bad reward name) becomes one line."""
    try:
        return main(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
