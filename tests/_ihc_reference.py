"""Rule-based HER2 IHC tile scorer: colour deconvolution plus the ASCO/CAP 2018 membrane rules.

:class:`IhcDabScorer` needs no trained weights. It is a ``torch.nn.Module`` (pure tensor ops,
batched, CPU or CUDA) that turns ``(B, 3, H, W)`` RGB tiles into logits over
``("0", "1+", "2+", "3+")`` by measuring what a pathologist looks at under ASCO/CAP 2018
(breast): membrane staining **intensity** (faint/barely perceptible, weak-moderate, intense),
its **completeness** (circumferential or not) and the **percentage of cells** showing each
pattern. Steps, all per tile:

1. Glass intensity ``I0`` per channel from the tile's brightest pixels
   (:func:`wsi_her2.stain.od.estimate_background`), then decimal optical density
   ``-log10(I / I0)`` and Ruifrok & Johnston colour deconvolution into hematoxylin and DAB OD.
2. Tissue: pixels whose summed RGB OD exceeds a floor.
3. Cells: nuclei as blobs of hematoxylin OD (difference of Gaussians at the nucleus scale,
   local maxima at least a nucleus radius apart); one seed per cell.
4. Membrane: from each seed, rays in ``n_directions`` directions from just outside the nucleus
   to the cell radius (micrometres converted with ``mpp_um``); each ray takes the maximum DAB
   OD it crosses (computed densely as a running max of shifted DAB maps). Completeness is the
   (soft) fraction of rays that hit DAB above the faint level; intensity is the mean OD over the
   rays that hit.
5. Per cell, soft memberships: >=1+ (any membrane DAB, partial or complete), >=2+ (complete and
   at least weak-moderate), 3+ (complete and intense). Per tile, the fractions of cells in each,
   then the ASCO/CAP decision list "3+ if >10 % of cells are 3+, elif >10 % >=2+, elif >10 %
   >=1+, else 0" with logistic edges around 10 %, so probabilities are graded, not one-hot.
6. Tiles with few cells or little tissue are pulled towards a flat prior whose argmax is 0
   (a low-confidence 0); the QC stage is expected to drop them anyway.

Every cut-point lives in :class:`IhcThresholds` with its reason.

Limits
------
- IHC only: DAB (brown) with hematoxylin counterstain. H&E, fluorescence, or red/other
  chromogens (AP-Red, Fast Red) are outside the model: on H&E the "DAB" channel is eosin
  crosstalk and the calls are meaningless.
- Tumour cells are nuclei in cohesive sheets (see ``IhcThresholds``: cohesion window), not a
  trained tumour detector: in situ carcinoma and dense benign epithelium count as tumour,
  single infiltrating cells little. In very solid intense 3+ sheets, DAB can mask the
  hematoxylin of nuclei and lower the cell count.
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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wsi_her2.errors import ConfigError
from wsi_her2.vocab import HER2_CLASSES
from wsi_her2.stain.od import estimate_background, od_to_hed, od_to_hnd, rgb_to_od

__all__ = [
    "CLASS_NAMES",
    "MEASUREMENT_NAMES",
    "IhcThresholds",
    "IhcDabScorer",
]

log = logging.getLogger(__name__)

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
    "tumour_cell_count",  # nuclei weighted by their evidence of cohesive epithelium (tumour)
    "tumour_area_mm2",  # tile area within a cell radius of a tumour nucleus
    "neutral_od_mean",  # mean achromatic (grey) OD over tissue: absorbance that is not stain
    "dab_od_membrane",  # mean over tumour cells of the membrane DAB OD (mean over rays that hit)
    "completeness",  # mean fraction of rays hitting DAB, over cells with membrane staining
    "frac_cells_1plus_or_more",  # fraction of tumour cells with any membrane DAB
    "frac_cells_2plus_or_more",  # fraction with complete, at least weak-moderate membrane DAB
    "frac_cells_3plus",  # fraction with complete, intense membrane DAB
    "her2_index",  # membrane H-score / 100: sum of the three fractions above, in [0, 3]
    "reliability",  # 0-1 weight of the rule vs the flat prior (cells and tissue present)
)


@dataclass(frozen=True)
class IhcThresholds:
    """Every cut-point of :class:`IhcDabScorer`, in one place, with its reason.

    Optical densities are decimal (log10), relative to the tile's glass intensity, in the
    Ruifrok & Johnston DAB channel. Sizes are micrometres (converted with ``mpp_um``).

    **Why these DAB OD cut-points.** DAB is a broad-band absorber; by Beer-Lambert a layer of
    OD ``d`` transmits ``10**-d`` of the light. Intense (3+) membranes are chocolate-brown
    to black, transmitting ~5-10 % (OD ~1.0-1.4); weak-moderate (2+) rings are clearly brown
    yet translucent, ~25-40 % transmission (OD ~0.4-0.6); faint, barely perceptible (1+)
    staining transmits ~55-70 % (OD ~0.15-0.25), near the eye's contrast threshold for a thin
    line on a bright field. QuPath's positive-cell detection uses mean DAB OD bands of
    0.2 / 0.4 / 0.6 for 1+/2+/3+ on whole-cell compartments, which dilute the membrane signal
    over cytoplasm, so membrane maxima sit higher. Each cut-point is put at the geometric
    mean (midpoint on the log scale the eye works on) between neighbouring grade ranges:

    - ``dab_faint_od = 0.10``: unstained cytoplasm/stroma DAB after deconvolution is
      ~0.00-0.05 (residual crosstalk plus JPEG noise); faint staining starts ~0.15. 0.10 sits
      between, ~2 noise standard deviations above clean background.
    - ``dab_weak_od = 0.30``: sqrt(0.2 * 0.5) ~ 0.32, between faint (1+) and weak-moderate (2+).
    - ``dab_strong_od = 0.75``: sqrt(0.5 * 1.2) ~ 0.77, between weak-moderate (2+) and intense.
    - ``od_log_softness = 0.15``: width of the logistic edges in natural-log OD, i.e. ±15 % of
      the cut-point changes a membership by ~0.46 -> ~0.73; graded rather than one-hot, as the
      grades are themselves visual judgements with known inter-observer spread.

    Completeness (ASCO/CAP: "complete, circumferential" vs "incomplete"):

    - ``complete_fraction = 0.75``: a ring is "complete" when >=75 % of rays meet membrane
      DAB. Real rings show gaps where a neighbour's nucleus or tangential section interrupts
      them; 12 of 16 rays tolerates that and still excludes half-rings (basolateral, U-shaped
      patterns hit ~40-60 %).
    - ``partial_min_fraction = 0.20``: at least ~3 of 16 rays must hit before a cell counts as
      having (incomplete) membrane staining, so an isolated DAB speck does not.
    - ``completeness_softness = 0.06``: logistic width in ray-fraction units (about one ray of 16).

    Percentage rule (ASCO/CAP 2018, breast): a grade applies when ">10 % of tumour cells" show
    its pattern: ``cell_fraction_cut = 0.10``; ``fraction_softness = 0.025`` makes 5 % -> 0.12
    and 20 % -> 0.98 membership.

    Geometry (breast carcinoma cytology):

    - ``nucleus_diameter_um = 7.0``: tumour nuclei are ~6-12 µm, lymphocytes ~5-7 µm; blob
      detection at 7 µm picks up both, smaller blobs are suppressed by the DoG contrast.
    - ``seed_min_distance_um = 5.0``: two nuclei cannot sit closer than ~a nucleus radius plus
      a membrane; local maxima closer than this are one nucleus.
    - ``ray_start_um = 3.0``: rays start just inside the nuclear rim (~3.5 µm radius) so the
      nucleus itself (where DAB crosstalk from dark hematoxylin is largest) is not counted.
    - ``ray_stop_um = 9.0``: tumour cells are ~12-20 µm across, so the membrane is 6-10 µm from
      the nucleus centre; 9 µm reaches it in most cells without reaching far into neighbours.
    - ``n_directions = 16``: 22.5° sectors; 8 would make completeness too coarse (12.5 % steps).
    - ``dab_smooth_sigma_um = 0.5``: suppresses single-pixel JPEG noise before ray maxima (a max
      over many noisy samples is biased upward) while keeping a ~1 µm membrane.

    Nuclei and tissue:

    - ``hema_od_min = 0.05``: non-DAB (hematoxylin + neutral) OD of a nucleus, smoothed at the
      nucleus scale. HER2 kits keep the counterstain light so membranes stay visible, and
      nuclei of pale HER2 0/1+ carcinoma measure only ~0.05-0.15; 0.05 is ~25x the JPEG noise
      left after that smoothing (< 0.002 OD).
    - ``dog_contrast_min = 0.012``: a nucleus must stand out from its ~10 µm surroundings by
      this much OD (a blob, not a smear): 6x the smoothed noise, so pale nuclei count while
      smooth stroma and fat, which make no blobs, do not.
    - ``tissue_od_sum = 0.08``: summed RGB OD. After background correction glass and fat read
      <= ~0.04 in 90 % of pixels even in JPEG-compressed scans; a pale HER2-kit counterstain
      alone (cytoplasm hematoxylin OD ~0.07) sums to ~0.11. Pixels below count as glass/fat.

    Background (glass) estimate (see :func:`wsi_her2.stain.od.estimate_background`):
    ``background_quantile = 0.99``, ``background_min_intensity = 0.65`` (real scanners render
    glass as dark as ~0.68; below 0.65 the "background" must be tissue), ``background_max_cast
    = 0.06`` (glass tints seen in practice are <3 %).

    Tumour, not everything (ASCO/CAP percentages are over invasive tumour cells): each nucleus
    is weighted by how much it looks like part of a cohesive epithelial sheet, counted as the
    other nuclei in a ``cohesion_window_um = 40`` µm square around it. Carcinoma cells are
    12-20 µm across, so such a square holds 5-14 of them (4-13 neighbours); fibroblasts, smooth
    muscle and fat in stroma leave 0-3. The weight is a logistic in the neighbour count,
    centred on ``min_neighbours = 4`` (``neighbours_softness = 1``), times one falling at
    ``max_neighbours = 24``: cells over ~8 µm cannot pack more densely, so denser blobs are
    lymphocyte aggregates. ``cell_radius_um = 8`` turns tumour nuclei into tumour area. Limits:
    in situ carcinoma and dense benign epithelium count as tumour; single infiltrating tumour
    cells in stroma count little.

    Brown, not merely dark: DAB is read from the Ruifrok-Johnston channel, then multiplied by
    its brown share: the fraction of it that stays DAB when a neutral (grey) vector is added to
    the basis, measured on OD smoothed over ``chroma_sigma_um = 1.5`` µm (JPEG 4:2:0 stores
    colour at half resolution, so a membrane's hue must be read over its neighbourhood) and
    over at least ``chroma_min_od = 0.03`` DAB OD (below it the share is noise). A share of
    ``brown_full_share = 0.5`` or more keeps the full OD (JPEG chroma loss and a real DAB hue a
    little greyer than Ruifrok's lower the share of real membranes to ~0.5-0.9); grey tissue's
    share is ~0, so it is scaled to ~0 in proportion. Neutral
    absorbance (thick sections, dense stroma, muscle, a grey cast) thus reads as no DAB, while a
    faint but brown membrane keeps its full OD.

    Lab calibration: ``dab_gain`` multiplies the DAB optical density before every cut-point
    (equivalently divides all three cut-points), the one intensity factor that differs between
    labs (DAB development time, scanner); 1.0 unless ``wsi-her2 calibrate`` fitted another.

    Low-information tiles: ``min_cells = 8`` tumour cells (fewer and one cell moves the percentage
    past 10 %), ``cells_softness = 2``; ``min_tissue_fraction = 0.10``,
    ``tissue_softness = 0.03``; below these the output approaches ``prior`` =
    (0.4, 0.2, 0.2, 0.2): argmax 0, low confidence.
    """

    dab_faint_od: float = 0.10
    dab_weak_od: float = 0.30
    dab_strong_od: float = 0.75
    od_log_softness: float = 0.15
    complete_fraction: float = 0.75
    partial_min_fraction: float = 0.20
    completeness_softness: float = 0.06
    cell_fraction_cut: float = 0.10
    fraction_softness: float = 0.025
    nucleus_diameter_um: float = 7.0
    seed_min_distance_um: float = 5.0
    ray_start_um: float = 3.0
    ray_stop_um: float = 9.0
    n_directions: int = 16
    dab_smooth_sigma_um: float = 0.5
    hema_od_min: float = 0.05
    dog_contrast_min: float = 0.012
    tissue_od_sum: float = 0.08
    background_quantile: float = 0.99
    background_min_intensity: float = 0.65
    background_max_cast: float = 0.06
    cohesion_window_um: float = 40.0
    min_neighbours: float = 4.0
    max_neighbours: float = 24.0
    neighbours_softness: float = 1.0
    cell_radius_um: float = 8.0
    dab_gain: float = 1.0
    chroma_sigma_um: float = 1.5
    chroma_min_od: float = 0.03
    brown_full_share: float = 0.5
    min_cells: float = 8.0
    cells_softness: float = 2.0
    min_tissue_fraction: float = 0.10
    tissue_softness: float = 0.03
    prior: tuple[float, float, float, float] = (0.4, 0.2, 0.2, 0.2)

    def __post_init__(self) -> None:
        if not 0.0 < self.dab_faint_od < self.dab_weak_od < self.dab_strong_od:
            raise ConfigError(
                "IhcThresholds DAB cut-points must satisfy 0 < faint < weak < strong, got "
                f"{self.dab_faint_od}, {self.dab_weak_od}, {self.dab_strong_od}; fix the order."
            )
        if not 0.0 < self.ray_start_um < self.ray_stop_um:
            raise ConfigError(
                f"IhcThresholds needs 0 < ray_start_um < ray_stop_um, got {self.ray_start_um}, "
                f"{self.ray_stop_um}."
            )
        if self.n_directions < 4:
            raise ConfigError(f"IhcThresholds.n_directions must be >= 4, got {self.n_directions}.")
        if len(self.prior) != 4 or abs(sum(self.prior) - 1.0) > 1e-6 or min(self.prior) <= 0:
            raise ConfigError(f"IhcThresholds.prior must be 4 positive numbers summing to 1, got {self.prior}.")


def _gaussian_blur(img: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, 1, H, W)`` with reflect padding (no dark border)."""
    if sigma_px < 0.3:
        return img
    h, w = img.shape[-2:]
    radius = min(int(math.ceil(3.0 * sigma_px)), h - 1, w - 1)
    if radius < 1:
        return img
    t = torch.arange(-radius, radius + 1, device=img.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma_px) ** 2)
    k = k / k.sum()
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


def _odd(size_px: float) -> int:
    return max(3, 2 * int(round(size_px / 2.0)) + 1)


def _box_sum(img: torch.Tensor, k: int) -> torch.Tensor:
    """Sum over a ``k x k`` window (zero outside), separably: O(k) per pixel, not O(k^2)."""
    out = F.avg_pool2d(img, (1, k), stride=1, padding=(0, k // 2), count_include_pad=True)
    return F.avg_pool2d(out, (k, 1), stride=1, padding=(k // 2, 0), count_include_pad=True) * float(k * k)


def _box_max(img: torch.Tensor, k: int) -> torch.Tensor:
    """Maximum over a ``k x k`` window, separably."""
    out = F.max_pool2d(img, (1, k), stride=1, padding=(0, k // 2))
    return F.max_pool2d(out, (k, 1), stride=1, padding=(k // 2, 0))


def _logistic(x: torch.Tensor, centre: float, width: float) -> torch.Tensor:
    return torch.sigmoid((x - centre) / width)


class IhcDabScorer(torch.nn.Module):
    """HER2 IHC tile scorer from DAB membrane staining (no weights; see the module docstring).

    Parameters
    ----------
    mpp_um
        Pixel size of the tiles it will see, µm/px; all micrometre sizes in ``thresholds`` are
        converted with it. Meant for 0.25-1.0.
    thresholds
        Cut-points; defaults to :class:`IhcThresholds()`.
    """

    class_names: tuple[str, ...] = CLASS_NAMES

    def __init__(self, *, mpp_um: float = 0.5, thresholds: IhcThresholds | None = None) -> None:
        super().__init__()
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
        log.debug(
            "IhcDabScorer at %.3g µm/px: nucleus %.1f px, rays %.1f-%.1f px, %d directions",
            mpp_um, t.nucleus_diameter_um / mpp_um, t.ray_start_um / mpp_um, t.ray_stop_um / mpp_um,
            t.n_directions,
        )

    def _brown_dab(self, od: torch.Tensor, hnd: torch.Tensor) -> torch.Tensor:
        """DAB OD that is brown, not merely dark.

        Intensity comes from the Ruifrok-Johnston DAB channel at full resolution (the scale the
        cut-points are set on); its **hue** is checked on OD smoothed over ``chroma_sigma_um``:
        the share of that DAB which survives when a neutral (grey) vector joins the basis
        (:data:`wsi_her2.stain.od.RGB_FROM_HND`). Grey tissue keeps ~0 of it, DAB keeps all.
        Smoothing first because scanners store chroma at half resolution (JPEG 4:2:0): a 1 µm
        membrane's brown hue is spread over its neighbourhood while its darkness is not.
        """
        t = self.thresholds
        dab_hed = od_to_hed(od)[:, 2:3].clamp(min=0.0)
        sigma = t.chroma_sigma_um / self.mpp_um
        hed_s = _gaussian_blur(dab_hed, sigma)
        hnd_s = _gaussian_blur(hnd[:, 2:3].clamp(min=0.0), sigma)
        share = hnd_s / hed_s.clamp(min=t.chroma_min_od)
        brown = (share / t.brown_full_share).clamp(0.0, 1.0)
        return dab_hed * brown

    def _tumour_weight(self, seeds: torch.Tensor) -> torch.Tensor:
        """Per-pixel weight (read at seeds) of cohesive epithelium: neighbours in a square window."""
        t = self.thresholds
        k = _odd(t.cohesion_window_um / self.mpp_um)
        neighbours = _box_sum(seeds, k) - seeds
        # The one definition change since this copy was frozen: counts cut off by the tile edge
        # are scaled to the whole window (IhcDabScorer.edge_corrected_neighbours).
        neighbours = neighbours * (float(k * k) / _box_sum(torch.ones_like(seeds), k))
        return _logistic(neighbours, t.min_neighbours, t.neighbours_softness) * (
            1.0 - _logistic(neighbours, t.max_neighbours, 3.0 * t.neighbours_softness)
        )

    # ------------------------------------------------------------------ public
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` RGB in [0, 1] -> ``(B, 4)`` log-probabilities over ``CLASS_NAMES``."""
        return self._evidence(x)["logits"]

    @torch.no_grad()
    def measure(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-tile measurements (``MEASUREMENT_NAMES``, each ``(B,)`` float32) and ``probs``."""
        ev = self._evidence(x)
        out = {name: ev[name] for name in MEASUREMENT_NAMES}
        out["probs"] = ev["logits"].exp()
        return out

    # ----------------------------------------------------------------- internal
    def _evidence(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ConfigError(f"IhcDabScorer expects (B, 3, H, W) RGB tiles, got shape {tuple(x.shape)}.")
        # Log/OD arithmetic in float32 even inside a bf16 autocast region.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._evidence_f32(x.float())

    def _evidence_f32(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.thresholds
        mpp = self.mpp_um
        b, _, h, w = x.shape
        eps = 1e-6

        # 1. Optical density against this tile's glass, then stain unmixing.
        i0 = estimate_background(
            x, quantile=t.background_quantile, min_intensity=t.background_min_intensity,
            max_cast=t.background_max_cast,
        )
        od = rgb_to_od(x, i0).clamp(min=0.0)  # brighter than glass is glass
        hnd = od_to_hnd(od)  # grey absorbance goes to its own channel, not to DAB
        hema = hnd[:, 0:1].clamp(min=0.0)
        neutral = hnd[:, 1:2].clamp(min=0.0)
        dab = self._brown_dab(od, hnd) * t.dab_gain

        # 2. Tissue.
        tissue = (od.sum(dim=1, keepdim=True) > t.tissue_od_sum).float()
        n_tissue = tissue.sum(dim=(1, 2, 3))
        tissue_fraction = n_tissue / float(h * w)
        denom_tissue = n_tissue.clamp(min=1.0)
        hema_mean = (hema * tissue).sum(dim=(1, 2, 3)) / denom_tissue
        neutral_mean = (neutral * tissue).sum(dim=(1, 2, 3)) / denom_tissue
        dab_mean = (dab * tissue).sum(dim=(1, 2, 3)) / denom_tissue
        stained_fraction = ((dab > t.dab_faint_od).float() * tissue).sum(dim=(1, 2, 3)) / denom_tissue

        # 3. Nuclei: hematoxylin blobs at the nucleus scale (DoG ~ LoG with sigma = r / sqrt 2).
        # Nuclei absorb as hematoxylin and, in real scans, partly as grey: blobs of the
        # non-DAB absorbance (a smooth grey stroma makes no blob, the DoG contrast rejects it).
        nuclear = hema + neutral
        sigma1 = t.nucleus_diameter_um / (2.0 * math.sqrt(2.0)) / mpp
        h1 = _gaussian_blur(nuclear, sigma1)
        dog = h1 - _gaussian_blur(nuclear, 1.6 * sigma1)
        win = max(3, 2 * int(round(t.seed_min_distance_um / mpp / 2.0)) + 1)
        is_max = dog >= F.max_pool2d(dog, win, stride=1, padding=win // 2)
        seeds = (is_max & (dog > t.dog_contrast_min) & (h1 > t.hema_od_min)).float()
        n_cells = seeds.sum(dim=(1, 2, 3))
        tumour = seeds * self._tumour_weight(seeds)  # each nucleus weighted by epithelial cohesion
        n_tumour = tumour.sum(dim=(1, 2, 3))
        tumour_area_frac = (_box_max(tumour, _odd(2 * t.cell_radius_um / mpp)) > 0.5).float().mean(dim=(1, 2, 3))

        # 4. Membrane rays: running max of shifted DAB maps along each direction.
        dab_s = _gaussian_blur(dab, t.dab_smooth_sigma_um / mpp)
        pad = min(self._reach_px, h - 1, w - 1)
        padded = F.pad(dab_s, (pad, pad, pad, pad), mode="reflect")
        hit_sum = torch.zeros_like(dab_s)
        od_hit_sum = torch.zeros_like(dab_s)
        log_faint = math.log(t.dab_faint_od)
        for ray in self._rays:
            ray_max = torch.zeros_like(dab_s)
            for dy, dx in ray:
                dy = max(-pad, min(pad, dy))
                dx = max(-pad, min(pad, dx))
                shifted = padded[:, :, pad + dy: pad + dy + h, pad + dx: pad + dx + w]
                ray_max = torch.maximum(ray_max, shifted)
            hit = _logistic(torch.log(ray_max + eps), log_faint, t.od_log_softness)
            hit_sum = hit_sum + hit
            od_hit_sum = od_hit_sum + hit * ray_max
        completeness_map = hit_sum / float(len(self._rays))
        intensity_map = od_hit_sum / (hit_sum + eps)

        # 5. Soft per-cell memberships (evaluated densely, read at the seeds).
        log_i = torch.log(intensity_map + eps)
        p_complete = _logistic(completeness_map, t.complete_fraction, t.completeness_softness)
        p_partial = _logistic(completeness_map, t.partial_min_fraction, t.completeness_softness)
        p_any = p_partial * _logistic(log_i, log_faint, t.od_log_softness)
        p_ge2 = p_complete * _logistic(log_i, math.log(t.dab_weak_od), t.od_log_softness)
        p_3 = p_complete * _logistic(log_i, math.log(t.dab_strong_od), t.od_log_softness)
        p_ge1 = torch.maximum(p_any, p_ge2)

        def per_cell(m: torch.Tensor) -> torch.Tensor:  # mean over tumour cells
            return (m * tumour).sum(dim=(1, 2, 3)) / n_tumour.clamp(min=eps)

        f1, f2, f3 = per_cell(p_ge1), per_cell(p_ge2), per_cell(p_3)
        dab_membrane = per_cell(intensity_map)
        stained_w = (p_ge1 * tumour).sum(dim=(1, 2, 3))
        completeness = (completeness_map * p_ge1 * tumour).sum(dim=(1, 2, 3)) / stained_w.clamp(min=eps)
        completeness = torch.where(stained_w > eps, completeness, torch.zeros_like(completeness))

        # 6. ASCO/CAP decision list with soft 10 % edges, then reliability towards the prior.
        s3 = _logistic(f3, t.cell_fraction_cut, t.fraction_softness)
        s2 = _logistic(f2, t.cell_fraction_cut, t.fraction_softness)
        s1 = _logistic(f1, t.cell_fraction_cut, t.fraction_softness)
        rule = torch.stack(
            [(1 - s3) * (1 - s2) * (1 - s1), (1 - s3) * (1 - s2) * s1, (1 - s3) * s2, s3], dim=1
        )
        reliability = _logistic(n_tumour, t.min_cells, t.cells_softness) * _logistic(
            tissue_fraction, t.min_tissue_fraction, t.tissue_softness
        )
        prior = torch.tensor(t.prior, dtype=torch.float32, device=x.device).unsqueeze(0)
        probs = reliability.unsqueeze(1) * rule + (1 - reliability.unsqueeze(1)) * prior
        logits = torch.log(probs.clamp(min=1e-8))

        return {
            "logits": logits,
            "tissue_fraction": tissue_fraction,
            "hematoxylin_od_mean": hema_mean,
            "dab_od_mean": dab_mean,
            "stained_fraction": stained_fraction,
            "cell_count": n_cells,
            "cell_density_per_mm2": n_cells / (h * w * mpp * mpp * 1e-6),
            "tumour_cell_count": n_tumour,
            "tumour_area_mm2": tumour_area_frac * (h * w * mpp * mpp * 1e-6),
            "neutral_od_mean": neutral_mean,
            "dab_od_membrane": dab_membrane,
            "completeness": completeness,
            "frac_cells_1plus_or_more": f1,
            "frac_cells_2plus_or_more": f2,
            "frac_cells_3plus": f3,
            "her2_index": f1 + f2 + f3,
            "reliability": reliability,
        }
