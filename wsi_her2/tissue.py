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

import functools
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from numpy.typing import NDArray


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


def classify_pixels(
    rgb: NDArray[np.uint8],
    *,
    glass_rgb: NDArray[np.floating] | None = None,
    params: TissueParams = TissueParams(),
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """``(tissue, pen)`` masks of an RGB image ``(h, w, 3)`` (or a stack ``(n, h, w, 3)``).

    Tissue: darker than ``max_gray`` (OpenCV's 8-bit grey, as in the papers) or summed optical
    density against the glass above ``min_od_sum``; never pen ink. Pen: green/cyan ink
    (G - R above ``pen_green_minus_red``), blue ink (B - R above ``pen_blue_minus_red`` with
    B > 150 and G - R > 15), black ink (dark and achromatic).

    Every step is an OpenCV primitive on 8-bit data (this runs on every tile): saturating
    subtraction gives ``max(G - R, 0)``, which is all the positive thresholds need; optical
    density is a per-channel lookup quantised so that the threshold sits at level 240.
    """
    if glass_rgb is None:
        glass_rgb = np.array([255.0, 255.0, 255.0], dtype=np.float32)
    shape = rgb.shape[:-1]
    img = np.ascontiguousarray(rgb).reshape(-1, rgb.shape[-2], 3)  # a stack of tiles as one tall image
    r, g, b = cv2.split(img)
    gr = cv2.subtract(g, r)
    pen = (gr > params.pen_green_minus_red) | (
        (cv2.subtract(b, r) > params.pen_blue_minus_red) & (b > 150) & (gr > 15)
    )
    mx = cv2.max(cv2.max(r, g), b)
    mn = cv2.min(cv2.min(r, g), b)
    pen |= (mx < params.black_ink_max_value) & (cv2.subtract(mx, mn) < params.black_ink_max_chroma)
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    tissue = (gray < params.max_gray) | _od_above(img, glass_rgb, params.min_od_sum)
    tissue &= ~pen
    return tissue.reshape(shape), pen.reshape(shape)


_OD_LEVEL = 240  # the OD threshold maps to this 8-bit level; the channel sum saturates at 255


def _od_above(img: NDArray[np.uint8], glass_rgb: NDArray[np.floating], min_od_sum: float) -> NDArray[np.bool_]:
    """Summed optical density against glass, ``sum_c log10((glass_c + 1) / (v_c + 1))``, above ``min_od_sum``.

    uint8 in, so OD is a 256-entry lookup per channel (no per-pixel log); pixels brighter than
    glass count as zero absorbance. Quantised to ``min_od_sum / 240`` OD per level (5e-4 OD at
    the default 0.12) and clipped at 241 per channel: one channel at the threshold decides alone.
    """
    if min_od_sum <= 0:  # any absorbance at all: some channel darker than its glass
        return np.any(img < np.asarray(glass_rgb, np.float32).reshape(1, 1, 3), axis=-1)
    od = cv2.LUT(img, _od_lut(tuple(float(g) for g in glass_rgb), float(min_od_sum)))
    od_sum = cv2.transform(od, np.ones((1, 3), np.float32))  # saturating 8-bit sum of the channels
    return od_sum.reshape(img.shape[:2]) > _OD_LEVEL


@functools.lru_cache(maxsize=16)
def _od_lut(glass_rgb: tuple[float, ...], min_od_sum: float) -> NDArray[np.uint8]:
    levels = np.arange(256, dtype=np.float64)
    lut = np.stack([np.log10(g + 1.0) - np.log10(levels + 1.0) for g in glass_rgb], axis=-1) * (_OD_LEVEL / min_od_sum)
    lut = np.clip(np.round(lut), 0, _OD_LEVEL + 1).astype(np.uint8).reshape(256, 1, 3)
    lut.flags.writeable = False  # shared between calls (and threads)
    return lut


def pen_pixels(rgb: NDArray[np.uint8], params: TissueParams = TissueParams()) -> NDArray[np.bool_]:
    """Marker-ink pixels (green/blue/cyan by stain physics, black by darkness)."""
    return classify_pixels(rgb, params=params)[1]


def tissue_pixels(
    rgb: NDArray[np.uint8], *, glass_rgb: NDArray[np.floating] | None = None, params: TissueParams = TissueParams()
) -> NDArray[np.bool_]:
    """Pixels that are stained tissue (not glass, not pen ink)."""
    return classify_pixels(rgb, glass_rgb=glass_rgb, params=params)[0]


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
    raw, pen = classify_pixels(thumbnail, glass_rgb=glass, params=params)
    px_area_um2 = thumb_mpp_um**2
    radius = max(1, int(round(params.closing_um / thumb_mpp_um / 2)))
    mask = _closing(raw, _disk(radius))
    mask &= ~pen  # closing must not bridge tissue across a pen stroke
    mask = _fill_small_holes(mask, max_area_px=params.max_hole_area_um2 / px_area_um2)
    mask = _remove_small_objects(mask, min_area_px=params.min_tissue_area_um2 / px_area_um2)
    pen_clean = _remove_small_objects(pen, min_area_px=params.min_tissue_area_um2 / px_area_um2 / 4)
    return TissueMask(mask=mask, pen=pen_clean, glass_rgb=glass, mpp_um=thumb_mpp_um)


def _disk(radius: int) -> NDArray[np.bool_]:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (xx * xx + yy * yy) <= radius * radius


def _closing(mask: NDArray[np.bool_], disk: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Binary closing with outside-the-image counted as background (so tissue cut by the slide's
    edge is not grown into it)."""
    kernel = disk.astype(np.uint8)
    border = dict(borderType=cv2.BORDER_CONSTANT, borderValue=0)
    grown = cv2.dilate(mask.astype(np.uint8), kernel, **border)
    return cv2.erode(grown, kernel, **border).astype(bool)


def label_components(mask: NDArray[np.bool_]) -> tuple[NDArray[np.int32], int]:
    """4-connected components: ``(labels, n)`` with labels 1..n and 0 for background."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    return labels, n - 1


def _remove_small_objects(mask: NDArray[np.bool_], *, min_area_px: float) -> NDArray[np.bool_]:
    labels, n = label_components(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_area_px
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: NDArray[np.bool_], *, max_area_px: float) -> NDArray[np.bool_]:
    labels, n = label_components(~mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    # holes touching the border are background, never filled
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = sizes < max_area_px
    fill[0] = False
    fill[border] = False
    return mask | fill[labels]
