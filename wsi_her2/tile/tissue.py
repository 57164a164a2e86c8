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

import cv2
import numpy as np
from numpy.typing import NDArray


#: Resolution of the thumbnail tissue is found on, µm/px: coarse enough to be cheap, fine
#: enough that nuclei (5-10 µm) and fibres still make texture. A pyramid level between the two
#: is read as it is (no finer level decoded); the detector's sizes are in µm, and pale cores and
#: real patches on tinted glass were found alike at 4, 6 and 8 µm/px (>= 97 % of tissue, <= 1 % of glass).
THUMB_MPP_UM = 4.0
THUMB_MAX_MPP_UM = 8.0


@dataclass(frozen=True)
class TissueParams:
    """Every tissue/pen threshold in one place (all configurable from the CLI).

    Tissue is found on the thumbnail (``thumb_mpp_um``, a few µm/px, where nuclei still make
    texture) by two pieces of evidence, each thresholded against the slide's own glass so that
    the rule holds on white, grey, lavender or yellowish glass alike:

    - absorbance: summed RGB optical density against the glass colour, averaged over
      ``smooth_um`` (averaging beats down JPEG noise by the square root of the pixels averaged),
      above ``min_od_sum`` or ``noise_k`` robust standard deviations of the same measure on
      glass, whichever is larger;
    - texture: local standard deviation of grey over ``texture_window_um`` (nuclei, fibres and
      membranes give it; glass gives only noise), above ``min_texture`` grey levels or
      ``noise_k`` robust standard deviations of glass texture.

    Pale hematoxylin-only tissue on tinted glass sits only a few grey levels below the glass
    (median OD sum ~0.03) but its nuclei give it texture; dense pale stroma is smooth but
    absorbs. Either suffices.
    """

    min_od_sum: float = 0.02  # floor of the absorbance threshold (summed decimal OD vs glass)
    min_texture: float = 1.5  # floor of the texture threshold (grey levels of local std)
    noise_k: float = 6.0  # thresholds sit this many robust SDs above glass (a CFAR-style rule)
    max_glass_texture: float = 1.0  # glass is flat (grey-level local SD at 4 µm/px: ~0-0.5 on real glass)
    smooth_um: float = 4.0  # absorbance averaged over a Gaussian of this sigma
    texture_window_um: float = 12.0  # side of the window of the local standard deviation
    max_gray: float | None = None  # the papers' absolute rule (darker than this is tissue); off: wrong on grey glass
    pen_green_minus_red: float = 40.0  # G - R above this (8-bit levels) is not a stain: green/cyan ink
    pen_blue_minus_red: float = 80.0  # with B > 150 and G - R > 15: blue ink
    black_ink_max_value: float = 50.0  # dark and achromatic: black ink
    black_ink_max_chroma: float = 25.0
    min_tissue_area_um2: float = 20_000.0  # drop specks (dust) smaller than this in the thumbnail mask
    max_hole_area_um2: float = 20_000.0  # fill holes (lumina, nuclei gaps) smaller than this
    closing_um: float = 24.0  # bridge gaps between nearby tissue fragments

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GlassEstimate:
    """The slide's glass: colour and the noise floor of the tissue evidence measured on it."""

    rgb: NDArray[np.float32]  # (3,) median colour of glass pixels
    od_threshold: float  # smoothed summed OD above this is tissue
    texture_threshold: float  # local grey std above this is tissue
    n_pixels: int  # glass pixels the estimate rests on


def pen_mask(rgb: NDArray[np.uint8], params: TissueParams = TissueParams()) -> NDArray[np.bool_]:
    """Marker-ink pixels of ``(..., h, w, 3)`` RGB: green/cyan and blue inks by the sign and
    size of ``G - R`` and ``B - R`` (no stain reaches them), black ink by darkness without colour.

    Every step is an OpenCV primitive on 8-bit data (this runs on every tile): saturating
    subtraction gives ``max(G - R, 0)``, which is all the positive thresholds need.
    """
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
    return pen.reshape(shape)


def _gray_f32(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY).astype(np.float32)


