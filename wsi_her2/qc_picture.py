"""The per-slide QC picture: thumbnail, tissue mask, kept and rejected tiles, pen ink (PNG)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from wsi_her2.qc import QC_FLAGS

COLORS = {
    "kept": (0, 170, 0),
    "low_tissue": (150, 150, 150),
    "blurry": (230, 120, 0),
    "pen": (200, 0, 200),
    "mask": (0, 120, 255),
}


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
    min_width_px: int = 900,
) -> Image.Image:
    """Thumbnail with the tissue-mask outline in blue, pen ink magenta, tiles outlined by QC outcome."""
    zoom = max(1, int(np.ceil(min_width_px / max(thumbnail.shape[1], 1))))
    base = thumbnail.astype(np.float32)
    # outline, not a tint: the stain colours stay readable
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    inner = cv2.erode(tissue_mask.astype(np.uint8), cross, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    edge = tissue_mask & ~inner.astype(bool)
    base[edge] = np.array(COLORS["mask"], np.float32)
    base[pen_mask] = 0.4 * base[pen_mask] + 0.6 * np.array(COLORS["pen"], np.float32)
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    if zoom > 1:
        img = img.resize((img.width * zoom, img.height * zoom), Image.Resampling.NEAREST)
    header = 22
    canvas = Image.new("RGB", (img.width, img.height + header), (255, 255, 255))
    canvas.paste(img, (0, header))
    draw = ImageDraw.Draw(canvas)
    s = thumb_px_per_level0_px * zoom
    size = tile_size_level0 * s
    # draw rejected first so kept outlines stay visible where they touch
    order = np.argsort(qc_flags == 0, kind="stable")
    for i in order:
        x, y = coords_level0[i] * s
        flags = int(qc_flags[i])
        if flags == 0:
            color = COLORS["kept"]
        elif flags & QC_FLAGS["pen"]:
            color = COLORS["pen"]
        elif flags & QC_FLAGS["blurry"] and not flags & QC_FLAGS["low_tissue"]:
            color = COLORS["blurry"]
        else:
            color = COLORS["low_tissue"]
        draw.rectangle([x, y + header, x + size - 1, y + header + size - 1], outline=color)
    legend = f"{title}  kept: green  low tissue: grey  blurry: orange  pen: magenta  tissue outline: blue"
    draw.text((4, 4), legend.strip(), fill=(0, 0, 0))
    return canvas


def save_qc_picture(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    image.save(path, compress_level=1)  # a picture to look at: fast zlib, ~5x quicker than the default
    return path
