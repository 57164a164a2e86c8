"""Write Aperio-like pyramidal tiled-JPEG TIFFs (``.svs``) that openslide and tiffslide open.

Shared by the synthetic slide generator (:mod:`wsi_her2.synthetic.slides`) and the image-to-slide
utility (:mod:`wsi_her2.synthetic.image_slide`): both hand over level-0 size, pixel size, the pyramid
downsamples and a callable yielding each level's native tiles; this module owns the SVS page
layout, the Aperio ImageDescription and the JPEG settings.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "APERIO_HEADER",
    "aperio_description_text",
    "app_mag",
    "pyramid_downsamples_for",
    "write_aperio_pyramid",
]

logger = logging.getLogger(__name__)

APERIO_HEADER = "Aperio Image Library v12.0.0"

#: ``level_tiles(downsample, level_w_px, level_h_px)`` yields the level's ``tile_px`` square
#: tiles in row-major order (edge tiles padded to full size by the caller).
LevelTiles = Callable[[int, int, int], Iterable[NDArray[np.uint8]]]


def app_mag(mpp_um: float) -> int:
    """Nominal objective magnification for a pixel size: 0.5 µm/px -> 20x, 0.25 -> 40x."""
    return max(1, round(10.0 / mpp_um))


def aperio_description_text(width_px: int, height_px: int, tile_px: int, jpeg_quality: int, *,
                            mpp_um: float | None, level_w_px: int | None = None,
                            level_h_px: int | None = None, filename: str = "synthetic") -> str:
    """Aperio ImageDescription for level 0 (or, with a size, for a reduced page).

    ``mpp_um=None`` writes no ``MPP``/``AppMag`` (a slide without pixel-size metadata).
    """
    w, h, t = width_px, height_px, tile_px
    head = f"{APERIO_HEADER}\r\n{w}x{h} [0,0 {w}x{h}] ({t}x{t})"
    if level_w_px is not None:
        return f"{head} -> {level_w_px}x{level_h_px} JPEG/RGB Q={jpeg_quality}"
    desc = f"{head} JPEG/RGB Q={jpeg_quality}"
    if mpp_um is not None:
        desc += f"|AppMag = {app_mag(mpp_um)}|MPP = {mpp_um:.4f}"
    return desc + f"|Filename = {filename}"


def pyramid_downsamples_for(width_px: int, height_px: int, tile_px: int,
                            wanted: Sequence[int] = (1, 4, 16)) -> tuple[int, ...]:
    """Downsamples actually written: stop at the first level whose longer side would be
    smaller than one native tile."""
    out = [1]
    for d in wanted[1:]:
        if max(width_px // d, height_px // d) < tile_px:
            break
        out.append(d)
    return tuple(out)


def write_aperio_pyramid(path: str | Path, *, width_px: int, height_px: int, tile_px: int,
                         downsamples: Sequence[int], level_tiles: LevelTiles,
                         thumbnail: NDArray[np.uint8], mpp_um: float | None, jpeg_quality: int = 90,
                         jpeg_rgb: bool = False, workers: int = 1, filename: str = "synthetic") -> Path:
    """Write an Aperio-like pyramidal tiled-JPEG TIFF.

    Page layout follows real SVS files: level 0 (tiled), a stripped thumbnail, then the
    reduced levels (tiled). Every page has ``subfiletype=0`` (tifffile's SVS parser, used by
    tiffslide, stops at "reduced" pages, and takes page 1 as the thumbnail whatever it is).
    JPEG is stored as YCbCr with 2x2 chroma subsampling, or with ``jpeg_rgb`` as RGB without
    subsampling; both openslide and tiffslide decode either to identical pixels. Level ``d``
    is ``width_px // d`` by ``height_px // d``. With ``mpp_um`` the pixel size is written both
    in the description (``MPP``) and as TIFF resolution tags; ``None`` writes neither.
    """
    import tifffile  # heavy-ish; only the writer needs it

    path = Path(path)
    raw_bytes = sum((width_px // d) * (height_px // d) * 3 for d in downsamples)
    started = time.perf_counter()
    jpeg: dict = {"compressionargs": {"level": jpeg_quality}, "subsampling": (2, 2)}
    if jpeg_rgb:
        jpeg = {"compressionargs": {"level": jpeg_quality, "outcolorspace": "RGB"}, "subsampling": (1, 1)}
    common = dict(dtype=np.uint8, photometric="rgb", compression="jpeg", metadata=None, software=False,
                  subfiletype=0, maxworkers=workers, **jpeg)

    def describe(level_w: int | None = None, level_h: int | None = None) -> str:
        return aperio_description_text(width_px, height_px, tile_px, jpeg_quality, mpp_um=mpp_um,
                                       level_w_px=level_w, level_h_px=level_h, filename=filename)

    with tifffile.TiffWriter(path, bigtiff=raw_bytes > 2**31) as tif:
        for index, d in enumerate(downsamples):
            w, h = width_px // d, height_px // d
            res = {}
            if mpp_um is not None:
                px_per_cm = 1e4 / (mpp_um * d)
                res = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(data=iter(level_tiles(d, w, h)), shape=(h, w, 3), tile=(tile_px, tile_px),
                      description=describe() if index == 0 else describe(w, h), **res, **common)
            logger.info("level %d (downsample %d, %dx%d) written after %.1f s",
                        index, d, w, h, time.perf_counter() - started)
            if index == 0:
                tif.write(thumbnail, description=describe(thumbnail.shape[1], thumbnail.shape[0]),
                          rowsperstrip=64, **common)
    logger.info("wrote %s (%dx%d px, %d levels) in %.1f s", path, width_px, height_px,
                len(downsamples), time.perf_counter() - started)
    return path
