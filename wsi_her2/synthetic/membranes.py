"""Cells with membranes of known DAB optical density, imaged through a scanner-like chain.

The ground truth of the scorer's intensity grades needs no pathologist: a membrane rendered
at a stated chromogen OD *is* faint, weak-moderate or intense by definition (the grade bands of
:class:`wsi_her2.models.ihc_thresholds.IhcThresholds`). What makes it hard to measure is the
chain between the section and the stored pixels, so that chain is rendered physically:

1. **The section**, on a fine grid (``supersample`` x finer than the scan): round cells on a
   jittered hexagonal lattice, each with a nucleus (hematoxylin), pale cytoplasm and its own
   membrane: a band ``width_um`` wide (default 1 µm: two apposed plasma membranes and the DAB
   precipitate on them, as a thin HER2 membrane looks at 40x) of DAB OD ``membrane_od`` on the
   arcs its ``pattern`` stains (``complete``; ``basolateral``: all but the apical third, a U;
   ``lateral``: two opposite quarter-arcs; ``partial``: two short arcs; ``none``). Cells are
   ``pitch_um`` apart with clear gaps, so a cell's rays meet its own membrane only.
2. **Light**: Beer-Lambert per channel with the Ruifrok-Johnston vectors, ``I = glass * 10**-OD``.
3. **Optics**: blur *in light* by the point-spread function of a ``na`` objective (Airy disc
   approximated by a Gaussian of the same FWHM, 0.51 λ / NA), then the sensor's pixels (area
   mean of ``supersample`` x ``supersample`` fine pixels), camera noise, 8-bit quantisation.
4. **Storage**: JPEG at ``jpeg_quality`` with 4:2:0 chroma subsampling, as most scanners store.

:func:`render_membrane_field` returns the scan and the cells' centres; ``wsi-her2 tile`` then
presents it at 0.5 or 1.0 µm/px by area averaging, exactly as for a real slide.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from wsi_her2.errors import ConfigError
from wsi_her2.synthetic.cores import jpeg_roundtrip
from wsi_her2.synthetic.textures import RGB_FROM_HED

__all__ = ["MEMBRANE_PATTERNS", "MembraneField", "render_membrane_field", "pattern_mask"]

#: Patterns a cell's membrane can be rendered with (angles from the cell's apical direction).
MEMBRANE_PATTERNS = ("complete", "basolateral", "lateral", "partial", "none")
#: Wavelength the point-spread function is computed at (green, where the eye and DAB's absorption peak), µm.
_WAVELENGTH_UM = 0.55
#: Rows of fine pixels rendered at once (bounds the memory of a large field).
_STRIP_ROWS = 512


@dataclass(frozen=True)
class MembraneField:
    """A rendered field: the scan (``rgb``, uint8, at ``mpp_um``), its cells' centres in scan px and
    which of them carry the membrane pattern."""

    rgb: NDArray[np.uint8]
    mpp_um: float
    centres_px: NDArray[np.float64]
    membrane_od: float
    pattern: str
    stained: NDArray[np.bool_]


def pattern_mask(theta: NDArray, pattern: str, phase: NDArray | float = 0.0) -> NDArray[np.bool_]:
    """Where a membrane of ``pattern`` is stained, by angle ``theta`` (radians) from the apical direction.

    ``basolateral``: everything but the apical 120° (a U, 2/3 of the ring); ``lateral``: the two
    90° arcs at right angles to the apical direction (1/2); ``partial``: two 60° arcs at a random
    ``phase`` (1/3, the broken ring of 1+); ``complete``: all of it.
    """
    a = np.abs(np.angle(np.exp(1j * theta)))  # 0 (apical) .. pi (basal)
    if pattern == "complete":
        return np.ones(np.shape(theta), bool)
    if pattern == "none":
        return np.zeros(np.shape(theta), bool)
    if pattern == "basolateral":
        return a > math.radians(60)
    if pattern == "lateral":
        return np.abs(a - math.pi / 2) < math.radians(45)
    if pattern == "partial":
        b = np.mod(theta - phase, math.pi)  # two arcs, opposite each other
        return b < math.radians(60)
    raise ConfigError(f"unknown membrane pattern {pattern!r}; choose one of {', '.join(MEMBRANE_PATTERNS)}")


def _gland_centres(field_um: tuple[float, float], cell_radius_um: float, rng: np.random.Generator,
                   *, lumen_um: float = 6.0, stroma_um: float = 4.0, gap_um: float = 2.0) -> tuple[NDArray, NDArray]:
    """Cells lining lumens, µm (x, y), and each one's apical direction (radians, from +x, y up).

    Pairs of cell rows face each other across a lumen ``lumen_um`` wide (apical sides inwards), pairs
    ``stroma_um`` apart (basal sides outwards), cells ``gap_um`` apart along a row: no other
    membrane lies within a ray's reach of a cell's apical side, as in a gland.
    """
    d = 2 * cell_radius_um
    period = 2 * d + lumen_um + stroma_um
    pts, apical = [], []
    for j in range(int(field_um[1] / period) + 2):
        for k, (dy, up) in enumerate(((cell_radius_um, -1), (d + lumen_um + cell_radius_um, 1))):
            y = j * period + dy
            shift = (d + gap_um) / 2 * k
            for i in range(int(field_um[0] / (d + gap_um)) + 2):
                pts.append((i * (d + gap_um) + shift, y))
                apical.append(-math.pi / 2 if up < 0 else math.pi / 2)  # the upper row faces down, the lower up
    pts = np.asarray(pts, np.float64) + rng.uniform(-0.3, 0.3, (len(pts), 2))
    return pts, np.asarray(apical, np.float64)


def _centres(field_um: tuple[float, float], pitch_um: float, rng: np.random.Generator) -> NDArray[np.float64]:
    """Jittered hexagonal lattice over the field, µm (x, y)."""
    w, h = field_um
    row_um = pitch_um * math.sqrt(3) / 2
    pts = []
    for j in range(int(h / row_um) + 2):
        shift = 0.5 * pitch_um if j % 2 else 0.0
        for i in range(int(w / pitch_um) + 2):
            pts.append((i * pitch_um + shift, j * row_um))
    pts = np.asarray(pts, np.float64) + rng.uniform(-0.08, 0.08, (len(pts), 2)) * pitch_um
    return pts[(pts[:, 0] >= -pitch_um) & (pts[:, 0] <= w + pitch_um) & (pts[:, 1] >= -pitch_um) & (pts[:, 1] <= h + pitch_um)]


def _od_strip(y0: int, rows: int, width: int, fine_um: float, centres: NDArray, phases: NDArray, stained: NDArray,
              apical: NDArray, *, membrane_od: float,
              pattern: str, width_um: float, cell_radius_um: float, nucleus_um: float, hema_nucleus_od: float,
              hema_cytoplasm_od: float, gap_od: float) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Hematoxylin and DAB OD of fine rows ``y0 .. y0 + rows`` (nearest cell owns each pixel).

    Each cell is painted in its own box: beyond ``reach_um`` of a centre every term below is 0
    (the pixel is gap), so the nearest centre among the boxes covering a pixel is its nearest
    centre overall, and the field equals a nearest-centre search over every fine pixel (3-4x
    slower) value for value.
    """
    aa = fine_um  # anti-aliased edges on the fine grid: coverage of a fine pixel by each disc / band
    reach_um = max(cell_radius_um + width_um / 2, nucleus_um / 2) + aa
    reach_px = int(math.ceil(reach_um / fine_um)) + 1
    best_r = np.full((rows, width), np.inf)
    cell, nucleus, band = (np.zeros((rows, width)) for _ in range(3))
    for k in np.flatnonzero((centres[:, 1] > (y0 * fine_um - reach_um)) & (centres[:, 1] < ((y0 + rows) * fine_um + reach_um))):
        cx, cy = centres[k]
        i0, i1 = max(0, int(cy / fine_um) - reach_px - y0), min(rows, int(cy / fine_um) + reach_px + 1 - y0)
        j0, j1 = max(0, int(cx / fine_um) - reach_px), min(width, int(cx / fine_um) + reach_px + 1)
        if i0 >= i1 or j0 >= j1:
            continue
        ys = (np.arange(y0 + i0, y0 + i1) + 0.5) * fine_um
        xs = (np.arange(j0, j1) + 0.5) * fine_um
        dx, dy = xs[None, :] - cx, ys[:, None] - cy
        r = np.hypot(dx, dy)
        own = r < best_r[i0:i1, j0:j1]
        if not own.any():
            continue
        best_r[i0:i1, j0:j1][own] = r[own]
        cell[i0:i1, j0:j1][own] = np.clip((cell_radius_um + width_um / 2 - r[own]) / aa + 0.5, 0, 1)
        nucleus[i0:i1, j0:j1][own] = np.clip((nucleus_um / 2 - r[own]) / aa + 0.5, 0, 1)
        ring = np.clip((width_um / 2 - np.abs(r[own] - cell_radius_um)) / aa + 0.5, 0, 1)
        theta = np.arctan2(-np.broadcast_to(dy, r.shape)[own], np.broadcast_to(dx, r.shape)[own]) - apical[k]  # from apical, y up
        band[i0:i1, j0:j1][own] = ring * pattern_mask(theta, pattern, phases[k]) * stained[k]
    hema = (gap_od + (hema_cytoplasm_od - gap_od) * cell + (hema_nucleus_od - hema_cytoplasm_od) * nucleus).astype(np.float32)
    dab = (membrane_od * band).astype(np.float32)
    return hema, dab


