"""The scan: where the records of a CSV or JSON Lines manifest end, found the way pyarrow reads
them, in one pass over its bytes; with it the shard boundaries, the longest record and the
records that are not valid UTF-8.

- CSV (pyarrow.csv, line breaks allowed in quoted values): a record ends at LF, CR LF or a lone
  CR outside quotes; a quote opens a quoted value only at the start of a field (elsewhere it is
  literal: `a 5" screen`), and `""` inside one is a quote; empty lines are skipped, lines of
  spaces are records; a UTF-8 BOM is skipped. The first record is the header.
- JSON Lines: each line that is not blank (JSON's blanks) is one record.

The file is read in pieces of a few MiB, each scanned with numpy (no Python loop per byte or
row), with the state a record carries from one piece to the next kept between them. The scan
reads bytes only: what its findings mean for the job (a row numbered in an error) is the
planner's.

    layout = scan(f, csv=True, shard_rows=10_000, bad_utf8=print)   # bad_utf8(-1): the header
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import numpy as np

__all__ = ["Layout", "Readable", "scan", "is_utf8", "JSON_SPACE"]

_PIECE = 4 << 20  # bytes scanned at a time: numpy's scratch arrays stay within tens of MB
_BOM = b"\xef\xbb\xbf"
_QUOTE, _COMMA, _LF, _CR, _TAB, _SPACE = 34, 44, 10, 13, 9, 32
JSON_SPACE = b" \t\r"  # JSON's blanks besides LF, which ends the line


class Readable(Protocol):
    """A binary file read into buffers: open(..., "rb")'s and fsspec's alike (typing.BinaryIO has no readinto)."""

    def seek(self, offset: int, whence: int = 0, /) -> int: ...
    def read(self, size: int = -1, /) -> bytes: ...
    def readinto(self, buffer: memoryview, /) -> int | None: ...


def _pieces(f: Readable, start: int) -> Iterator[tuple[int, memoryview, bool]]:
    """The file from `start` as (offset, bytes, last) pieces of about _PIECE bytes, in one buffer
    reused (a piece is valid until the next is asked for). A piece never ends inside a UTF-8
    character, a run of quotes or a CR LF pair, so each is scanned and decoded alone. The last
    piece (possibly empty) ends the file."""
    f.seek(start)
    buf = bytearray(_PIECE)
    offset, kept = start, 0  # kept: bytes carried over at the start of buf
    while True:
        if kept == len(buf):  # no place to cut in a whole buffer (a huge run of quotes): grow it
            buf = buf + bytearray(len(buf))
        view = memoryview(buf)
        n = f.readinto(view[kept:])
        if not n:
            yield offset, view[:kept], True
            return
        size = kept + n
        cut = _safe_cut(view[:size])
        if cut:
            yield offset, view[:cut], False
        kept = size - cut
        buf[:kept] = buf[cut:size]
        offset += cut


def _safe_cut(buf: memoryview) -> int:
    """The last offset at which `buf` may be cut (0: none): not before a UTF-8 continuation byte,
    not after a quote or a CR."""
    whole = np.frombuffer(buf, np.uint8)
    for lo in (max(whole.size - 256, 0), 0):  # nearly always among the last bytes
        a = whole[lo:]
        ok = ((a[1:] & 0xC0) != 0x80) & (a[:-1] != _QUOTE) & (a[:-1] != _CR)
        hits = np.flatnonzero(ok)
        if hits.size:
            return lo + int(hits[-1]) + 1
        if lo == 0:
            break
    return 0


class _CsvEnds:
    """Where CSV records end, pyarrow's way, one piece at a time (the state is carried over).

    Quotes come in runs. A run's effect on "inside a quoted value" depends only on whether it
    starts a field and on its length's parity: an odd run at a field start toggles (it opens, or
    closes an open value followed by a delimiter), an odd run elsewhere leaves the value closed
    (it closes it, or is literal in an unquoted field), an even run changes nothing (`""` pairs).
    So the state after each run is the parity of the toggles since the last closing run, which
    numpy computes for all runs of a piece at once; a line break outside quotes ends a record."""

    def __init__(self, start: int) -> None:
        self.inside = False
        self.before = _LF  # the byte before the piece: the scan starts at a record
        self.line_start = start  # file offset where the current line began

    def ends(self, buf: memoryview, base: int, last: bool) -> np.ndarray:
        a = np.frombuffer(buf, np.uint8)
        runs, inside_after = self._quote_runs(a)
        breaks = np.flatnonzero((a == _LF) | (a == _CR))
        nxt = np.zeros(breaks.size, np.uint8)
        has_next = breaks + 1 < a.size  # a piece never ends with a CR, but the file may
        nxt[has_next] = a[breaks[has_next] + 1]
        breaks = breaks[~((a[breaks] == _CR) & (nxt == _LF))]  # CR LF ends a line once, at the LF
        if runs.size:
            before = np.searchsorted(runs, breaks)  # runs that start before each break
            breaks = breaks[~np.where(before > 0, inside_after[np.maximum(before - 1, 0)], self.inside)]
        elif self.inside:
            breaks = breaks[:0]
        crlf = (a[breaks] == _LF) & (breaks > 0) & (a[np.maximum(breaks - 1, 0)] == _CR)
        content_end = base + breaks - crlf.astype(np.int64)
        line_starts = np.append(np.int64(self.line_start), base + breaks[:-1] + 1)
        ends = base + breaks[content_end != line_starts] + 1  # empty lines are no records
        if breaks.size:
            self.line_start = base + int(breaks[-1]) + 1
        if runs.size:
            self.inside = bool(inside_after[-1])
        if a.size:
            self.before = int(a[-1])
        if last and base + a.size > self.line_start:  # a last record without a line break
            ends = np.append(ends, base + a.size)
        return ends.astype(np.int64)

    def _quote_runs(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each run of quotes' offset in the piece, and whether a quoted value is open after it."""
        q = np.flatnonzero(a == _QUOTE)
        if not q.size:
            return q, np.zeros(0, bool)
        first = np.concatenate(([0], np.flatnonzero(np.diff(q) != 1) + 1))
        starts = q[first]
        odd = (np.diff(np.append(first, q.size)) & 1).astype(bool)
        before = a[starts - 1]
        if starts[0] == 0:
            before[0] = self.before
        at_field = (before == _COMMA) | (before == _LF) | (before == _CR)
        toggles = np.cumsum(at_field & odd)
        closing = np.where(~at_field & odd, np.arange(starts.size), -1)
        last_close = np.maximum.accumulate(closing)
        since = toggles - np.where(last_close >= 0, toggles[np.maximum(last_close, 0)], 0)
        initial = np.where(last_close >= 0, False, self.inside)
        return starts, initial ^ (since & 1).astype(bool)


