"""Reading whole slides through OpenSlide: microns per pixel, pyramid levels, thumbnails, tissue, tiles.

Nothing here loads a whole slide: thumbnails are read from the pyramid level nearest their scale, in
strips, and tiles one region at a time at the best level for the target microns per pixel.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

# what a scanned microscope slide can have; a value outside is metadata gone wrong (72 dpi → 352.8 µm/px)
MPP_RANGE = (0.05, 20.0)
LEVEL_TOLERANCE = 0.02  # a level up to 2% coarser than wanted still counts as "at" the wanted scale
STRIP_PIXELS = 1 << 24  # pixels per read while building a thumbnail (64 MiB of RGBA)
DARK = 60  # a brightfield thumbnail whose median brightness is below this looks like fluorescence


class SlideError(Exception):
    """A slide that cannot be processed; the message is the per-slide status reason."""


@dataclass(frozen=True)
class SlideRef:
    """One slide to process: its path and, optionally, the manifest's microns per pixel and a value to
    assume when neither the slide nor the manifest has one, and the fluorescence channels to show."""

    path: str
    mpp: float | None = None
    assume_mpp: float | None = None
    channels: tuple[str, ...] | None = None  # fluorescence channels shown to the patch encoder

    @classmethod
    def of(cls, raw) -> SlideRef:
        if isinstance(raw, SlideRef):
            return raw
        if isinstance(raw, dict):
            return cls(
                str(raw["path"]),
                _number(raw.get("mpp")),
                _number(raw.get("assume_mpp")),
                channel_list(raw.get("channels")),
            )
        return cls(str(raw))


def channel_list(value) -> tuple[str, ...] | None:
    """Channels as a manifest cell gives them (`DAPI;CD8;PanCK`) or as a list; None for none (or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    names = value.split(";") if isinstance(value, str) else value
    return tuple(str(c).strip() for c in names if str(c).strip()) or None


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def open_slide(path: str, channels: list | tuple | None = None):
    """A slide handle with OpenSlide's interface: OpenSlide for the formats it reads; tifffile for TIFFs of
    several grey channels (fluorescence, which OpenSlide would read as one grey plane) and for TIFFs it
    refuses; pydicom for DICOM whole-slide images it refuses; a plain image through OpenSlide's PIL fallback,
    with the TIFF resolution tags it misses (`biofm.modalities.wsi.readers`). `channels`: the fluorescence
    channels shown to the patch encoder (names or indices, up to 3)."""
    import openslide

    from biofm.modalities.wsi.readers import DicomSlide, ReaderError, TiffSlide, is_dicom, is_tiff_like, tiff_properties

    if not os.path.exists(path):
        raise SlideError("the slide file does not exist")
    tiff = is_tiff_like(path)
    if (tiff or path.lower().endswith(".ndpi")) and _multichannel(path):  # a fluorescence NDPI is grey planes
        try:
            return TiffSlide(path, channels)
        except ReaderError as err:
            raise SlideError(f"a multi-channel TIFF that cannot be read: {err}") from None
    if os.path.isdir(path) or is_dicom(path):
        return _dicom(path, DicomSlide, ReaderError, openslide)
    refused = None  # what OpenSlide said, when it knew the format but could not read it
    try:
        return openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError:
        pass
    except openslide.OpenSlideError as err:
        if not tiff:
            raise SlideError(f"OpenSlide cannot open it: {err}") from None
        refused = str(err)
    if tiff:
        try:
            return TiffSlide(path, channels)
        except ReaderError as err:
            if refused:
                raise SlideError(f"OpenSlide cannot open it: {refused}; nor can tifffile: {err}") from None
    try:
        slide = openslide.ImageSlide(path)
        slide.dimensions  # noqa: B018 — PIL parses the header here
    except Exception as err:  # noqa: BLE001 — PIL raises many kinds
        raise SlideError(
            f"not a format OpenSlide reads, nor an image PIL opens ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'})"
        ) from None
    slide.extra_properties = tiff_properties(path)  # PIL's fallback keeps no resolution tags
    return slide


def _multichannel(path: str) -> bool:
    """A TIFF whose first series is not 8-bit RGB (several grey channels, or one): fluorescence."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            samples = series.shape[series.axes.index("S")] if "S" in series.axes else 1
            return not (samples in (3, 4) and series.dtype == np.uint8)
    except Exception:  # noqa: BLE001 — not a TIFF tifffile reads: OpenSlide or PIL decide
        return False


def _dicom(path: str, reader, reader_error, openslide):
    """OpenSlide first (it reads complete DICOM WSI series); pydicom's frames where it refuses."""
    opened = None
    if not os.path.isdir(path):
        try:
            opened = openslide.OpenSlide(path)
        except openslide.OpenSlideError:
            opened = None
    if opened is not None:
        return opened
    try:
        return reader(path)
    except reader_error as err:
        raise SlideError(f"a DICOM slide that cannot be read: {err}") from None


def _plausible(mpp: float) -> bool:
    return MPP_RANGE[0] <= mpp <= MPP_RANGE[1]


def resolve_mpp(properties: dict, ref: SlideRef) -> tuple[float, str, list[str]]:
    """Microns per pixel at level 0, from (in order) the slide's properties, its TIFF resolution, its
    objective power, the manifest, and a value the user asked to assume. Returns (mpp, where it came
    from, notes on the sources passed over); raises SlideError when none is usable."""
    notes: list[str] = []

    def candidate(source: str, value: float | None) -> float | None:
        if value is None:
            return None
        if not _plausible(value):
            notes.append(f"{source} give {value:.4g} µm/px, outside the plausible {MPP_RANGE[0]}–{MPP_RANGE[1]} µm/px")
            return None
        return value

    def pair(x_key: str, y_key: str) -> float | None:
        x, y = _number(properties.get(x_key)), _number(properties.get(y_key))
        if x is None or x <= 0:
            return None
        return (x + y) / 2 if y and y > 0 else x

    tiff = None
    unit = str(properties.get("tiff.ResolutionUnit", "")).lower()
    per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    resolution = pair("tiff.XResolution", "tiff.YResolution")
    if per_unit and resolution:
        tiff = per_unit / resolution
    power = _number(properties.get("openslide.objective-power"))
    sources = [
        ("the slide's properties", pair("openslide.mpp-x", "openslide.mpp-y")),
        ("the TIFF resolution tags", tiff),
        ("the objective power", 10.0 / power if power and power > 0 else None),
        ("the manifest's mpp", ref.mpp),
        ("the assumed mpp", ref.assume_mpp),
    ]
    for source, value in sources:
        mpp = candidate(source, value)
        if mpp is not None:
            return mpp, source, notes
    found = "; ".join(notes) if notes else "the slide has no resolution metadata"
    raise SlideError(
        f"no usable microns per pixel ({found}); give the slide's mpp in the manifest's `mpp` "
        "column, or pass --assume-mpp to use one value for such slides"
    )


def best_level(downsamples, wanted: float, tolerance: float = LEVEL_TOLERANCE) -> int:
    """The coarsest pyramid level that is still at least as fine as `wanted` (within `tolerance`)."""
    fits = [(d, i) for i, d in enumerate(downsamples) if d <= wanted * (1 + tolerance)]
    return max(fits)[1] if fits else 0


def read_rgb(slide, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
    """A region as uint8 RGB [h, w, 3]; transparent pixels (outside the scanned area) become white."""
    try:
        rgba = np.asarray(slide.read_region(location, level, size))
    except Exception as err:  # noqa: BLE001 — OpenSlide and PIL raise their own kinds
        raise SlideError(f"reading the region at {location} (level {level}) failed: {err}") from None
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.float32) / 255.0
    return (rgb * a + 255.0 * (1.0 - a)).round().astype(np.uint8)


def thumbnail(slide, downsample: float) -> np.ndarray:
    """The slide at `downsample` × level 0 as uint8 RGB, read in strips from the best level."""
    from PIL import Image

    width, height = slide.dimensions
    out_w, out_h = max(1, round(width / downsample)), max(1, round(height / downsample))
    level = best_level(slide.level_downsamples, downsample)
    level_w, level_h = slide.level_dimensions[level]
    level_ds = slide.level_downsamples[level]
    rows = max(1, STRIP_PIXELS // max(level_w, 1))
    strips = []
    for top in range(0, level_h, rows):
        h = min(rows, level_h - top)
        strip = read_rgb(slide, (0, round(top * level_ds)), level, (level_w, h))
        strip_h = max(1, round(h * out_h / level_h))
        strips.append(np.asarray(Image.fromarray(strip).resize((out_w, strip_h), Image.BILINEAR)))
    image = np.concatenate(strips, axis=0)
    if image.shape[0] != out_h:
        image = np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.BILINEAR))
    return image


