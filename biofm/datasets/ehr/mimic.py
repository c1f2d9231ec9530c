"""GenHPF's MIMIC-IV ICU cohort and its 12 tasks' labels, computed from the raw tables.

Cohort: ICU stays that start and end in the same care unit, last at least observation + gap hours, of
patients at least `min_age` years old; with `first_icu`, the first stay of each admission. Times below are
hours from ICU admission; observation 12 h, gap 12 h, prediction window up to observation + 24 h:

- mortality: death at hospital discharge, in (obs + gap, obs + pred]
- long_term_mortality: the same, in (obs + gap, obs + 14 d]
- los_3day / los_7day: ICU length of stay over 3 / 7 days
- readmission: another ICU stay follows in the same admission
- final_acuity: where the patient goes at hospital discharge (death in the ICU and in hospital are classes)
- imminent_discharge: that destination if discharged in [obs + gap, obs + pred], else "No Discharge"
- creatinine, bilirubin, platelets, wbc: the mean lab value in [obs + gap, obs + pred], in clinical bins
  (creatinine values after a first dialysis are left out; the demo lacks chartevents, so dialysis comes from
  inputevents and procedureevents only)

The diagnosis task needs CCS and ICD-10→9 maps that are not in the data; it is left out.
"""

from __future__ import annotations

import polars as pl

from biofm.datasets.ehr.schema import read_small, stream_table
from biofm.platform.store import StoreError

DISCHARGE = {
    "ACUTE HOSPITAL": "Other",
    "AGAINST ADVICE": "Other",
    "ASSISTED LIVING": "Other",
    "CHRONIC/LONG TERM ACUTE CARE": "Other",
    "HEALTHCARE FACILITY": "Other",
    "HOME": "Home",
    "HOME HEALTH CARE": "Home",
    "HOSPICE": "Other",
    "OTHER FACILITY": "Other",
    "PSYCH FACILITY": "Other",
    "REHAB": "Rehabilitation",
    "SKILLED NURSING FACILITY": "Skilled Nursing Facility",
    "DIED": "Death",
}
DESTINATIONS = ["Home", "Other", "Rehabilitation", "Skilled Nursing Facility"]
FINAL_ACUITY = sorted(DESTINATIONS + ["IN_HOSPITAL_MORTALITY", "IN_ICU_MORTALITY"])
IMMINENT = sorted(DESTINATIONS + ["Death", "No Discharge"])

# (lab itemids, bin edges, class names); a value v falls in the first bin whose upper edge it is below
LABS = {
    "creatinine": ([50912], [1.2, 2.0, 3.5, 5.0], ["<1.2", "1.2-2.0", "2.0-3.5", "3.5-5.0", ">=5.0"]),
    "bilirubin": ([50885], [1.2, 2.0, 6.0, 12.0], ["<1.2", "1.2-2.0", "2.0-6.0", "6.0-12.0", ">=12.0"]),
    # platelets: lower counts are worse, so classes run from >=150 down (as GenHPF)
    "platelets": ([51265], [20.0, 50.0, 100.0, 150.0], [">=150", "100-150", "50-100", "20-50", "<20"]),
    "wbc": ([51300, 51301, 51755], [4.0, 12.0], ["<4", "4-12", ">12"]),
}
DIALYSIS_INPUT = [227536, 227525]
DIALYSIS_PROCEDURE = [225441, 225802, 225803, 225805, 225809, 225955]


def _hours(later: str, earlier: str) -> pl.Expr:
    return (pl.col(later) - pl.col(earlier)).dt.total_seconds() / 3600.0


def _datetime(column: str) -> pl.Expr:
    return pl.col(column).str.to_datetime(strict=False, time_unit="us")


