"""The tables users give — CSV, TSV (optionally gzip-compressed) and parquet — read as they mean them.

Every way a file can be unusable gets one error that names the file and what to do: it does not exist, it
is empty, it has a header but no data rows, two columns share a name, a line is not in the file's encoding
(the line number is named; `--encoding` reads another), a gzip file is truncated, a parquet file is damaged.
Label cells spelled as spreadsheets and R write a missing value (`NA`, `N/A`, `nan`, `NaN`, `null`, blank, …)
are missing labels, never a reason to reject the row and its other labels.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from biofm.platform.errors import StoreError

# pandas' own list: what users of pandas and R expect to be read as missing ('', 'NA', 'N/A', 'nan', 'NaN',
# 'null', 'NULL', 'None', '#N/A', '<NA>', …)
MISSING = frozenset(pd._libs.parsers.STR_NA_VALUES)
TEXT_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz")


def is_missing(value) -> bool:
    """A cell that holds no value: None, NaN, or a missing-value spelling (see `MISSING`)."""
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() in MISSING
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def missing_as_nan(column: pd.Series) -> pd.Series:
    """A label column with every missing-value spelling replaced by NaN (text cells are also stripped)."""
    if column.dtype == object or pd.api.types.is_string_dtype(column):
        cells = column.astype(object).map(lambda v: v.strip() if isinstance(v, str) else v)
        return cells.where(~cells.map(is_missing), np.nan)
    return column


def _separator(path: str) -> str:
    return "\t" if ".tsv" in str(path).lower() else ","


def _raw_bytes(path: str) -> bytes:
    """The file's bytes, decompressed when its name ends in .gz."""
    if str(path).lower().endswith(".gz"):
        with gzip.open(path, "rb") as handle:
            return handle.read()
    return Path(path).read_bytes()


def diagnose(path: str, encoding: str = "utf-8") -> str | None:
    """Why a text table cannot be read, in words, or None when nothing here explains it."""
    path = str(path)
    if not Path(path).exists():
        return "the file does not exist"
    if Path(path).stat().st_size == 0:
        return "the file is empty (0 bytes); it needs a header row and at least one data row"
    try:
        data = _raw_bytes(path)
    except EOFError:
        return "the gzip file is truncated (it ends before gzip's end-of-stream marker); copy or download it again"
    except (gzip.BadGzipFile, zlib.error, OSError) as err:
        return f"the file is not a valid gzip file though its name ends in .gz ({err})"
    if not data.strip():
        return "the file holds nothing but whitespace; it needs a header row and at least one data row"
    try:
        decoder = codecs.getincrementaldecoder(encoding)()
    except LookupError:
        return f"--encoding {encoding!r} is not an encoding Python knows (e.g. utf-8, latin-1, cp1252)"
    for number, line in enumerate(data.splitlines(keepends=True), start=1):
        try:
            decoder.decode(line)
        except UnicodeDecodeError as err:
            return (
                f"line {number} is not valid {encoding} (byte 0x{line[err.start]:02x} at position "
                f"{err.start + 1}); if the file was saved in another encoding, name it with --encoding "
                "(e.g. --encoding latin-1 or cp1252)"
            )
    return None


def read_failure(path: str, err: Exception, what: str, encoding: str = "utf-8") -> StoreError:
    """The one error for a table that a parser refused: the diagnosis when there is one, else its words."""
    reason = diagnose(path, encoding) if not str(path).lower().endswith(".parquet") else None
    if reason is None:
        detail = " ".join(str(err).split())[:200]
        reason = f"{type(err).__name__}: {detail}"
    return StoreError(f"{path}: the {what} cannot be read: {reason}")


def header(path: str, encoding: str = "utf-8") -> list[str]:
    """The column names of a text table's first line, as written (pandas renames repeats to `x.1`)."""
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    with opener(
        path,
        "rt",
        encoding="utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding,
        newline="",
    ) as handle:
        return next(csv.reader(handle, delimiter=_separator(path)), [])


def check_columns(path: str, columns: list[str], what: str) -> None:
    repeated = sorted(name for name, n in Counter(columns).items() if n > 1)
    if repeated:
        raise StoreError(
            f"{path}: the {what} has two or more columns named {repeated}; every column needs its "
            "own name — rename the repeats"
        )


def check_parquet(path: str, what: str) -> str:
    """`path`, once its footer reads (a truncated or damaged parquet file is a StoreError naming it) and its
    columns have names of their own."""
    import pyarrow.parquet as pq

    try:
        names = list(pq.read_schema(path).names)
    except Exception as err:  # noqa: BLE001 — pyarrow raises ArrowInvalid, OSError, …
        raise StoreError(
            f"{path}: the {what} is not a readable parquet file ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:160]}); it may be truncated — write it again"
        ) from None
    check_columns(path, names, what)
    return path


def read_table(
    path: str, what: str = "table", encoding: str = "utf-8", formats: tuple[str, ...] = (".parquet", *TEXT_SUFFIXES)
) -> pd.DataFrame:
    """A CSV / TSV (.gz too) as strings (blank cells NaN; other missing spellings are left to the caller,
    since an id may be 'NA'), or a parquet file as typed; one `StoreError` per way it can be unusable."""
    path = str(path)
    if not Path(path).exists() and "://" not in path:
        raise StoreError(f"{path}: the {what} does not exist")
    lower = path.lower()
    if not lower.endswith(formats):
        raise StoreError(f"{path}: unknown {what} format; use " + ", ".join(formats))
    if lower.endswith(".parquet"):
        check_parquet(path, what)
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # noqa: BLE001 — a damaged data page past a sound footer
            raise StoreError(
                f"{path}: the {what} is not a readable parquet file ({type(err).__name__}: "
                f"{' '.join(str(err).split())[:160]}); it may be damaged — write it again"
            ) from None
    else:
        if "://" not in path and Path(path).stat().st_size == 0:
            raise StoreError(f"{path}: the {what} cannot be read: {diagnose(path, encoding)}")
        try:
            frame = pd.read_csv(
                path, sep=_separator(path), dtype=str, keep_default_na=False, na_values=[""], encoding=encoding
            )
            check_columns(path, header(path, encoding), what)
        except StoreError:
            raise
        except (
            UnicodeDecodeError,
            EOFError,
            zlib.error,
            gzip.BadGzipFile,
            pd.errors.ParserError,
            pd.errors.EmptyDataError,
            LookupError,
            OSError,
            ValueError,
            csv.Error,
        ) as err:
            raise read_failure(path, err, what, encoding) from None
    if not len(frame):
        raise StoreError(f"{path}: the {what} has a header but no data rows")
    return frame