def render_membrane_field(
    *, membrane_od: float, pattern: str = "complete", width_um: float = 1.0, field_um: tuple[float, float] = (448.0, 448.0),
    mpp_um: float = 0.25, supersample: int = 4, na: float = 0.75, jpeg_quality: int = 85, pitch_um: float = 16.0,
    cell_radius_um: float = 6.0, nucleus_um: float = 7.0, hema_nucleus_od: float = 0.35, hema_cytoplasm_od: float = 0.05,
    gap_od: float = 0.03, glass_rgb: tuple[float, float, float] = (240.0, 240.5, 242.0), noise_sd: float = 1.0,
    seed: int = 0, stained: Callable[[NDArray[np.float64]], NDArray[np.bool_]] | None = None, layout: str = "lattice",
) -> MembraneField:
    """Render cells whose membranes have DAB OD ``membrane_od`` and scan them (see the module docstring).

    ``stained``: which cells carry the pattern, from their centres in µm (``(n, 2)`` x, y); the
    others have no membrane staining (default: every cell). E.g. a cluster of a few stained cells.
    ``layout``: ``lattice`` (a sheet, apical sides up) or ``glands`` (rows lining lumens, apical
    sides facing the lumen: what basolateral and lateral patterns look like in gastric glands).
    """
    if pattern not in MEMBRANE_PATTERNS:
        raise ConfigError(f"unknown membrane pattern {pattern!r}; choose one of {', '.join(MEMBRANE_PATTERNS)}")
    if not (0.0 <= membrane_od <= 3.0 and 0.1 <= width_um <= 5.0 and supersample >= 1 and 0.1 <= na <= 1.4):
        raise ConfigError("render_membrane_field: membrane_od 0-3, width_um 0.1-5, supersample >= 1, na 0.1-1.4")
    rng = np.random.default_rng(seed)
    fine_um = mpp_um / supersample
    out_w, out_h = int(round(field_um[0] / mpp_um)), int(round(field_um[1] / mpp_um))
    fw, fh = out_w * supersample, out_h * supersample
    if layout == "glands":
        centres, apical = _gland_centres(field_um, cell_radius_um, rng)
    elif layout == "lattice":
        centres = _centres(field_um, pitch_um, rng)
        apical = np.full(len(centres), math.pi / 2)  # up
    else:
        raise ConfigError(f"unknown layout {layout!r}; choose lattice or glands")
    phases = rng.uniform(0, math.pi, len(centres))
    stained_cells = np.ones(len(centres), bool) if stained is None else np.asarray(stained(centres), bool)
    sigma_fine = 0.51 * _WAVELENGTH_UM / na / 2.3548 / fine_um  # Airy FWHM -> Gaussian sigma, fine px
    margin = int(math.ceil(4 * sigma_fine))
    vectors = RGB_FROM_HED.astype(np.float32)
    scan = np.empty((out_h, out_w, 3), np.float32)
    rows_out = max(1, _STRIP_ROWS // supersample)
    for oy in range(0, out_h, rows_out):
        n_out = min(rows_out, out_h - oy)
        y0 = max(0, oy * supersample - margin)
        y1 = min(fh, (oy + n_out) * supersample + margin)
        hema, dab = _od_strip(y0, y1 - y0, fw, fine_um, centres, phases, stained_cells, apical, membrane_od=membrane_od,
                              pattern=pattern,
                              width_um=width_um, cell_radius_um=cell_radius_um, nucleus_um=nucleus_um,
                              hema_nucleus_od=hema_nucleus_od, hema_cytoplasm_od=hema_cytoplasm_od, gap_od=gap_od)
        for c in range(3):
            light = np.float32(glass_rgb[c]) * np.power(np.float32(10.0), -(hema * vectors[0, c] + dab * vectors[2, c]))
            light = cv2.GaussianBlur(light, (0, 0), sigma_fine, borderType=cv2.BORDER_REFLECT_101)
            top = oy * supersample - y0
            block = light[top: top + n_out * supersample]
            scan[oy: oy + n_out, :, c] = block.reshape(n_out, supersample, out_w, supersample).mean(axis=(1, 3))
    scan += rng.normal(0.0, noise_sd, scan.shape).astype(np.float32)
    rgb = np.clip(np.rint(scan), 0, 255).astype(np.uint8)
    if jpeg_quality < 100:
        rgb = jpeg_roundtrip(rgb, quality=jpeg_quality)
    inside = (centres[:, 0] >= 0) & (centres[:, 0] < field_um[0]) & (centres[:, 1] >= 0) & (centres[:, 1] < field_um[1])
    return MembraneField(rgb=rgb, mpp_um=mpp_um, centres_px=centres[inside] / mpp_um, membrane_od=float(membrane_od),
                         pattern=pattern, stained=stained_cells[inside])
