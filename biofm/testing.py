"""Fake data and helpers shared by the tests (and usable by anyone testing a new modality)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from lightning.pytorch import Callback

from biofm.platform.store import Ragged, Store, StoreWriter

# the shared real data (../shared/data beside the repository, or wherever BIOFM_SHARED_DATA points): tests that
# need it skip with a reason when it is absent
SHARED_DATA = Path(
    os.environ.get("BIOFM_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)

TOY_TASKS = {
    "flag": {"kind": "binary"},
    "grade": {"kind": "multiclass", "classes": ["low", "mid", "high"]},
    "score": {"kind": "regression", "unit": "a.u."},
}


def toy_batch(start: int, n: int, seed: int = 0, subjects_per_sample: float = 0.5) -> dict:
    """Samples `start..start+n` of a toy source: a fixed and a ragged array, three tasks with gaps."""
    rng = np.random.default_rng([seed, start])
    idx = np.arange(start, start + n)
    x = np.stack([idx, idx * 2, idx % 7, rng.random(n)], axis=1).astype(np.float32)
    tokens = Ragged.from_list([np.arange(i % 5, dtype=np.int32) + i for i in idx], dtype=np.int32)
    flag = (idx % 2).astype(np.float32)
    flag[idx % 5 == 0] = np.nan
    grade = (idx % 3).astype(np.float32)
    score = (idx / 10.0).astype(np.float32)
    score[idx % 4 == 1] = np.nan
    return {
        "sample_id": [f"S{i:06d}" for i in idx],
        "subject_id": [f"P{int(i * subjects_per_sample):06d}" for i in idx],
        "labels": {"flag": flag, "grade": grade, "score": score},
        "arrays": {"toy/x": x, "toy/tokens": tokens},
    }


def write_toy_store(
    url: str | os.PathLike,
    n: int = 240,
    batch: int = 60,
    seed: int = 0,
    chunk_bytes: int = 4 << 20,
    min_chunks: int = 16,
    source: str = "toy",
    **writer_kwargs,
) -> Store:
    """A small complete store; row `i` of the input has x[:, 0] == i, so tests can track samples."""
    writer = StoreWriter(
        str(url),
        source=source,
        modalities={"toy": {"version": 1}},
        tasks=TOY_TASKS,
        seed=seed,
        chunk_bytes=chunk_bytes,
        min_chunks=min_chunks,
        **writer_kwargs,
    )
    for key, start in enumerate(range(0, n, batch)):
        if key not in writer.committed():
            writer.write_batch(key, **toy_batch(start, min(batch, n - start), seed))
    return writer.finalize()


def write_flag_store(path: str | os.PathLike, flag_of, source: str = "flag") -> str:
    """A tabular store of 120 samples (80 train, 20 val, 20 test; two seeded numeric columns `x`) with one
    binary task `flag` = `flag_of(x)`: a split with few or one-class labels made to order. Returns its URL."""
    n = 120
    x = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    writer = StoreWriter(
        str(path),
        source=source,
        tasks={"flag": {"kind": "binary"}},
        modalities={"tabular": {"numeric": {"a": [0.0, 1.0], "b": [0.0, 1.0]}, "categorical": {}}},
    )
    writer.write_batch(
        0,
        sample_id=[f"s{i}" for i in range(n)],
        subject_id=[f"p{i}" for i in range(n)],
        labels={"flag": np.asarray(flag_of(x), np.float32)},
        split=np.array(["train"] * 80 + ["val"] * 20 + ["test"] * 20),
        arrays={"tabular/numeric": x, "tabular/categorical": np.zeros((n, 0), np.int32)},
    )
    return writer.finalize().url


def store_arrays(store: Store) -> dict[str, np.ndarray]:
    """Every array of a store as numpy, for comparing two stores."""
    out = {}
    for name in list(store.root.array_keys()):
        out[name] = np.asarray(store.root[name][...])
    for group_name, group in store.root.groups():
        for name, arr in group.arrays():
            out[f"{group_name}/{name}"] = np.asarray(arr[...])
    return out


def ddp_stream_worker(rank: int, world: int, url: str, port: int, num_workers: int, out_dir: str) -> None:
    """One rank of a real gloo process group that streams a store's train split and saves its rows."""
    import torch.distributed as dist

    from biofm.platform.stream import StoreStream, StreamLoader

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loader = StreamLoader(StoreStream(url, batch_size=16, seed=3), num_workers=num_workers)
        rows = [b["row"] for b in loader]
        np.save(Path(out_dir) / f"rank{rank}.npy", np.concatenate(rows))
        np.save(Path(out_dir) / f"rank{rank}_batches.npy", np.array([len(rows), len(loader)]))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_raw(modality: str, n: int, seed: int = 0) -> list:
    """Raw inputs for a registered modality (None marks a sample without it): the modality's own
    `example_raw`, so a new modality's registry-wide tests need nothing here."""
    from biofm.platform.modality import MODALITIES

    return MODALITIES.resolve(modality).example_raw(n, seed)


