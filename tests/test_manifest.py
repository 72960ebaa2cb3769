"""The manifest is read exactly as pyarrow reads it, or refused before anything is sent.

The planner's shards, read one by one as the run reads them, give the rows pyarrow reads from the
whole file (property tests over generated CSV and JSON Lines); a bad row anywhere (invalid UTF-8,
a broken JSON line, a repeated id in another shard) stops `pipeline run` with exit 2 and a message
naming the rows before the first request; rows of 64 MB read fine; empty manifests plan to no shards.
"""

from __future__ import annotations

import base64
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest
from conftest import job_dict, read_output, run_cli, url_manifest, write_job
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import InputConfig
from pipeline.errors import JobError
from pipeline.io.manifest import Plan, load_plan_dict, plan_manifest, read_shard

PROPERTY = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
BAD_BYTE = "\ue000"  # stands for a byte that is not UTF-8 (0xff) in generated text


def _cfg(path: Path, **kw: Any) -> InputConfig:
    return InputConfig(path=path, **kw)


def _sharded(cfg: InputConfig, plan: Plan) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for shard in plan.shards:
        table = read_shard(cfg, plan, shard)
        assert table.num_rows == shard.rows
        rows += table.to_pylist()
    return rows


def _block(plan: Plan | None) -> dict[str, int]:
    return {"block_size": plan.block_size} if plan is not None and plan.block_size else {}


def _pyarrow_csv(data: bytes, plan: Plan | None = None) -> list[dict[str, Any]] | None:
    """The whole file read at once as the run reads CSV (every value a string exactly as written,
    line breaks in quoted values), or None when pyarrow refuses it."""
    parse = pacsv.ParseOptions(newlines_in_values=True)
    read = pacsv.ReadOptions(**_block(plan))
    try:
        names = pacsv.read_csv(pa.BufferReader(data), read_options=read, parse_options=parse).column_names
        convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False)
        return pacsv.read_csv(pa.BufferReader(data), read_options=read, parse_options=parse, convert_options=convert).to_pylist()
    except pa.ArrowInvalid:
        return None


# -- CSV, generated ------------------------------------------------------------------------------

_plain = st.lists(st.sampled_from(["a", "b", "5", "é", " ", '"', BAD_BYTE]), max_size=5).map("".join)  # '"' is literal here
_quoted = st.tuples(
    st.lists(st.sampled_from(["a", ",", " ", '""', "\n", "\r\n", "\r", "é"]), max_size=6),
    st.sampled_from(["", "", "", "x", 'y"']),  # what follows the closing quote is literal
).map(lambda t: '"' + "".join(t[0]) + '"' + t[1])
_chaos = st.lists(st.sampled_from(['"', ",", "\n", "\r", "a"]), max_size=4).map("".join)
_field = st.one_of(_plain, _plain, _quoted, _quoted, _chaos)
_line_end = st.sampled_from(["\n", "\n", "\r\n", "\r"])


@st.composite
def csv_files(draw: st.DrawFn) -> bytes:
    ncols = draw(st.integers(1, 3))
    records = [",".join(draw(st.sampled_from([f"c{i}", f'"c{i}"'])) for i in range(ncols))]
    for _ in range(draw(st.integers(0, 9))):
        width = ncols if draw(st.integers(0, 9)) else draw(st.integers(1, 4))  # now and then a wrong width
        records.append(",".join(draw(_field) for _ in range(width)))
    text = ""
    for i, record in enumerate(records):
        text += draw(st.sampled_from(["", "", "", "\n", "\r\n", "  \n"]))  # empty lines, a line of spaces
        text += record + (draw(_line_end) if i < len(records) - 1 or draw(st.booleans()) else "")
    bom = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    return bom + text.encode("utf-8").replace(BAD_BYTE.encode("utf-8"), b"\xff")


@PROPERTY
@given(data=csv_files(), shard_rows=st.integers(1, 4))
def test_csv_shards_read_as_pyarrow_reads_the_whole_file(tmp_path: Path, data: bytes, shard_rows: int) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(data)
    cfg = _cfg(path)
    try:
        plan = plan_manifest(cfg, shard_rows)
    except JobError as exc:
        assert "\n" not in str(exc)
        assert _pyarrow_csv(data) is None, f"pyarrow reads what the planner refused: {exc}"
        return
    expected = _pyarrow_csv(data, plan)
    if expected is None:  # pyarrow's one quirk: a header alone, with no line break after it
        assert plan.total_rows == 0 and _pyarrow_csv(data + b"\n") == []
        return
    assert plan.total_rows == len(expected)
    assert all(s.rows == shard_rows for s in plan.shards[:-1])
    assert _sharded(cfg, plan) == expected


