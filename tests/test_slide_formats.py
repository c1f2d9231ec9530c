"""Slides beyond brightfield OpenSlide (issue #24): multiplex fluorescence OME-TIFF, TIFFs OpenSlide refuses
(their resolution tags read with tifffile), DICOM whole-slide images OpenSlide refuses — on files the tests
write."""

import numpy as np
import pandas as pd
import pytest

from biofm.datasets.slides import prepare_slides, slides_path
from biofm.modalities.wsi.readers import DicomSlide, TiffSlide
from biofm.modalities.wsi.slide import SlideError, SlideRef, open_slide, plan_tiles, read_rgb, read_tile
from biofm.testing import (
    FLUORESCENCE_CHANNELS,
    brightfield_image,
    tissue_ellipse,
    write_ome_fluorescence,
    write_qptiff,
    write_wsi_dicom,
)


def _tiles_follow_the_tissue(coords: np.ndarray, extent: float, height: int, width: int) -> bool:
    """Every kept tile holds tissue, and every tile wholly on tissue is kept."""
    tissue = tissue_ellipse(height, width)
    e = int(round(extent))
    fraction = {
        (x, y): tissue[y : y + e, x : x + e].mean()
        for y in range(0, height - e + 1, e)
        for x in range(0, width - e + 1, e)
    }
    kept = {(int(x), int(y)) for x, y in coords}
    return all(fraction[c] > 0.05 for c in kept) and {c for c, f in fraction.items() if f == 1.0} <= kept


def test_a_multichannel_ome_tiff_is_fluorescence_with_its_channels_pyramid_and_pixel_size(tmp_path):
    path = write_ome_fluorescence(tmp_path / "multiplex.ome.tif")
    slide = open_slide(path)
    assert isinstance(slide, TiffSlide) and slide.kind == "fluorescence"  # OpenSlide would read one grey plane
    assert slide.channel_names == list(FLUORESCENCE_CHANNELS) and slide.level_count == 3
    assert slide.level_downsamples == [1.0, 2.0, 4.0]
    plan = plan_tiles(slide, SlideRef(path), target_mpp=1.0, tile_size=64, thumbnail_mpp=4.0)
    assert plan.mpp == pytest.approx(0.5) and plan.mpp_source == "the slide's properties"  # OME's PhysicalSizeX
    assert plan.level == 1  # 1 µm/px from the 2× level
    assert "tissue from the nuclear channel 'DAPI'" in plan.notes[0]
    assert len(plan.coords) > 10 and _tiles_follow_the_tissue(plan.coords, plan.extent, 1024, 1536)
    centre = plan.coords[np.abs(plan.coords + plan.extent / 2 - [768, 512]).sum(axis=1).argmin()]
    tile = read_tile(slide, plan, *centre)
    assert tile.shape == (64, 64, 3) and tile[..., 0].mean() > 100  # DAPI, bright on tissue, is red
    background = read_rgb(slide, (0, 0), 0, (32, 32))
    assert background.max() < 40  # the dark background stays dark
    slide.close()


def test_the_channels_shown_to_the_patch_encoder_are_chosen_by_name_or_index(tmp_path):
    path = write_ome_fluorescence(tmp_path / "multiplex.ome.tif", height=512, width=512)
    assert open_slide(path, ["CD8", "3"]).shown_names == ["CD8", "FoxP3"]
    with pytest.raises(SlideError, match=r"it has no channel 'CD3'; its channels are \['DAPI', 'CD8'"):
        open_slide(path, ["CD3"])


