"""What the DICOM readers of several modalities share."""

from __future__ import annotations


def pixel_spacing(dataset) -> tuple[float, float] | None:
    """(row, column) pixel spacing in mm: from the shared functional groups of an enhanced multi-frame
    object (whole-slide microscopy, OPT), else the top level's PixelSpacing; None when it has neither."""
    for holder in (dataset, *getattr(dataset, "SharedFunctionalGroupsSequence", [])):
        for measures in getattr(holder, "PixelMeasuresSequence", []):
            if "PixelSpacing" in measures:
                return float(measures.PixelSpacing[0]), float(measures.PixelSpacing[1])
    if "PixelSpacing" in dataset:
        return float(dataset.PixelSpacing[0]), float(dataset.PixelSpacing[1])
    return None
