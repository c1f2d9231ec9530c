"""The Python SDK: `biofm.load(path)` → a model that predicts from raw inputs.

    >>> import biofm
    >>> model = biofm.load("runs/a")                 # a run directory, a W&B artifact folder or a .ckpt
    >>> model.tasks, model.modalities
    >>> model.predict(smiles=["CCO", "c1ccccc1O"], ids=["ethanol", "phenol"])   # pandas DataFrame
    >>> model.embed(smiles=["CCO"])                   # numpy [n, d_model]
    >>> model.predict_meds("MEDS_DIR", times)          # times: subject_id, prediction_time

Raw inputs go through the same featurisers as training, with the settings stored in the checkpoint. An
input that cannot be featurised (an invalid SMILES, a missing slide, a corrupt volume) gives a row whose
`error` column says why; the other rows are predicted.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

# SDK argument → modality; `case` is a DataFrame of case columns
INPUTS = {"smiles": "molecule", "slides": "wsi", "oct": "oct", "reports": "text", "case": "tabular", "ehr": "ehr"}


def find_checkpoint(path: str | Path, which: str = "best") -> Path:
    """`path` itself when it is a file. In a folder (a run directory or a W&B artifact): with `which="best"`
    the newest `best-*.ckpt` (the best epoch by the validation monitor), else `last.ckpt`; with
    `which="last"`, `last.ckpt` (the state at the end of training); else the newest `*.ckpt` below it."""
    if which not in ("best", "last"):
        raise ValueError(f"which= must be 'best' or 'last', got {which!r}")
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint file or run directory")
    order = ("**/best-*.ckpt", "**/last.ckpt") if which == "best" else ("**/last.ckpt", "**/best-*.ckpt")
    for pattern in (*order, "**/*.ckpt"):
        found = sorted(path.glob(pattern), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    raise FileNotFoundError(f"{path}: no .ckpt file in this folder or below it")


def load_module(checkpoint: str | Path, device: str | torch.device = "cpu"):
    """A BiofmModule rebuilt from a checkpoint (read with `weights_only=True`), in eval mode."""
    from biofm.platform.checkpoint import biofm_schema, safe_load
    from biofm.platform.lightning import BiofmModule
    state = safe_load(checkpoint)
    biofm_schema(state, checkpoint)
    hparams = dict(state.get("hyper_parameters", {}))
    accepted = inspect.signature(BiofmModule.__init__).parameters  # LightningCLI adds `_instantiator`
    hparams = {k: v for k, v in hparams.items() if k in accepted}
    hparams["init_from"] = None
    module = BiofmModule(**hparams)
    module.load_state_dict(state["state_dict"])
    return module.to(device).eval()


class Model:
    """A trained model that predicts from raw inputs; see the module's doc."""

    def __init__(self, module, device: torch.device):
        self.module, self.device = module, device
        self.schema = module.model.schema
        self.checkpoint: Path | None = None  # the file it was loaded from (biofm.load)

    @property
    def tasks(self) -> dict[str, dict]:
        return dict(self.schema["tasks"])

    @property
    def modalities(self) -> list[str]:
        return list(self.schema["modalities"])

    # ---- featurisation
    def featurise(self, raw: dict[str, Any], n: int) -> tuple[dict[str, dict], list[str | None]]:
        """Raw inputs per modality (lists of n, or a DataFrame for tabular) → model inputs, and per sample
        the reason it cannot be predicted (None when it can)."""
        inputs, present_any = {}, np.zeros(n, dtype=bool)
        reasons: list[list[str]] = [[] for _ in range(n)]
        for name, values in raw.items():
            modality = self.module.model.modalities[name]
            columns, why = modality.featurise_with_reasons(values)
            for i, reason in enumerate(why):
                if reason:
                    reasons[i].append(f"{name}: {reason}")
            local = {k.split("/", 1)[1]: v for k, v in columns.items()}
            present = np.asarray(local.pop("present"), dtype=bool)
            present_any |= present
            if present.any():  # a modality no sample of the batch has contributes nothing
                inputs[name] = {"present": torch.from_numpy(present), **modality.collate(local)}
        # a sample is predicted from the modalities it has; it fails only when it has none
        missing = f"no input for any of the model's modalities ({', '.join(self.modalities)})"
        errors = [None if present_any[i] else ("; ".join(reasons[i]) or missing) for i in range(n)]
        return inputs, errors

    def _raw(self, given: dict[str, Any]) -> tuple[dict[str, Any], int]:
        raw, n = {}, None
        for argument, values in given.items():
            if values is None:
                continue
            if argument not in INPUTS:
                raise ValueError(f"unknown input {argument}=; inputs are " + ", ".join(f"{a}=" for a in INPUTS))
            name = INPUTS[argument]
            if name not in self.schema["modalities"]:
                raise ValueError(f"the model was not trained with {name} inputs ({argument}=); it takes "
                                 f"{', '.join(a for a, m in INPUTS.items() if m in self.schema['modalities'])}")
            values = values if isinstance(values, pd.DataFrame) else _as_list(argument, values)
            if n is not None and len(values) != n:
                raise ValueError(f"{argument}= has {len(values)} inputs but another argument has {n}")
            n = len(values)
            raw[name] = values
        if n is None:
            raise ValueError("no input given: pass at least one of " + ", ".join(
                f"{a}=" for a, m in INPUTS.items() if m in self.schema["modalities"]))
        return raw, n

    @staticmethod
    def _slice(values, lo: int, hi: int):
        return values.iloc[lo:hi] if isinstance(values, pd.DataFrame) else values[lo:hi]

    @torch.no_grad()
    def _run(self, raw: dict, n: int, batch_size: int):
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            inputs, errors = self.featurise({k: self._slice(v, lo, hi) for k, v in raw.items()}, hi - lo)
            inputs = {m: {k: v.to(self.device) for k, v in d.items()} for m, d in inputs.items()}
            yield self.forward(inputs), errors

    def forward(self, inputs: dict) -> dict | None:
        """The model's outputs and, under `applies`, per task the samples it applies to (`task_applies`); None
        for a batch in which no sample has any input."""
        from biofm.platform.lightning import task_applies
        if not inputs:
            return None
        out = self.module.model(inputs)
        out["applies"] = task_applies(self.schema, inputs, len(next(iter(inputs.values()))["present"]))
        return out

    # ---- outputs
    def predict(self, *, ids: Sequence | None = None, batch_size: int = 64, smiles: Sequence[str] | None = None,
                slides: Sequence[str] | None = None, oct: Sequence | None = None, reports: Sequence[str] | None = None,
                case: pd.DataFrame | None = None, ehr: Sequence | None = None) -> pd.DataFrame:
        """One row per input: `sample_id`, per task the prediction (class name, or value in original units),
        for classification `<task>/prob/<class>`, and `<task>/applies` (False where the sample has none of the
        modalities the task was trained on: no prediction); `error` says why a row has no prediction."""
        raw, n = self._raw(dict(smiles=smiles, slides=slides, oct=oct, reports=reports, case=case, ehr=ehr))
        if ids is not None:
            ids = _as_list("ids", ids)
            if len(ids) != n:
                raise ValueError(f"ids= has {len(ids)} values but the inputs have {n} samples; give one id per "
                                 "sample, in the same order")
        frames = []
        for out, errors in self._run(raw, n, batch_size):
            frames.append(self.frame(out, errors))
        frame = pd.concat(frames, ignore_index=True)
        frame.insert(0, "sample_id", [str(i) for i in ids] if ids is not None else [str(i) for i in range(n)])
        return frame

    def frame(self, out: dict, errors: list[str | None]) -> pd.DataFrame:
        """Model outputs of one batch → prediction columns (empty where `errors` names a reason), then `error`."""
        return pd.DataFrame(self.columns(out, errors))

    def columns(self, out: dict | None, errors: list[str | None], sample_ids: list[str] | None = None
                ) -> dict[str, Any]:
        """`frame`'s columns as arrays, after `sample_id` when given: a task is predicted only for the samples
        it applies to (`<task>/applies`, see `forward`), and none for a failed row."""
        from biofm.platform.lightning import prediction_columns
        kinds = self.module.model.kinds
        n = len(errors)
        result = {}
        for task, kind in kinds.items():
            logits = out["logits"][task] if out is not None else \
                torch.zeros(n, kind.out_dim)  # nothing to predict from: every row is an error
            result[task] = {k: (v.float() if v.is_floating_point() else v).cpu()
                            for k, v in kind.predict(logits).items()}
        usable = np.array([e is None for e in errors], dtype=bool)
        where = (out or {}).get("applies") or {}
        applies = {task: usable & where.get(task, np.ones(n, dtype=bool)) for task in kinds}
        columns = {} if sample_ids is None else {"sample_id": sample_ids}
        columns.update(prediction_columns(kinds, result, applies))
        columns["error"] = errors
        return columns

    def predict_meds(self, meds, prediction_times, *, task: str | None = None, codes: str | None = None,
                     batch_size: int = 64) -> pd.DataFrame:
        """MEDS events (a folder, a parquet file or a frame) at the given prediction times (a frame with
        subject_id and prediction_time) → `predict`'s columns plus the MEDS prediction format:
        `subject_id`, `prediction_time`, `predicted_boolean_value`, `predicted_boolean_probability` (for
        `task`, default the model's only binary task). Only events at or before each time are used; `codes`
        names the codes.parquet the store was prepared with when `meds` is not a MEDS folder."""
        from biofm.datasets.ehr import meds_sequences
        if "ehr" not in self.schema["modalities"]:
            raise ValueError(f"the model was not trained with EHR inputs (it has {self.modalities})")
        max_events = int(self.schema["modalities"]["ehr"].get("max_events", 128))
        rows, sequences = meds_sequences(meds, prediction_times, max_events, codes)
        frame = self.predict(ehr=sequences, ids=rows["sample_id"].to_list(), batch_size=batch_size)
        missing = [s is None for s in sequences]
        frame.loc[missing, "error"] = "no event at or before its prediction_time"
        return add_meds_columns(frame, rows.to_pandas(), self.tasks, task)

    def embed(self, *, batch_size: int = 64, **inputs) -> np.ndarray:
        """The trunk's CLS representation [n, d_model] (NaN rows where the input could not be used)."""
        raw, n = self._raw(inputs)
        out = []
        for result, errors in self._run(raw, n, batch_size):
            if result is None:
                out.append(np.full((len(errors), self.module.hparams.d_model), np.nan, np.float32))
                continue
            cls = result["cls"].float().cpu().numpy()
            cls[[e is not None for e in errors]] = np.nan
            out.append(cls)
        return np.concatenate(out)


