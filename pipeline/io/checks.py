"""The checks: what planning finds wrong with a manifest, and the one message that says so.

Planning reads every row once, as the run will, before anything is sent. Every bad row found is
added to `Problems` by kind (invalid UTF-8, a CSV row with the wrong number of fields, a JSON line
that cannot be read, a shard pyarrow cannot read, a row without an id, an id that repeats); they
are raised together as one JobError with a clause per kind, naming the first few rows (manifest
row numbers from 0, as everywhere) and a count.

- JSON Lines: pyarrow tells only that a shard failed; `diagnose_jsonl` names the lines (orjson
  tells why a line is not one JSON object; halving finds the lines whose types do not fit).
- Ids: `IdCheck` finds repeats anywhere in the manifest in 8 bytes a row, a 64-bit hash per
  row, and reads the ids again only when a hash repeats, to name their rows.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterator

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from ..config import InputConfig
from ..errors import JobError
from .readers import read_jsonl
from .scan import JSON_SPACE

__all__ = ["Problems", "IdCheck", "jsonl_schema", "diagnose_jsonl", "short", "rows_text", "SHOW", "DIAGNOSE_READS"]

SHOW = 3  # rows named per kind of problem (here and in the dry run)
DIAGNOSE_READS = 256  # pyarrow reads spent, per plan, naming the lines of JSON shards that fail
TRACK_IDS = 1000  # ids whose hash repeats that are read back to name their rows
MESSAGE_CHARS = 160  # of a reader's message quoted in a problem


class Problems:
    """Bad rows found while planning, by kind: a count and the first few; raised as one JobError."""

    def __init__(self, cfg: InputConfig, name: str | None = None) -> None:
        self.cfg = cfg
        self.name = name if name is not None else str(cfg.items[0]).rstrip("/").rsplit("/", 1)[-1]
        self.fields = 0  # the CSV header's number of fields
        self.count: Counter[str] = Counter()
        self.examples: dict[str, list[str | int]] = {}

    def add(self, kind: str, example: str | int) -> None:
        """One bad row: its number (`file:row` for several files), or a text that names it."""
        self.count[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < SHOW:
            shown.append(example)

    def merge(self, other: Problems) -> None:
        """Add the bad rows `other` found, as if found here."""
        for kind, n in other.count.items():
            for example in other.examples[kind]:
                self.add(kind, example)
            self.count[kind] += n - len(other.examples[kind])

    def raise_if_any(self) -> None:
        """One JobError naming every kind found, in a fixed order; nothing if none."""
        if self.count:
            raise JobError(" | ".join(self._clause(kind) for kind in _KINDS if self.count[kind]))

    def _clause(self, kind: str) -> str:
        n, name = self.count[kind], self.name
        shown = self.examples[kind]
        more = n - len(shown)
        if all(isinstance(e, int) or " " not in e for e in shown):  # rows named alone: 7, or part-3.csv:7
            listed = rows_text(list(shown), more)
        else:
            listed = "; ".join(rows_text([e]) if isinstance(e, int) else e for e in shown) + (f"; and {more} more" if more else "")
        rows = f"{n} row{'s' if n > 1 else ''}"
        if kind == "encoding":
            return f"[input] path: {rows} of {name} {'are' if n > 1 else 'is'} not valid UTF-8 ({listed}); save the manifest as UTF-8"
        if kind == "fields":
            return (f"[input] path: {rows} of {name} do{'' if n > 1 else 'es'} not have the header's {self.fields} fields "
                    f"({listed}); quote values that hold a comma, a quote or a line break")
        if kind == "json":
            return (f"[input] path: {rows} of {name} cannot be read as JSON Lines ({listed}); each line must hold one "
                    f"JSON object, with the columns and types of the first rows")
        if kind == "unreadable":
            return f"[input] path: {name} cannot be read as the run reads it ({listed})"
        if kind == "missing_id":
            return f"[input] id_column: {rows} {'have' if n > 1 else 'has'} no {self.cfg.id_column!r} ({listed}); every row needs an id"
        return f"[input] id_column: {n} id{'s appear' if n > 1 else ' appears'} more than once ({listed}); ids must be unique"


_KINDS = ("encoding", "fields", "json", "unreadable", "missing_id", "duplicate_id")


def short(exc: Exception) -> str:
    """A reader's message on one line, cut to MESSAGE_CHARS, to quote in an error."""
    text = " ".join(str(exc).split())
    return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS] + "..."


