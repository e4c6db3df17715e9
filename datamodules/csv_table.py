"""open_clip-style CSV/TSV files: one row per sample, an image path column (relative paths are relative
to the file) and a caption column. Rows are grouped into fixed blocks that act as shards, so the stream
splits, shuffles and counts them like WebDataset shards (a bad block is named ``train.csv:rows 1000-1999``)."""

from __future__ import annotations

import csv
import difflib
import random
import sys
from collections.abc import Iterator
from pathlib import Path

from clipkit.errors import DataError
from datamodules.base import CaptionDataModule
from datamodules.stream import Record


def _column(name: str, header: list[str], option: str, path: Path) -> int:
    if name in header:
        return header.index(name)
    close = difflib.get_close_matches(name, header, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"columns are {header}"
    raise DataError(f"{path} has no column {name!r} (data.{option}): {hint}")


class TableSource:
    """Rows of a CSV/TSV file as records; an image cell names a file, read when the record is decoded."""

    def __init__(self, path: str | Path, image_column: str = "filepath", caption_column: str = "title",
                 separator: str = "\t", rows_per_shard: int = 1000) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"CSV file {self.path} does not exist: check data.path")
        csv.field_size_limit(sys.maxsize)
        # surrogateescape keeps a non-UTF-8 caption as an undecodable one, counted, instead of failing the file
        with self.path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.reader(f, delimiter=separator)
            header = next(reader, None)
            if not header:
                raise DataError(f"{self.path} is empty")
            if len(header) == 1 and separator not in header[0] and ("," in header[0] or "\t" in header[0]):
                raise DataError(f"{self.path}: one column {header[0]!r} with separator {separator!r}: "
                                "set data.separator (',' for CSV, '\\t' for TSV)")
            image, caption = (_column(image_column, header, "image_column", self.path),
                              _column(caption_column, header, "caption_column", self.path))
            self.rows = [(row[image] if image < len(row) else None, row[caption] if caption < len(row) else None)
                         for row in reader]
        self.rows_per_shard = rows_per_shard
        self._shards = [f"{self.path.name}:rows {start}-{min(start + rows_per_shard, len(self.rows)) - 1}"
                        for start in range(0, len(self.rows), rows_per_shard)]

    def shards(self) -> list[str]:
        return self._shards

    def records(self, shard: str, seed: str | None = None) -> Iterator[Record]:
        start = int(shard.rsplit("rows ", 1)[1].split("-")[0])
        order = list(range(start, min(start + self.rows_per_shard, len(self.rows))))
        if seed is not None:
            random.Random(seed).shuffle(order)
        for i in order:
            image, caption = self.rows[i]
            path = None if not image else (self.path.parent / image)
            yield Record(shard, f"line {i + 2}", path, caption)


class CsvDataModule(CaptionDataModule):
    """Image–text pairs from a CSV/TSV (``path``), with an optional held-out file for retrieval."""

    def __init__(self, path: str, retrieval_path: str | None = None, image_column: str = "filepath",
                 caption_column: str = "title", separator: str = "\t", rows_per_shard: int = 1000, **common) -> None:
        options = dict(image_column=image_column, caption_column=caption_column, separator=separator,
                       rows_per_shard=rows_per_shard)
        self._source = TableSource(path, **options)
        self._retrieval_source = TableSource(retrieval_path, **options) if retrieval_path else None
        super().__init__(**common)

    def source(self) -> TableSource:
        return self._source

    def retrieval_source(self) -> TableSource | None:
        return self._retrieval_source
