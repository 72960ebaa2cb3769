"""Labels: a labeling job's answer is JSON that must follow the job's JSON Schema; its fields are columns.

    labels = Labels(job.labels)
    labels.response_format()          # sent as the body's response_format (where the endpoint takes it)
    values = labels.check(answer)     # {"label": "cat", "confidence": 0.9}; RequestError(invalid_output)
    labels.fields()                   # the arrow fields of the label columns, typed from the schema

The answer is checked locally whatever the endpoint promised: a `<think>` block and markdown code
fences are taken off, the JSON is parsed and validated with `jsonschema`. Each top-level property
of the schema is a column: a string or string enum becomes a string column, a number a float64, an
integer an int64, a boolean a bool, an array of those a list column; anything else (objects, mixed
types) is kept as JSON text in a string column.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: it takes ~70 ms, and most jobs have no [labels]
    import jsonschema

import pyarrow as pa

from ..errors import RequestError
from ..records import RESULT_COLUMNS
from .answer import split_think

__all__ = ["Labels", "extract_json", "column_type", "example_for_schema", "FORBIDDEN_NAMES"]

# Names the output already uses; a label column may not take one (it would hide a result column).
FORBIDDEN_NAMES = RESULT_COLUMNS
_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\r?\n?(.*?)```", re.DOTALL)
_MESSAGE_CAP = 200
_ERRORS_SHOWN = 3


def _describe(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(p) for p in error.absolute_path)
    message = error.message if len(error.message) <= _MESSAGE_CAP else error.message[:_MESSAGE_CAP] + "..."
    return message + (f" (at {where})" if where else "")


def extract_json(answer: str) -> Any:
    """The JSON in an answer: after any think block, inside a code fence if there is one, else the
    text itself, else its outermost {...} (a model that adds a sentence around the object).
    Raises ValueError when there is no JSON."""
    text, _ = split_think(answer)
    text = (text if text is not None else answer).strip()
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except ValueError:
        start, end = text.find("{"), text.rfind("}")
        if start < 0 or end <= start:
            raise
        return json.loads(text[start:end + 1])


def column_type(schema: Any) -> pa.DataType | None:
    """The arrow type of a property's values; None: kept as JSON text."""
    if not isinstance(schema, dict):
        return None
    kinds: list[str] = []
    if "enum" in schema or "const" in schema:
        values = schema.get("enum", [schema.get("const")])
        kinds = sorted({_json_kind(v) for v in values if v is not None})
    else:
        t = schema.get("type")
        kinds = [t] if isinstance(t, str) else sorted(k for k in t if k != "null") if isinstance(t, list) else []
    if kinds == ["integer", "number"]:
        kinds = ["number"]
    if len(kinds) != 1:
        return None
    kind = kinds[0]
    if kind == "array":
        item = column_type(schema.get("items"))
        return pa.list_(item) if item is not None and not pa.types.is_list(item) else None
    return {"string": pa.string(), "number": pa.float64(), "integer": pa.int64(), "boolean": pa.bool_()}.get(kind)


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _coerce(value: Any, kind: pa.DataType | None) -> Any:
    if value is None:
        return None
    if kind is None:
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if pa.types.is_int64(kind) and isinstance(value, float):
        return int(value)  # JSON Schema takes 2.0 as an integer; arrow wants 2
    if pa.types.is_float64(kind) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if pa.types.is_list(kind) and isinstance(value, list):
        return [_coerce(v, kind.value_type) for v in value]
    return value


class Labels:
    """The checker of one job's labels (compiled once, used for every answer)."""

    def __init__(self, config: Any) -> None:  # a config.LabelsConfig
        import jsonschema

        self.config = config
        cls = jsonschema.validators.validator_for(config.schema)
        self._validator = cls(config.schema, format_checker=cls.FORMAT_CHECKER)
        self._types = {name: column_type(sub) for name, sub in config.schema["properties"].items()}

    def _field_order(self, error: jsonschema.ValidationError) -> int:
        """Errors about the whole object first, then in the schema's order of properties."""
        path = list(error.absolute_path)
        if not path:
            return -1
        first = path[0]  # a key, or an index where the instance is an array
        return self.names.index(first) if isinstance(first, str) and first in self._types else len(self._types)

    @property
    def names(self) -> list[str]:
        return list(self._types)

    def fields(self) -> list[pa.Field]:
        return [pa.field(name, t if t is not None else pa.string()) for name, t in self._types.items()]

    def response_format(self) -> dict[str, Any]:
        return {"type": "json_schema", "json_schema": {"name": self.config.name, "schema": self.config.schema}}

    def check(self, answer: str) -> dict[str, Any]:
        """The label columns' values; RequestError(kind="invalid_output") when the answer is not
        JSON following the schema (its `result` keeps the raw answer)."""
        try:
            data = extract_json(answer)
        except ValueError as exc:
            raise RequestError(f"the answer is not JSON ({exc})", kind="invalid_output", result=answer) from None
        errors = sorted(self._validator.iter_errors(data), key=self._field_order)
        if errors:
            from jsonschema.exceptions import best_match

            shown = [best_match([e]) for e in errors[:_ERRORS_SHOWN]]  # best_match: the telling branch of an anyOf
            more = f"; and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
            raise RequestError(
                "the answer does not follow the [labels] schema: " + "; ".join(map(_describe, shown)) + more,
                kind="invalid_output",
                result=answer,
            )
        return {name: _coerce(data.get(name), kind) for name, kind in self._types.items()}


def example_for_schema(schema: Any, *, valid: bool = True, text: str = "a short text", seed: int | None = None) -> Any:
    """A value following `schema` (enum: its first value, number 0.5, string `text`...); with
    valid=False the top-level values are of the wrong kind; with `seed`, enums and bounded numbers
    take a value picked by it. For the built-in endpoint."""
    if not isinstance(schema, dict):
        return text
    if not valid:
        props = schema.get("properties") or {}
        if not props:
            return ["not", "an", "object"]
        return {name: _wrong(sub) for name, sub in props.items()}
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0 if seed is None else seed % len(schema["enum"])]
    t = schema.get("type")
    if isinstance(t, list):
        t = next((k for k in t if k != "null"), "null")
    if t == "object" or "properties" in schema:
        return {name: example_for_schema(sub, text=text, seed=None if seed is None else seed + i)
                for i, (name, sub) in enumerate((schema.get("properties") or {}).items())}
    if t == "array":
        return [example_for_schema(schema.get("items"), text=text, seed=seed)] * max(1, int(schema.get("minItems", 1)))
    if t == "number":
        low, high = schema.get("minimum"), schema.get("maximum")
        if seed is not None and isinstance(low, (int, float)) and isinstance(high, (int, float)):
            return round(low + (high - low) * (seed % 101) / 100, 2)
        return _within(schema, 0.5)
    if t == "integer":
        return int(_within(schema, 1))
    if t == "boolean":
        return True
    if t == "null":
        return None
    return text


def _within(schema: dict[str, Any], value: float) -> float:
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    if isinstance(low, (int, float)) and value < low:
        value = low + (1 if "exclusiveMinimum" in schema else 0)
    if isinstance(high, (int, float)) and value > high:
        value = high - (1 if "exclusiveMaximum" in schema else 0)
    return value


def _wrong(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return None
    if "enum" in schema or "const" in schema:
        return "not-one-of-the-labels"
    t = schema.get("type")
    return 12345 if t == "string" else "not-a-number" if t in ("number", "integer") else "maybe" if t == "boolean" else None
