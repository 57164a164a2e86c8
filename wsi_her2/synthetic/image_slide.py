"""Make an ordinary RGB image (a photo, a dataset patch) into a slide the pipeline opens.

- :func:`write_image_slide`: an Aperio-like pyramidal tiled-JPEG ``.svs`` with a stated pixel
  size, written by the same code as the synthetic slides (:mod:`wsi_her2.synthetic.svs_writer`), so that
  ``wsi-her2 tile`` reads it with either backend and the right MPP.
- :func:`composite_on_glass`: the image placed on tinted glass, whole (``"rect"``) or as a
  round tissue-microarray-like core (``"core"``: a disc of the image, glass around it).
- :func:`resample_to_mpp`: change the pixel size (area average when coarsening, bicubic when
  refining), e.g. to present a 1 µm/px patch as a 0.25 µm/px scan.

Level ``d`` of the pyramid is the box mean (rounded half up) of the level-0 pixels in each
``d`` x ``d`` block, ``width // d`` by ``height // d`` px, as for the synthetic slides.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from wsi_her2.errors import ConfigError
from wsi_her2.synthetic.svs_writer import pyramid_downsamples_for, write_aperio_pyramid
from wsi_her2.synthetic.textures import block_mean

__all__ = [
    "LAVENDER_GLASS_RGB",
    "composite_on_glass",
    "disc_cover",
    "resample_to_mpp",
    "write_image_slide",
]

#: Tinted (lavender) glass as seen on real HER2 IHC tissue-microarray scans.
LAVENDER_GLASS_RGB = (234, 233, 242)
#: Longest side of the SVS thumbnail page, px.
_THUMBNAIL_MAX_PX = 1024
#: Glass noise: standard deviation in grey levels, and the clip (JPEG-like, +-1-2 levels).
_GLASS_NOISE_SD = 0.8
_GLASS_NOISE_MAX = 2


def _check_rgb(rgb: NDArray) -> NDArray[np.uint8]:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ConfigError(f"expected a non-empty (height, width, 3) uint8 RGB image, got "
                          f"{rgb.dtype} array of shape {rgb.shape}")
    return rgb


def _check_mpp(mpp_um: float, name: str = "mpp_um") -> float:
    if not (math.isfinite(mpp_um) and 0.05 <= mpp_um <= 20):
        raise ConfigError(f"{name}={mpp_um} is outside 0.05-20 µm/px")
    return float(mpp_um)


def _padded_tiles(level: NDArray[np.uint8], tile_px: int) -> Iterator[NDArray[np.uint8]]:
    """Row-major ``tile_px`` tiles; edge tiles padded by repeating the last row/column (no
    black border for JPEG blocks straddling the image edge to ring into)."""
    h, w = level.shape[:2]
    ph, pw = -h % tile_px, -w % tile_px
    padded = np.pad(level, ((0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else level
    for y in range(0, h, tile_px):
        for x in range(0, w, tile_px):
            yield padded[y: y + tile_px, x: x + tile_px]


def write_image_slide(rgb: NDArray[np.uint8], path: str | Path, *, mpp_um: float, tile_px: int = 256,
                      jpeg_quality: int = 90, jpeg_rgb: bool = False) -> Path:
    """Write ``rgb`` as an Aperio-like pyramidal tiled-JPEG ``.svs`` at ``mpp_um`` µm/px.

    Levels 1, 4, 16 (as long as the level's longer side holds one ``tile_px`` tile), a
    stripped thumbnail page, MPP in the Aperio description and the TIFF resolution tags.
    ``jpeg_rgb`` stores RGB 4:4:4 JPEG instead of YCbCr 4:2:0 (closer pixels, larger file).
    Returns ``path``.
    """
    rgb = _check_rgb(rgb)
    mpp_um = _check_mpp(mpp_um)
    if tile_px <= 0 or tile_px % 16:
        raise ConfigError(f"tile_px={tile_px} must be a positive multiple of 16")
    if not 1 <= jpeg_quality <= 100:
        raise ConfigError(f"jpeg_quality={jpeg_quality} must be within 1-100")
    path = Path(path)
    h, w = rgb.shape[:2]
    downsamples = pyramid_downsamples_for(w, h, tile_px)
    levels = {d: block_mean(rgb, d) for d in downsamples}
    coarsest = levels[downsamples[-1]]
    k = max(1, math.ceil(max(coarsest.shape[:2]) / _THUMBNAIL_MAX_PX))
    filename = re.sub(r"[^A-Za-z0-9._+-]", "_", path.stem) or "image"
    return write_aperio_pyramid(
        path, width_px=w, height_px=h, tile_px=tile_px, downsamples=downsamples,
        level_tiles=lambda d, _w, _h: _padded_tiles(levels[d], tile_px),
        thumbnail=block_mean(coarsest, k), mpp_um=mpp_um, jpeg_quality=jpeg_quality,
        jpeg_rgb=jpeg_rgb, filename=filename,
    )


def disc_cover(height_px: int, width_px: int, *, cx_px: float, cy_px: float, radius_px: float) -> NDArray[np.float32]:
    """Share of each pixel inside a disc (1 inside, 0 outside, a one-pixel anti-aliased rim)."""
    ys = np.arange(height_px, dtype=np.float32)[:, None] + 0.5 - cy_px
    xs = np.arange(width_px, dtype=np.float32)[None, :] + 0.5 - cx_px
    return np.clip(radius_px - np.sqrt(xs * xs + ys * ys) + 0.5, 0.0, 1.0).astype(np.float32)


def _glass(height_px: int, width_px: int, glass_rgb: tuple[int, int, int], seed: int) -> NDArray[np.uint8]:
    rng = np.random.default_rng([seed, 234])
    noise = rng.normal(0.0, _GLASS_NOISE_SD, (height_px, width_px, 3)).astype(np.float32)
    noise = np.clip(np.rint(noise), -_GLASS_NOISE_MAX, _GLASS_NOISE_MAX)
    return np.clip(np.asarray(glass_rgb, np.float32) + noise, 0, 255).astype(np.uint8)


def composite_on_glass(rgb: NDArray[np.uint8], *, glass_rgb: tuple[int, int, int] = LAVENDER_GLASS_RGB,
                       shape: str = "core", margin_px: int = 64, seed: int = 0,
                       relight_from_rgb: tuple[float, float, float] | None = None) -> NDArray[np.uint8]:
    """Place ``rgb`` on tinted glass with ``margin_px`` of glass on every side.

    ``shape="rect"`` keeps the whole image; ``shape="core"`` keeps the disc of diameter
    ``min(height, width)`` centred on the image (a round tissue-microarray core) and shows
    glass everywhere else. The glass is ``glass_rgb`` with slight per-pixel noise (standard
    deviation 0.8, clipped to +-2 grey levels), reproducible from ``seed``. The output is
    ``(height + 2 * margin_px, width + 2 * margin_px, 3)`` uint8.

    ``relight_from_rgb``: the glass colour the image was scanned over. Given, the image is
    re-lit as if scanned over ``glass_rgb`` (``I * glass / relight_from`` per channel), which
    keeps every pixel's optical density against its glass: pale tissue stays pale.
    """
    rgb = _check_rgb(rgb)
    if relight_from_rgb is not None:
        gain = np.asarray(glass_rgb, np.float32) / np.maximum(np.asarray(relight_from_rgb, np.float32), 1.0)
        rgb = np.clip(np.rint(rgb.astype(np.float32) * gain), 0, 255).astype(np.uint8)
    if shape not in ("core", "rect"):
        raise ConfigError(f"shape {shape!r} is unknown; use 'core' or 'rect'")
    if margin_px < 0:
        raise ConfigError(f"margin_px={margin_px} must be >= 0")
    if len(glass_rgb) != 3 or not all(0 <= int(c) <= 255 for c in glass_rgb):
        raise ConfigError(f"glass_rgb={glass_rgb} must be three values within 0-255")
    h, w = rgb.shape[:2]
    out = _glass(h + 2 * margin_px, w + 2 * margin_px, tuple(int(c) for c in glass_rgb), seed)
    window = out[margin_px: margin_px + h, margin_px: margin_px + w]
    if shape == "rect":
        window[...] = rgb
        return out
    cover = disc_cover(h, w, cx_px=w / 2, cy_px=h / 2, radius_px=min(h, w) / 2)[..., None]
    blended = cover * rgb.astype(np.float32) + (1.0 - cover) * window.astype(np.float32)
    window[...] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out


def resample_to_mpp(rgb: NDArray[np.uint8], src_mpp_um: float, dst_mpp_um: float) -> NDArray[np.uint8]:
    """Resample ``rgb`` from ``src_mpp_um`` to ``dst_mpp_um`` µm/px.

    Coarsening (``dst > src``) averages areas (OpenCV ``INTER_AREA``), refining uses bicubic
    interpolation (``INTER_CUBIC``, saturated to uint8); equal sizes return a copy. The output
    side is ``round(side * src / dst)`` px (at least 1).
    """
    import cv2

    rgb = _check_rgb(rgb)
    src, dst = _check_mpp(src_mpp_um, "src_mpp_um"), _check_mpp(dst_mpp_um, "dst_mpp_um")
    h, w = rgb.shape[:2]
    scale = src / dst
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (out_w, out_h) == (w, h):
        return rgb.copy()
    interpolation = cv2.INTER_AREA if dst > src else cv2.INTER_CUBIC
    return cv2.resize(np.ascontiguousarray(rgb), (out_w, out_h), interpolation=interpolation)
