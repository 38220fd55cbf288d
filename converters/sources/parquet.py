"""Parquet shards with an image column (bytes, or Hugging Face's ``{bytes, path}`` struct) and
an integer label column, read with pyarrow: ``train-00000-of-00294.parquet``,
``validation-...`` as the Hugging Face ``imagenet-1k`` dataset ships them.

Row groups are the smallest unit parquet reads, so these shards are read in their own order:
a pack's shards follow the files' rows rather than train's seeded permutation (the records
are the same; loaders shuffle anyway)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from converters.sources import (
    CandidateTable,
    SourceError,
    SourceOptions,
    SourceReader,
    SplitListing,
    read_class_file,
    tree_key,
)

_SPLIT = re.compile(r"^(train|validation|val|test)(?=[-_.])")
_SPLIT_NAMES = {"validation": "val"}


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError("parquet sources need pyarrow: pip install 'datasvc[parquet]'") from None
    return pq


def _split_of(path: Path, src: Path) -> str | None:
    """The split a shard belongs to, from its name or, failing that, its folder's."""
    for part in (path.name, *reversed(path.relative_to(src).parts[:-1])):
        m = _SPLIT.match(part + ".")
        if m:
            return _SPLIT_NAMES.get(m.group(1), m.group(1))
    return None


def _column(table, name: str, where: str):
    """A column by name; ``image.path`` style names reach into a struct."""
    top, _, sub = name.partition(".")
    if top not in table.column_names:
        raise SourceError(f"{where}: no column {top!r} (columns: {', '.join(table.column_names)})")
    col = table.column(top).combine_chunks()
    return col.field(sub) if sub else col


def _image_field(schema, opts: SourceOptions, where: str) -> tuple[str, str | None]:
    """(column holding the bytes, column holding the file name or None)."""
    import pyarrow as pa

    if opts.image_column not in schema.names:
        raise SourceError(
            f"{where}: no image column {opts.image_column!r} (columns: {', '.join(schema.names)}; "
            "name it with --image-column)"
        )
    typ = schema.field(opts.image_column).type
    if pa.types.is_struct(typ):
        names = [typ.field(i).name for i in range(typ.num_fields)]
        if "bytes" not in names:
            raise SourceError(f"{where}: image column {opts.image_column!r} has no 'bytes' field")
        path = f"{opts.image_column}.path" if "path" in names else None
        return f"{opts.image_column}.bytes", opts.key_column or path
    if not (pa.types.is_binary(typ) or pa.types.is_large_binary(typ)):
        raise SourceError(f"{where}: image column {opts.image_column!r} is {typ}, not bytes")
    return opts.image_column, opts.key_column


def class_names(files: list[Path], opts: SourceOptions) -> list[str]:
    """``--classes`` file, else the label feature's names in the Hugging Face metadata."""
    if opts.classes:
        return read_class_file(opts.classes)
    for f in files:
        meta = _pq().ParquetFile(f).schema_arrow.metadata or {}
        if b"huggingface" in meta:
            info = json.loads(meta[b"huggingface"]).get("info", {})
            names = info.get("features", {}).get(opts.label_column, {}).get("names")
            if names:
                return list(names)
    raise SourceError(
        f"{files[0].parent}: no class names in the parquet metadata; pass --classes FILE "
        "(one name per line, line i = label i)"
    )


# Rows per read of the image column: a batch's images (~110 KB each in ImageNet) are what a
# worker holds, where reading a whole row group held all of its images at once, twice.
_BATCH_ROWS = 32


class _RowGroupImages:
    """The images of one row group, read a batch of rows at a time in row order."""

    def __init__(self, path: str, rg: int, column: str):
        top, _, self._sub = column.partition(".")
        # buffer_size streams the column chunk instead of reading it whole first
        pf = _pq().ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
        if top not in pf.schema_arrow.names:
            raise SourceError(f"{path}: no column {top!r}")
        self._batches = pf.iter_batches(
            batch_size=_BATCH_ROWS, row_groups=[rg], columns=[top], use_threads=False
        )
        self._start, self._images = 0, None

    def get(self, row: int):
        """Row ``row``'s image bytes (None when null); rows must come in increasing order."""
        while self._images is None or row >= self._start + len(self._images):
            if self._images is not None:
                self._start += len(self._images)
            batch = next(self._batches, None)
            if batch is None:
                raise IndexError(f"row {row} is past the row group's end")
            col = batch.column(0)
            self._images = col.field(self._sub) if self._sub else col
        if row < self._start:
            raise IndexError(f"row {row} asked after row {self._start}")
        return self._images[row - self._start].as_py()


