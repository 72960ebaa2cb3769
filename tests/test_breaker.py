"""The breaker's verdicts that stop a run (net/breaker.py): which refusals are "the same", a wrong
job told from a manifest whose first rows share a defect, time under 429 pacing, and the cluster's
one verdict on Ray. Pure tables (the clock a parameter), then runs against the built-in endpoint.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import job_dict, read_output, run_cli, write_job, write_rows

from pipeline.engine import EXIT_FAILED_ROWS, EXIT_STOPPED
from pipeline.net.breaker import Breaker, ClusterVerdict, SharedBreaker, refusal_key
from pipeline.net.client import translate

# -- which refusals are the same ---------------------------------------------------------------
# Real error bodies, each pair two rows refused for one reason; where a provider's body carries
# a request id, a number or a name that differs per row, the pair differs there.

SAME_REASON = {
    # OpenAI: github.com/crewAIInc/crewAI-examples/issues/121 and github.com/microsoft/autogen/issues/1347
    "openai context length": (400, [
        b'{"error": {"message": "This model\'s maximum context length is 8192 tokens. However, your messages resulted in '
        b'8227 tokens. Please reduce the length of the messages.", "type": "invalid_request_error", "param": "messages", '
        b'"code": "context_length_exceeded"}}',
        b'{"error": {"message": "This model\'s maximum context length is 4096 tokens. However, your messages resulted in '
        b'4539 tokens. Please reduce the length of the messages.", "type": "invalid_request_error", "param": "messages", '
        b'"code": "context_length_exceeded"}}',
    ]),
    # OpenAI: github.com/Aider-AI/aider/issues/2030 (404 model_not_found); the second as another dated model reads
    "openai model not found": (404, [
        b'{"error": {"message": "The model `gpt-4o-2024-08-06` does not exist or you do not have access to it.", '
        b'"type": "invalid_request_error", "param": null, "code": "model_not_found"}}',
        b'{"error": {"message": "The model `gpt-4o-2024-11-20` does not exist or you do not have access to it.", '
        b'"type": "invalid_request_error", "param": null, "code": "model_not_found"}}',
    ]),
    # DashScope compatible mode: github.com/codexu/note-gen/issues/372 (ids outside the message)
    "dashscope compatible mode": (400, [
        b'{"error": {"code": "invalid_parameter_error", "param": null, "message": "parameter.enable_thinking must be set '
        b'to false for non-streaming calls", "type": "invalid_request_error"}, "id": "chatcmpl-145078e8-0d85-98c8-98dd-'
        b'c31908673b01", "request_id": "145078e8-0d85-98c8-98dd-c31908673b01"}',
        b'{"error": {"code": "invalid_parameter_error", "param": null, "message": "parameter.enable_thinking must be set '
        b'to false for non-streaming calls", "type": "invalid_request_error"}, "id": "chatcmpl-07df985b-2ff2-4f7c-a6e7-'
        b'f022f075133b", "request_id": "07df985b-2ff2-4f7c-a6e7-f022f075133b"}',
    ]),
    # DashScope native: github.com/agentscope-ai/agentscope/issues/772 (message[19]) and the same
    # refusal with message[855] in github.com/google-gemini/gemini-cli/issues/5031
    "dashscope native": (400, [
        b'{"status_code": 400, "request_id": "7a403520-184b-43fc-b13f-68606ddc5a1b", "code": "InvalidParameter", '
        b'"message": "<400> InternalError.Algo.InvalidParameter: An assistant message with \\"tool_calls\\" must be '
        b'followed by tool messages responding to each \\"tool_call_id\\". The following tool_call_ids did not have '
        b'response messages: message[19].role", "output": null, "usage": null}',
        b'{"status_code": 400, "request_id": "e7582e87-b403-94bc-ac32-f3c8d30f5d66", "code": "InvalidParameter", '
        b'"message": "<400> InternalError.Algo.InvalidParameter: An assistant message with \\"tool_calls\\" must be '
        b'followed by tool messages responding to each \\"tool_call_id\\". The following tool_call_ids did not have '
        b'response messages: message[855].role", "output": null, "usage": null}',
    ]),
    # LiteLLM proxy: github.com/BrokkAi/brokk-app/issues/540 (status in `code`, no type, the
    # upstream's body inside the message); the second as a longer row's would read
    "litellm": (400, [
        b'{"error": {"message": "litellm.BadRequestError: AnthropicException - b\'{\\"type\\":\\"error\\",\\"error\\":'
        b'{\\"type\\":\\"invalid_request_error\\",\\"message\\":\\"input length and `max_tokens` exceed context limit: '
        b'179413 + 32768 > 200000, decrease input length or `max_tokens` and try again\\"}}\'. Received Model Group='
        b'anthropic/claude-sonnet-4-20250514\\nAvailable Model Group Fallbacks=None", "type": null, "param": null, '
        b'"code": "400"}}',
        b'{"error": {"message": "litellm.BadRequestError: AnthropicException - b\'{\\"type\\":\\"error\\",\\"error\\":'
        b'{\\"type\\":\\"invalid_request_error\\",\\"message\\":\\"input length and `max_tokens` exceed context limit: '
        b'183120 + 32768 > 200000, decrease input length or `max_tokens` and try again\\"}}\'. Received Model Group='
        b'anthropic/claude-sonnet-4-20250514\\nAvailable Model Group Fallbacks=None", "type": null, "param": null, '
        b'"code": "400"}}',
    ]),
    # vLLM: github.com/vllm-project/vllm/issues/4667 (-186 in the issue, -344 in its comments)
    "vllm": (400, [
        b'{"object": "error", "message": "max_tokens must be at least 1, got -186.", "type": "BadRequestError", '
        b'"param": null, "code": 400}',
        b'{"object": "error", "message": "max_tokens must be at least 1, got -344.", "type": "BadRequestError", '
        b'"param": null, "code": 400}',
    ]),
    # new-api / one-api gateways (Chatfire's kind): github.com/QuantumNous/new-api/issues/4446, a
    # request id in the message itself; the second as the next row's would read, with its own ids
    "new-api": (400, [
        b'{"error": {"type": "invalid_request", "message": "..System: ReadString: expects \\" or n, but found [, error '
        b'found in #10 byte of ...|\\"system\\":[{\\"type\\":\\"t|... (request id: 2026042415453469311056p6HvdJxJ) '
        b'(request id: 202604241545334520664934sumiF06)"}, "type": "error"}',
        b'{"error": {"type": "invalid_request", "message": "..System: ReadString: expects \\" or n, but found [, error '
        b'found in #10 byte of ...|\\"system\\":[{\\"type\\":\\"t|... (request id: 20260424154602118734520kQ2mZxA) '
        b'(request id: 202604241546011093821777hTqwV3c)"}, "type": "error"}',
    ]),
}


@pytest.mark.parametrize("provider", list(SAME_REASON))
def test_two_rows_refused_for_one_reason_have_one_key(provider: str) -> None:
    status, bodies = SAME_REASON[provider]
    errors = [translate(status=status, body=body) for body in bodies]
    assert all(e.kind == "bad_request" for e in errors)
    assert bodies[0] != bodies[1]  # they differ as sent ...
    assert refusal_key(errors[0]) == refusal_key(errors[1])  # ... not in what they say


def test_refusals_for_different_reasons_keep_different_keys() -> None:
    keys = {provider: refusal_key(translate(status=status, body=bodies[0]))
            for provider, (status, bodies) in SAME_REASON.items()}
    assert len(set(keys.values())) == len(keys)
    invalid = translate(status=400, body=b'{"error": {"message": "Invalid image.", "type": "invalid_request_error", '
                                          b'"param": null, "code": null}}')
    unsupported = translate(status=400, body=b'{"error": {"message": "You uploaded an unsupported image. Please make '
                                              b'sure your image has of one the following formats: [\'png\', \'jpeg\', '
                                              b'\'gif\', \'webp\'].", "type": "invalid_request_error", "param": null, '
                                              b'"code": "invalid_image_format"}}')
    assert refusal_key(invalid) != refusal_key(unsupported)
    # a time and a CJK message with a number in it: masked, the words kept
    a = translate(status=400, body='{"code": "InvalidParameter", "message": "图片大小超过10MB限制 at 2026-04-24T15:45:33Z"}'.encode())
    b = translate(status=400, body='{"code": "InvalidParameter", "message": "图片大小超过20MB限制 at 2026-04-25 08:01:02"}'.encode())
    c = translate(status=400, body='{"code": "InvalidParameter", "message": "图片格式不支持"}'.encode())
    assert refusal_key(a) == refusal_key(b) != refusal_key(c)


def test_a_provider_whose_refusals_carry_request_ids_still_trips_a_wrong_job() -> None:
    """Before, refusals were compared by their whole message: a request id in it made every one differ."""
    status, bodies = SAME_REASON["new-api"]
    b = Breaker(50, 120.0, max_refusals=2, clock=lambda: 0.0)
    verdicts = []
    for at, body in zip((0.1, 0.9), bodies):
        b.done(b.sent())
        verdicts.append(b.refusal(refusal_key(translate(status=status, body=body)), at))
    assert verdicts == [False, True]


# -- a wrong job, or a manifest whose first rows share a defect -------------------------------

KEY = (400, "bad_request", "invalid_request_error", "Image too large: # bytes, at most #")


def refuse(b: Breaker, at: float, key: tuple = KEY) -> bool:
    b.done(b.sent())
    return b.refusal(key, at)


def test_alike_refusals_from_one_part_of_the_rows_ask_for_rows_from_the_others() -> None:
    b = Breaker(50, 120.0, max_refusals=5, clock=lambda: 0.0)
    assert b.probes() == []  # no doubt worth probing yet
    assert not any(refuse(b, at) for at in (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06))
    assert b.doubting and b.missing == [1, 2, 3, 4]
    assert b.probes() == [1, 2, 3, 4] and b.probes() == []  # each part asked for once
    assert not refuse(b, 0.3)  # the probe of part 1 refused alike too
    b.success()  # the probe of part 2 answered: a right job, its first rows bad
    assert b.settled and not refuse(b, 0.5) and not b.holds("bad_request")


def test_alike_refusals_from_every_part_trip_once_the_probes_are_back() -> None:
    b = Breaker(50, 120.0, max_refusals=5, clock=lambda: 0.0)
    for at in (0.0, 0.05, 0.1, 0.15, 0.19):
        assert not refuse(b, at)
    probes = {part: b.sent() for part in b.probes()}  # sent after the verdict was due
    verdicts = []
    for part, ticket in probes.items():
        b.done(ticket)
        verdicts.append(b.refusal(KEY, part / 5 + 0.01))
    assert verdicts == [False, False, False, True] and b.tripped


def test_a_part_with_nothing_left_to_send_counts_as_tried() -> None:
    b = Breaker(50, 120.0, max_refusals=3, clock=lambda: 0.0)
    for at in (0.0, 0.1, 0.2, 0.5):
        assert not refuse(b, at)
    assert b.missing == [2]
    assert b.cover(2)  # its rows were all answered or failed by earlier runs: nothing to settle it with


# -- time under 429 pacing is not failing time ------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_few_5xx_spread_over_minutes_of_429s_are_no_outage() -> None:
    clock = Clock()
    b = Breaker(max_failures=50, max_seconds=120, clock=clock)
    assert not b.failure("server")
    for t in range(10, 300, 10):  # five minutes of 429s, a 5xx now and then, nothing answered
        clock.t = float(t)
        b.rate_limited()
        if t % 100 == 0:
            assert not b.failure("server"), t
    assert b.streak == 3 and b.failing_s == 0.0

    clock.t = 300.0
    assert not b.failure("server")  # faults with no 429 between them: failing time again ...
    clock.t = 421.0
    assert b.failure("server")  # ... 121 s of it: the endpoint looks down


def test_a_streak_without_429s_still_trips_on_time() -> None:
    clock = Clock()
    b = Breaker(max_failures=1000, max_seconds=30, clock=clock)
    for t in (0.0, 10.0, 20.0):
        clock.t = t
        assert not b.failure("timeout")
    clock.t = 30.0
    assert b.failure("timeout")


# -- one verdict per Ray cluster (pure) -------------------------------------------------------

def worker(refusals: int = 5) -> SharedBreaker:
    return SharedBreaker(50, 120.0, refusals, clock=lambda: 0.0)


def refuse_everywhere(w: SharedBreaker) -> None:
    for at in (0.0, 0.2, 0.4, 0.6, 0.8):
        w.done(w.sent())
        assert not w.refusal(KEY, at)  # a worker never trips on its own


def cluster_of(*shards: int, failures: int = 50) -> ClusterVerdict:
    cluster = ClusterVerdict(failures, 120.0, 5)
    cluster.running(list(shards))  # the driver says which shards' tasks are running
    return cluster


def test_a_worker_refused_alike_everywhere_waits_for_the_others_before_the_cluster_trips() -> None:
    cluster = cluster_of(0, 1)
    a, b = worker(), worker()
    refuse_everywhere(a)
    assert cluster.hear(0, a.take_events()) is None  # shard 1's task has not even reported: no verdict
    assert cluster.hear(1, b.take_events()) is None  # it has sent nothing yet: still none
    refuse_everywhere(b)
    stop = cluster.hear(1, b.take_events())
    assert stop is not None and stop[0] == "refused" and "every worker's shard" in stop[1]
    a.trip()  # the stop reaches a: what it holds stays pending
    assert a.tripped and a.holds("bad_request")


def test_an_answer_on_one_worker_settles_the_doubt_of_every_worker() -> None:
    cluster = cluster_of(0, 1)
    a, b = worker(), worker()
    refuse_everywhere(a)  # a's shard: the manifest's bad rows
    assert cluster.hear(0, a.take_events()) is None
    b.success()
    assert cluster.hear(1, b.take_events()) is None
    assert a.doubting
    a.hear(cluster.news())
    assert a.settled and not a.holds("bad_request")  # its held refusals are the rows' own


def test_refusals_that_differ_between_workers_are_the_rows() -> None:
    cluster = cluster_of(0, 1)
    a, b = worker(), worker()
    refuse_everywhere(a)
    b.done(b.sent())
    b.refusal((400, "bad_request", None, "Invalid image."), 0.0)
    assert cluster.hear(1, b.take_events()) is None and cluster.hear(0, a.take_events()) is None
    assert cluster.news()["mixed"]
    a.hear(cluster.news())
    assert not a.doubting


def test_a_short_shard_refused_alike_votes_once_its_rows_are_all_back_and_the_cluster_trips() -> None:
    """A shard with fewer rows to send than breaker_refusals (the manifest's short last shard, a
    resumed shard's last rows) could never vote: the cluster could not trip while it ran, and its
    task then wrote its held refusals as failed rows."""
    async def main() -> None:
        cluster = cluster_of(0, 1)
        big, short = worker(), SharedBreaker(50, 120.0, 5, clock=lambda: 0.0, verdict_wait_s=60.0)
        refuse_everywhere(big)
        for at in (0.0, 0.34, 0.67):  # its three rows, refused alike as everywhere
            short.done(short.sent())
            assert not short.refusal(KEY, at)
        assert cluster.hear(0, big.take_events()) is None
        assert cluster.hear(1, short.take_events()) is None  # its rows may still be coming: no vote yet
        waiting = asyncio.create_task(short.verdict())  # every row of its shard sent and back
        await asyncio.sleep(0)
        stop = cluster.hear(1, short.take_events())
        assert stop is not None and stop[0] == "refused"
        short.trip()  # the stop reaches it
        assert await waiting is False and short.holds("bad_request")  # what it holds stays pending
    asyncio.run(main())


def short_shard(wait_s: float) -> SharedBreaker:
    """A task's breaker whose three rows were all sent and refused alike."""
    short = SharedBreaker(50, 120.0, 5, clock=lambda: 0.0, verdict_wait_s=wait_s)
    for at in (0.0, 0.34, 0.67):
        short.done(short.sent())
        short.refusal(KEY, at)
    return short


def test_the_cluster_needs_breaker_refusals_alike_in_all_as_a_local_run_does() -> None:
    async def main() -> None:
        cluster = ClusterVerdict(50, 120.0, 5)
        cluster.running([7], queued=0)  # a run with three rows in all: the last shard's, and nothing queued
        short = short_shard(wait_s=60.0)
        waiting = asyncio.create_task(short.verdict())
        await asyncio.sleep(0)
        assert cluster.hear(7, short.take_events()) is None  # 3 alike are not 5: no trip ...
        short.hear(cluster.news())
        assert await waiting is True  # ... but the rows' own, written as failed, as a local run would

        cluster = ClusterVerdict(50, 120.0, 5)
        cluster.running([7], queued=1)  # a shard still to start may settle it either way
        short = short_shard(wait_s=0.05)
        waiting = asyncio.create_task(short.verdict())
        await asyncio.sleep(0)
        assert cluster.hear(7, short.take_events()) is None and not cluster.news()["mixed"]
        # no verdict within the wait: the cluster is still in doubt, and the rows stay pending
        assert await waiting is False and short.doubting
    asyncio.run(main())


def test_the_endpoint_is_down_when_the_clusters_faults_add_up_and_up_when_any_worker_is_answered() -> None:
    cluster = cluster_of(0, 1, failures=6)
    a, b = worker(), worker()
    for _ in range(3):
        assert not a.failure("server") and not b.failure("timeout")  # 3 each: neither trips alone
    assert cluster.hear(0, a.take_events()) is None
    stop = cluster.hear(1, b.take_events())
    assert stop is not None and stop[0] == "endpoint_down"

    cluster = cluster_of(0, 1, failures=6)
    a, b = worker(), worker()
    for _ in range(3):
        a.failure("server")
    assert cluster.hear(0, a.take_events()) is None
    b.success()
    assert cluster.hear(1, b.take_events()) is None  # b's answer ended the cluster's streak ...
    for _ in range(5):
        b.failure("server")
    assert cluster.hear(1, b.take_events()) is None  # ... so 5 more are 5 in a row, not 8
    a.hear(cluster.news())
    assert a.streak == 3  # the cluster's latest word is a fault: a's own are still in doubt
    b.success()
    assert cluster.hear(1, b.take_events()) is None
    a.hear(cluster.news())
    assert a.streak == 0 and a.settled  # an answer anywhere since: a's failures are its own rows'


# -- runs against the built-in endpoint -------------------------------------------------------

def bad_first_manifest(path: Path, n: int, bad: int) -> Path:
    """The largest images sorted first: the first `bad` rows are all refused alike ("too large")."""
    write_rows(path, [{"id": f"row-{i:05d}", "image": f"https://images.example/{i}.png",
                       "prompt": f"HUGE {i}" if i < bad else f"picture {i}"} for i in range(n)], "csv")
    return path


def status_of(job: Path) -> dict[str, Any]:
    result = run_cli("status", str(job), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("shard_rows", [100, 10])
def test_a_manifest_whose_first_rows_share_a_defect_is_a_right_job(
        tmp_path: Path, endpoint_factory: Any, shard_rows: int) -> None:
    """The first 16 of 60 rows refused alike ("image too large"): before, the run stopped as a wrong
    job after 5 (exit 3, rows pending); now rows from elsewhere are tried, answered, and the 16 are
    written as the failures they are (exit 1), every row exactly once."""
    ep = endpoint_factory(row_faults={"HUGE": "400"})
    manifest = bad_first_manifest(tmp_path / "m.csv", 60, bad=16)
    job = write_job(tmp_path / "job.toml", job_dict(manifest, ep.base_url, tmp_path / "out",
                                                    limits={"max_concurrency": 4}, run={"shard_rows": shard_rows}))
    result = run_cli("run", str(job))
    assert result.returncode == EXIT_FAILED_ROWS, result.stderr
    rows = read_output(tmp_path / "out")
    assert sorted(r["id"] for r in rows) == [f"row-{i:05d}" for i in range(60)]
    assert {r["id"] for r in rows if r["status"] == "error"} == {f"row-{i:05d}" for i in range(16)}
    assert all(r["error_kind"] == "bad_request" for r in rows if r["status"] == "error")
    assert ep.stats()["requests"] == 60  # a probe's row is sent once, not again by the producer


@pytest.mark.parametrize("shard_rows", [1000, 40])
def test_a_job_refused_alike_everywhere_still_stops_at_once_with_nothing_written(
        tmp_path: Path, endpoint_factory: Any, shard_rows: int) -> None:
    ep = endpoint_factory(faults={"400": 1.0})
    manifest = bad_first_manifest(tmp_path / "m.csv", 400, bad=0)
    job = write_job(tmp_path / "job.toml", job_dict(manifest, ep.base_url, tmp_path / "out",
                                                    limits={"max_concurrency": 4}, run={"shard_rows": shard_rows}))
    result = run_cli("run", str(job))
    assert result.returncode == EXIT_STOPPED, result.stderr
    assert result.stderr.count("the job looks wrong") == 1
    assert read_output(tmp_path / "out") == []
    assert status_of(job)["pending"] == 400
    # the first rows and a probe from each part (about 20 alone; more while loaded, the refusals being
    # instant), not the manifest refused row by row
    assert ep.stats()["requests"] < 200

    again = run_cli("run", str(job))  # the rerun of a tripped job: still wrong, it stops the same way
    assert again.returncode == EXIT_STOPPED and "the job looks wrong" in again.stderr
    assert read_output(tmp_path / "out") == [] and status_of(job)["pending"] == 400


def test_a_wrong_job_still_stops_early_when_a_probed_row_has_a_missing_image(tmp_path: Path,
                                                                              endpoint_factory: Any) -> None:
    """A probe's row that fails here (a missing image: an `input` error row, no request) tried
    nothing: its part is probed again with its next row. Before, the part counted as probed for
    good and the verdict waited for the producer to get there: 318 requests of 400."""
    ep = endpoint_factory(faults={"400": 1.0})
    n = 400
    # the first row of each later part (80, 160, 240, 320: where probes look first) names a missing file
    write_rows(tmp_path / "m.csv", [{"id": f"row-{i:05d}", "prompt": f"picture {i}",
                                     "image": "missing.png" if i in (80, 160, 240, 320) else f"https://images.example/{i}.png"}
                                    for i in range(n)], "csv")
    job = write_job(tmp_path / "job.toml", job_dict(tmp_path / "m.csv", ep.base_url, tmp_path / "out",
                                                    limits={"max_concurrency": 4}, run={"shard_rows": 1000}))
    result = run_cli("run", str(job))
    assert result.returncode == EXIT_STOPPED and "the job looks wrong" in result.stderr, result.stderr
    rows = read_output(tmp_path / "out")  # the missing images are the rows' own failures, written
    assert sorted(r["id"] for r in rows) == [f"row-{i:05d}" for i in (80, 160, 240, 320)]
    assert all(r["error_kind"] == "input" for r in rows)
    assert status_of(job)["pending"] == n - 4
    # the first alike refusals, the rows then queued and in flight, a probe per part and one more for each
    # missing image (about 20; the producer waits while the verdict waits for the probes), not the
    # manifest row by row
    assert ep.stats()["requests"] < 50, ep.stats()["requests"]
