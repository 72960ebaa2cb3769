"""Image folders: every image file under the path is a row; no manifest.

Images are taken by their suffix (.jpg, .jpeg, .png, .webp, .gif, any case); their content is
sniffed when they are read for a request (a file that is not an image becomes an error row, and
`pipeline run --dry-run` names it). A row's columns:

    image    the file's place: its local path or its object URL (s3://bucket/key), read when sent
    path     its path relative to the root (the row's id), e.g. "cats/001.jpg"
    name     its file name, "001.jpg";  folder: its folder relative to the root, "cats" ("" at the root)
    txt      the text of a sidecar "cats/001.txt" beside it, if the folder has any (else null)
    json     the text of a sidecar "cats/001.json", likewise

so `[request] prompt = "Caption this {folder} photo: {txt}"` works. Sidecars are read with their
shard (at most 1 MiB each; a larger or unreadable one makes its row an error row of kind "input"),
without their last line break.

Nothing is read while planning: an image's size and stamp (mtime or ETag) are its identity, and
a shard's digest is of its images' and sidecars' names and identities. A shard holds the images it
was planned with (the plan records each image's shard), so images added later make new shards and
an image changed or removed is refused like an edited manifest.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections import defaultdict

import pyarrow as pa

from ...config.inputs import IMAGE_SUFFIXES
from ...errors import JobError
from ..checks import short
from ..plan import FileInfo, Plan, Shard
from .base import ShardRows, Source, check_columns, encode_schema
from .location import Listing

__all__ = ["ImageSource"]

SIDECARS = (".txt", ".json")
MAX_SIDECAR = 1 << 20
BASE_COLUMNS = ["image", "path", "name", "folder"]


def _stem(name: str) -> str:
    return posixpath.splitext(name)[0]


class ImageSource(Source):
    format = "images"
    suffixes = IMAGE_SUFFIXES + SIDECARS

    def list(self) -> Listing:
        listing = super().list()
        if not any(_is_image(f.name) for f in listing.files):
            raise JobError(
                f"[input] path: {self.cfg.display} holds no images (.jpg, .jpeg, .png, .webp or .gif); point path at them")
        return listing

    def plan(self, shard_rows: int, listing: Listing | None = None, previous: Plan | None = None) -> Plan:
        listing = listing if listing is not None else self.list()
        images = [f for f in listing.files if _is_image(f.name)]
        stems = {_stem(f.name) for f in images}
        sidecars = {f.name: f for f in listing.files if not _is_image(f.name) and _stem(f.name) in stems}
        kept: dict[str, int] = {}
        if previous is not None and previous.version >= 2 and previous.format == self.format \
                and previous.shard_rows == shard_rows and previous.checked:
            kept = {f.name: f.shard for f in previous.files if f.rows == 1}
        members: dict[int, list[FileInfo]] = defaultdict(list)
        nxt = previous.next_index() if previous is not None and kept else 0
        fresh: list[FileInfo] = []
        for f in images:
            if f.name in kept:
                members[kept[f.name]].append(f)
            else:
                fresh.append(f)
        for start in range(0, len(fresh), shard_rows):
            members[nxt] = fresh[start : start + shard_rows]
            nxt += 1
        return self._plan(shard_rows, listing, members, sidecars)

    def _plan(self, shard_rows: int, listing: Listing, members: dict[int, list[FileInfo]],
              sidecars: dict[str, FileInfo]) -> Plan:
        used = {posixpath.splitext(n)[1] for n in sidecars}
        columns = BASE_COLUMNS + [ext[1:] for ext in SIDECARS if ext in used]
        check_columns(self.cfg, columns)
        files: list[FileInfo] = []
        shards: list[Shard] = []
        for index in sorted(members, key=lambda i: members[i][0].name):
            group = members[index]
            h = hashlib.blake2b(digest_size=12)
            for image in group:
                files.append(FileInfo(image.name, image.size, image.stamp, 1, shard=index))
                for ext in SIDECARS:
                    side = sidecars.get(_stem(image.name) + ext)
                    if side is not None:
                        files.append(FileInfo(side.name, side.size, side.stamp, 0, shard=index))
                        h.update(f"{side.name}\0{side.size}\0{side.stamp}\n".encode())
                h.update(f"{image.name}\0{image.size}\0{image.stamp}\n".encode())
            shards.append(Shard(index, 0, len(group), 0, len(group), h.hexdigest(), group[0].name))
        files.sort(key=lambda f: f.name)
        schema = pa.schema([(c, pa.string()) for c in columns])
        return Plan(self.format, shard_rows, columns, shards, files, encode_schema(schema), checked=True,
                    single=listing.single)

    def read(self, plan: Plan, shard: Shard, columns: list[str] | None = None) -> ShardRows:
        mine = [f for f in plan.files if f.shard == shard.index]
        names = {f.name for f in mine}
        rows: dict[str, list[str | None]] = {c: [] for c in plan.columns}
        errors: dict[int, str] = {}
        for f in (f for f in mine if f.rows == 1):
            at = len(rows["path"])
            rows["image"].append(self.place.shown(plan.single, f.name))
            rows["path"].append(f.name)
            rows["name"].append(posixpath.basename(f.name))
            rows["folder"].append(posixpath.dirname(f.name))
            for ext in SIDECARS:
                if ext[1:] in rows:
                    side = _stem(f.name) + ext
                    text, error = self._sidecar(plan, side) if side in names else (None, None)
                    rows[ext[1:]].append(text)
                    if error is not None:
                        errors[at] = error
        table = pa.table({c: pa.array(v, pa.string()) for c, v in rows.items()})
        ids = table.column(self.cfg.id_column or "path").to_pylist()
        return ShardRows(table if columns is None else table.select(columns), ids, errors)

    def _sidecar(self, plan: Plan, name: str) -> tuple[str | None, str | None]:
        shown = self.place.shown(plan.single, name)
        try:
            with self.place.open(plan.single, name) as f:
                data = f.read(MAX_SIDECAR + 1)
        except Exception as exc:  # noqa: BLE001 - a storage's failure: this row's, the others go on
            return None, f"cannot read the sidecar {shown} ({type(exc).__name__}: {short(exc)})"
        if len(data) > MAX_SIDECAR:
            return None, f"the sidecar {shown} is over {MAX_SIDECAR >> 20} MiB; sidecars are captions and labels"
        return data.decode("utf-8", "replace").rstrip("\r\n"), None  # a caption file's last line break is no part of it

    def known_ids(self, plan: Plan, shard: Shard) -> list[str] | None:
        return [f.name for f in plan.files if f.shard == shard.index and f.rows == 1] if self.cfg.id_column is None else None

    def range_digest(self, plan: Plan, shard: Shard) -> str:
        return ""  # a shard's images never grow in number: a digest that differs is an image changed


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)