def rows_text(rows: list[int] | list[int | str], more: int = 0) -> str:
    """How an error names rows: "row 7", "rows 7, 9 and 12 more"."""
    words = [str(r) for r in rows] + ([f"{more} more"] if more else [])
    head = "rows " if len(words) > 1 else "row "
    return head + (", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0])


# -- JSON Lines ----------------------------------------------------------------------------------


def jsonl_schema(body: bytes, block: int, problems: Problems) -> pa.Schema:
    """The columns and types of the first shard's rows, which every shard is read with (so every
    part file has them); when some of its lines are bad, those of the others (the bad lines are
    named when the shard is checked with it)."""
    try:
        return read_jsonl(body, None, block).schema
    except pa.ArrowInvalid:
        pass
    first = Problems(problems.cfg, problems.name)  # named again when the shard is checked with the schema found
    bad = diagnose_jsonl(body, None, block, int, first, [DIAGNOSE_READS])
    good = [line for i, line in enumerate(_lines(body)) if i not in bad]
    try:
        if good:
            return read_jsonl(b"\n".join(good), None, block).schema
    except pa.ArrowInvalid as exc:
        first.add("unreadable", f"the first rows, whose types disagree: {short(exc)}")
    problems.merge(first)  # without a schema nothing else can be checked
    problems.raise_if_any()
    raise AssertionError("a shard that cannot be read leaves a problem")


def _lines(body: bytes) -> list[bytes]:
    return [line for line in body.split(b"\n") if line.strip(JSON_SPACE)]


def diagnose_jsonl(
    body: bytes, schema: pa.Schema | None, block: int | None, label: Callable[[int], int | str], problems: Problems,
    budget: list[int],
) -> set[int]:
    """Name the lines of a JSON shard pyarrow could not read: lines that are not one JSON object
    (orjson tells why; a pyarrow read confirms while `budget` lasts), then, halving the others,
    lines pyarrow refuses (a type that does not fit the first rows). `label(i)` names the shard's
    line i as errors do. Returns their indexes."""
    lines = _lines(body)
    before = sum(problems.count.values())
    bad: set[int] = set()

    def readable(part: list[int]) -> bool:
        budget[0] -= 1
        try:
            return read_jsonl(b"\n".join(lines[i] for i in part), schema, block).num_rows == len(part)
        except pa.ArrowInvalid:
            return False

    def report(i: int, why: str) -> None:
        bad.add(i)
        problems.add("json", f"{rows_text([label(i)])}: {why}")

    rest = []
    for i, line in enumerate(lines):
        why = _not_one_object(line)
        if why is None or (budget[0] > 0 and readable([i])):
            rest.append(i)
        else:
            report(i, why)
    stack = [rest] if rest else []
    while stack:
        part = stack.pop()
        if budget[0] <= 0:
            problems.add("json", f"rows {label(part[0])}-{label(part[-1])}: some of these (not narrowed down)")
        elif not readable(part):
            if len(part) == 1:
                report(part[0], "does not fit the columns and types of the first rows")
            else:
                stack += [part[len(part) // 2 :], part[: len(part) // 2]]
    if sum(problems.count.values()) == before:  # nothing found line by line: name the shard
        problems.add("unreadable", f"rows {label(0)}-{label(len(lines) - 1)}: pyarrow cannot read them together")
    return bad


def _not_one_object(line: bytes) -> str | None:
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return f"not valid JSON ({short(exc)})"
    return None if isinstance(value, dict) else "not a JSON object"


# -- ids -----------------------------------------------------------------------------------------


class IdCheck:
    """Rows without an id and ids that repeat anywhere in the manifest, in 8 bytes a row: a 64-bit
    hash of each id (Python's, for this process) is kept and sorted at the end. Only when hashes
    repeat are the ids read again, to name the rows of the first few and to rule out collisions.
    Rows are given as ordinals (0 for the first row of the first file); `label` names one."""

    def __init__(self, problems: Problems, label: Callable[[int], int | str] = int) -> None:
        self.problems = problems
        self.parts: list[np.ndarray] = []
        self.label = label

    def add(self, column: pa.ChunkedArray, rows: np.ndarray) -> None:
        values, hashes, present = _hashed(column, self.problems.cfg)
        for i in np.flatnonzero(~present):
            self.problems.add("missing_id", self.label(int(rows[i])))
        self.parts.append(hashes[present])

    def finish(self, read_again: Callable[[], Iterator[tuple[pa.ChunkedArray, np.ndarray] | None]]) -> None:
        h = np.concatenate(self.parts) if self.parts else np.empty(0, np.int64)
        self.parts = []
        h.sort()
        repeated = np.unique(h[1:][h[1:] == h[:-1]])
        del h
        if repeated.size:
            self._name(repeated, read_again())

    def _name(self, repeated: np.ndarray, again: Iterator[tuple[pa.ChunkedArray, np.ndarray] | None]) -> None:
        seen: dict[bytes, list[int]] = {}  # id -> [count, its first rows...]; the first TRACK_IDS ids
        for found in again:
            if found is None:
                continue
            values, hashes, present = _hashed(found[0], self.problems.cfg)
            at = np.minimum(np.searchsorted(repeated, hashes), repeated.size - 1)
            for i in np.flatnonzero(present & (repeated[at] == hashes)):
                entry = seen.get(values[i])
                if entry is None and len(seen) < TRACK_IDS:
                    entry = seen[values[i]] = [0]
                if entry is not None:
                    entry[0] += 1
                    if len(entry) <= SHOW:
                        entry.append(int(found[1][i]))
        repeats = [(value, entry) for value, entry in seen.items() if entry[0] > 1]
        # Every id whose hash repeats was read back, or else the count is the hashes' (a 64-bit
        # collision among 100M ids has odds of about 1 in 3,700).
        total = len(repeats) if len(seen) < TRACK_IDS else int(repeated.size)
        for value, entry in repeats[:SHOW]:
            rows = rows_text([self.label(r) for r in entry[1:]], entry[0] - len(entry) + 1)
            self.problems.add("duplicate_id", f"{rows}: {value.decode('utf-8', 'replace')[:60]!r}")
        if repeats:
            self.problems.count["duplicate_id"] = max(total, self.problems.count["duplicate_id"])


def _hashed(column: pa.ChunkedArray, cfg: InputConfig) -> tuple[list[bytes | None], np.ndarray, np.ndarray]:
    """The ids as bytes (None: missing), their hashes, and which are present (not null, not "")."""
    try:  # ids are compared as text, as row_ids gives them (a JSON 5 is "5"), and as bytes (no decoding)
        if not (pa.types.is_binary(column.type) or pa.types.is_string(column.type)):
            column = column.cast(pa.string())
        column = column.cast(pa.binary())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise JobError(f"[input] id_column: {cfg.id_column!r} holds {column.type} values; ids must be text or numbers") from None
    values = column.to_pylist()
    hashes = np.fromiter(map(hash, values), np.int64, len(values))
    present = pc.fill_null(pc.greater(pc.binary_length(column), 0), False).to_numpy(zero_copy_only=False)
    return values, hashes, present
