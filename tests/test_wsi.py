"""Whole slides: reading, tissue, tiling at a target mpp, per-slide status and resume, MIL, heatmaps, and
the synthetic biobank's metadata tasks."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from biofm.datasets.slides import prepare_slides, slides_path, status_dir
from biofm.datasets.synthetic_slides import BIOBANK_LABELS, CASE_COLUMNS, write_biobank
from biofm.modalities.wsi import SlideRef, Wsi
from biofm.modalities.wsi.encoder import SlideEncoder
from biofm.modalities.wsi.slide import best_level, open_slide, plan_tiles, read_rgb, read_tile, resolve_mpp
from biofm.platform.cli import main
from biofm.platform.store import Store
from biofm.testing import SHARED_DATA, fake_slides

WSI = SHARED_DATA / "wsi"
needs_wsi = pytest.mark.skipif(not WSI.exists(), reason=f"shared slide data not found at {WSI}")


def saturation(rgb: np.ndarray) -> np.ndarray:
    x = rgb.astype(np.float32)
    high, low = x.max(axis=2), x.min(axis=2)
    return np.where(high > 0, (high - low) / np.maximum(high, 1), 0)


@needs_wsi
def test_cmu_small_region_gives_tiles_where_the_tissue_is_and_none_on_the_glass():
    slide = open_slide(str(WSI / "cmu-1-small-region.svs"))
    plan = plan_tiles(slide, SlideRef(str(WSI / "cmu-1-small-region.svs")))
    assert plan.mpp == pytest.approx(0.499) and plan.mpp_source == "the slide's properties" and plan.level == 0
    extent = round(plan.extent)
    kept = {tuple(c) for c in plan.coords}
    fractions = {}
    for j in range(int(slide.dimensions[1] // plan.extent)):
        for i in range(int(slide.dimensions[0] // plan.extent)):
            x, y = round(i * plan.extent), round(j * plan.extent)
            tile = read_rgb(slide, (x, y), 0, (extent, extent))
            fractions[(x, y)] = float((saturation(tile) > 0.15).mean())  # stained pixels in the tile itself
    kept_fractions = [f for c, f in fractions.items() if tuple(c) in kept]
    dropped_fractions = [f for c, f in fractions.items() if tuple(c) not in kept]
    assert 30 < len(kept) < len(fractions) - 20  # the slide is part tissue, part glass
    assert min(kept_fractions) > 0.05, "a kept tile is glass"
    glass = [c for c, f in fractions.items() if f < 0.01]
    assert glass and not any(tuple(c) in kept for c in glass)
    assert all(f < 0.6 for f in dropped_fractions), "a tile that is mostly tissue was dropped"
    tile = read_tile(slide, plan, *plan.coords[0])
    assert tile.shape == (224, 224, 3) and tile.dtype == np.uint8


@needs_wsi
@pytest.mark.parametrize("target,level", [(0.25, 0), (0.5, 1), (1.0, 2), (2.0, 3)])
def test_small_he_levels_reads_each_target_mpp_at_the_right_pyramid_level(target, level):
    slide = open_slide(str(WSI / "small_HE_levels.tiff"))
    # its resolution tags say 352.9 µm/px (a 72-dpi default): the manifest's 0.25 is used instead
    plan = plan_tiles(
        slide, SlideRef(str(WSI / "small_HE_levels.tiff"), mpp=0.25), target_mpp=target, tile_size=24, min_tissue=0.0
    )
    assert plan.mpp == 0.25 and plan.mpp_source == "the manifest's mpp"
    assert plan.level == level
    assert plan.read_size == round(24 * target / 0.25 / slide.level_downsamples[level])
    assert abs(plan.read_size - 24) <= 1  # read at (almost) the target scale, never upsampled much
    assert "352.9" in plan.notes[0]
    assert len(plan.coords) and read_tile(slide, plan, *plan.coords[-1]).shape == (24, 24, 3)


def test_best_level_never_picks_a_level_coarser_than_wanted():
    downsamples = (1.0, 2.0, 4.016, 8.086, 32.0)
    assert best_level(downsamples, 1.0) == 0
    assert best_level(downsamples, 3.9) == 1
    assert best_level(downsamples, 4.0) == 2  # 0.4% coarser: within tolerance
    assert best_level(downsamples, 16.0) == 3
    assert best_level(downsamples, 0.5) == 0


@needs_wsi
def test_boxes_nonsense_mpp_is_caught_and_used_only_when_a_value_is_given():
    properties = dict(open_slide(str(WSI / "boxes.tiff")).properties)
    with pytest.raises(
        Exception,
        match=r"no usable microns per pixel \(the slide's properties give 352.8 "
        r"µm/px, outside the plausible .*--assume-mpp",
    ):
        resolve_mpp(properties, SlideRef("boxes.tiff"))
    assert resolve_mpp(properties, SlideRef("boxes.tiff", mpp=0.5))[:2] == (0.5, "the manifest's mpp")
    assert resolve_mpp(properties, SlideRef("boxes.tiff", assume_mpp=0.25))[:2] == (0.25, "the assumed mpp")
    objective = resolve_mpp({"openslide.objective-power": "40"}, SlideRef("x"))
    assert objective[:2] == (0.25, "the objective power")
    tiff = resolve_mpp({"tiff.XResolution": "20000", "tiff.ResolutionUnit": "centimeter"}, SlideRef("x"))
    assert tiff[:2] == (0.5, "the TIFF resolution tags")


def _manifest(tmp_path, rows) -> str:
    frame = pd.DataFrame(rows)
    path = tmp_path / "slides.csv"
    frame.to_csv(path, index=False)
    return str(path)


@needs_wsi
def test_broken_slides_fail_with_a_readable_reason_while_the_others_are_done(tmp_path, capsys):
    good = fake_slides()
    rows = [
        {"slide_path": good[0], "sample_id": "S-good-1", "subject_id": "P1", "flag": 1},
        {"slide_path": str(WSI / "broken.svs"), "sample_id": "S-broken", "subject_id": "P2", "flag": 0},
        {"slide_path": str(WSI / "unreadable.svs"), "sample_id": "S-unreadable", "subject_id": "P3", "flag": 1},
        {"slide_path": str(WSI / "unopenable.tiff"), "sample_id": "S-unopenable", "subject_id": "P4", "flag": 0},
        {"slide_path": str(WSI / "boxes.tiff"), "sample_id": "S-boxes", "subject_id": "P5", "flag": 1},
        {"slide_path": str(tmp_path / "gone.svs"), "sample_id": "S-gone", "subject_id": "P6", "flag": 0},
        {"slide_path": str(WSI / "cmu-1-small-region.svs"), "sample_id": "S-cmu", "subject_id": "P7", "flag": 0},
        {"slide_path": good[1], "sample_id": "S-good-2", "subject_id": "P8", "flag": 1},
        # a plain (non-pyramidal) image opens through OpenSlide's PIL fallback (mpp from the manifest);
        # it is glass but for a speck smaller than a tile
        {
            "slide_path": str(WSI / "kidney-48-5.tif"),
            "sample_id": "S-kidney",
            "subject_id": "P9",
            "flag": 0,
            "mpp": 0.5,
        },
    ]
    out = str(tmp_path / "slides.zarr")
    main(["prepare", "slides", "--manifest", _manifest(tmp_path, rows), "--out", out, "--label-columns", "flag"])
    printed = capsys.readouterr().out
    assert "3 done" in printed and "6 failed" in printed
    assert not any(r["sample_id"] in printed or r["slide_path"] in printed for r in rows)
    status = pd.read_csv(slides_path(out)).set_index("sample_id")
    assert set(status.index[status["status"] == "done"]) == {"S-good-1", "S-cmu", "S-good-2"}
    reasons = status["reason"]
    assert "OpenSlide" in reasons["S-broken"] or "format" in reasons["S-broken"]
    assert "Bogus marker length" in reasons["S-unreadable"]
    assert "Unsupported TIFF compression" in reasons["S-unopenable"]
    assert "352.8" in reasons["S-boxes"] and "mpp" in reasons["S-boxes"]
    assert "does not exist" in reasons["S-gone"]
    assert reasons["S-kidney"].startswith("no tissue found")  # opened and read, unlike the broken files
    rejects = pd.read_csv(str(out) + ".rejects.csv")
    assert sorted(rejects["sample_id"]) == ["S-boxes", "S-broken", "S-gone", "S-kidney", "S-unopenable", "S-unreadable"]
    store = Store(out)
    assert sorted(store.index("sample_id")) == ["S-cmu", "S-good-1", "S-good-2"]
    for key in os.listdir(status_dir(out)):  # every slide has its own status file
        assert json.loads(open(os.path.join(status_dir(out), key)).read())["status"] in ("done", "failed")
    assert len(os.listdir(status_dir(out))) == len(rows)


def test_a_killed_prepare_reruns_only_the_remaining_slides(tmp_path):
    manifest = write_biobank(tmp_path / "bank", n=10, seed=3, size=896, cmu_path=False)
    out = str(tmp_path / "bank.zarr")
    script = (
        "import sys\n"
        "from biofm.datasets.slides import prepare_slides\n"
        f"prepare_slides({str(manifest)!r}, {out!r}, label_columns={BIOBANK_LABELS!r}, "
        f"case_columns={CASE_COLUMNS!r}, commit_tiles=1)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    while time.time() < deadline:
        done = os.listdir(status_dir(out)) if os.path.exists(status_dir(out)) else []
        if len([d for d in done if d.endswith(".json")]) >= 4:
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    first = {d for d in os.listdir(status_dir(out)) if d.endswith(".json")}
    assert 4 <= len(first) < 10, "the run was not interrupted midway"
    result = prepare_slides(str(manifest), out, label_columns=BIOBANK_LABELS, case_columns=CASE_COLUMNS)
    assert result.skipped >= len(first) and result.skipped + result.done == 10 and result.failed == 0
    resumed = Store(out)
    fresh = prepare_slides(
        str(manifest), str(tmp_path / "fresh.zarr"), label_columns=BIOBANK_LABELS, case_columns=CASE_COLUMNS
    ).store
    assert resumed.n == fresh.n == 10
    order_a, order_b = np.argsort(resumed.index("sample_id")), np.argsort(fresh.index("sample_id"))
    a = resumed.read_rows(0, 10, ["wsi/features", "labels/stain"])
    b = fresh.read_rows(0, 10, ["wsi/features", "labels/stain"])
    for i, j in zip(order_a, order_b):
        np.testing.assert_array_equal(a["wsi/features"].row(i), b["wsi/features"].row(j))
    np.testing.assert_array_equal(a["labels/stain"][order_a], b["labels/stain"][order_b])


def test_raw_tiles_are_stored_on_request_and_a_plugged_patch_encoder_is_checked(tmp_path):
    weights = tmp_path / "tiny.pt"
    from biofm.testing import tiny_patch_network

    torch.manual_seed(1)
    torch.save(tiny_patch_network().state_dict(), weights)
    wsi = Wsi(patch_encoder="biofm.testing:tiny_patch_network", patch_weights=str(weights), store_tiles=True)
    wsi.fit()
    assert wsi.settings["feature_dim"] == 8
    arrays, facts = wsi.process(fake_slides()[0])
    assert arrays["tiles"].shape == (facts["tiles"], 224, 224, 3) and arrays["features"].dtype == np.float16
    slide = open_slide(fake_slides()[0])
    plan = plan_tiles(slide, SlideRef(fake_slides()[0]))
    np.testing.assert_array_equal(arrays["tiles"][0], read_tile(slide, plan, *plan.coords[0]))
    torch.save({k: v + 1 for k, v in tiny_patch_network().state_dict().items()}, tmp_path / "other.pt")
    other = Wsi.from_config({**wsi.config(), "patch_weights": str(tmp_path / "other.pt")})
    with pytest.raises(ValueError, match="same encoder"):
        other.process(fake_slides()[0])


@pytest.mark.parametrize("kind", ["abmil", "transformer"])
def test_mil_attention_covers_only_real_tiles_and_follows_subsampling(kind):
    torch.manual_seed(0)
    encoder = SlideEncoder(feature_dim=6, d_model=16, kind=kind, tokens=3, max_tiles=4).eval()
    lengths = torch.tensor([5, 2, 0])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    batch = {
        "features": torch.randn(3, 5, 6),
        "mask": mask,
        "tissue": torch.rand(3, 5),
        "grid": torch.rand(3, 5, 2) * 4,
        "n_tiles": lengths.float(),
    }
    out = encoder(batch)
    x, valid = out
    assert x.shape == (3, 4, 16) and valid.tolist() == [[True] * 4, [True] * 4, [False] * 4]
    weights = out.states["attention"]  # [B, K, T]
    torch.testing.assert_close(weights[:2].sum(-1), torch.ones(2, 3))
    assert (weights[~mask[:, None, :].expand_as(weights)] == 0).all()
    encoder.train()
    out = encoder(batch)  # at most 4 tiles per slide in training
    assert out.states["attention"].shape[-1] == 4 and torch.isfinite(out.tokens).all()


@pytest.fixture(scope="module")
def biobank(tmp_path_factory):
    """The synthetic biobank (96 slides; its manifest splits subjects 60/10/30 so the test split can be scored)."""
    folder = tmp_path_factory.mktemp("biobank")
    manifest = write_biobank(folder / "data", n=96, seed=0, size=896)
    assert (pd.read_csv(manifest)["split"] == "test").sum() > 20
    result = prepare_slides(
        str(manifest), str(folder / "bank.zarr"), label_columns=BIOBANK_LABELS, case_columns=CASE_COLUMNS
    )
    assert result.done == 96 and result.failed == 0
    return folder, manifest, result.store


@pytest.mark.slow
def test_a_short_multitask_fit_on_the_synthetic_biobank_learns_every_metadata_task(biobank):
    from biofm.recipes.runs import fit_and_test

    folder, _, store = biobank
    assert set(store.modalities) == {"wsi", "text", "tabular"}
    metrics = fit_and_test([store.url], folder / "run", epochs=30, batch_size=16, loggers=False, model={"lr": 2e-3})
    for task in ("stain", "specimen", "faded", "site"):  # chance: 0.5
        assert metrics[f"{task}/auroc"] > 0.7, (task, {k: round(v, 3) for k, v in metrics.items()})
    assert metrics["tissue_area/r2"] > 0.3, {k: round(v, 3) for k, v in metrics.items()}


@pytest.mark.slow
def test_the_heatmap_png_is_written_and_shows_the_slide(biobank, tmp_path, capsys):
    from PIL import Image

    from biofm.modalities.wsi.slide import thumbnail
    from biofm.recipes.runs import fit_and_test

    folder, manifest, store = biobank
    fit_and_test([store.url], tmp_path / "run", modalities=["wsi"], epochs=2, batch_size=16, loggers=False)
    checkpoint = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    slide = str(manifest.parent / pd.read_csv(manifest)["slide_path"][0])
    png = tmp_path / "heat.png"
    main(["heatmap", "--checkpoint", checkpoint, "--slide", slide, "--out", str(png), "--max-side", "448"])
    figure = np.asarray(Image.open(png).convert("RGB"))
    image = np.asarray(Image.open(tmp_path / "heat-overlay.png").convert("RGB")).astype(np.float32)
    assert figure.shape[1] > 2 * image.shape[1] * 0.8  # the thumbnail and the overlay side by side
    thumb = thumbnail(open_slide(slide), 896 / 448).astype(np.float32)
    assert image.shape == thumb.shape
    wsi = Wsi.from_config(store.modalities["wsi"])
    arrays, _ = wsi.process(slide)
    covered = np.zeros(thumb.shape[:2], bool)
    for x, y in arrays["coords"]:
        covered[y // 2 : (y + 224) // 2, x // 2 : (x + 224) // 2] = True
    assert covered.any() and (~covered).any()
    np.testing.assert_array_equal(image[~covered], thumb[~covered])  # glass and untiled parts: the slide
    assert np.abs(image[covered] - thumb[covered]).mean() > 10  # tiles: tinted by attention
    grey_image, grey_thumb = image.mean(-1)[covered], thumb.mean(-1)[covered]
    assert np.corrcoef(grey_image, grey_thumb)[0, 1] > 0.3  # the tissue still shows through
    with pytest.raises(SystemExit) as stopped:  # a slide that is not there: one line naming it, no traceback
        main(["heatmap", "--checkpoint", checkpoint, "--slide", str(tmp_path / "gone.svs"), "--out", str(png)])
    assert stopped.value.code == 2
    assert f"biofm: error: --slide {tmp_path / 'gone.svs'}: the slide file does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_a_biobank_run_leaks_no_id_report_or_slide_path_to_logs_trackers_or_stdout(biobank, tmp_path):
    """fit + test through the CLI with W&B offline: the run directory, stdout and stderr hold none of the
    cohort's sample ids, subject ids, report texts or slide file paths."""
    folder, manifest, store = biobank
    frame = pd.read_csv(manifest)
    needles = set(frame["sample_id"]) | set(frame["subject_id"]) | set(frame["report"].dropna())
    needles |= set(frame["slide_path"]) | {str(manifest.parent / p) for p in frame["slide_path"]}
    needles = sorted(n.encode() for n in needles if len(n) >= 4)
    assert len(needles) > 300
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline"}
    common = [
        "--model.d_model",
        "16",
        "--model.depth",
        "1",
        "--model.heads",
        "2",
        "--model.latents",
        "2",
        "--data.stores",
        f"[{store.url}]",
        "--data.batch_size",
        "16",
        "--trainer.default_root_dir",
        str(run),
    ]
    outputs = b""
    for stage, extra in (
        ("fit", ["--trainer.max_epochs", "1"]),
        ("test", ["--ckpt_path", str(run / "checkpoints" / "last.ckpt")]),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "biofm", stage, *common, *extra], capture_output=True, env=env, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:].decode(errors="replace")
        outputs += done.stdout + done.stderr
    files = [p for p in run.rglob("*") if p.is_file()]
    assert list((run / "wandb").glob("offline-run-*")) and (run / "logs" / "fit" / "metrics.csv").exists()
    for name, content in [("stdout/stderr", outputs)] + [(str(p), p.read_bytes()) for p in files]:
        leaked = [n for n in needles if n in content]
        assert not leaked, f"{name} holds {len(leaked)} identifiers, report texts or slide paths: {leaked[:3]}"
    # the scan finds ids where the pipeline is meant to write them — `biofm predict`'s predictions carry
    # sample ids — so it can fail on a run's own files
    done = subprocess.run(
        [sys.executable, "-m", "biofm", "predict", *common, "--ckpt_path", "best", "--data.predict_split", "all"],
        capture_output=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:].decode(errors="replace")
    written = (run / "predictions.parquet").read_bytes()
    assert any(n in written for n in needles)  # (parquet compresses: a few ids show as plain bytes)


def test_the_heatmap_names_every_tasks_prediction_in_words():
    from types import SimpleNamespace

    from biofm.modalities.wsi.heatmap import predicted_labels
    from biofm.tasks.kinds import task_kind

    kinds = {
        "faded": task_kind("faded", {"kind": "binary"}),
        "site": task_kind("site", {"kind": "multiclass", "classes": ["breast", "colon", "skin"]}),
        "tags": task_kind("tags", {"kind": "multilabel", "classes": ["x", "y"]}),
        "area": task_kind("area", {"kind": "regression"}),
    }
    module = SimpleNamespace(model=SimpleNamespace(kinds=kinds))
    logits = {
        "faded": np.array([2.0]),
        "site": np.array([0.1, 2.0, 0.3]),
        "tags": np.array([1.0, -1.0]),
        "area": np.array([0.5]),
    }
    assert predicted_labels(module, logits) == [
        "faded = 1 (0.88)",
        "site = colon (0.75)",
        "tags: x 0.73, y 0.27",
        "area = 0.5",
    ]
