"""Read pixels at a physical resolution: thumbnails, and tiles block by block.

Memory stays bounded whatever the slide size: the thumbnail is assembled from strips of at most
``STRIP_ROWS`` level rows, and tiles are read one block (a few MB) at a time.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from wsi_her2.slide.base import SlideReader
from wsi_her2.tiling import TileGeometry
from wsi_her2.tissue import THUMB_MPP_UM

STRIP_ROWS = 2048


def _resize_box(region: NDArray[np.uint8], size_wh: tuple[int, int], box: tuple[float, float, float, float]) -> NDArray[np.uint8]:
    """Area-average (PIL BOX) ``region`` cropped to the float ``box`` into ``size_wh``.

    BOX is true area averaging, the same operation a scanner's pyramid uses, so a tile read at
    0.5 µm/px from a 0.25 µm/px level equals the 2x2 mean of the native pixels.
    """
    img = Image.fromarray(region)
    return np.asarray(img.resize(size_wh, resample=Image.Resampling.BOX, box=box))


def read_thumbnail(
    reader: SlideReader, *, slide_mpp_um: float, thumb_mpp_um: float = THUMB_MPP_UM, max_side_px: int = 4096
) -> tuple[NDArray[np.uint8], float]:
    """Whole-slide thumbnail near ``thumb_mpp_um``; returns ``(rgb, thumb_px_per_level0_px)``."""
    w0, h0 = reader.dimensions
    scale = min(slide_mpp_um / thumb_mpp_um, max_side_px / max(w0, h0), 1.0)  # thumb px per level-0 px
    tw, th = max(1, int(round(w0 * scale))), max(1, int(round(h0 * scale)))
    level = 0
    for i, lvl in enumerate(reader.levels):
        if lvl.downsample <= 1.0 / scale + 1e-6:
            level = i
    lvl = reader.levels[level]
    k = 1.0 / (scale * lvl.downsample)  # level px per thumb px
    rows_per_strip = max(1, int(STRIP_ROWS / k))
    strips = []
    for r0 in range(0, th, rows_per_strip):
        r1 = min(th, r0 + rows_per_strip)
        ly0 = int(math.floor(r0 * k))
        ly1 = min(lvl.height_px, int(math.ceil(r1 * k)))
        region = reader.read_level_region(level, 0, ly0, lvl.width_px, max(1, ly1 - ly0))
        box = (0.0, r0 * k - ly0, min(tw * k, lvl.width_px), min(r1 * k - ly0, region.shape[0]))
        strips.append(_resize_box(region, (tw, r1 - r0), box))
    return np.concatenate(strips, axis=0), tw / w0


def read_tiles(
    reader: SlideReader, *, geometry: TileGeometry, grid_rc: NDArray[np.integer], out: NDArray[np.uint8] | None = None
) -> NDArray[np.uint8]:
    """Tiles at ``grid_rc`` (row, col) as ``(n, tile_px, tile_px, 3)``, into ``out`` when given.

    Call it with tiles of one block. At the level's own resolution the reader fills the tiles
    directly (each slide tile decoded once); otherwise the block's bounding box is read once,
    area-resized once, and cut into tiles by slicing.
    """
    t, s, f = geometry.tile_px, geometry.stride_px, geometry.level_px_per_target_px
    rows, cols = grid_rc[:, 0].astype(np.int64), grid_rc[:, 1].astype(np.int64)
    if out is None:
        out = np.empty((len(rows), t, t, 3), dtype=np.uint8)
    lvl = geometry.level
    if f == 1.0:
        reader.read_level_squares(lvl, np.stack([cols * s, rows * s], axis=1), t, out)
        return out
    x0, y0 = int(cols.min() * s), int(rows.min() * s)
    x1, y1 = int(cols.max() * s + t), int(rows.max() * s + t)
    lx0, ly0 = int(math.floor(x0 * f)), int(math.floor(y0 * f))
    lx1, ly1 = int(math.ceil(x1 * f)), int(math.ceil(y1 * f))
    level = reader.levels[lvl]
    lx1, ly1 = min(lx1, level.width_px), min(ly1, level.height_px)
    raw = reader.read_level_region(lvl, lx0, ly0, lx1 - lx0, ly1 - ly0)
    box = (x0 * f - lx0, y0 * f - ly0, min(x1 * f - lx0, lx1 - lx0), min(y1 * f - ly0, ly1 - ly0))
    region = _resize_box(raw, (x1 - x0, y1 - y0), box)
    for i, (r, c) in enumerate(zip(rows, cols)):  # slicing views: cheap, one copy per tile
        yy, xx = int(r * s - y0), int(c * s - x0)
        out[i] = region[yy : yy + t, xx : xx + t]
    return out
