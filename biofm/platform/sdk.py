"""The Python SDK: `biofm.load(path)` → a model that predicts from raw inputs.

    >>> import biofm
    >>> model = biofm.load("runs/a")                 # a run directory, a W&B artifact folder or a .ckpt
    >>> model.tasks, model.modalities
    >>> model.predict(smiles=["CCO", "c1ccccc1O"], ids=["ethanol", "phenol"])   # pandas DataFrame
    >>> model.embed(smiles=["CCO"])                   # numpy [n, d_model]

Each modality names its keyword (`Modality.argument`: smiles=, slides=, oct=, reports=, case=, ehr= for the
registered ones); `model.inputs` lists the model's.

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

from biofm.platform.modality import MODALITIES, as_samples


def keywords() -> dict[str, str]:
    """`Model.predict`'s keyword → modality, over every registered modality."""
    return {MODALITIES.resolve(name).keyword(): name for name in MODALITIES.names()}


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

    @property
    def inputs(self) -> dict[str, str]:
        """The keywords `predict` and `embed` take for this model → their modality."""
        return {k: m for k, m in keywords().items() if m in self.schema["modalities"]}

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
            present = np.asarray(columns[f"{name}/present"], dtype=bool)
            present_any |= present
            if present.any():  # a modality no sample of the batch has contributes nothing
                inputs[name] = modality.inputs_of(columns)
        # a sample is predicted from the modalities it has; it fails only when it has none
        missing = f"no input for any of the model's modalities ({', '.join(self.modalities)})"
        errors = [None if present_any[i] else ("; ".join(reasons[i]) or missing) for i in range(n)]
        return inputs, errors

    def _raw(self, given: dict[str, Any]) -> tuple[dict[str, Any], int]:
        raw, n, known = {}, None, keywords()
        for argument, values in given.items():
            if values is None:
                continue
            if argument not in known:
                raise ValueError(f"unknown input {argument}=; inputs are " + ", ".join(f"{a}=" for a in known))
            name = known[argument]
            if name not in self.schema["modalities"]:
                raise ValueError(
                    f"the model was not trained with {name} inputs ({argument}=); it takes "
                    f"{', '.join(f'{a}=' for a in self.inputs)}"
                )
            values = self.module.model.modalities[name].raw_from_argument(values)
            if n is not None and len(values) != n:
                raise ValueError(f"{argument}= has {len(values)} inputs but another argument has {n}")
            n = len(values)
            raw[name] = values
        if n is None:
            raise ValueError("no input given: pass at least one of " + ", ".join(f"{a}=" for a in self.inputs))
        return raw, n

    @staticmethod
    def _slice(values, lo: int, hi: int):
        return values.iloc[lo:hi] if isinstance(values, pd.DataFrame) else values[lo:hi]

    @torch.no_grad()
    def _run(self, raw: dict, n: int, batch_size: int, tasks: list[str] | None = None):
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            inputs, errors = self.featurise({k: self._slice(v, lo, hi) for k, v in raw.items()}, hi - lo)
            inputs = {m: {k: v.to(self.device) for k, v in d.items()} for m, d in inputs.items()}
            yield self.forward(inputs, tasks), errors

    def forward(self, inputs: dict, tasks: list[str] | None = None) -> dict | None:
        """The model's outputs and, under `applies`, per task the samples it applies to (`task_applies`); None
        for a batch in which no sample has any input. `tasks`: only these (a model with task experts then runs
        only their experts)."""
        from biofm.platform.lightning import task_applies

        if not inputs:
            return None
        model = self.module.model
        out = model(inputs, tasks=tasks) if tasks is not None and model.isolated else model(inputs)
        out["applies"] = task_applies(self.schema, inputs, len(next(iter(inputs.values()))["present"]))
        return out

    # ---- outputs
    def predict(
        self, *, ids: Sequence | None = None, batch_size: int = 64, tasks: Sequence[str] | None = None, **inputs
    ) -> pd.DataFrame:
        """One row per input: `sample_id`, per task the prediction (class name, or value in original units),
        for classification `<task>/prob/<class>`, and `<task>/applies` (False where the sample has none of the
        modalities the task was trained on: no prediction); `error` says why a row has no prediction. Inputs
        are keywords of the model's modalities (`inputs`), a list per keyword with one entry per sample.
        `tasks`: predict only these (default: every task); a model with task experts runs only theirs."""
        raw, n = self._raw(inputs)
        if tasks is not None:
            tasks = [tasks] if isinstance(tasks, str) else list(tasks)
            unknown = [t for t in tasks if t not in self.module.model.kinds]
            if unknown:
                raise ValueError(
                    f"tasks= names {unknown}, which the model does not predict; it has {sorted(self.tasks)}"
                )
        if ids is not None:
            ids = as_samples("ids", ids)
            if len(ids) != n:
                raise ValueError(
                    f"ids= has {len(ids)} values but the inputs have {n} samples; give one id per "
                    "sample, in the same order"
                )
        frames = []
        for out, errors in self._run(raw, n, batch_size, tasks):
            frames.append(self.frame(out, errors, tasks))
        frame = pd.concat(frames, ignore_index=True)
        frame.insert(0, "sample_id", [str(i) for i in ids] if ids is not None else [str(i) for i in range(n)])
        return frame

    def frame(self, out: dict, errors: list[str | None], tasks: list[str] | None = None) -> pd.DataFrame:
        """Model outputs of one batch → prediction columns (empty where `errors` names a reason), then `error`."""
        return pd.DataFrame(self.columns(out, errors, tasks=tasks))

    def columns(
        self,
        out: dict | None,
        errors: list[str | None],
        sample_ids: list[str] | None = None,
        tasks: list[str] | None = None,
    ) -> dict[str, Any]:
        """`frame`'s columns as arrays, after `sample_id` when given: a task is predicted only for the samples
        it applies to (`<task>/applies`, see `forward`), and none for a failed row."""
        from biofm.platform.lightning import prediction_columns

        kinds = self.module.model.kinds
        if tasks is not None:
            kinds = {t: k for t, k in kinds.items() if t in set(tasks)}
        n = len(errors)
        result = {}
        for task, kind in kinds.items():
            logits = (
                out["logits"][task] if out is not None else torch.zeros(n, kind.out_dim)
            )  # nothing to predict from: every row is an error
            result[task] = {
                k: (v.float() if v.is_floating_point() else v).cpu() for k, v in kind.predict(logits).items()
            }
        usable = np.array([e is None for e in errors], dtype=bool)
        where = (out or {}).get("applies") or {}
        applies = {task: usable & where.get(task, np.ones(n, dtype=bool)) for task in kinds}
        columns = {} if sample_ids is None else {"sample_id": sample_ids}
        columns.update(prediction_columns(kinds, result, applies))
        columns["error"] = errors
        return columns

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


def load(path: str | Path, device: str | None = None, which: str = "best", quiet: bool = False) -> Model:
    """A trained model from a checkpoint file or a folder holding one (run directory, W&B artifact): in a
    folder the best checkpoint by validation (`which="last"`: the last state); says on stderr which file it
    loaded unless `quiet`. On CUDA when available unless `device` says otherwise."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checkpoint = find_checkpoint(path, which)
    if not quiet and Path(path).is_dir():
        kind = (
            "the best checkpoint by validation"
            if checkpoint.name.startswith("best-")
            else "the last checkpoint"
            if checkpoint.name.startswith("last")
            else "the newest checkpoint"
        )
        other = "which='last' loads the last state" if which == "best" else "which='best' loads the best by validation"
        print(f"biofm: loaded {checkpoint} ({kind}; {other})", file=sys.stderr)
    model = Model(load_module(checkpoint, device), device)
    model.checkpoint = checkpoint
    return model
