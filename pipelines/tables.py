"""Table sources: one Parquet or CSV file, a directory or glob of them, on this machine or
on an object store (`s3://bucket/data/`, `gs://...`, any URI pyarrow's filesystems open,
with connection options in the URI's query as for `resources.storage_path`).

A directory is read whole (its files in name order, recursively; names starting with `_`
or `.`, as Spark's `_SUCCESS` and hidden files, are not data). Every file must hold the
same columns of the same types: a table split over files is one table.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from pipelines.errors import DataError, first_line, redact
from pipelines.filesystem import check_reachable, is_uri, open_filesystem, short_reason

FORMATS = {".parquet": "Parquet", ".pq": "Parquet", ".csv": "CSV", ".txt": "CSV"}
"""File name suffixes read as data, and their format."""


@dataclass
class TableFiles:
    source: str
    """As the user gave it (what messages name)."""
    filesystem: object
    paths: list[str]
    """Inside `filesystem`, in name order."""
    format: str
    """Parquet or CSV."""


def find(source: str, named: str = "data.source") -> TableFiles:
    """The files `source` names, or a one-line error saying why there are none to read
    (naming `named`, the config key that gave it)."""
    import pyarrow.fs

    shown = redact(source)
    if is_uri(source):
        check_reachable(source, named, "s3://BUCKET/data/", DataError)
    fs, path = open_filesystem(source, named, DataError)
    pattern = any(c in path for c in "*?[")
    if pattern:
        paths = _glob(fs, path, shown, named)
        if not paths:
            raise DataError(f"{named} {shown!r} matches no Parquet or CSV file")
    else:
        kind = fs.get_file_info(path).type if path else pyarrow.fs.FileType.Directory
        if kind == pyarrow.fs.FileType.NotFound:
            raise DataError(f"data file {shown!r} does not exist")
        if kind == pyarrow.fs.FileType.Directory:
            paths = _listing(fs, path, shown, named)
            if not paths:
                raise DataError(f"data directory {shown!r} holds no Parquet (.parquet) or CSV (.csv) files")
        else:
            paths = [path]
    formats = {FORMATS.get(_suffix(p)) for p in paths}
    if None in formats:
        odd = next(p for p in paths if _suffix(p) not in FORMATS)
        raise DataError(f"data file {shown_path(source, odd)!r} is not Parquet (.parquet) or CSV (.csv)")
    if len(formats) > 1:
        raise DataError(f"{named} {shown!r} mixes Parquet and CSV files; give one format")
    return TableFiles(source, fs, paths, formats.pop())


def read(source: str, named: str = "data.source"):
    """The whole table `source` names (a pyarrow Table), its files checked to agree."""
    import pyarrow as pa

    files = find(source, named)
    tables = [_read_one(files, path) for path in files.paths]
    first = (files.paths[0], tables[0].schema)
    for path, table in zip(files.paths[1:], tables[1:]):
        check_schema(source, first, path, table.schema)
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def check_schema(source: str, first: tuple[str, object], path: str, schema) -> None:
    """A file of a table holds the columns and types of its first file, `first` (path, schema)."""
    first_path, expected = first
    if schema.names != expected.names:
        missing = [c for c in expected.names if c not in schema.names]
        extra = [c for c in schema.names if c not in expected.names]
        what = (f"lacks column(s) {', '.join(missing)}" if missing else
                f"has column(s) {', '.join(extra)} the others lack" if extra else
                "orders its columns differently")
        raise DataError(f"data file {shown_path(source, path)!r} {what} (unlike "
                        f"{shown_path(source, first_path)!r}): every file of a table holds the same columns")
    if not schema.equals(expected):
        column = next(n for n in expected.names if schema.field(n).type != expected.field(n).type)
        raise DataError(f"data file {shown_path(source, path)!r}: column {column!r} holds "
                        f"{schema.field(column).type}, but {expected.field(column).type} in "
                        f"{shown_path(source, first_path)!r}")


def _listing(fs, directory: str, shown: str, named: str) -> list[str]:
    import pyarrow.fs

    try:
        found = fs.get_file_info(pyarrow.fs.FileSelector(directory, recursive=True, allow_not_found=True))
    except OSError as e:
        raise DataError(f"{named} {shown!r} cannot be listed: {short_reason(e)}") from None
    return sorted(f.path for f in found if f.type == pyarrow.fs.FileType.File
                  and not any(part[:1] in ("_", ".") for part in f.path[len(directory):].split("/") if part))


def _read_one(files: TableFiles, path: str):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if files.format == "Parquet":
            return pq.read_table(path, filesystem=files.filesystem)
        with files.filesystem.open_input_file(path) as stream:
            return pacsv.read_csv(stream)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"data file {shown_path(files.source, path)!r} is not a readable {files.format} "
                        f"file: {first_line(e)}") from None


def _glob(fs, pattern: str, shown: str, named: str) -> list[str]:
    """The data files a shell glob names: `*`, `?` and `[...]` match within one directory
    level, listed level by level (a pattern under /tmp must not list all of /tmp); `**`
    matches across levels, below the fixed part of the pattern."""
    import pyarrow.fs

    if "**" in pattern:
        head = pattern[:pattern.index("**")].rsplit("/", 1)[0]
        flat = pattern.replace("/**/", "/")  # `**/` also matches no directory at all
        return [p for p in _listing(fs, head, shown, named)
                if fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, flat)]
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    level = ["/".join(parts[:fixed])]
    for i, part in enumerate(parts[fixed:], start=fixed):
        last = i == len(parts) - 1
        matched = []
        for directory in level:
            try:
                found = fs.get_file_info(pyarrow.fs.FileSelector(directory, allow_not_found=True))
            except OSError:
                continue  # not a directory, or not readable: it holds no match
            wanted = pyarrow.fs.FileType.File if last else pyarrow.fs.FileType.Directory
            matched += [f.path for f in found if f.type == wanted and fnmatch.fnmatchcase(f.base_name, part)]
        level = matched
    return sorted(p for p in level if p.rsplit("/", 1)[-1][:1] not in ("_", "."))


def _suffix(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return name[name.rfind("."):].lower() if "." in name else ""


def shown_path(source: str, path: str) -> str:
    """A file of `source` as the user would name it: the path on this machine, or the URI."""
    if not is_uri(source):
        return path
    scheme = source.split("://", 1)[0]
    return redact(f"{scheme}://{path}")
