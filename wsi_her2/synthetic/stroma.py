"""Hematoxylin-only stroma and smooth muscle, and tumour nests set in them, for tests.

HER2 IHC cores are often mostly non-tumour: smooth muscle, fibrous stroma, fat. Their nuclei
take the counterstain like tumour nuclei do, so a scorer that counts every nucleus dilutes the
ASCO/CAP percentage (which is over invasive tumour cells) and under-calls. These fields are
built to textbook histology, not to any scorer:

- **smooth muscle**: fascicles of cells ~6 µm wide and 100-200 µm long; one cigar-shaped
  nucleus (~3 x 16 µm) per cell, so in a 4 µm section about one nucleus per 30 µm along the
  fascicle and per 12 µm across it (~360 µm² per nucleus); grey-blue cytoplasm (hematoxylin OD
  ~0.05 plus neutral OD ~0.03 from the dense myofilaments);
- **fibrous stroma**: sparse fibroblasts, spindle nuclei ~2.5 x 12 µm, about one per
  40 x 25 µm (~1000 µm²), on pale wavy collagen (hematoxylin OD ~0.02-0.04).

Nuclei are aligned with the fascicle or fibre direction (``angle_deg``), jittered in position
(a quarter of the pitch) and angle (+-12°), with hematoxylin OD ~0.3-0.45.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from wsi_her2.synthetic.textures import GLASS_RGB, ihc_texture, od_to_rgb, wrap_window


@dataclass(frozen=True)
class SpindleTissue:
    """One kind of non-tumour tissue: nucleus lattice, nucleus size and background OD."""

    pitch_along_um: float
    pitch_across_um: float
    nucleus_length_um: float
    nucleus_width_um: float
    background_hema_od: float
    background_neutral_od: float


SMOOTH_MUSCLE = SpindleTissue(30.0, 12.0, 16.0, 3.0, 0.05, 0.03)
FIBROUS_STROMA = SpindleTissue(40.0, 25.0, 12.0, 2.5, 0.03, 0.01)
KINDS = {"muscle": SMOOTH_MUSCLE, "stroma": FIBROUS_STROMA}


def spindle_tissue_od(kind: str, size_px: int, *, mpp_um: float, angle_deg: float = 30.0,
                      seed: int = 0) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """``(hematoxylin OD, neutral OD)``, each ``(size_px, size_px)`` float32, of ``kind`` tissue."""
    spec = KINDS[kind]
    rng = np.random.default_rng([seed, 700])
    hema = np.full((size_px, size_px), spec.background_hema_od, np.float32)
    fibres = cv2.GaussianBlur(rng.normal(0, 1, (size_px, size_px)).astype(np.float32), (0, 0), 2.0 / mpp_um)
    hema *= 1.0 + 0.3 * fibres / (fibres.std() + 1e-9)
    a = np.deg2rad(angle_deg)
    along, across = np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])
    reach_px = size_px * 1.5
    pa, pc = spec.pitch_along_um / mpp_um, spec.pitch_across_um / mpp_um
    for i in np.arange(-reach_px / pa, reach_px / pa):
        for j in np.arange(-reach_px / pc, reach_px / pc):
            centre = size_px / 2 + i * pa * along + j * pc * across
            centre = centre + rng.uniform(-0.25, 0.25, 2) * (pa, pc)
            if not (0 <= centre[0] < size_px and 0 <= centre[1] < size_px):
                continue
            axes = (max(1, int(round(spec.nucleus_length_um / mpp_um / 2))),
                    max(1, int(round(spec.nucleus_width_um / mpp_um / 2))))
            cv2.ellipse(hema, (int(centre[0]), int(centre[1])), axes, angle_deg + rng.uniform(-12, 12), 0, 360,
                        float(rng.uniform(0.30, 0.45)), -1)
    hema = cv2.GaussianBlur(hema, (0, 0), 0.4 / mpp_um)
    neutral = np.full_like(hema, spec.background_neutral_od)
    return hema, neutral


def nest_in_tissue(kind: str, grade: int, size_px: int, *, mpp_um: float, nest_area_fraction: float,
                   seed: int = 0) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
    """``kind`` tissue filling a ``size_px`` square with round HER2 ``grade`` tumour nests
    (the synthetic IHC texture) covering about ``nest_area_fraction`` of it: ``(rgb, nest_mask)``.
    Glass is the synthetic slides' (:data:`GLASS_RGB`), so the result composites onto tinted glass
    with ``relight_from_rgb=GLASS_RGB``."""
    rng = np.random.default_rng([seed, 701])
    hema, neutral = spindle_tissue_od(kind, size_px, mpp_um=mpp_um, seed=seed)
    rgb = od_to_rgb(hema, 0.0, 0.0) * np.power(10.0, -neutral)[..., None]
    nests = np.zeros((size_px, size_px), np.uint8)
    radius_px = int(round(60.0 / mpp_um))  # nests ~120 µm across: 50-70 carcinoma cells each
    target = nest_area_fraction * size_px * size_px
    while nests.sum() < target:
        x, y = rng.integers(radius_px, size_px - radius_px, 2)
        cv2.circle(nests, (int(x), int(y)), radius_px, 1, -1)
    tumour = wrap_window(ihc_texture(grade, mpp_um, seed), 0, 0, size_px, size_px).astype(np.float32)
    mask = nests.astype(bool)
    rgb[mask] = tumour[mask]
    noise = rng.normal(0.0, 1.0, rgb.shape).astype(np.float32)
    return np.clip(np.rint(rgb + noise * ~mask[..., None]), 0, 255).astype(np.uint8), mask


__all__ = ["SMOOTH_MUSCLE", "FIBROUS_STROMA", "KINDS", "SpindleTissue", "spindle_tissue_od", "nest_in_tissue",
           "GLASS_RGB"]
