"""The `[labels]` table: a labeling job's JSON Schema (a table, inline JSON or a file), checked
once when the job is read; its top-level properties become the label columns."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import JobError
from ..records import RESULT_COLUMNS
from .fields import Table, setting, zero_or_more

__all__ = ["LabelsConfig", "schema_problem"]


def _schema(value: Any, where: str, base: Path) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise JobError(f"{where} must be a table (a JSON Schema) or the path of a JSON file, not {type(value).__name__}")
    if value.lstrip().startswith("{"):  # inline JSON, as people paste a schema: schema = '{"type": "object", ...}'
        try:
            inline = json.loads(value)
        except ValueError as exc:
            raise JobError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(inline, dict):
            raise JobError(f"{where}: must be a JSON object (a JSON Schema)")
        return inline
    path = (base / value).resolve()
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise JobError(f"{where}: cannot read {path} ({exc.strerror})") from None
    except ValueError as exc:
        raise JobError(f"{where}: {path} is not valid JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise JobError(f"{where}: {path} must hold a JSON object (a JSON Schema)")
    return schema


@dataclass(frozen=True)
class LabelsConfig(Table):
    """A labeling job: the answer must be JSON following `schema`; its top-level fields are columns."""

    TABLE = "labels"
    schema: dict[str, Any] = setting(doc="a JSON Schema (a table, a JSON string, or the path of a JSON file); its properties are columns",
                                     parse=_schema)
    max_invalid_retries: int = setting(2, doc="answers failing the schema are asked again this many times", check=zero_or_more)
    send_response_format: bool = setting(True, doc="false for endpoints that refuse `response_format`")
    name: str = setting("labels", doc="the json_schema name sent in response_format")

    def validate(self) -> None:
        problem = schema_problem(self.schema)
        if problem:
            raise JobError(f"[labels] schema: {problem}")


def schema_problem(schema: Any) -> str | None:
    """Why this schema cannot drive a labeling job, or None when it can."""
    if not isinstance(schema, dict):
        return "must be a JSON Schema object"
    import jsonschema  # here, not at the top: ~70 ms, and most jobs have no [labels]

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        return f"not a valid JSON Schema ({exc.message})"
    if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict) or not schema["properties"]:
        return 'must be {"type": "object", "properties": {...}}: its top-level properties become the label columns'
    clash = sorted(RESULT_COLUMNS & set(schema["properties"]))
    if clash:
        return f"property {clash[0]!r} is also an output column; rename it"
    return None
