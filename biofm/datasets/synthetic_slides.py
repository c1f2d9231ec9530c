"""Synthetic slides from real tissue, and the synthetic pathology biobank built from them.

Each slide is a pyramidal TIFF (deflate tiles, resolution tags carrying the microns per pixel) of glass
with tissue fragments textured from real images: H&E from crops of OpenSlide's `cmu-1-small-region.svs`
(when `../shared/data/wsi` or a given path has it; otherwise scikit-image's immunohistochemistry image
re-stained to H&E by colour deconvolution) and IHC from scikit-image's immunohistochemistry image.

Biobank metadata tied to the content: `stain` (H&E / IHC: the texture), `specimen` (biopsy: thin cores;
resection: one large piece), `faded` (washed-out staining), `tissue_area` (mm² of tissue) — all visible in
the slide — and `site` (breast / colon / skin), visible only in the report and the case table's clinic.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from biofm.commands import preparer

STAINS = ["H&E", "IHC"]
SPECIMENS = ["biopsy", "resection"]
SITES = ["breast", "colon", "skin"]
CLINICS = {"breast": "breast clinic", "colon": "gastroenterology", "skin": "dermatology"}
BIOBANK_LABELS = ["stain", "specimen", "faded", "tissue_area", "site"]
CASE_COLUMNS = ["age", "sex", "clinic"]


def default_cmu_path() -> Path | None:
    from biofm.testing import SHARED_DATA

    path = SHARED_DATA / "wsi" / "cmu-1-small-region.svs"
    return path if path.exists() else None


class TissueSource:
    """Crops of real tissue per stain, 256 × 256 uint8 RGB."""

    def __init__(self, cmu_path: str | Path | None = None, seed: int = 0):
        from skimage import data

        self.ihc = data.immunohistochemistry()
        cmu_path = default_cmu_path() if cmu_path is None else cmu_path
        self.he_crops = _cmu_crops(cmu_path, seed) if cmu_path else None
        if self.he_crops is None:
            self.he = _restain_he(self.ihc)

    def crop(self, stain: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
        if stain == "H&E" and self.he_crops is not None:
            crop = self.he_crops[rng.integers(len(self.he_crops))]
        else:
            image = self.ihc if stain == "IHC" else self.he
            y, x = rng.integers(0, image.shape[0] - size), rng.integers(0, image.shape[1] - size)
            crop = image[y : y + size, x : x + size]
        crop = np.rot90(crop, k=int(rng.integers(4)))
        return crop[:, ::-1] if rng.random() < 0.5 else crop


def _cmu_crops(path, seed: int, size: int = 256, n: int = 48) -> list[np.ndarray] | None:
    """Crops of the CMU slide where it is (nearly) all tissue."""
    from biofm.modalities.wsi.slide import open_slide, read_rgb, thumbnail, tissue_mask

    slide = open_slide(str(path))
    try:
        ds = 16.0
        mask = tissue_mask(thumbnail(slide, ds))
        width, height = slide.dimensions
        rng = np.random.default_rng(seed)
        crops = []
        for _ in range(4000):
            x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
            window = mask[int(y / ds) : int((y + size) / ds), int(x / ds) : int((x + size) / ds)]
            if window.size and window.mean() > 0.9:
                crops.append(read_rgb(slide, (x, y), 0, (size, size)))
                if len(crops) == n:
                    break
        return crops or None
    finally:
        slide.close()


def _restain_he(ihc: np.ndarray) -> np.ndarray:
    """The IHC image re-stained as H&E: haematoxylin kept, DAB signal moved to the eosin channel."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(ihc)
    he = np.stack([hed[..., 0] * 1.2, hed[..., 2] * 0.8, np.zeros_like(hed[..., 0])], axis=-1)
    return (np.clip(hed2rgb(he), 0, 1) * 255).astype(np.uint8)


def _noise(rng: np.random.Generator, size: int, cells: int = 12) -> np.ndarray:
    from PIL import Image

    coarse = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32) / 255.0 - 0.5


