"""A run's Prometheus metrics: `/metrics` while the run lasts (`[run] metrics_port`) and a textfile
for node_exporter's textfile collector (`[run] metrics_file`), written atomically every
TEXTFILE_EVERY_S and at the end.

    metrics = RunMetrics(job, executor.live, say=console.say, last_success=...)   # JobError: port taken
    metrics.start()
    ...
    metrics.finish(summary)      # exit code, final figures written; lingers for one scrape if asked

Imported only when a job asks for metrics (prometheus_client is not loaded otherwise). An observer:
a custom collector reads the run's own counts (`Live`, pipeline.engine.counts) when it is
scraped or written, so a row costs the engine nothing more with metrics on than off. Every family
carries `job_name` (Prometheus sets `job` itself); counters are this run's (a new process starts
them at 0, as Prometheus expects of a restarted target).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from ..config import Job
from ..errors import JobError
from .counts import LATENCY_BUCKETS_S, TOKEN_KINDS, Live

__all__ = ["RunMetrics", "TEXTFILE_EVERY_S", "COMPLETED_CODES"]

TEXTFILE_EVERY_S = 5.0
COMPLETED_CODES = (0, 1)  # a run that ended with every row's result: "last success" for an alert


class _Collector:
    def __init__(self, job: Job, live: Callable[[], Live], started: float, last_success: float | None) -> None:
        self.job, self.live, self.started, self.last_success = job.name, live, started, last_success
        self.priced = job.pricing is not None
        self.summary: dict[str, Any] | None = None  # set when the run has ended
        self.scraped_after_end = threading.Event()

    def _family(self, kind: type, name: str, doc: str, labels: tuple[str, ...] = (), **kw: Any) -> Any:
        return kind(name, doc, labels=("job_name", *labels), **kw)

    def collect(self) -> Iterator[Metric]:
        live, j = self.live(), self.job
        c = live.counts
        yield from self._rows(live)
        requests = self._family(CounterMetricFamily, "pipeline_requests", "HTTP requests this run, by status "
                                '("2xx" an answer; "timeout", "connection"... when no status came)', ("code",))
        for code, n in sorted(c.by_status.items()):
            requests.add_metric([j, code], n)
        yield requests
        yield self._one(CounterMetricFamily, "pipeline_rate_limited", "429 answers this run (the provider pacing)", c.rate_limited)
        yield self._one(CounterMetricFamily, "pipeline_paused_seconds", "time every request waited for 429 pauses", live.paused_s)
        tokens = self._family(CounterMetricFamily, "pipeline_tokens", "tokens of this run's rows", ("kind",))
        for kind in TOKEN_KINDS:
            tokens.add_metric([j, kind], c.tokens.get(kind, 0))
        yield tokens
        if self.priced:
            yield self._one(CounterMetricFamily, "pipeline_cost", "cost of this run's rows, from [pricing]", c.cost)
        yield self._one(GaugeMetricFamily, "pipeline_requests_in_flight", "requests sent and not yet answered", live.in_flight)
        yield from self._limits(live)
        buckets, total = [], 0
        for bound, n in zip((*LATENCY_BUCKETS_S, float("inf")), c.latency):
            total += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
        latency = self._family(HistogramMetricFamily, "pipeline_answer_latency_seconds", "latency of the request that answered a row")
        latency.add_metric([j], buckets, c.latency_sum_s)
        yield latency
        yield from self._run(live)
        if live.batches is not None:
            batches = self._family(GaugeMetricFamily, "pipeline_batches", "batch mode: this job's batches by state", ("state",))
            for state, n in sorted(live.batches.items()):
                batches.add_metric([j, state], n)
            yield batches
        if self.summary is not None:
            self.scraped_after_end.set()

    def _one(self, kind: type, name: str, doc: str, value: float) -> Any:
        family = self._family(kind, name, doc)
        family.add_metric([self.job], value)
        return family

    def _rows(self, live: Live) -> Iterator[Metric]:
        c, j = live.counts, self.job
        rows = self._family(CounterMetricFamily, "pipeline_rows", "rows settled this run, by status and error kind",
                            ("status", "error_kind"))
        rows.add_metric([j, "ok", ""], c.ok)
        for kind, n in sorted(c.by_kind.items()):
            rows.add_metric([j, "error", kind], n)
        yield rows
        yield self._one(CounterMetricFamily, "pipeline_cache_hits", "rows answered from the request cache", c.cached)
        if live.remaining is not None:
            yield self._one(GaugeMetricFamily, "pipeline_rows_remaining", "rows of the output with no result yet", live.remaining)
        if self.summary is not None:
            out = self._family(GaugeMetricFamily, "pipeline_output_rows", "the whole output's rows by status, at the end",
                               ("status",))
            for status in ("ok", "failed", "pending"):
                out.add_metric([j, status], self.summary.get(status, 0))
            yield out

    def _limits(self, live: Live) -> Iterator[Metric]:
        for name, doc, value, key in (
                ("pipeline_rate_limit_requests_per_minute", "the request pace in force", live.requests_per_minute,
                 "requests_per_minute"),
                ("pipeline_rate_limit_tokens_per_minute", "the token pace in force (0: none)", live.tokens_per_minute,
                 "tokens_per_minute"),
                ("pipeline_concurrency_limit", "requests allowed in flight now", live.concurrency, "max_concurrency")):
            if value is not None:
                family = self._family(GaugeMetricFamily, name, doc + ' (auto="true": found from the provider)', ("auto",))
                family.add_metric([self.job, "true" if key in live.auto else "false"], value)
                yield family

    def _run(self, live: Live) -> Iterator[Metric]:
        summary = self.summary
        yield self._one(GaugeMetricFamily, "pipeline_running", "1 while the run lasts, 0 once it has ended", 0 if summary else 1)
        yield self._one(GaugeMetricFamily, "pipeline_run_start_timestamp_seconds", "when this run started", self.started)
        if live.counts.last_ok_at is not None:
            yield self._one(GaugeMetricFamily, "pipeline_last_answer_timestamp_seconds", "when a row was last answered",
                            live.counts.last_ok_at)
        if self.last_success is not None:
            yield self._one(GaugeMetricFamily, "pipeline_last_success_timestamp_seconds",
                            "when the last run that gave every row a result (exit 0 or 1) ended", self.last_success)
        if summary is not None:
            yield self._one(GaugeMetricFamily, "pipeline_exit_code", "this run's exit code (set when it has ended)",
                            summary.get("exit_code", -1))


class RunMetrics:
    def __init__(self, job: Job, live: Callable[[], Live], *, say: Callable[..., None], started: float,
                 last_success: float | None) -> None:
        self.job, self.say = job, say
        self.port, self.host, self.file = job.run.metrics_port, job.run.metrics_host, job.run.metrics_file
        self.collector = _Collector(job, live, started, last_success)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.server: Any = None
        self.stop_writing = threading.Event()
        self.writer: threading.Thread | None = None
        self.write_failed = False

    def start(self) -> None:
        """Serve and write; a port that cannot be had or a file that cannot be written is a JobError
        now, before anything is sent."""
        if self.port is not None:
            try:
                self.server, _ = start_http_server(self.port, addr=self.host, registry=self.registry)
            except OSError as exc:
                raise JobError(f"[run] metrics_port: cannot listen on {self.host}:{self.port} ({exc.strerror}); "
                               f"choose another port (is another run serving there?)") from None
        if self.file is not None:
            try:
                self.file.parent.mkdir(parents=True, exist_ok=True)
                write_to_textfile(str(self.file), self.registry)
            except OSError as exc:
                self.close()
                raise JobError(f"[run] metrics_file: cannot write {self.file} ({exc.strerror}); "
                               f"fix the folder's permissions or choose another path") from None
            self.writer = threading.Thread(target=self._write_forever, name="pipeline-metrics-file", daemon=True)
            self.writer.start()

    def _write_forever(self) -> None:
        while not self.stop_writing.wait(TEXTFILE_EVERY_S):
            self._write()

    def _write(self) -> None:
        try:
            write_to_textfile(str(self.file), self.registry)
        except OSError as exc:
            if not self.write_failed:  # once: the run goes on, its answers are safe either way
                self.write_failed = True
                self.say(f"warning: could not write the metrics file {self.file} ({exc.strerror}); the run goes on")

    def finish(self, summary: dict[str, Any]) -> None:
        """The run has ended: its exit code and final figures, written and served (for up to
        metrics_linger_s, until one scrape has read them)."""
        if summary.get("exit_code") in COMPLETED_CODES:
            self.collector.last_success = summary.get("ended", time.time())
        self.collector.summary = summary
        self.stop_writing.set()
        if self.writer is not None:
            self.writer.join()
            self._write()
        if self.server is not None and self.job.run.metrics_linger_s > 0:
            self.collector.scraped_after_end.wait(self.job.run.metrics_linger_s)
        self.close()

    def close(self) -> None:
        self.stop_writing.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
