"""Rule-based HER2 IHC tile scorer: colour deconvolution plus the ASCO/CAP 2018 membrane rules.

:class:`IhcDabScorer` needs no trained weights (its optional epithelium detector ships its own ~1 KB). It is a ``torch.nn.Module`` that turns ``(B, 3, H, W)`` RGB tiles into logits over
``("0", "1+", "2+", "3+")`` by measuring what a pathologist looks at under ASCO/CAP 2018
(breast): membrane staining **intensity** (faint/barely perceptible, weak-moderate, intense),
its **completeness** (circumferential or not) and the **percentage of cells** showing each
pattern. Steps, all per tile:

1. Glass intensity ``I0`` per channel from the tile's brightest pixels
   (:func:`wsi_her2.stain.od.estimate_background`), then decimal optical density
   ``-log10(I / I0)`` and Ruifrok & Johnston colour deconvolution into hematoxylin and DAB OD.
2. Tissue: pixels whose summed RGB OD exceeds a floor.
3. Cells: nuclei as blobs of the counterstain OD (:data:`COUNTERSTAIN_FROM_RGB`: orthogonal to
   DAB; difference of Gaussians at the nucleus scale, local maxima at least a nucleus radius
   apart, contrast and OD above shares of the tile's own counterstain level); one seed per cell.
   Each nucleus is weighted as tumour by the tumour model (:data:`TUMOUR_MODELS`: the cohesion
   rule, or the epithelium detector of :mod:`wsi_her2.models.epithelium`). Cell-scale evidence
   (nuclei, tumour weights, tumour area, the DAB hue) is computed on the cell grid, ~1 µm/px
   (:data:`CELL_GRID_UM`); the tissue statistics and membrane DAB at the tile's resolution.
4. Membrane, read in light: the brown DAB's light loss blurred to one physical resolution; from
   each seed, rays in ``n_directions`` directions from just outside the nucleus to the cell
   radius (micrometres converted with ``mpp_um``); each ray takes the largest outward rise of
   light loss over the cytoplasm it crossed, divided by the response of a 1 µm reference band
   (:mod:`wsi_her2.stain.membrane`, :mod:`wsi_her2.models.ihc_cells`). Completeness is the (soft)
   share of rays that hit above the faint level; intensity is the OD of the median light loss
   over the rays that hit; the ring's pattern (complete, basolateral, lateral, partial) follows.
5. Per cell, soft grade memberships under the guideline (:mod:`wsi_her2.criteria`): >=1+ (any
   membrane DAB), >=2+ (a complete ring at least weak-moderate; under breast also a moderate to
   intense basolateral or lateral ring, ASCO/CAP 2018's unusual pattern; under gastric those
   rings count as complete), 3+ (complete and intense). Per tile, the shares of the *graded*
   tumour cells (those whose ring lies in the tile) in each, then the decision list "3+ if >10 %
   of cells are 3+, elif >10 % >=2+, elif >10 % >=1+, else 0" with logistic edges around 10 %,
   so probabilities are graded, not one-hot.
6. Tiles with few graded tumour cells or little tissue are pulled towards a flat prior whose
   argmax is 0 (a low-confidence 0); the QC stage is expected to drop them anyway.

Every cut-point lives in :class:`IhcThresholds` (:mod:`wsi_her2.models.ihc_thresholds`) with its reason.

Two kernels compute steps 1-3 and the ray contrasts (:class:`CellEvidence`): batched torch ops
(any device; the GPU path) and OpenCV per tile (:mod:`wsi_her2.models.ihc_cpu_kernel`, the CPU default,
~1 ms per 224 px tile). Steps 4-6 are one torch implementation shared by both.

Limits
------
- IHC only: DAB (brown) with hematoxylin counterstain. H&E, fluorescence, or red/other
  chromogens (AP-Red, Fast Red) are outside the model: on H&E the "DAB" channel is eosin
  crosstalk and the calls are meaningless.
- Tumour cells: under the cohesion rule (the default), nuclei in cohesive sheets (see
  ``IhcThresholds``: cohesion window): dense stroma and inflammation count as tumour as well.
  The epithelium detector (``tumour_model="epithelium"``) is trained on 20 real patches and
  reaches, held out, ~55 % precision at ~50 % recall against drawn annotations
  (``qc/tumour_agreement.py``); in situ carcinoma counts as tumour under both. In very solid
  intense 3+ sheets, DAB can mask the counterstain of nuclei and lower the cell count
  (``nuclear_density_low`` reports such tiles).
- Stain and scanner variation: the OD cut-points assume a DAB hue close to the Ruifrok vector
  and a roughly linear (gamma-free) scanner response. Over- or under-developed DAB, heavy JPEG
  compression or a gamma curve shift intensities and move calls across the 1+/2+/3+ borders.
  Calibrate against a few known slides of your lab before trusting absolute calls.
- Resolution: meant for 0.25-1.0 µm/px (40x down to 10x-equivalent). At 1 µm/px a 1 µm
  membrane fills about one pixel and JPEG blur dilutes its OD, so weak rings read weaker;
  coarser than ~1 µm/px nuclei (5-10 µm) are no longer resolved as blobs.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from wsi_her2.errors import ConfigError
from wsi_her2.criteria import DEFAULT_CRITERIA, Criteria, get_criteria
from wsi_her2.models.epithelium import (
    COUNT_WINDOWS_UM,
    MAP_SCALES,
    EpitheliumModel,
    load_default_model,
    nucleus_features,
    nucleus_stencil,
)
from wsi_her2.models.ihc_cells import cell_grades, cell_table, logistic, membrane_loss, ray_contrast, ring_patterns
from wsi_her2.models.ihc_thresholds import DOG_QUANTUM_INV, IhcThresholds, counterstain_rank
from wsi_her2.vocab import HER2_CLASSES, TUMOUR_MODELS
from wsi_her2.stain.membrane import membrane_response, membrane_smoothing_um
from wsi_her2.models.ihc_evidence import COUNTERSTAIN_FROM_RGB, CellEvidence, gaussian_taps, odd_px
from wsi_her2.stain.od import estimate_background, od_to_hed, od_to_hnd, rgb_to_od

__all__ = [
    "CLASS_NAMES",
    "MEASUREMENT_NAMES",
    "IhcThresholds",
    "IhcDabScorer",
    "CellEvidence",
    "CELL_GRID_UM",
    "COUNTERSTAIN_FROM_RGB",
    "TUMOUR_MODELS",
]

log = logging.getLogger(__name__)

#: Cell-scale evidence (nuclei, cohesion, tumour area, the brown-hue check) is computed on a grid
#: of about this pixel size, in block means of whole tile pixels (factor ``round(1 / mpp_um)``,
#: at least 1): the smallest of those structures, a 7 µm nucleus blurred at sigma ~2.5 µm or the
#: hue read over 1.5 µm, is still sampled at >= 1.5 px there. Membrane intensity (a ~1 µm line)
#: stays at the tile's own resolution. At 0.5 µm/px this does 4x less work at the cell scale.
CELL_GRID_UM = 1.0
#: Share of a cell's rays that must end inside its tile for the cell to be graded (14 of 16).
_GRADED_VIEW = 0.84
#: Implementations of the same measurements (see :class:`IhcDabScorer`).
KERNELS = ("auto", "torch", "opencv")


#: Output classes, in logit order.
CLASS_NAMES: tuple[str, ...] = HER2_CLASSES

#: Keys of :meth:`IhcDabScorer.measure`, each a ``(B,)`` float tensor.
MEASUREMENT_NAMES: tuple[str, ...] = (
    "tissue_fraction",  # fraction of tile pixels that are tissue
    "hematoxylin_od_mean",  # mean hematoxylin OD over tissue pixels
    "dab_od_mean",  # mean DAB OD over tissue pixels
    "stained_fraction",  # fraction of tissue pixels with DAB OD above the faint level
    "cell_count",  # nuclei detected in the tile
    "cell_density_per_mm2",  # nuclei per mm² of tile area
    "tumour_cell_count",  # nuclei weighted by their evidence of tumour epithelium (the tumour model)
    "graded_cell_count",  # the tumour cells whose ring lies in the tile
    "tumour_area_mm2",  # tile area within a cell radius of a tumour nucleus
    "neutral_od_mean",  # mean achromatic (grey) OD over tissue: absorbance that is not stain
    "dab_od_membrane",  # mean over graded tumour cells of the membrane OD (reference band; median of rays that hit)
    "completeness",  # mean fraction of rays hitting DAB, over graded cells with membrane staining
    "frac_cells_1plus_or_more",  # fraction of graded tumour cells with any membrane DAB
    "frac_cells_2plus_or_more",  # fraction graded >= 2+ under the guideline (see step 5)
    "frac_cells_3plus",  # fraction graded 3+ (complete, or under gastric basolateral/lateral, and intense)
    "her2_index",  # membrane H-score / 100: sum of the three fractions above, in [0, 3]
    "reliability",  # 0-1 weight of the rule vs the flat prior (graded tumour cells and tissue present)
    "nuclei_per_mm2_tissue",  # nuclei per mm² of the tile's tissue (summed OD above tissue_od_sum)
    "nuclear_density_low",  # 0-1: mostly tissue, yet implausibly few nuclei found in it (see IhcThresholds)
)


def _gaussian_blur(img: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, 1, H, W)`` with reflect padding (no dark border)."""
    k = gaussian_taps(sigma_px, *img.shape[-2:])
    if k is None:
        return img
    k = k.to(img.device)
    radius = k.numel() // 2
    out = F.conv2d(F.pad(img, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))


