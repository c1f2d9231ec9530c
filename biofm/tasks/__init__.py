"""Task kinds (binary, multiclass, multilabel, regression, ordinal), masked losses, metrics."""

from biofm.tasks.kinds import (
    TASK_KINDS,
    LabelError,
    SpecError,
    TaskKind,
    check_spec,
    infer_kind,
    label_width,
    task_kind,
)

__all__ = ["TASK_KINDS", "LabelError", "SpecError", "TaskKind", "check_spec", "infer_kind", "label_width", "task_kind"]