def test_fluorescence_slides_prepare_with_their_channels_from_the_manifest_or_the_flag(tmp_path):
    paths = [write_ome_fluorescence(tmp_path / f"m{i}.ome.tif", height=768, width=768, seed=i) for i in range(3)]
    manifest = tmp_path / "slides.csv"
    pd.DataFrame(
        {
            "slide_path": paths,
            "sample_id": ["a", "b", "c"],
            "subject_id": ["p1", "p2", "p3"],
            "flag": [0, 1, 0],
            "channels": ["DAPI;PanCK", None, "nope"],
        }
    ).to_csv(manifest, index=False)
    out = str(tmp_path / "s.zarr")
    result = prepare_slides(str(manifest), out, label_columns=["flag"], channels=["DAPI", "CD8", "FoxP3"], tile_size=64)
    status = pd.read_csv(slides_path(out)).set_index("sample_id")
    assert result.done == 2 and status.loc["c", "status"] == "failed"
    assert "no channel 'nope'" in status.loc["c", "reason"]
    assert "sees DAPI, PanCK as red, green, blue" in status.loc["a", "notes"]
    assert "sees DAPI, CD8, FoxP3 as red, green, blue" in status.loc["b", "notes"]


def test_tiff_resolution_tags_are_read_when_openslide_cannot_open_the_file(tmp_path):
    import tifffile

    rgb = brightfield_image()
    qptiff = tmp_path / "stripped.qptiff"  # not tiled: OpenSlide refuses it
    tifffile.imwrite(qptiff, rgb, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    plan = plan_tiles(open_slide(str(qptiff)), SlideRef(str(qptiff)), tile_size=32, thumbnail_mpp=2.0)
    assert (plan.mpp, plan.mpp_source) == (pytest.approx(0.5), "the TIFF resolution tags")
    assert len(plan.coords) and _tiles_follow_the_tissue(plan.coords, plan.extent, 600, 800)
    default = tmp_path / "default-dpi.tif"  # a 96-dpi default: named with its µm/px in the reason
    tifffile.imwrite(default, rgb, photometric="rgb", resolution=(96, 96), resolutionunit="INCH")
    with pytest.raises(SlideError, match=r"the TIFF resolution tags give 264.6 µm/px, outside the plausible"):
        plan_tiles(open_slide(str(default)), SlideRef(str(default)))


def test_a_dicom_slide_openslide_refuses_is_read_tile_by_tile(tmp_path):
    rgb = brightfield_image()
    path = write_wsi_dicom(tmp_path / "slide.dcm", rgb, tile=128)
    slide = open_slide(path)
    assert isinstance(slide, DicomSlide) and slide.dimensions == (800, 600)
    assert np.array_equal(read_rgb(slide, (250, 130), 0, (300, 200)), rgb[130:330, 250:550])  # across tiles
    plan = plan_tiles(slide, SlideRef(path), tile_size=32, thumbnail_mpp=2.0)
    assert (plan.mpp, plan.mpp_source) == (pytest.approx(0.5), "the slide's properties")  # PixelSpacing
    assert len(plan.coords) and _tiles_follow_the_tissue(plan.coords, plan.extent, 600, 800)


@pytest.mark.parametrize(
    "drop, reason",
    [
        (("TotalPixelMatrixColumns",), "the DICOM lacks the slide's width in pixels (TotalPixelMatrixColumns)"),
        (("PixelData", "Rows"), "the DICOM lacks the tile height (Rows), the image data (PixelData)"),
    ],
)
def test_a_dicom_slide_that_still_fails_says_what_is_missing_in_words(tmp_path, drop, reason):
    path = write_wsi_dicom(tmp_path / "slide.dcm", brightfield_image(256, 256), drop=drop)
    with pytest.raises(SlideError) as caught:
        open_slide(path)
    assert str(caught.value) == f"a DICOM slide that cannot be read: {reason}"


def test_a_qptiff_is_read_with_its_channel_names_and_tissue_from_its_nuclear_channel(tmp_path):
    path = write_qptiff(tmp_path / "vectra.qptiff")  # DAPI is the second channel here
    slide = open_slide(path)
    assert slide.kind == "fluorescence" and slide.channel_names == ["CD3", "DAPI", "CD20"]
    assert slide.nuclear_channel == 1 and slide.shown_names == ["DAPI", "CD3", "CD20"]
    plan = plan_tiles(slide, SlideRef(path), tile_size=64, thumbnail_mpp=4.0)
    assert (plan.mpp, plan.mpp_source) == (pytest.approx(0.5), "the TIFF resolution tags")
    assert _tiles_follow_the_tissue(plan.coords, plan.extent, 512, 768)