def _as_list(argument: str, values) -> list:
    """An input argument as a list of samples; a bare string (or a single volume) would be read as a sequence
    of samples (`smiles="CCO"` as "C", "C", "O"), so it is refused."""
    if isinstance(values, (str, bytes, Path)):
        raise ValueError(f"{argument}= takes a list, one entry per sample; got a single "
                         f"{type(values).__name__} — pass {argument}=[{str(values)[:30]!r}] for one sample")
    if isinstance(values, np.ndarray) and values.ndim > 1:
        raise ValueError(f"{argument}= takes a list, one entry per sample; got one array of shape "
                         f"{values.shape} — pass {argument}=[volume] for one sample, or a list of arrays")
    if isinstance(values, dict):
        raise ValueError(f"{argument}= takes a list, one entry per sample; got a dict")
    try:
        return list(values)
    except TypeError:
        raise ValueError(f"{argument}= takes a list, one entry per sample; got a {type(values).__name__}") from None


def add_meds_columns(frame: pd.DataFrame, rows: pd.DataFrame, tasks: dict, task: str | None) -> pd.DataFrame:
    """`subject_id`, `prediction_time` and, for a binary task, MEDS's predicted boolean value and probability."""
    binary = [t for t, spec in tasks.items() if spec["kind"] == "binary"]
    task = task or (binary[0] if len(binary) == 1 else None)
    out = frame.copy()
    out.insert(1, "subject_id", rows["subject_id"].to_numpy())
    out.insert(2, "prediction_time", rows["prediction_time"].to_numpy())
    if task is not None:
        if task not in binary:
            raise ValueError(f"MEDS predictions need a binary task; binary tasks are {binary}")
        probability = out[f"{task}/prob/1"].astype(float)
        out["predicted_boolean_probability"] = probability
        out["predicted_boolean_value"] = (probability >= 0.5).where(probability.notna())
    return out


def load(path: str | Path, device: str | None = None, which: str = "best", quiet: bool = False) -> Model:
    """A trained model from a checkpoint file or a folder holding one (run directory, W&B artifact): in a
    folder the best checkpoint by validation (`which="last"`: the last state); says on stderr which file it
    loaded unless `quiet`. On CUDA when available unless `device` says otherwise."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checkpoint = find_checkpoint(path, which)
    if not quiet and Path(path).is_dir():
        kind = "the best checkpoint by validation" if checkpoint.name.startswith("best-") else \
            "the last checkpoint" if checkpoint.name.startswith("last") else "the newest checkpoint"
        other = "which='last' loads the last state" if which == "best" else "which='best' loads the best by validation"
        print(f"biofm: loaded {checkpoint} ({kind}; {other})", file=sys.stderr)
    model = Model(load_module(checkpoint, device), device)
    model.checkpoint = checkpoint
    return model
