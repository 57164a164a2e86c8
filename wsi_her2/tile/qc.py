"""Per-tile quality control, vectorised over a batch of tiles.

Stored, not only thresholded: every tile keeps its tissue fraction, focus measures and pen
fraction, so a user can re-threshold later without re-reading the slide.

Tissue fraction: the share of the tile covered by the slide's tissue mask
(:mod:`wsi_her2.tile.tissue`), so the tile gate and the mask can never disagree. A usable tile
holds at least 40 % tissue (the hybrid paper's default).

Focus: the papers' blur measure, the variance of the Laplacian (threshold 75), grows with the
square of the stain's contrast and changes with µm/px: a pale HER2 0 tile in perfect focus
scores below a blurred 3+ tile, so a Laplacian gate throws away negative tissue first and biases
calls upwards (real in-focus IHC at 1 µm/px measured 40-90). The default measure is
**contrast-normalised and in physical units** (:func:`focus_sharpness`): the tile is brought to
``focus_mpp_um`` (1 µm/px), and the standard deviation of its finest detail (grey minus a 1 µm
Gaussian) is divided by that of its mid-scale structure (1 µm minus 4 µm Gaussians). Stain
intensity scales both alike and cancels; defocus removes the fine band first (a Gaussian blur of
sigma s keeps exp(-2 pi^2 s^2 f^2) of frequency f: at s = 1.5 µm, 0.7 % of a 3 µm period and
29 % of a 6 µm one). This is the band-ratio family of focus measures (e.g. the DCT energy ratio
of Shen & Chen 2006), which are contrast invariant by construction; the pixel noise floor of
8-bit JPEG (0.5 grey levels) is taken off the fine band so that noise is not read as detail. On
real IHC tiles at 1.0, 0.5 and 0.25 µm/px (the 20 BCI patches, plus real H&E at 0.5) the
in-focus originals measured 1st percentile 0.26-0.32 (median 0.38-0.44) and copies blurred by
sigma 1.5 µm 99th percentile 0.21-0.27 (median 0.16-0.18): ``min_sharpness = 0.25`` splits them.
The 0.25 µm/px originals there were upsampled from 1 µm/px, i.e. softer than a real 40x scan.
Tiles with almost no structure (mid-scale contrast under ``min_focus_contrast`` grey levels)
cannot be judged and are not flagged. ``--blur-metric laplacian`` restores the papers' rule (threshold 75) to reproduce them;
both measures are stored for every tile.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from wsi_her2.errors import ConfigError
from wsi_her2.tile.tissue import TissueParams, label_components, pen_mask

# Bit flags in the store's ``qc_flags`` array. 0 means the tile passed.
QC_FLAGS = {"low_tissue": 1, "blurry": 2, "pen": 4}


#: Focus measures a tile can be gated on (``--blur-metric``).
BLUR_METRICS = ("sharpness", "laplacian")


@dataclass(frozen=True)
class QcParams:
    min_tissue_fraction: float = 0.40
    blur_metric: str = "sharpness"  # one of BLUR_METRICS
    min_sharpness: float = 0.25  # contrast-normalised band ratio at focus_mpp_um (see module docstring)
    focus_mpp_um: float = 1.0  # resolution the sharpness is measured at
    min_focus_contrast: float = 1.0  # grey levels of mid-scale structure below which focus is not judged
    focus_noise_gray: float = 0.5  # pixel noise floor removed from the fine band (grey levels)
    min_laplacian_var: float = 75.0  # the papers' rule, with --blur-metric laplacian
    max_pen_fraction: float = 0.05
    min_blur_region_tiles: int = 4  # this many edge-connected blurry tiles make an out-of-focus region
    # Pen fractions are measured on every ``fraction_step_px``-th pixel in each direction:
    # 3,136 samples for a 224 px tile, a sampling error (< 1 %) far below what the 5 %
    # threshold can tell apart, at a sixteenth of the cost.
    fraction_step_px: int = 4

    def __post_init__(self) -> None:
        if self.blur_metric not in BLUR_METRICS:
            raise ConfigError(f"--blur-metric {self.blur_metric!r}: choose one of {', '.join(BLUR_METRICS)}")

    def to_dict(self) -> dict:
        return asdict(self)


def laplacian_variance(tiles: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Variance of the Laplacian of each tile's grey image: the papers' blur measure, exactly.

    ``tiles``: ``(n, h, w, 3)`` RGB uint8. Per tile this is ``cv2.Laplacian(gray, CV_64F).var()``
    with ``gray = cv2.cvtColor(tile, COLOR_RGB2GRAY)`` (3x3 kernel [[0,1,0],[1,-4,1],[0,1,0]],
    borders reflected), which is how the threshold of 75 was defined. The Laplacian of 8-bit
    grey fits int16 and its sums are exact in float64, so the faster int16 path gives the same
    numbers.
    """
    n, h, w = tiles.shape[:3]
    gray = cv2.cvtColor(np.ascontiguousarray(tiles).reshape(n * h, w, 3), cv2.COLOR_RGB2GRAY)
    out = np.empty(n, np.float32)
    npx = float(h * w)
    for i in range(n):  # per tile: borders must reflect within the tile, not see the next one
        lap = cv2.Laplacian(gray[i * h : (i + 1) * h], cv2.CV_16S, ksize=1)
        mean = cv2.sumElems(lap)[0] / npx
        out[i] = cv2.norm(lap, cv2.NORM_L2SQR) / npx - mean * mean
    return out


