"""Slides that OpenSlide does not read, or reads wrongly, behind OpenSlide's interface (`dimensions`,
`level_dimensions`, `level_downsamples`, `properties`, `read_region`, `close`):

- `TiffSlide` (tifffile): multiplex fluorescence (Akoya/Vectra QPTIFF, OME-TIFF, any TIFF of several grey
  channels) and brightfield TIFFs OpenSlide refuses. OpenSlide opens an OME-TIFF of four channels as a grey
  "generic TIFF" of its first plane; here every channel and pyramid level is read, up to three channels are
  shown to the patch encoder (red, green, blue, each scaled by its own 0.5–99.8 percentile range on the
  smallest level), and tissue is found on the nuclear channel (`nuclear_channel`).
- `DicomSlide` (pydicom, frame by frame): VL Whole Slide Microscopy images OpenSlide refuses (incomplete
  attributes); a file, or a folder of one series' files (one per level). When even this fails, the reason
  names the missing attribute in words.

`tiff_properties` reads the TIFF resolution tags (and OME's physical pixel size) of any TIFF-like file, for
the slides OpenSlide opens without them (its PIL fallback reads none).
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from biofm.modalities.dicom import pixel_spacing

TIFF_SUFFIXES = (".tif", ".tiff", ".qptiff", ".btf")
NUCLEAR = re.compile(r"dapi|hoechst|nucle|dna", re.IGNORECASE)
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


class ReaderError(Exception):
    """Why a reader cannot read a file, in words (the slide's status reason)."""


def is_tiff_like(path: str) -> bool:
    return str(path).lower().endswith(TIFF_SUFFIXES)


def is_dicom(path: str) -> bool:
    p = Path(path)
    if p.is_dir():
        return any(p.glob("*.dcm"))
    if p.suffix.lower() == ".dcm":
        return True
    try:
        with open(p, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------- TIFF
def tiff_properties(path: str) -> dict[str, str]:
    """OpenSlide-style properties from a TIFF's first page: `tiff.XResolution`, `tiff.YResolution`,
    `tiff.ResolutionUnit` and, from OME-XML, `openslide.mpp-x` / `-y` (µm). Empty when not a TIFF."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return _page_properties(tif)
    except Exception:  # noqa: BLE001 — not a TIFF tifffile reads: nothing to add
        return {}


def _page_properties(tif) -> dict[str, str]:
    page = tif.pages.first
    out: dict[str, str] = {}
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    for name in ("XResolution", "YResolution"):
        tag = tags.get(name)
        if tag is not None:
            numerator, denominator = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
            if denominator:
                out[f"tiff.{name}"] = repr(numerator / denominator)
    if unit is not None:
        out["tiff.ResolutionUnit"] = {1: "none", 2: "inch", 3: "centimeter"}.get(int(unit.value), "none")
    if tif.is_ome and tif.ome_metadata:
        pixels = re.search(r"<Pixels\b[^>]*>", tif.ome_metadata)
        attrs = dict(re.findall(r'(\w+)="([^"]*)"', pixels.group(0))) if pixels else {}
        scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}
        for axis in ("X", "Y"):
            size, unit_name = attrs.get(f"PhysicalSize{axis}"), attrs.get(f"PhysicalSize{axis}Unit", "µm")
            if size and unit_name in scale:
                out[f"openslide.mpp-{axis.lower()}"] = repr(float(size) * scale[unit_name])
    return out


def _channel_names(tif, count: int) -> list[str]:
    names: list[str] = []
    if tif.is_ome and tif.ome_metadata:
        names = re.findall(r"<Channel\b[^>]*\bName=\"([^\"]*)\"", tif.ome_metadata)
    elif "<Name>" in (tif.pages.first.description or ""):  # QPTIFF: a page per channel, named in its XML
        for page in tif.pages[:count]:
            found = re.search(r"<Name>([^<]*)</Name>", page.description or "")
            names.append(found.group(1) if found else "")
    if len(names) != count or not all(names):
        names = [names[i] if i < len(names) and names[i] else f"channel {i}" for i in range(count)]
    return names


class TiffSlide:
    """A TIFF-like slide through tifffile and zarr, every pyramid level and channel (see the module's doc)."""

    def __init__(self, path: str, channels: list | tuple | None = None):
        import tifffile
        import zarr

        try:
            self._tif = tifffile.TiffFile(path)
        except Exception as err:  # noqa: BLE001 — tifffile raises TiffFileError, ValueError, …
            raise ReaderError(f"tifffile cannot read it ({type(err).__name__}: {str(err)[:120]})") from None
        series = self._tif.series[0]
        axes, shape = series.axes, series.shape
        kept = [a for a, n in zip(axes, shape) if n > 1 or a in "YX"]
        if "Y" not in kept or "X" not in kept or len(kept) > 3 or (len(kept) == 3 and "YX" not in "".join(kept)):
            self._tif.close()
            raise ReaderError(f"its image axes are {axes} {tuple(shape)}; a slide is YX, CYX or YXS")
        self._axes, self._shape = axes, shape
        self.rgb = "S" in kept and shape[axes.index("S")] in (3, 4) and series.dtype == np.uint8
        self.kind = "brightfield" if self.rgb else "fluorescence"
        others = [a for a in kept if a not in "YX" and not (a == "S" and self.rgb)]
        self._channel_axis = others[0] if others else None  # C (or the samples of a non-8-bit RGB)
        count = shape[axes.index(self._channel_axis)] if self._channel_axis else 1
        self.channel_names = ["RGB"] if self.rgb else _channel_names(self._tif, count)
        self.properties = _page_properties(self._tif)
        self.properties["openslide.vendor"] = "tifffile"
        self._levels = [zarr.open(series.aszarr(level=i), mode="r") for i in range(len(series.levels))]
        height, width = shape[axes.index("Y")], shape[axes.index("X")]
        self.dimensions = (int(width), int(height))
        self.level_dimensions = [
            (int(level.shape[axes.index("X")]), int(level.shape[axes.index("Y")])) for level in series.levels
        ]
        self.level_downsamples = [width / w for w, _ in self.level_dimensions]
        self.level_count = len(self.level_dimensions)
        self.nuclear_channel = next((i for i, n in enumerate(self.channel_names) if NUCLEAR.search(n)), 0)
        self._ranges: dict[int, tuple[float, float]] = {}
        try:  # one pixel of the smallest level: a compression tifffile cannot decode fails here, not mid-run
            self._plane(self.level_count - 1, 0, slice(0, 1), slice(0, 1))
        except Exception as err:  # noqa: BLE001 — tifffile and its codecs raise their own kinds
            self._tif.close()
            raise ReaderError(f"its pixels cannot be decoded ({str(err)[:120]})") from None
        try:
            self.shown = self._choose(channels)
        except ReaderError:
            self._tif.close()
            raise

    def _choose(self, channels) -> list[int]:
        if self.rgb:
            return [0]
        if not channels:
            rest = [i for i in range(len(self.channel_names)) if i != self.nuclear_channel]
            return [self.nuclear_channel, *rest][:3]
        chosen = []
        for c in channels:
            text = str(c).strip()
            if text.isdigit() and int(text) < len(self.channel_names):
                chosen.append(int(text))
            elif text in self.channel_names:
                chosen.append(self.channel_names.index(text))
            else:
                raise ReaderError(
                    f"it has no channel {text!r}; its channels are {self.channel_names} (names or 0-based indices)"
                )
        if len(chosen) > 3:
            raise ReaderError(f"{len(chosen)} channels chosen; the patch encoder takes up to 3 (red, green, blue)")
        return chosen

    @property
    def shown_names(self) -> list[str]:
        return [self.channel_names[i] for i in self.shown]

    def _plane(self, level: int, channel: int, y: slice, x: slice) -> np.ndarray:
        index = []
        for axis, n in zip(self._axes, self._levels[level].shape):
            if axis == "Y":
                index.append(y)
            elif axis == "X":
                index.append(x)
            elif axis == self._channel_axis:
                index.append(channel)
            elif axis == "S":
                index.append(slice(None))
            else:
                index.append(0)
        return np.asarray(self._levels[level][tuple(index)])

    def channel_range(self, channel: int) -> tuple[float, float]:
        """Display range of a channel: its 0.5 and 99.8 percentiles on the smallest level."""
        if channel not in self._ranges:
            small = self._plane(self.level_count - 1, channel, slice(None), slice(None)).astype(np.float32)
            low, high = np.percentile(small, [0.5, 99.8])
            self._ranges[channel] = (float(low), float(max(high, low + 1e-6)))
        return self._ranges[channel]

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]):
        """The region as a PIL RGBA image, OpenSlide's contract: `location` in level-0 pixels, `size` at
        `level`; outside the image transparent (brightfield) or black (fluorescence)."""
        from PIL import Image

        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        x0, y0 = int(math.floor(location[0] / ds)), int(math.floor(location[1] / ds))
        w, h = int(size[0]), int(size[1])
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, lw), min(y0 + h, lh)
        out = np.zeros((h, w, 4), np.uint8)
        if xb > xa and yb > ya:
            ys, xs = slice(ya, yb), slice(xa, xb)
            target = (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
            if self.rgb:
                out[target[0], target[1], :3] = self._plane(level, 0, ys, xs)[..., :3]
            else:
                for plane, channel in enumerate(self.shown):
                    low, high = self.channel_range(channel)
                    raw = self._plane(level, channel, ys, xs).astype(np.float32)
                    out[target[0], target[1], plane] = np.clip((raw - low) / (high - low) * 255.0, 0, 255)
                if len(self.shown) == 1:
                    out[target[0], target[1], 1] = out[target[0], target[1], 2] = out[target[0], target[1], 0]
            out[target[0], target[1], 3] = 255
        if not self.rgb:
            out[..., 3] = 255  # fluorescence: black outside, as its background
        return Image.fromarray(out, "RGBA")

    def channel_thumbnail(self, channel: int, downsample: float) -> np.ndarray:
        """One channel's raw intensities at `downsample` × level 0 (float32), from the best level."""
        from PIL import Image

        from biofm.modalities.wsi.slide import best_level

        level = best_level(self.level_downsamples, downsample)
        plane = self._plane(level, channel, slice(None), slice(None)).astype(np.float32)
        width, height = self.dimensions
        out = (max(1, round(width / downsample)), max(1, round(height / downsample)))
        return np.asarray(Image.fromarray(plane, mode="F").resize(out, Image.BILINEAR))

    def close(self) -> None:
        self._tif.close()


# --------------------------------------------------------------------------------------------------- DICOM
_NEEDED = {
    "TotalPixelMatrixColumns": "the slide's width in pixels (TotalPixelMatrixColumns)",
    "TotalPixelMatrixRows": "the slide's height in pixels (TotalPixelMatrixRows)",
    "Columns": "the tile width (Columns)",
    "Rows": "the tile height (Rows)",
    "PixelData": "the image data (PixelData)",
}


class _DicomLevel:
    def __init__(self, path: str, ds):
        missing = [words for key, words in _NEEDED.items() if key not in ds]
        if missing:
            raise ReaderError(f"the DICOM lacks {', '.join(missing)}")
        self.path, self.ds = path, ds
        self.width, self.height = int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)
        self.tile_w, self.tile_h = int(ds.Columns), int(ds.Rows)
        self.frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        self.across = -(-self.width // self.tile_w)
        down = -(-self.height // self.tile_h)
        organisation = str(getattr(ds, "DimensionOrganizationType", "TILED_FULL"))
        self.positions: dict[tuple[int, int], int] = {}
        if organisation == "TILED_SPARSE" or (
            self.frames != self.across * down and "PerFrameFunctionalGroupsSequence" in ds
        ):
            for i, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
                position = group.PlanePositionSlideSequence[0]
                column = int(position.ColumnPositionInTotalImagePixelMatrix) - 1
                row = int(position.RowPositionInTotalImagePixelMatrix) - 1
                self.positions[(column // self.tile_w, row // self.tile_h)] = i
        elif self.frames < self.across * down:
            raise ReaderError(
                f"the DICOM holds {self.frames} tiles where its {self.width} × {self.height} pixels in tiles of "
                f"{self.tile_w} × {self.tile_h} need {self.across * down}, and it has no per-frame positions "
                "(PerFrameFunctionalGroupsSequence)"
            )
        self.samples = int(getattr(ds, "SamplesPerPixel", 3))

    def frame_index(self, tx: int, ty: int) -> int | None:
        if self.positions:
            return self.positions.get((tx, ty))
        return ty * self.across + tx


class DicomSlide:
    """A DICOM whole-slide image, tile frames decoded one by one (pydicom; JPEG through Pillow)."""

    def __init__(self, path: str):
        import pydicom

        files = sorted(Path(path).glob("*.dcm")) if Path(path).is_dir() else [Path(path)]
        levels = []
        reasons = []
        for file in files:
            try:
                ds = pydicom.dcmread(file, stop_before_pixels=False, defer_size="1 KB")
            except Exception as err:  # noqa: BLE001 — pydicom raises InvalidDicomError, OSError, …
                reasons.append(f"{file.name}: not DICOM ({type(err).__name__})")
                continue
            sop = str(getattr(ds, "SOPClassUID", ""))
            if sop and sop != WSI_SOP_CLASS:
                reasons.append(f"{file.name}: not a whole-slide microscopy image (SOP class {sop})")
                continue
            image_type = [str(v).upper() for v in getattr(ds, "ImageType", [])]
            if len(image_type) > 2 and image_type[2] in ("LABEL", "OVERVIEW", "THUMBNAIL"):
                continue  # the label and overview images are not pyramid levels
            try:
                levels.append(_DicomLevel(str(file), ds))
            except ReaderError as err:
                reasons.append(str(err) if len(files) == 1 else f"{file.name}: {err}")
        if not levels:
            raise ReaderError("; ".join(reasons) or "the folder holds no DICOM whole-slide image")
        levels.sort(key=lambda level: -level.width)
        self._levels = levels
        base = levels[0]
        self.dimensions = (base.width, base.height)
        self.level_dimensions = [(level.width, level.height) for level in levels]
        self.level_downsamples = [base.width / level.width for level in levels]
        self.level_count = len(levels)
        self.kind = "brightfield" if base.samples == 3 else "fluorescence-dicom"
        self.properties = {"openslide.vendor": "dicom (pydicom)"}
        spacing = pixel_spacing(base.ds)
        if spacing:
            self.properties["openslide.mpp-y"], self.properties["openslide.mpp-x"] = (
                repr(spacing[0] * 1000.0),
                repr(spacing[1] * 1000.0),
            )
        self._frame = lru_cache(maxsize=256)(self._decode)

    def _decode(self, level: int, index: int) -> np.ndarray:
        from pydicom.pixels import pixel_array

        found = self._levels[level]
        try:
            frame = pixel_array(found.ds, index=index) if found.frames > 1 else pixel_array(found.ds)
        except Exception as err:  # noqa: BLE001 — a decoder missing or a damaged frame
            raise ReaderError(
                f"tile {index} of the DICOM cannot be decoded ({type(err).__name__}: {str(err)[:100]})"
            ) from None
        if frame.ndim == 2:
            frame = np.repeat(frame[..., None], 3, axis=2)
        return frame[..., :3].astype(np.uint8)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]):
        from PIL import Image

        found = self._levels[level]
        ds = self.level_downsamples[level]
        x0, y0 = int(math.floor(location[0] / ds)), int(math.floor(location[1] / ds))
        w, h = int(size[0]), int(size[1])
        out = np.zeros((h, w, 4), np.uint8)
        for ty in range(
            max(0, y0 // found.tile_h), min(-(-found.height // found.tile_h), -(-(y0 + h) // found.tile_h))
        ):
            for tx in range(max(0, x0 // found.tile_w), min(found.across, -(-(x0 + w) // found.tile_w))):
                index = found.frame_index(tx, ty)
                if index is None:
                    continue  # a sparse tile not scanned: transparent
                tile = self._frame(level, index)
                left, top = tx * found.tile_w, ty * found.tile_h
                xa, ya = max(left, x0), max(top, y0)
                xb = min(left + found.tile_w, x0 + w, found.width)
                yb = min(top + found.tile_h, y0 + h, found.height)
                if xb <= xa or yb <= ya:
                    continue
                out[ya - y0 : yb - y0, xa - x0 : xb - x0, :3] = tile[ya - top : yb - top, xa - left : xb - left]
                out[ya - y0 : yb - y0, xa - x0 : xb - x0, 3] = 255
        return Image.fromarray(out, "RGBA")

    def close(self) -> None:
        self._frame.cache_clear()