def od_sum_map(rgb: NDArray[np.uint8], glass_rgb: NDArray[np.floating]) -> NDArray[np.float32]:
    """Summed decimal optical density against the glass, ``sum_c log10(glass_c / I_c)``, >= 0.

    A 256-entry lookup per channel (no per-pixel log); pixels brighter than glass absorb nothing.
    """
    levels = np.maximum(np.arange(256, dtype=np.float64), 0.5)
    lut = np.stack([np.log10(max(float(g), 1.0) / levels) for g in glass_rgb], axis=-1).clip(min=0.0)
    od = cv2.LUT(np.ascontiguousarray(rgb), lut.astype(np.float32).reshape(256, 1, 3))
    return od.sum(axis=-1, dtype=np.float32)


def local_std(gray: NDArray[np.float32], window_px: int) -> NDArray[np.float32]:
    """Standard deviation of ``gray`` in a ``window_px`` square around each pixel (box filters)."""
    k = (max(3, window_px), max(3, window_px))
    mean = cv2.blur(gray, k, borderType=cv2.BORDER_REFLECT)
    mean_sq = cv2.blur(gray * gray, k, borderType=cv2.BORDER_REFLECT)
    return np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))


@dataclass
class _Evidence:
    """Per-pixel tissue evidence of a thumbnail, computed once."""

    gray: NDArray[np.float32]
    texture: NDArray[np.float32]  # local grey SD over texture_window_um
    od_s: NDArray[np.float32] | None = None  # smoothed summed OD against the glass, once it is known


def _texture(rgb: NDArray[np.uint8], *, mpp_um: float, params: TissueParams) -> _Evidence:
    gray = _gray_f32(rgb)
    return _Evidence(gray, local_std(gray, int(round(params.texture_window_um / mpp_um))))


def _smoothed_od(rgb: NDArray[np.uint8], glass_rgb, *, mpp_um: float, params: TissueParams) -> NDArray[np.float32]:
    od = od_sum_map(rgb, glass_rgb)
    sigma_px = params.smooth_um / mpp_um
    return cv2.GaussianBlur(od, (0, 0), sigma_px) if sigma_px >= 0.5 else od


def _robust_upper(values: NDArray[np.float32], k: float) -> float:
    med = float(np.median(values))
    mad = float(np.median(np.abs(values - med))) * 1.4826
    return med + k * mad


