"""`biofm prepare oct`: a manifest of OCT files → an OCT store; and synthetic retina-like volumes.

The manifest (CSV or parquet) has `path` (relative to the manifest or absolute), `sample_id`,
`subject_id`, `eye` and label columns; `--npz-labels glaucoma,progression,md` also takes labels from the
Harvard-style npz files (a vector becomes a multilabel task, present only where the file has the key).
Both eyes of a subject share a split. A file that cannot be used (unknown format, truncated, no volume
key, wrong rank, NaN voxels) is listed with its reason in `<out>.rejects.csv`; the rest is prepared.
Samples are written in groups of `batch_size`; a rerun skips the groups already committed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from biofm.commands import add_columns_argument, columns_of, comma_list, preparer
from biofm.datasets.manifest import label_tasks, read_manifest
from biofm.datasets.outputs import rejects_path, track, write_rejects
from biofm.modalities.oct import OctError
from biofm.modalities.oct.synthetic import synthetic_eye
from biofm.platform.modality import MODALITIES
from biofm.platform.store import Store, StoreError, StoreWriter
from biofm.platform.writing import prepares
from biofm.tasks.kinds import infer_kind

PROGRESSION = [f"progression_{i + 1}" for i in range(6)]


def npz_labels(paths: list[str | None], keys: list[str]) -> tuple[dict, dict[str, np.ndarray]]:
    """Labels stored in npz files (read key by key: the volume is not loaded). Scalars in {0, 1} → binary,
    other scalars → regression, vectors of 0/1 → multilabel; a file without the key → missing."""
    values: dict[str, list] = {k: [] for k in keys}
    for path in paths:
        found = {}
        if path and str(path).lower().endswith(".npz") and Path(path).exists():
            try:
                with np.load(path, allow_pickle=False) as data:
                    found = {k: np.asarray(data[k], dtype=np.float32) for k in keys if k in data}
            except Exception:  # noqa: BLE001 — the file is reported when it is read for its volume
                found = {}
        for k in keys:
            values[k].append(found.get(k))
    tasks, labels = {}, {}
    for key, column in values.items():
        shapes = {v.shape for v in column if v is not None}
        if not shapes:
            raise StoreError(f"no npz file has the key '{key}' named in --npz-labels")
        if len(shapes) > 1:
            raise StoreError(f"the npz key '{key}' has several shapes {sorted(shapes)}")
        shape = shapes.pop()
        width = int(np.prod(shape))
        filled = np.stack([v.reshape(width) if v is not None else np.full(width, np.nan, np.float32) for v in column])
        binary = set(np.unique(filled[~np.isnan(filled)])) <= {0.0, 1.0}
        if width > 1:
            if not binary:
                raise StoreError(
                    f"the npz key '{key}' is a vector of non-binary values; only 0/1 vectors "
                    "(multilabel) are supported as labels"
                )
            tasks[key] = {"kind": "multilabel", "classes": [f"{key}_{i + 1}" for i in range(width)]}
            labels[key] = filled
        else:
            tasks[key] = {"kind": infer_kind(filled[:, 0])}
            labels[key] = filled[:, 0]
    return tasks, labels


@prepares
def prepare_oct(
    manifest: str,
    out: str,
    *,
    label_columns: list[str] | None = None,
    npz_labels_keys: list[str] | None = None,
    shape=(128, 128, 128),
    enface_shape=(128, 128),
    keys: dict | None = None,
    scan_shape=(128, 256),
    spacing=None,
    task_types: dict | None = None,
    source: str | None = None,
    seed: int = 0,
    batch_size: int = 32,
    overwrite: bool = False,
    encoding: str = "utf-8",
    progress: bool = False,
) -> tuple[Store | None, int]:
    """Prepare an OCT store; returns it (None when nothing could be prepared) and the rejected count."""
    frame = read_manifest(manifest, path_column="path", encoding=encoding)
    base = Path(manifest).parent
    paths = [None if pd.isna(p) else str(p if Path(str(p)).is_absolute() else base / str(p)) for p in frame["path"]]
    tasks, labels = label_tasks(frame, label_columns or [], manifest, task_types)
    if npz_labels_keys:
        more_tasks, more_labels = npz_labels(paths, npz_labels_keys)
        tasks.update(more_tasks)
        labels.update(more_labels)
    if not tasks:
        raise StoreError(f"{manifest}: no labels; name them with --label-columns and/or --npz-labels")
    modality = MODALITIES.resolve("oct")(
        shape=shape, enface_shape=enface_shape, keys=keys, scan_shape=scan_shape, spacing=spacing
    )
    volume_bytes = int(np.prod(modality.settings["shape"]))
    writer = StoreWriter(
        out,
        source=source or Path(manifest).stem,
        modalities={"oct": modality.config()},
        tasks=tasks,
        seed=seed,
        overwrite=overwrite,
        chunk_bytes=volume_bytes,
    )  # 1 volume/chunk
    done = writer.committed()
    reasons: dict[int, str] = {}
    sample_ids, subject_ids = frame["sample_id"].astype(str).to_numpy(), frame["subject_id"].astype(str).to_numpy()
    groups = range(0, len(frame), batch_size)
    for key, start in enumerate(track(groups, progress, len(groups), "volumes")):
        if key in done:
            continue
        rows, arrays = [], []
        for i in range(start, min(start + batch_size, len(frame))):
            try:
                if paths[i] is None:
                    raise OctError("the manifest row has no path")
                arrays.append(modality.process(paths[i])[0])
                rows.append(i)
            except OctError as err:
                reasons[i] = str(err)
            except Exception as err:  # noqa: BLE001 — one bad file never stops the run
                reasons[i] = f"{type(err).__name__}: {err}"
        if rows:
            writer.write_batch(
                key,
                sample_id=sample_ids[rows],
                subject_id=subject_ids[rows],
                labels={t: v[rows] for t, v in labels.items()},
                arrays=modality.stack(arrays),
            )
    write_rejects(
        out,
        pd.DataFrame(
            [(i + 1, sample_ids[i], reasons[i]) for i in sorted(reasons)], columns=["row", "sample_id", "reason"]
        ),
    )
    store = writer.finalize() if writer.committed() else None
    return store, len(reasons)


# ------------------------------------------------------------------------------------ synthetic volumes


def write_synthetic_oct(
    folder: str | Path,
    n_subjects: int = 40,
    seed: int = 0,
    shape=(48, 64, 64),
    unlabeled: float = 0.25,
    progression_known: float = 0.6,
) -> Path:
    """Harvard-style npz files (both eyes of each subject) and a manifest; returns the manifest path.
    Some eyes have no glaucoma label (for pseudo-labelling), progression is known for part of them."""
    folder = Path(folder)
    (folder / "volumes").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        glaucoma_subject = rng.random() < 0.5
        for eye in ("OD", "OS"):
            glaucoma = bool(glaucoma_subject and rng.random() < 0.85)
            sectors = (rng.random(6) < 0.4) & glaucoma
            volume, thickness = synthetic_eye(rng, shape, glaucoma, sectors)
            md = float(-1.0 + 0.25 * (thickness.mean() - 105.0) + rng.normal(0, 1.0))
            name = f"sub{s:04d}-{eye}.npz"
            values = {
                "oct_bscans": volume,
                "rnflt": thickness,
                "md": np.float32(md),
                "age": np.float32(rng.normal(60, 10)),
                "male": np.float32(rng.random() < 0.5),
            }
            if rng.random() >= unlabeled:
                values["glaucoma"] = np.float32(glaucoma)
            if rng.random() < progression_known:
                values["progression"] = sectors.astype(np.float32)
            np.savez(folder / "volumes" / name, **values)
            rows.append(
                {
                    "path": f"volumes/{name}",
                    "sample_id": f"OCT-{seed}-{s:04d}-{eye}",
                    "subject_id": f"OCTP-{seed}-{s:04d}",
                    "eye": eye,
                }
            )
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


SYNTHETIC_LABELS = ["glaucoma", "progression", "md"]


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="CSV or parquet: path, sample_id, subject_id, eye, labels")
    p.add_argument("--out", required=True, help="store to write (path or fsspec URL)")
    add_columns_argument(p, "--label-columns", default=None, help="comma-separated label columns of the manifest")
    p.add_argument(
        "--npz-labels",
        default=None,
        help="comma-separated keys to read as labels from npz files (e.g. glaucoma,progression,md)",
    )
    p.add_argument("--shape", default="128,128,128", help="stored volume shape D,H,W (default 128,128,128)")
    p.add_argument("--enface-shape", default="128,128", help="stored en-face map shape (default 128,128)")
    p.add_argument(
        "--scan-shape",
        default="128,256",
        help="stored shape of single B-scans (line scans, circle scans unrolled) DEPTH,WIDTH (default 128,256; "
        "'none': no B-scan arrays)",
    )
    p.add_argument(
        "--spacing",
        default=None,
        help="mm per stored voxel D,H,W: volumes whose file states its spacing are resampled to it, cropped or "
        "padded to --shape (default: every volume stretched to --shape)",
    )
    p.add_argument("--volume-key", default="oct_bscans", help="npz key of the volume")
    p.add_argument("--enface-key", default="rnflt", help="npz key of the en-face map")
    p.add_argument("--encoding", default="utf-8", help="text encoding of a CSV manifest (default utf-8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


def _ints(value: str) -> list[int]:
    return [int(v) for v in value.split(",")]


@preparer("oct", _arguments)
def _run(args: argparse.Namespace) -> None:
    """OCT volumes and en-face maps listed in a manifest → an OCT store."""
    store, rejected = prepare_oct(
        args.manifest,
        args.out,
        label_columns=columns_of(args, "label_columns"),
        npz_labels_keys=comma_list(args.npz_labels),
        shape=_ints(args.shape),
        enface_shape=_ints(args.enface_shape),
        scan_shape=None if args.scan_shape.lower() == "none" else _ints(args.scan_shape),
        spacing=[float(v) for v in args.spacing.split(",")] if args.spacing else None,
        seed=args.seed,
        keys={"volume": args.volume_key, "enface": args.enface_key},
        overwrite=args.overwrite,
        encoding=args.encoding,
        progress=True,
    )
    if store is not None:
        print(store.describe())
    print(
        f"{store.n if store else 0} volumes prepared; {rejected} rejected"
        + (f", listed with their reasons in {rejects_path(args.out)}" if rejected else "")
    )
    if store is None:
        raise StoreError(f"no volume could be prepared; see {rejects_path(args.out)}")


def _synthetic_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True)
    p.add_argument("--volumes-dir", default=None, help="where the npz files go (default <out>.volumes)")
    p.add_argument("--subjects", type=int, default=40)
    p.add_argument("--shape", default="64,64,64", help="stored volume shape (default 64,64,64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


@preparer("synthetic-oct", _synthetic_arguments)
def _run_synthetic(args: argparse.Namespace) -> None:
    """Synthetic retina-like OCT volumes (glaucoma, sparse progression, mean deviation) → an OCT store."""
    from biofm.platform.writing import writing

    folder = Path(args.volumes_dir or str(args.out).rstrip("/") + ".volumes")
    shape = _ints(args.shape)
    with writing(args.out):  # an --out that is not a store is refused before any volume is written
        manifest = write_synthetic_oct(folder, n_subjects=args.subjects, seed=args.seed)
        store, rejected = prepare_oct(
            str(manifest),
            args.out,
            npz_labels_keys=SYNTHETIC_LABELS,
            shape=shape,
            enface_shape=shape[1:],
            seed=args.seed,
            overwrite=args.overwrite,
            progress=True,
        )
    print(store.describe())