class _JsonlEnds:
    """Where JSON Lines records end: at each LF that ends a line holding more than JSON blanks."""

    def __init__(self) -> None:
        self.content = False  # the current line holds more than blanks so far

    def ends(self, buf: memoryview, base: int, last: bool) -> np.ndarray:
        a = np.frombuffer(buf, np.uint8)
        lf = np.flatnonzero(a == _LF)
        starts = np.concatenate(([0], lf[:-1] + 1)).astype(np.int64)[: lf.size]
        full = np.zeros(lf.size, bool)
        has = lf > starts
        head = a[starts[has]]
        full[has] = (head != _SPACE) & (head != _TAB) & (head != _CR)
        for i in np.flatnonzero(~full):  # lines that start blank (rare): look at all of them
            full[i] = bool(bytes(buf[starts[i] : lf[i]]).strip(JSON_SPACE))
        if lf.size and self.content:
            full[0] = True
        ends = base + lf[full] + 1
        tail = int(lf[-1]) + 1 if lf.size else 0
        self.content = bool(bytes(buf[tail:]).strip(JSON_SPACE)) or (self.content and not lf.size)
        if last and self.content:
            ends = np.append(ends, base + a.size)
        return ends.astype(np.int64)


def is_utf8(data: memoryview) -> bool:
    """Whether `data` is valid UTF-8 (a character cut at the end is not)."""
    try:
        codecs.utf_8_decode(data, "strict", True)
    except UnicodeDecodeError:
        return False
    return True


class _Utf8Rows:
    """Records that hold invalid UTF-8. A piece decodes alone (it never ends inside a character);
    only a piece that fails is decoded again record by record, to name them."""

    def __init__(self, bad: Callable[[int], None], header: bool) -> None:
        self.bad = bad
        self.skip = 1 if header else 0
        self.pending = False  # the record under way (begun in an earlier piece) is bad

    def check(self, buf: memoryview, base: int, ends: np.ndarray, first: int) -> None:
        """`first`: the record number of `ends[0]`."""
        bad: set[int] = set()
        if not is_utf8(buf):
            edges = [0, *(ends - base).tolist(), len(buf)]
            bad = {i for i in range(len(edges) - 1) if not is_utf8(buf[edges[i] : edges[i + 1]])}
        if self.pending and ends.size:
            bad.add(0)
            self.pending = False
        if ends.size in bad:
            self.pending = True
        for i in sorted(bad - {ends.size}):
            self.bad(first + i - self.skip)


@dataclass
class Layout:
    """What a scan found: where the shards' bytes begin and end, and how many rows they hold."""

    header_end: int | None  # csv: where the header record ends; None: there is none
    bounds: list[tuple[int, int, int]]  # (start, end, rows) of each shard
    rows: int  # data rows (the CSV header is none)
    max_record: int  # bytes of the longest record, its line break included


def scan(f: Readable, csv: bool, shard_rows: int, bad_utf8: Callable[[int], None]) -> Layout:
    """One pass over a CSV or JSONL manifest: shard boundaries and the longest record. Each record
    that is not valid UTF-8 is told to `bad_utf8` by its row number (-1: the CSV header), in order."""
    f.seek(0)
    start = 3 if f.read(3) == _BOM else 0
    finder: _CsvEnds | _JsonlEnds = _CsvEnds(start) if csv else _JsonlEnds()
    utf8 = _Utf8Rows(bad_utf8, header=csv)
    skip = 1 if csv else 0
    records, last_end, longest, cuts, header_end = 0, 0, 0, [], None
    for base, buf, last in _pieces(f, start):
        ends = finder.ends(buf, base, last)
        utf8.check(buf, base, ends, records)
        if not ends.size:
            continue
        longest = max(longest, int(np.diff(ends, prepend=last_end).max()))
        if csv and records == 0:
            header_end = int(ends[0])
        row = np.arange(ends.size) + (records - skip)  # the data row each record is
        cuts += ends[(row >= 0) & ((row + 1) % shard_rows == 0)].tolist()
        records, last_end = records + ends.size, int(ends[-1])
    rows = max(records - skip, 0)
    starts = [header_end if csv else 0, *cuts]
    stops = cuts + ([last_end] if rows % shard_rows else [])
    bounds = [(s, e, shard_rows) for s, e in zip(starts, stops)]
    if rows % shard_rows:
        bounds[-1] = (bounds[-1][0], bounds[-1][1], rows % shard_rows)
    return Layout(header_end, bounds, rows, longest)


