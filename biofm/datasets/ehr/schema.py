"""Raw relational EHR tables: the schema YAML that describes a database, and streaming readers of its tables."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

import polars as pl
import yaml

from biofm.platform import tables
from biofm.platform.store import StoreError

# times given as offsets (`time_unit`): microseconds per unit
UNITS = {"seconds": 1e6, "minutes": 6e7, "hours": 3.6e9, "days": 8.64e10}
UNIT_NAMES = {**{u: u for u in UNITS}, **{u[:-1]: u for u in UNITS}}  # "minute" too
OFFSET_ZERO = datetime(2000, 1, 1)  # offsets become times from one zero: each stay's window is its own
MOSTLY = 0.5  # a time column of which more than this fraction fails to parse is a schema error


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
        self.time_unit = self._unit(spec, "time_unit")
        self.start_unit = self._unit(self.stays, "stays.time_unit", self.time_unit)
        start = self.stays["start"]
        if not isinstance(start, str) and not (isinstance(start, int | float) and start == 0):
            raise StoreError(f"{path}: stays.start must be a column name, or 0 (the zero of offset times)")
        if not isinstance(start, str) and self.start_unit is None:
            raise StoreError(
                f"{path}: stays.start 0 means the stay starts at the zero of offset times; say the offsets' unit "
                "with time_unit (seconds, minutes, hours or days)"
            )
        self.tables = spec["tables"]
        if not isinstance(self.tables, list):
            raise StoreError(f"{path}: 'tables' must be a list of tables (each with table, time, link)")
        for i, table in enumerate(self.tables):
            if not isinstance(table, dict):
                raise StoreError(f"{path}: tables[{i}] must be a mapping with table, time and link")
            for key in ("table", "time", "link"):
                if key not in table:
                    raise StoreError(f"{path}: tables[{i}] needs '{key}'")
            self._unit(table, f"tables[{i}].time_unit")
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

    def _unit(self, spec: dict, key: str, default: str | None = None) -> str | None:
        value = spec.get("time_unit", default)
        if value is None or value in UNITS:
            return value
        if str(value).strip().lower() in UNIT_NAMES:
            return UNIT_NAMES[str(value).strip().lower()]
        raise StoreError(f"{self.path}: {key} {value!r} is not a unit; use seconds, minutes, hours or days")

    def unit_of(self, table: dict) -> str | None:
        """An event table's time unit: None for date-times, else its times are offsets in that unit."""
        return self._unit(table, "time_unit", self.time_unit)

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


def time_expr(column: str, unit: str | None) -> pl.Expr:
    """A text column as date-times: parsed as such (`unit` None), or offsets in `unit` from `OFFSET_ZERO`
    (negative ones before it). What does not parse is null."""
    text = pl.col(column).str.strip_chars()
    if unit is None:
        return text.str.to_datetime(strict=False, time_unit="us")
    micro = (text.cast(pl.Float64, strict=False) * UNITS[unit]).round(0).cast(pl.Int64, strict=False)
    return pl.lit(OFFSET_ZERO, dtype=pl.Datetime("us")) + pl.duration(microseconds=micro, time_unit="us")


def check_times(schema: Schema, where: str, column: str, values: pl.Series, unit: str | None, key: str) -> None:
    """Stop when most of a time column's (first) values fail to parse as its schema says: the error names the
    table, the column, a few example values and the schema key that fixes it. `key`: where the unit goes."""
    values = values.drop_nulls().str.strip_chars()
    values = values.filter(values.str.len_chars() > 0).head(5000)
    if not len(values):
        return
    failed = _unparsed(values, unit)
    if failed.mean() <= MOSTLY:
        return
    bad = values.filter(failed)
    examples = ", ".join(repr(v[:24]) for v in bad.unique(maintain_order=True).head(3).to_list())
    share = f"{int(failed.sum()):,} of the first {len(values):,} values"
    numbers = bad.cast(pl.Float64, strict=False).is_not_null().mean() > MOSTLY
    dates = (~_unparsed(bad, None)).mean() > MOSTLY
    if unit is None and numbers:
        fix = (
            f"they are numbers: if they are offsets from the stay's start, say their unit with `time_unit: minutes` "
            f"(or seconds, hours, days) {key}"
        )
    elif unit is not None and dates:
        fix = f"they are date-times, not offsets in {unit}: remove `time_unit` {key}"
    elif unit is None:
        fix = "expected date-times such as 2150-03-01 13:14:00, or numbers with a `time_unit`"
    else:
        fix = f"expected numbers: offsets in {unit} from the stay's start"
    raise StoreError(
        f"{schema.path}: {where} column '{column}': {share} do not parse as "
        f"{'date-times' if unit is None else f'offsets in {unit}'} (e.g. {examples}); {fix} (docs/ehr-schema.md)"
    )


def _unparsed(values: pl.Series, unit: str | None) -> pl.Series:
    """Which values do not parse as `time_expr` reads them (polars refuses to guess a date format for a
    column with no date at all: then none parses)."""
    try:
        return pl.DataFrame({"v": values}).select(time_expr("v", unit).is_null()).to_series()
    except pl.exceptions.ComputeError:
        return pl.Series([True] * len(values))


def first_values(schema: Schema, path: Path, column: str, block_bytes: int = 1 << 20) -> pl.Series:
    """The first block's values of one column of a table (to check its times before streaming it all)."""
    for block in stream_table(path, [column], block_bytes=block_bytes, encoding=schema.encoding):
        return block[column]
    return pl.Series(column, [], dtype=pl.String)