_FOCUS_MARGIN_UM = 6.0  # border left out of the band statistics (Gaussian edge effects)


def focus_sharpness(
    tiles: NDArray[np.uint8], *, mpp_um: float, focus_mpp_um: float = 1.0, noise_gray: float = 0.5
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Contrast-normalised sharpness and mid-scale contrast of each tile (see the module docstring).

    ``tiles``: ``(n, h, w, 3)`` RGB uint8 at ``mpp_um``. Returns ``(sharpness, contrast)``: the
    ratio ``std(g - G_1um * g) / std(G_1um * g - G_4um * g)`` at ``focus_mpp_um``, and the
    denominator in grey levels. Tiles coarser than ``focus_mpp_um`` are measured as they are.
    ``noise_gray``: the pixel noise floor of 8-bit JPEG scans (quantisation alone is 0.29 grey
    levels; compression at quality >= 80 about doubles it), removed from the fine band's
    variance so that noise on a blurred, faint tile is not read as detail.
    """
    n, h, w = tiles.shape[:3]
    f = min(1.0, mpp_um / focus_mpp_um)  # output px per input px
    wh = (max(8, int(round(w * f))), max(8, int(round(h * f))))
    px_um = mpp_um / f
    s1, s4 = 1.0 / px_um, 4.0 / px_um
    m = min(int(round(_FOCUS_MARGIN_UM / px_um)), min(wh) // 4)
    sharp = np.empty(n, np.float32)
    contrast = np.empty(n, np.float32)
    for i in range(n):  # per tile: blurs must not see the neighbouring tile
        g = cv2.cvtColor(tiles[i], cv2.COLOR_RGB2GRAY)
        if f < 1.0:
            g = cv2.resize(g, wh, interpolation=cv2.INTER_AREA)
        g = g.astype(np.float32)
        b1 = cv2.GaussianBlur(g, (0, 0), s1)
        b4 = cv2.GaussianBlur(b1, (0, 0), float(np.sqrt(s4 * s4 - s1 * s1)))  # G_4 = G_sqrt(15) * G_1
        fine = (g - b1)[m : g.shape[0] - m, m : g.shape[1] - m]
        mid = (b1 - b4)[m : g.shape[0] - m, m : g.shape[1] - m]
        c = float(cv2.meanStdDev(mid)[1][0, 0])  # OpenCV reads the cropped views in place (numpy copies)
        contrast[i] = c
        fine_sd = float(cv2.meanStdDev(fine)[1][0, 0])
        fine_var = max(fine_sd * fine_sd - noise_gray * noise_gray, 0.0)  # pixel noise is not detail
        sharp[i] = float(np.sqrt(fine_var)) / max(c, 1e-3)
    return sharp, contrast


@dataclass
class TileQc:
    tissue_fraction: NDArray[np.float32]
    laplacian_var: NDArray[np.float32]
    sharpness: NDArray[np.float32]
    pen_fraction: NDArray[np.float32]
    flags: NDArray[np.uint8]

    @property
    def passed(self) -> NDArray[np.bool_]:
        return self.flags == 0

    def arrays(self) -> dict[str, NDArray]:
        """The store's QC arrays (``wsi_her2.store.patch_store.QC_ARRAYS``) by name."""
        return {"tissue_fraction": self.tissue_fraction, "laplacian_var": self.laplacian_var,
                "sharpness": self.sharpness, "pen_fraction": self.pen_fraction, "qc_flags": self.flags}


def _subsample(tiles: NDArray[np.uint8], step: int) -> NDArray[np.uint8]:
    """``tiles[:, ::step, ::step]`` as a contiguous array (OpenCV's nearest-neighbour resize of
    the stack as one tall image picks exactly those pixels, several times faster than a strided copy)."""
    step = max(1, int(step))
    n, h, w = tiles.shape[:3]
    if step == 1:
        return tiles
    if h % step or w % step or not tiles.flags.c_contiguous:
        return np.ascontiguousarray(tiles[:, ::step, ::step])
    small = cv2.resize(tiles.reshape(n * h, w, 3), (w // step, n * h // step), interpolation=cv2.INTER_NEAREST)
    return small.reshape(n, h // step, w // step, 3)


def tile_qc(
    tiles: NDArray[np.uint8],
    *,
    tissue_fraction: NDArray[np.floating],
    mpp_um: float,
    tissue_params: TissueParams = TissueParams(),
    qc_params: QcParams = QcParams(),
) -> TileQc:
    """Measure and flag a batch of tiles ``(n, h, w, 3)`` at ``mpp_um``.

    ``tissue_fraction``: each tile's coverage by the slide's tissue mask (``(n,)``).
    """
    n = tiles.shape[0]
    pen_px = pen_mask(_subsample(tiles, qc_params.fraction_step_px), tissue_params)
    pen = np.count_nonzero(pen_px.reshape(n, -1), axis=1) / float(pen_px[0].size)
    tissue = np.asarray(tissue_fraction, np.float32)
    lapvar = laplacian_variance(tiles)
    sharp, contrast = focus_sharpness(tiles, mpp_um=mpp_um, focus_mpp_um=qc_params.focus_mpp_um,
                                      noise_gray=qc_params.focus_noise_gray)
    if qc_params.blur_metric == "laplacian":
        blurry = lapvar < qc_params.min_laplacian_var
    else:
        blurry = (sharp < qc_params.min_sharpness) & (contrast >= qc_params.min_focus_contrast)
    flags = np.zeros(n, dtype=np.uint8)
    flags[tissue < qc_params.min_tissue_fraction] |= QC_FLAGS["low_tissue"]
    flags[blurry] |= QC_FLAGS["blurry"]
    flags[pen > qc_params.max_pen_fraction] |= QC_FLAGS["pen"]
    return TileQc(tissue, lapvar, sharp, pen.astype(np.float32), flags)


def reject_reason(flags: int) -> str | None:
    """Human-readable reason(s) for a tile's flags, e.g. ``"blurry+pen"``; None when it passed."""
    names = [name for name, bit in QC_FLAGS.items() if flags & bit]
    return "+".join(names) if names else None


def slide_qc_summary(
    *,
    grid_rc: NDArray[np.integer],
    flags: NDArray[np.uint8],
    pen_area_mm2: float,
    qc_params: QcParams = QcParams(),
) -> dict:
    """Slide-level flags: pen marks present, out-of-focus regions (clusters of blurry tissue tiles)."""
    n = int(flags.size)
    tissue_ok = (flags & QC_FLAGS["low_tissue"]) == 0
    blurry = tissue_ok & ((flags & QC_FLAGS["blurry"]) != 0)
    regions: list[int] = []
    if blurry.any():
        rows, cols = grid_rc[:, 0], grid_rc[:, 1]
        r0, c0 = rows.min(), cols.min()
        grid = np.zeros((rows.max() - r0 + 1, cols.max() - c0 + 1), dtype=bool)
        grid[rows[blurry] - r0, cols[blurry] - c0] = True
        labels, k = label_components(grid)
        sizes = np.bincount(labels.ravel())[1:]
        regions = sorted((int(s) for s in sizes if s >= qc_params.min_blur_region_tiles), reverse=True)
    n_tissue = int(tissue_ok.sum())
    return {
        "n_tiles": n,
        "n_passed": int((flags == 0).sum()),
        "n_tissue_tiles": n_tissue,
        "n_blurry_tissue_tiles": int(blurry.sum()),
        "blurry_tissue_fraction": float(blurry.sum() / n_tissue) if n_tissue else 0.0,
        "out_of_focus_regions": len(regions),
        "out_of_focus_region_tiles": regions,
        "n_pen_tiles": int(((flags & QC_FLAGS["pen"]) != 0).sum()),
        "pen_marks": bool(pen_area_mm2 > 0.01),
        "pen_area_mm2": round(float(pen_area_mm2), 4),
    }
