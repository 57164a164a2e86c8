"""What both kernels of :class:`wsi_her2.models.ihc_score.IhcDabScorer` share: the evidence they hand
to the shared steps, and the blur taps and window sizes they build it with.

Its own module so that the torch kernel (``ihc_score``) and the OpenCV kernel (``ihc_score_cpu``)
import it, not each other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from wsi_her2.stain.od import RGB_FROM_HED, RGB_FROM_HND

__all__ = ["COUNTERSTAIN_FROM_RGB", "CellEvidence", "gaussian_taps", "odd_px"]


def _counterstain_vector() -> torch.Tensor:
    """``(3,)`` float64: the counterstain OD is ``od_rgb @`` this (see ``IhcThresholds``: counterstain OD).

    The direction halfway between hematoxylin and neutral (grey), made orthogonal to the Ruifrok
    DAB vector and scaled so that hematoxylin reads its own OD: DAB reads 0, grey ~0.6 of its OD.
    """
    hema, neutral = RGB_FROM_HND[0], RGB_FROM_HND[1]
    dab = RGB_FROM_HED[2] / RGB_FROM_HED[2].norm()
    mid = (hema + neutral) / (hema + neutral).norm()
    u = mid - (mid @ dab) * dab
    u = u / u.norm()
    return u / (hema @ u)


#: RGB optical density -> counterstain OD, the nuclear channel (a linear functional, no DAB).
COUNTERSTAIN_FROM_RGB = _counterstain_vector()


@dataclass
class CellEvidence:
    """What steps 1-3 hand to the shared steps 4-6, for a batch of ``B`` tiles of ``H x W`` px.

    ``stats``: per-tile ``(B,)`` tissue statistics (``tissue_fraction``, ``hematoxylin_od_mean``,
    ``neutral_od_mean``, ``dab_od_mean``, ``stained_fraction``); per nucleus: ``seed_tile``
    ``(N,)`` (its tile), ``seed_yx`` ``(N, 2)`` (its centre, tile pixels), ``ray_contrast``
    ``(N, n_directions)`` (the largest outward rise of the brown DAB's light loss, blurred to
    ``membrane_blur_um``, along each ray, over what the ray crossed before it:
    :func:`ray_contrast`, :mod:`wsi_her2.stain.membrane`), ``tumour_weight`` ``(N,)`` (the
    tumour model's: epithelium detector or cohesion rule); what that weight was computed from
    (``counts``, ``samples``, per tile ``level``);
    ``tumour_area_fraction`` ``(B,)``: fraction of the tile within the cell-radius box of a
    nucleus of weight > 0.5.
    """

    stats: dict[str, torch.Tensor]
    seed_tile: torch.Tensor
    seed_yx: torch.Tensor
    ray_contrast: torch.Tensor
    tumour_weight: torch.Tensor
    tumour_area_fraction: torch.Tensor
    #: ``(N, len(count_windows_px()))`` edge-corrected counts of other nuclei per window.
    counts: torch.Tensor | None = None
    #: ``(N, S)`` counterstain samples of the epithelium stencil (None under the cohesion model).
    samples: torch.Tensor | None = None
    #: ``(B,)`` each tile's counterstain level (``IhcThresholds.counterstain_quantile``).
    level: torch.Tensor | None = None


def gaussian_taps(sigma_px: float, h: int, w: int) -> torch.Tensor | None:
    """The normalised 1-D Gaussian taps both kernels blur with (``None``: too narrow to blur)."""
    if sigma_px < 0.3:
        return None
    radius = min(int(math.ceil(3.0 * sigma_px)), h - 1, w - 1)
    if radius < 1:
        return None
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma_px) ** 2)
    return k / k.sum()


def odd_px(size_px: float) -> int:
    """The odd window size (at least 3 px) nearest ``size_px``."""
    return max(3, 2 * int(round(size_px / 2.0)) + 1)
