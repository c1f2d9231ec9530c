"""Attention heatmaps: a trained model's per-tile attention overlaid on the slide's thumbnail, as a PNG.

Weights are shown by rank (percentile within the slide, as CLAM does), so a few dominant tiles do not
wash out the rest; glass and tiles without tissue keep the thumbnail's own pixels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from biofm.commands import command


def render_heatmap(
    thumb: np.ndarray,
    downsample: tuple[float, float],
    coords: np.ndarray,
    extent: float,
    weights: np.ndarray,
    alpha: float = 0.5,
    colormap: str = "jet",
) -> np.ndarray:
    """`thumb` [h, w, 3] uint8 at `downsample` (level-0 pixels per thumbnail pixel, x and y) with each tile
    (level-0 corner `coords`, side `extent`) tinted by its weight's percentile."""
    import matplotlib

    heat = np.zeros(thumb.shape[:2], np.float32)
    covered = np.zeros(thumb.shape[:2], bool)
    rank = np.argsort(np.argsort(weights)) / max(len(weights) - 1, 1) if len(weights) else weights
    dx, dy = downsample
    for (x, y), value in zip(coords, rank):
        x0, y0 = int(x / dx), int(y / dy)
        x1, y1 = max(x0 + 1, int(round((x + extent) / dx))), max(y0 + 1, int(round((y + extent) / dy)))
        heat[y0:y1, x0:x1] = value
        covered[y0:y1, x0:x1] = True
    colours = matplotlib.colormaps[colormap](heat)[..., :3] * 255.0
    blended = (1 - alpha) * thumb.astype(np.float32) + alpha * colours
    return np.where(covered[..., None], blended, thumb).round().astype(np.uint8)


def slide_attention(module, slide: str, mpp: float | None = None) -> dict:
    """Run one slide (alone, no other modality) through a trained model; returns its tile coordinates,
    extent, attention per tile [T] (mean over the slide tokens), the logits per task and the slide facts."""
    from biofm.modalities.wsi import SlideRef

    schema = module.model.schema
    if "wsi" not in schema["modalities"]:
        raise ValueError(f"the model was trained without the wsi modality (it has {sorted(schema['modalities'])})")
    wsi = module.model.modalities["wsi"]
    arrays, facts = wsi.process(SlideRef(slide, mpp=mpp))
    columns = {k.split("/", 1)[1]: v for k, v in wsi.stack([arrays]).items()}
    present = torch.from_numpy(columns.pop("present"))
    batch = {"present": present, **wsi.collate(columns)}
    with torch.no_grad():
        out = module({"wsi": batch})
        attention = module.model.encoders["wsi"](batch).states["attention"][0].mean(0).cpu().numpy()  # [T]
    return {
        "coords": arrays["coords"],
        "extent": float(arrays["tile_extent"]),
        "attention": attention,
        "logits": {t: v[0].cpu().numpy() for t, v in out["logits"].items()},
        **facts,
    }


def slide_heatmap(checkpoint: str, slide: str, out: str | Path, mpp: float | None = None, max_side: int = 1024) -> dict:
    """Write the attention heatmap PNG of `slide` under the model in `checkpoint`; returns the attention."""
    from PIL import Image

    from biofm.modalities.wsi.slide import open_slide, thumbnail
    from biofm.platform.sdk import load_module

    result = slide_attention(load_module(checkpoint), slide, mpp)
    handle = open_slide(slide)
    try:
        width, height = handle.dimensions
        thumb = thumbnail(handle, max(1.0, max(width, height) / max_side))
    finally:
        handle.close()
    downsample = (width / thumb.shape[1], height / thumb.shape[0])
    image = render_heatmap(thumb, downsample, result["coords"], result["extent"], result["attention"])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(out)
    return {**result, "thumbnail": thumb, "png": str(out)}


def _heatmap_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a biofm checkpoint trained with the wsi modality")
    p.add_argument("--slide", required=True, help="the slide to explain")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--mpp", type=float, default=None, help="µm/px when the slide's metadata has none")
    p.add_argument("--max-side", type=int, default=1024, help="longest side of the PNG in pixels")


@command("heatmap", _heatmap_arguments)
def _heatmap(args: argparse.Namespace) -> None:
    """Per-tile attention of a trained model overlaid on a slide's thumbnail, as a PNG."""
    result = slide_heatmap(args.checkpoint, args.slide, args.out, mpp=args.mpp, max_side=args.max_side)
    print(f"heatmap of {result['tiles']} tiles written to {args.out}")
