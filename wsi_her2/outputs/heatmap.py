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
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import ArrayLike, NDArray
from PIL import Image

from wsi_her2.errors import ConfigError
from wsi_her2.outputs.geojson import QC_REJECTED, class_color, qupath_class_name
from wsi_her2.outputs.picture_layout import (
    MIN_LONG_SIDE_PX,
    colorbar_strip,
    compose,
    display_zoom,
    font_px_for,
    upsample_nearest,
    viridis_lut,
)

log = logging.getLogger(__name__)

_EMPTY = -2  # label of pixels no tile covers
_REJECTED = -1
_HATCH_PERIOD_PX = 6  # one grey diagonal every 6 px: visible at thumbnail scale, see-through


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
    img, xy, calls_arr = _checked_heatmap_inputs(thumbnail, thumb_px_per_level0_px, coords_level0,
                                                 tile_size_level0, calls, len(class_names), alpha)
    h, w = img.shape[:2]
    k = len(class_names)
    lut = np.array([_colour_of(c, colors) for c in class_names], dtype=np.float32).reshape(k, 3)
    grey = np.array(_colour_of(QC_REJECTED, colors), dtype=np.float32)
    rects = _tile_rects(xy, float(tile_size_level0), float(thumb_px_per_level0_px),
                        np.asarray(thumb_origin_level0, dtype=np.float64), h, w)
    labels = _call_label_image(rects, calls_arr, h, w)

    out = img.copy()
    # The blend of an 8-bit pixel with a class colour is a 256-entry table per class and channel:
    # one table lookup per class over the picture, instead of float arithmetic per pixel.
    levels = np.arange(256, dtype=np.float32).reshape(256, 1)
    for c in range(k):
        where = labels == c
        if where.any():
            table = np.clip(np.round((1.0 - alpha) * levels + alpha * lut[c]), 0, 255).astype(np.uint8)
            cv2.copyTo(cv2.LUT(img, table.reshape(256, 1, 3)), where.view(np.uint8), out)  # in place
    diagonal = (np.arange(h)[:, None] + np.arange(w)[None, :]) % _HATCH_PERIOD_PX == 0
    out[(labels == _REJECTED) & diagonal] = grey.astype(np.uint8)
    return out


def _checked_heatmap_inputs(thumbnail: ArrayLike, thumb_px_per_level0_px: float, coords_level0: ArrayLike,
                            tile_size_level0: float, calls: ArrayLike, n_classes: int, alpha: float):
    """``(rgb thumbnail, (N, 2) float64 coords, (N,) int64 calls)``, or :class:`ConfigError` naming the bad input."""
    img = np.asarray(thumbnail)
    if img.ndim != 3 or img.shape[2] not in (3, 4) or img.dtype != np.uint8:
        raise ConfigError(f"thumbnail must be an (h, w, 3) uint8 RGB array, got {img.shape} {img.dtype}")
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
    k = n_classes
    if calls_arr.size and (calls_arr.min() < -1 or calls_arr.max() >= k):
        raise ConfigError(f"calls must lie in -1..{k - 1} for {k} classes")
    return img[..., :3], xy, calls_arr


def _call_label_image(rects: NDArray[np.int64], calls: NDArray[np.int64], h_px: int, w_px: int) -> NDArray[np.int16]:
    """``(h, w)`` class index per thumbnail pixel (``-1`` rejected tile, ``_EMPTY`` no tile)."""
    labels = np.full((h_px, w_px), _EMPTY, dtype=np.int16)
    # Rejected tiles first, scored tiles after: where a scored tile overlaps a rejected one
    # the call shows, since that tile's call is the information.
    order = np.argsort(calls >= 0, kind="stable")
    for (x0, y0, x1, y1), c in zip(rects[order].tolist(), calls[order].tolist()):
        labels[y0:y1, x0:x1] = c
    return labels