def test_a_stray_quote_is_a_literal_character_and_every_row_is_sent_once(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory()
    manifest = tmp_path / "m.csv"
    lines = ["id,image,prompt"] + [f"s{i},https://images.example/{i}.png,What is in picture {i}?" for i in range(40)]
    lines[4] = 's3,https://images.example/3.png,a 5" screen'  # unquoted field, one quote: not a quoted value
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.toml", job_dict(manifest, ep.base_url, out, run={"shard_rows": 16}))
    result = run_cli("run", str(job), timeout=180)
    assert result.returncode == 0, result.stderr
    rows = read_output(out)
    assert sorted(r["id"] for r in rows) == sorted(f"s{i}" for i in range(40))
    assert next(r for r in rows if r["id"] == "s3")["prompt"] == 'a 5" screen'
    assert ep.stats()["requests"] == 40


# -- JSON Lines, generated -----------------------------------------------------------------------

_json_row = st.fixed_dictionaries({"id": st.text(max_size=6), "n": st.integers(-5, 5), "note": st.text(max_size=4)})


@st.composite
def jsonl_files(draw: st.DrawFn) -> bytes:
    rows = draw(st.lists(_json_row, max_size=9))
    lines = [json.dumps(r, ensure_ascii=draw(st.booleans())) for r in rows]
    if lines and not draw(st.integers(0, 9)):  # now and then a broken line
        lines.insert(draw(st.integers(0, len(lines))), '{"id": "x", "n": ')
    text = ""
    for line in lines:
        text += draw(st.sampled_from(["", "", "\n", " \n", "\t\r\n"]))  # blank lines
        text += line + draw(st.sampled_from(["\n", "\r\n"]))
    if text and draw(st.booleans()):
        text = text.rstrip("\r\n")  # no line break at the end
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + text.encode("utf-8")


@PROPERTY
@given(data=jsonl_files(), shard_rows=st.integers(1, 4))
def test_jsonl_shards_read_as_pyarrow_reads_the_whole_file(tmp_path: Path, data: bytes, shard_rows: int) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(data)
    cfg = _cfg(path)
    try:
        whole: int | None = pajson.read_json(pa.BufferReader(data)).num_rows
    except pa.ArrowInvalid:
        whole = None if data.strip(b" \t\r\n\xef\xbb\xbf") else 0  # pyarrow refuses a file with no byte at all
    try:
        plan = plan_manifest(cfg, shard_rows)
    except JobError as exc:
        assert "\n" not in str(exc)
        assert whole is None, f"pyarrow reads what the planner refused: {exc}"
        return
    assert plan.total_rows == whole
    if plan.shards:  # the whole file read with the run's options: the first rows' columns and types
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(plan.schema)))
        opts = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        expected = pajson.read_json(pa.BufferReader(data), parse_options=opts, read_options=pajson.ReadOptions(**_block(plan)))
        assert _sharded(cfg, plan) == expected.to_pylist()


# -- long rows -----------------------------------------------------------------------------------

BIG = 64 << 20  # bytes in one cell


def test_a_64_mb_csv_cell_reads_whole(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    cell = "data:image/png;base64," + "A" * BIG
    with open(path, "w", encoding="utf-8") as f:
        f.write("id,image,prompt\n")
        for i in range(5):
            image = f'"{cell}"' if i == 2 else f"https://x/{i}"  # quoted: a data URI holds a comma
            f.write(f'r{i},{image},"p, {i}"\n')
    cfg = _cfg(path, id_column="id", image_column="image")
    plan = plan_manifest(cfg, 2)
    assert plan.total_rows == 5 and plan.max_record > BIG
    rows = _sharded(cfg, plan)
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(5)]
    assert rows[2]["image"] == cell and rows[3]["prompt"] == "p, 3"
    plan_dict = json.loads(json.dumps(plan.to_dict()))
    assert load_plan_dict(plan_dict) == plan  # a saved plan keeps what the reader needs


