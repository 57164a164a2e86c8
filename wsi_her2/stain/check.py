"""Is this slide DAB + hematoxylin IHC? A stain check before the rule-based ``ihc_dab`` scorer.

The ``ihc_dab`` scorer measures brown DAB on a blue hematoxylin counterstain; given an H&E
slide it still finds "DAB" (eosin's pink overlaps DAB in the red and green channels) and
returns a confident, meaningless call. The check uses stain physics: each tissue pixel's
optical density (Beer-Lambert, decimal, against the slide's glass) is deconvolved onto the
Ruifrok & Johnston hematoxylin / eosin / DAB vectors (:data:`wsi_her2.stain.od.HED_FROM_RGB`),
and the **eosin share** is the eosin part of all positive stain density. On DAB IHC the eosin
channel only collects residue (colour casts, JPEG), on H&E it carries the cytoplasm and
stroma.

Calibration (README, "Stain check"): eosin share at most 0.005 on the 20 real BCI HER2 IHC
patches (DAB share 0.35-0.89), 0.009-0.012 on the synthetic IHC slides, 0.24 on the real H&E
slide ``CMU-1-Small-Region.svs``. Slides above :data:`MAX_EOSIN_SHARE` are refused unless forced.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from wsi_her2.errors import StainError
from wsi_her2.vocab import DAB_IHC

MAX_EOSIN_SHARE = 0.10  # IHC measured <= 0.012, H&E 0.24
MIN_TISSUE_OD = 0.15  # summed RGB optical density of a pixel counted as stained tissue
SAMPLE_TILES = 48  # QC-passed tiles sampled evenly over the slide
PIXEL_STEP = 4  # every 4th pixel in each direction


@dataclass(frozen=True)
class StainReport:
    eosin_share: float
    hematoxylin_share: float
    dab_share: float
    n_pixels: int

    @property
    def is_dab_ihc(self) -> bool:
        return self.n_pixels == 0 or self.eosin_share <= MAX_EOSIN_SHARE


def _hed_from_rgb() -> NDArray[np.float64]:
    from wsi_her2.stain.od import HED_FROM_RGB

    return np.asarray(HED_FROM_RGB.numpy(), dtype=np.float64)


def stain_shares(tiles: NDArray[np.uint8], *, glass_rgb=(255.0, 255.0, 255.0)) -> StainReport:
    """Hematoxylin / eosin / DAB shares of the positive stain density of ``tiles`` (n, h, w, 3)."""
    rgb = tiles[:, ::PIXEL_STEP, ::PIXEL_STEP].reshape(-1, 3).astype(np.float64)
    glass = np.maximum(np.asarray(glass_rgb, np.float64), 1.0)
    od = -np.log10(np.clip(rgb / glass, 1.0 / 255.0, 1.0))
    tissue = od.sum(axis=1) > MIN_TISSUE_OD
    hed = np.clip(od[tissue] @ _hed_from_rgb(), 0.0, None)
    total = float(hed.sum())
    if total <= 0:
        return StainReport(0.0, 0.0, 0.0, 0)
    h, e, d = (float(v) / total for v in hed.sum(axis=0))
    return StainReport(eosin_share=e, hematoxylin_share=h, dab_share=d, n_pixels=int(tissue.sum()))


def slide_stain_report(store) -> StainReport:
    """The stain shares of up to :data:`SAMPLE_TILES` QC-passed tiles of a patch store."""
    passed = np.flatnonzero(store.qc_pass)
    if passed.size == 0:
        return StainReport(0.0, 0.0, 0.0, 0)
    pick = passed[np.linspace(0, passed.size - 1, min(SAMPLE_TILES, passed.size)).round().astype(int)]
    tiles = np.concatenate([store.read_tiles(int(i), int(i) + 1) for i in np.unique(pick)])
    glass = store.attrs.get("tissue", {}).get("glass_rgb") or (255.0, 255.0, 255.0)
    return stain_shares(tiles, glass_rgb=glass)


def check_stain_for_model(store, stain: str | None, *, force: bool = False) -> StainReport | None:
    """Refuse (one :class:`StainError` line) a slide that is not DAB IHC for a scorer that measures DAB
    (``stain``: the scorer's ``stain`` capability, :data:`wsi_her2.vocab.DAB_IHC`)."""
    if force or stain != DAB_IHC:
        return None
    report = slide_stain_report(store)
    if not report.is_dab_ihc:
        raise StainError(
            f"{store.path}: not DAB IHC: {report.eosin_share:.0%} of the stain density is eosin (DAB + hematoxylin "
            f"IHC stays below {MAX_EOSIN_SHARE:.0%}; H&E looks like this); this scorer measures DAB and would "
            "give a meaningless call: score an IHC slide, or pass --force to score it anyway"
        )
    return report