def _ray_offsets(n_directions: int, start_px: float, stop_px: float) -> list[list[tuple[int, int]]]:
    """Integer (dy, dx) samples along each of ``n_directions`` rays, 1 px apart, deduplicated."""
    n_steps = max(1, int(math.ceil(stop_px - start_px)) + 1)
    radii = torch.linspace(start_px, stop_px, n_steps).tolist()
    rays = []
    for k in range(n_directions):
        theta = 2.0 * math.pi * k / n_directions
        seen: list[tuple[int, int]] = []
        for r in radii:
            off = (int(round(r * math.sin(theta))), int(round(r * math.cos(theta))))
            if off != (0, 0) and off not in seen:
                seen.append(off)
        rays.append(seen)
    return rays


def _box_sum(img: torch.Tensor, k: int) -> torch.Tensor:
    """Sum over a ``k x k`` window (zero outside), separably: O(k) per pixel, not O(k^2)."""
    out = F.avg_pool2d(img, (1, k), stride=1, padding=(0, k // 2), count_include_pad=True)
    return F.avg_pool2d(out, (k, 1), stride=1, padding=(k // 2, 0), count_include_pad=True) * float(k * k)


def _box_max(img: torch.Tensor, k: int) -> torch.Tensor:
    """Maximum over a ``k x k`` window, separably."""
    out = F.max_pool2d(img, (1, k), stride=1, padding=(0, k // 2))
    return F.max_pool2d(out, (k, 1), stride=1, padding=(k // 2, 0))


class IhcDabScorer(torch.nn.Module):
    """HER2 IHC tile scorer from DAB membrane staining (no weights; see the module docstring).

    Parameters
    ----------
    mpp_um
        Pixel size of the tiles it will see, µm/px; all micrometre sizes in ``thresholds`` are
        converted with it. Meant for 0.25-1.0.
    thresholds
        Cut-points; defaults to :class:`IhcThresholds()`.
    kernel
        ``"auto"`` (OpenCV on CPU tensors without gradient, torch otherwise), ``"torch"`` or
        ``"opencv"`` (CPU only; tensors elsewhere still go through torch). Both compute the same
        definitions; ``tests/test_ihc_kernels.py`` holds them to the same calls and measurements.
    threads
        Threads the OpenCV kernel spreads a batch's tiles over (None: the CPU count, at most 8).
    tumour_model
        How nuclei are weighted as tumour (:data:`TUMOUR_MODELS`): ``"cohesion"`` (4-24 other
        nuclei in a 40 µm square) or ``"epithelium"`` (the trained counterstain-morphology
        detector, :mod:`wsi_her2.models.epithelium`).
    epithelium_model
        The detector's weights (default: the shipped ``epithelium_v1.safetensors``).
    """

    class_names: tuple[str, ...] = CLASS_NAMES
    _ray_table: torch.Tensor

    def __init__(self, *, mpp_um: float = 0.5, thresholds: IhcThresholds | None = None, kernel: str = "auto",
                 threads: int | None = None, glass_rgb: tuple[float, float, float] | None = None,
                 criteria: str = DEFAULT_CRITERIA, tumour_model: str = "cohesion",
                 epithelium_model: EpitheliumModel | None = None) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ConfigError(f"IhcDabScorer kernel must be one of {KERNELS}, got {kernel!r}.")
        self.kernel = kernel
        #: The epithelium detector (the shipped weights, loaded on first use, unless given).
        self.epithelium_model = epithelium_model
        self.tumour_model = tumour_model
        self.threads = threads  # tile threads of the OpenCV kernel (None: the CPU count, at most 8)
        self.glass_rgb = glass_rgb  # the slide's glass colour, when the slide shows glass (see glass_chroma)
        #: Width in µm of one colour sample of the tiles (2.0: a 4:2:0 JPEG read at 1 µm/px; the score stage
        #: sets it from the store's ``tiling.chroma_mpp_um``; None: colour as sharp as the pixels): a
        #: membrane's DAB is corrected for the colour lost (:func:`wsi_her2.models.ihc_cells.membrane_loss`).
        self.chroma_mpp_um: float | None = None
        #: The guideline whose membrane patterns make a cell 2+ or 3+ (:data:`wsi_her2.criteria.CRITERIA`).
        self.criteria: Criteria = get_criteria(criteria)
        if not (0.05 <= mpp_um <= 4.0):
            raise ConfigError(
                f"IhcDabScorer got mpp_um={mpp_um}, outside 0.05-4 µm/px; pass the tile pixel "
                "size in micrometres (e.g. 0.5 for 20x)."
            )
        if not (0.25 <= mpp_um <= 1.0):
            log.warning("IhcDabScorer is meant for 0.25-1.0 µm/px; got %.3g, expect degraded calls", mpp_um)
        self.mpp_um = float(mpp_um)
        self.thresholds = thresholds if thresholds is not None else IhcThresholds()
        t = self.thresholds
        self._rays = _ray_offsets(t.n_directions, t.ray_start_um / mpp_um, t.ray_stop_um / mpp_um)
        self._reach_px = max(abs(c) for ray in self._rays for off in ray for c in off)
        longest = max(len(ray) for ray in self._rays)  # rays padded with their last sample (max unchanged)
        # a buffer: it moves with the module, so no batch copies it to the device again
        self.register_buffer("_ray_table", torch.tensor([ray + [ray[-1]] * (longest - len(ray)) for ray in self._rays],
                                                        dtype=torch.long), persistent=False)
        self.cell_grid_factor = max(1, int(round(CELL_GRID_UM / self.mpp_um)))
        blur = dict(blur_um=t.membrane_blur_um, optics_um=t.optics_blur_um)
        #: The scorer's own blur of the membrane light-loss map, px (the rest of ``membrane_blur_um``).
        self.membrane_sigma_px = membrane_smoothing_um(self.mpp_um, **blur) / self.mpp_um
        #: Peak light loss of the reference band per unit of its light loss (:func:`membrane_response`).
        taps = gaussian_taps(self.membrane_sigma_px, 64, 64)
        self.membrane_response = membrane_response(self.mpp_um, width_um=t.membrane_width_um,
                                                   taps=None if taps is None else taps.numpy(), **blur)
        log.debug(
            "IhcDabScorer at %.3g µm/px: nucleus %.1f px, rays %.1f-%.1f px, %d directions",
            mpp_um, t.nucleus_diameter_um / mpp_um, t.ray_start_um / mpp_um, t.ray_stop_um / mpp_um,
            t.n_directions,
        )

    @property
    def tumour_model(self) -> str:
        """How nuclei are weighted as tumour (:data:`TUMOUR_MODELS`); settable (the score stage sets
        ``--tumour-model``), loading the epithelium detector's weights when it is chosen."""
        return self._tumour_model

    @tumour_model.setter
    def tumour_model(self, name: str) -> None:
        if name not in TUMOUR_MODELS:
            raise ConfigError(f"tumour_model {name!r}: choose one of {', '.join(TUMOUR_MODELS)} (--tumour-model)")
        if name == "epithelium" and self.epithelium_model is None:
            self.epithelium_model = load_default_model()
        self._tumour_model = name

    @property
    def glass_rgb(self) -> tuple[float, float, float] | None:
        """The slide's glass colour (RGB, 0-255), or None (grey glass assumed).

        Set it (the score stage does, from the tile stage's glass estimate) and a tile's glass
        ``I0`` keeps the glass's tint: on yellowish glass a tile of tissue only would otherwise
        have its blue ``I0`` raised to within ``background_max_cast`` of grey, and the missing
        blue would read as DAB (a yellow cast is DAB-coloured).
        """
        return self._glass_rgb

    @glass_rgb.setter
    def glass_rgb(self, rgb) -> None:
        if rgb is None:
            self._glass_rgb, self.glass_chroma = None, None
            return
        values = tuple(float(v) for v in rgb)
        if len(values) != 3 or min(values) <= 0:
            raise ConfigError(f"IhcDabScorer.glass_rgb must be three positive values, got {rgb!r}.")
        self._glass_rgb = values
        #: ``(3,)`` the glass colour over its brightest channel (what the cast limit is measured in).
        self.glass_chroma = torch.tensor(values, dtype=torch.float32) / max(values)

    def _brown_share(self, dab_hed: torch.Tensor, dab_hnd: torch.Tensor, mpp_um: float) -> torch.Tensor:
        """Brown share of the DAB OD (1: all brown, 0: all grey), from ``(B, 1, h, w)`` clamped OD.

        The share is that DAB which survives when a neutral (grey) vector joins the basis
        (:data:`wsi_her2.stain.od.RGB_FROM_HND`), read on OD smoothed over ``chroma_sigma_um``
        (scanners store chroma at half resolution, JPEG 4:2:0: a 1 µm membrane's brown hue is
        spread over its neighbourhood while its darkness is not). Grey tissue keeps ~0, DAB all.
        """
        t = self.thresholds
        sigma = t.chroma_sigma_um / mpp_um
        share = _gaussian_blur(dab_hnd, sigma) / _gaussian_blur(dab_hed, sigma).clamp(min=t.chroma_min_od)
        return (share / t.brown_full_share).clamp(0.0, 1.0)

    def nucleus_sigma_px(self, mpp_c: float) -> float:
        """The nucleus scale (DoG ~ LoG at ``nucleus_diameter_um / (2 sqrt 2)``) in cell-grid px."""
        return self.thresholds.nucleus_diameter_um / (2.0 * math.sqrt(2.0)) / mpp_c

    def counterstain_level(self, h1: torch.Tensor) -> torch.Tensor:
        """``(B,)`` each tile's counterstain level from its ``(B, hc, wc)`` nucleus-scale smoothed
        counterstain OD: the ``counterstain_quantile`` order statistic over every second cell-grid
        pixel in each direction (the map is smooth at that scale; a quarter of the work)."""
        sub = h1[:, ::2, ::2].flatten(1)
        if sub.shape[0] == 0:
            return sub.new_zeros(0)
        k = counterstain_rank(sub.shape[1], self.thresholds.counterstain_quantile)
        return sub.kthvalue(k, dim=1).values

    def nucleus_thresholds(self, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(contrast_min, od_min)`` float32 per tile: shares of its counterstain level, floored
        (``IhcThresholds``: thresholds relative to the tile's counterstain)."""
        t = self.thresholds
        level = level.float()

        def cut(rel: float, floor: float) -> torch.Tensor:
            scaled = level * torch.tensor(rel, dtype=torch.float32, device=level.device)
            return torch.maximum(scaled, torch.tensor(floor, dtype=torch.float32, device=level.device))

        return cut(t.nuclear_contrast_rel, t.nuclear_contrast_min), cut(t.nuclear_od_rel, t.nuclear_od_min)

    def count_windows_um(self) -> tuple[float, ...]:
        """Squares (µm) in which other nuclei are counted: the tumour model's own (the epithelium
        detector's three, or the cohesion window alone: nothing else reads counts)."""
        if self.tumour_model == "epithelium":
            return tuple(COUNT_WINDOWS_UM)
        return (self.thresholds.cohesion_window_um,)

    def count_windows_px(self) -> list[int]:
        """:meth:`count_windows_um` as odd side lengths on the cell grid."""
        mpp_c = self.mpp_um * self.cell_grid_factor
        return [odd_px(um / mpp_c) for um in self.count_windows_um()]

    def nucleus_stencil(self):
        """The epithelium model's samples around each nucleus (:func:`wsi_her2.models.epithelium.nucleus_stencil`)."""
        return nucleus_stencil(self.mpp_um * self.cell_grid_factor)

    def edge_corrected_counts(self, counts: torch.Tensor, y: torch.Tensor, x: torch.Tensor,
                              grid_hw: tuple[int, int]) -> torch.Tensor:
        """``(N, K)`` counts of other nuclei per window scaled to the whole window where the tile edge cuts it off.

        A nucleus near the tile edge sees only the part of its window inside the tile; counted as
        is, carcinoma along every tile border (over half the area of a 112 µm tile at 0.5 µm/px)
        would look sparse, so the weighting would depend on the tile size. The count of other
        nuclei in the in-tile part is scaled by (window area / in-tile area), the usual edge
        correction of a density estimate (at most 4x, in a corner). ``y``, ``x``: the nuclei's
        cell-grid rows and columns; ``grid_hw``: the cell grid's shape.
        """
        h, w = grid_hw
        cols = []
        for j, k in enumerate(self.count_windows_px()):
            half = k // 2

            def inside(c: torch.Tensor, n: int) -> torch.Tensor:
                return (torch.clamp(c + half, max=n - 1) - torch.clamp(c - half, min=0) + 1).float()

            cols.append(counts[:, j] * (float(k * k) / (inside(y, h) * inside(x, w))))
        return torch.stack(cols, dim=1)

    def _cohesion_weight(self, neighbours: torch.Tensor) -> torch.Tensor:
        """Weight of cohesive epithelium from the count of other nuclei in the cohesion window."""
        t = self.thresholds
        return logistic(neighbours, t.min_neighbours, t.neighbours_softness) * (
            1.0 - logistic(neighbours, t.max_neighbours, 3.0 * t.neighbours_softness)
        )

    def tumour_weights(self, counts: torch.Tensor, samples: torch.Tensor | None, level: torch.Tensor) -> torch.Tensor:
        """``(N,)`` tumour weight of each nucleus under :attr:`tumour_model` (both kernels call this).

        ``counts``: :meth:`edge_corrected_counts`; ``samples``: the stencil's counterstain samples
        (epithelium model); ``level``: each nucleus's tile counterstain level.
        """
        if self.tumour_model == "cohesion":
            return self._cohesion_weight(counts[:, 0])
        if counts.shape[0] == 0:
            return counts.new_zeros(0)
        return self.epithelium_model(nucleus_features(samples, counts, level))

    # ------------------------------------------------------------------ public
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` RGB in [0, 1] -> ``(B, 4)`` log-probabilities over ``CLASS_NAMES``."""
        return self._evidence(x)["logits"]

    @torch.no_grad()
    def measure(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-tile measurements (``MEASUREMENT_NAMES``, each ``(B,)`` float32), ``probs`` and ``cells``."""
        return self._measurements(self._evidence(x))

    @torch.no_grad()
    def measure_u8(self, tiles_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`measure` of ``(B, H, W, 3)`` uint8 tiles (as stored), the same as of ``tiles / 255``.

        On CPU the OpenCV kernel reads the bytes directly (no float copy of the batch).
        """
        if tiles_u8.dtype != torch.uint8 or tiles_u8.ndim != 4 or tiles_u8.shape[-1] != 3:
            raise ConfigError(f"measure_u8 expects (B, H, W, 3) uint8 tiles, got {tuple(tiles_u8.shape)} {tiles_u8.dtype}.")
        x = tiles_u8.permute(0, 3, 1, 2)
        if not self.use_opencv(x) or x.shape[0] == 0:
            return self.measure(x.float().div_(255.0))
        return self._evidence_opencv(x, with_probs=True)

    def use_opencv(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is measured by the OpenCV kernel (CPU, no gradient) or the torch one."""
        if self.kernel == "torch" or x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
            return False
        return self.kernel in ("auto", "opencv")

    # ----------------------------------------------------------------- internal
    def _evidence(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ConfigError(f"IhcDabScorer expects (B, 3, H, W) RGB tiles, got shape {tuple(x.shape)}.")
        if min(x.shape[-2:]) < 2 * self.cell_grid_factor:
            raise ConfigError(f"IhcDabScorer needs tiles of at least {2 * self.cell_grid_factor} px, got {tuple(x.shape[-2:])}.")
        # Log/OD arithmetic in float32 even inside a bf16 autocast region.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if self.use_opencv(x) and x.shape[0] > 0:
                return self._evidence_opencv(x)
            return self._calls(self._cell_evidence_torch(x), x.shape)

    def _evidence_opencv(self, x: torch.Tensor, *, with_probs: bool = False) -> dict[str, torch.Tensor]:
        """Steps 1-3 by the OpenCV kernel on its own tile threads (``threads``).

        The per-seed steps that follow are small torch ops; on CPU they are fastest with torch on
        one thread (its OpenMP workers would spin beside the busy tile threads: ~15-25 % of the
        rate here). That is a process-wide setting, so the command line sets it, not this class.
        With ``with_probs``, :meth:`measure`'s dict (measurements and ``probs``) instead of the evidence.
        """
        from wsi_her2.models.ihc_score_cpu import cell_evidence_opencv, tile_threads

        threads = tile_threads(x.shape[0], self.threads)
        cells = cell_evidence_opencv(self, x, threads=threads)
        return self.measure_evidence(cells, x.shape) if with_probs else self._calls(cells, x.shape)

    def measure_evidence(self, cells: CellEvidence, shape: torch.Size | tuple[int, ...]) -> dict[str, torch.Tensor]:
        """:meth:`measure`'s dict (measurements and ``probs``) of ``shape``-d tiles from their cell
        evidence, computed elsewhere (e.g. by the CPU kernel in worker processes)."""
        return self._measurements(self._calls(cells, torch.Size(shape)))

    @staticmethod
    def _measurements(ev: dict) -> dict:
        """The measurements of :meth:`measure` from the evidence dict: ``MEASUREMENT_NAMES``, ``probs``
        and ``cells`` (the per-cell table, :data:`wsi_her2.vocab.CELL_COLUMNS`)."""
        out = {name: ev[name] for name in MEASUREMENT_NAMES}
        out["probs"] = ev["logits"].exp()
        out["cells"] = ev["cells"]
        return out

    def _cell_evidence_torch(self, x: torch.Tensor) -> CellEvidence:
        """Steps 1-3 and the ray contrasts of step 4, batched in torch (any device)."""
        t = self.thresholds
        f = self.cell_grid_factor
        mpp_c = self.mpp_um * f
        b, _, h, w = x.shape

        # 1. Optical density against this tile's glass, then stain unmixing (full resolution).
        i0 = estimate_background(
            x, quantile=t.background_quantile, min_intensity=t.background_min_intensity,
            max_cast=t.background_max_cast, glass_chroma=self.glass_chroma,
        )
        od = rgb_to_od(x, i0).clamp(min=0.0)  # brighter than glass is glass
        hnd = od_to_hnd(od)  # grey absorbance goes to its own channel, not to DAB
        hema = hnd[:, 0:1].clamp(min=0.0)
        neutral = hnd[:, 1:2].clamp(min=0.0)
        dab_hed = od_to_hed(od)[:, 2:3].clamp(min=0.0)
        dab_hnd = hnd[:, 2:3].clamp(min=0.0)

        # Cell-scale evidence on the cell grid (block means of f x f pixels).
        hc, wc = h // f, w // f

        def coarse(m: torch.Tensor) -> torch.Tensor:
            return m if f == 1 else F.avg_pool2d(m[:, :, : hc * f, : wc * f], f)

        brown = self._brown_share(coarse(dab_hed), coarse(dab_hnd), mpp_c)
        if f > 1:
            brown = F.interpolate(brown, size=(hc * f, wc * f), mode="bilinear", align_corners=False)
            brown = F.pad(brown, (0, w - wc * f, 0, h - hc * f), mode="replicate")
        dab = dab_hed * brown * t.dab_gain

        # 2. Tissue.
        tissue = (od.sum(dim=1, keepdim=True) > t.tissue_od_sum).float()
        n_tissue = tissue.sum(dim=(1, 2, 3))
        denom = n_tissue.clamp(min=1.0)
        stats = {
            "tissue_fraction": n_tissue / float(h * w),
            "hematoxylin_od_mean": (hema * tissue).sum(dim=(1, 2, 3)) / denom,
            "neutral_od_mean": (neutral * tissue).sum(dim=(1, 2, 3)) / denom,
            "dab_od_mean": (dab * tissue).sum(dim=(1, 2, 3)) / denom,
            "stained_fraction": ((dab > t.dab_faint_od).float() * tissue).sum(dim=(1, 2, 3)) / denom,
        }

        # 3. Nuclei: blobs of the counterstain OD at the nucleus scale (DoG ~ LoG, sigma r / sqrt 2),
        # against thresholds relative to the tile's own counterstain level.
        cs = COUNTERSTAIN_FROM_RGB.to(device=od.device, dtype=torch.float32)
        nuclear = coarse((od * cs.view(1, 3, 1, 1)).sum(dim=1, keepdim=True).clamp(min=0.0))
        sigma1 = self.nucleus_sigma_px(mpp_c)
        h1 = _gaussian_blur(nuclear, sigma1)
        h2 = _gaussian_blur(nuclear, MAP_SCALES[1] * sigma1)
        dog = h1 - h2
        level = self.counterstain_level(h1[:, 0])
        contrast_min, od_min = self.nucleus_thresholds(level)
        win = odd_px(t.seed_min_distance_um / mpp_c)
        dog_q = torch.round(dog * DOG_QUANTUM_INV)  # ties decided alike in both kernels (see DOG_QUANTUM_INV)
        is_max = dog_q >= F.max_pool2d(dog_q, win, stride=1, padding=win // 2)
        seed_map = is_max & (dog > contrast_min.view(-1, 1, 1, 1)) & (h1 > od_min.view(-1, 1, 1, 1))
        tile_i, _, yc, xc = seed_map.nonzero(as_tuple=True)
        counts = torch.stack([_box_sum(seed_map.float(), k)[tile_i, 0, yc, xc] - 1.0 for k in self.count_windows_px()], dim=1)
        counts = self.edge_corrected_counts(counts, yc, xc, (hc, wc))
        samples = self._stencil_samples(torch.cat([h1, h2], dim=1), tile_i, yc, xc) \
            if self.tumour_model == "epithelium" else None
        weights = self.tumour_weights(counts, samples, level[tile_i])
        keep = torch.zeros_like(nuclear)
        keep[tile_i, 0, yc, xc] = (weights > 0.5).float()
        area = _box_max(keep, odd_px(2 * t.cell_radius_um / mpp_c)).mean(dim=(1, 2, 3))

        # 4 (first half). The brown DAB's light loss, blurred to the membrane resolution, read along the rays.
        pad = self.ray_pad_px(h, w)
        loss = 1.0 - torch.pow(10.0, -dab)
        loss_s = F.pad(_gaussian_blur(loss, self.membrane_sigma_px), (pad, pad, pad, pad), mode="reflect")[:, 0]
        sy, sx = yc * f + f // 2, xc * f + f // 2
        base = (tile_i * (h + 2 * pad) + sy + pad) * (w + 2 * pad) + sx + pad
        return CellEvidence(
            stats=stats, seed_tile=tile_i, seed_yx=torch.stack([sy, sx], dim=1),
            ray_contrast=self._ray_contrast(loss_s.reshape(-1), base, w + 2 * pad, pad),
            tumour_weight=weights, tumour_area_fraction=area, counts=counts, samples=samples, level=level,
        )

    def _stencil_samples(self, maps: torch.Tensor, tile_i: torch.Tensor, yc: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
        """``(N, S)``: the epithelium detector's stencil around each nucleus, read from ``maps``
        (``(B, 2, hc, wc)``: the nucleus-scale and surround blurs, :data:`MAP_SCALES`), reflect-padded."""
        stencil = self.nucleus_stencil()
        hc, wc = maps.shape[-2:]
        sp = min(stencil.pad, hc - 1, wc - 1)
        padded = F.pad(maps, (sp, sp, sp, sp), mode="reflect")
        dy = torch.as_tensor(stencil.dy, device=maps.device).clamp(-sp, sp)
        dx = torch.as_tensor(stencil.dx, device=maps.device).clamp(-sp, sp)
        mi = torch.as_tensor(stencil.map_index, device=maps.device)
        return padded[tile_i.view(-1, 1), mi.view(1, -1), (yc + sp).view(-1, 1) + dy, (xc + sp).view(-1, 1) + dx]

    def _rays_inside(self, seed_yx: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``(N, n_directions)``: whether each seed's ray ends inside its ``h x w`` tile."""
        end = self._ray_table[:, -1, :].to(seed_yx.device)  # (n_directions, 2) dy, dx of each ray's last sample
        y = seed_yx[:, :1] + end[None, :, 0]
        x = seed_yx[:, 1:2] + end[None, :, 1]
        return (y >= 0) & (y < h) & (x >= 0) & (x < w)

    def ray_pad_px(self, h: int, w: int) -> int:
        """Reflect padding of the blurred light-loss map that the rays read (their reach, within the tile)."""
        return min(self._reach_px, h - 1, w - 1)

    def ray_offsets_flat(self, row_px: int, pad: int) -> torch.Tensor:
        """``(n_directions, L)`` ray samples as offsets into a flattened map of ``row_px`` columns."""
        offs = self._ray_table.clamp(-pad, pad)
        return offs[:, :, 0] * row_px + offs[:, :, 1]

    def _ray_contrast(self, flat_map: torch.Tensor, base: torch.Tensor, row_px: int, pad: int) -> torch.Tensor:
        """``(N, n_directions)``: per seed and ray, the membrane contrast along the ray (:func:`ray_contrast`).

        ``flat_map``: the blurred light-loss maps, reflect-padded by ``pad`` (so samples beyond the
        tile edge read the reflected tile) and flattened; ``base``: each seed's flat index.
        """
        offs = self.ray_offsets_flat(row_px, pad).to(flat_map.device)
        return ray_contrast(flat_map[base.view(-1, 1, 1) + offs])

    def _calls(self, cells: CellEvidence, shape: torch.Size) -> dict[str, torch.Tensor]:
        """Steps 4-6 from the cell evidence: membrane per ray and cell, grades, tile calls.

        The dict also holds ``"cells"``: the per-cell table (:data:`wsi_her2.vocab.CELL_COLUMNS`).
        """
        t = self.thresholds
        mpp = self.mpp_um
        b, _, h, w = shape
        eps = 1e-6
        dev = cells.ray_contrast.device
        tile_i, tumour = cells.seed_tile, cells.tumour_weight

        def per_tile(v: torch.Tensor) -> torch.Tensor:
            return torch.zeros(b, device=dev, dtype=torch.float32).index_add_(0, tile_i, v.float())

        n_cells = per_tile(torch.ones_like(tumour))
        n_tumour = per_tile(tumour)

        # 4 (second half) and 5. Membrane OD per ray, the ring's pattern, the guideline's grades per cell.
        loss = membrane_loss(cells.ray_contrast, response=self.membrane_response,
                             chroma_mpp_um=self.chroma_mpp_um, t=t)
        known = self._rays_inside(cells.seed_yx, h, w)
        ring = ring_patterns(loss, t, known=known)
        # Grades are estimated on the cells whose ring lies in the tile (>= 14 of 16 rays): a cell cut by the
        # tile edge cannot show whether its ring closes. Tile edges fall at random, so this is unbiased.
        graded = tumour * logistic(known.float().mean(dim=1), _GRADED_VIEW, 0.02)
        n_graded = per_tile(graded)
        grades = cell_grades(ring, t, self.criteria)

        def per_cell(m: torch.Tensor) -> torch.Tensor:  # mean over the graded tumour cells
            return per_tile(m * graded) / n_graded.clamp(min=eps)

        f1, f2, f3 = per_cell(grades.ge1), per_cell(grades.ge2), per_cell(grades.eq3)
        stained_w = per_tile(grades.ge1 * graded)
        completeness = per_tile(ring.completeness * grades.ge1 * graded) / stained_w.clamp(min=eps)
        completeness = torch.where(stained_w > eps, completeness, torch.zeros_like(completeness))

        # 6. The guideline's decision list with soft 10 % edges, then reliability towards the prior.
        s3 = logistic(f3, t.cell_fraction_cut, t.fraction_softness)
        s2 = logistic(f2, t.cell_fraction_cut, t.fraction_softness)
        s1 = logistic(f1, t.cell_fraction_cut, t.fraction_softness)
        rule = torch.stack(
            [(1 - s3) * (1 - s2) * (1 - s1), (1 - s3) * (1 - s2) * s1, (1 - s3) * s2, s3], dim=1
        )
        stats = {k: v.to(dev) for k, v in cells.stats.items()}
        # the fractions above are over the graded cells: they are the evidence the rule had
        reliability = logistic(n_graded, t.min_cells, t.cells_softness) * logistic(
            stats["tissue_fraction"], t.min_tissue_fraction, t.tissue_softness
        )
        prior = torch.tensor(t.prior, dtype=torch.float32, device=dev).unsqueeze(0)
        probs = reliability.unsqueeze(1) * rule + (1 - reliability.unsqueeze(1)) * prior
        area_mm2 = h * w * mpp * mpp * 1e-6
        tissue_fraction = stats["tissue_fraction"]
        per_mm2_tissue = n_cells / (tissue_fraction * area_mm2).clamp(min=1e-9)
        per_mm2_tissue = torch.where(tissue_fraction > 0, per_mm2_tissue, torch.zeros_like(per_mm2_tissue))
        density_low = logistic(tissue_fraction, t.cellular_tissue_fraction, t.tissue_softness) * (
            1.0 - logistic(per_mm2_tissue, t.min_nuclei_per_mm2, 0.2 * t.min_nuclei_per_mm2))
        return {
            "logits": torch.log(probs.clamp(min=1e-8)),
            **stats,
            "cell_count": n_cells,
            "cell_density_per_mm2": n_cells / area_mm2,
            "tumour_cell_count": n_tumour,
            "graded_cell_count": n_graded,
            "tumour_area_mm2": cells.tumour_area_fraction.to(dev).float() * area_mm2,
            "dab_od_membrane": per_cell(ring.intensity),
            "completeness": completeness,
            "frac_cells_1plus_or_more": f1,
            "frac_cells_2plus_or_more": f2,
            "frac_cells_3plus": f3,
            "her2_index": f1 + f2 + f3,
            "reliability": reliability,
            "nuclei_per_mm2_tissue": per_mm2_tissue,
            "nuclear_density_low": density_low,
            "cells": cell_table(cells, ring, grades, known.float().mean(dim=1)),
        }