def estimate_glass(rgb: NDArray[np.uint8], *, mpp_um: float, params: TissueParams = TissueParams(),
                   evidence: _Evidence | None = None) -> GlassEstimate:
    """Glass colour and noise floor of a thumbnail ``(h, w, 3)`` at ``mpp_um``.

    Glass candidates are the brightest fifth of the pixels that are also the smoothest half of
    those: glass is the brightest and flattest thing on a slide, whatever its tint. Its colour
    is their per-channel median (a mode-like estimate: the old 99.5th percentile sat above the
    glass by the JPEG noise, which hid pale tissue a few levels below it). On a slide fully
    covered by tissue the candidates are the palest tissue, which only makes detection stricter.
    The thresholds are ``noise_k`` robust SDs above glass of each piece of evidence, floored.
    When even the flattest bright pixels have texture (``max_glass_texture``), there is no glass
    in view: the glass is taken as the bright end of the histogram and the thresholds at their floors.
    ``evidence`` (from this module) is filled with the smoothed OD, so it is computed only once.
    """
    ev = evidence if evidence is not None else _texture(rgb, mpp_um=mpp_um, params=params)
    flat_rgb = rgb.reshape(-1, 3)
    step = max(1, flat_rgb.shape[0] // 1_000_000)  # a strided sample is enough for quantiles
    g = ev.gray.reshape(-1)[::step]
    tex = ev.texture.reshape(-1)[::step]
    bright = g >= np.percentile(g, 80)
    cand = bright & (tex <= np.median(tex[bright]))
    if cand.sum() < 16 or np.median(tex[cand]) > params.max_glass_texture:
        # Nothing flat and bright: the slide is covered by tissue. Fall back to the bright end
        # of the histogram, floored at 200 so a dark slide cannot declare its tissue glass.
        glass_rgb = np.clip(np.percentile(flat_rgb[::step], 99.5, axis=0), 200.0, 255.0).astype(np.float32)
        ev.od_s = _smoothed_od(rgb, glass_rgb, mpp_um=mpp_um, params=params)
        return GlassEstimate(glass_rgb, params.min_od_sum, params.min_texture, 0)
    glass_rgb = np.median(flat_rgb[::step][cand], axis=0).astype(np.float32)
    ev.od_s = _smoothed_od(rgb, glass_rgb, mpp_um=mpp_um, params=params)
    od_t = max(params.min_od_sum, _robust_upper(ev.od_s.reshape(-1)[::step][cand], params.noise_k))
    tex_t = max(params.min_texture, _robust_upper(tex[cand], params.noise_k))
    return GlassEstimate(glass_rgb, float(od_t), float(tex_t), int(cand.sum()))


def tissue_evidence_mask(
    rgb: NDArray[np.uint8], glass: GlassEstimate, *, mpp_um: float, params: TissueParams = TissueParams(),
    evidence: _Evidence | None = None,
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """``(tissue, pen)`` pixel masks of ``(h, w, 3)`` RGB at ``mpp_um`` (before morphology)."""
    ev = evidence if evidence is not None else _texture(rgb, mpp_um=mpp_um, params=params)
    od_s = ev.od_s if ev.od_s is not None else _smoothed_od(rgb, glass.rgb, mpp_um=mpp_um, params=params)
    tissue = (od_s > glass.od_threshold) | (ev.texture > glass.texture_threshold)
    if params.max_gray is not None:
        tissue |= ev.gray < params.max_gray
    pen = pen_mask(rgb, params)
    return tissue & ~pen, pen


@dataclass
class TissueMask:
    mask: NDArray[np.bool_]  # (h, w) at the thumbnail's resolution
    pen: NDArray[np.bool_]  # (h, w) pen ink
    glass: GlassEstimate  # glass colour and the evidence thresholds used
    mpp_um: float  # thumbnail pixel size

    @property
    def glass_rgb(self) -> NDArray[np.float32]:
        return self.glass.rgb

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
    """Tissue mask of a thumbnail: glass-relative absorbance or texture, then morphology in µm.

    Parameters
    ----------
    thumbnail
        ``(h, w, 3)`` RGB at ``thumb_mpp_um`` µm per pixel (a few µm/px: nuclei must still
        make texture; the tile stage reads it at 4 µm/px).
    """
    evidence = _texture(thumbnail, mpp_um=thumb_mpp_um, params=params)
    glass = estimate_glass(thumbnail, mpp_um=thumb_mpp_um, params=params, evidence=evidence)
    raw, pen = tissue_evidence_mask(thumbnail, glass, mpp_um=thumb_mpp_um, params=params, evidence=evidence)
    px_area_um2 = thumb_mpp_um**2
    radius = max(1, int(round(params.closing_um / thumb_mpp_um / 2)))
    mask = _closing(raw, _disk(radius))
    mask = _fill_small_holes(mask, max_area_px=params.max_hole_area_um2 / px_area_um2)
    # A window straddling the tissue's edge sees the edge's contrast: both measures spill about
    # half a window onto the glass. Trim that rim off the (by now solid) mask.
    spill_px = int(round(max(params.texture_window_um / 2.0, params.smooth_um) / thumb_mpp_um))
    if spill_px >= 1:
        mask = cv2.erode(mask.astype(np.uint8), _disk(spill_px).astype(np.uint8),
                         borderType=cv2.BORDER_REPLICATE).astype(bool)
    mask &= ~pen  # closing must not bridge tissue across a pen stroke
    mask = _remove_small_objects(mask, min_area_px=params.min_tissue_area_um2 / px_area_um2)
    pen_clean = _remove_small_objects(pen, min_area_px=params.min_tissue_area_um2 / px_area_um2 / 4)
    return TissueMask(mask=mask, pen=pen_clean, glass=glass, mpp_um=thumb_mpp_um)


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
