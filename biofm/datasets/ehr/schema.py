"""Raw relational EHR tables: the schema YAML that describes a database, and streaming readers of its tables."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import polars as pl
import yaml

from biofm.platform import tables
from biofm.platform.store import StoreError


class Schema:
    """The YAML that describes a database (see configs/ehr/mimic-iv.yaml and docs/ehr-schema.md)."""

    def __init__(self, path: str, encoding: str | None = None):
        self.path = path
        if not Path(path).exists():
            raise StoreError(f"{path}: schema file does not exist")
        try:
            spec = yaml.safe_load(Path(path).read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            detail = str(err).replace("\n", " ")[:200]
            raise StoreError(f"{path}: the schema is not valid YAML ({detail})") from None
        if not isinstance(spec, dict):
            raise StoreError(
                f"{path}: the schema must be a mapping with 'stays' and 'tables', got a {type(spec).__name__}"
            )
        self.spec = spec
        for key in ("stays", "tables"):
            if key not in spec:
                raise StoreError(f"{path}: the schema has no '{key}' section")
        self.name = str(spec.get("name", Path(path).stem))
        self.files = str(spec.get("files", "{name}.csv.gz"))
        self.stays = spec["stays"]
        if not isinstance(self.stays, dict):
            raise StoreError(f"{path}: 'stays' must be a mapping (table, id, subject, start)")
        for key in ("table", "id", "subject", "start"):
            if key not in self.stays:
                raise StoreError(f"{path}: stays needs '{key}'")
        self.tables = spec["tables"]
        if not isinstance(self.tables, list):
            raise StoreError(f"{path}: 'tables' must be a list of tables (each with table, time, link)")
        for i, table in enumerate(self.tables):
            if not isinstance(table, dict):
                raise StoreError(f"{path}: tables[{i}] must be a mapping with table, time and link")
            for key in ("table", "time", "link"):
                if key not in table:
                    raise StoreError(f"{path}: tables[{i}] needs '{key}'")
        numbers = {}
        for key, default, kind in (
            ("observation_hours", 12, float),
            ("max_events", 128, int),
            ("max_event_tokens", 48, int),
        ):
            try:
                numbers[key] = kind(spec.get(key, default))
            except (TypeError, ValueError):
                raise StoreError(f"{path}: '{key}' must be a number, got {spec.get(key)!r}") from None
        self.observation_hours, self.max_events, self.max_event_tokens = (
            numbers["observation_hours"],
            numbers["max_events"],
            numbers["max_event_tokens"],
        )
        self.tasks = spec.get("tasks")
        self.encoding = str(encoding or spec.get("encoding", "utf-8"))  # of the CSV tables

    def file(self, root: str, table: str) -> Path:
        """The file of `table` under `root`, trying the schema's pattern, then .csv.gz, .csv, .parquet."""
        candidates = [self.files.format(name=table)] + [f"{table}{ext}" for ext in (".csv.gz", ".csv", ".parquet")]
        for candidate in candidates:
            if (Path(root) / candidate).exists():
                return Path(root) / candidate
        raise StoreError(f"{self.path}: table '{table}' is not in {root} (looked for {candidates[0]})")


def header_of(path: Path, encoding: str = "utf-8") -> list[str]:
    """A table's column names; a file that cannot be read (empty, truncated gzip, another encoding, a
    damaged parquet, two columns of one name) is one StoreError naming it."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            names = list(pq.read_schema(path).names)
        else:
            import pyarrow.csv as pacsv

            with pacsv.open_csv(
                str(path), read_options=pacsv.ReadOptions(block_size=1 << 16, encoding=encoding)
            ) as reader:
                names = list(reader.schema.names)
    except Exception as err:  # noqa: BLE001 — pyarrow raises ArrowInvalid, OSError, EOFError, …
        raise tables.read_failure(str(path), err, "table", encoding) from None
    tables.check_columns(str(path), names, "table")
    return names


def stream_table(
    path: Path, columns: list[str], block_bytes: int = 16 << 20, encoding: str = "utf-8"
) -> Iterator[pl.DataFrame]:
    """A table's `columns` as text, block by block (CSV, CSV.gz or parquet): never the whole file. A block
    that cannot be read (a truncated gzip, a line in another encoding) is a StoreError naming the file."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(columns=columns, batch_size=1 << 17):
                yield pl.from_arrow(batch).with_columns(pl.all().cast(pl.String))
            return
        import pyarrow as pa
        import pyarrow.csv as pacsv

        convert = pacsv.ConvertOptions(
            include_columns=columns, column_types={c: pa.string() for c in columns}, strings_can_be_null=True
        )
        with pacsv.open_csv(
            str(path),
            read_options=pacsv.ReadOptions(block_size=block_bytes, encoding=encoding),
            convert_options=convert,
        ) as reader:
            for batch in reader:
                yield pl.from_arrow(batch)
    except StoreError:
        raise
    except Exception as err:  # noqa: BLE001 — pyarrow raises ArrowInvalid, OSError, EOFError, …
        raise tables.read_failure(str(path), err, "table", encoding) from None


def check_columns(schema: Schema, path: Path, table: str, wanted: Iterable[str]) -> list[str]:
    header = header_of(path, schema.encoding)
    missing = [c for c in wanted if c and c not in header]
    if missing:
        raise StoreError(f"{schema.path}: table '{table}' ({path}) has no column {missing}; its columns are {header}")
    return header


def read_small(schema: Schema, root: str, table: str, columns: list[str]) -> pl.DataFrame:
    path = schema.file(root, table)
    check_columns(schema, path, table, columns)
    if not columns:
        return pl.DataFrame()
    blocks = list(stream_table(path, columns, encoding=schema.encoding))
    return pl.concat(blocks, how="vertical") if blocks else pl.DataFrame(schema={c: pl.String for c in columns})