def _release_pool() -> None:
    """Hand pyarrow's freed memory back to the system: its pool (mimalloc or jemalloc) keeps
    what a row group used, and a worker's footprint would creep up with the row groups read."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


class ParquetReader(SourceReader):
    """Reads candidates whose ``loc`` is (file number, row group, row), a few rows at a time:
    consecutive candidates of a row group cost one pass over its image column."""

    def __init__(self, files: list[str], image_column: str):
        self.files = files
        self.image_column = image_column

    def iter_bytes(self, candidates):
        group, images, error = None, None, None
        for cand in candidates:
            f, rg, row = cand.loc
            if (f, rg) != group:
                if images is not None:
                    _release_pool()
                group, images, error = (f, rg), None, None
                try:
                    images = _RowGroupImages(self.files[f], rg, self.image_column)
                except Exception as e:  # noqa: BLE001 - pyarrow raises OSError, ArrowInvalid...
                    error = self._unreadable(f, rg, e)
            value = None
            if images is not None:
                try:
                    value = images.get(row)
                except Exception as e:  # noqa: BLE001 - a damaged page mid-row-group
                    images, error = None, self._unreadable(f, rg, e)
            if images is None:
                yield cand, error
            elif value is None:
                yield cand, OSError(f"{self.files[f]}: row {row} of row group {rg} has no image")
            else:
                yield cand, value

    def _unreadable(self, f: int, rg: int, e: Exception) -> OSError:
        """The error a candidate of an unreadable row group is reported with."""
        return OSError(f"{self.files[f]}: row group {rg} unreadable ({e})")


def _list_file(f: int, path: Path, split: str, classes, key_column, opts, out) -> None:
    """Append one file's candidates (labels and names only: the images are not read)."""
    pf = _pq().ParquetFile(path)
    columns = [opts.label_column] + ([key_column] if key_column else [])
    for rg in range(pf.num_row_groups):
        table = pf.read_row_group(rg, columns=columns, use_threads=False)
        labels = _column(table, opts.label_column, str(path)).to_pylist()
        names = _column(table, key_column, str(path)).to_pylist() if key_column else None
        for row, label in enumerate(labels):
            where = f"{path}: row group {rg} row {row}"
            if label is None or not 0 <= label < len(classes):
                raise SourceError(
                    f"{where}: label {label} is not one of the {len(classes)} classes "
                    "(an unlabeled test split? choose splits with --split)"
                )
            name = names[row] if names and names[row] else f"{path.stem}/{rg:05d}-{row:06d}"
            key = tree_key(split, name, classes[label])
            out.append(key, label, (f, rg, row))


def discover_parquet(src: Path, opts: SourceOptions) -> tuple[list[str], list[SplitListing]]:
    files = sorted(src.rglob("*.parquet"))
    by_split: dict[str, list[Path]] = {}
    for p in files:
        split = _split_of(p, src)
        if split is not None:
            by_split.setdefault(split, []).append(p)
    if not by_split:
        raise SourceError(f"{src}: parquet files, but none named for a split (train-*.parquet)")
    splits = list(opts.splits) if opts.splits else [s for s in ("train", "val") if s in by_split]
    classes = class_names(files, opts)
    listings = []
    for split in splits or sorted(by_split):
        if split not in by_split:
            raise SourceError(f"{src}: no parquet files for split {split!r}")
        paths = by_split[split]
        schema = _pq().ParquetFile(paths[0]).schema_arrow
        image_col, key_col = _image_field(schema, opts, str(paths[0]))
        candidates = CandidateTable.Builder(loc_width=3)
        for f, path in enumerate(paths):
            _list_file(f, path, split, classes, key_col, opts, candidates)
        reader = ParquetReader([str(p) for p in paths], image_col)
        listings.append(SplitListing(split, reader, candidates.build(), [], ordered=True))
    return classes, listings
