"""Bodies as text: hostile bytes read without losing a paid answer.

    value, bad, surrogates = loads_json(raw)     # bad text read as U+FFFD, and counted
    warning = text_warning(bad, surrogates)       # what an ok row's `error` column then says

A paid answer whose bytes are not valid UTF-8 is kept: the bad bytes (and escaped lone surrogates,
which no Parquet file or journal line can hold) become U+FFFD, and the row says so (its status
stays "ok"). Parsing is linear in the body and never recursive on its nesting.
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Any

import orjson

__all__ = ["decode_utf8", "loads_json", "text_warning"]

_SURROGATE = re.compile("[\ud800-\udfff]")


def decode_utf8(raw: bytes | bytearray | memoryview) -> tuple[str, int]:
    """(text, number of invalid bytes) of UTF-8 bytes, each invalid sequence read as U+FFFD."""
    try:
        return codecs.utf_8_decode(raw, "strict", True)[0], 0
    except UnicodeDecodeError:
        pass
    view = memoryview(raw)
    parts: list[str] = []
    bad = 0
    pos = 0
    while True:  # decode up to the next bad sequence, again and again: linear in the length
        try:
            parts.append(codecs.utf_8_decode(view[pos:], "strict", True)[0])
            return "".join(parts), bad
        except UnicodeDecodeError as exc:
            parts.append(codecs.utf_8_decode(view[pos : pos + exc.start], "strict", True)[0])
            parts.append("\ufffd")
            bad += exc.end - exc.start
            pos += exc.end


def loads_json(raw: bytes | bytearray | str) -> tuple[Any, int, int]:
    """(value, invalid UTF-8 bytes, lone surrogates) of a JSON document, both kinds of bad text
    read as U+FFFD. Raises ValueError (only) when it is not JSON, too deeply nested included."""
    try:
        return orjson.loads(raw), 0, 0  # the fast path: valid UTF-8, no lone surrogate
    except orjson.JSONDecodeError:
        pass
    text, bad = decode_utf8(raw) if not isinstance(raw, str) else (raw, 0)
    if bad:
        try:
            return orjson.loads(text), bad, 0
        except orjson.JSONDecodeError:
            pass
    try:
        value = json.loads(text)  # orjson refuses "\ud800"; the standard library reads it
    except (ValueError, RecursionError) as exc:
        raise ValueError(str(exc)) from None
    value, surrogates = _without_surrogates(value)
    if not (bad or surrogates):
        raise ValueError("not JSON")  # orjson's refusal was for something the standard library allows
    return value, bad, surrogates


def _without_surrogates(value: Any) -> tuple[Any, int]:
    """`value` with lone surrogates in its strings replaced, and how many (no recursion: a hostile
    document may be nested as deep as the standard library's parser allows)."""
    count = 0

    def clean(text: str) -> str:
        nonlocal count
        fixed, n = _SURROGATE.subn("\ufffd", text)
        count += n
        return fixed

    root = [value]
    stack: list[list[Any] | dict[Any, Any]] = [root]
    while stack:
        node = stack.pop()
        items = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        for key, item in items:
            if isinstance(item, str):
                node[key] = clean(item)
            elif isinstance(item, (list, dict)):
                stack.append(item)
    return root[0], count


def text_warning(bad_bytes: int, surrogates: int = 0) -> str | None:
    """The warning an ok row carries in its `error` column when its answer held bad text; None if not."""
    if bad_bytes and not surrogates:
        return f"warning: the answer held invalid UTF-8; {bad_bytes} byte{'s' if bad_bytes != 1 else ''} replaced by U+FFFD"
    if surrogates:
        also = f" and {bad_bytes} bytes of invalid UTF-8" if bad_bytes else ""
        return f"warning: the answer held {surrogates} lone surrogate escape(s){also}; replaced by U+FFFD"
    return None
