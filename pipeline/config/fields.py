"""Settings declared once: each job-file table is a frozen dataclass whose fields drive parsing,
checking and the README's key list.

    @dataclass(frozen=True)
    class LimitsConfig(Table):
        TABLE = "limits"
        max_concurrency: int = setting(8, doc="requests in flight", check=positive)

    limits = read_table(LimitsConfig, toml["limits"], source="jobs/a.toml", base=Path("jobs"))
    LimitsConfig(max_concurrency=0)     # JobError: [limits] max_concurrency must be more than zero, not 0

A field's type says how its TOML value is read (an int is fine where a float is wanted, a bool is
never a number, a `Path` is resolved against the job file's folder); its `check` runs whenever the
dataclass is built, from a file or from code; its `doc` and default are what `keys_markdown` prints
into the README. Cross-field rules go in a table's `validate`. A key the table does not declare is
an error naming the file, the table and the key (a typo such as `max_tokns` would otherwise change
what is paid for silently).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar, Union

from ..errors import JobError

__all__ = [
    "Table", "setting", "read_table", "keys_markdown", "positive", "zero_or_more", "one_of", "between",
    "at_least", "Check", "choice", "Auto", "AUTO",
]

T = TypeVar("T", bound="Table")
E = TypeVar("E", bound=StrEnum)
Check = Callable[[Any], "str | None"]  # a value -> what is wrong with it ("must be ..."), or None
_KIND = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table",
         list: "a list", Path: "a path"}


@dataclasses.dataclass(frozen=True)
class Auto:
    """A limit the run finds for itself ("auto" in the job file), a value of its own type so code
    asks `isinstance(v, Auto)` and a type checker knows the number in the other branch."""

    def __str__(self) -> str:
        return "auto"

    def __repr__(self) -> str:
        return "AUTO"


AUTO = Auto()


def setting(default: Any = dataclasses.MISSING, *, doc: str, check: Check | None = None,
            default_factory: Any = dataclasses.MISSING, parse: Callable[..., Any] | None = None,
            key: bool = True, kind: str | None = None) -> Any:
    """A field of a Table. `parse(value, where, base)` replaces the type-driven reading;
    `key=False`: not read from the file (set by the loader); `kind`: its type as the README says it."""
    meta = {"doc": doc, "check": check, "parse": parse, "key": key, "kind": kind}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# -- checks ----------------------------------------------------------------------------------

def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def positive(value: Any) -> str | None:
    return None if value is None or (value > 0 and _finite(value)) else f"must be more than zero, not {value}"


def zero_or_more(value: Any) -> str | None:
    return None if value is None or (value >= 0 and _finite(value)) else f"must be zero or more, not {value}"


def at_least(low: float) -> Check:
    return lambda v: None if v is None or v >= low else f"must be {low:g} or more, not {v}"


def between(low: float, high: float) -> Check:
    return lambda v: None if v is None or low <= v <= high else f"must be between {low:g} and {high:g}, not {v}"


def one_of(*choices: str) -> Check:
    shown = " or ".join(f'"{c}"' for c in choices) if len(choices) <= 2 else \
        ", ".join(f'"{c}"' for c in choices[:-1]) + f' or "{choices[-1]}"'
    return lambda v: None if v is None or v in choices else f"must be {shown}, not {v!r}"


def choice(kind: type[E]) -> Callable[[Any, str, Path], E]:
    """Reads a key whose values are a StrEnum's: the job holds the typed value, never the string."""
    shown = " or ".join(f'"{m.value}"' for m in kind)

    def parse(value: Any, where: str, base: Path) -> E:
        try:
            return kind(value)
        except ValueError:
            raise JobError(f"{where} must be {shown}, not {value!r}") from None
    return parse


# -- tables ----------------------------------------------------------------------------------

class Table:
    """Base of the job file's tables: the fields' checks run on construction, then `validate`."""

    TABLE: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            check = f.metadata.get("check")
            problem = check(getattr(self, f.name)) if check is not None else None
            if problem:
                raise JobError(f"{_where(self.TABLE, f.name)} {problem}")
        self.validate()

    def validate(self) -> None:
        """Rules over several fields; raise JobError naming the table and key."""


def _where(table: str, key: str) -> str:
    return f"[{table}] {key}" if table else key


