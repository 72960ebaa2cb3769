"""Sources: where a job's rows come from (see base.py for the seam).

    source = source_for(cfg)            # the format's source; a path that does not say is listed
    source = source_for(cfg, "csv")     # a plan's format: nothing listed
"""

from __future__ import annotations

from dataclasses import replace

from ...config import InputConfig
from ...config.inputs import IMAGE_COLUMN, format_of
from ...errors import JobError
from .base import FileSource, ShardRows, Source, Unreadable, decode_schema, heavy_columns
from .images import ImageSource
from .location import Listing, Place
from .parquet import ParquetSource
from .text import CsvSource, JsonlSource
from .webdataset import WebDatasetSource

__all__ = ["source_for", "Source", "FileSource", "ShardRows", "Unreadable", "Listing", "heavy_columns",
           "decode_schema", "SOURCES"]

SOURCES: dict[str, type[Source]] = {s.format: s for s in (CsvSource, JsonlSource, ParquetSource, ImageSource,
                                                          WebDatasetSource)}


def source_for(cfg: InputConfig, fmt: str | None = None) -> Source:
    """The source of `cfg` in format `fmt` (default: the job's; one the path does not tell is
    found by listing the files: they must all be of one format)."""
    fmt = fmt or cfg.format
    if fmt is None:
        fmt = _infer(cfg)
        if fmt in ("images", "webdataset") and cfg.image_column is None:
            raise JobError(f'[input] format: {cfg.display} holds {fmt}; set format = "{fmt}" (each '
                           f'{"image" if fmt == "images" else "sample"} is then a row, its image in the column '
                           f'"{IMAGE_COLUMN}")')
    return SOURCES[fmt](cfg if cfg.format == fmt else replace(cfg, format=fmt))


def _infer(cfg: InputConfig) -> str:
    listing = Place(cfg).listing(lambda name: format_of(name) is not None)
    found = sorted({f for info in listing.files if (f := format_of(info.name)) is not None})
    if len(found) == 1:
        return found[0]
    if not found:
        raise JobError(f"[input] path: {cfg.display} holds no .csv, .jsonl, .parquet, .tar or image files; point path "
                       f"at them, or set [input] format")
    raise JobError(f"[input] path: {cfg.display} holds {' and '.join(found)} files; set [input] format to the one to "
                   f"read (the others are then left out), or narrow path with a glob")
