"""Tumour epithelium, not stroma: the per-nucleus weight of :class:`~wsi_her2.models.ihc_score.IhcDabScorer`.

ASCO/CAP percentages are over invasive tumour cells, so each nucleus the scorer finds is weighted
by how much it looks like carcinoma epithelium. The weight is a small model (a logistic
regression on a few morphology features, :class:`EpitheliumModel`) that reads the
**counterstain only** (never DAB: it must find unstained HER2 0 tumour as well as 3+), from
quantities both kernels compute on the ~1 µm cell grid:

- **Samples** (``(N, S)``, :func:`nucleus_stencil`): the two counterstain maps nuclei are found
  on (Gaussian blurs of the counterstain OD at the nucleus scale ``sigma1`` and at ``1.6 sigma1``)
  read at and around each nucleus (reflect-padded at the tile edge): its centre, a 3 x 3 stencil
  for the curvature (2 µm steps), and a ring at 7 µm (where carcinoma has cytoplasm, stroma
  collagen, and a lymphocyte aggregate the next nucleus). No map beyond those of the nucleus
  detection is computed: the features cost a gather per nucleus.
- **Counts** (``(N, len(COUNT_WINDOWS_UM))``): other nuclei in squares of 20, 40 and 80 µm,
  scaled up where the tile edge cuts the square (as the cohesion rule did).
- **Level** (``(N,)``): the tile's counterstain level (``IhcThresholds.counterstain_quantile``),
  which every OD feature is divided by, so a pale and a dark counterstain give the same features.

:func:`nucleus_features` turns these into :data:`FEATURE_NAMES` (one torch function, used by both
kernels, on every nucleus of a batch at once), and the model maps them to a weight in [0, 1].
The shipped weights (``epithelium_v1.safetensors`` beside this module, ~1 KB: a small
multilayer perceptron, one hidden layer of 8 units) are trained by ``qc/train_epithelium.py`` on the
nuclei of the 20 dev patches labelled by the drawn annotations (``qc/annotations``: ``Tumor``
or not). Held out (each patch scored by a model trained on the other 19), against those
annotations: precision 0.55, recall 0.51, pooled (the cohesion rule: 0.38 / 0.53); labels from
the stain itself (complete HER2 rings are carcinoma) gave 0.50 / 0.50 (see that script).

Limits: trained on 20 patches of one source at ~1 µm/px; dense benign epithelium and in situ
carcinoma are not told from invasive tumour; lymphocyte-rich stroma and cellular spindle stroma
still take a share of the weight (precision 0.23-0.35 on such patches); the synthetic carcinoma
of :mod:`wsi_her2.synthetic.textures` (7 µm nuclei, the size of a lymphocyte's) is not accepted
as carcinoma, while carcinoma built to textbook sizes (10 µm nuclei in 16 µm cells) is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "COUNT_WINDOWS_UM",
    "DEFAULT_WEIGHTS",
    "EpitheliumModel",
    "FEATURE_NAMES",
    "Stencil",
    "load_default_model",
    "nucleus_features",
    "nucleus_stencil",
]

#: Squares (µm) in which other nuclei are counted: a few cells, a cohesive sheet, a nest.
COUNT_WINDOWS_UM: tuple[float, ...] = (20.0, 40.0, 80.0)
#: Scales of the two counterstain maps the stencil reads, in units of the nucleus scale ``sigma1``:
#: the nucleus-scale blur and the surround of the DoG (the maps nuclei are found on).
MAP_SCALES: tuple[float, ...] = (1.0, 1.6)
#: Step (µm) of the curvature stencil on the nucleus-scale map.
_HESSIAN_STEP_UM = 2.0
#: Radius (µm) of the ring read around each nucleus, and its rays.
_RING_UM = 7.0
_RING_RAYS = 16

DEFAULT_WEIGHTS = Path(__file__).with_name("epithelium_v1.safetensors")


@dataclass(frozen=True)
class Stencil:
    """Where each sample is read: ``map_index`` into :data:`MAP_SCALES`, ``dy``/``dx`` in cell-grid px."""

    map_index: np.ndarray
    dy: np.ndarray
    dx: np.ndarray

    @property
    def pad(self) -> int:
        """Reflect padding the maps need (the stencil's reach)."""
        return int(max(np.abs(self.dy).max(), np.abs(self.dx).max()))


def nucleus_stencil(mpp_c: float) -> Stencil:
    """The samples of each nucleus on a cell grid of ``mpp_c`` µm/px: 0 the nucleus-scale map at the
    centre, 1 the surround map at the centre, 2-9 the 3 x 3 curvature stencil (row-major, less the
    centre), 10-25 the ring at 7 µm."""
    d = max(1, int(round(_HESSIAN_STEP_UM / mpp_c)))
    entries = [(0, 0, 0), (1, 0, 0)]
    entries += [(0, dy, dx) for dy in (-d, 0, d) for dx in (-d, 0, d) if (dy, dx) != (0, 0)]
    r = _RING_UM / mpp_c
    for k in range(_RING_RAYS):
        a = 2.0 * math.pi * k / _RING_RAYS
        entries.append((0, int(round(r * math.sin(a))), int(round(r * math.cos(a)))))
    arr = np.array(entries, np.int64)
    return Stencil(map_index=arr[:, 0], dy=arr[:, 1], dx=arr[:, 2])


FEATURE_NAMES: tuple[str, ...] = (
    "od",  # nucleus-scale smoothed counterstain OD at the nucleus / tile level (chromatin: lymphocytes dark)
    "contrast",  # its DoG (the blob's contrast against its ~10 µm surroundings) / level
    "elongation",  # 0 round .. 1 a line: curvature anisotropy at the nucleus scale (spindle nuclei)
    "curvature",  # -trace of the curvature / level: a small sharp blob (lymphocyte) vs a broad pale one
    "ring7_mean",  # counterstain 7 µm from the nucleus / level: cytoplasm vs collagen vs the next nucleus
    "ring7_min",  # its lightest side (a gap of cytoplasm, lumen or fat)
    "ring7_max",  # its darkest side (a touching nucleus)
    "log_n20",  # log(1 + other nuclei in a 20 µm square): packing
    "log_n40",  # ... in 40 µm: a cohesive sheet
    "log_n80",  # ... in 80 µm: a nest or a field of stroma
)


def _hessian(centre: torch.Tensor, ring: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Anisotropy (0 round, 1 a line) and ``-trace`` of the 2 x 2 curvature from a 3 x 3 stencil
    (``ring``: the 8 samples in row-major order without the centre)."""
    nw, n, ne, w, e, sw, s, se = ring.unbind(dim=1)
    hxx = w + e - 2.0 * centre
    hyy = n + s - 2.0 * centre
    hxy = 0.25 * (se + nw - ne - sw)
    half_diff = torch.sqrt((0.5 * (hxx - hyy)) ** 2 + hxy**2)
    trace = hxx + hyy
    return half_diff / (0.5 * trace.abs() + half_diff + 1e-6), -trace


def nucleus_features(samples: torch.Tensor, counts: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """``(N, len(FEATURE_NAMES))`` float32 features from the stencil samples, the edge-corrected
    counts (:data:`COUNT_WINDOWS_UM`) and each nucleus's tile counterstain level."""
    samples = samples.float()
    inv = 1.0 / level.float().clamp(min=1e-3)
    g1, g2 = samples[:, 0], samples[:, 1]
    elongation, curvature = _hessian(g1, samples[:, 2:10])
    ring = samples[:, 10:26]
    cols = [g1 * inv, (g1 - g2) * inv, elongation, curvature * inv,
            ring.mean(dim=1) * inv, ring.amin(dim=1) * inv, ring.amax(dim=1) * inv]
    cols += [torch.log1p(counts[:, j].float().clamp(min=0.0)) for j in range(counts.shape[1])]
    return torch.stack(cols, dim=1)


class EpitheliumModel:
    """A logistic regression or a one-hidden-layer perceptron on standardised :data:`FEATURE_NAMES`.

    Weights load from a safetensors file holding ``mean``, ``std`` (``(F,)``), and either ``w``
    (``(F,)``) and ``b`` (``(1,)``), or ``w1`` ``(F, H)``, ``b1`` ``(H,)``, ``w2`` ``(H,)``, ``b2`` ``(1,)``;
    optionally ``offset`` and ``sharpness`` (``(1,)`` each): the weight is
    ``sigmoid(sharpness * (logit - offset))``, a decision at probability ``sigmoid(offset)`` made
    near-hard. No pickle: only tensors are read.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], *, source: str = "") -> None:
        self.source = source
        self.tensors = {k: v.float() for k, v in tensors.items()}
        f = len(FEATURE_NAMES)
        for key in ("mean", "std"):
            if self.tensors.get(key) is None or tuple(self.tensors[key].shape) != (f,):
                raise ValueError(f"epithelium weights {source!r}: {key!r} must have shape ({f},)")

    @classmethod
    def load(cls, path: str | Path) -> "EpitheliumModel":
        from safetensors.torch import load_file

        return cls(load_file(str(path)), source=str(path))

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path), metadata=metadata)

    def logit(self, features: torch.Tensor) -> torch.Tensor:
        t = self.tensors
        z = (features.float() - t["mean"].to(features.device)) / t["std"].to(features.device)
        if "w1" in t:
            hidden = torch.relu(z @ t["w1"].to(z.device) + t["b1"].to(z.device))
            return hidden @ t["w2"].to(z.device) + t["b2"].to(z.device)
        return z @ t["w"].to(z.device) + t["b"].to(z.device)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """``(N,)`` weights in [0, 1] of ``(N, F)`` features: ``sigmoid(sharpness * (logit - offset))``."""
        if features.shape[0] == 0:
            return features.new_zeros(0)
        z = self.logit(features)
        if "offset" in self.tensors:
            z = z - self.tensors["offset"].to(z.device)
        if "sharpness" in self.tensors:
            z = z * self.tensors["sharpness"].to(z.device)
        return torch.sigmoid(z)


_DEFAULT: EpitheliumModel | None = None


def load_default_model() -> EpitheliumModel:
    """The shipped model (loaded once per process)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = EpitheliumModel.load(DEFAULT_WEIGHTS)
    return _DEFAULT
