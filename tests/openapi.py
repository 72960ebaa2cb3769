"""OpenAI's published OpenAPI description (the vendored subset in fixtures/openai_openapi/) as
jsonschema validators: what the tests hold requests, answers and stream events to.

    assert_valid("CreateResponse", body)        # AssertionError listing what does not fit

OpenAPI 3.1's schemas are JSON Schema 2020-12 with one reading of its own: a `oneOf` with a
`discriminator` picks its alternative by the `type` property, and OpenAI's unions overlap (a user
message fits both `EasyInputMessage` and `InputMessage`), so "exactly one alternative" can never
hold for a valid request. The SDKs generated from this description read every union as "one of
these shapes"; so do these validators: `oneOf` is checked as `anyOf`. Everything else
(required keys, types, enums, bounds) is checked as published.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema import validators

SUBSET = Path(__file__).parent / "fixtures" / "openai_openapi" / "openapi_subset.json"

_Validator = validators.extend(jsonschema.Draft202012Validator,
                               {"oneOf": jsonschema.Draft202012Validator.VALIDATORS["anyOf"]})


@functools.lru_cache(maxsize=None)
def _document() -> dict[str, Any]:
    return json.loads(SUBSET.read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=None)
def validator(name: str) -> Any:
    doc = _document()
    assert name in doc["components"]["schemas"], f"{name} is not in the vendored subset (see its subset.py ROOTS)"
    return _Validator({"$ref": f"#/components/schemas/{name}", "components": doc["components"]})


def problems(name: str, instance: Any) -> list[str]:
    """What does not fit, each where it is; in a union, the alternative that got furthest."""
    out = []
    for err in validator(name).iter_errors(instance):
        for leaf in _leaves(err):
            out.append(f"at {'/'.join(map(str, leaf.absolute_path)) or '(top)'}: {leaf.message[:300]}")
    return out


def _leaves(err: Any) -> list[Any]:
    if not err.context:
        return [err]
    by_branch: dict[Any, list[Any]] = {}
    for sub in err.context:
        by_branch.setdefault(sub.relative_schema_path[0], []).append(sub)
    # the branch whose `type` matched, and that got furthest (its errors deepest), says what is wrong
    def fit(errs: list[Any]) -> tuple[bool, int, int]:
        other_type = any(list(e.relative_path) == ["type"] and e.validator in ("enum", "const") for e in errs)
        return not other_type, max(len(e.absolute_path) for e in errs), -len(errs)
    branch = max(by_branch.values(), key=fit)
    return [leaf for sub in branch for leaf in _leaves(sub)]


def assert_valid(name: str, instance: Any) -> None:
    found = problems(name, instance)
    assert not found, f"not a valid {name} by OpenAI's OpenAPI description:\n" + "\n".join(found)