def icu_tasks(schema, root: str, stays: pl.DataFrame, report) -> tuple[pl.DataFrame, dict]:
    """(cohort: sample_id + one coded column per task, task specs)."""
    options = schema.tasks
    obs = schema.observation_hours
    gap = float(options.get("gap_hours", 12))
    pred = float(options.get("prediction_hours", 24))
    long_term = float(options.get("long_term_days", 14)) * 24
    stay_id = schema.stays["id"]
    if "hadm_id" not in stays.columns or schema.stays.get("end") is None:
        raise StoreError(f"{schema.path}: the mimic-iv-icu tasks need stays.keys [hadm_id] and stays.end")
    icu = read_small(schema, root, schema.stays["table"], [stay_id, "first_careunit", "last_careunit", "los"])
    patients = read_small(schema, root, "hosp/patients", ["subject_id", "anchor_age", "anchor_year"])
    admissions = read_small(schema, root, "hosp/admissions", ["hadm_id", "discharge_location", "dischtime"])
    frame = (
        stays.join(icu, on=stay_id, how="left")
        .join(patients, left_on="_subject", right_on="subject_id", how="left", suffix="_patient")
        .join(admissions, on="hadm_id", how="left")
        .with_columns(
            pl.col("los").cast(pl.Float64, strict=False),
            _datetime(schema.stays["end"]).alias("_end"),
            _datetime("dischtime").alias("_discharge"),
            (
                pl.col("_start").dt.year()
                - pl.col("anchor_year").cast(pl.Int32, strict=False)
                + pl.col("anchor_age").cast(pl.Int32, strict=False)
            ).alias("_age"),
        )
    )
    n = len(frame)
    frame = frame.filter(pl.col("first_careunit") == pl.col("last_careunit"))
    report.add("stays that change care unit (GenHPF leaves them out)", n - len(frame))
    n = len(frame)
    frame = frame.filter(pl.col("los") >= (obs + gap) / 24)
    report.add(f"stays shorter than observation + gap ({obs + gap:g} h)", n - len(frame))
    n = len(frame)
    frame = frame.filter(pl.col("_age") >= float(options.get("min_age", 18)))
    report.add(f"stays of patients younger than {options.get('min_age', 18)}", n - len(frame))
    frame = frame.sort(["hadm_id", "_start"]).with_columns(
        (pl.col("_start") != pl.col("_start").max().over("hadm_id")).cast(pl.Float32).alias("readmission")
    )
    if options.get("first_icu", True):
        n = len(frame)
        frame = frame.filter(pl.col("_start") == pl.col("_start").min().over("hadm_id"))
        report.add("later ICU stays of an admission (first_icu)", n - len(frame))

    died = pl.col("discharge_location") == "DIED"
    discharge_h = _hours("_discharge", "_start")
    in_icu_death = died & (pl.col("_discharge") > pl.col("_start")) & (pl.col("_discharge") <= pl.col("_end"))
    destination = pl.col("discharge_location").replace_strict(DISCHARGE, default=None)
    final = (
        pl.when(in_icu_death)
        .then(pl.lit("IN_ICU_MORTALITY"))
        .when(died)
        .then(pl.lit("IN_HOSPITAL_MORTALITY"))
        .otherwise(destination)
    )
    discharged = (discharge_h >= obs + gap) & (discharge_h <= obs + pred)
    imminent = (
        pl.when(pl.col("_discharge").is_null())
        .then(None)
        .when(discharged & died)
        .then(pl.lit("Death"))
        .when(discharged)
        .then(destination)
        .otherwise(pl.lit("No Discharge"))
    )
    frame = frame.with_columns(
        (died & (discharge_h > obs + gap) & (discharge_h <= obs + pred)).cast(pl.Float32).alias("mortality"),
        (died & (discharge_h > obs + gap) & (discharge_h <= obs + long_term))
        .cast(pl.Float32)
        .alias("long_term_mortality"),
        (pl.col("los") > 3).cast(pl.Float32).alias("los_3day"),
        (pl.col("los") > 7).cast(pl.Float32).alias("los_7day"),
        _coded(final, FINAL_ACUITY).alias("final_acuity"),
        _coded(imminent, IMMINENT).alias("imminent_discharge"),
    )
    specs = {t: {"kind": "binary"} for t in ("mortality", "long_term_mortality", "los_3day", "los_7day", "readmission")}
    specs["final_acuity"] = {"kind": "multiclass", "classes": FINAL_ACUITY}
    specs["imminent_discharge"] = {"kind": "multiclass", "classes": IMMINENT}

    labs = _lab_labels(schema, root, frame, obs + gap, obs + pred, report)
    frame = frame.join(labs, on="_sample", how="left")
    for task, (_, _, classes) in LABS.items():
        specs[task] = {"kind": "multiclass", "classes": classes}
    cohort = frame.select(pl.col("_sample").alias("sample_id"), *[pl.col(t).cast(pl.Float32) for t in specs])
    return cohort, specs


