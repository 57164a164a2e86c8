"""Tissue and pen-ink detection on RGB pixels (thumbnails and tiles), for H&E and IHC alike.

Why optical density and not a grey threshold alone: a HER2 0 slide is pale hematoxylin-only
tissue, and a 3+ slide is saturated DAB brown; both absorb light, glass does not. We measure
absorbance relative to the slide's own glass brightness (Beer-Lambert: OD = -log10(I / I0)), so
a scanner with greyish glass does not turn glass into tissue.

Why ``G - R`` finds pen ink: eosin and DAB absorb green far more than red, so their pixels
have G below R; hematoxylin absorbs red and green about equally (the Ruifrok-Johnston vector has
OD_G slightly above OD_R, real scans show dark nuclei with G up to ~30 levels above R). Green,
blue and cyan marker inks and tissue-marking dyes absorb red strongly and pass green: G exceeds
R by far more than any stain does. Blue ink is also caught by a strongly blue, red-poor colour
that hematoxylin (a purple-blue) does not reach. Black ink is dark and achromatic. Red/violet
inks look like eosin and are not detected (documented limit).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage


@dataclass(frozen=True)
class TissueParams:
    """Every tissue/pen threshold in one place (all configurable from the CLI)."""

    max_gray: float = 220.0  # paper default: pixels darker than 220 are tissue
    min_od_sum: float = 0.12  # also tissue: summed RGB optical density vs glass above this (pale hematoxylin)
    pen_green_minus_red: float = 40.0  # G - R above this (8-bit levels) is not a stain: green/cyan ink
    pen_blue_minus_red: float = 80.0  # with B > 150 and G - R > 15: blue ink
    black_ink_max_value: float = 50.0  # dark and achromatic: black ink
    black_ink_max_chroma: float = 25.0
    min_tissue_area_um2: float = 20_000.0  # drop specks (dust) smaller than this in the thumbnail mask
    max_hole_area_um2: float = 20_000.0  # fill holes (lumina, nuclei gaps) smaller than this
    closing_um: float = 24.0  # bridge gaps between nearby tissue fragments

    def to_dict(self) -> dict:
        return asdict(self)


def estimate_glass_rgb(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Glass (background) brightness per channel: the bright end of the histogram.

    The 99.5th percentile per channel is glass on any slide that has some glass; on a slide
    fully covered by tissue it is the brightest tissue, which only makes detection stricter.
    Floored at 200 so a dark slide cannot declare its tissue to be glass.
    """
    flat = rgb.reshape(-1, 3)
    if flat.shape[0] > 2_000_000:  # a strided sample is enough for a percentile
        flat = flat[:: flat.shape[0] // 1_000_000]
    glass = np.percentile(flat, 99.5, axis=0).astype(np.float32)
    return np.clip(glass, 200.0, 255.0)


def pen_pixels(rgb: NDArray[np.uint8], params: TissueParams = TissueParams()) -> NDArray[np.bool_]:
    """Marker-ink pixels (green/blue/cyan by stain physics, black by darkness)."""
    r = rgb[..., 0].astype(np.int16)
    g = rgb[..., 1].astype(np.int16)
    b = rgb[..., 2].astype(np.int16)
    coloured = ((g - r) > params.pen_green_minus_red) | (
        ((b - r) > params.pen_blue_minus_red) & (b > 150) & ((g - r) > 15)
    )
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    black = (mx < params.black_ink_max_value) & ((mx - mn) < params.black_ink_max_chroma)
    return coloured | black


def tissue_pixels(
    rgb: NDArray[np.uint8],
    *,
    glass_rgb: NDArray[np.floating] | None = None,
    params: TissueParams = TissueParams(),
    pen: NDArray[np.bool_] | None = None,
) -> NDArray[np.bool_]:
    """Pixels that are stained tissue (not glass, not pen ink). Works on any ``(..., 3)`` array.

    Pass ``pen`` (from :func:`pen_pixels`) when the caller needs it too, so it is computed once.
    """
    if glass_rgb is None:
        glass_rgb = np.array([255.0, 255.0, 255.0], dtype=np.float32)
    # uint8 in, so optical density is a 256-entry lookup per channel (no per-pixel log).
    # OD relative to glass; clipped so pixels brighter than glass count as zero absorbance.
    levels = np.arange(256, dtype=np.float32)
    luts = [np.clip(np.log10(float(g) + 1.0) - np.log10(levels + 1.0), 0.0, None) for g in glass_rgb]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    od_sum = luts[0][r] + luts[1][g] + luts[2][b]
    gray = (4899 * r.astype(np.int32) + 9617 * g.astype(np.int32) + 1868 * b.astype(np.int32) + 8192) >> 14
    tissue = (gray < params.max_gray) | (od_sum > params.min_od_sum)
    return tissue & ~(pen_pixels(rgb, params) if pen is None else pen)


@dataclass
class TissueMask:
    mask: NDArray[np.bool_]  # (h, w) at the thumbnail's resolution
    pen: NDArray[np.bool_]  # (h, w) pen ink
    glass_rgb: NDArray[np.float32]  # (3,) glass brightness used for OD
    mpp_um: float  # thumbnail pixel size

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def tissue_area_mm2(self) -> float:
        return float(self.mask.sum()) * (self.mpp_um / 1000.0) ** 2

    @property
    def pen_area_mm2(self) -> float:
        return float(self.pen.sum()) * (self.mpp_um / 1000.0) ** 2


def detect_tissue(
    thumbnail: NDArray[np.uint8], *, thumb_mpp_um: float, params: TissueParams = TissueParams()
) -> TissueMask:
    """Tissue mask of a thumbnail: OD/grey pixel rule, then morphology in physical units.

    Parameters
    ----------
    thumbnail
        ``(h, w, 3)`` RGB at ``thumb_mpp_um`` µm per pixel.
    """
    glass = estimate_glass_rgb(thumbnail)
    raw = tissue_pixels(thumbnail, glass_rgb=glass, params=params)
    pen = pen_pixels(thumbnail, params)
    px_area_um2 = thumb_mpp_um**2
    radius = max(1, int(round(params.closing_um / thumb_mpp_um / 2)))
    structure = _disk(radius)
    mask = ndimage.binary_closing(raw, structure=structure, border_value=0)
    mask &= ~pen  # closing must not bridge tissue across a pen stroke
    mask = _fill_small_holes(mask, max_area_px=params.max_hole_area_um2 / px_area_um2)
    mask = _remove_small_objects(mask, min_area_px=params.min_tissue_area_um2 / px_area_um2)
    pen_clean = _remove_small_objects(pen, min_area_px=params.min_tissue_area_um2 / px_area_um2 / 4)
    return TissueMask(mask=mask, pen=pen_clean, glass_rgb=glass, mpp_um=thumb_mpp_um)


def _disk(radius: int) -> NDArray[np.bool_]:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (xx * xx + yy * yy) <= radius * radius


def _remove_small_objects(mask: NDArray[np.bool_], *, min_area_px: float) -> NDArray[np.bool_]:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_area_px
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: NDArray[np.bool_], *, max_area_px: float) -> NDArray[np.bool_]:
    holes = ~mask
    labels, n = ndimage.label(holes)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    # holes touching the border are background, never filled
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = sizes < max_area_px
    fill[0] = False
    fill[border] = False
    return mask | fill[labels]
