"""Property-based tests (hypothesis) of every raw parser: whatever the input, the parser returns rows that
hold up or raises its own typed error with a readable message — never a crash, never a silently wrong row."""

import datetime as dt
import io

import numpy as np
import pandas as pd
import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from biofm.platform.store import StoreError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SMILES_ALPHABET = "CNOSPFIHBrcnos()[]=#@+-/\\.%0123456789Cl"


@SETTINGS
@given(
    st.lists(
        st.one_of(st.none(), st.text(alphabet=SMILES_ALPHABET, max_size=30), st.text(max_size=12)),
        min_size=1,
        max_size=8,
    )
)
def test_smiles_become_graphs_or_reasons(smiles):
    from biofm.modalities.molecule import Molecule
    from biofm.modalities.molecule.featurise import ATOM_CARDINALITIES

    arrays, reasons = Molecule(fragments="keep").featurise_with_reasons(smiles)
    assert len(reasons) == len(smiles)
    atoms = arrays["molecule/atoms"]
    counts = atoms.lengths()
    for s, reason, n, present in zip(smiles, reasons, counts, arrays["molecule/present"]):
        if s is None:
            assert reason is None and n == 0 and not present
        elif reason is not None:
            assert isinstance(reason, str) and reason and n == 0 and not present
        else:
            assert n > 0 and present
    if len(atoms.values):
        assert (atoms.values.min(axis=0) >= 0).all()
        assert (atoms.values.max(axis=0) < np.array(ATOM_CARDINALITIES)).all()
    edges = arrays["molecule/edges"]
    for i in range(len(smiles)):
        e = edges.values[edges.offsets[i] : edges.offsets[i + 1]]
        assert e.size == 0 or (e.min() >= 0 and e.max() < counts[i])


_times = st.one_of(st.none(), st.datetimes(min_value=dt.datetime(1990, 1, 1), max_value=dt.datetime(2030, 1, 1)))
_meds_rows = st.lists(
    st.tuples(
        st.integers(0, 4),
        _times,
        st.one_of(st.none(), st.text(max_size=15)),
        st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    ),
    min_size=0,
    max_size=25,
)


@SETTINGS
@given(_meds_rows, st.lists(st.tuples(st.integers(0, 5), _times), min_size=1, max_size=6))
def test_meds_rows_become_event_sequences_or_a_store_error(rows, predictions):
    from biofm.datasets.ehr import meds_sequences

    events = pl.DataFrame(
        {
            "subject_id": [r[0] for r in rows],
            "time": [r[1] for r in rows],
            "code": [r[2] for r in rows],
            "numeric_value": [r[3] for r in rows],
        },
        schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float64},
    )
    times = pl.DataFrame(
        {"subject_id": [p[0] for p in predictions], "prediction_time": [p[1] for p in predictions]},
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")},
    )
    try:
        out, sequences = meds_sequences(events, times, max_events=16)
    except StoreError as err:
        assert str(err)
        return
    assert len(out) == len(times) == len(sequences)
    for (subject, when), sequence in zip(predictions, sequences):
        if sequence is None:
            continue
        hours = np.asarray(sequence.times, dtype=float)
        assert len(hours) <= 16 and len(sequence.tables) == len(hours) == len(sequence.fields)
        assert np.all(np.isnan(hours) | (hours <= 0))  # nothing after the prediction time
        own = [r for r in rows if r[0] == subject and r[2] is not None]
        assert own, "a sequence for a subject without events"


_yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(
            st.sampled_from(
                [
                    "stays",
                    "tables",
                    "table",
                    "id",
                    "subject",
                    "start",
                    "time",
                    "link",
                    "name",
                    "files",
                    "observation_hours",
                    "max_events",
                    "tasks",
                ]
            ),
            children,
            max_size=5,
        ),
    ),
    max_leaves=12,
)


@SETTINGS
@given(st.one_of(_yaml_values, st.text(max_size=60)))
def test_an_ehr_schema_yaml_loads_or_gives_a_store_error(tmp_path_factory, document):
    import yaml

    from biofm.datasets.ehr.schema import Schema

    path = tmp_path_factory.mktemp("schema") / "schema.yaml"
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    try:
        schema = Schema(str(path))
    except StoreError as err:
        assert str(path) in str(err)
        return
    assert isinstance(schema.stays, dict) and isinstance(schema.tables, list)
    assert all(isinstance(t, dict) and {"table", "time", "link"} <= set(t) for t in schema.tables)
    assert {"table", "id", "subject", "start"} <= set(schema.stays)


_cells = st.one_of(st.just(""), st.text(alphabet='abc01 ,"\n;.-', max_size=6))