def call_legend(
    class_names: Sequence[str],
    *,
    slide_call: Mapping | None = None,
    n_rejected: int | None = None,
    colors: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, tuple[int, int, int]]:
    """Legend with the call's class shares (``"HER2 2+: 59 % of tiles"``, or ``"% of tumour cells"``
    when the call was made on tumour cells) and the rejected count."""
    fractions = (slide_call or {}).get("class_fractions", {}) or {}
    details = (slide_call or {}).get("details") or {}
    unit = "tumour cells" if details.get("unit") == "tumour cells" else "tiles"
    legend: dict[str, tuple[int, int, int]] = {}
    for c in class_names:
        label = _display_name(c)
        if c in fractions:
            label = f"{label}: {100 * float(fractions[c]):.0f} % of {unit}"
        legend[label] = _colour_of(c, colors)
    rejected = QC_REJECTED if n_rejected is None else f"{QC_REJECTED}: {int(n_rejected)} tiles"
    legend[rejected] = _colour_of(QC_REJECTED, colors)
    return legend


def call_title(slide_id: str, slide_call: Mapping, *, what: str = "") -> str:
    """``"<id>: call HER2 2+ (asco, confidence 0.93, 120 tiles)"``."""
    n = slide_call.get("n_tiles_used")
    tiles = f", {n} tiles" if n is not None else ""
    return (f"{slide_id}{what}: call HER2 {slide_call['her2_score']} ({slide_call.get('method', '')}, "
            f"confidence {float(slide_call.get('confidence', 0.0)):.2f}{tiles})")


def render_measure_map(
    thumbnail: ArrayLike,
    *,
    thumb_px_per_level0_px: float,
    coords_level0: ArrayLike,
    tile_size_level0: float,
    values: ArrayLike,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.75,
    thumb_origin_level0: tuple[float, float] = (0.0, 0.0),
) -> tuple[NDArray[np.uint8], float, float]:
    """Paint a continuous per-tile measurement (viridis) over a thumbnail.

    Tiles whose value is NaN (rejected, not scored) are hatched grey as in :func:`render_heatmap`.
    ``vmin``/``vmax`` default to the 1st/99th percentile of the finite values. Returns the
    image and the ``(vmin, vmax)`` used, for the colour bar.
    """
    img = np.asarray(thumbnail)
    if img.ndim != 3 or img.shape[2] not in (3, 4) or img.dtype != np.uint8:
        raise ConfigError(f"thumbnail must be an (h, w, 3) uint8 RGB array, got {img.shape} {img.dtype}")
    img = img[..., :3]
    h, w = img.shape[:2]
    xy = np.asarray(coords_level0, dtype=np.float64).reshape(-1, 2)
    vals = np.asarray(values, dtype=np.float64).reshape(-1)
    if vals.shape[0] != xy.shape[0]:
        raise ConfigError(f"values has {vals.shape[0]} entries for {xy.shape[0]} tiles")
    finite = vals[np.isfinite(vals)]
    lo = float(vmin) if vmin is not None else (float(np.percentile(finite, 1)) if finite.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(np.percentile(finite, 99)) if finite.size else 1.0)
    if not hi > lo:
        hi = lo + 1e-6
    rects = _tile_rects(xy, float(tile_size_level0), float(thumb_px_per_level0_px),
                        np.asarray(thumb_origin_level0, dtype=np.float64), h, w)
    level = np.full((h, w), -1, dtype=np.int16)  # -1: no tile; -2: tile without a value
    codes = np.where(np.isfinite(vals), np.clip(np.round((vals - lo) / (hi - lo) * 255), 0, 255), -2).astype(np.int16)
    order = np.argsort(codes >= 0, kind="stable")  # tiles with values drawn last, on top
    for (x0, y0, x1, y1), c in zip(rects[order].tolist(), codes[order].tolist()):
        level[y0:y1, x0:x1] = c
    out = img.copy()
    has = level >= 0
    lut = viridis_lut().astype(np.float32)
    out[has] = np.clip(np.round((1 - alpha) * img[has] + alpha * lut[level[has]]), 0, 255).astype(np.uint8)
    diagonal = (np.arange(h)[:, None] + np.arange(w)[None, :]) % _HATCH_PERIOD_PX == 0
    out[(level == -2) & diagonal] = np.array(class_color(QC_REJECTED), np.uint8)
    return out, lo, hi


