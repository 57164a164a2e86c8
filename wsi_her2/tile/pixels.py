"""Read pixels at a physical resolution: thumbnails, and tiles block by block.

Memory is bounded by design, not by the file's honesty (a 4 MB TIFF can claim 10^6 x 10^6 px):

- no single region read decodes more than ``MAX_READ_BYTES`` (256 MiB): the thumbnail is
  assembled from strips of at most ``STRIP_ROWS`` level rows, each split into column blocks
  when a full-width strip would exceed the budget (slides without a pyramid are streamed), and
  tiles are read one block (a few MB) at a time;
- a thumbnail is refused (one :class:`~wsi_her2.errors.SlideOpenError` line) when its source
  level holds more than ``MAX_THUMB_SOURCE_PX`` pixels (2^34, ~17 Gpx: a 130k x 130k slide
  without a pyramid), since decoding it would take hours: re-save such a slide with a pyramid.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from wsi_her2.errors import SlideOpenError, WsiHer2Error
from wsi_her2.slide.base import SlideReader
from wsi_her2.tile.geometry import TileGeometry
from wsi_her2.tile.tissue import THUMB_MAX_MPP_UM, THUMB_MPP_UM

STRIP_ROWS = 2048
MAX_READ_BYTES = 256 << 20  # decoded RGB bytes of one region read
MAX_THUMB_SOURCE_PX = 1 << 34  # level pixels decoded to make one thumbnail


def _resize_box(region: NDArray[np.uint8], size_wh: tuple[int, int], box: tuple[float, float, float, float]) -> NDArray[np.uint8]:
    """Area-average (PIL BOX) ``region`` cropped to the float ``box`` into ``size_wh``.

    BOX is true area averaging, the same operation a scanner's pyramid uses, so a tile read at
    0.5 µm/px from a 0.25 µm/px level equals the 2x2 mean of the native pixels.
    """
    img = Image.fromarray(region)
    return np.asarray(img.resize(size_wh, resample=Image.Resampling.BOX, box=box))


def auto_thumb_mpp(reader: SlideReader, slide_mpp_um: float) -> float:
    """The tissue thumbnail's µm/px: a pyramid level's own resolution when one lies within
    [``THUMB_MPP_UM``, ``THUMB_MAX_MPP_UM``] (read as stored, cheap), else ``THUMB_MPP_UM``."""
    native = sorted(slide_mpp_um * lvl.downsample for lvl in reader.levels)
    inside = [m for m in native if THUMB_MPP_UM * 0.975 <= m <= THUMB_MAX_MPP_UM * 1.025]
    return inside[0] if inside else THUMB_MPP_UM


def read_thumbnail(
    reader: SlideReader, *, slide_mpp_um: float, thumb_mpp_um: float | None = THUMB_MPP_UM, max_side_px: int = 4096,
    max_read_bytes: int = MAX_READ_BYTES, max_source_px: int = MAX_THUMB_SOURCE_PX,
) -> tuple[NDArray[np.uint8], float]:
    """Whole-slide thumbnail near ``thumb_mpp_um``; returns ``(rgb, thumb_px_per_level0_px)``.

    ``thumb_mpp_um=None``: :func:`auto_thumb_mpp`. Streams the source level in blocks of at most ``max_read_bytes`` decoded bytes; refuses a
    source level of more than ``max_source_px`` pixels (module docstring).
    """
    if thumb_mpp_um is None:
        thumb_mpp_um = auto_thumb_mpp(reader, slide_mpp_um)
    w0, h0 = reader.dimensions
    scale = min(slide_mpp_um / thumb_mpp_um, max_side_px / max(w0, h0), 1.0)  # thumb px per level-0 px
    tw, th = max(1, int(round(w0 * scale))), max(1, int(round(h0 * scale)))
    level = 0
    for i, lvl in enumerate(reader.levels):
        if lvl.downsample <= 1.0 / scale + 1e-6:
            level = i
    lvl = reader.levels[level]
    if lvl.width_px * lvl.height_px > max_source_px:
        raise SlideOpenError(
            f"{reader.path}: no pyramid level small enough for a thumbnail: the smallest usable level is "
            f"{lvl.width_px} x {lvl.height_px} px ({lvl.width_px * lvl.height_px / 1e9:.0f} Gpx to decode, budget "
            f"{max_source_px / 1e9:.0f} Gpx); if the size is real, re-save the slide with a pyramid "
            "(e.g. `vips tiffsave --tile --pyramid`), else the file's header is wrong"
        )
    k = 1.0 / (scale * lvl.downsample)  # level px per thumb px
    rows_per_strip = max(1, int(STRIP_ROWS / k))
    strip_rows_lvl = rows_per_strip * k + 2
    if lvl.width_px * strip_rows_lvl * 3 <= max_read_bytes:
        cols_per_block = tw  # the whole width in one read
    else:
        cols_per_block = max(1, int(max_read_bytes / (3 * strip_rows_lvl * k)) - 1)
    strips = []
    for r0 in range(0, th, rows_per_strip):
        r1 = min(th, r0 + rows_per_strip)
        ly0 = int(math.floor(r0 * k))
        ly1 = min(lvl.height_px, int(math.ceil(r1 * k)))
        blocks = [_thumb_block(reader, level, lvl, k, (c0, min(tw, c0 + cols_per_block)), (r0, r1), (ly0, ly1), tw)
                  for c0 in range(0, tw, cols_per_block)]
        strips.append(np.concatenate(blocks, axis=1))
    return np.concatenate(strips, axis=0), tw / w0


def _thumb_block(reader, level, lvl, k, cols, rows, lrows, tw) -> NDArray[np.uint8]:
    """Thumbnail columns ``cols`` of strip ``rows``, from level rows ``lrows`` (one bounded read)."""
    (c0, c1), (r0, r1), (ly0, ly1) = cols, rows, lrows
    lx0 = int(math.floor(c0 * k))
    lx1 = lvl.width_px if c1 == tw else min(lvl.width_px, int(math.ceil(c1 * k)))
    region = reader.read_level_region(level, lx0, ly0, max(1, lx1 - lx0), max(1, ly1 - ly0))
    box = (c0 * k - lx0, r0 * k - ly0, min(c1 * k - lx0, region.shape[1]), min(r1 * k - ly0, region.shape[0]))
    return _resize_box(region, (c1 - c0, r1 - r0), box)


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


def read_thumbnail_or_fail(reader: SlideReader, path, *, slide_mpp_um: float, thumb_mpp_um: float | None = None):
    """:func:`read_thumbnail`, with a damaged file's decoder error turned into one clear line."""
    try:
        return read_thumbnail(reader, slide_mpp_um=slide_mpp_um, thumb_mpp_um=thumb_mpp_um)
    except WsiHer2Error:
        raise  # already one clear line (e.g. the memory budget)
    except Exception as exc:  # decoder errors from a damaged file: one clear line, not a traceback
        raise SlideOpenError(
            f"{path}: cannot read the slide's pixels ({type(exc).__name__}: {exc}); "
            "the file may be truncated or corrupt: re-copy it"
        ) from exc
