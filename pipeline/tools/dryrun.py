"""The dry run: `pipeline run JOB --dry-run` checks a job and every manifest row, sends nothing.

    code = dry_run(job)      # prints a short report on stdout; 0 ready, 1 rows would fail

It plans the manifest as a run does, which checks the whole file as the run will read it (invalid
UTF-8, CSV rows with the wrong number of fields, broken JSON lines, missing or repeated ids: see
pipeline.io.manifest). Then it reads the manifest one shard at a time (memory stays flat) and checks
each row as the run would build it, without reading whole image files: prompts (empty, with no
fallback), image cells (none, a bad JSON list), URLs (scheme, host), data URIs, local files
(missing, unreadable, not an image by its first bytes, too large, outside the allowed folder), and
audio cells alike (rows/audio.py's `clip_problem`: format by the first bytes, the part's formats, size). It
counts the rows, estimates the tokens (text at ~4 characters a token, each image at
`[limits] image_token_estimate`, output at most `max_tokens`), the cost from `[pricing]` and the
time the rate limits imply, and lists the first few problems of each kind with their counts.

Job-level problems (the key's variable unset, a manifest the planner refuses, a column the job
names but the manifest lacks, a prompt placeholder that is not a column, an output URL whose
storage cannot be listed) are listed too, and make the job not ready (exit 1). A manifest without
rows is said to be one (a run would send nothing), exit 0.
A job file that cannot be read at all is a JobError (exit 2), as for a run.
"""

from __future__ import annotations

import base64
import binascii
import os
import sys
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any, Callable, Iterator, TextIO
from urllib.parse import urlsplit

from ..config import DEFAULT_OUTPUT_TOKENS, Auto, Job
from ..errors import InputError, JobError
from ..net.limiter import AUTO_START_RPM
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.checks import SHOW
from ..io.manifest import (
    Plan,
    Shard,
    Unreadable,
    heavy_columns,
    plan_manifest,
    plan_schema,
    read_rows,
    shard_batches,
)
from ..io.storage import PartStore
from ..rows.audio import clip_problem
from ..rows.files import LocalFiles, PathError
from ..rows.images import sniff_mime
from ..rows.objects import ObjectStore
from ..rows.pricing import estimate_tokens
from ..rows.request import RequestBuilder
from ..rows.values import Blob, Value, image_values, kind_of, show

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["dry_run", "check_rows", "Report", "SHOW_PER_KIND"]

SHOW_PER_KIND = SHOW  # examples printed per kind of problem, as the planner's errors name
SHOW_FILES = 10  # files of a source listed with their rows and images
MEDIA_ROWS = 64  # rows read at a time from a source whose rows hold bytes
ROWS_AT_ONCE = 512  # rows without bytes turned into Python objects at a time


class Report:
    """What the dry run found: counts, estimates and problems by kind (first few kept)."""

    def __init__(self) -> None:
        self.rows = 0
        self.bad_rows = 0
        self.images = 0
        self.text_chars = 0
        self.problems: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.job_problems: list[str] = []
        self.files: dict[str, list[int]] = {}  # a source's file -> [rows, images]

    def problem(self, kind: str, where: str, message: str) -> None:
        self.problems[kind] += 1
        if len(self.examples[kind]) < SHOW_PER_KIND:
            self.examples[kind].append(f"{where}: {message}")