def fake_slides(seed: int = 0, count: int = 6, size: int = 672) -> list[str]:
    """`count` small pyramidal TIFF slides (synthetic tissue re-stained from scikit-image's IHC image, no
    shared data needed), written once per machine into the temporary folder."""
    import tempfile

    from biofm.datasets.synthetic_slides import TissueSource, synthetic_slide, write_pyramid_tiff

    folder = Path(tempfile.gettempdir()) / f"biofm-fake-slides-{seed}-{count}-{size}"
    paths = [folder / f"slide-{i}.tiff" for i in range(count)]
    if all(p.exists() for p in paths):
        return [str(p) for p in paths]
    folder.mkdir(parents=True, exist_ok=True)
    source = TissueSource(cmu_path=False)
    for i, path in enumerate(paths):
        rng = np.random.default_rng([seed, i])
        rgb, _ = synthetic_slide(rng, source, ["H&E", "IHC"][i % 2], "resection", i % 4 == 3, size)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        write_pyramid_tiff(partial, rgb, mpp=0.5, levels=2)
        os.replace(partial, path)  # parallel test workers may write the same file: each replace is whole
    return [str(p) for p in paths]


def tiny_patch_network():
    """A patch encoder factory for tests (`--patch-encoder biofm.testing:tiny_patch_network`)."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


FAKE_FLAG = "fake label: the sample's row index is odd"  # the same task in every fake store: one head


def write_fake_modality_store(
    url: str, modality: str, n: int = 120, seed: int = 0, settings: dict | None = None
) -> Store:
    """A store with one modality built from `fake_raw` (with the modality's `settings`), and one binary task."""
    from biofm.platform.modality import MODALITIES

    raw = fake_raw(modality, n, seed)
    mod = MODALITIES.resolve(modality)(**(settings or {}))
    mod.fit(raw)
    writer = StoreWriter(
        url,
        source=f"fake-{modality}",
        modalities={modality: mod.config()},
        tasks={"flag": {"kind": "binary", "definition": FAKE_FLAG}},
        seed=seed,
    )
    writer.write_batch(
        0,
        sample_id=[f"F{i}" for i in range(n)],
        subject_id=[f"FP{i}" for i in range(n)],
        labels={"flag": (np.arange(n) % 2).astype(np.float32)},
        arrays=mod.featurise(raw),
    )
    return writer.finalize()


class WeightChecksum(Callback):
    """A Lightning callback for DDP tests: at the end of training each rank writes the sum of its model's
    weights (float64) to `<out_dir>/weights-rank<r>.txt`, so a test can check that ranks stayed in step."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer, pl_module):
        total = sum(float(p.detach().double().sum()) for p in pl_module.parameters())
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"weights-rank{trainer.global_rank}.txt").write_text(repr(total))


class RowLog(Callback):
    """A Lightning callback for resume tests: after each training step appends `<global step> <rows…>` (the
    store rows of the batch just trained on) to `path`, flushed, so a SIGKILL loses nothing logged. `{rank}`
    in `path` becomes the process's rank; with `epoch`, each line starts with the epoch."""

    def __init__(self, path: str, epoch: bool = False):
        self.path, self.epoch = path, epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        fields = [trainer.current_epoch] * self.epoch + [trainer.global_step, *batch["row"].tolist()]
        with open(self.path.format(rank=trainer.global_rank), "a") as f:
            f.write(" ".join(map(str, fields)) + "\n")
            f.flush()
            os.fsync(f.fileno())


def wandb_summary(run_file: str | os.PathLike) -> dict:
    """The summary of an offline W&B run (`offline-run-*/run-*.wandb`): the last value of each logged key,
    then explicit summary updates, read from the file's records (the LevelDB log format W&B writes: a 7-byte
    header, 32 KiB blocks of records `crc32c(4) length(2) type(1) data`, a record split across blocks as
    first / middle / last). Offline runs write no `wandb-summary.json`; this is how a test reads what
    `wandb sync` would upload."""
    import json

    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # the block's tail is padding
            position += left
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        payload = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    summary: dict = {}
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        which = record.WhichOneof("record_type")
        items = record.history.item if which == "history" else record.summary.update if which == "summary" else ()
        for item in items:
            summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary


# ---- slide files of the formats OpenSlide does not read (written by the tests, `tests/test_slide_formats.py`)
FLUORESCENCE_CHANNELS = ("DAPI", "CD8", "PanCK", "FoxP3")


def tissue_ellipse(height: int, width: int) -> np.ndarray:
    """The tissue of the written test slides: an ellipse in the middle."""
    yy, xx = np.mgrid[0:height, 0:width]
    return ((yy - height / 2) / (height * 0.3)) ** 2 + ((xx - width / 2) / (width * 0.3)) ** 2 < 1


def write_ome_fluorescence(
    path: str | os.PathLike, height: int = 1024, width: int = 1536, mpp: float = 0.5, seed: int = 0
) -> str:
    """A multiplex fluorescence OME-TIFF: four uint16 channels (DAPI bright on tissue, over a dark background),
    tiled, two reduced pyramid levels (SubIFDs), the pixel size in the OME-XML and the resolution tags."""
    import tifffile

    rng = np.random.default_rng(seed)
    tissue = tissue_ellipse(height, width)
    data = np.empty((len(FLUORESCENCE_CHANNELS), height, width), np.uint16)
    data[0] = np.where(tissue, 2000 + 1500 * rng.random((height, width)), 40 * rng.random((height, width)))
    for c in range(1, len(FLUORESCENCE_CHANNELS)):
        data[c] = np.where(tissue, 300 + (600 * c) * rng.random((height, width)), 20)
    options = dict(
        tile=(256, 256),
        photometric="minisblack",
        compression="zlib",
        resolution=(1e4 / mpp, 1e4 / mpp),
        resolutionunit="CENTIMETER",
    )
    metadata = {
        "axes": "CYX",
        "PhysicalSizeX": mpp,
        "PhysicalSizeY": mpp,
        "Channel": {"Name": list(FLUORESCENCE_CHANNELS)},
    }
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(data, subifds=2, metadata=metadata, **options)
        for factor in (2, 4):
            tif.write(data[:, ::factor, ::factor], subfiletype=1, **options)
    return str(path)


def brightfield_image(height: int = 600, width: int = 800) -> np.ndarray:
    """Pale glass and a purple ellipse of tissue, uint8 RGB."""
    rgb = np.full((height, width, 3), 238, np.uint8)
    rgb[tissue_ellipse(height, width)] = (150, 60, 160)
    return rgb


def write_wsi_dicom(
    path: str | os.PathLike, image: np.ndarray, tile: int = 128, spacing_mm: float | None = 0.0005, drop: tuple = ()
) -> str:
    """A VL Whole Slide Microscopy DICOM of `image` (uint8 RGB), uncompressed TILED_FULL frames, with only
    the attributes a reader needs (no series, no optical path: OpenSlide refuses it); `drop` removes more."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    height, width, _ = image.shape
    frames = []
    for ty in range(-(-height // tile)):
        for tx in range(-(-width // tile)):
            frame = np.zeros((tile, tile, 3), np.uint8)
            part = image[ty * tile : (ty + 1) * tile, tx * tile : (tx + 1) * tile]
            frame[: part.shape[0], : part.shape[1]] = part
            frames.append(frame)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.6"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ImageType = "SM", ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.Rows = ds.Columns = tile
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames = len(frames)
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
    ds.DimensionOrganizationType = "TILED_FULL"
    if spacing_mm:
        measures = Dataset()
        measures.PixelSpacing = [spacing_mm, spacing_mm]
        shared = Dataset()
        shared.PixelMeasuresSequence = [measures]
        ds.SharedFunctionalGroupsSequence = [shared]
    ds.PixelData = np.stack(frames).tobytes()
    for key in drop:
        delattr(ds, key)
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def write_vol_scan(
    source: str | os.PathLike, out: str | os.PathLike, pattern: int, bscans: int = 1, layers: np.ndarray | None = None
) -> str:
    """A Heidelberg `.vol` made from `source` (e.g. the shared `test_volume.vol`) with the header's scan pattern
    set to `pattern` (1 line, 2 circle) and `bscans` B-scans kept; `layers` [n, width] (pixels from the top)
    written as the first B-scan's segmentation vectors (ILM, BM, RNFL, … in HEYEX's order)."""
    import struct

    raw = bytearray(Path(source).read_bytes())
    size_x, n_bscans, size_y = struct.unpack_from("<III", raw, 12)
    slo_x, slo_y = struct.unpack_from("<II", raw, 48)
    header_size = struct.unpack_from("<I", raw, 100)[0]
    if bscans > n_bscans:
        raise ValueError(f"{source} has {n_bscans} B-scans, not {bscans}")
    struct.pack_into("<i", raw, 96, pattern)
    struct.pack_into("<I", raw, 16, bscans)
    first = 2048 + slo_x * slo_y  # file header, then the SLO image, then the B-scans
    if layers is not None:
        layers = np.asarray(layers, np.float32)
        if layers.shape[1] != size_x or 256 + layers.nbytes > header_size:
            raise ValueError(f"layers must be [n, {size_x}] and fit the B-scan header")
        struct.pack_into("<II", raw, first + 48, len(layers), 256)
        raw[first + 256 : first + 256 + layers.nbytes] = layers.tobytes()
    end = first + bscans * (header_size + size_x * size_y * 4)
    Path(out).write_bytes(bytes(raw[:end]))
    return str(out)


def write_qptiff(path: str | os.PathLike, names=("CD3", "DAPI", "CD20"), height: int = 512, width: int = 768) -> str:
    """An Akoya/Vectra-style QPTIFF: one uint16 page per channel, each named in its PerkinElmer-QPI XML
    description, a full and a reduced resolution level, resolution tags at 0.5 µm/px."""
    import tifffile

    rng = np.random.default_rng(0)
    tissue = tissue_ellipse(height, width)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for factor, kind in ((1, "FullResolution"), (2, "ReducedResolution")):
            for name in names:
                signal = (
                    1500 + 500 * rng.random((height, width)) if name == "DAPI" else 300 * rng.random((height, width))
                )
                plane = np.where(tissue, signal, 10).astype(np.uint16)[::factor, ::factor]
                description = (
                    '<?xml version="1.0" encoding="utf-8"?>\r\n<PerkinElmer-QPI-ImageDescription>'
                    f"<DescriptionVersion>2</DescriptionVersion><ImageType>{kind}</ImageType><Name>{name}</Name>"
                    "</PerkinElmer-QPI-ImageDescription>"
                )
                tif.write(
                    plane,
                    tile=(256, 256),
                    photometric="minisblack",
                    description=description,
                    metadata=None,
                    resolution=(1e4 / 0.5 / factor, 1e4 / 0.5 / factor),
                    resolutionunit="CENTIMETER",
                )
    return str(path)