def _coded(values: pl.Expr, classes: list[str]) -> pl.Expr:
    return values.replace_strict({c: float(i) for i, c in enumerate(classes)}, default=None, return_dtype=pl.Float32)


def _lab_labels(schema, root, cohort, lo: float, hi: float, report) -> pl.DataFrame:
    """Mean lab value per stay in [lo, hi] hours after ICU admission, binned per task."""
    itemids = {str(i): task for task, (ids, _, _) in LABS.items() for i in ids}
    path = schema.file(root, "hosp/labevents")
    columns = ["subject_id", "hadm_id", "itemid", "charttime", "valuenum"]
    wanted = cohort.select("hadm_id", "_sample", "_start", "_subject")
    parts = []
    for block in stream_table(path, columns, encoding=schema.encoding):
        block = block.filter(pl.col("itemid").is_in(list(itemids)) & pl.col("valuenum").is_not_null())
        parts.append(block.join(wanted, on="hadm_id", how="inner"))
    labs = pl.concat(parts) if parts else pl.DataFrame()
    if labs.is_empty():
        return cohort.select("_sample").with_columns([pl.lit(None, pl.Float32).alias(t) for t in LABS])
    labs = labs.with_columns(
        pl.col("itemid").replace_strict(itemids).alias("_task"),
        _datetime("charttime").alias("_t"),
        pl.col("valuenum").cast(pl.Float64, strict=False),
    )
    first_dialysis = _first_dialysis(schema, root)
    if first_dialysis is not None:
        labs = labs.join(first_dialysis, left_on="_subject", right_on="subject_id", how="left")
        after = (
            (pl.col("_task") == "creatinine")
            & pl.col("_dialysis").is_not_null()
            & (pl.col("_t") >= pl.col("_dialysis"))
        )
        report.add("creatinine values after a first dialysis (left out of the label)", labs.select(after.sum()).item())
        labs = labs.filter(~after)
    hours = _hours("_t", "_start")
    labs = labs.filter((hours >= lo) & (hours <= hi))
    means = labs.group_by(["_sample", "_task"]).agg(pl.col("valuenum").mean().alias("_mean"))
    out = cohort.select("_sample")
    for task, (_, edges, _) in LABS.items():
        per_task = means.filter(pl.col("_task") == task).select(
            "_sample", _bin(pl.col("_mean"), edges, descending=(task == "platelets")).alias(task)
        )
        out = out.join(per_task, on="_sample", how="left")
    return out


def _bin(value: pl.Expr, edges: list[float], descending: bool) -> pl.Expr:
    """Class index: the number of edges at or below the value; for platelets (low = bad) reversed."""
    index = sum((value >= e).cast(pl.Int32) for e in edges)
    if descending:  # platelets: >=150 is class 0 ... <20 is class 4, as GenHPF
        index = len(edges) - index
    return index.cast(pl.Float32)


def _first_dialysis(schema, root) -> pl.DataFrame | None:
    """The first dialysis time per subject from inputevents and procedureevents (chartevents, when present)."""
    times = []
    for table, ids, value in (
        ("icu/inputevents", DIALYSIS_INPUT, "amount"),
        ("icu/procedureevents", DIALYSIS_PROCEDURE, "value"),
    ):
        try:
            frame = read_small(schema, root, table, ["subject_id", "itemid", "starttime", value])
        except StoreError:
            continue
        frame = frame.filter(pl.col("itemid").is_in([str(i) for i in ids]) & pl.col(value).is_not_null())
        if value == "amount":
            frame = frame.filter(pl.col(value).cast(pl.Float64, strict=False) > 0)
        times.append(frame.select("subject_id", _datetime("starttime").alias("_dialysis")))
    if not times:
        return None
    return pl.concat(times).group_by("subject_id").agg(pl.col("_dialysis").min())