def tissue_mask(
    rgb: np.ndarray, min_saturation: float = 0.05, max_saturation: float = 0.08, closing: int = 2, min_area: int = 16
) -> np.ndarray:
    """Tissue on a thumbnail: HSV saturation above Otsu's threshold kept within [`min_saturation`,
    `max_saturation`], closed, small specks removed, holes filled. Glass is bright and grey (saturation
    about 0.01); the cap keeps Otsu from splitting strongly from faintly stained tissue (brown DAB against
    pale haematoxylin) instead of tissue from glass."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    x = rgb.astype(np.float32)
    high, low = x.max(axis=2), x.min(axis=2)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)
    saturation = ndimage.median_filter(saturation, size=3)
    threshold = min_saturation
    if saturation.max() - saturation.min() > 1e-3:
        threshold = min(max(float(threshold_otsu(saturation)), min_saturation), max_saturation)
    return _cleaned(saturation > threshold, closing, min_area)


def _cleaned(mask: np.ndarray, closing: int, min_area: int) -> np.ndarray:
    """A raw tissue mask closed (a disk of radius `closing`), specks under `min_area` pixels removed, holes
    filled."""
    from scipy import ndimage

    if closing:
        structure = _disk(closing)
        mask = ndimage.binary_closing(np.pad(mask, closing), structure=structure)[closing:-closing, closing:-closing]
    labels, count = ndimage.label(mask)
    if count:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
        mask = np.isin(labels, 1 + np.flatnonzero(sizes >= min_area))
    return ndimage.binary_fill_holes(mask)


def fluorescence_mask(intensity: np.ndarray, closing: int = 2, min_area: int = 16) -> np.ndarray:
    """Tissue on a fluorescence thumbnail: the nuclear channel's log intensity above Otsu's threshold (bright
    nuclei over a dark background; brightfield's saturation rule would see nothing there), closed, small
    specks removed, holes filled."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    x = np.log1p(np.maximum(intensity.astype(np.float32), 0.0))
    x = ndimage.median_filter(x, size=3)
    if x.max() - x.min() < 1e-6:
        return np.zeros(x.shape, bool)
    return _cleaned(x > float(threshold_otsu(x)), closing, min_area)


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def tile_grid(
    dimensions: tuple[int, int],
    extent: float,
    mask: np.ndarray,
    mask_downsample: tuple[float, float],
    min_tissue: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 top-left corners [T, 2] (x, y) of the non-overlapping tiles of side `extent` (level-0
    pixels) whose tissue fraction on `mask` is at least `min_tissue`, and those fractions [T]."""
    width, height = dimensions
    nx, ny = int(width // extent), int(height // extent)
    if nx == 0 or ny == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    mh, mw = mask.shape
    dx, dy = mask_downsample
    x0 = np.round(np.arange(nx) * extent).astype(np.int64)
    y0 = np.round(np.arange(ny) * extent).astype(np.int64)
    cx0 = np.clip(np.floor(x0 / dx).astype(int), 0, mw - 1)
    cx1 = np.clip(np.ceil((x0 + extent) / dx).astype(int), cx0 + 1, mw)
    cy0 = np.clip(np.floor(y0 / dy).astype(int), 0, mh - 1)
    cy1 = np.clip(np.ceil((y0 + extent) / dy).astype(int), cy0 + 1, mh)
    Y0, X0 = np.meshgrid(cy0, cx0, indexing="ij")
    Y1, X1 = np.meshgrid(cy1, cx1, indexing="ij")
    inside = integral[Y1, X1] - integral[Y0, X1] - integral[Y1, X0] + integral[Y0, X0]
    fraction = inside / ((Y1 - Y0) * (X1 - X0))
    keep = fraction >= min_tissue
    ys, xs = np.nonzero(keep)
    coords = np.stack([x0[xs], y0[ys]], axis=1)
    return coords, fraction[keep].astype(np.float32)


@dataclass
class TilePlan:
    """Where to read a slide's tiles: level-0 corners, the level and region size to read there."""

    coords: np.ndarray  # [T, 2] int64, level-0 (x, y)
    tissue: np.ndarray  # [T] float32
    level: int
    read_size: int  # pixels at `level`
    tile_size: int  # pixels after resizing
    extent: float  # level-0 pixels per tile side
    mpp: float
    mpp_source: str
    notes: list[str]
    dimensions: tuple[int, int]
    mask_downsample: tuple[float, float]


def plan_tiles(
    slide,
    ref: SlideRef,
    target_mpp: float = 0.5,
    tile_size: int = 224,
    min_tissue: float = 0.25,
    thumbnail_mpp: float = 8.0,
) -> TilePlan:
    """Microns per pixel, a tissue mask on a thumbnail, and the tiles to read at `target_mpp`."""
    properties = {**getattr(slide, "extra_properties", {}), **dict(slide.properties)}
    mpp, source, notes = resolve_mpp(properties, ref)
    extent = tile_size * target_mpp / mpp  # level-0 pixels per tile side
    level = best_level(slide.level_downsamples, target_mpp / mpp)
    read_size = max(1, round(extent / slide.level_downsamples[level]))
    dims = tuple(int(v) for v in slide.dimensions)
    if getattr(slide, "kind", "brightfield") == "fluorescence":
        nuclear = slide.nuclear_channel
        mask = fluorescence_mask(slide.channel_thumbnail(nuclear, max(1.0, thumbnail_mpp / mpp)))
        notes.append(
            f"fluorescence, {len(slide.channel_names)} channels: tissue from the nuclear channel "
            f"'{slide.channel_names[nuclear]}' over the dark background; the patch encoder sees "
            f"{', '.join(slide.shown_names)} as red, green, blue"
        )
    else:
        thumb = thumbnail(slide, max(1.0, thumbnail_mpp / mpp))
        mask = tissue_mask(thumb)
        if float(np.median(thumb)) < DARK:
            notes.append(
                "a dark background (median brightness "
                f"{float(np.median(thumb)):.0f} of 255), as of fluorescence, tiled with the brightfield saturation "
                "rule: if it is fluorescence, give it as a multi-channel TIFF (QPTIFF, OME-TIFF)"
            )
    mask_ds = (dims[0] / mask.shape[1], dims[1] / mask.shape[0])
    coords, tissue = tile_grid(dims, extent, mask, mask_ds, min_tissue)
    return TilePlan(coords, tissue, level, read_size, tile_size, extent, mpp, source, notes, dims, mask_ds)


def read_tile(slide, plan: TilePlan, x: int, y: int) -> np.ndarray:
    """One tile at the target scale, uint8 [tile_size, tile_size, 3]."""
    rgb = read_rgb(slide, (int(x), int(y)), plan.level, (plan.read_size, plan.read_size))
    if plan.read_size != plan.tile_size:
        from PIL import Image

        rgb = np.asarray(Image.fromarray(rgb).resize((plan.tile_size, plan.tile_size), Image.BILINEAR))
    return rgb