def save_heatmap_png(
    image: ArrayLike,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    legend: Mapping[str, Sequence[int]] | None = None,
    colorbar: Mapping | None = None,
    min_long_side_px: int = MIN_LONG_SIDE_PX,
) -> Path:
    """Save a rendered heatmap as PNG, at least ``min_long_side_px`` on the long side, with title and legend.

    Parameters
    ----------
    image
        ``(h, w, 3)`` uint8, typically from :func:`render_heatmap` or :func:`render_measure_map`.
        Enlarged by an integer factor, nearest neighbour (no blur), until its long side is at
        least ``min_long_side_px``.
    path
        Output ``.png`` path (parent folders are created).
    title
        Text above the image, wrapped to its width (never cut).
    legend
        Label -> RGB, drawn as swatches below the image, wrapped onto several rows as needed;
        :func:`call_legend` gives the usual one.
    colorbar
        ``{"label", "vmin", "vmax"}``: a viridis colour bar below the legend (continuous maps).

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
    big = upsample_nearest(arr, display_zoom(*arr.shape[:2], min_long_side_px=min_long_side_px))
    picture = Image.fromarray(np.ascontiguousarray(big), mode="RGB")
    below = None
    if colorbar:
        below = colorbar_strip(picture.width, vmin=float(colorbar["vmin"]), vmax=float(colorbar["vmax"]),
                               label=str(colorbar["label"]), lut=viridis_lut(), font_px=font_px_for(picture.width))
    entries = [(str(k), tuple(int(c) for c in v)) for k, v in (legend or {}).items()]
    canvas = compose(picture, title=title, legend=entries, below=below)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG", compress_level=1)  # level 6 (the default) took ~1 s on a 40,000 px slide's map
    log.info("wrote heatmap %s (%d x %d px)", path, canvas.width, canvas.height)
    return path


def display_thumbnail(thumbnail: ArrayLike, thumb_px_per_level0_px: float) -> tuple[NDArray[np.uint8], float]:
    """The thumbnail enlarged (nearest neighbour) to a readable size, and its new px per level-0 px.

    Painting tiles on the enlarged thumbnail keeps tile edges sharp at the picture's scale.
    """
    thumb = np.asarray(thumbnail)[..., :3]
    zoom = display_zoom(*thumb.shape[:2])
    return upsample_nearest(thumb, zoom), float(thumb_px_per_level0_px) * zoom


def write_call_heatmap(path: str | os.PathLike, *, thumbnail: ArrayLike, thumb_px_per_level0_px: float,
                       coords_level0: ArrayLike, tile_size_level0: float, calls: ArrayLike,
                       class_names: Sequence[str], slide_call: Mapping, slide_id: str) -> Path:
    """The tile-call heatmap of one slide: readable size, call in the title, class fractions in the legend."""
    thumb, scale = display_thumbnail(thumbnail, thumb_px_per_level0_px)
    image = render_heatmap(thumb, thumb_px_per_level0_px=scale, coords_level0=coords_level0,
                           tile_size_level0=tile_size_level0, calls=calls, class_names=class_names)
    n_rejected = int((np.asarray(calls) < 0).sum())
    legend = call_legend(class_names, slide_call=slide_call, n_rejected=n_rejected)
    return save_heatmap_png(image, path, title=call_title(slide_id, slide_call), legend=legend)


def write_measure_heatmap(path: str | os.PathLike, *, thumbnail: ArrayLike, thumb_px_per_level0_px: float,
                          coords_level0: ArrayLike, tile_size_level0: float, values: ArrayLike, measure: str,
                          slide_call: Mapping, slide_id: str) -> Path:
    """A continuous map of one tile measurement (e.g. ``p_3+``, ``her2_index``) with a colour bar."""
    thumb, scale = display_thumbnail(thumbnail, thumb_px_per_level0_px)
    fixed = (0.0, 1.0) if measure.startswith("p_") else (None, None)  # probabilities: the honest 0-1 scale
    image, lo, hi = render_measure_map(thumb, thumb_px_per_level0_px=scale, coords_level0=coords_level0,
                                       tile_size_level0=tile_size_level0, values=values, vmin=fixed[0], vmax=fixed[1])
    n_missing = int((~np.isfinite(np.asarray(values, dtype=np.float64))).sum())
    legend = {f"{QC_REJECTED} / no value: {n_missing} tiles": class_color(QC_REJECTED)}
    title = f"{call_title(slide_id, slide_call)}; map of {measure}"
    return save_heatmap_png(image, path, title=title, legend=legend,
                            colorbar={"label": f"{measure} per tile", "vmin": lo, "vmax": hi})
