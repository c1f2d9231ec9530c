"""EHR sources → stores of hierarchical-text events (the `ehr` modality), GenHPF style: MEDS data
(`meds`; predictions in the MEDS format in `predict`) and raw relational tables of any schema (`tables`, with the MIMIC-IV ICU tasks in `mimic`). Both run
shard by shard over subjects, so memory follows a shard, not the database. Importing this package registers
their commands."""

from biofm.datasets.ehr import meds, predict, tables  # noqa: F401
from biofm.datasets.ehr.meds import meds_sequences, prepare_meds
from biofm.datasets.ehr.predict import meds_predictions, predict_meds
from biofm.datasets.ehr.tables import prepare_ehr_tables

__all__ = ["meds_predictions", "meds_sequences", "predict_meds", "prepare_meds", "prepare_ehr_tables"]
