"""MEDS files checked against the `meds` package's schemas (MEDS 0.4.x; data written as MEDS 0.3.3 pass, as the
columns these schemas name did not change) before anything is read in full: data shards, the label file,
`metadata/subject_splits.parquet`, `metadata/codes.parquet` and `metadata/dataset.json`.

A missing required column, a column a label or split file may not have, or a column of another kind (text
where MEDS has a time or a number) is one StoreError naming the file, the column, the MEDS type and the type
found. Types of one kind that differ only in width or unit (float64 for MEDS's float32, large_string for
string, timestamp[ns] for timestamp[us]) are read as the MEDS type and noted in the report. `cast_types`
reads columns of another kind too (text times and numbers parsed, what does not parse counted and dropped),
for data that are MEDS in all but their types.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from biofm.platform.store import StoreError

MEDS_VERSION = "0.4"  # the schemas of meds 0.4.x (pinned in constraints.txt)
WHAT = {"data": "data shard", "labels": "label file", "splits": "subject_splits file", "codes": "codes file"}


def _schemas() -> dict:
    try:
        from meds import CodeMetadataSchema, DataSchema, LabelSchema, SubjectSplitSchema
    except ImportError:  # pragma: no cover — a dependency of biofm
        raise StoreError("reading MEDS needs the `meds` package (pip install 'meds>=0.4,<0.5')") from None
    return {"data": DataSchema, "labels": LabelSchema, "splits": SubjectSplitSchema, "codes": CodeMetadataSchema}


def _family(dtype: pa.DataType) -> str:
    if pa.types.is_boolean(dtype):
        return "bool"
    if pa.types.is_integer(dtype):
        return "int"
    if pa.types.is_floating(dtype):
        return "float"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return "string"
    if pa.types.is_dictionary(dtype):
        return _family(dtype.value_type)
    if pa.types.is_timestamp(dtype) or pa.types.is_date(dtype):
        return "time"
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return f"list<{_family(dtype.value_type)}>"
    return str(dtype)


# (MEDS kind, kind found) read without loss of meaning: widths, units, 0/1 integers as booleans, integers as
# floats (a numeric_value written as int64)
COMPATIBLE = {("int", "bool"), ("bool", "int"), ("float", "int")}


def check_meds_schema(path: str, schema: pa.Schema, kind: str, notes: dict[str, int], cast_types: bool = False):
    """`schema` (a file's arrow schema) against MEDS's schema of `kind` (data, labels, splits, codes): a
    StoreError on a mismatch (see the module's doc); compatible type differences go to `notes`."""
    meds_schema = _schemas()[kind]
    what = f"MEDS {WHAT[kind]}"
    columns = list(schema.names)
    missing = [c for c in meds_schema.required_columns() if c not in columns]
    if kind == "data" and "numeric_value" not in columns and "value" in columns:
        columns = ["numeric_value" if c == "value" else c for c in columns]  # an older export's name
    if missing:
        raise StoreError(
            f"{path}: a {what} needs the column '{missing[0]}' (MEDS {MEDS_VERSION}: "
            f"{', '.join(meds_schema.required_columns())}); its columns are {columns}"
        )
    if not meds_schema.allow_extra_columns:
        extra = [c for c in columns if c not in meds_schema.columns()]
        if extra:
            raise StoreError(
                f"{path}: a {what} has only the columns {meds_schema.columns()} (MEDS {MEDS_VERSION}); "
                f"'{extra[0]}' is none of them: remove it"
            )
    for name in meds_schema.columns():
        field = name if name in schema.names else ("value" if name == "numeric_value" else None)
        if field is None or field not in schema.names:
            continue
        want, got = meds_schema.column_type(name), schema.field(field).type
        if want == got:
            continue
        if _family(want) == _family(got) or (_family(want), _family(got)) in COMPATIBLE:
            notes[f"MEDS columns read as their MEDS type ({WHAT[kind]} {name}: {got} → {want})"] = 1
            continue
        if cast_types:
            notes[f"MEDS columns of another type cast (--cast-types; {WHAT[kind]} {name}: {got} → {want})"] = 1
            continue
        raise StoreError(
            f"{path}: column '{field}' is {got}; a {what} has {want} there (MEDS {MEDS_VERSION}). Write it with "
            f"that type, or pass --cast-types to convert it (values that do not convert are counted and dropped)"
        )


def check_parquet_schema(path: str, kind: str, notes: dict[str, int], cast_types: bool = False) -> None:
    import pyarrow.parquet as pq

    check_meds_schema(path, pq.read_schema(path), kind, notes, cast_types)


def check_dataset_json(path: Path, notes: dict[str, int]) -> None:
    """`metadata/dataset.json` against MEDS's dataset metadata schema; its `meds_version` noted."""
    if not path.exists():
        return
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{path}: not valid JSON ({err}); MEDS's dataset.json is a JSON object") from None
    from meds import DatasetMetadataSchema

    try:
        DatasetMetadataSchema.validate(metadata)
    except Exception:  # noqa: BLE001 — flexible_schema says only "validation failed": name the field ourselves
        fields = DatasetMetadataSchema.schema().get("properties", {})
        bad = (
            [k for k, v in metadata.items() if not _json_ok(v, fields.get(k, {}))] if isinstance(metadata, dict) else []
        )
        where = f"field '{bad[0]}' ({metadata[bad[0]]!r:.40})" if bad else "its fields"
        raise StoreError(
            f"{path}: MEDS's dataset.json (MEDS {MEDS_VERSION}) does not accept {where}: names and versions are "
            "strings, created_at an ISO 8601 time, the *_columns fields lists of strings"
        ) from None
    version = str(metadata.get("meds_version") or "unstated")
    if not version.startswith(MEDS_VERSION):
        notes[f"MEDS datasets written as MEDS {version}, read with the MEDS {MEDS_VERSION} schemas"] = 1


def _json_ok(value, spec: dict) -> bool:
    kind = spec.get("type")
    if kind == "string":
        return isinstance(value, str)
    if kind == "array":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return True
