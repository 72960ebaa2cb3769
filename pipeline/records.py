"""Typed records: what the pipeline writes down about a row and about a shard.

    row = ResultRow("r1", answer="a cat", attempts=1, latency_ms=812)
    journal.append(shard, row)                   # one JSON line: row.to_json()
    result_schema()                              # the output's result columns, from ResultRow's fields
    rec = CommitRecord.from_dict(json.loads(line))   # one line of the checkpoint's commits.jsonl

`ResultRow`'s fields ARE the output's result columns: their order, names and Arrow types are
declared here once, and the part files, the journal's reader and the label columns' reserved
names all follow from them. The usage details (`cached_tokens`, `reasoning_tokens`,
`image_tokens`, `audio_tokens`) come last: rows written before them read them as null. A
`[labels]` run adds one column per label (`labels`), written flat beside the others.
`CommitRecord` is what the checkpoint keeps of each committed part file; a record written by an
earlier version (fewer fields, fewer token keys) still reads.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import orjson

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["ResultRow", "result_schema", "RESULT_COLUMNS", "CommitRecord", "TOKEN_COLUMNS", "DETAIL_TOKEN_COLUMNS"]


def _column(arrow: str, doc: str, default: Any = None) -> Any:
    """A result column: its Arrow type by name (pyarrow is imported only to build the schema:
    `pipeline serve` and `status` read these names without it)."""
    return field(default=default, metadata={"arrow": arrow, "doc": doc})


@dataclass  # not slots: to_json hands its __dict__ to orjson
class ResultRow:
    """One row's result, as journaled and as written to its part file (after the input columns)."""

    id: str
    answer: str | None = _column("string", "the answer, without any <think> block")
    reasoning: str | None = _column("string", "the <think> block, reasoning_content or reasoning")
    prompt_tokens: int | None = _column("int64", "as the provider counted them")
    completion_tokens: int | None = _column("int64", "reasoning included")
    total_tokens: int | None = _column("int64", "")
    model: str | None = _column("string", "the model that answered, as the server said")
    finish_reason: str | None = _column("string", "")
    status: str = _column("string", '"ok" or "error"', "ok")
    error: str | None = _column("string", "the status and the provider's message; on an ok row, a warning")
    error_kind: str | None = _column("string", "an ErrorKind (pipeline.errors)")
    attempts: int = _column("int32", "requests made for this row", 0)
    latency_ms: int | None = _column("int64", "of the attempt that answered")
    cost: float | None = _column("float64", "from [pricing]: every attempt of the row; null without it or without usage")
    finished_at: float | None = _column("float64", "when the result arrived: seconds since the epoch (UTC)")
    # The usage details a provider may report (null when it did not say; never estimated).
    cached_tokens: int | None = _column("int64", "of prompt_tokens, read from the provider's prompt cache")
    reasoning_tokens: int | None = _column("int64", "of completion_tokens, spent reasoning")
    image_tokens: int | None = _column("int64", "of prompt_tokens, for images")
    audio_tokens: int | None = _column("int64", "of prompt_tokens, for audio")
    from_cache: bool = _column("bool_", "answered from the request cache ([run] cache): nothing sent, nothing paid", False)
    labels: dict[str, Any] | None = None  # a [labels] run: one column per label

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping a journal line and a part row hold (label columns beside the others)."""
        out = {name: getattr(self, name) for name in _NAMES}
        if self.labels:
            out.update(self.labels)
        return out

    def to_json(self) -> bytes:
        """One journal line. Without labels, the instance's own __dict__ goes to orjson as it is: a
        dict built per row (or orjson's dataclass path) was a measurable share of a row's CPU.
        Its `"labels": null` is ignored by the journal's readers."""
        return orjson.dumps(self.to_dict() if self.labels else self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any], label_names: tuple[str, ...] | list[str] = ()) -> ResultRow:
        """Back from a journal line or a part file's row (other keys, the input columns, are left)."""
        values: dict[str, Any] = {name: data[name] for name in _NAMES if name in data}  # JSON's values, by name
        row = cls(**values)
        if label_names:
            row.labels = {name: data.get(name) for name in label_names}
        return row

    def scrubbed(self, scrub: Callable[[str], str]) -> ResultRow:
        """A copy with `scrub` applied to every text (a secret a provider or a model echoed)."""
        texts: dict[str, Any] = {name: new for name in _TEXTS  # keywords by name: replace() cannot check them
                 if isinstance(value := getattr(self, name), str) and (new := scrub(value)) != value}
        labels = {k: scrub(v) if isinstance(v, str) else v for k, v in self.labels.items()} if self.labels else None
        if not texts and labels == self.labels:
            return self  # nothing to hide (the common row): no copy
        return dataclasses.replace(self, **texts, labels=labels)


_NAMES = tuple(f.name for f in dataclasses.fields(ResultRow) if f.name != "labels")
_TEXTS = tuple(f.name for f in dataclasses.fields(ResultRow) if f.metadata.get("arrow") == "string" or f.name == "id")
RESULT_COLUMNS = frozenset(_NAMES)  # names a label or an input column may not take as they are
# The usage details many servers omit: a commit record sums one only when some row of its part
# reported it, so a total over records can tell "none reported" (None) from zero.
DETAIL_TOKEN_COLUMNS = ("cached_tokens", "reasoning_tokens", "image_tokens", "audio_tokens")
TOKEN_COLUMNS = ("prompt_tokens", "completion_tokens", "total_tokens", *DETAIL_TOKEN_COLUMNS)


@functools.cache
def result_schema() -> pa.Schema:
    """The output's result columns (after `id` and the input columns), typed."""
    import pyarrow as pa

    return pa.schema([(f.name, getattr(pa, f.metadata["arrow"])()) for f in dataclasses.fields(ResultRow)
                      if "arrow" in f.metadata])


@dataclass(frozen=True)
class CommitRecord:
    """A committed part file, as `<checkpoint>/commits.jsonl` keeps it: the source of truth for
    what the output holds (counts are read from here, never from the part files)."""

    shard: int
    file: str  # the part file's name in the output folder
    size: int  # bytes
    rows: int  # rows in the part (those of the shard that have a result)
    shard_rows: int  # rows in the shard when it was committed
    digest: str  # the manifest shard's digest: rows edited since are refused, appended ones sent
    ok: int
    failed: dict[str, int]  # error_kind -> rows
    tokens: dict[str, int]  # TOKEN_COLUMNS -> sum (a detail only when reported; older records: the first three)
    at: float  # Unix time of the commit
    part_digest: str | None = None  # of the part file's bytes (None: written by an earlier version)
    etag: str | None = None  # an object store's ETag of the part
    spend: float | None = None  # with [pricing]: every attempt paid for in the shard

    def to_json(self) -> bytes:
        data = dataclasses.asdict(self)
        return orjson.dumps({k: v for k, v in data.items() if v is not None})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CommitRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
