"""A quick-look PNG: tile calls painted over the slide thumbnail, with a legend and title.

The thumbnail frame is the full level-0 plane scaled by ``thumb_px_per_level0_px`` (what
``openslide``'s ``get_thumbnail`` and tiffslide return), so tile coordinates are *not*
shifted by the OpenSlide bounds offset here, unlike the QuPath GeoJSON.

Painting is two steps: each tile's rectangle is written into an integer label image by
slicing (one small slice assignment per tile, ~0.2 s per 100k tiles), then colours are
blended over the whole image at once with a lookup table. Rejected tiles are hatched in
grey (diagonal lines, the thumbnail visible between them) rather than tinted, so they can
never be mistaken for a class.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from PIL import Image, ImageDraw, ImageFont

from wsi_her2.errors import ConfigError
from wsi_her2.geojson import QC_REJECTED, class_color, qupath_class_name

log = logging.getLogger(__name__)

_EMPTY = -2  # label of pixels no tile covers
_REJECTED = -1
_HATCH_PERIOD_PX = 6  # one grey diagonal every 6 px: visible at thumbnail scale, see-through
_PAD_PX = 6
_SWATCH_PX = 14


def default_legend(
    class_names: Sequence[str], colors: Mapping[str, Sequence[int]] | None = None
) -> dict[str, tuple[int, int, int]]:
    """Legend entries (QuPath class name -> RGB) for ``class_names`` plus ``"QC rejected"``."""
    return {_display_name(c): _colour_of(c, colors) for c in list(class_names) + [QC_REJECTED]}


def _display_name(name: str) -> str:
    return name if name == QC_REJECTED else qupath_class_name(name)


def _colour_of(name: str, colors: Mapping[str, Sequence[int]] | None) -> tuple[int, int, int]:
    """Colour of a class: an override keyed by class or QuPath name, else the QuPath colour."""
    q = _display_name(name)
    rgb = (colors or {}).get(name) or (colors or {}).get(q) or class_color(q)
    out = tuple(int(v) for v in rgb)
    if len(out) != 3 or not all(0 <= v <= 255 for v in out):
        raise ConfigError(f"colour of class {q!r} must be 3 integers in 0..255, got {rgb}")
    return out  # type: ignore[return-value]


def _tile_rects(
    coords_level0: NDArray[np.float64],
    tile_size_level0: float,
    scale: float,
    origin: NDArray[np.float64],
    h: int,
    w: int,
) -> NDArray[np.int64]:
    """``(N, 4)`` clipped pixel rectangles ``x0, y0, x1, y1`` (end-exclusive) in the thumbnail."""
    tl = (coords_level0 - origin) * scale
    br = (coords_level0 - origin + tile_size_level0) * scale
    # Rounding both edges (not floor/ceil) makes tiles on a grid meet without gaps or
    # overlaps; tiles smaller than a thumbnail pixel still get one pixel.
    x0 = np.round(tl[:, 0]).astype(np.int64)
    y0 = np.round(tl[:, 1]).astype(np.int64)
    x1 = np.maximum(np.round(br[:, 0]).astype(np.int64), x0 + 1)
    y1 = np.maximum(np.round(br[:, 1]).astype(np.int64), y0 + 1)
    rects = np.stack([np.clip(x0, 0, w), np.clip(y0, 0, h), np.clip(x1, 0, w), np.clip(y1, 0, h)], 1)
    return rects


def render_heatmap(
    thumbnail: ArrayLike,
    *,
    thumb_px_per_level0_px: float,
    coords_level0: ArrayLike,
    tile_size_level0: float,
    calls: ArrayLike,
    class_names: Sequence[str],
    colors: Mapping[str, Sequence[int]] | None = None,
    alpha: float = 0.45,
    thumb_origin_level0: tuple[float, float] = (0.0, 0.0),
) -> NDArray[np.uint8]:
    """Paint tile calls over a slide thumbnail.

    Parameters
    ----------
    thumbnail
        ``(h, w, 3)`` uint8 RGB thumbnail (``(h, w, 4)`` RGBA is accepted; alpha is dropped).
    thumb_px_per_level0_px
        Thumbnail pixels per level-0 pixel (e.g. ``thumb_w / level0_w``).
    coords_level0
        ``(N, 2)`` top-left ``[x, y]`` of each tile, level-0 pixels.
    tile_size_level0
        Tile side in level-0 pixels.
    calls
        ``(N,)`` class index per tile, ``-1`` for rejected / not scored tiles.
    class_names
        Class names by index (``"0"``, ``"1+"``, ...).
    colors
        Optional overrides, keyed by class name or QuPath class name, of the QuPath colours.
    alpha
        Opacity of the class colour over the thumbnail, in [0, 1].
    thumb_origin_level0
        Level-0 position of the thumbnail's top-left pixel (non-zero for a region thumbnail).

    Returns
    -------
    numpy.ndarray
        ``(h, w, 3)`` uint8, the same size as the thumbnail.
    """
    img = np.asarray(thumbnail)
    if img.ndim != 3 or img.shape[2] not in (3, 4) or img.dtype != np.uint8:
        raise ConfigError(f"thumbnail must be an (h, w, 3) uint8 RGB array, got {img.shape} {img.dtype}")
    img = img[..., :3]
    h, w = img.shape[:2]
    scale = float(thumb_px_per_level0_px)
    if not np.isfinite(scale) or scale <= 0:
        raise ConfigError(f"thumb_px_per_level0_px must be positive, got {thumb_px_per_level0_px}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"alpha must lie in [0, 1], got {alpha}")
    size = float(tile_size_level0)
    if not np.isfinite(size) or size <= 0:
        raise ConfigError(f"tile_size_level0 must be positive, got {tile_size_level0}")
    xy = np.asarray(coords_level0, dtype=np.float64).reshape(-1, 2)
    calls_arr = np.asarray(calls).reshape(-1).astype(np.int64)
    if calls_arr.shape[0] != xy.shape[0]:
        raise ConfigError(f"calls has {calls_arr.shape[0]} entries for {xy.shape[0]} tiles")
    k = len(class_names)
    if calls_arr.size and (calls_arr.min() < -1 or calls_arr.max() >= k):
        raise ConfigError(f"calls must lie in -1..{k - 1} for {k} classes")

    lut = np.array([_colour_of(c, colors) for c in class_names], dtype=np.float32).reshape(k, 3)
    grey = np.array(_colour_of(QC_REJECTED, colors), dtype=np.float32)

    rects = _tile_rects(xy, size, scale, np.asarray(thumb_origin_level0, dtype=np.float64), h, w)
    labels = np.full((h, w), _EMPTY, dtype=np.int16)
    # Rejected tiles first, scored tiles after: where a scored tile overlaps a rejected one
    # the call shows, since that tile's call is the information.
    order = np.argsort(calls_arr >= 0, kind="stable")
    for (x0, y0, x1, y1), c in zip(rects[order].tolist(), calls_arr[order].tolist()):
        labels[y0:y1, x0:x1] = c

    out = img.copy()
    scored = labels >= 0
    blended = (1.0 - alpha) * img[scored].astype(np.float32) + alpha * lut[labels[scored]]
    out[scored] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    diagonal = (np.arange(h)[:, None] + np.arange(w)[None, :]) % _HATCH_PERIOD_PX == 0
    out[(labels == _REJECTED) & diagonal] = grey.astype(np.uint8)
    return out


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def _legend_rows(
    entries: list[tuple[str, tuple[int, int, int]]], width: int, draw: ImageDraw.ImageDraw, font
) -> list[list[tuple[str, tuple[int, int, int], int]]]:
    rows: list[list[tuple[str, tuple[int, int, int], int]]] = [[]]
    x = _PAD_PX
    for label, rgb in entries:
        item_w = _SWATCH_PX + 4 + int(np.ceil(draw.textlength(label, font=font))) + 2 * _PAD_PX
        if rows[-1] and x + item_w > width:
            rows.append([])
            x = _PAD_PX
        rows[-1].append((label, rgb, x))
        x += item_w
    return rows


def save_heatmap_png(
    image: ArrayLike,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    legend: Mapping[str, Sequence[int]] | None = None,
) -> Path:
    """Save a rendered heatmap as PNG, with an optional title bar and legend strip.

    Parameters
    ----------
    image
        ``(h, w, 3)`` uint8, typically from :func:`render_heatmap`.
    path
        Output ``.png`` path (parent folders are created).
    title
        Text above the image, e.g. ``"slide-1: HER2 2+ (asco, confidence 0.93)"``.
    legend
        Label -> RGB, drawn as swatches below the image (wrapped onto several rows when
        needed); :func:`default_legend` gives the usual one.

    Returns
    -------
    Path
        The path written.
    """
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ConfigError(f"image must be an (h, w, 3) uint8 array, got {arr.shape} {arr.dtype}")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"{path} must end in .png")
    h, w = arr.shape[:2]
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = max(_SWATCH_PX, int(np.ceil(probe.textbbox((0, 0), "Hg+", font=font)[3]))) + _PAD_PX
    # Narrow thumbnails still get a readable legend and title.
    canvas_w = max(w, 240)
    title_h = line_h + _PAD_PX if title else 0
    rows = _legend_rows(list((str(k), tuple(int(c) for c in v)) for k, v in (legend or {}).items()),
                        canvas_w, probe, font) if legend else []
    legend_h = len(rows) * line_h + _PAD_PX if rows else 0

    canvas = Image.new("RGB", (canvas_w, title_h + h + legend_h), (255, 255, 255))
    canvas.paste(Image.fromarray(arr, mode="RGB"), (0, title_h))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((_PAD_PX, _PAD_PX // 2 + 1), title, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        y = title_h + h + _PAD_PX // 2 + r * line_h
        for label, rgb, x in row:
            draw.rectangle([x, y, x + _SWATCH_PX - 1, y + _SWATCH_PX - 1], fill=rgb, outline=(0, 0, 0))
            draw.text((x + _SWATCH_PX + 4, y), label, fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    log.info("wrote heatmap %s (%d x %d px)", path, canvas.width, canvas.height)
    return path
