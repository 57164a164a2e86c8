"""Synthetic tissue cores on tinted glass, and real images moved onto tinted glass, for tests.

Built to the colour statistics of real pale HER2 0 / 1+ tissue-microarray cores scanned on
lavender glass: glass about RGB (234, 233, 242); the tissue's median a few grey levels below
it, about (229, 228, 237), and its 10th percentile about (210, 208, 217), the darkness coming
from nuclei and fibres rather than from the tissue as a whole.
"""
from __future__ import annotations

import io

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image

from wsi_her2.synthetic.image_slide import LAVENDER_GLASS_RGB, composite_on_glass, disc_cover



def jpeg_roundtrip(rgb: NDArray[np.uint8], quality: int = 80) -> NDArray[np.uint8]:
    """``rgb`` encoded and decoded as a 4:2:0 JPEG (what most scanners store)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def pale_core(
    *, size_px: int = 1600, mpp_um: float = 1.0, core_diameter_um: float = 1400.0,
    glass_rgb: tuple[int, int, int] = LAVENDER_GLASS_RGB, stain_od: float = 1.0, seed: int = 0,
) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
    """A pale hematoxylin-only core on tinted glass: ``(rgb, tissue_truth)``.

    Tissue optical density = a faint neutral base (section thickness, stroma) + nuclei
    (hematoxylin blobs of 5-9 µm, about an eighth of the area) + thin fibres, all scaled by
    ``stain_od`` (``0`` leaves an unstained core visible only by the edge of the section).
    """
    rng = np.random.default_rng(seed)
    truth = disc_cover(size_px, size_px, cx_px=size_px / 2, cy_px=size_px / 2,
                       radius_px=core_diameter_um / mpp_um / 2.0) >= 0.5
    base = cv2.GaussianBlur(rng.normal(0.0, 1.0, (size_px, size_px)).astype(np.float32), (0, 0), 20 / mpp_um)
    base = 0.006 + 0.003 * base / (base.std() + 1e-9)
    nuclei = np.zeros((size_px, size_px), np.float32)
    n = int(truth.sum() * mpp_um**2 / 450.0)  # one nucleus per ~450 µm² of tissue
    ys, xs = np.nonzero(truth)
    pick = rng.integers(0, ys.size, n)
    for y, x in zip(ys[pick], xs[pick]):
        r = rng.uniform(2.5, 4.5) / mpp_um
        cv2.ellipse(nuclei, (int(x), int(y)), (int(round(r * 1.2)), int(round(r))), float(rng.uniform(0, 180)),
                    0, 360, float(rng.uniform(0.04, 0.09)), -1)
    fibres = np.zeros_like(nuclei)
    for _ in range(n // 6):
        y, x = ys[rng.integers(ys.size)], xs[rng.integers(xs.size)]
        a = rng.uniform(0, np.pi)
        length = rng.uniform(20, 60) / mpp_um
        p2 = (int(x + length * np.cos(a)), int(y + length * np.sin(a)))
        cv2.line(fibres, (int(x), int(y)), p2, float(rng.uniform(0.02, 0.04)), max(1, int(round(1 / mpp_um))))
    od = cv2.GaussianBlur(base + nuclei + fibres, (0, 0), 0.6 / mpp_um) * stain_od
    hema = np.array([0.65, 0.70, 0.29], np.float32)
    hema = hema / hema.sum() * 3.0  # per-channel weights of a bluish counterstain, mean 1
    channel_od = 0.5 * od[..., None] * (1.0 + hema[None, None, :])  # half neutral, half hematoxylin hue
    if stain_od == 0:  # unstained section: only its cut edge refracts (a thin dark rim)
        rim = truth & ~cv2.erode(truth.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        channel_od = np.where(rim[..., None], 0.08, 0.0).astype(np.float32) * np.ones(3, np.float32)
    img = np.asarray(glass_rgb, np.float32)[None, None, :] * np.power(10.0, -channel_od * truth[..., None])
    img = img + rng.normal(0.0, 0.8, img.shape)
    return jpeg_roundtrip(np.clip(np.round(img), 0, 255).astype(np.uint8)), truth


def composite_core(
    rgb: NDArray[np.uint8], *, src_glass_rgb, margin_px: int, dst_glass_rgb=LAVENDER_GLASS_RGB, seed: int = 0,
) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
    """A real image cut to a round core, re-lit onto tinted glass with ``margin_px`` of glass
    around it, then a JPEG round trip: ``(rgb, core_truth)``."""
    h, w = rgb.shape[:2]
    out = composite_on_glass(rgb, glass_rgb=dst_glass_rgb, shape="core", margin_px=margin_px, seed=seed,
                             relight_from_rgb=tuple(float(v) for v in src_glass_rgb))
    truth = np.zeros(out.shape[:2], bool)
    truth[margin_px : margin_px + h, margin_px : margin_px + w] = (
        disc_cover(h, w, cx_px=w / 2, cy_px=h / 2, radius_px=min(h, w) / 2) >= 0.5)
    return jpeg_roundtrip(out), truth


def downsample(rgb: NDArray[np.uint8], factor: int) -> NDArray[np.uint8]:
    """Area average by an integer factor (what a slide pyramid does)."""
    h, w = rgb.shape[:2]
    return cv2.resize(rgb, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
