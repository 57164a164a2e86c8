"""The cut-points of the rule-based HER2 IHC scorer (:class:`wsi_her2.models.ihc_score.IhcDabScorer`),
each with its reason: stain physics, cytology and the ASCO/CAP wording, not fitted to images."""
from __future__ import annotations

from dataclasses import dataclass

from wsi_her2.errors import ConfigError

#: Local maxima of the DoG are found on it rounded to 2**-20 OD (~1e-6): a plateau whose two
#: highest pixels differ by float rounding only is then a tie in both kernels (both pixels are
#: maxima), not one maximum in one kernel and the other in the other. Scaling by a power of two
#: is exact, and both round half to even.
DOG_QUANTUM_INV = 2.0 ** 20


def counterstain_rank(n: int, quantile: float) -> int:
    """1-based rank of the ``quantile`` order statistic of ``n`` values (both kernels' counterstain level)."""
    return min(n, max(1, int(round(quantile * n))))


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
      DAB (12 of 16: the soft cut sits half a ray below, so 12 pass and 11 fail). Real rings show gaps where a neighbour's nucleus or tangential section interrupts
      them; 12 of 16 rays tolerates that and still excludes half-rings (basolateral, U-shaped
      patterns hit ~40-60 %).
    - ``partial_min_fraction = 0.20``: at least ~3 of 16 rays must hit before a cell counts as
      having (incomplete) membrane staining, so an isolated DAB speck does not.
    - ``completeness_softness = 0.06``: logistic width in ray-fraction units (about one ray of 16).

    Percentage rule (ASCO/CAP 2018, breast): a grade applies when ">10 % of tumour cells" show
    its pattern: ``cell_fraction_cut = 0.10``; ``fraction_softness = 0.025`` makes 5 % -> 0.12
    and 20 % -> 0.98 membership. This cut makes each *tile's* call (its probabilities, the heatmap,
    ``--agg vote``/``mean``); the slide's, a core's and a region's call with ``--agg asco`` applies
    the guideline's own cut (:attr:`wsi_her2.criteria.Criteria.cell_fraction_cut`, "> " or ">=")
    to the pooled tumour cells, or a lab calibration's cut in place of both.

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

    Membrane intensity is read in light, not OD (:mod:`wsi_her2.stain.membrane`: a pixel that
    covers a 1 µm band and the cytoplasm beside it records their mean light, so OD-domain reading
    under-reads intense membranes by 2x at 0.5 µm/px and 5x at 1.0 µm/px):

    - ``membrane_blur_um = 0.9``: the total Gaussian blur (optics, tile pixel, the scorer's own
      smoothing) at which every membrane is read, the same at every pixel size; wide enough to
      sample the peak at 1 µm/px (within ~5 %) and to average JPEG noise, narrow enough that the
      membrane (6-8 µm from the nucleus) and the cytoplasm the ray starts in (3 µm) stay apart.
    - ``membrane_width_um = 1.0``: the reference band: a thin HER2 membrane at 40x (two apposed
      plasma membranes and their DAB precipitate). A band of this width reads its own OD. The
      width is the mean width of 2+ DAB precipitates measured by Scheel et al. (Diagn Pathol
      2018;13:19: 1+ 0.64 µm, 2+ 1.0 µm, 3+ 2.1 µm, the physical basis of Rüschoff's
      magnification rule), so a thin faint 1+ band reads faint and a 2 µm 3+ band intense.
    - ``optics_blur_um = 0.16``: the scanner's point-spread function (Airy FWHM 0.51 λ / NA at
      λ 0.55 µm, NA 0.75, as a Gaussian), part of the total blur above.
    - ``membrane_od_cap = 2.0``: light loss at or beyond the reference band's response (a thick
      or black band) reads as this OD (99 % absorbed), far above the intense cut.

    Nuclei and tissue:

    - **Counterstain OD** (the nuclear channel): the absorbance orthogonal to the DAB vector,
      read along the hematoxylin-neutral direction and scaled so that hematoxylin reads its own
      OD (:data:`wsi_her2.models.ihc_score.COUNTERSTAIN_FROM_RGB`; grey reads ~0.6 of its OD,
      Ruifrok DAB 0). Real brown is often yellower than the Ruifrok DAB vector; unmixed with a
      neutral vector, its excess went to the neutral channel, and brown cytoplasm read darker
      than the nuclei inside it (4x the nuclei counted by eye on a pale 1+ patch). Any hue of
      brown between Ruifrok's and grey now reads at most a fraction of its OD, and JPEG noise is
      amplified 1.7x instead of the 3.8x of the hematoxylin + neutral sum.
    - **Thresholds relative to the tile's counterstain**: by Beer-Lambert a paler counterstain
      (less hematoxylin, a shorter bath, a thinner section) scales every nucleus's OD and its
      contrast by the same factor, so a nucleus is a blob whose contrast is a fixed share of the
      tile's own counterstain level: the ``counterstain_quantile = 0.99`` quantile of the
      nucleus-scale smoothed counterstain OD over the tile (the darkest ~1 % of it: nuclei in any
      tile that holds some). ``nuclear_contrast_rel = 0.10``: a nucleus stands out from its ~10 µm
      surroundings (difference of Gaussians) by 10 % of that level; ``nuclear_od_rel = 0.30``: its
      smoothed OD reaches 30 % of it (a blob of counterstain, not a crease in pale cytoplasm). At
      a normal HER2-kit counterstain (level ~0.12) these are the fixed cut-points used before
      (contrast 0.012, OD ~0.04); on the palest real tiles (level ~0.05-0.07) they fall to a
      half, where the fixed ones missed half the nuclei of vesicular carcinoma (18 of 34 counted
      by eye). Floors keep glass, fat and smooth stroma free of invented nuclei where the level
      is noise: ``nuclear_contrast_min = 0.007`` and ``nuclear_od_min = 0.025``, ~10x and ~40x the
      JPEG/camera noise left after the nucleus-scale smoothing (< 0.0007 OD measured on glass and fat).
      Measured: nuclei found / counted by eye on 12 dev crops 0.73-1.54 (median 0.97; before
      0.54-4.08); fat, stroma and glass patches gain none; synthetic fibrous stroma and muscle
      give their planted nuclei (+5-12 %, as before). Limit: tissue with a granular counterstain
      and no nuclei in it (a synthetic cytoplasm of OD 0.07 with +-25 % granules of 1.5 µm) shows
      blobs as contrasty, at the nucleus scale, as real pale nuclei, and some are counted.
    - ``tissue_od_sum = 0.08``: summed RGB OD. After background correction glass and fat read
      <= ~0.04 in 90 % of pixels even in JPEG-compressed scans; a pale HER2-kit counterstain
      alone (cytoplasm hematoxylin OD ~0.07) sums to ~0.11. Pixels below count as glass/fat.

    Background (glass) estimate (see :func:`wsi_her2.stain.od.estimate_background`):
    ``background_quantile = 0.99``, ``background_min_intensity = 0.65`` (real scanners render
    glass as dark as ~0.68; below 0.65 the "background" must be tissue), ``background_max_cast
    = 0.06``: a tile's glass may be tinted by at most 6 % against the slide's glass colour
    (grey when unknown; the score stage passes the colour the tile stage measured on the slide's
    glass, so lavender or yellowish glass is not read as a cast, and a yellow cast never as DAB).

    Implausibly few nuclei (``nuclear_density_low``, a per-tile measurement in [0, 1]): a tile
    whose tissue (summed OD above ``tissue_od_sum``) covers at least ``cellular_tissue_fraction
    = 0.4`` of it (more than a rim or a few strands: tissue that absorbs light, so neither fat nor
    glass), yet holds fewer than ``min_nuclei_per_mm2 = 500`` nuclei found per mm² of that tissue
    (logistic edges: ``tissue_softness``, 20 % of the density cut). Carcinoma holds 3,000-8,000
    nuclei per mm² of epithelium (cells 12-20 µm across), inflamed stroma and lymphoid tissue
    3,000-5,000, smooth muscle ~2,800 (one nucleus per ~360 µm²), fibrous stroma ~1,000, and even
    paucicellular collagen ~550 (counted by eye on a dev patch, ``qc/nuclei_counts.csv``; the
    palest real tissue tiles measure 650-850 found). Below 500 the tissue is either acellular
    (mucin, necrosis, hyalinised collagen) or its nuclei are being missed (a counterstain too faint
    to see, hematoxylin masked by intense DAB): either way its tumour-cell count is not to be
    trusted, and the tile is reported instead of silently under-counted. The real failure this
    catches: a faint 1+ core of glands that gave 641 nuclei in ~1.5 mm² (~430 per mm²).

    Tumour, not everything (ASCO/CAP percentages are over invasive tumour cells): each nucleus
    is weighted by how much it looks like tumour epithelium. The epithelium detector
    (``IhcDabScorer(tumour_model="epithelium")``, :mod:`wsi_her2.models.epithelium`) is a small
    model trained on the counterstain morphology of the dev patches (``qc/train_epithelium.py``);
    it has no cut-points here. The cohesion rule (``tumour_model="cohesion"``) weights a nucleus
    by how much it looks like part of a cohesive epithelial sheet, counted as the
    other nuclei in a ``cohesion_window_um = 40`` µm square around it. Carcinoma cells are
    12-20 µm across, so such a square holds 5-14 of them (4-13 neighbours); fibroblasts, smooth
    muscle and fat in stroma leave 0-3. The weight is a logistic in the neighbour count,
    centred on ``min_neighbours = 4`` (``neighbours_softness = 1``), times one falling at
    ``max_neighbours = 24``: cells over ~8 µm cannot pack more densely, so denser blobs are
    lymphocyte aggregates. Where the tile edge cuts the window, the count inside the tile is
    scaled up to the whole window (:meth:`IhcDabScorer.edge_corrected_counts`), so the weight
    does not depend on the tile size. ``cell_radius_um = 8`` turns tumour nuclei into tumour area. Limits:
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

    Low-information tiles: ``min_cells = 8`` graded tumour cells (fewer and one cell moves the percentage
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
    membrane_blur_um: float = 0.9
    membrane_width_um: float = 1.0
    optics_blur_um: float = 0.16
    membrane_od_cap: float = 2.0
    nuclear_od_min: float = 0.025
    nuclear_contrast_min: float = 0.007
    nuclear_od_rel: float = 0.30
    nuclear_contrast_rel: float = 0.10
    counterstain_quantile: float = 0.99
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
    cellular_tissue_fraction: float = 0.4
    min_nuclei_per_mm2: float = 500.0
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