def read_table(cls: type[T], data: Any, *, source: str, base: Path, table: str | None = None,
               rest: str | None = None, **fixed: Any) -> T:
    """Build `cls` from a TOML table. `rest`: the field that takes the undeclared keys (as a dict)
    instead of refusing them; `fixed`: values set by the loader, not read from the file."""
    name = cls.TABLE if table is None else table
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise JobError(f"{source}: [{name}] must be a table")
    values: dict[str, Any] = dict(fixed)
    hints = typing.get_type_hints(cls)
    declared = set()
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.metadata.get("key", True) or f.name == rest:
            continue
        declared.add(f.name)
        where = f"{source}: {_where(name, f.name)}"
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise JobError(f"{where} is required")
            continue
        parse = f.metadata.get("parse")
        values[f.name] = parse(data[f.name], where, base) if parse else read_value(data[f.name], hints[f.name], where, base)
    extra = {k: v for k, v in data.items() if k not in declared}
    if rest is not None:
        values[rest] = extra
    else:
        for key in extra:
            raise JobError(f"{source}: {_where(name, key)}: unknown key (check the spelling; see README 'Job file')")
    try:
        return cls(**values)
    except JobError as exc:  # a check on construction: add the file
        raise JobError(f"{source}: {exc}") from None


def read_value(value: Any, kind: Any, where: str, base: Path) -> Any:
    """A TOML value as `kind` says (the field's type hint)."""
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if len(options) == 1:
            return read_value(value, options[0], where, base)
        for option in options:
            if _matches(value, option):
                return read_value(value, option, where, base)
        raise JobError(f"{where} must be {' or '.join(_kind_name(o) for o in options)}, not {_type_name(value)}")
    if origin is tuple or origin is list:
        item = typing.get_args(kind)[0]
        if not isinstance(value, list):
            raise JobError(f"{where} must be a list, not {_type_name(value)}")
        items = [read_value(v, item, where, base) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise JobError(f"{where} must be a table, not {_type_name(value)}")
        item = typing.get_args(kind)[1]
        return {k: read_value(v, item, f"{where}.{k}", base) for k, v in value.items()}
    if kind is Any:
        return value
    if kind is Path:
        if not isinstance(value, str) or not value:
            raise JobError(f"{where} must be a path, not {value!r}")
        return (base / value).resolve()
    if not _matches(value, kind):
        raise JobError(f"{where} must be {_kind_name(kind)}, not {_type_name(value)}")
    return float(value) if kind is float else value


def _matches(value: Any, kind: Any) -> bool:
    if kind is Any:
        return True
    base = typing.get_origin(kind) or kind
    if isinstance(value, bool):
        return base is bool  # a bool is never a number here
    if base is float:
        return isinstance(value, (int, float))
    if base is Path:
        return isinstance(value, str)
    if base is tuple:
        return isinstance(value, list)
    return isinstance(value, base)


def _kind_name(kind: Any) -> str:
    return _KIND.get(typing.get_origin(kind) or kind, getattr(kind, "__name__", str(kind)))


def _type_name(value: Any) -> str:
    return "a boolean" if isinstance(value, bool) else type(value).__name__


# -- the README's key list -------------------------------------------------------------------

def keys_markdown(tables: list[type[Table]]) -> str:
    """Every key of every table: type, default and what it does, as markdown."""
    out: list[str] = []
    for cls in tables:
        out += [f"`[{cls.TABLE}]`" if cls.TABLE else "top level", "", "| key | type | default | |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if not f.metadata.get("key", True):  # e.g. [request] params: the keys no table declares
                if f.metadata.get("doc") and f.default_factory is dict:
                    out.append(f"| any other key | any | | {f.metadata['doc']} |")
                continue
            out.append(f"| `{f.name}` | {f.metadata.get('kind') or _type_text(hints[f.name])} | {_default_text(f)} | {f.metadata['doc']} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _type_text(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_text(k) for k in typing.get_args(kind) if k is not type(None))
    if origin in (list, tuple):
        item = _type_text(typing.get_args(kind)[0])
        return "list of " + (item.replace("list", "lists", 1) if item.startswith("list of") else item + "s")
    if origin is dict:
        return "table"
    if isinstance(kind, type) and issubclass(kind, StrEnum):
        return "string"
    return {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path", Auto: '`"auto"`'}.get(kind, "any")


def _default_text(f: dataclasses.Field[Any]) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if value is None or value == {} or value == () or value == []:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value:g}`" if isinstance(value, float) else f"`{value}`"
