"""A shard's journal as pieces (pipeline.io.segments) and the bucket's lease (pipeline.io.ownership),
each on a real folder and on a real S3 API server (moto over HTTP), with the clock passed in."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pytest
from conftest import S3

from pipeline.errors import JobError, LockedError
from pipeline.io.ownership import Fence, Lease, LeaseLost
from pipeline.io.segments import ObjectLog, Pieces, SegmentJournal
from pipeline.io.store import Conflict, FsspecStore, LocalStore, Store
from pipeline.records import ResultRow

SCHEMA = pa.schema([("id", pa.string()), ("answer", pa.string()), ("cost", pa.float64())])


@pytest.fixture(params=["local", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    if request.param == "local":
        return lambda: LocalStore(tmp_path / "shard-000000")
    s3: S3 = request.getfixturevalue("s3")
    url = f"s3://{s3.new_bucket()}/journal/shard-000000"
    return lambda: FsspecStore(url, s3.options())


def line(row_id: str, answer: str, cost: float = 0.5) -> bytes:
    return json.dumps({"id": row_id, "answer": answer, "cost": cost}).encode() + b"\n"


def rows(table: pa.Table) -> list[tuple[str, str]]:
    return list(zip(table.column("id").to_pylist(), table.column("answer").to_pylist()))


def test_later_segments_win_and_a_compaction_keeps_every_line_in_order(place: Callable[[], Store]) -> None:
    pieces = Pieces(place())
    first, second = pieces.segment_name("aaaa"), pieces.segment_name("aaaa")
    assert (first[:8], second[:8]) == ("00000001", "00000002")
    pieces.store.create(second, line("r1", "retried") + line("r2", "b"))
    pieces.store.create(first, line("r1", "failed") + line("r3", "c"))
    assert rows(Pieces(place()).read(SCHEMA)) == [("r1", "failed"), ("r3", "c"), ("r1", "retried"), ("r2", "b")]
    assert Pieces(place()).compact()
    assert place().names() == ["compact-00000002.jsonl.zst"]
    after = Pieces(place())
    assert rows(after.read(SCHEMA)) == [("r1", "failed"), ("r3", "c"), ("r1", "retried"), ("r2", "b")]
    assert after.segment_name("bbbb").startswith("00000003-")  # numbered after what the compact file holds
    assert sum(after.read(SCHEMA).column("cost").to_pylist()) == 2.0  # superseded attempts still counted


def test_a_compaction_killed_before_its_removals_counts_nothing_twice(place: Callable[[], Store]) -> None:
    store = place()
    store.create(Pieces(store).segment_name("aaaa"), line("r1", "a") + line("r2", "b"))
    Pieces(place()).compact()
    old = store.names()[0]
    old_bytes = store.read(old) or b""
    second = Pieces(place()).segment_name("aaaa")
    store.create(second, line("r3", "c"))
    Pieces(place()).compact()
    assert store.names() == ["compact-00000002.jsonl.zst"]
    store.write(old, old_bytes)  # as if killed between the new file and the removals: all put back
    store.create(second, line("r3", "c"))
    assert rows(Pieces(place()).read(SCHEMA)) == [("r1", "a"), ("r2", "b"), ("r3", "c")]  # each once
    Pieces(place()).compact()
    assert store.names() == ["compact-00000002.jsonl.zst"]


def test_a_new_column_missing_from_an_old_compact_file_reads_as_null(place: Callable[[], Store]) -> None:
    pieces = Pieces(place())
    pieces.store.create(pieces.segment_name("aaaa"), line("r1", "a"))
    pieces.compact()
    wider = Pieces(place()).read(pa.schema([("id", pa.string()), ("answer", pa.string()), ("from_cache", pa.bool_())]))
    assert wider.to_pylist() == [{"id": "r1", "answer": "a", "from_cache": None}]


def test_the_segment_journal_puts_one_object_per_shard_per_flush(s3: S3) -> None:
    url = f"s3://{s3.new_bucket()}/journal"
    folder = FsspecStore(url, s3.options())
    made: dict[int, Pieces] = {}
    journal = SegmentJournal(lambda shard: made.setdefault(shard, Pieces(folder.child(f"shard-{shard:06d}"))),
                             flush_s=60, flush_rows=5)
    for i in range(4):
        journal.append(0, ResultRow(id=f"a{i}", answer="x"))
        journal.append(1, ResultRow(id=f"b{i}", answer="y"))  # the 5th row waiting: both shards put
    assert journal.puts == 2
    journal.append(1, ResultRow(id="b9", answer="z"))
    asyncio.run(journal.close_shard(1))
    assert journal.puts == 3 and folder.child("shard-000000").names() == ["00000001-" + journal.writer + ".jsonl"]
    assert Pieces(folder.child("shard-000001")).read(SCHEMA).column("id").to_pylist() == \
        ["b0", "b1", "b2", "b3", "b9"]


def test_the_segment_journals_failure_is_kept_and_raised_again(s3: S3) -> None:
    folder = FsspecStore(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/journal", s3.options())
    told: list[OSError] = []
    journal = SegmentJournal(lambda shard: Pieces(folder.child(f"shard-{shard:06d}")), flush_s=60, flush_rows=100,
                             on_failure=told.append)
    journal.append(0, ResultRow(id="a", answer="x"))
    with pytest.raises(OSError) as failed:
        journal.flush()
    assert told == [failed.value] and "does not exist" in str(failed.value)
    for call in (journal.flush_before_send, journal.sync, lambda: journal.append(0, ResultRow(id="b"))):
        with pytest.raises(OSError):
            call()


def test_the_segment_journal_flushes_on_its_own_every_interval(s3: S3) -> None:
    folder = FsspecStore(f"s3://{s3.new_bucket()}/journal", s3.options())
    journal = SegmentJournal(lambda shard: Pieces(folder.child(f"shard-{shard:06d}")), flush_s=0.2, flush_rows=100)

    async def run() -> int:
        task = asyncio.create_task(journal.sync_forever())
        journal.append(0, ResultRow(id="a", answer="x"))
        for _ in range(100):  # bounded: 10 s
            await asyncio.sleep(0.1)
            if journal.puts:
                break
        task.cancel()
        return journal.puts

    assert asyncio.run(run()) == 1


def test_object_logs_read_back_in_order_across_writers(s3: S3) -> None:
    folder = FsspecStore(f"s3://{s3.new_bucket()}/runs", s3.options())
    one, two = ObjectLog(folder), ObjectLog(folder)
    one.append(b"1")
    two.append(b"2")  # numbered after what it found
    one.append(b"3")
    assert ObjectLog(folder).entries() == [b"1", b"2", b"3"]


# -- the lease ---------------------------------------------------------------------------

class Clocks:
    """A wall clock and a monotonic one the test moves (the lease's takeover rule reads them)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def wall(self) -> float:
        return self.now

    def mono(self) -> float:
        return self.now


def lease_at(s3: S3, url: str, clocks: Clocks, fence: Fence | None = None) -> Lease:
    return Lease(FsspecStore(url, s3.options()), "lock", 60.0, fence or Fence(clock=clocks.mono),
                 clock=clocks.mono, wall=clocks.wall)


def test_a_lease_is_taken_over_after_its_expiry_and_the_skew_never_before(s3: S3) -> None:
    url = f"s3://{s3.new_bucket()}/ckpt"
    clocks = Clocks()
    holder = lease_at(s3, url, clocks)
    assert holder.acquire("job") is None
    holder.fence()  # may write
    clocks.now += 60 + 15 - 0.5  # expired by its clock, within the 15 s of skew tolerated
    with pytest.raises(LockedError, match="can be taken over in 1s"):
        lease_at(s3, url, clocks).acquire("job")
    with pytest.raises(LeaseLost):
        holder.fence()  # its own writes stopped 15 s before the lease's end, 30 s before a takeover
    clocks.now += 1
    taker = lease_at(s3, url, clocks)
    assert "expired 16s ago" in (taker.acquire("job") or "")
    with pytest.raises(Conflict):
        holder.renew()  # back from a pause: its compare-and-swap fails, its fence is lost for good
    assert holder.fence.lost
    taker.renew()
    taker.release()
    assert lease_at(s3, url, clocks).acquire("job") is None  # a released lease is free at once


def test_a_renewal_moves_the_fence_and_the_expiry(s3: S3) -> None:
    url = f"s3://{s3.new_bucket()}/ckpt"
    clocks = Clocks()
    holder = lease_at(s3, url, clocks)
    holder.acquire("job")
    for _ in range(10):  # renewed every 15 s, for minutes: never expired
        clocks.now += 15
        holder.renew()
        holder.fence()
        with pytest.raises(LockedError):
            lease_at(s3, url, clocks).acquire("job")


def test_a_store_without_conditional_writes_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("fsspec")
    lease = Lease(FsspecStore(f"memory://leases/{uuid.uuid4().hex}"), "lock", 60.0, Fence())
    with pytest.raises(JobError, match="does not send conditional writes"):
        lease.probe()


def test_a_flush_cancelled_before_its_thread_starts_still_puts_its_lines(tmp_path: Path) -> None:
    """The run ends (its flusher cancelled) in the step a segment filled: the flusher had taken the
    lines and its put waited for a thread. A cancelled executor job never runs, its ticket was never
    done, and the commit's own put waited for it for ever (a bucket run answered every row and hung;
    on resume its last 2,000 rows were bought again)."""
    import concurrent.futures
    import threading

    folder = LocalStore(tmp_path / "journal")
    journal = SegmentJournal(lambda shard: Pieces(folder.child(f"shard-{shard:06d}")), flush_s=60, flush_rows=3)
    busy = threading.Event()

    async def run() -> None:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        asyncio.get_running_loop().set_default_executor(pool)
        blocker = asyncio.get_running_loop().run_in_executor(None, busy.wait, 10)  # the one thread is taken
        flusher = asyncio.create_task(journal.sync_forever())
        await asyncio.sleep(0)
        for i in range(3):
            journal.append(0, ResultRow(id=f"r{i}", answer="x"))  # the third wakes the flusher
        await asyncio.sleep(0)  # it takes the lines and asks for a thread
        await asyncio.sleep(0)
        flusher.cancel()  # the run ends
        busy.set()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(10):
                await flusher
        await blocker

    asyncio.run(run())
    journal.append(0, ResultRow(id="r3", answer="x"))
    commit = threading.Thread(target=asyncio.run, args=(journal.close_shard(0),), daemon=True)  # the commit's put
    commit.start()
    commit.join(10)
    assert not commit.is_alive(), "the commit's put waits for a put that will never run"
    assert sorted(Pieces(folder.child("shard-000000")).read(SCHEMA).column("id").to_pylist()) == \
        ["r0", "r1", "r2", "r3"]


def test_a_shards_closing_put_leaves_the_loop_answering() -> None:
    """A commit's put is a round trip (10-100 ms on S3): made on the loop's thread, no answer is
    read and no request sent meanwhile. Here the put waits until the loop has run something else."""
    import threading

    folder = FsspecStore(f"memory://segments-{uuid.uuid4().hex}")
    ticked = threading.Event()

    def fence() -> None:  # before each put, in the put's thread
        if threading.current_thread() is not threading.main_thread():
            assert ticked.wait(10), "the loop stood still while the shard's lines were put"

    journal = SegmentJournal(lambda shard: Pieces(folder.child(f"shard-{shard:06d}")), flush_s=60, flush_rows=100,
                             fence=fence)

    async def run() -> None:
        journal.append(0, ResultRow(id="r0", answer="x"))

        async def other_work() -> None:
            await asyncio.sleep(0.01)
            ticked.set()

        other = asyncio.create_task(other_work())
        await journal.close_shard(0)
        await other

    asyncio.run(run())
    assert Pieces(folder.child("shard-000000")).read(SCHEMA).column("id").to_pylist() == ["r0"]


def test_a_sync_in_the_turn_a_shard_closes_does_not_wait_for_ever() -> None:
    """A shard's closing put takes its ticket at once; a sync on the loop's thread in the same
    turn (a second Ctrl-C's) waits for that ticket's put, which must already be in a thread's hands
    (found by a review: the run hung to its stop deadline and lost the lines the sync had taken)."""
    import threading

    folder = FsspecStore(f"memory://segments-{uuid.uuid4().hex}")
    journal = SegmentJournal(lambda shard: Pieces(folder.child(f"shard-{shard:06d}")), flush_s=60, flush_rows=100)
    finished = threading.Event()

    def run() -> None:
        async def main() -> None:
            journal.append(0, ResultRow(id="a", answer="x"))
            journal.append(1, ResultRow(id="b", answer="y"))
            commit = asyncio.create_task(journal.close_shard(0))  # a shard's commit begins ...
            asyncio.get_running_loop().call_soon(journal.sync)  # ... and in the same turn the journal is synced
            await commit

        asyncio.run(main())
        finished.set()

    threading.Thread(target=run, daemon=True).start()
    assert finished.wait(10), "the sync waited for a put that was never handed to a thread"
    assert journal.puts == 2
    assert [Pieces(folder.child(f"shard-{s:06d}")).read(SCHEMA).column("id").to_pylist() for s in (0, 1)] == [["a"], ["b"]]