def dry_run(job: Job, out: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout  # looked up now: a test's captured stdout, a redirect
    report = Report()
    if job.endpoint.api_key_env and not os.environ.get(job.endpoint.api_key_env):
        report.job_problems.append(
            f"[endpoint] api_key_env: the variable {job.endpoint.api_key_env} is not set; export it before the run"
        )
    if isinstance(job.output.path, str):  # a URL: can its storage be reached? (a listing, nothing written)
        try:
            PartStore.for_output(job.output).names()
        except JobError as exc:
            report.job_problems.append(str(exc))
    plan: Plan | None = None
    try:
        plan = plan_manifest(job.input, job.run.shard_rows)
    except JobError as exc:  # bad rows, repeated ids, a missing column: nothing more can be checked
        report.job_problems.append(str(exc))
    if plan is not None:
        try:
            check_rows(job, plan, report)
        except JobError as exc:  # a placeholder that is not a column, a shard that cannot be read
            report.job_problems.append(str(exc))
    _print(job, plan, report, out)
    return 0 if not report.job_problems and not report.bad_rows else 1


def check_rows(job: Job, plan: Plan, report: Report) -> None:
    builder = RequestBuilder(job, plan.columns)  # JobError for a placeholder that is not a column
    images = builder.media.files
    # The run's cap on a file: its base64 under max_image_mb, or with downscaling the source cap.
    resizing = bool(job.images.max_side or job.images.max_pixels)
    max_bytes = int((job.images.max_source_mb if resizing else job.images.max_image_mb * 3 / 4) * 1024 * 1024)
    id_col, image_col = job.input.id_column, job.input.image_column
    heavy = set(heavy_columns(plan_schema(plan)))
    for shard in plan.shards:
        try:
            rows = read_rows(job.input, plan, shard, [c for c in plan.columns if c not in heavy] if heavy else None)
        except Unreadable as exc:
            raise JobError(f"[input] path: {exc}") from None
        counts = report.files.setdefault(plan.file_of(shard).name, [0, 0])
        for i, row in enumerate(_rows(job, plan, shard, rows.table, not heavy)):
            # Planning has refused missing and repeated ids: every row has its own here.
            number = shard.first_row + i
            where = f"row {rows.ids[i]}" if not plan.single else \
                f"row {number}" if id_col is None else f"row {number} (id {row.get(id_col)})"
            report.rows += 1
            counts[0] += 1
            if i in rows.errors:
                report.problem("unreadable", where, rows.errors[i])
                report.bad_rows += 1
                continue
            bad = False
            chars = 0
            try:
                prompt = builder.prompt(row)
                if not prompt.strip():
                    raise InputError("the prompt is empty")
                chars = len(prompt) + len(job.request.system_prompt or "")
            except InputError as err:
                report.problem("empty_prompt", where, err.message)
                bad = True
            count = 0
            if image_col is not None:
                count = _check_images(row.get(image_col), images, max_bytes, image_col, where, report,
                                      builder.media.objects)
                bad = bad or count < 0
            if job.input.audio_column is not None:
                clips = _check_audio(job, row.get(job.input.audio_column), images, where, report, builder.media.objects)
                bad, count = bad or clips < 0, count + max(clips, 0)
            if bad:  # the estimates count only the rows that would be sent
                report.bad_rows += 1
            else:
                report.text_chars += chars
                report.images += count
                counts[1] += count


def _rows(job: Job, plan: Plan, shard: Shard, held: pa.Table, whole: bool) -> Iterator[dict[str, Any]]:
    """The shard's rows as dicts; with columns of bytes, a few rows at a time (never a shard of images)."""
    if whole:
        for batch in held.to_batches(max_chunksize=ROWS_AT_ONCE):
            yield from batch.to_pylist()
        return
    for batch in shard_batches(job.input, plan, shard, plan.columns, MEDIA_ROWS):
        yield from batch.to_pylist()


def _check_images(cell: Any, images: LocalFiles, max_bytes: int, column: str, where: str, report: Report,
                  objects: ObjectStore | None = None) -> int:
    """The row's number of images, or -1 when its images would make it fail."""
    return _check_cell(cell, "image", column, where, report, lambda value: image_problem(value, images, max_bytes, objects))


def _check_audio(job: Job, cell: Any, files: LocalFiles, where: str, report: Report, objects: ObjectStore) -> int:
    """The row's number of clips, or -1 when its audio would make it fail (the run's checks, on a few bytes)."""
    def problem(value: Value) -> tuple[str, str] | None:
        try:
            return clip_problem(value, files, job.audio, job.images.max_source_mb, objects)
        except PathError as err:
            return err.problem, err.message
        except (InputError, OSError, ValueError) as err:
            return "unreadable_file", f"cannot read the clip ({err}): {show(value)}"

    return _check_cell(cell, "audio", job.input.audio_column or "", where, report, problem)


def _check_cell(cell: Any, what: str, column: str, where: str, report: Report,
                problem: Callable[[Value], tuple[str, str] | None]) -> int:
    """The number of values (images, clips) in a media cell, or -1 when the row would fail for
    them: a cell that is not one, an empty one, or a value `problem` finds fault with (every
    value judged, each fault reported)."""
    try:
        values = image_values(cell)
    except InputError as err:
        report.problem(f"bad_{what}_cell", where, err.message)
        return -1
    if not values:
        report.problem(f"missing_{what}", where, f"no {what} in {column!r}")
        return -1
    found = [p for p in map(problem, values) if p is not None]
    for kind, message in found:
        report.problem(kind, where, message)
    return -1 if found else len(values)


def image_problem(value: Value, images: LocalFiles, max_bytes: int,
                  objects: ObjectStore | None = None) -> tuple[str, str] | None:
    """(kind, message) when this image value would fail the row, else None. Reads at most a few
    bytes of a local file: the run reads it whole. Object URIs are checked against the allowed
    buckets only (nothing is fetched)."""
    if isinstance(value, Blob):
        if sniff_mime(value.data[:16]) is None:
            return "not_an_image", "image bytes in the manifest are not an image (PNG, JPEG, WEBP or GIF) by their content"
        if len(value.data) > max_bytes:
            return "too_large", f"image bytes in the manifest too large ({len(value.data)} bytes, over {max_bytes})"
        return None
    if objects is not None and "://" in value and not value.startswith(("http://", "https://")):
        try:
            if kind_of(value) == "object":
                objects.confined(value)
                return None
        except InputError as err:
            return "bad_url", err.message
    shown = repr(value[:120])
    if value.startswith(("http://", "https://")):
        parts = urlsplit(value)
        if not parts.hostname or any(c.isspace() for c in value):
            return "bad_url", f"not a usable URL: {shown}"
        return None
    if value.startswith("data:"):
        head, comma, payload = value.partition(",")
        if not comma or not head[5:].startswith("image/") or not head.endswith(";base64"):
            return "bad_url", f"a data URI must be data:image/...;base64,...: {shown}"
        try:
            base64.b64decode(payload[:4096 - 4096 % 4], validate=True)
        except (binascii.Error, ValueError):
            return "bad_url", f"the data URI's payload is not base64: {shown}"
        return None
    if "://" in value:
        return "bad_url", f"unsupported URL scheme (use http, https, data:, s3, gs, az or a local path): {shown}"
    try:
        fd = images.open(value)  # the run's own confined open: beneath the allowed roots, no race
    except PathError as err:
        return err.problem, err.message
    try:
        size = os.fstat(fd).st_size
        start = os.read(fd, 16)
    except OSError as exc:
        return "unreadable_file", f"cannot read the image ({exc.strerror}): {shown}"
    finally:
        os.close(fd)
    if sniff_mime(start) is None:
        return "not_an_image", f"not an image (PNG, JPEG, WEBP or GIF) by its content: {shown}"
    if size > max_bytes:
        return "too_large", f"image too large ({size} bytes, over {max_bytes}): {shown}"
    return None


def _print(job: Job, plan: Plan | None, report: Report, out: TextIO) -> None:
    def say(line: str = "") -> None:
        print(line, file=out)

    say(f"dry run of {job.name} ({job.source}): nothing was sent")
    for problem in report.job_problems:
        say(f"job problem: {problem}")
    if plan is None:
        say("not ready: fix the job problem above")
        return
    if not plan.shards:
        say(f"manifest: {job.input.display} has no rows; a run would send nothing")
        say("not ready: fix the job problem(s) above" if report.job_problems else "nothing to do")
        return
    good = report.rows - report.bad_rows
    say(f"manifest: {job.input.display}, {report.rows} rows in {len(plan.shards)} shard(s); "
        f"{good} ready, {report.bad_rows} would fail")
    _say_source(plan, report, say)
    done = _rows_done(open_checkpoint(job.output))
    if done:
        say(f"checkpoint: {done} rows already have a result; a run sends only the others (the estimates cover all rows)")
    if report.problems:
        say("problems:")
        for kind, n in sorted(report.problems.items(), key=lambda kv: (-kv[1], kv[0])):
            say(f"  {kind}: {n} row(s)")
            for example in report.examples[kind]:
                say(f"    {example}")
            if n > len(report.examples[kind]):
                say(f"    ... and {n - len(report.examples[kind])} more")
    # Estimates cover the rows that would be sent, by the run's own estimate (pricing.estimate_tokens).
    tokens = estimate_tokens(job, report.text_chars, report.images, rows=good)
    text_tokens, in_tokens, out_tokens = tokens.input - report.images * job.limits.image_token_estimate, *tokens
    per_row_out = job.request.max_tokens or DEFAULT_OUTPUT_TOKENS
    out_note = f"max_tokens {per_row_out}" if job.request.max_tokens else f"no max_tokens: {per_row_out} assumed"
    say(f"tokens (estimate): input about {in_tokens:,} (text {text_tokens:,}, {report.images} image(s) x "
        f"{job.limits.image_token_estimate}), output at most {out_tokens:,} ({out_note} per row)")
    if job.pricing is not None:
        price = job.pricing.price(None, job.endpoint.model)
        assert price is not None
        cost_in, cost_out = in_tokens * price[0] / 1e6, out_tokens * price[1] / 1e6
        say(f"cost (estimate, [pricing] for {job.endpoint.model}): input about {cost_in:.4f}, output at most "
            f"{cost_out:.4f}, total at most {cost_in + cost_out:.4f}")
        if job.pricing.budget is not None:
            fits = "within it" if cost_in + cost_out <= job.pricing.budget else "the run may stop at the budget"
            say(f"budget: {job.pricing.budget:g} ({fits})")
    else:
        say("cost: no [pricing] in the job")
    say(f"time (estimate): at least {_duration(_minutes(job, good, in_tokens + out_tokens))} "
        f"at the job's rate limits ({_limits(job)})")
    reasons = [f"{report.bad_rows} row(s) would fail"] if report.bad_rows else []
    if report.job_problems:
        reasons.append("fix the job problem(s) above")
    say(f"not ready: {'; '.join(reasons)}" if reasons else "ready")


def _say_source(plan: Plan, report: Report, say: Any) -> None:
    """The source: its format and files, and the rows and images of each (the first few)."""
    files = len(plan.files)
    say(f"source: {plan.format}, {files} file{'s' if files > 1 else ''}; {report.rows} rows, {report.images} image(s)")
    if files > 1 and plan.format != "images":  # (an image folder's files are its rows)
        for name, (rows, images) in list(report.files.items())[:SHOW_FILES]:
            say(f"  {name}: {rows} rows, {images} image(s)")
        if len(report.files) > SHOW_FILES:
            say(f"  ... and {len(report.files) - SHOW_FILES} more files")


def _rows_done(ckpt: Checkpoint) -> int:
    """Rows with a result, from the commit records; read only (Checkpoint.commits may repair)."""
    try:
        commits = ckpt.peek_commits()
    except OSError:
        return 0
    return sum(rec.rows for rec in commits.values())


def _minutes(job: Job, requests: int, tokens: int) -> float:
    """At the job's limits; an "auto" limit is only known from the provider's answers: the
    estimate then assumes the conservative pace a run starts at."""
    rpm, tpm = job.limits.requests_per_minute, job.limits.tokens_per_minute
    minutes = requests / (AUTO_START_RPM if isinstance(rpm, Auto) else rpm)
    if not isinstance(tpm, Auto) and tpm > 0:
        minutes = max(minutes, tokens / tpm)
    return minutes


def _limits(job: Job) -> str:
    rpm, tpm = job.limits.requests_per_minute, job.limits.tokens_per_minute
    text = f"requests_per_minute {rpm:g}" if not isinstance(rpm, Auto) else \
        f"requests_per_minute auto (read from the provider; estimated at the starting {AUTO_START_RPM:g}/min)"
    if job.limits.counts_tokens:
        text += f", tokens_per_minute {tpm:g}" if not isinstance(tpm, Auto) else ", tokens_per_minute auto"
    return text


def _duration(minutes: float) -> str:
    seconds = minutes * 60
    if seconds < 90:
        return f"{seconds:.0f}s"
    if minutes < 90:
        return f"{minutes:.1f} min"
    return f"{minutes / 60:.1f} h"
