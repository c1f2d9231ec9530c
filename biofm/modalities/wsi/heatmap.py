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


def heatmap_figure(thumb: np.ndarray, overlay: np.ndarray, title: str, predictions: list[str], out: str | Path):
    """The plain thumbnail beside its attention overlay, with a title, a colour bar (attention percentile)
    and the slide's predicted labels, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    height, width = thumb.shape[:2]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.2 * height / max(width, 1) + 0.9))
    left.imshow(thumb)
    left.set_title("slide (thumbnail)")
    right.imshow(overlay)
    right.set_title(title)
    for ax in (left, right):
        ax.set_axis_off()
    colours = ScalarMappable(Normalize(0, 100), cmap="jet")
    fig.colorbar(colours, ax=right, fraction=0.046, pad=0.02, label="attention (percentile within the slide)")
    fig.text(0.01, 0.01, "predicted: " + "; ".join(predictions), fontsize=9, ha="left", va="bottom", wrap=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def predicted_labels(module, logits: dict[str, np.ndarray]) -> list[str]:
    """Each task's prediction for one slide in words: the class and its probability, or the value."""
    lines = []
    for task, values in logits.items():
        kind = module.model.kinds[task]
        out = kind.predict(torch.as_tensor(values)[None])
        classes = kind.classes or ["0", "1"]  # a binary task names no classes
        if "probs" in out and not kind.multilabel:
            k = int(out["prediction"][0])
            lines.append(f"{task} = {classes[k]} ({float(out['probs'][0, k]):.2f})")
        elif "probs" in out:
            lines.append(f"{task}: " + ", ".join(f"{c} {float(p):.2f}" for c, p in zip(kind.classes, out["probs"][0])))
        else:
            lines.append(f"{task} = {float(out['prediction'][0]):.4g}")
    return lines


def slide_attention(module, slide: str, mpp: float | None = None, branch: int | None = None) -> dict:
    """Run one slide (alone, no other modality) through a trained model; returns its tile coordinates,
    extent, attention per tile [T] (mean over the attention branches, or branch `branch`), the logits per
    task and the slide facts."""
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
        weights = module.model.encoders["wsi"](batch).states["attention"][0]  # [K, T]
        if branch is not None and not 0 <= branch < len(weights):
            raise ValueError(f"the slide encoder has {len(weights)} attention branches; --branch {branch} is none")
        attention = (weights.mean(0) if branch is None else weights[branch]).cpu().numpy()  # [T]
    return {
        "coords": arrays["coords"],
        "extent": float(arrays["tile_extent"]),
        "attention": attention,
        "logits": {t: v[0].cpu().numpy() for t, v in out["logits"].items()},
        **facts,
    }


def slide_heatmap(
    checkpoint: str,
    slide: str,
    out: str | Path,
    mpp: float | None = None,
    max_side: int = 1024,
    branch: int | None = None,
) -> dict:
    """Write the attention heatmap of `slide` under the model in `checkpoint`: `out`, the annotated figure
    (thumbnail, overlay, colour bar, predictions), and `<out>-overlay.png`, the overlay alone at thumbnail
    size; `branch`: one attention branch (slide token) instead of their mean. Returns the attention."""
    from PIL import Image

    from biofm.modalities.wsi.slide import open_slide, thumbnail
    from biofm.platform.sdk import load_module

    module = load_module(checkpoint)
    result = slide_attention(module, slide, mpp, branch)
    handle = open_slide(slide)
    try:
        width, height = handle.dimensions
        thumb = thumbnail(handle, max(1.0, max(width, height) / max_side))
    finally:
        handle.close()
    downsample = (width / thumb.shape[1], height / thumb.shape[0])
    image = render_heatmap(thumb, downsample, result["coords"], result["extent"], result["attention"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    overlay = out.with_name(out.stem + "-overlay.png")
    Image.fromarray(image).save(overlay)
    shown = "the mean of the attention branches" if branch is None else f"attention branch {branch}"
    title = f"{shown}, {result['tiles']} tiles"
    heatmap_figure(thumb, image, title, predicted_labels(module, result["logits"]), out)
    return {**result, "thumbnail": thumb, "png": str(out), "overlay": str(overlay)}


def _heatmap_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a biofm checkpoint trained with the wsi modality")
    p.add_argument("--slide", required=True, help="the slide to explain")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--mpp", type=float, default=None, help="µm/px when the slide's metadata has none")
    p.add_argument("--max-side", type=int, default=1024, help="longest side of the thumbnail in pixels")
    p.add_argument("--branch", type=int, default=None, help="one attention branch (default: their mean)")


@command("heatmap", _heatmap_arguments)
def _heatmap(args: argparse.Namespace) -> None:
    """Per-tile attention of a trained model overlaid on a slide's thumbnail, as a PNG."""
    from biofm.modalities.wsi.slide import SlideError

    try:
        result = slide_heatmap(
            args.checkpoint, args.slide, args.out, mpp=args.mpp, max_side=args.max_side, branch=args.branch
        )
    except SlideError as err:  # the slide the user named: its path in the message is theirs
        raise SlideError(f"--slide {args.slide}: {err}") from None
    print(f"heatmap of {result['tiles']} tiles written to {args.out} (the overlay alone: {result['overlay']})")
