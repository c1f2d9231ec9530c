"""EHR as hierarchical text: DPE, MEDS and raw tables → stores, MIMIC-IV ICU tasks, fits, MEDS predictions,
pooled multi-source training, and bad input counted with its reason."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from biofm.datasets.ehr import meds_predictions, prepare_ehr_tables, prepare_meds
from biofm.modalities.ehr import EHR, EventSequence
from biofm.modalities.ehr.tokenizer import digit_places
from biofm.platform.cli import main
from biofm.platform.lightning import BiofmDataModule, ConfigError
from biofm.platform.store import StoreError
from biofm.recipes.runs import fit_and_test
from biofm.testing import SHARED_DATA

EHR_DATA = SHARED_DATA / "ehr"
MIMIC = EHR_DATA / "mimic-iv-demo-2.2"
MEDS_DIR = EHR_DATA / "mimic-iv-demo-meds-0.0.1"
MEDS_ALL = EHR_DATA / "mimic-iv-demo-meds-all-subjects.parquet"
ACES = EHR_DATA / "aces_icu_mortality_first_24h_labels.parquet"
SCHEMA = Path(__file__).resolve().parents[1] / "configs" / "ehr" / "mimic-iv.yaml"
CONFIG = SCHEMA.parent / "train.yaml"
needs_ehr_data = pytest.mark.skipif(not EHR_DATA.exists(), reason=f"shared EHR data not found at {EHR_DATA}")
TINY = {"d_model": 32, "depth": 1, "heads": 2, "latents": 4, "encoders": {"ehr": {"layers": 1, "heads": 2}}}
MIMIC_TASKS = [
    "mortality",
    "long_term_mortality",
    "los_3day",
    "los_7day",
    "readmission",
    "final_acuity",
    "imminent_discharge",
    "creatinine",
    "bilirubin",
    "platelets",
    "wbc",
]


# ------------------------------------------------------------------------------------------- tokens
def test_numbers_become_digits_with_their_place():
    assert digit_places("305") == [8, 7, 6]  # hundreds, tens, ones
    assert digit_places("12.05") == [7, 6, 5, 4, 3]  # tens, ones, point, tenths, hundredths
    modality = EHR(vocab_size=200, max_event_tokens=32)
    modality.fit(["labevents", "glucose", "mg/dL", "value"])
    ids, types, places = modality.encode_event("labevents", [("glucose", "mg/dL"), ("value", "140.25")])
    digits = [p for p in places if p]
    assert digits == [8, 7, 6, 5, 4, 3]
    assert types[0] == 4 and set(types[1:]) <= {1, 2, 3} and types[-1] == 3
    # two values that differ only in one digit differ only in that token
    other, _, _ = modality.encode_event("labevents", [("glucose", "mg/dL"), ("value", "150.25")])
    assert sum(a != b for a, b in zip(ids, other)) == 1


def test_an_event_over_the_token_cap_drops_whole_fields_and_samples_keep_their_latest_events():
    modality = EHR(vocab_size=200, max_event_tokens=12, max_events=3)
    modality.fit(["t", "a", "b", "c", "value"])
    ids, types, _ = modality.encode_event("t", [("a", "1"), ("b", "22"), ("c", "333333")])
    assert len(ids) <= 12 and types.count(2) == 2  # c and its value did not fit: left out whole
    seq = EventSequence(np.array([-5, -4, -3, -2, -1], np.float32), ["t"] * 5, [[("a", str(i))] for i in range(5)])
    arrays = modality.featurise([seq, None])
    np.testing.assert_array_equal(arrays["ehr/time"].row(0), [-3, -2, -1])
    assert arrays["ehr/present"].tolist() == [True, False]


def test_the_encoder_reads_event_times_and_ignores_padding_events():
    import torch

    modality = EHR(vocab_size=200, max_event_tokens=16)
    modality.fit(["labevents", "glucose", "value"])
    fields = [[("glucose", "5.5")], [("glucose", "7.0")]]
    recent = EventSequence(np.array([-2.0, -1.0], np.float32), ["labevents"] * 2, fields)
    old = EventSequence(np.array([-200.0, -100.0], np.float32), ["labevents"] * 2, fields)
    short = EventSequence(np.array([-1.0], np.float32), ["labevents"], fields[1:])
    batch = modality.collate({k.split("/", 1)[1]: v for k, v in modality.featurise([recent, old, short]).items()})
    torch.manual_seed(0)
    encoder = modality.encoder(16, layers=1, heads=2).eval()
    with torch.no_grad():
        x, mask = encoder(batch)
        alone, _ = encoder(modality.collate({k.split("/", 1)[1]: v for k, v in modality.featurise([short]).items()}))
    assert mask.tolist() == [[True, True], [True, True], [True, False]]
    assert not torch.allclose(x[0], x[1], atol=1e-4)  # same events, other times → other tokens
    torch.testing.assert_close(x[2, :1], alone[0, :1])  # a padding event changes nothing


# ------------------------------------------------------------------------------------- raw MIMIC-IV
@pytest.fixture(scope="module")
def mimic_store(tmp_path_factory):
    if not EHR_DATA.exists():
        pytest.skip(f"shared EHR data not found at {EHR_DATA}")
    out = str(tmp_path_factory.mktemp("ehr") / "mimic.zarr")
    store, report = prepare_ehr_tables(str(MIMIC), str(SCHEMA), out)
    return store, report


@needs_ehr_data
def test_the_raw_mimic_demo_prepares_with_genhpf_cohort_and_tasks(mimic_store):
    store, report = mimic_store
    assert store.n == 100 and list(store.tasks) == MIMIC_TASKS
    assert store.tasks["final_acuity"]["classes"][:2] == ["Home", "IN_HOSPITAL_MORTALITY"]
    los3 = np.asarray(store.root["labels/los_3day"][...])
    los7 = np.asarray(store.root["labels/los_7day"][...])
    assert np.all(los3 >= los7) and 0 < los7.sum() < los3.sum() < 100  # LOS > 7 d implies LOS > 3 d
    assert np.isnan(np.asarray(store.root["labels/bilirubin"][...])).sum() > 50  # only stays with a lab value
    # events come from the observation window only: 12 h before the prediction time at most
    rows = store.read_rows(0, store.n, ["ehr/time", "ehr/tokens"])
    assert rows["ehr/time"].values.min() >= -12.0 and rows["ehr/time"].values.max() <= 0.0
    assert report.counts["stays that change care unit (GenHPF leaves them out)"] == 11
    assert report.counts["labevents: events in an observation window"] > 1000


@needs_ehr_data
def test_raw_mimic_demo_to_a_short_fit_with_test_metrics_for_every_task(mimic_store, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    store, _ = mimic_store
    metrics = fit_and_test([store.url], tmp_path / "run", epochs=3, batch_size=16, model=TINY)
    test_labels = store.index("split") == "test"
    for task in MIMIC_TASKS:
        if np.isfinite(np.asarray(store.root[f"labels/{task}"][...])[test_labels]).any():
            reported = [k for k in metrics if k.startswith(task + "/")]
            assert reported, f"no test metric for {task}"
    assert np.isfinite(metrics["loss"])


# ----------------------------------------------------------------------------------------------- MEDS
@needs_ehr_data
def test_meds_demo_and_aces_labels_to_meds_predictions_one_row_per_label(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = str(tmp_path / "meds.zarr")
    store, report = prepare_meds(
        str(MEDS_ALL),
        str(ACES),
        out,
        task="icu_mortality",
        codes=str(MEDS_DIR / "metadata" / "codes.parquet"),
        splits=str(MEDS_DIR / "metadata" / "subject_splits.parquet"),
        max_events=64,
    )
    labels = pl.read_parquet(ACES)
    assert store.n == len(labels) == 74
    assert report.counts["events whose code is not in codes.parquet (raw code used)"] > 0
    split_file = pl.read_parquet(MEDS_DIR / "metadata" / "subject_splits.parquet")
    held_out = set(split_file.filter(pl.col("split") == "held_out")["subject_id"].cast(pl.String).to_list())
    test_subjects = set(store.index("subject_id")[store.index("split") == "test"])
    assert test_subjects and test_subjects <= held_out
    # as-of join: no event after its prediction time
    assert store.read_rows(0, store.n, ["ehr/time"])["ehr/time"].values.max() <= 0.0

    run = tmp_path / "run"
    from biofm.platform.lightning import BiofmDataModule as DM

    original = DM.__init__

    def predict_everything(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "predict_split": "all"})

    monkeypatch.setattr(DM, "__init__", predict_everything)
    fit_and_test([store.url], run, epochs=1, batch_size=16, model=TINY, predict=True)
    exported = tmp_path / "meds_predictions.parquet"
    main(["export", "meds", "--predictions", str(run / "predictions.parquet"), "--store", out, "--out", str(exported)])
    frame = pl.read_parquet(exported)
    assert frame.columns == [
        "subject_id",
        "prediction_time",
        "boolean_value",
        "predicted_boolean_value",
        "predicted_boolean_probability",
    ]
    assert len(frame) == len(labels)
    expected = labels.select("subject_id", "prediction_time", "boolean_value").sort(["subject_id", "prediction_time"])
    assert frame.select("subject_id", "prediction_time", "boolean_value").equals(expected)
    assert frame["predicted_boolean_probability"].is_between(0, 1).all()
    # the SDK from the raw MEDS events gives the same MEDS predictions
    import biofm
    from biofm.datasets.ehr import predict_meds

    sdk = predict_meds(
        biofm.load(run),
        str(MEDS_ALL),
        labels.select("subject_id", "prediction_time"),
        codes=str(MEDS_DIR / "metadata" / "codes.parquet"),
    )
    assert len(sdk) == len(labels) and sdk["error"].isna().all()
    ours = (
        pl.from_pandas(sdk[["subject_id", "prediction_time", "predicted_boolean_probability"]])
        .with_columns(pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us")))
        .sort(["subject_id", "prediction_time"])
    )
    np.testing.assert_allclose(
        ours["predicted_boolean_probability"].to_numpy(),
        frame["predicted_boolean_probability"].to_numpy(),
        rtol=1e-4,
        atol=1e-5,
    )
    # and `biofm predict-meds` writes the MEDS prediction format for the label file's rows
    main(
        [
            "predict-meds",
            "--checkpoint",
            str(run),
            "--manifest",
            str(ACES),
            "--meds",
            str(MEDS_ALL),
            "--codes",
            str(MEDS_DIR / "metadata" / "codes.parquet"),
            "--out",
            str(tmp_path / "cohort"),
        ]
    )
    cohort = pl.read_parquet(tmp_path / "cohort" / "predictions_meds.parquet")
    assert cohort.columns == [
        "subject_id",
        "prediction_time",
        "predicted_boolean_value",
        "predicted_boolean_probability",
    ] and len(cohort) == len(labels)
    # row by row: each (subject, time) gets the probability `biofm predict` gave that label row
    paired = cohort.with_columns(
        pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us"))
    ).join(frame, on=["subject_id", "prediction_time"], how="inner", suffix="_predict")
    assert len(paired) == len(labels)
    np.testing.assert_allclose(
        paired["predicted_boolean_probability"].to_numpy(),
        paired["predicted_boolean_probability_predict"].to_numpy(),
        rtol=1e-4,
        atol=1e-5,
    )


@needs_ehr_data
def test_the_meds_folder_reports_label_rows_whose_subject_has_no_data(tmp_path):
    store, report = prepare_meds(str(MEDS_DIR), str(ACES), str(tmp_path / "m.zarr"))
    assert store.n == 14  # the folder holds the held_out and tuning shards only (20 subjects)
    assert report.counts["samples whose subject has no events in the data (dropped)"] == 60
    rejects = pl.read_csv(str(tmp_path / "m.zarr") + ".rejects.csv")
    assert len(rejects) == 60 and set(rejects["reason"]) == {"subject has no events in the data"}


# ------------------------------------------------------------------------------------ multi-source
@needs_ehr_data
def test_raw_tables_and_meds_train_together_as_two_sources(mimic_store, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    mimic, _ = mimic_store
    meds_kwargs = dict(
        task="icu_mortality",
        codes=str(MEDS_DIR / "metadata" / "codes.parquet"),
        splits=str(MEDS_DIR / "metadata" / "subject_splits.parquet"),
    )
    alone = prepare_meds(str(MEDS_ALL), str(ACES), str(tmp_path / "alone.zarr"), **meds_kwargs)[0]
    with pytest.raises(ConfigError, match="different settings"):
        BiofmDataModule([mimic.url, alone.url])
    meds = prepare_meds(str(MEDS_ALL), str(ACES), str(tmp_path / "meds.zarr"), tokenizer_from=mimic.url, **meds_kwargs)[
        0
    ]
    data = BiofmDataModule([mimic.url, meds.url])
    assert set(data.schema["tasks"]) == set(MIMIC_TASKS) | {"icu_mortality"}
    # through the CLI: fit on both sources, then predict on the MEDS store alone with that checkpoint
    run = tmp_path / "run"
    tiny = [
        "--model.d_model",
        "32",
        "--model.depth",
        "1",
        "--model.heads",
        "2",
        "--model.latents",
        "4",
        "--model.encoders",
        '{"ehr": {"layers": 1, "heads": 2}}',
        "--trainer.default_root_dir",
        str(run),
        "--trainer.logger",
        "false",
    ]
    main(["fit", "-c", str(CONFIG), "--data.stores", f"[{mimic.url}, {meds.url}]", "--trainer.max_epochs", "2", *tiny])
    last = run / "checkpoints" / "last.ckpt"
    main(["test", "-c", str(CONFIG), "--data.stores", f"[{mimic.url}, {meds.url}]", "--ckpt_path", str(last), *tiny])
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert any(k.startswith("icu_mortality/") for k in metrics) and any(k.startswith("los_3day/") for k in metrics)
    main(
        [
            "predict",
            "-c",
            str(CONFIG),
            "--data.stores",
            f"[{meds.url}]",
            "--data.predict_split",
            "all",
            "--ckpt_path",
            str(last),
            *tiny,
        ]
    )
    predictions = pl.read_parquet(run / "predictions.parquet")
    assert len(predictions) == meds.n and {"icu_mortality/prob/1", "los_3day/prob/1"} <= set(predictions.columns)


# -------------------------------------------------------------------------------------- bad input
def _tiny_database(root: Path) -> None:
    (root / "db").mkdir(parents=True)
    (root / "db" / "stays.csv").write_text(
        "stay,patient,start\n"
        "s1,p1,2100-01-01 00:00:00\n"
        "s2,p2,2100-01-01 00:00:00\n"
        "s3,p3,2100-01-01 00:00:00\n"  # s3 has no event in its window
        "s4,,2100-01-01 00:00:00\n"  # no subject
        "s5,p5,soon\n"
    )  # unparseable start
    (root / "db" / "events.csv").write_text(
        "stay,time,item,amount,note\n"
        "s1,2100-01-01 01:00:00,1,5.5,ok\n"
        "s1,2100-01-01 01:00:00,1,5.5,ok\n"  # duplicate row
        "s1,,1,2.0,ok\n"  # no time
        "s1,yesterday,1,2.0,ok\n"  # unparseable time
        "s1,2100-01-01 02:00:00,99,7.0,ok\n"  # unknown code
        "s2,2100-01-01 03:00:00,2,abc,ok\n"  # unparseable number
        "s2,2100-01-02 03:00:00,2,1.0,late\n"  # after the window
        "s3,2099-12-31 03:00:00,2,1.0,early\n"
    )  # before the window
    (root / "db" / "items.csv").write_text("item,name\n1,glucose\n2,heparin\n")
    (root / "labels.csv").write_text("stay,outcome,grade\ns1,1,low\ns2,0,high\ns3,1,low\n")
    (root / "schema.yaml").write_text(
        "name: tiny\nfiles: '{name}.csv'\n"
        "stays: {table: stays, id: stay, subject: patient, start: start}\n"
        "observation_hours: 12\n"
        "tables:\n"
        "  - {table: events, time: time, link: stay, numeric: [amount],\n"
        "     dictionaries: [{table: items, key: item, name: name}]}\n"
    )


def test_bad_rows_of_raw_tables_are_counted_with_their_reason_and_the_rest_is_prepared(tmp_path):
    _tiny_database(tmp_path)
    out = str(tmp_path / "tiny.zarr")
    store, report = prepare_ehr_tables(
        str(tmp_path / "db"), str(tmp_path / "schema.yaml"), out, labels=str(tmp_path / "labels.csv"), shard_subjects=1
    )
    counts = report.counts
    assert counts["events: rows with a missing or unparseable time (dropped)"] == 2
    assert counts["events: duplicate rows (dropped)"] == 1
    assert counts["events: item codes not in items (raw code used)"] == 1
    assert counts["events: unparseable numbers in amount (left out)"] == 1
    assert counts["stays with no event in the observation window (dropped)"] == 1
    assert counts["stays without a stay or subject id (dropped)"] == 1
    assert counts["stays with a missing or unparseable start time (dropped)"] == 1
    assert store.n == 2 and sorted(store.index("sample_id")) == ["s1", "s2"]
    assert store.tasks["outcome"]["kind"] == "binary" and store.tasks["grade"]["classes"] == ["high", "low"]
    saved = json.loads(Path(out + ".report.json").read_text())
    assert saved["events: duplicate rows (dropped)"] == 1
    assert pl.read_csv(out + ".rejects.csv")["sample_id"].to_list() == ["s3"]
    # s1 keeps 2 events (glucose, and the raw code 99); s2 keeps 1, without its unparseable amount
    assert store.read_rows(0, store.n, ["ehr/time"])["ehr/time"].lengths().tolist() in ([2, 1], [1, 2])


@pytest.mark.parametrize(
    "change, message",
    [
        (("table: events", "table: visits"), r"table 'visits' is not in"),
        (("time: time", "time: charted"), r"table 'events' .* has no column \['charted'\]"),
        (("numeric: [amount]", "numeric: [dose]"), r"has no column \['dose'\]"),
    ],
)
def test_a_schema_naming_a_missing_table_or_column_stops_with_one_clear_error(tmp_path, change, message):
    _tiny_database(tmp_path)
    schema = tmp_path / "schema.yaml"
    schema.write_text(schema.read_text().replace(*change))
    with pytest.raises(StoreError, match=message):
        prepare_ehr_tables(
            str(tmp_path / "db"), str(schema), str(tmp_path / "x.zarr"), labels=str(tmp_path / "labels.csv")
        )
    assert not (tmp_path / "x.zarr").exists()


def test_bad_meds_rows_are_counted_and_events_after_the_prediction_time_are_never_used(tmp_path):
    data = tmp_path / "meds" / "data" / "train"
    data.mkdir(parents=True)
    pl.DataFrame(
        {
            "subject_id": [1, 1, 1, 1, 1, 1, 2, 3],
            "time": [
                None,
                "2100-01-01 00:00:00",
                "2100-01-01 00:00:00",
                "not a time",
                "2100-01-01 05:00:00",
                "2100-01-03 00:00:00",
                "2100-01-01 00:00:00",
                "2100-02-01 00:00:00",
            ],
            "code": ["GENDER//F", "LAB//1", "LAB//1", "LAB//1", "NEW//CODE", "LAB//FUTURE", "LAB//1", "LAB//1"],
            "numeric_value": [None, "1.5", "1.5", "2", "oops", "3", "4", "5"],
            "hadm_id": [None, 7, 7, 7, 7, 7, 8, 9],
        }
    ).write_parquet(data / "0.parquet")
    (tmp_path / "meds" / "metadata").mkdir()
    pl.DataFrame(
        {"code": ["LAB//1", "LAB//FUTURE", "GENDER//F"], "description": ["glucose", None, None]}
    ).write_parquet(tmp_path / "meds" / "metadata" / "codes.parquet")
    import datetime as dt

    pl.DataFrame(
        {
            "subject_id": [1, 2, 3],
            "prediction_time": [dt.datetime(2100, 1, 2)] * 3,
            "boolean_value": [True, False, True],
        }
    ).write_parquet(tmp_path / "labels.parquet")
    out = str(tmp_path / "m.zarr")
    # its times and numbers are text, not MEDS's types: refused, naming the file and column, unless cast
    with pytest.raises(StoreError, match=r"0\.parquet: column 'time' is large_string; a MEDS data shard has timestamp"):
        prepare_meds(str(tmp_path / "meds"), str(tmp_path / "labels.parquet"), out)
    store, report = prepare_meds(str(tmp_path / "meds"), str(tmp_path / "labels.parquet"), out, cast_types=True)
    counts = report.counts
    assert counts["events with an unparseable time (dropped)"] == 1
    assert counts["duplicate event rows (dropped)"] == 1
    assert counts["unparseable numeric_value (left out)"] == 1
    assert counts["events whose code is not in codes.parquet (raw code used)"] == 1
    assert counts["samples with no event at or before their prediction_time (dropped)"] == 1  # subject 3
    assert store.n == 2
    rows = store.read_rows(0, store.n, ["ehr/time"])["ehr/time"]
    lengths = dict(zip(store.index("subject_id"), rows.lengths().tolist()))
    # subject 1: the static fact, LAB//1 at 00:00 (once) and NEW//CODE at 05:00; never LAB//FUTURE
    assert lengths == {"1": 3, "2": 1}
    assert np.nanmax(rows.values) <= 0.0
    assert pl.read_csv(out + ".rejects.csv")["reason"].to_list() == ["no event at or before its prediction_time"]


def test_meds_predictions_need_the_task_named_when_the_store_has_no_single_binary_one(tmp_path):
    _tiny_database(tmp_path)
    (tmp_path / "scores.csv").write_text("stay,score\ns1,1.5\ns2,2.5\ns3,0.5\n")
    store, _ = prepare_ehr_tables(
        str(tmp_path / "db"),
        str(tmp_path / "schema.yaml"),
        str(tmp_path / "r.zarr"),
        labels=str(tmp_path / "scores.csv"),
    )
    with pytest.raises(StoreError, match=r"name the task with --task; binary tasks are \[\]"):
        meds_predictions(str(tmp_path / "p.parquet"), store.url)


# ------------------------------------------------------------------------------- offset-timed databases
OFFSET_SCHEMA = SCHEMA.parent / "offset-icu.yaml"


def _events_in_window(db: Path, stay: int) -> int:
    """Counted from the CSVs, apart from biofm: minutes 0…720 from the admission (vitals: hours 0…12)."""
    import pandas as pd

    count = 0
    for table, column, per_hour in [
        ("lab", "labresultoffset", 60),
        ("medication", "drugstartoffset", 60),
        ("infusiondrug", "infusionoffset", 60),
        ("vitals", "chart_hours", 1),
    ]:
        frame = pd.read_csv(db / f"{table}.csv")
        offsets = frame.loc[frame["patientunitstayid"] == stay, column]
        count += int(((offsets >= 0) & (offsets <= 12 * per_hour)).sum())
    return count


def test_an_offset_timed_database_prepares_fits_and_tests(tmp_path, monkeypatch):
    from biofm.datasets.ehr.offsets import write_offset_database

    monkeypatch.setenv("WANDB_MODE", "disabled")
    db = write_offset_database(tmp_path / "db", n_stays=80, seed=1)
    out = str(tmp_path / "icu.zarr")
    store, report = prepare_ehr_tables(str(db), str(OFFSET_SCHEMA), out, labels=str(db / "labels.csv"))
    assert store.n == 80 and set(store.tasks) == {"mortality", "long_stay"}
    # rows before the admission (negative offsets) and after the window are counted and not used
    assert report.counts["lab: rows before the stay's start or after its prediction time (not used)"] > 0
    ids = store.index("sample_id")
    rows = store.read_rows(0, store.n, ["ehr/time"])["ehr/time"]
    lengths = rows.lengths()
    for i in (0, 7, 41):
        assert lengths[i] == _events_in_window(db, int(ids[i])), ids[i]
    hours = rows.values
    assert hours.min() >= -12.0 - 1e-4 and hours.max() <= 1e-4  # hours before the prediction time (12 h)
    assert not (tmp_path / "icu.zarr.work").exists()
    metrics = fit_and_test([store.url], tmp_path / "run", epochs=2, batch_size=16, model=TINY)
    assert {"mortality/auroc", "long_stay/auroc"} <= set(metrics)


@pytest.mark.parametrize(
    "changes, where, fix",
    [
        # the stays count in minutes, the event tables say nothing: their offsets are read as date-times
        (
            [("time_unit: minutes ", "#"), ("  start: 0 ", "  time_unit: minutes\n  start: 0 #")],
            "table 'lab' column 'labresultoffset': 300 of the first 300 values do not parse as date-times",
            "say their unit with `time_unit: minutes`",
        ),
        # a text column named as a table's time
        (
            [("time_unit: hours ", "time_unit: hours\n    time: heartrate_text #")],
            None,
            None,
        ),
    ],
)
def test_time_columns_that_mostly_fail_to_parse_stop_before_any_table_is_streamed(tmp_path, changes, where, fix):
    from biofm.datasets.ehr.offsets import write_offset_database

    db = write_offset_database(tmp_path / "db", n_stays=20)
    if where is None:
        import pandas as pd

        vitals = pd.read_csv(db / "vitals.csv")
        vitals["heartrate_text"] = "pulse " + vitals["heartrate"].astype(str)
        vitals.to_csv(db / "vitals.csv", index=False)
        where, fix = "table 'vitals' column 'heartrate_text'", "expected numbers: offsets in hours"
    text = OFFSET_SCHEMA.read_text()
    for change in changes:
        assert change[0] in text
        text = text.replace(*change)
    schema = tmp_path / "schema.yaml"
    schema.write_text(text)
    out = tmp_path / "x.zarr"
    with pytest.raises(StoreError) as caught:
        prepare_ehr_tables(str(db), str(schema), str(out), labels=str(db / "labels.csv"))
    message = str(caught.value)
    assert where in message and fix in message and "e.g. '" in message, message
    assert not out.exists() and not (tmp_path / "x.zarr.work").exists()
    assert json.loads((tmp_path / "x.zarr.report.json").read_text())["stopped"] == message


def test_a_stays_start_of_offsets_opens_the_window_there(tmp_path):
    """`stays.start` as a column of offsets (the hospital admission, before the unit's): the window moves."""
    from biofm.datasets.ehr.offsets import write_offset_database

    db = write_offset_database(tmp_path / "db", n_stays=30)
    schema = tmp_path / "schema.yaml"
    schema.write_text(OFFSET_SCHEMA.read_text().replace("  start: 0 ", "  start: hospitaladmitoffset #"))
    store, report = prepare_ehr_tables(str(db), str(schema), str(tmp_path / "x.zarr"), labels=str(db / "labels.csv"))
    moved = report.counts["stays with no event in the observation window (dropped)"]
    assert 0 < store.n < 30 and store.n + moved == 30  # most hospital admissions are more than 12 h before


# ----------------------------------------------------------------------------- MEDS against its schema
def _valid_meds(root: Path) -> tuple[Path, Path]:
    """A small MEDS 0.4 folder (data, codes, splits, dataset.json) and a label file, all of MEDS's types."""
    import datetime as dt

    import pyarrow.parquet as pq

    (root / "meds" / "data").mkdir(parents=True)
    (root / "meds" / "metadata").mkdir()
    n = 12
    pq.write_table(
        pa.table(
            {
                "subject_id": pa.array([i // 3 for i in range(n)], pa.int64()),
                "time": pa.array([dt.datetime(2100, 1, 1, i) for i in range(n)], pa.timestamp("us")),
                "code": pa.array(["LAB//1", "LAB//2", "DRUG//A"] * (n // 3), pa.string()),
                "numeric_value": pa.array([float(i) for i in range(n)], pa.float32()),
            }
        ),
        root / "meds" / "data" / "0.parquet",
    )
    pq.write_table(
        pa.table({"code": ["LAB//1", "LAB//2"], "description": ["glucose", "sodium"]}),
        root / "meds" / "metadata" / "codes.parquet",
    )
    pq.write_table(
        pa.table({"subject_id": pa.array([0, 1, 2, 3], pa.int64()), "split": ["train", "train", "tuning", "held_out"]}),
        root / "meds" / "metadata" / "subject_splits.parquet",
    )
    (root / "meds" / "metadata" / "dataset.json").write_text('{"dataset_name": "tiny", "meds_version": "0.4.1"}')
    pq.write_table(
        pa.table(
            {
                "subject_id": pa.array([0, 1, 2, 3], pa.int64()),
                "prediction_time": pa.array([dt.datetime(2100, 1, 2)] * 4, pa.timestamp("us")),
                "boolean_value": [True, False, True, False],
            }
        ),
        root / "labels.parquet",
    )
    return root / "meds", root / "labels.parquet"


def _rewrite(path: Path, change) -> None:
    import pyarrow.parquet as pq

    pq.write_table(change(pq.read_table(path)), path)


@pytest.mark.parametrize(
    "file, change, message",
    [
        ("meds/data/0.parquet", lambda t: t.drop(["code"]), r"0\.parquet: a MEDS data shard needs the column 'code'"),
        (
            "meds/data/0.parquet",
            lambda t: t.set_column(0, "subject_id", t["subject_id"].cast("string")),
            r"0\.parquet: column 'subject_id' is string; a MEDS data shard has int64 there \(MEDS 0\.4\)",
        ),
        (
            "labels.parquet",
            lambda t: t.append_column("note", t["subject_id"].cast("string")),
            r"labels\.parquet: a MEDS label file has only the columns .*; 'note' is none of them",
        ),
        (
            "meds/metadata/subject_splits.parquet",
            lambda t: t.drop(["split"]),
            r"subject_splits\.parquet: a MEDS subject_splits file needs the column 'split'",
        ),
        (
            "meds/metadata/codes.parquet",
            lambda t: t.set_column(0, "code", pa.array(range(t.num_rows), pa.int32())),
            r"codes\.parquet: column 'code' is int32; a MEDS codes file has string there",
        ),
        (
            "meds/metadata/dataset.json",
            5,
            r"dataset\.json: MEDS's dataset.json \(MEDS 0\.4\) does not accept field 'meds_version'",
        ),
    ],
)
def test_meds_files_that_do_not_match_the_meds_schema_stop_naming_file_and_column(tmp_path, file, change, message):
    folder, labels = _valid_meds(tmp_path)
    if file.endswith(".json"):
        (tmp_path / file).write_text(f'{{"meds_version": {change}}}')
    else:
        _rewrite(tmp_path / file, change)
    with pytest.raises(StoreError, match=message):
        prepare_meds(str(folder), str(labels), str(tmp_path / "m.zarr"))
    assert not (tmp_path / "m.zarr").exists()


def test_meds_types_that_differ_only_in_width_are_read_and_noted(tmp_path):
    folder, labels = _valid_meds(tmp_path)
    store, report = prepare_meds(str(folder), str(labels), str(tmp_path / "a.zarr"))
    assert store.n == 4 and not [k for k in report.counts if k.startswith("MEDS")]  # a clean MEDS 0.4 folder
    _rewrite(
        folder / "data" / "0.parquet", lambda t: t.set_column(3, "numeric_value", t["numeric_value"].cast(pa.float64()))
    )
    _rewrite(labels, lambda t: t.set_column(1, "prediction_time", t["prediction_time"].cast(pa.timestamp("ns"))))
    (folder / "metadata" / "dataset.json").write_text('{"meds_version": "0.3.3"}')
    store, report = prepare_meds(str(folder), str(labels), str(tmp_path / "b.zarr"))
    assert store.n == 4
    notes = [k for k in report.counts if k.startswith("MEDS")]
    assert "MEDS columns read as their MEDS type (data shard numeric_value: double → float)" in notes
    assert "MEDS columns read as their MEDS type (label file prediction_time: timestamp[ns] → timestamp[us])" in notes
    assert "MEDS datasets written as MEDS 0.3.3, read with the MEDS 0.4 schemas" in notes


def test_meds_predictions_name_their_task_when_the_model_has_several_binary_ones():
    from biofm.datasets.ehr.predict import meds_task
    from biofm.platform.errors import ConfigError

    tasks = {"mortality": {"kind": "binary"}, "los_3day": {"kind": "binary"}, "wbc": {"kind": "multiclass"}}
    with pytest.raises(ConfigError, match=r"2 binary tasks \['mortality', 'los_3day'\]: name the one .* with --task"):
        meds_task(tasks, None)
    assert meds_task(tasks, "los_3day") == "los_3day"
    with pytest.raises(ConfigError, match=r"'wbc' is not one"):
        meds_task(tasks, "wbc")
    assert meds_task({"mortality": {"kind": "binary"}}, None) == "mortality"
