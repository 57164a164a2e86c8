"""Saliency pictures: a tile with its Grad-CAM(++) heatmap blended on top (``wsi-her2 explain``), and
``<slide-id>.saliency.png`` (``score --explain``): per-tile maps (computed by
:mod:`wsi_her2.score.saliency`) pasted into a thumbnail-sized map over the thumbnail."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from numpy.typing import NDArray

from wsi_her2.result import Saliency
from wsi_her2.store.patch_store import PatchStore


def slide_saliency_png(store: PatchStore, saliency: Saliency, path: str | Path) -> Path:
    """``<slide-id>.saliency.png``: the maps of the scored tiles over the store's thumbnail."""
    thumb = store.array("thumbnail")
    scale = float(store.attrs["thumbnail"]["px_per_level0_px"])
    coords = store.coords_level0[saliency.tiles] * scale
    canvas = paste_tile_heatmaps(
        saliency.maps, np.round(coords).astype(int), tile_px=max(1, int(round(store.tile_size_level0 * scale))),
        canvas_hw_px=thumb.shape[:2], downsample=1.0,
    )
    return save_slide_heatmap_png(canvas, path, thumbnail_rgb=thumb)


def overlay_heatmap(rgb: NDArray[np.uint8], heat: NDArray, *, alpha: float = 0.45, cmap: str = "jet") -> NDArray[np.uint8]:
    """Blend a [0, 1] heatmap (resized to the image) over a uint8 RGB image."""
    from wsi_her2.optional import require

    matplotlib = require("matplotlib", purpose="saliency pictures")

    from PIL import Image

    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != rgb.shape[:2]:
        heat = np.asarray(Image.fromarray(heat).resize((rgb.shape[1], rgb.shape[0]), Image.BILINEAR))
    colour = matplotlib.colormaps[cmap](np.clip(heat, 0, 1))[..., :3] * 255.0
    out = (1 - alpha) * rgb[..., :3].astype(np.float32) + alpha * colour
    return np.clip(out, 0, 255).astype(np.uint8)


def save_overlay_png(rgb: NDArray[np.uint8], heat: NDArray, path: str | Path, *, alpha: float = 0.45) -> Path:
    """Write the tile with its heatmap blended on top."""
    from PIL import Image

    Image.fromarray(overlay_heatmap(rgb, heat, alpha=alpha)).save(path)
    return Path(path)


def paste_tile_heatmaps(
    heatmaps: Sequence[NDArray] | NDArray,
    xy_px: Sequence[tuple[int, int]] | NDArray,
    *,
    tile_px: int,
    canvas_hw_px: tuple[int, int],
    downsample: float = 1.0,
) -> NDArray[np.float32]:
    """Assemble per-tile heatmaps into one slide-level map (NaN where no tile was scored).

    Parameters
    ----------
    heatmaps
        (N, h, w) maps in [0, 1], one per tile (any h, w: resized to the tile's footprint).
    xy_px
        Top-left corners of the tiles in the pixel grid the tiles were cut from.
    tile_px
        Tile side in that grid.
    canvas_hw_px
        (height, width) of that grid; the result is this size divided by ``downsample``.
    downsample
        Reduction factor of the output (e.g. 16 for a thumbnail).
    """
    from PIL import Image

    h = int(math.ceil(canvas_hw_px[0] / downsample))
    w = int(math.ceil(canvas_hw_px[1] / downsample))
    canvas = np.full((h, w), np.nan, dtype=np.float32)
    side = max(1, int(round(tile_px / downsample)))
    for heat, (x0, y0) in zip(heatmaps, np.asarray(xy_px).reshape(-1, 2)):
        small = np.asarray(Image.fromarray(np.asarray(heat, dtype=np.float32)).resize((side, side), Image.BILINEAR))
        cx, cy = int(round(x0 / downsample)), int(round(y0 / downsample))
        ys, xs = slice(max(cy, 0), min(cy + side, h)), slice(max(cx, 0), min(cx + side, w))
        patch = small[ys.start - cy: ys.stop - cy, xs.start - cx: xs.stop - cx]
        region = canvas[ys, xs]
        # Overlapping tiles: keep the stronger evidence rather than the last one written.
        canvas[ys, xs] = np.where(np.isnan(region), patch, np.fmax(region, patch))
    return canvas


def save_slide_heatmap_png(
    canvas: NDArray, path: str | Path, *, thumbnail_rgb: NDArray[np.uint8] | None = None, alpha: float = 0.5
) -> Path:
    """Write a slide-level heatmap PNG, over a thumbnail of the same size when given."""
    from PIL import Image

    heat = np.nan_to_num(np.asarray(canvas, dtype=np.float32), nan=0.0)
    if thumbnail_rgb is None:
        from wsi_her2.optional import require

        matplotlib = require("matplotlib", purpose="saliency pictures")

        rgb = (matplotlib.colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255).astype(np.uint8)
        rgb[np.isnan(canvas)] = 255
    else:
        rgb = overlay_heatmap(thumbnail_rgb, heat, alpha=alpha)
        rgb[np.isnan(canvas)] = thumbnail_rgb[..., :3][np.isnan(canvas)]
    Image.fromarray(rgb).save(path)
    return Path(path)
