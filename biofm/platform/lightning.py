"""The Lightning layer in one import: the data module (`data.py`: stores → streams → mixed batches), the
training module (`module.py`: the model, masked per-task losses, balancing, metrics), the schema read from
the stores (`schema.py`), settings checks (`settings.py`) and what a run writes (`predictions.py`). The
schema travels in every checkpoint: `biofm fit` links `data.schema` → `model.schema`."""

from biofm.platform.data import BiofmDataModule, Collator
from biofm.platform.errors import ConfigError, StoreError
from biofm.platform.module import BiofmModule, ConfirmTrained
from biofm.platform.optim import decayed
from biofm.platform.predictions import (
    PredictionWriter,
    metrics_of,
    prediction_columns,
    predictions_frame,
    print_metrics,
    write_test_metrics,
)
from biofm.platform.schema import build_schema, task_applies
from biofm.platform.settings import check_settings

__all__ = [
    "BiofmDataModule",
    "BiofmModule",
    "Collator",
    "ConfigError",
    "ConfirmTrained",
    "PredictionWriter",
    "StoreError",
    "build_schema",
    "check_settings",
    "decayed",
    "metrics_of",
    "prediction_columns",
    "predictions_frame",
    "print_metrics",
    "task_applies",
    "write_test_metrics",
]
