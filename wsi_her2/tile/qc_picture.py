"""The per-slide QC picture: thumbnail, tissue mask, kept and rejected tiles, pen ink (PNG)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from wsi_her2.outputs.picture_layout import (
    MIN_LONG_SIDE_PX,
    compose,
    display_zoom,
    upsample_nearest,
)
from wsi_her2.tile.qc import QC_FLAGS

COLORS = {
    "kept": (0, 170, 0),
    "low_tissue": (150, 150, 150),
    "blurry": (230, 120, 0),
    "pen": (200, 0, 200),
    "mask": (0, 120, 255),
}


LEGEND = (
    ("kept", "kept"),
    ("low tissue", "low_tissue"),
    ("blurry", "blurry"),
    ("pen ink", "pen"),
    ("tissue outline", "mask"),
)


def _tile_colour(flags: int) -> tuple[int, int, int]:
    if flags == 0:
        return COLORS["kept"]
    if flags & QC_FLAGS["pen"]:
        return COLORS["pen"]
    if flags & QC_FLAGS["blurry"] and not flags & QC_FLAGS["low_tissue"]:
        return COLORS["blurry"]
    return COLORS["low_tissue"]


def render_qc_picture(
    thumbnail: NDArray[np.uint8],
    *,
    tissue_mask: NDArray[np.bool_],
    pen_mask: NDArray[np.bool_],
    coords_level0: NDArray[np.integer],
    tile_size_level0: float,
    thumb_px_per_level0_px: float,
    qc_flags: NDArray[np.uint8],
    title: str = "",
    min_long_side_px: int = MIN_LONG_SIDE_PX,
) -> Image.Image:
    """Thumbnail with the tissue-mask outline in blue, pen ink magenta, tiles outlined by QC outcome.

    Enlarged (nearest neighbour) to at least ``min_long_side_px`` on the long side; the title
    and a legend with the tile counts per outcome are wrapped to the width, never cut.
    """
    zoom = display_zoom(*thumbnail.shape[:2], min_long_side_px=min_long_side_px)
    base = thumbnail[..., :3].astype(np.float32)
    # outline, not a tint: the stain colours stay readable
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    inner = cv2.erode(tissue_mask.astype(np.uint8), cross, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    edge = tissue_mask & ~inner.astype(bool)
    base[edge] = np.array(COLORS["mask"], np.float32)
    base[pen_mask] = 0.4 * base[pen_mask] + 0.6 * np.array(COLORS["pen"], np.float32)
    img = Image.fromarray(upsample_nearest(base.clip(0, 255).astype(np.uint8), zoom))
    draw = ImageDraw.Draw(img)
    s = thumb_px_per_level0_px * zoom
    size = tile_size_level0 * s
    line_px = max(1, zoom // 2)
    # draw rejected first so kept outlines stay visible where they touch
    order = np.argsort(qc_flags == 0, kind="stable")
    for i in order:
        x, y = coords_level0[i] * s
        draw.rectangle([x, y, x + size - 1, y + size - 1], outline=_tile_colour(int(qc_flags[i])), width=line_px)
    counts = {key: 0 for _, key in LEGEND}
    for f in np.asarray(qc_flags).tolist():
        colour = _tile_colour(int(f))
        counts[next(k for k, c in COLORS.items() if c == colour)] += 1
    legend = [(f"{label}: {counts[key]} tiles" if key != "mask" else label, COLORS[key]) for label, key in LEGEND]
    return compose(img, title=title or None, legend=legend, outline_swatches=True)


def save_qc_picture(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    image.save(path, compress_level=1)  # a picture to look at: fast zlib, ~5x quicker than the default
    return path
