"""Images and video: sources, shapes, preprocessing, limits, confinement, the inline fetcher.

Images are made here with Pillow (EXIF orientation, transparency, extreme aspect, large sizes);
remote images come from a real static HTTP server (aiohttp.web on its own loop in a thread) that
can be slow, missing, loop redirects, send too much or lie about Content-Type. End-to-end tests
run `python -m pipeline run` against the built-in endpoint and read the request bodies it got.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest
from aiohttp import web
from conftest import ROOT, job_dict, read_output, run_cli, write_job, write_rows
from PIL import Image

from pipeline.config import ImagesConfig, InputConfig, parse_job
from pipeline.errors import InputError, JobError
from pipeline.rows.fetch import Fetcher, is_blocked_address
from pipeline.rows.files import LocalFiles, PathError
from pipeline.rows.images import MB, b64_size, prepare_image, sniff_video
from pipeline.rows.media import MediaBuilder
from pipeline.rows.values import image_values
from pipeline.rows.workers import WORKER_NICE

# -- images made on the spot -----------------------------------------------------------------


def encode(img: Image.Image, fmt: str = "JPEG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def halves(w: int, h: int, left: tuple[int, int, int] = (255, 0, 0), right: tuple[int, int, int] = (0, 0, 255)) -> Image.Image:
    """Left half one colour, right half another: orientation can be read back from the pixels."""
    img = Image.new("RGB", (w, h), right)
    img.paste(left, (0, 0, w // 2, h))
    return img


def jpeg(w: int, h: int, orientation: int | None = None, quality: int = 90) -> bytes:
    img = halves(w, h)
    if orientation is None:
        return encode(img, "JPEG", quality=quality)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=quality, exif=exif)


def png(w: int, h: int, *, alpha: bool = False) -> bytes:
    if not alpha:
        return encode(halves(w, h), "PNG")
    img = Image.new("RGBA", (w, h), (0, 128, 0, 255))
    img.paste((0, 0, 0, 0), (0, 0, w // 2, h))  # left half fully transparent
    return encode(img, "PNG")


def decode_uri(uri: str) -> tuple[str, bytes]:
    head, _, payload = uri.partition(",")
    return head[5:].split(";")[0], base64.b64decode(payload)


def uri_image(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(decode_uri(uri)[1]))


def data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# A file with a real MP4 container signature (ftyp box, then an empty mdat). Not decodable video:
# the pipeline checks video containers by signature only (no video decoder is a dependency).
MP4 = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00\x00\x00\x08mdat"


def cfg(**kw: Any) -> ImagesConfig:
    return ImagesConfig(**kw)


def builder(root: Path, *, image_column: str | None = "image", video_column: str | None = None,
            detail: str | None = None, **images: Any) -> MediaBuilder:
    """Threads unless asked (starting worker processes costs a second); end-to-end runs use the default."""
    inp = InputConfig(path=root / "manifest.csv", image_column=image_column, video_column=video_column)
    return MediaBuilder(inp, ImagesConfig(**{"pool": "thread", **images}), detail=detail)


async def parts_of(b: MediaBuilder, row: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        return await b.parts(row)
    finally:
        await b.aclose()


async def error_of(b: MediaBuilder, row: dict[str, Any]) -> str:
    with pytest.raises(InputError) as info:
        await parts_of(b, row)
    assert info.value.kind == "input"
    return info.value.message


# -- preprocessing ---------------------------------------------------------------------------


def _rgb(img: Image.Image, at: tuple[int, int]) -> tuple[int, ...]:
    pixel = img.convert("RGB").getpixel(at)
    assert isinstance(pixel, tuple)
    return pixel


def test_exif_orientation_turns_the_image_upright_and_is_not_applied_twice() -> None:
    raw = jpeg(200, 100, orientation=6)  # stored sideways: must be turned 90 degrees clockwise
    mime, out = prepare_image(raw, "x.jpg", cfg(max_side=1000))
    img = Image.open(io.BytesIO(out))
    assert (mime, img.size) == ("image/jpeg", (100, 200))
    # the stored left half (red) is on top once upright; the stored right half (blue) below
    r, g, b = _rgb(img, (50, 30))
    assert r > 200 and b < 60
    r, g, b = _rgb(img, (50, 170))
    assert b > 200 and r < 60
    assert img.getexif().get(0x0112) is None  # no tag left to make a viewer rotate again


def test_without_size_bounds_the_bytes_go_as_they_are() -> None:
    raw = jpeg(200, 100, orientation=6)
    assert prepare_image(raw, "x.jpg", cfg()) == ("image/jpeg", raw)
    small = png(300, 200)
    assert prepare_image(small, "x.png", cfg(max_side=1024)) == ("image/png", small)  # within bounds: untouched


@pytest.mark.parametrize(
    "size, bounds, expected",
    [
        ((4000, 3000), {"max_side": 1024}, (1024, 768)),
        ((3000, 4000), {"max_side": 1024}, (768, 1024)),
        ((1000, 10), {"max_side": 500}, (500, 5)),
        ((4000, 3000), {"max_pixels": 100_000}, None),
        ((4000, 3000), {"max_side": 1024, "max_pixels": 50_000}, None),
    ],
)
def test_downscale_keeps_the_aspect_within_the_bounds(size: tuple[int, int], bounds: dict[str, int], expected: tuple[int, int] | None) -> None:
    w, h = size
    mime, out = prepare_image(jpeg(w, h), "big.jpg", cfg(**bounds))
    got = Image.open(io.BytesIO(out)).size
    assert mime == "image/jpeg"
    if expected is not None:
        assert got == expected
    assert max(got) <= bounds.get("max_side", 10**9)
    assert got[0] * got[1] <= bounds.get("max_pixels", 10**12)
    assert abs(got[0] / got[1] - w / h) < 0.02 * (w / h)
    if "max_pixels" in bounds and "max_side" not in bounds:
        assert got[0] * got[1] > 0.97 * bounds["max_pixels"]  # as large as allowed, not smaller


def test_transparency_keeps_png_and_opaque_images_become_jpeg() -> None:
    mime, out = prepare_image(png(800, 400, alpha=True), "a.png", cfg(max_side=200))
    img = Image.open(io.BytesIO(out))
    assert (mime, img.format, img.mode, img.size) == ("image/png", "PNG", "RGBA", (200, 100))
    left, right = img.getpixel((10, 50)), img.getpixel((190, 50))
    assert isinstance(left, tuple) and isinstance(right, tuple) and (left[3], right[3]) == (0, 255)
    mime, out = prepare_image(png(800, 400), "b.png", cfg(max_side=200, jpeg_quality=70))
    assert (mime, Image.open(io.BytesIO(out)).format) == ("image/jpeg", "JPEG")


def test_aspect_ratio_beyond_200_to_1_is_refused() -> None:
    prepare_image(png(2000, 10), "ok.png", cfg())  # exactly 200:1 is allowed
    with pytest.raises(InputError, match=r"aspect ratio 2010x10 \(201:1\).*'thin.png'"):
        prepare_image(png(2010, 10), "thin.png", cfg())
    with pytest.raises(InputError, match="aspect ratio"):
        prepare_image(png(10, 2010), "tall.png", cfg(max_side=100))


def test_broken_images_are_refused_by_content() -> None:
    with pytest.raises(InputError, match="not an image .*by its content: 'notes.png'"):
        prepare_image(b"just some text, not a picture", "notes.png", cfg())
    whole = jpeg(400, 300)
    with pytest.raises(InputError, match="unreadable or truncated image.*'cut.jpg'"):
        prepare_image(whole[: len(whole) // 2], "cut.jpg", cfg())
    whole = png(400, 300)
    with pytest.raises(InputError, match="unreadable or truncated image.*'cut.png'"):
        prepare_image(whole[: len(whole) // 2], "cut.png", cfg(max_side=100))


def test_cells_hold_one_value_a_list_or_a_json_array() -> None:
    assert image_values(" a.png ") == ["a.png"]
    assert image_values(["a.png", None, "", "b.png"]) == ["a.png", "b.png"]
    assert image_values('["a.png", "https://x/b.png"]') == ["a.png", "https://x/b.png"]
    assert image_values(None) == [] and image_values("") == []
    with pytest.raises(InputError, match="not a valid JSON list"):
        image_values('["a.png", ')


def test_video_containers_are_told_by_signature() -> None:
    assert sniff_video(MP4) == "video/mp4"
    assert sniff_video(b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01webm" + bytes(40)) == "video/webm"
    assert sniff_video(b"\x00\x00\x00\x18ftypheic" + bytes(16)) is None  # a HEIF still image
    assert sniff_video(b"hello, I am a text file pretending to be a video") is None


# -- local files: confinement and refusals ---------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """root/ (the manifest's folder) with images, and outside/ next to it with a real image."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "a.jpg").write_bytes(jpeg(64, 48))
    (root / "sub" / "b.png").write_bytes(png(32, 32, alpha=True))
    (outside / "secret.jpg").write_bytes(jpeg(64, 48))
    os.symlink(outside / "secret.jpg", root / "escape.jpg")
    os.symlink(root / "a.jpg", root / "sub" / "inside-link.jpg")
    (root / "notes.png").write_text("not an image at all\n")
    return {"root": root, "outside": outside}


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path the process opens with os.open (the standard library's, recorded, not replaced)."""
    seen: list[str] = []
    real_open = os.open

    def recording_open(path: Any, *args: Any, **kw: Any) -> int:
        seen.append(os.fspath(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr(os, "open", recording_open)
    return seen


@pytest.mark.parametrize("value", ["/etc/passwd", "../outside/secret.jpg", "escape.jpg", "sub/../../outside/secret.jpg", "~/.ssh/id_rsa"])
async def test_paths_outside_the_roots_are_refused_without_being_opened(tree: dict[str, Path], opened: list[str], value: str) -> None:
    message = await error_of(builder(tree["root"]), {"image": value})
    assert "outside the allowed roots" in message and repr(value) in message
    # Refused without opening anything but the root folder (to find that escape.jpg is a link out).
    assert set(opened) <= {str(tree["root"])}


async def test_inside_the_roots_files_and_links_are_read_and_roots_can_be_widened(tree: dict[str, Path], opened: list[str]) -> None:
    parts = await parts_of(builder(tree["root"]), {"image": ["a.jpg", "sub/inside-link.jpg", str(tree["root"] / "sub" / "b.png")]})
    assert "a.jpg" in opened  # the recorder sees the opens (relative to the root's descriptor) the pool threads make
    assert [decode_uri(p["image_url"]["url"])[0] for p in parts] == ["image/jpeg", "image/jpeg", "image/png"]
    assert decode_uri(parts[0]["image_url"]["url"])[1] == (tree["root"] / "a.jpg").read_bytes()  # as it is
    widened = builder(tree["root"], allowed_roots=(tree["outside"],))
    parts = await parts_of(widened, {"image": "escape.jpg"})
    assert decode_uri(parts[0]["image_url"]["url"])[1] == (tree["outside"] / "secret.jpg").read_bytes()


async def test_worker_processes_return_parts_and_errors_and_survive_a_dead_worker(tree: dict[str, Path]) -> None:
    b = builder(tree["root"], pool="process", workers=1, max_side=32)
    try:
        parts = await b.parts({"image": ["a.jpg", "sub/b.png"]})
        assert [uri_image(p["image_url"]["url"]).size for p in parts] == [(32, 24), (32, 32)]
        with pytest.raises(InputError, match="not an image .*'notes.png'"):
            await b.parts({"image": "notes.png"})  # an error raised in the worker reaches the row
        with pytest.raises(InputError, match="image worker process died.*'boom'"):
            await b.workers.run("boom", os._exit, 1)  # a worker killed twice: the value fails, not the run
        parts = await b.parts({"image": "a.jpg"})  # a fresh pool took over
        assert uri_image(parts[0]["image_url"]["url"]).size == (32, 24)
    finally:
        await b.aclose()


async def test_a_worker_process_lowers_its_priority_before_it_imports_the_pipeline(tree: dict[str, Path]) -> None:
    # The pool's initializer comes from a module that brings in nothing heavy with it ...
    heavy = ("pipeline", "PIL", "pyarrow", "aiohttp", "numpy")
    probe = f"import sys, pipeline.lifeline; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "['pipeline', 'pipeline.lifeline']", done.stdout + done.stderr
    # ... and lowers the worker's priority, by WORKER_NICE below this process's.
    b = builder(tree["root"], pool="process", workers=1)
    try:
        assert await b.workers.run("probe", os.nice, 0) == min(19, os.nice(0) + WORKER_NICE)
    finally:
        await b.aclose()


@pytest.mark.parametrize(
    "value, cause",
    [
        ("missing.jpg", "image file not found"),
        ("notes.png", "not an image"),
        ("sub", "not a regular file"),
        ("ftp://host/a.png", "unsupported URL scheme"),
        ("data:image/png;base64,%%%", "invalid base64"),
        ("data:image/png,rawtext", "must be base64"),
    ],
)
async def test_each_bad_value_is_an_input_error_naming_cause_and_value(tree: dict[str, Path], value: str, cause: str) -> None:
    message = await error_of(builder(tree["root"]), {"image": value})
    assert cause in message and value[:20] in message


async def test_the_first_bad_image_of_a_row_fails_the_row(tree: dict[str, Path]) -> None:
    message = await error_of(builder(tree["root"]), {"image": ["a.jpg", "missing-1.jpg", "missing-2.jpg"]})
    assert "missing-1.jpg" in message


async def test_size_limits_per_image_and_per_request(tree: dict[str, Path]) -> None:
    root = tree["root"]
    (root / "big.png").write_bytes(encode(Image.effect_noise((600, 600), 80).convert("RGB"), "PNG"))
    size = b64_size((root / "big.png").stat().st_size)
    # Without downscaling the file itself must fit: refused before it is read.
    message = await error_of(builder(root, max_image_mb=size / 2 / (1 << 20)), {"image": "big.png"})
    assert "image file too large" in message and "max_side" in message and "'big.png'" in message
    # With downscaling the result is what must fit.
    parts = await parts_of(builder(root, max_image_mb=size / 2 / (1 << 20), max_side=100), {"image": "big.png"})
    assert uri_image(parts[0]["image_url"]["url"]).size == (100, 100)
    # Two images that fit one by one but not together.
    message = await error_of(builder(root, max_request_mb=1.5 * size / (1 << 20)), {"image": ["big.png", "big.png"]})
    assert "request too large" in message and "max_request_mb" in message and "'big.png'" in message


@pytest.mark.parametrize(
    "column, images, cap, setting",
    [
        ("image", {"max_image_mb": 0.01}, int(0.01 * MB) * 3 // 4, "[images] max_image_mb"),  # sent as it is
        ("image", {"max_source_mb": 0.01, "max_side": 64}, int(0.01 * MB), "[images] max_source_mb"),  # may shrink
        ("video", {"max_source_mb": 0.01}, int(0.01 * MB), "[images] max_source_mb"),
    ],
)
async def test_a_local_file_and_a_data_uri_share_one_size_cap_and_its_reason(
    tree: dict[str, Path], column: str, images: dict[str, Any], cap: int, setting: str
) -> None:
    """A source is capped on its bytes alike, read from disk or declared by a data: URI: one byte
    over is refused by both with the same reason, naming the setting; at the cap neither refuses
    it for its size (what else is wrong with zeros is another matter)."""
    root, mime = tree["root"], f"{column}/png" if column == "image" else "video/mp4"
    columns = {"image_column": None, "video_column": "video"} if column == "video" else {}
    reasons = []
    for size in (cap + 1, cap):
        (root / "source.bin").write_bytes(bytes(size))
        for value in ("source.bin", data_uri(mime, bytes(size))):
            try:
                await parts_of(builder(root, **columns, **images), {column: value})
                message = ""
            except InputError as err:
                message = err.message
            found = re.search(r"too large \((\d+) bytes(?: once decoded)?; (.*)\): ", message)
            if size > cap:
                assert found and int(found[1]) == size, message
                reasons.append(found[2])
            else:
                assert found is None, message
    assert reasons[0] == reasons[1] and setting in reasons[0], reasons


async def test_data_uris_are_checked_and_downscaled_like_files(tree: dict[str, Path]) -> None:
    given = data_uri("image/png", png(400, 200))
    parts = await parts_of(builder(tree["root"]), {"image": given})
    assert parts[0]["image_url"]["url"] == given
    parts = await parts_of(builder(tree["root"], max_side=100), {"image": given})
    assert uri_image(parts[0]["image_url"]["url"]).size == (100, 50)
    message = await error_of(builder(tree["root"]), {"image": data_uri("image/png", b"text, not png")})
    assert "not an image" in message


async def test_video_cells(tree: dict[str, Path]) -> None:
    root = tree["root"]
    (root / "clip.mp4").write_bytes(MP4)
    (root / "fake.mp4").write_text("not a video")
    for i in range(3):
        (root / f"f{i}.png").write_bytes(png(80, 60))
    b = builder(root, image_column=None, video_column="video")
    parts = await parts_of(b, {"video": "clip.mp4"})
    assert parts == [{"type": "video_url", "video_url": {"url": data_uri("video/mp4", MP4)}}]
    parts = await parts_of(builder(root, image_column=None, video_column="video"), {"video": "https://v.example/a.mp4"})
    assert parts == [{"type": "video_url", "video_url": {"url": "https://v.example/a.mp4"}}]
    message = await error_of(builder(root, image_column=None, video_column="video"), {"video": "fake.mp4"})
    assert "not a video" in message and "'fake.mp4'" in message
    message = await error_of(builder(root, image_column=None, video_column="video"), {"video": "../outside/secret.jpg"})
    assert "outside the allowed roots" in message
    # Frames, DashScope style: a list of images, each as an image would be sent.
    b = builder(root, image_column=None, video_column="video", video_frames_format="dashscope")
    parts = await parts_of(b, {"video": ["f0.png", "https://v.example/f1.jpg"]})
    assert parts == [{"type": "video", "video": [data_uri("image/png", (root / "f0.png").read_bytes()), "https://v.example/f1.jpg"]}]


# -- confinement without a window: the walk from the root's descriptor ------------------------


def files_of(root: Path, *extra: Path) -> LocalFiles:
    return LocalFiles.for_manifest(root / "manifest.csv", extra)


def read_error(files: LocalFiles, value: str) -> PathError:
    with pytest.raises(PathError) as info:
        files.read(value, 10 * MB, "image", "too big")
    assert info.value.kind == "input" and repr(value) in info.value.message
    assert "\n" not in info.value.message
    return info.value


def test_symlinks_within_the_root_are_followed_relative_absolute_and_through_folders(tree: dict[str, Path]) -> None:
    root = tree["root"]
    a = (root / "a.jpg").read_bytes()
    os.symlink("../a.jpg", root / "sub" / "rel.jpg")
    os.symlink("sub", root / "alias")  # a folder link
    os.symlink(root / "alias" / "rel.jpg", root / "chain.jpg")  # absolute, through two more links
    files = files_of(root)
    for value in ["sub/rel.jpg", "sub/inside-link.jpg", "alias/rel.jpg", "chain.jpg", str(root / "chain.jpg"),
                  "sub/../a.jpg", "./alias/../a.jpg"]:
        assert files.read(value, 10 * MB, "image", "too big") == a, value
    assert files.read("alias/b.png", 10 * MB, "image", "too big") == (root / "sub" / "b.png").read_bytes()


def test_links_and_dots_leading_out_of_the_roots_are_refused(tree: dict[str, Path]) -> None:
    root, outside = tree["root"], tree["outside"]
    os.symlink("../outside/secret.jpg", root / "rel-out.jpg")
    os.symlink(outside, root / "outdir")
    os.symlink("../../outside", root / "sub" / "up")
    files = files_of(root)
    for value in ["escape.jpg", "rel-out.jpg", "outdir/secret.jpg", "sub/up/secret.jpg", "../outside/secret.jpg",
                  "sub/../../outside/secret.jpg", str(outside / "secret.jpg"), "/etc/passwd"]:
        err = read_error(files, value)
        assert "outside the allowed roots" in err.message and err.problem == "outside_roots", value
    # A link into another allowed root is within the roots.
    widened = files_of(root, outside)
    assert widened.read("outdir/secret.jpg", 10 * MB, "image", "x") == (outside / "secret.jpg").read_bytes()


def test_loops_folders_fifos_sockets_and_missing_files_are_refused_with_their_cause(tree: dict[str, Path]) -> None:
    root = tree["root"]
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    os.mkfifo(root / "pipe.jpg")  # opening it for reading would block: it must never be waited on
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.jpg"))
    files = files_of(root)
    try:
        causes = {
            "loop1": "more than 40 symbolic links",
            "sub": "not a regular file (a folder)",
            ".": "not a regular file (a folder)",
            "pipe.jpg": "not a regular file (a FIFO)",
            "sock.jpg": "not a regular file (a socket)",
            "missing.jpg": "image file not found",
            "a.jpg/b.jpg": "image file not found (a part of its path is not a folder)",
            "bad\udcff\ud800.jpg": "not a valid file name",
        }
        for value, cause in causes.items():
            assert cause in read_error(files, value).message, value
    finally:
        sock.close()
    assert read_error(files, "missing.jpg").problem == "missing_file"


def test_a_folder_swapped_for_a_link_out_never_yields_the_outside_file(tree: dict[str, Path]) -> None:
    """A thread swaps root/pics (a real folder) and a symlink to outside/pics in a loop while
    reads of pics/x.jpg run: each read returns the inside bytes or is refused, never the outside."""
    root, outside = tree["root"], tree["outside"]
    known = {b"INSIDE" * 100: "inside", b"OUTSIDE" * 100: "OUTSIDE"}
    for folder, content in zip((root / "pics", outside / "pics"), known):
        folder.mkdir()
        (folder / "x.jpg").write_bytes(content)
    files = files_of(root)
    outcomes: Counter[str] = Counter()
    done = threading.Event()

    def swap() -> None:
        while not done.is_set():
            os.rename(root / "pics", root / "pics.real")
            os.symlink(outside / "pics", root / "pics")
            os.unlink(root / "pics")
            os.rename(root / "pics.real", root / "pics")

    def read() -> None:
        # Until both outcomes were seen often enough (or a cap): no timing in the assertion.
        for _ in range(20_000):
            try:
                outcomes[known.get(files.read("pics/x.jpg", MB, "image", "too big"), "other bytes")] += 1
            except PathError as err:  # counted, not asserted: an assert in a thread fails no test
                outcomes["refused" if "'pics/x.jpg'" in err.message else f"bad message: {err.message}"] += 1
            if outcomes["inside"] >= 200 and outcomes["refused"] >= 200:
                return

    swapper = threading.Thread(target=swap)
    swapper.start()
    readers = [threading.Thread(target=read) for _ in range(3)]
    try:
        for t in readers:
            t.start()
        for t in readers:
            t.join(120)
    finally:
        done.set()
        swapper.join(30)
    assert set(outcomes) == {"inside", "refused"}, outcomes  # not once the outside file, nor anything else


def test_a_file_deleted_during_reads_is_an_input_error_never_anything_else(tree: dict[str, Path]) -> None:
    root = tree["root"]
    whole = (root / "a.jpg").read_bytes()
    os.link(root / "a.jpg", root / "stash.jpg")
    files = files_of(root)
    outcomes: Counter[str] = Counter()
    done = threading.Event()

    def flicker() -> None:  # the file disappears and comes back whole (a hard link), over and over
        while not done.is_set():
            os.unlink(root / "a.jpg")
            os.link(root / "stash.jpg", root / "a.jpg")

    def read() -> None:
        for _ in range(20_000):
            try:
                assert files.read("a.jpg", MB, "image", "too big") == whole
                outcomes["read"] += 1
            except PathError as err:
                assert err.message == "image file not found: 'a.jpg'" and err.problem == "missing_file"
                outcomes["not found"] += 1
            if min(outcomes["read"], outcomes["not found"]) >= 200:
                return

    flickering = threading.Thread(target=flicker)
    flickering.start()
    try:
        read()
    finally:
        done.set()
        flickering.join(30)
    assert outcomes["read"] > 0 and outcomes["not found"] > 0, outcomes


def test_local_files_and_their_errors_cross_to_worker_processes() -> None:
    files = LocalFiles.for_manifest(Path("/data/m.csv"), (Path("/srv/images"),))
    assert pickle.loads(pickle.dumps(files)) == files
    err = pickle.loads(pickle.dumps(PathError("image file not found: 'x'", "missing_file")))
    assert (type(err), err.kind, err.message, err.problem) == (PathError, "input", "image file not found: 'x'", "missing_file")


def test_the_dry_run_checks_images_with_the_same_confined_open(tree: dict[str, Path]) -> None:
    root = tree["root"]
    os.symlink("a.jpg", root / "good-link.jpg")
    os.mkfifo(root / "pipe.jpg")  # the old check opened it and waited for a writer for good
    rows = [{"id": name.split(".")[0], "image": name, "prompt": "p"}
            for name in ("a.jpg", "good-link.jpg", "escape.jpg", "missing.jpg", "pipe.jpg", "notes.png")]
    write_rows(root / "m.csv", rows, "csv")
    job = write_job(root / "job.toml", job_dict(root / "m.csv", "http://127.0.0.1:1/v1", root / "out"))
    done = run_cli("run", str(job), "--dry-run")  # in its own process: nothing is sent, it must end
    assert done.returncode == 1, done.stdout + done.stderr
    assert "6 rows in 1 shard(s); 2 ready, 4 would fail" in done.stdout
    for line in ["outside_roots: 1 row(s)", "row 2 (id escape): image path is outside the allowed roots",
                 "missing_file: 1 row(s)", "row 3 (id missing): image file not found: 'missing.jpg'",
                 "unreadable_file: 1 row(s)", "row 4 (id pipe): image path is not a regular file (a FIFO): 'pipe.jpg'",
                 "not_an_image: 1 row(s)"]:
        assert line in done.stdout, line


# -- the static HTTP server ------------------------------------------------------------------


class StaticServer:
    """A real HTTP server on its own loop in a thread; `hits` counts requests per path."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.files: dict[str, tuple[bytes, str]] = {}
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def app(self) -> web.Application:
        app = web.Application()

        @web.middleware
        async def count(request: web.Request, handler: Any) -> web.StreamResponse:
            self.hits[request.path] += 1
            return await handler(request)

        app.middlewares.append(count)

        async def file(request: web.Request) -> web.StreamResponse:
            name = request.match_info["name"]
            if name not in self.files:
                raise web.HTTPNotFound()
            body, ctype = self.files[name]
            return web.Response(body=body, headers={"Content-Type": ctype})

        async def slow(request: web.Request) -> web.StreamResponse:
            await asyncio.sleep(3)
            return web.Response(body=self.files["real.jpg"][0], content_type="image/jpeg")

        async def loop(request: web.Request) -> web.StreamResponse:
            raise web.HTTPFound("/loop")

        async def hop(request: web.Request) -> web.StreamResponse:
            n = int(request.match_info["n"])
            raise web.HTTPFound(f"/hop/{n - 1}" if n > 0 else "/files/real.jpg")

        async def redirect(request: web.Request) -> web.StreamResponse:
            raise web.HTTPFound(request.query["to"])

        async def huge(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})  # no Content-Length: chunked
            await resp.prepare(request)
            head = self.files["real.jpg"][0]
            await resp.write(head)
            for _ in range(64):
                await resp.write(b"\0" * (64 << 10))
            await resp.write_eof()
            return resp

        async def declared(request: web.Request) -> web.StreamResponse:
            return web.Response(body=b"\xff\xd8\xff" + b"\0" * (3 << 20), content_type="image/jpeg")

        async def flaky(request: web.Request) -> web.StreamResponse:
            if self.hits[request.path] == 1:
                return web.Response(status=503, text="busy")
            return web.Response(body=self.files["real.jpg"][0], content_type="image/jpeg")

        app.router.add_get("/files/{name}", file)
        app.router.add_get("/slow", slow)
        app.router.add_get("/loop", loop)
        app.router.add_get("/hop/{n}", hop)
        app.router.add_get("/redirect", redirect)
        app.router.add_get("/huge", huge)
        app.router.add_get("/declared", declared)
        app.router.add_get("/flaky", flaky)
        return app

    def start(self) -> None:
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            self._runner = web.AppRunner(self.app(), access_log=None)
            self.loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = self._runner.addresses[0][1]
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self._runner.cleanup())
            self.loop.close()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def static() -> Iterator[StaticServer]:
    server = StaticServer()
    server.files["real.jpg"] = (jpeg(640, 480), "image/jpeg")
    server.files["lying.jpg"] = (jpeg(64, 48), "text/html; charset=utf-8")  # a real image, a wrong header
    server.files["text.png"] = (b"<html>Sorry, this image has moved</html>", "image/png")  # the reverse
    server.files["shared.png"] = (png(120, 90), "image/png")
    server.start()
    yield server
    server.stop()


def fetcher(**kw: Any) -> Fetcher:
    options: dict[str, Any] = {"timeout_s": 5.0, "retries": 0, "max_bytes": 1 << 20}
    return Fetcher(**{**options, **kw})


async def fetch_error(f: Fetcher, url: str) -> str:
    try:
        with pytest.raises(InputError) as info:
            await f.fetch(url)
    finally:
        await f.close()
    return info.value.message


async def test_fetch_sniffs_content_not_the_content_type(tree: dict[str, Path], static: StaticServer) -> None:
    b = builder(tree["root"], image_mode="inline")
    parts = await parts_of(b, {"image": static.url("/files/lying.jpg")})
    assert decode_uri(parts[0]["image_url"]["url"]) == ("image/jpeg", static.files["lying.jpg"][0])
    message = await error_of(builder(tree["root"], image_mode="inline"), {"image": static.url("/files/text.png")})
    assert "not an image" in message and "Content-Type image/png" in message and "/files/text.png" in message


async def test_fetch_failures_name_the_cause_and_the_url(static: StaticServer) -> None:
    message = await fetch_error(fetcher(), static.url("/files/nope.png"))
    assert "HTTP 404" in message and "/files/nope.png" in message
    message = await fetch_error(fetcher(timeout_s=0.3), static.url("/slow"))
    assert "timeout" in message and "/slow" in message
    message = await fetch_error(fetcher(max_redirects=5), static.url("/loop"))
    assert "more than 5 redirects" in message and "/loop" in message
    message = await fetch_error(fetcher(), static.url("/huge"))
    assert "larger than the 1 MB cap" in message and "/huge" in message
    message = await fetch_error(fetcher(), static.url("/declared"))
    assert "larger than the 1 MB cap" in message
    message = await fetch_error(fetcher(), static.url("/redirect?to=ftp://127.0.0.1/x.png"))
    assert "only http and https" in message and "redirected to ftp://" in message


async def test_redirects_are_followed_up_to_the_bound(static: StaticServer) -> None:
    f = fetcher(max_redirects=4)  # /hop/3 -> /hop/2 -> /hop/1 -> /hop/0 -> /files/real.jpg
    try:
        got = await f.fetch(static.url("/hop/3"))
        assert got.data == static.files["real.jpg"][0] and got.url.endswith("/files/real.jpg")
    finally:
        await f.close()
    assert "more than 3 redirects" in await fetch_error(fetcher(max_redirects=3), static.url("/hop/3"))


async def test_transient_failures_are_retried(static: StaticServer) -> None:
    f = fetcher(retries=2)
    try:
        got = await f.fetch(static.url("/flaky"))
    finally:
        await f.close()
    assert got.data == static.files["real.jpg"][0] and static.hits["/flaky"] == 2


async def test_private_addresses_can_be_refused(static: StaticServer) -> None:
    assert is_blocked_address("127.0.0.1") and is_blocked_address("10.1.2.3") and is_blocked_address("169.254.169.254")
    assert is_blocked_address("::1") and is_blocked_address("::ffff:192.168.0.1") and is_blocked_address("fe80::1")
    assert not is_blocked_address("93.184.216.34") and not is_blocked_address("2606:4700::1111")
    before = static.hits["/files/real.jpg"]
    message = await fetch_error(fetcher(block_private=True), static.url("/files/real.jpg"))
    assert "non-public address" in message and "block_private_addresses" in message
    by_name = f"http://localhost:{static.port}/files/real.jpg"  # a name resolving to loopback
    message = await fetch_error(fetcher(block_private=True), by_name)
    assert "localhost resolves to a non-public address" in message and by_name in message
    assert static.hits["/files/real.jpg"] == before  # no request reached the server


async def test_a_url_shared_by_many_rows_is_fetched_once(tree: dict[str, Path], static: StaticServer) -> None:
    b = builder(tree["root"], image_mode="inline", max_side=60)
    url = static.url("/files/shared.png")
    missing = static.url("/files/gone.png")
    try:
        rows = await asyncio.gather(*(b.parts({"image": [url]}) for _ in range(40)))
        errors = await asyncio.gather(*(b.parts({"image": missing}) for _ in range(10)), return_exceptions=True)
    finally:
        await b.aclose()
    assert static.hits["/files/shared.png"] == 1
    assert static.hits["/files/gone.png"] == 1  # a failure is remembered too
    assert all(isinstance(e, InputError) and "HTTP 404" in e.message for e in errors)
    assert {uri_image(r[0]["image_url"]["url"]).size for r in rows} == {(60, 45)}


# -- config ----------------------------------------------------------------------------------


def _job(tmp_path: Path, **images: Any) -> dict[str, Any]:
    job = job_dict(tmp_path / "m.csv", "http://127.0.0.1:1/v1", tmp_path / "out")
    if images:
        job["images"] = images
    return job


def test_images_table_is_checked_and_shapes_the_request(tmp_path: Path) -> None:
    with pytest.raises(JobError, match=r"\[images\] max_sid: unknown key"):
        parse_job(_job(tmp_path, max_sid=10), tmp_path / "j.toml")
    with pytest.raises(JobError, match=r"image_mode must be \"url\", \"inline\" or \"presign\""):
        parse_job(_job(tmp_path, image_mode="fetch"), tmp_path / "j.toml")
    with pytest.raises(JobError, match=r"pool must be \"process\" or \"thread\""):
        parse_job(_job(tmp_path, pool="fork"), tmp_path / "j.toml")
    with pytest.raises(JobError, match=r"\[images\] max_image_mb must be more than zero"):
        parse_job(_job(tmp_path, max_image_mb=0), tmp_path / "j.toml")
    plain = parse_job(_job(tmp_path), tmp_path / "j.toml")
    assert plain.request_shape()["images"] is None  # defaults: checkpoints made before stay valid
    small = parse_job(_job(tmp_path, max_side=512, allowed_roots=["imgs"], fetch_timeout_s=5), tmp_path / "j.toml")
    assert small.images.allowed_roots == ((tmp_path / "imgs").resolve(),)
    assert small.request_shape()["images"] == {"max_side": 512}  # fetch settings do not change answers
    assert small.shape_digest() != plain.shape_digest()


# -- end to end: the pipeline against the built-in endpoint --------------------------------


def _user_content(recorded: dict[str, Any]) -> list[dict[str, Any]]:
    body = json.loads(recorded["body"])
    return body["messages"][-1]["content"]


def _by_prompt(requests: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {c[0]["text"]: c for c in map(_user_content, requests)}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_several_images_per_row_in_one_message_in_order(tmp_path: Path, endpoint_factory: Any, fmt: str) -> None:
    (tmp_path / "a.jpg").write_bytes(jpeg(64, 48))
    (tmp_path / "b.png").write_bytes(png(30, 20, alpha=True))
    inline_png = data_uri("image/png", png(16, 16))
    images = ["a.jpg", inline_png, "https://images.example/c.png", "b.png"]
    cell: Any = json.dumps(images) if fmt == "csv" else images
    rows = [{"id": "r1", "image": cell, "prompt": "Compare these"}, {"id": "r2", "image": "a.jpg" if fmt == "csv" else ["a.jpg"], "prompt": "One"}]
    manifest = tmp_path / f"m.{fmt}"
    write_rows(manifest, rows, fmt)
    ep = endpoint_factory(record=True)
    job = write_job(tmp_path / "job.toml", job_dict(manifest, ep.base_url, tmp_path / "out", request={"image_detail": "low"}))
    done = run_cli("run", str(job))
    assert done.returncode == 0, done.stderr
    got = _by_prompt(ep.requests())
    a = data_uri("image/jpeg", (tmp_path / "a.jpg").read_bytes())
    b = data_uri("image/png", (tmp_path / "b.png").read_bytes())
    part = lambda url: {"type": "image_url", "image_url": {"url": url, "detail": "low"}}  # noqa: E731
    assert got["Compare these"] == [
        {"type": "text", "text": "Compare these"},
        part(a), part(inline_png), part("https://images.example/c.png"), part(b),
    ]
    assert got["One"] == [{"type": "text", "text": "One"}, part(a)]
    answers = {r["id"]: r["answer"] for r in read_output(tmp_path / "out")}
    assert "image 4 is a PNG image, 30x20 pixels" in answers["r1"]


def test_video_request_bodies(tmp_path: Path, endpoint_factory: Any) -> None:
    (tmp_path / "clip.mp4").write_bytes(MP4)
    for i in range(3):
        (tmp_path / f"f{i}.png").write_bytes(png(80, 60))
    (tmp_path / "still.jpg").write_bytes(jpeg(64, 48))
    rows: list[dict[str, Any]] = [
        {"id": "file", "image": None, "video": "clip.mp4", "prompt": "A local video"},
        {"id": "url", "image": None, "video": "https://v.example/clip.mp4", "prompt": "A remote video"},
        # a JSONL column holds one type: a list of frames goes as a JSON array in the string
        {"id": "frames", "image": None, "video": json.dumps(["f0.png", "f1.png", "f2.png"]), "prompt": "Frames"},
        {"id": "both", "image": "still.jpg", "video": "clip.mp4", "prompt": "Image and video"},
        {"id": "bad", "image": None, "video": "still.jpg", "prompt": "Not a video"},
    ]
    manifest = tmp_path / "m.jsonl"
    write_rows(manifest, rows, "jsonl")
    ep = endpoint_factory(record=True)
    job = job_dict(manifest, ep.base_url, tmp_path / "out", input={"video_column": "video"}, images={"max_side": 40})
    done = run_cli("run", str(write_job(tmp_path / "job.toml", job)))
    assert done.returncode == 1, done.stderr  # one failed row
    got = _by_prompt(ep.requests())
    assert len(got) == 4 and "Not a video" not in got
    mp4 = {"type": "video_url", "video_url": {"url": data_uri("video/mp4", MP4)}}
    assert got["A local video"][1:] == [mp4]
    assert got["A remote video"][1:] == [{"type": "video_url", "video_url": {"url": "https://v.example/clip.mp4"}}]
    (frames,) = got["Frames"][1:]
    head, _, payload = frames["video_url"]["url"].partition(",")
    assert frames["type"] == "video_url" and head == "data:video/jpeg;base64"
    decoded = [Image.open(io.BytesIO(base64.b64decode(f))) for f in payload.split(",")]
    assert [(i.format, i.size) for i in decoded] == [("JPEG", (40, 30))] * 3  # frames downscaled too
    still, video = got["Image and video"][1:]
    assert still["type"] == "image_url" and uri_image(still["image_url"]["url"]).size == (40, 30)
    assert video == mp4
    out = {r["id"]: r for r in read_output(tmp_path / "out")}
    assert out["bad"]["error_kind"] == "input" and "not a video" in out["bad"]["error"] and "still.jpg" in out["bad"]["error"]
    assert "a video of 3 JPEG frames" in out["frames"]["answer"]


def test_inline_run_fetches_shared_urls_once_and_bad_rows_become_error_rows(tmp_path: Path, endpoint_factory: Any, static: StaticServer) -> None:
    (tmp_path / "outside.jpg").write_bytes(jpeg(64, 48))
    data = tmp_path / "data"
    data.mkdir()
    (data / "photo.jpg").write_bytes(jpeg(1600, 1200, orientation=8))
    (data / "renamed.png").write_text("a text file with an image's name")
    whole = jpeg(400, 300)
    (data / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    (data / "thin.png").write_bytes(png(2010, 10))
    shared = static.url("/files/real.jpg") + "?e2e"
    before = static.hits["/files/real.jpg"]
    rows = [{"id": f"s{i:02d}", "image": shared, "prompt": f"shared {i}"} for i in range(12)]
    rows += [
        {"id": "photo", "image": "photo.jpg", "prompt": "rotated photo"},
        {"id": "missing", "image": "nope.jpg", "prompt": "missing"},
        {"id": "outside", "image": "../outside.jpg", "prompt": "outside"},
        {"id": "renamed", "image": "renamed.png", "prompt": "renamed"},
        {"id": "cut", "image": "cut.jpg", "prompt": "cut"},
        {"id": "thin", "image": "thin.png", "prompt": "thin"},
        {"id": "gone", "image": static.url("/files/gone.jpg"), "prompt": "gone"},
        {"id": "text", "image": static.url("/files/text.png"), "prompt": "text"},
    ]
    manifest = data / "m.csv"
    write_rows(manifest, rows, "csv")
    ep = endpoint_factory(record=True)
    job = job_dict(manifest, ep.base_url, tmp_path / "out", images={"image_mode": "inline", "max_side": 256, "fetch_retries": 0})
    done = run_cli("run", str(write_job(tmp_path / "job.toml", job)))
    assert done.returncode == 1, done.stderr
    assert static.hits["/files/real.jpg"] - before == 1  # twelve rows, one download
    out = {r["id"]: r for r in read_output(tmp_path / "out")}
    assert len(out) == len(rows)
    sent = _by_prompt(ep.requests())
    assert len(sent) == 13  # the 12 shared rows and the photo; no request for a refused row
    assert all(out[f"s{i:02d}"]["status"] == "ok" for i in range(12))
    assert "JPEG image, 256x192 pixels" in out["s00"]["answer"]
    assert "JPEG image, 192x256 pixels" in out["photo"]["answer"]  # turned upright, then bounded
    expect = {
        "missing": ("image file not found", "nope.jpg"),
        "outside": ("outside the allowed roots", "../outside.jpg"),
        "renamed": ("not an image", "renamed.png"),
        "cut": ("unreadable or truncated", "cut.jpg"),
        "thin": ("aspect ratio", "thin.png"),
        "gone": ("HTTP 404", "/files/gone.jpg"),
        "text": ("not an image", "/files/text.png"),
    }
    for row_id, (cause, value) in expect.items():
        r = out[row_id]
        assert (r["status"], r["error_kind"], r["attempts"]) == ("error", "input", 0), r
        assert cause in r["error"] and value in r["error"], r["error"]