def test_a_64_mb_jsonl_cell_reads_whole(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    cell = "data:image/png;base64," + "A" * BIG
    with open(path, "w", encoding="utf-8") as f:
        for i in range(5):
            f.write(json.dumps({"id": f"r{i}", "image": cell if i == 3 else f"https://x/{i}"}) + "\n")
    cfg = _cfg(path, id_column="id", image_column="image")
    plan = plan_manifest(cfg, 2)
    assert plan.total_rows == 5
    rows = _sharded(cfg, plan)
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(5)]
    assert rows[3]["image"] == cell


def test_invalid_utf8_in_rows_longer_than_a_read_is_named_by_row(tmp_path: Path) -> None:
    """The planner reads a manifest a few MiB at a time: a bad byte deep in a long row, or at its
    end, names that row; a long valid row of 2-byte characters (cut anywhere) names none."""
    path = tmp_path / "m.csv"
    half = 3 << 20
    rows = [f"r{i},https://x/{i},p" for i in range(6)]
    rows[1] = "r1,https://x/1," + "é" * half
    rows[2] = "r2,https://x/2," + "a" * half + "\udcff" + "a" * half  # stands for the byte 0xff
    rows[4] = "r4,https://x/4," + "b" * 2 * half + "\udcff"
    path.write_bytes(("id,image,prompt\n" + "\n".join(rows) + "\n").encode("utf-8", "surrogateescape"))
    with pytest.raises(JobError) as caught:
        plan_manifest(_cfg(path, id_column="id"), 2)
    assert str(caught.value) == "[input] path: 2 rows of m.csv are not valid UTF-8 (rows 2 and 4); save the manifest as UTF-8"


def test_a_plan_saved_by_an_earlier_version_still_loads(tmp_path: Path) -> None:
    path = url_manifest(tmp_path / "m.csv", 25)
    cfg = _cfg(path, id_column="id")
    plan = plan_manifest(cfg, 10)
    old = plan.to_dict()
    del old["max_record"]  # not written before
    loaded = load_plan_dict(old)
    assert loaded.max_record == 0 and loaded.block_size is None  # pyarrow's default block, as before
    assert _sharded(cfg, loaded) == _sharded(cfg, plan)


# -- bad rows refused before anything is sent ----------------------------------------------------