@SETTINGS
@given(
    st.lists(
        st.sampled_from(["slide_path", "sample_id", "subject_id", "label", "grade", "x"]),
        min_size=1,
        max_size=5,
        unique=True,
    ),
    st.lists(st.lists(_cells, min_size=5, max_size=5), max_size=6),
    st.booleans(),
)
def test_a_slide_manifest_reads_or_gives_a_store_error(tmp_path_factory, columns, rows, raw_bytes):
    from biofm.datasets.manifest import label_tasks, read_manifest

    path = tmp_path_factory.mktemp("manifest") / "slides.csv"
    if raw_bytes:  # not even CSV: arbitrary bytes, a broken encoding
        path.write_bytes(b"\xff\xfe\x00" + "".join(",".join(r) for r in rows).encode())
    else:
        frame = pd.DataFrame([r[: len(columns)] for r in rows], columns=columns)
        buffer = io.StringIO()
        frame.to_csv(buffer, index=False)
        path.write_text(buffer.getvalue())
    try:
        manifest = read_manifest(str(path))
        tasks, labels = label_tasks(manifest, [c for c in ("label", "grade") if c in manifest.columns], str(path))
    except StoreError as err:
        assert str(path) in str(err)
        return
    assert manifest["sample_id"].notna().all() and manifest["sample_id"].is_unique
    assert manifest["subject_id"].notna().all()
    for task, values in labels.items():
        assert len(values) == len(manifest) and values.dtype == np.float32


_arrays = st.one_of(
    st.builds(
        lambda shape, fill: np.full(shape, fill, dtype=np.float32),
        st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple),
        st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32)),
    ),
    st.builds(
        lambda shape: np.zeros(shape, dtype=np.uint8), st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)
    ),
    st.just(np.array(["text"])),
)


@SETTINGS
@given(
    st.dictionaries(st.sampled_from(["oct_bscans", "rnflt", "glaucoma", "volume", "age", "x"]), _arrays, max_size=4),
    st.booleans(),
)
def test_an_oct_npz_reads_or_gives_an_oct_error(tmp_path_factory, contents, corrupt):
    from biofm.modalities.oct.readers import OctError, read_oct

    path = tmp_path_factory.mktemp("oct") / "eye.npz"
    np.savez(path, **contents)
    if corrupt:
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    try:
        record = read_oct(str(path))
    except OctError as err:
        assert str(err)
        return
    assert record.volume is not None or record.enface is not None
    if record.volume is not None:
        assert record.volume.ndim == 3 and min(record.volume.shape) >= 2
        assert record.volume.dtype.kind != "f" or np.isfinite(record.volume).all()
    if record.enface is not None:
        assert record.enface.ndim == 2 and np.isfinite(record.enface).all()


_missing = st.sampled_from(
    sorted(__import__("biofm.platform.tables", fromlist=["MISSING"]).MISSING) + [" NA ", "nan ", " "]
)
_label_cells = st.one_of(
    _missing,
    st.sampled_from(["0", "1"]),
    st.floats(-1e3, 1e3, allow_nan=False).map(lambda x: f"{x:.3f}"),
    st.text(alphabet='abcé,"; ', min_size=1, max_size=5),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(_label_cells, _label_cells), max_size=8),
    st.sampled_from(["utf-8", "utf-8", "utf-8", "latin-1", "cp1252", "utf-16"]),
    st.booleans(),
    st.booleans(),
)
def test_a_label_table_reads_every_missing_spelling_as_missing_or_gives_one_store_error(
    tmp_path_factory, rows, encoding, packed, cut
):
    """Any table a user may save (any encoding, gzip or not, cut short or not, every missing-value spelling):
    read with the default UTF-8, it either gives labels where exactly the missing spellings are NaN, or one
    StoreError line naming the file."""
    import gzip

    from biofm.datasets.manifest import label_tasks
    from biofm.platform.tables import MISSING, read_table

    frame = pd.DataFrame(
        {"sample_id": [f"s{i}" for i in range(len(rows))], "y": [r[0] for r in rows], "z": [r[1] for r in rows]}
    )
    data = frame.to_csv(index=False).encode(encoding, errors="replace")
    path = tmp_path_factory.mktemp("labels") / ("labels.csv.gz" if packed else "labels.csv")
    if packed:
        data = gzip.compress(data)
        data = data[: len(data) * 2 // 3] if cut else data
    path.write_bytes(data)
    try:
        table = read_table(str(path), "label table")
        tasks, labels = label_tasks(table, ["y", "z"], str(path))
    except StoreError as err:
        assert str(err).startswith(str(path)) and "\n" not in str(err), str(err)
        return
    assert len(table) == len(rows) and not (packed and cut)
    for j, column in enumerate(("y", "z")):
        for i, row in enumerate(rows):
            assert bool(np.isnan(labels[column][i])) == (row[j].strip() in MISSING), (column, row[j])
