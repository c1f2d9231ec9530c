"""A synthetic database in the layout of offset-timed ICU databases (eICU-style): no timestamps, every event
time an integer offset in minutes from the stay's unit admission (negative before it), the admission itself
known only by its clock time ("13:14:00"). `configs/ehr/offset-icu.yaml` is its schema (`time_unit: minutes`,
`stays.start: 0`); one table, `vitals`, counts its offsets in hours to show a per-table `time_unit`.

Its labels depend on what the first 12 hours show (lactate, vasopressor infusions), so a model fitted on them
learns something; `write_offset_database` is what the tests and `docs/ehr-schema.md`'s example run on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

LABS = {"lactate": (1.5, 0.6, "mmol/L"), "creatinine": (1.0, 0.3, "mg/dL"), "sodium": (139.0, 3.0, "mmol/L")}
DRUGS = ["heparin 5000 unit/mL", "pantoprazole 40 mg", "propofol 10 mg/mL", "insulin regular"]
INFUSIONS = ["norepinephrine", "vasopressin", "dexmedetomidine"]


def write_offset_database(root: str | Path, n_stays: int = 120, seed: int = 0, events_per_stay: int = 30) -> Path:
    """`root/patient.csv`, `lab.csv`, `medication.csv`, `infusiondrug.csv`, `vitals.csv` and `labels.csv`
    (`mortality`, `long_stay`, keyed by `patientunitstayid`); returns `root`."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stays = np.arange(100001, 100001 + n_stays)
    patients = [f"{(i // 2) + 1:03d}-{rng.integers(10000, 99999)}" for i in range(n_stays)]  # some stay twice
    severity = rng.normal(size=n_stays)
    stay_minutes = rng.integers(12 * 60, 10 * 24 * 60, size=n_stays) + (severity > 0.5) * 3 * 24 * 60
    pd.DataFrame(
        {
            "patientunitstayid": stays,
            "patienthealthsystemstayid": stays + 500000,
            "uniquepid": patients,
            "hospitaladmitoffset": -rng.integers(0, 3 * 24 * 60, size=n_stays),  # before the unit admission
            "unitadmittime24": [
                f"{h:02d}:{m:02d}:00" for h, m in zip(rng.integers(0, 24, n_stays), rng.integers(0, 60, n_stays))
            ],
            "unitdischargeoffset": stay_minutes,
        }
    ).to_csv(root / "patient.csv", index=False)

    def offsets(count: int) -> np.ndarray:
        # most events in the first day, some before the admission (from the ward or the emergency room)
        return np.where(rng.random(count) < 0.15, -rng.integers(1, 600, count), rng.integers(0, 36 * 60, count))

    lab_rows, med_rows, inf_rows, vital_rows = [], [], [], []
    for stay, sick in zip(stays, severity):
        for offset in offsets(events_per_stay // 2):
            name = rng.choice(list(LABS))
            mean, sd, unit = LABS[name]
            value = mean + sd * rng.normal() + (1.5 * sick if name == "lactate" else 0.0)
            lab_rows.append((len(lab_rows) + 1, stay, int(offset), name, round(float(value), 2), unit))
        for offset in offsets(events_per_stay // 4):
            med_rows.append((len(med_rows) + 1, stay, int(offset), int(offset) + 720, rng.choice(DRUGS), "IV"))
        for offset in offsets(max(1, events_per_stay // 6)):
            drug = INFUSIONS[0] if sick > 0.3 and rng.random() < 0.7 else rng.choice(INFUSIONS[1:])
            inf_rows.append((len(inf_rows) + 1, stay, int(offset), drug, round(float(rng.uniform(1, 20)), 1)))
        for offset in offsets(max(1, events_per_stay // 6)):
            heart_rate = 80 + 10 * sick + 8 * rng.normal()
            vital_rows.append((stay, round(offset / 60, 2), int(heart_rate), int(95 - 2 * max(sick, 0))))
    pd.DataFrame(
        lab_rows, columns=["labid", "patientunitstayid", "labresultoffset", "labname", "labresult", "labmeasurename"]
    ).to_csv(root / "lab.csv", index=False)
    pd.DataFrame(
        med_rows,
        columns=["medicationid", "patientunitstayid", "drugstartoffset", "drugstopoffset", "drugname", "routeadmin"],
    ).to_csv(root / "medication.csv", index=False)
    pd.DataFrame(
        inf_rows, columns=["infusiondrugid", "patientunitstayid", "infusionoffset", "drugname", "drugrate"]
    ).to_csv(root / "infusiondrug.csv", index=False)
    pd.DataFrame(vital_rows, columns=["patientunitstayid", "chart_hours", "heartrate", "sao2"]).to_csv(
        root / "vitals.csv", index=False
    )
    died = rng.random(n_stays) < 1 / (1 + np.exp(-(2.0 * severity - 1.0)))
    pd.DataFrame(
        {
            "patientunitstayid": stays,
            "mortality": died.astype(int),
            "long_stay": (stay_minutes > 3 * 24 * 60).astype(int),
        }
    ).to_csv(root / "labels.csv", index=False)
    return root