def _refused(tmp_path: Path, ep: Any, manifest: Path) -> str:
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.toml", job_dict(manifest, ep.base_url, out, run={"shard_rows": 10}))
    result = run_cli("run", str(job), timeout=120)
    assert result.returncode == 2, result.stderr
    assert ep.stats()["requests"] == 0  # nothing paid for: the shards before the bad one were not sent either
    assert read_output(out) == []
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_invalid_utf8_in_a_late_shard_is_refused_before_the_first_request(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory()
    manifest = url_manifest(tmp_path / "m.csv", 60)
    data = manifest.read_bytes().replace(b"Describe picture row-00043", b"Describe \xff\xfe picture").replace(
        b"Describe picture row-00057", b"caf\xe9")  # Latin-1
    manifest.write_bytes(data)
    error = _refused(tmp_path, ep, manifest)
    assert "[input] path: 2 rows of m.csv are not valid UTF-8 (rows 43 and 57); save the manifest as UTF-8" in error


def test_a_broken_jsonl_line_in_a_late_shard_is_refused_before_the_first_request(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory()
    manifest = url_manifest(tmp_path / "m.jsonl", 60, fmt="jsonl")
    lines = manifest.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[52] = lines[52][:30] + "\n"  # cut short
    lines[55] = lines[55].replace('"row-00055"', "55")  # the id a number where the first rows have text
    manifest.write_text("".join(lines), encoding="utf-8")
    error = _refused(tmp_path, ep, manifest)
    assert error.startswith("error: [input] path: 2 rows of m.jsonl cannot be read as JSON Lines (row 52: not valid JSON (")
    assert "row 55: does not fit the columns and types of the first rows); each line must hold one JSON object" in error


def test_a_repeated_id_in_another_shard_is_refused_before_the_first_request(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory()
    manifest = url_manifest(tmp_path / "m.csv", 60)
    data = manifest.read_bytes()
    for row, id_ in ((45, b"row-00005"), (58, b"row-00005"), (51, b"row-00012")):
        data = data.replace(b"row-%05d," % row, id_ + b",", 1)
    manifest.write_bytes(data)
    error = _refused(tmp_path, ep, manifest)
    assert error == ("error: [input] id_column: 2 ids appear more than once (rows 5, 45 and 58: 'row-00005'; "
                     "rows 12 and 51: 'row-00012'); ids must be unique")


def test_every_kind_of_problem_is_named_in_one_message(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    rows = [f"r{i},x,p" for i in range(30)]
    rows[3] = "r3,x"  # two fields where the header has three
    rows[7] = "r7,x,p,extra"
    rows[12] = ",x,p"  # no id
    rows[20] = "r1,x,p"  # r1 again
    rows += [f"dup{i % 5},x,p" for i in range(10)]  # five more ids, twice each
    path.write_bytes(("id,image,prompt\n" + "\n".join(rows) + "\n").encode().replace(b"r25,x", b"r25,\xff"))
    with pytest.raises(JobError) as caught:
        plan_manifest(_cfg(path, id_column="id"), 8)
    assert str(caught.value) == (
        "[input] path: 1 row of m.csv is not valid UTF-8 (row 25); save the manifest as UTF-8 | "
        "[input] path: 2 rows of m.csv do not have the header's 3 fields (row 3 has 2; row 7 has 4); "
        "quote values that hold a comma, a quote or a line break | "
        "[input] id_column: 1 row has no 'id' (row 12); every row needs an id | "
        "[input] id_column: 6 ids appear more than once (rows 1 and 20: 'r1'; rows 30 and 35: 'dup0'; "
        "rows 31 and 36: 'dup1'; and 3 more); ids must be unique"
    )


def test_repeated_ids_in_a_parquet_manifest_are_found_across_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    ids = [f"p{i}" for i in range(100)]
    ids[77] = "p3"
    pq.write_table(pa.table({"id": ids, "image": ["https://x"] * 100}), path, row_group_size=30)
    with pytest.raises(JobError, match=r"1 id appears more than once \(rows 3 and 77: 'p3'\)"):
        plan_manifest(_cfg(path, id_column="id"), 10)


def test_the_id_check_keeps_no_python_string_per_row(tmp_path: Path) -> None:
    """Memory: 8 bytes a row for the ids (a hash each), not a set of strings (~70 bytes a row)."""
    plan_manifest(_cfg(url_manifest(tmp_path / "warm.csv", 10), id_column="id"), 10)  # lazy imports happen here
    rows = 400_000
    path = url_manifest(tmp_path / "m.csv", rows)
    cfg = _cfg(path, id_column="id")
    tracemalloc.start()
    try:
        plan_manifest(cfg, 10_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * rows + (16 << 20), f"{peak / rows:.1f} bytes a row"


# -- empty manifests -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_an_empty_manifest_plans_to_no_shards(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"m.{fmt}"
    columns = ["id", "image", "prompt"]
    if fmt == "csv":
        path.write_text("id,image,prompt\r\n", encoding="utf-8")
    elif fmt == "jsonl":
        path.write_bytes(b"")
        columns = []  # a JSON file without rows has no columns to know
    else:
        pq.write_table(pa.table({c: pa.array([], pa.string()) for c in columns}), path)
    plan = plan_manifest(_cfg(path, id_column="id", image_column="image", prompt_column="prompt"), 10)
    assert plan.shards == [] and plan.total_rows == 0 and plan.columns == columns


def test_a_csv_without_even_a_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    for data in (b"", b"\xef\xbb\xbf", b"\n\r\n"):
        path.write_bytes(data)
        with pytest.raises(JobError, match=r"^\[input\] path: manifest .*m.csv is empty \(a CSV needs a header line\)$"):
            plan_manifest(_cfg(path), 10)


def test_a_csv_header_that_is_not_utf8_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(b"id,im\xffage\nr1,a.png\n")
    with pytest.raises(JobError) as caught:
        plan_manifest(InputConfig(path=path, id_column="id"), 10)
    assert "UTF-8" in str(caught.value) and "header" in str(caught.value) and "\n" not in str(caught.value)
