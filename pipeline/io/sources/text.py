"""CSV and JSON Lines files: shards are byte ranges cut where records end.

Planning scans each file once (pipeline.io.scan: pyarrow's quoting rules, in numpy) and reads
every shard as the run will, naming bad rows (invalid UTF-8, CSV rows with the wrong number of
fields, JSON lines that cannot be read) and checking ids (pipeline.io.checks). A shard's digest
is of its bytes. A CSV shard is read with its own file's header record in front; every file must
have the first file's columns. JSON Lines shards are all read with the columns and types of the
first file's first shard, so every part file has them.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa

from ...errors import JobError
from ..checks import DIAGNOSE_READS, Problems, diagnose_jsonl, jsonl_schema, rows_text, short
from ..plan import FileInfo, Plan, Shard
from ..readers import block_for, read_csv, read_jsonl
from ..scan import Layout, is_utf8, scan
from .base import FileSource, PlanState, ShardRows, Unreadable, check_columns, decode_schema

__all__ = ["CsvSource", "JsonlSource"]

_DIGEST_BLOCK = 8 << 20


def read_range(f: BinaryIO, start: int, end: int) -> bytes:
    f.seek(start)
    return f.read(end - start)


class _TextSource(FileSource):
    csv = False

    def plan_file(self, info: FileInfo, shard_rows: int, state: PlanState) -> tuple[FileInfo, list[Shard]]:
        problems, name = state.problems, info.name

        def bad_utf8(row: int) -> None:
            problems.add("encoding", ("the header" if state.single else f"{name}: the header") if row < 0
                         else state.row(name, row))

        with self._open(state, name) as f:
            layout = scan(f, self.csv, shard_rows, bad_utf8)
            state.max_record = max(state.max_record, layout.max_record)
            header = self._columns(f, info, layout, state)
            shards = self._check_shards(f, info, header, layout, state)
        return FileInfo(name, info.size, info.stamp, layout.rows, base64.b64encode(header).decode() if self.csv else ""), shards

    def _open(self, state: PlanState, name: str) -> Any:
        try:
            return self.place.open(state.single, name)
        except FileNotFoundError:
            raise JobError(f"[input] path: {self.place.shown(state.single, name)} disappeared while it was planned") from None

    def _columns(self, f: BinaryIO, info: FileInfo, layout: Layout, state: PlanState) -> bytes:
        """The CSV header record (JSON: b""), its columns checked against the first file's."""
        block = block_for(layout.max_record)
        if self.csv:
            if layout.header_end is None:
                raise JobError(f"[input] path: manifest {self.place.shown(state.single, info.name)} is empty (a CSV needs a header line)")
            header = read_range(f, 0, layout.header_end)
            schema = pa.schema([(c, pa.string()) for c in _csv_columns(header, block, state)])
        elif layout.bounds and state.schema is None:
            first = layout.bounds[0]
            header, schema = b"", jsonl_schema(read_range(f, first[0], first[1]), block, state.problems)
        else:
            return b""
        if state.schema is None:
            check_columns(self.cfg, schema.names)
            state.schema, state.first = schema, info.name
        elif schema.names != state.schema.names:
            raise JobError(f"[input] path: {info.name} has the columns {', '.join(schema.names)} where "
                           f"{state.first} has {', '.join(state.schema.names)}; every file needs the same columns")
        return header

    def _check_shards(self, f: BinaryIO, info: FileInfo, header: bytes, layout: Layout, state: PlanState) -> list[Shard]:
        """Each shard read as the run will read it: its digest, its rows' problems, its ids."""
        budget = [DIAGNOSE_READS]
        shards: list[Shard] = []
        first = 0
        for start, end, rows in layout.bounds:
            body = read_range(f, start, end)
            shard = Shard(-1, first, rows, start, end, hashlib.blake2b(body, digest_size=12).hexdigest(), info.name)
            found = self._shard_ids(shard, header, body, state, budget)
            if state.ids is not None and found is not None:
                state.ids.add(found[0], found[1] + state.ordinal)
            shards.append(shard)
            first += rows
        return shards

    def _shard_ids(self, shard: Shard, header: bytes, body: bytes, state: PlanState,
                   budget: list[int]) -> tuple[pa.ChunkedArray, np.ndarray] | None:
        """Read one shard as the run will, recording its bad rows. Its ids and their rows in the
        file (None: no id column, or the shard cannot be read)."""
        problems, name = state.problems, shard.file
        rows = np.arange(shard.first_row, shard.first_row + shard.rows)
        where = f"rows {shard.first_row}-{shard.first_row + shard.rows - 1}" + ("" if state.single else f" of {name}")
        block = block_for(state.max_record)
        assert state.schema is not None
        if self.csv:
            bad: list[int] = []

            def invalid(row: Any) -> str:  # pyarrow numbers rows from 1, the header included
                bad.append(row.number - 2)
                label = state.row(name, shard.first_row + row.number - 2)
                problems.add("fields", f"{rows_text([label])} has {row.actual_columns}")
                return "skip"

            key = self.cfg.id_column or state.schema.names[0]
            if not is_utf8(memoryview(body)):  # named by the scan; pyarrow decodes the text of invalid rows
                body = body.decode("utf-8", "replace").encode()
            try:  # the id column alone, as bytes: the scan has checked the UTF-8 of every value
                table = read_csv(header, body, block, only=key, invalid=invalid)
            except pa.ArrowInvalid as exc:
                problems.add("unreadable", f"{where}: {short(exc)}")
                return None
            rows = np.delete(rows, bad)
        else:
            try:
                table = read_jsonl(body, state.schema, block)
            except pa.ArrowInvalid:
                table = None
            if table is None or table.num_rows != shard.rows:
                diagnose_jsonl(body, state.schema, block, lambda i: state.row(name, shard.first_row + i), problems, budget)
                return None
        if table.num_rows != rows.size:  # the scan and pyarrow disagree: a bug, never a guess
            found = table.num_rows + shard.rows - rows.size
            problems.add("unreadable", f"{where}: pyarrow reads {found} rows where the planner found {shard.rows}")
            return None
        return (table.column(self.cfg.id_column), rows) if self.cfg.id_column else None

    def shard_ids(self, plan: Plan, shard: Shard) -> tuple[pa.ChunkedArray, np.ndarray] | None:
        info = plan.file_of(shard)
        with self.place.open(plan.single, info.name) as f:
            body = read_range(f, shard.start, shard.end)
        quiet = PlanState(Problems(self.cfg), None, plan.single, decode_schema(plan.schema), plan.max_record)
        return self._shard_ids(shard, base64.b64decode(info.header), body, quiet, [0])

    # -- reading ----------------------------------------------------------------------------

    def read(self, plan: Plan, shard: Shard, columns: list[str] | None = None) -> ShardRows:
        """The shard's rows; CSV cells stay strings exactly as written (ids like "007")."""
        info = plan.file_of(shard)
        shown = self.place.shown(plan.single, info.name)
        try:
            with self.place.open(plan.single, info.name) as f:
                body = read_range(f, shard.start, shard.end)
        except (OSError, JobError) as exc:
            raise Unreadable.of(shown, exc) from None
        where = f"{shown} rows {shard.first_row}-{shard.first_row + shard.rows - 1}"
        try:
            if self.csv:
                table = read_csv(base64.b64decode(info.header), body, plan.block_size, columns=plan.columns)
            else:
                table = read_jsonl(body, decode_schema(plan.schema), plan.block_size)
        except pa.ArrowInvalid as exc:
            raise Unreadable(f"{where} cannot be read as planned (has the file changed?): {short(exc)}") from None
        if table.num_rows != shard.rows:
            raise Unreadable(f"{where}: {table.num_rows} rows where {shard.rows} were planned (has the file changed?)")
        ids = self.ids(plan, shard, table)
        return ShardRows(table if columns is None else table.select(columns), ids, {})

    def range_digest(self, plan: Plan, shard: Shard) -> str:
        h = hashlib.blake2b(digest_size=12)
        with self.place.open(plan.single, plan.file_of(shard).name) as f:
            f.seek(shard.start)
            left = shard.end - shard.start
            while left > 0:
                block = f.read(min(left, _DIGEST_BLOCK))
                if not block:
                    break
                h.update(block)
                left -= len(block)
        return h.hexdigest()


def _csv_columns(header: bytes, block: int, state: PlanState) -> list[str]:
    problems = state.problems
    try:
        names = read_csv(header, b"", block).column_names
    except UnicodeDecodeError:  # the scan has recorded it ("not valid UTF-8 (the header)"): say that
        problems.raise_if_any()
        raise
    except pa.ArrowInvalid as exc:
        problems.add("unreadable", f"the header: {short(exc)}")
        problems.raise_if_any()
        raise
    problems.fields = len(names)
    return names


class CsvSource(_TextSource):
    format = "csv"
    suffixes = (".csv",)
    csv = True


class JsonlSource(_TextSource):
    format = "jsonl"
    suffixes = (".jsonl", ".ndjson")
