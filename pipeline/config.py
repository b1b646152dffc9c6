"""Typed configuration sections: every params.yaml section is a frozen dataclass, validated when it is built.

A section is declared next to the code it configures (``DecomposeConfig`` lives in ``decompose.py``) with
``@section`` and fields written as ``name: type = Field(default, ge=..., description=...)``. Validation is
pydantic's, in strict mode: an unknown key, a value of the wrong type (``"10"`` for an int, ``1.5`` for an int)
or a value out of range raises ``ConfigError`` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import pydantic
from pydantic import ConfigDict, Field  # noqa: F401  (re-exported: sections declare fields with it)
from pydantic.dataclasses import dataclass as _pydantic_dataclass

T = TypeVar("T")

_STRICT = ConfigDict(extra="forbid", strict=True, validate_default=True)


def section(cls: type[T]) -> type[T]:
    """Turn a class with annotated fields into a frozen, validated config dataclass."""
    return _pydantic_dataclass(cls, config=_STRICT, frozen=True)


class InvalidInput(ValueError):
    """Bad parameters or a bad file handed in by the user: stages exit with code 2, having written nothing."""


class ConfigError(InvalidInput):
    """Invalid configuration. ``problems`` holds one line per offending key."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid parameters\n" + "\n".join(f"  - {p}" for p in problems))


def build(cls: type[T], values: Any, *, source: str, prefix: str = "") -> T:
    """Build a config dataclass from a plain dict (as read from YAML), raising ConfigError on any problem.

    Nested sections are built first, so every problem is reported with its full dotted key, and all
    problems of one file are reported together.
    """
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(source, [f"{prefix or '<root>'} = {values!r}: should be a mapping of keys to values"])
    problems: list[str] = []
    kwargs = dict(values)
    for name, info in cls.__pydantic_fields__.items():
        if name in kwargs and dataclasses.is_dataclass(info.annotation):
            try:
                kwargs[name] = build(info.annotation, kwargs[name], source=source, prefix=_join(prefix, name))
            except ConfigError as err:
                problems += err.problems
                kwargs.pop(name)
    try:
        built = cls(**kwargs)
    except pydantic.ValidationError as err:
        problems += [_describe(cls, e, prefix) for e in err.errors()]
    except ValueError as err:  # cross-field checks in __post_init__ raise plain ValueErrors
        problems.append(f"{prefix or '<root>'}: {err}")
    if problems:
        raise ConfigError(source, problems)
    return built


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _describe(cls: type, error: Any, prefix: str) -> str:
    loc = [str(p) for p in error["loc"]]
    key = ".".join(([prefix] if prefix else []) + loc) or "<root>"
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        allowed = ", ".join(cls.__pydantic_fields__)
        return f"{key}: unknown key (allowed here: {allowed})"
    if error["type"] in ("missing_argument", "missing"):
        return f"{key}: required key is missing"
    if error["type"] == "value_error":  # a __post_init__ check: its message names the keys itself
        return f"{prefix or '<root>'}: {error['msg'].removeprefix('Value error, ')}"
    return f"{key} = {error.get('input')!r}: {error['msg']}"


def describe_fields(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, description) of every field: the source of docs/parameters.md (`pipeline.params_doc`)."""
    rows = []
    for name, info in cls.__pydantic_fields__.items():
        annotation = info.annotation
        type_name = getattr(annotation, "__name__", str(annotation)).replace("typing.", "")
        rows.append((name, type_name, info.default, info.description or ""))
    return rows