def fragment_mask(rng: np.random.Generator, size: int, specimen: str) -> np.ndarray:
    """Biopsy: 1–3 thin cores (about 2/3 of a 224-px tile wide) at random angles; resection: one large
    irregular piece. Sizes vary widely, so that the tissue area is a task of its own. Large slides get a
    mask drawn at about 1024 px and scaled up."""
    scale = max(1, size // 1024)
    full, size = size, -(-size // scale)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    mask = np.zeros((size, size), bool)
    if specimen == "resection":
        pieces = [
            (
                (0.5 + rng.uniform(-0.06, 0.06), 0.5 + rng.uniform(-0.06, 0.06)),
                (rng.uniform(0.2, 0.42), rng.uniform(0.16, 0.38)),
                rng.uniform(0, np.pi),
            )
        ]
    else:
        count = int(rng.integers(1, 4))
        pieces = [
            (
                (0.5 + rng.uniform(-0.08, 0.08), (i + 0.5) / count + rng.uniform(-0.03, 0.03)),
                (rng.uniform(0.28, 0.42), rng.uniform(70, 90) / full),
                rng.uniform(-0.25, 0.25),
            )
            for i in range(count)
        ]
    wobble = _noise(rng, size)
    for (cx, cy), (a, b), angle in pieces:
        u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
        v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
        mask |= (u / a) ** 2 + (v / b) ** 2 + 0.5 * wobble < 1.0
    if scale > 1:
        mask = np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1)[:full, :full]
    return mask


def synthetic_slide(
    rng: np.random.Generator, source: TissueSource, stain: str, specimen: str, faded: bool, size: int = 1344
) -> tuple[np.ndarray, np.ndarray]:
    """An RGB slide [size, size, 3] and its tissue mask."""
    texture = np.zeros((size, size, 3), np.uint8)
    for top in range(0, size, 256):
        for left in range(0, size, 256):
            crop = source.crop(stain, rng)
            texture[top : top + 256, left : left + 256] = crop[: size - top, : size - left]
    if faded:
        texture = (255 - (255 - texture.astype(np.float32)) * 0.45).astype(np.uint8)
    mask = fragment_mask(rng, size, specimen)
    glass = np.clip(np.array([244, 243, 241], np.float32) + rng.normal(0, 2.0, (size, size, 1)), 0, 255)
    return np.where(mask[..., None], texture, glass.astype(np.uint8)), mask


def write_pyramid_tiff(path: str | Path, rgb: np.ndarray, mpp: float, levels: int = 3, tile: int = 256) -> None:
    """A tiled pyramidal TIFF that OpenSlide reads as a generic TIFF; resolution tags give `mpp`."""
    import tifffile
    from PIL import Image

    image = rgb
    with tifffile.TiffWriter(str(path)) as tif:
        for level in range(levels):
            per_cm = 1e4 / (mpp * 2**level)
            tif.write(
                image,
                tile=(tile, tile),
                compression="zlib",
                photometric="rgb",
                resolution=(per_cm, per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
            )
            if min(image.shape[:2]) // 2 < 16:
                break
            image = np.asarray(Image.fromarray(image).reduce(2))


def biobank_cases(n: int, seed: int = 0) -> pd.DataFrame:
    """Per slide: ids, metadata labels, case columns and a report (no files yet)."""
    rng = np.random.default_rng(seed)
    n_subjects = max(1, int(round(n * 0.8)))
    subject = np.sort(rng.integers(0, n_subjects, size=n))
    stain = rng.choice(STAINS, size=n)
    specimen = rng.choice(SPECIMENS, size=n)
    faded = (rng.random(n) < 0.35).astype(int)
    site = rng.choice(SITES, size=n)
    clinic = [CLINICS[s] if rng.random() < 0.75 else CLINICS[str(rng.choice(SITES))] for s in site]
    reports = []
    for i in range(n):
        parts = []
        if rng.random() < 0.7:
            parts.append(f"{site[i]} tissue received")
        else:
            parts.append("tissue received in formalin")
        if rng.random() < 0.4:
            parts.append("core needle biopsy" if specimen[i] == "biopsy" else "excision specimen")
        parts.append(
            str(rng.choice(["sections examined", "clinical history noted", "levels cut", "gross description attached"]))
        )
        rng.shuffle(parts)
        reports.append(". ".join(parts) + ".")
    # by subject, with a test share large enough to score five tasks on a few dozen slides
    from biofm.platform.store import subject_splits

    subject_ids = np.array([f"BBP-{seed}-{s:05d}" for s in subject])
    return pd.DataFrame(
        {
            "sample_id": [f"BB-{seed}-{i:05d}" for i in range(n)],
            "subject_id": subject_ids,
            "split": subject_splits(subject_ids, (0.6, 0.1, 0.3), seed),
            "stain": stain,
            "specimen": specimen,
            "faded": faded,
            "site": site,
            "age": np.round(rng.normal(62, 11, n), 0),
            "sex": rng.choice(["F", "M"], size=n),
            "clinic": clinic,
            "report": reports,
        }
    )


def write_biobank(
    folder: str | Path,
    n: int = 60,
    seed: int = 0,
    size: int = 1344,
    mpp: float = 0.5,
    cmu_path: str | Path | None = None,
    progress: bool = False,
) -> Path:
    """Write `n` synthetic slides under `folder/slides/` and `folder/manifest.csv`; returns the manifest."""
    from biofm.datasets.outputs import track

    folder = Path(folder)
    (folder / "slides").mkdir(parents=True, exist_ok=True)
    cases = biobank_cases(n, seed)
    source = TissueSource(cmu_path, seed)
    areas, paths = [], []
    for i in track(range(n), progress, n, "writing synthetic slides"):
        rng = np.random.default_rng([seed, i])
        rgb, mask = synthetic_slide(rng, source, cases["stain"][i], cases["specimen"][i], bool(cases["faded"][i]), size)
        name = f"slide-{i:05d}.tiff"
        write_pyramid_tiff(folder / "slides" / name, rgb, mpp)
        areas.append(round(float(mask.sum()) * mpp * mpp / 1e6, 4))
        paths.append(f"slides/{name}")
    cases.insert(0, "slide_path", paths)
    cases["tissue_area"] = areas
    manifest = folder / "manifest.csv"
    cases.to_csv(manifest, index=False)
    return manifest


def prepare_biobank(
    slides_dir: str | Path,
    out: str,
    n: int = 60,
    seed: int = 0,
    size: int = 1344,
    overwrite: bool = False,
    progress: bool = False,
):
    """Write `n` synthetic biobank slides (with manifest) under `slides_dir` and prepare them into the store
    `out` with the biobank's labels and case columns; returns `(manifest, prepare_slides' result)`."""
    from biofm.datasets.slides import prepare_slides

    manifest = write_biobank(slides_dir, n=n, seed=seed, size=size, progress=progress)
    result = prepare_slides(
        str(manifest),
        str(out),
        label_columns=BIOBANK_LABELS,
        case_columns=CASE_COLUMNS,
        seed=seed,
        overwrite=overwrite,
        progress=progress,
    )
    return manifest, result


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="store to write")
    p.add_argument("--slides-dir", default=None, help="where the slides and manifest go (default <out>.slides)")
    p.add_argument("--n", type=int, default=60, help="number of slides (default 60)")
    p.add_argument("--size", type=int, default=1344, help="slide side in pixels at 0.5 µm/px (default 1344)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


@preparer("synthetic-biobank", _arguments)
def _run(args: argparse.Namespace) -> None:
    """Synthetic pathology biobank: slides from real tissue + reports + case table → slide metadata."""
    from biofm.datasets.slides import print_summary
    from biofm.platform.writing import writing

    folder = Path(args.slides_dir or str(args.out).rstrip("/") + ".slides")
    with writing(args.out):  # an --out that is not a store is refused before any slide is written
        _, result = prepare_biobank(
            folder, args.out, n=args.n, seed=args.seed, size=args.size, overwrite=args.overwrite, progress=True
        )
    print_summary(result, args.out)
