"""Synthetic Aperio-like whole-slide images with planted regions of known ground truth.

The slide is a pyramidal tiled-JPEG TIFF (``.svs``) that both openslide and tiffslide open
with the same levels, dimensions and MPP. Its content is procedural: empty glass everywhere,
rectangular regions of H&E or HER2 IHC tissue of a given grade (optionally out of focus),
marker-pen strokes and a few specks of dust on the glass. :func:`render_region` returns the
exact pixels that were handed to the JPEG encoder, so the ground truth of any tile is known.

Rendering is nearly free: tissue and glass are precomputed periodic textures
(:mod:`wsi_her2.synthetic.textures`, Beer-Lambert mixing of the Ruifrok-Johnston H, E and DAB
vectors, base-10 optical density) indexed by absolute coordinates, so any window of any slide
renders identically whether asked for whole or tile by tile. Large slides are written tile
by tile through tifffile's tile iterator; memory stays bounded by a few textures.

Pyramid level ``d`` is defined exactly as the box mean (rounded half up) of the level-0
pixels in each ``d`` x ``d`` block; level dimensions are ``width_px // d`` by
``height_px // d``.

Command line::

    python -m wsi_her2.synthetic OUT.svs --preset demo|graded|bench [--width W --height H --no-mpp]
"""
from __future__ import annotations

import argparse
import functools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from wsi_her2.synthetic import textures as tx
from wsi_her2.errors import ConfigError
from wsi_her2.synthetic.svs_writer import (
    APERIO_HEADER,  # noqa: F401  (re-exported: part of this module's namespace before)
    aperio_description_text,
    pyramid_downsamples_for,
    write_aperio_pyramid,
)
from wsi_her2.synthetic.textures import GRADE_COMPLETENESS, GRADE_DAB_OD, PERIOD_PX

__all__ = [
    "GRADE_DAB_OD",
    "GRADE_COMPLETENESS",
    "DEMO_PLANTED_SCORE",
    "Region",
    "SyntheticSlideSpec",
    "render_region",
    "level_downsamples",
    "write_synthetic_slide",
    "demo_spec",
    "graded_ihc_spec",
    "bench_spec",
]

logger = logging.getLogger(__name__)

REGION_KINDS = ("he", "ihc", "pen", "glass")
#: Marker inks as base-10 OD per RGB channel: saturated colours no stain mixture produces.
INK_OD: dict[str, tuple[float, float, float]] = {
    "green": (1.15, 0.32, 0.95),
    "blue": (1.05, 0.6, 0.12),
}
PEN_WIDTH_UM = 75.0
DUST_DIAMETER_UM = (3.0, 12.0)  # always below the 15 µm that tissue detection must ignore
#: ASCO/CAP call planted in :func:`demo_spec` (2+: weak-to-moderate complete staining in
#: well over 10 % of tumour cells, no 3+ cells).
DEMO_PLANTED_SCORE = 2
#: Texture offsets are multiples of this, so every power-of-two downsample up to it is exact.
_OFFSET_QUANTUM_PX = 64
#: Thumbnail page (required by the SVS page layout) longest side, px.
_THUMBNAIL_MAX_PX = 1024


@dataclass(frozen=True)
class Region:
    """A planted rectangle in level-0 pixels.

    ``kind`` is ``"he"`` or ``"ihc"`` (tissue; ``grade`` 0..3 for IHC), ``"glass"`` (clears
    tissue painted by earlier regions) or ``"pen"`` (a marker stroke across the rectangle, in
    ``ink`` colour, on top of everything). Later tissue regions paint over earlier ones.
    ``blur_sigma_px > 0`` renders the tissue out of focus (Gaussian sigma, level-0 px).
    """

    kind: str
    x_px: int
    y_px: int
    w_px: int
    h_px: int
    grade: int | None = None
    blur_sigma_px: float = 0.0
    ink: str = "green"

    def __post_init__(self) -> None:
        if self.kind not in REGION_KINDS:
            raise ConfigError(f"region kind {self.kind!r} is unknown; use one of {REGION_KINDS}")
        if self.w_px <= 0 or self.h_px <= 0:
            raise ConfigError(f"region {self} has an empty rectangle; give w_px, h_px > 0")
        if self.kind == "ihc" and self.grade not in (0, 1, 2, 3):
            raise ConfigError(f"IHC region needs grade 0, 1, 2 or 3, got {self.grade!r}")
        if self.blur_sigma_px < 0:
            raise ConfigError(f"blur_sigma_px must be >= 0, got {self.blur_sigma_px}")
        if self.kind == "pen" and self.ink not in INK_OD:
            raise ConfigError(f"pen ink {self.ink!r} is unknown; use one of {tuple(INK_OD)}")

    @property
    def area_px(self) -> int:
        return self.w_px * self.h_px

    def contains(self, x_px: float, y_px: float) -> bool:
        """Whether a level-0 point lies inside the rectangle."""
        return self.x_px <= x_px < self.x_px + self.w_px and self.y_px <= y_px < self.y_px + self.h_px


@dataclass(frozen=True)
class SyntheticSlideSpec:
    """Everything that determines a synthetic slide (same spec -> same file bytes)."""

    width_px: int
    height_px: int
    mpp_um: float = 0.5
    regions: tuple[Region, ...] = ()
    native_tile_px: int = 256
    jpeg_quality: int = 90
    pyramid_downsamples: tuple[int, ...] = (1, 4, 16)
    write_mpp: bool = True
    dust: bool = True
    seed: int = 0
    #: False: JPEG in YCbCr with 2x2 chroma subsampling (smaller, faster, the common case);
    #: True: RGB components without subsampling (as in many Aperio files; closer pixels).
    jpeg_rgb: bool = False

    def __post_init__(self) -> None:
        if self.width_px <= 0 or self.height_px <= 0:
            raise ConfigError(f"slide size {self.width_px}x{self.height_px} must be positive")
        if not 0.05 <= self.mpp_um <= 20:
            raise ConfigError(f"mpp_um={self.mpp_um} is outside 0.05-20 µm/px")
        if self.native_tile_px <= 0 or self.native_tile_px % 16:
            raise ConfigError(f"native_tile_px={self.native_tile_px} must be a positive multiple of 16")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality={self.jpeg_quality} must be within 1-100")
        ds = self.pyramid_downsamples
        if not ds or ds[0] != 1 or any(b <= a for a, b in zip(ds, ds[1:])):
            raise ConfigError(f"pyramid_downsamples={ds} must start at 1 and increase strictly")

    @property
    def tissue_regions(self) -> tuple[Region, ...]:
        return tuple(r for r in self.regions if r.kind in ("he", "ihc"))


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Layer:
    """A textured rectangle (tissue or glass) with its texture offset."""

    x0: int
    y0: int
    x1: int
    y1: int
    key: tuple
    off_x: int
    off_y: int


@dataclass(frozen=True)
class _Pen:
    x0: int
    y0: int
    x1: int
    y1: int
    horizontal: bool
    centre: float
    amplitude: float
    wavelength: float
    phase: float
    half_width_px: float
    ink_od: tuple[float, float, float]


@dataclass(frozen=True)
class _Speck:
    cx: float
    cy: float
    rx: float
    ry: float
    angle: float
    od: float

    @property
    def box(self) -> tuple[int, int, int, int]:
        r = max(self.rx, self.ry) + 2
        return (math.floor(self.cx - r), math.floor(self.cy - r),
                math.ceil(self.cx + r) + 1, math.ceil(self.cy + r) + 1)


@dataclass(frozen=True)
class _Plan:
    layers: tuple[_Layer, ...]
    pens: tuple[_Pen, ...]
    specks: tuple[_Speck, ...]


def _texture_key(region: Region) -> tuple:
    if region.kind == "glass":
        return ("glass",)
    blur = round(float(region.blur_sigma_px), 3)
    return ("ihc", int(region.grade), blur) if region.kind == "ihc" else ("he", None, blur)


@functools.lru_cache(maxsize=8)
def _plan(spec: SyntheticSlideSpec) -> _Plan:
    layers, pens = [], []
    for idx, region in enumerate(spec.regions):
        x0, y0 = region.x_px, region.y_px
        x1, y1 = x0 + region.w_px, y0 + region.h_px
        rng = np.random.default_rng([spec.seed, 900, idx])
        if region.kind == "pen":
            horizontal = region.w_px >= region.h_px
            length, across = (region.w_px, region.h_px) if horizontal else (region.h_px, region.w_px)
            half = min(PEN_WIDTH_UM / spec.mpp_um / 2, across / 2)
            pens.append(_Pen(
                x0, y0, x1, y1, horizontal,
                centre=(y0 + y1) / 2 if horizontal else (x0 + x1) / 2,
                amplitude=max(0.0, across / 2 - half - 2) * 0.8,
                wavelength=length * float(rng.uniform(0.8, 1.4)),
                phase=float(rng.uniform(0, 2 * np.pi)),
                half_width_px=half,
                ink_od=INK_OD[region.ink],
            ))
        else:
            quanta = PERIOD_PX // _OFFSET_QUANTUM_PX
            off = rng.integers(0, quanta, 2) * _OFFSET_QUANTUM_PX
            layers.append(_Layer(x0, y0, x1, y1, _texture_key(region), int(off[0]), int(off[1])))
    specks = _place_dust(spec) if spec.dust else ()
    return _Plan(tuple(layers), tuple(pens), specks)


def _place_dust(spec: SyntheticSlideSpec) -> tuple[_Speck, ...]:
    """A few dark specks on empty glass, at least 30 µm from any region and the border."""
    rng = np.random.default_rng([spec.seed, 950])
    area_mm2 = spec.width_px * spec.height_px * (spec.mpp_um / 1000) ** 2
    wanted = int(np.clip(round(area_mm2 * 0.15), 3, 40))
    margin = 30.0 / spec.mpp_um
    specks: list[_Speck] = []
    for _ in range(wanted * 30):
        if len(specks) == wanted:
            break
        cx = float(rng.uniform(margin, spec.width_px - margin)) if spec.width_px > 2 * margin else -1.0
        cy = float(rng.uniform(margin, spec.height_px - margin)) if spec.height_px > 2 * margin else -1.0
        diameter_px = float(rng.uniform(*DUST_DIAMETER_UM)) / spec.mpp_um
        aspect = float(rng.uniform(1.0, 1.6))
        angle, od = float(rng.uniform(0, np.pi)), float(rng.uniform(0.6, 1.3))
        if cx < 0 or cy < 0:
            continue
        if any(r.x_px - margin <= cx < r.x_px + r.w_px + margin
               and r.y_px - margin <= cy < r.y_px + r.h_px + margin for r in spec.regions):
            continue
        # the long axis stays below the stated diameter
        rx = diameter_px / 2
        specks.append(_Speck(cx, cy, rx, rx / aspect, angle, od))
    return tuple(specks)


# --------------------------------------------------------------------------- rendering


def _intersect(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def _apply_od(out: NDArray[np.uint8], od_rgb: NDArray[np.float64]) -> None:
    """Attenuate pixels in place by an additional optical density (Beer-Lambert overlay)."""
    light = out * np.power(np.float32(10.0), -od_rgb.astype(np.float32, copy=False))
    out[...] = np.clip(np.rint(light), 0, 255).astype(np.uint8)


def _draw_pen(out: NDArray[np.uint8], win: tuple[int, int, int, int], pen: _Pen, seed: int) -> None:
    box = _intersect(win, (pen.x0, pen.y0, pen.x1, pen.y1))
    if box is None:
        return
    bx0, by0, bx1, by1 = box
    xs = np.arange(bx0, bx1) + 0.5
    ys = np.arange(by0, by1) + 0.5
    # only the band the stroke can reach: keeps the float temporaries small
    reach = pen.amplitude + pen.half_width_px + 1
    if pen.horizontal:
        ys = ys[np.abs(ys - pen.centre) <= reach]
    else:
        xs = xs[np.abs(xs - pen.centre) <= reach]
    if xs.size == 0 or ys.size == 0:
        return
    bx0, by0 = int(xs[0]), int(ys[0])
    along, across = (xs, ys) if pen.horizontal else (ys, xs)
    start = pen.x0 if pen.horizontal else pen.y0
    k = 2 * np.pi / pen.wavelength
    centre = pen.centre + pen.amplitude * np.sin(k * (along - start) + pen.phase)
    slope = pen.amplitude * k * np.cos(k * (along - start) + pen.phase)
    if pen.horizontal:
        dist = np.abs(across[:, None] - centre[None, :]) / np.sqrt(1 + slope**2)[None, :]
    else:
        dist = np.abs(across[None, :] - centre[:, None]) / np.sqrt(1 + slope**2)[:, None]
    cover = np.clip(pen.half_width_px - dist + 0.5, 0.0, 1.0).astype(np.float32)
    rows, cols = np.nonzero(cover.any(axis=1))[0], np.nonzero(cover.any(axis=0))[0]
    if rows.size == 0:
        return
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    cover = cover[r0:r1, c0:c1]
    # marker ink is laid down unevenly: modulate its density with smooth periodic noise
    density = 0.88 + 0.1 * tx.wrap_window(tx.unit_noise(seed), bx0 + c0, by0 + r0, c1 - c0, r1 - r0)
    od = (cover * density)[..., None] * np.asarray(pen.ink_od, np.float32)
    sub = out[by0 - win[1] + r0: by0 - win[1] + r1, bx0 - win[0] + c0: bx0 - win[0] + c1]
    _apply_od(sub, od)


def _draw_speck(out: NDArray[np.uint8], win: tuple[int, int, int, int], speck: _Speck) -> None:
    box = _intersect(win, speck.box)
    if box is None:
        return
    bx0, by0, bx1, by1 = box
    dx = (np.arange(bx0, bx1) + 0.5 - speck.cx)[None, :]
    dy = (np.arange(by0, by1) + 0.5 - speck.cy)[:, None]
    c, s = math.cos(speck.angle), math.sin(speck.angle)
    u, v = dx * c + dy * s, -dx * s + dy * c
    d_ell = np.sqrt((u / speck.rx) ** 2 + (v / speck.ry) ** 2)
    cover = np.clip((1 - d_ell) * speck.ry + 0.5, 0.0, 1.0)
    od = cover[..., None] * (speck.od * np.array([1.0, 1.0, 0.9]))  # grey-brown grime
    _apply_od(out[by0 - win[1]: by1 - win[1], bx0 - win[0]: bx1 - win[0]], od)


def _render_level0(spec: SyntheticSlideSpec, x_px: int, y_px: int, w_px: int, h_px: int) -> NDArray[np.uint8]:
    plan = _plan(spec)
    win = (x_px, y_px, x_px + w_px, y_px + h_px)
    out = tx.wrap_window(tx.glass_texture(spec.seed), x_px, y_px, w_px, h_px).copy()
    for layer in plan.layers:
        box = _intersect(win, (layer.x0, layer.y0, layer.x1, layer.y1))
        if box is None:
            continue
        bx0, by0, bx1, by1 = box
        tex = tx.texture(layer.key, spec.mpp_um, spec.seed)
        out[by0 - y_px: by1 - y_px, bx0 - x_px: bx1 - x_px] = tx.wrap_window(
            tex, bx0 + layer.off_x, by0 + layer.off_y, bx1 - bx0, by1 - by0)
    for speck in plan.specks:
        _draw_speck(out, win, speck)
    for pen in plan.pens:
        _draw_pen(out, win, pen, spec.seed)
    return out


def _render_by_block_mean(spec: SyntheticSlideSpec, x: int, y: int, w: int, h: int, factor: int) -> NDArray[np.uint8]:
    """Level-``factor`` window computed from level 0 in bands (bounded memory)."""
    out = np.empty((h, w, 3), np.uint8)
    band = max(1, int(2e6 // max(1, w * factor * factor * 3)))
    for r in range(0, h, band):
        rows = min(band, h - r)
        level0 = _render_level0(spec, x * factor, (y + r) * factor, w * factor, rows * factor)
        out[r: r + rows] = tx.block_mean(level0, factor)
    return out


def _render_downsampled(spec: SyntheticSlideSpec, x: int, y: int, w: int, h: int, d: int) -> NDArray[np.uint8]:
    if PERIOD_PX % d or _OFFSET_QUANTUM_PX % d:
        return _render_by_block_mean(spec, x, y, w, h, d)
    plan = _plan(spec)
    win = (x, y, x + w, y + h)
    # fast path: blocks wholly inside one texture equal the pre-downsampled texture
    out = tx.wrap_window(tx.downsampled(("glass",), spec.mpp_um, spec.seed, d), x, y, w, h).copy()
    dirty: list[tuple[int, int, int, int]] = []
    for layer in plan.layers:
        lx0, ly0 = layer.x0 // d, layer.y0 // d
        lx1, ly1 = -(-layer.x1 // d), -(-layer.y1 // d)
        box = _intersect(win, (lx0, ly0, lx1, ly1))
        if box is not None:
            bx0, by0, bx1, by1 = box
            tex = tx.downsampled(layer.key, spec.mpp_um, spec.seed, d)
            out[by0 - y: by1 - y, bx0 - x: bx1 - x] = tx.wrap_window(
                tex, bx0 + layer.off_x // d, by0 + layer.off_y // d, bx1 - bx0, by1 - by0)
        # blocks straddling an edge that is not block-aligned mix two textures
        if layer.x0 % d:
            dirty.append((lx0, ly0, lx0 + 1, ly1))
        if layer.x1 % d:
            dirty.append((lx1 - 1, ly0, lx1, ly1))
        if layer.y0 % d:
            dirty.append((lx0, ly0, lx1, ly0 + 1))
        if layer.y1 % d:
            dirty.append((lx0, ly1 - 1, lx1, ly1))
    for pen in plan.pens:
        dirty.append((pen.x0 // d, pen.y0 // d, -(-pen.x1 // d), -(-pen.y1 // d)))
    for speck in plan.specks:
        sx0, sy0, sx1, sy1 = speck.box
        dirty.append((sx0 // d, sy0 // d, -(-sx1 // d), -(-sy1 // d)))
    for rect in dirty:
        box = _intersect(win, rect)
        if box is not None:
            bx0, by0, bx1, by1 = box
            out[by0 - y: by1 - y, bx0 - x: bx1 - x] = _render_by_block_mean(
                spec, bx0, by0, bx1 - bx0, by1 - by0, d)
    return out


def render_region(spec: SyntheticSlideSpec, x_px: int, y_px: int, w_px: int, h_px: int, *,
                  downsample: int = 1) -> NDArray[np.uint8]:
    """Exact pre-JPEG pixels of a window of the synthetic slide.

    Parameters
    ----------
    spec
        The slide.
    x_px, y_px, w_px, h_px
        Window in pixels **of the requested level** (level-0 pixels when ``downsample=1``).
        Windows may extend beyond the slide; the procedural content simply continues.
    downsample
        Level downsample factor ``d``; each output pixel is the rounded mean of the ``d`` x ``d``
        level-0 block it covers.

    Returns
    -------
    ndarray
        ``(h_px, w_px, 3)`` uint8 RGB.
    """
    if w_px <= 0 or h_px <= 0 or downsample < 1:
        raise ConfigError(f"render_region needs w_px, h_px > 0 and downsample >= 1, got "
                          f"{w_px}x{h_px} at downsample {downsample}")
    x_px, y_px, w_px, h_px, downsample = int(x_px), int(y_px), int(w_px), int(h_px), int(downsample)
    if downsample == 1:
        return _render_level0(spec, x_px, y_px, w_px, h_px)
    return _render_downsampled(spec, x_px, y_px, w_px, h_px, downsample)


# --------------------------------------------------------------------------- writing


def level_downsamples(spec: SyntheticSlideSpec) -> tuple[int, ...]:
    """Pyramid downsamples actually written: stop at the first level whose longer side
    would be smaller than one native tile."""
    return pyramid_downsamples_for(spec.width_px, spec.height_px, spec.native_tile_px,
                                   spec.pyramid_downsamples)


def aperio_description(spec: SyntheticSlideSpec, level_w_px: int | None = None,
                       level_h_px: int | None = None) -> str:
    """Aperio ImageDescription for level 0 (or, with a size, for a reduced page)."""
    return aperio_description_text(spec.width_px, spec.height_px, spec.native_tile_px, spec.jpeg_quality,
                                   mpp_um=spec.mpp_um if spec.write_mpp else None,
                                   level_w_px=level_w_px, level_h_px=level_h_px)


def _tiles(spec: SyntheticSlideSpec, d: int, w: int, h: int) -> Iterator[NDArray[np.uint8]]:
    t = spec.native_tile_px
    for ty in range(0, h, t):
        for tx_ in range(0, w, t):
            yield render_region(spec, tx_, ty, t, t, downsample=d)


def _thumbnail(spec: SyntheticSlideSpec, d: int) -> NDArray[np.uint8]:
    """Small overview for the SVS thumbnail page, reduced from the coarsest level in bands."""
    w, h = spec.width_px // d, spec.height_px // d
    k = max(1, math.ceil(max(w, h) / _THUMBNAIL_MAX_PX))
    tw, th = max(1, w // k), max(1, h // k)
    out = np.empty((th, tw, 3), np.uint8)
    band = max(1, 256 // k)
    for r in range(0, th, band):
        rows = min(band, th - r)
        out[r: r + rows] = tx.block_mean(render_region(spec, 0, r * k, tw * k, rows * k, downsample=d), k)
    return out


def write_synthetic_slide(path: str | Path, spec: SyntheticSlideSpec, *, workers: int = 1) -> Path:
    """Write ``spec`` as an Aperio-like pyramidal tiled-JPEG TIFF.

    The page layout, description and JPEG settings are those of
    :func:`wsi_her2.synthetic.svs_writer.write_aperio_pyramid` (level 0, a stripped thumbnail, then the
    reduced levels; YCbCr 4:2:0 JPEG, or RGB 4:4:4 with ``spec.jpeg_rgb``).

    Parameters
    ----------
    path
        Output file (``.svs`` by convention).
    spec
        The slide.
    workers
        Threads tifffile may use to JPEG-encode tiles (rendering stays in one thread).

    Returns
    -------
    Path
        ``path``.
    """
    levels = level_downsamples(spec)
    return write_aperio_pyramid(
        path, width_px=spec.width_px, height_px=spec.height_px, tile_px=spec.native_tile_px,
        downsamples=levels, level_tiles=functools.partial(_tiles, spec),
        thumbnail=_thumbnail(spec, levels[-1]), mpp_um=spec.mpp_um if spec.write_mpp else None,
        jpeg_quality=spec.jpeg_quality, jpeg_rgb=spec.jpeg_rgb, workers=workers,
    )


# --------------------------------------------------------------------------- presets


def _snap(value: float, quantum: int) -> int:
    return int(round(value / quantum)) * quantum


def demo_spec(*, seed: int = 0, write_mpp: bool = True) -> SyntheticSlideSpec:
    """The bundled demo slide: 6000 x 4000 px at 0.5 µm/px, planted call 2+.

    Sharp IHC tissue: a 2+ region (about 59 % of sharp tissue), a 1+ region (about 28 %) and
    a 0 region (about 13 %); no 3+ anywhere. An out-of-focus 2+ patch (sigma 2 µm), a green
    pen stroke crossing the lower edge of the 2+ region and the glass below, glass margins.
    All edges are multiples of 224 px (tiles of 224 px at 0.5 µm/px align with regions).
    The majority grade and the ASCO/CAP call are both 2+ (:data:`DEMO_PLANTED_SCORE`).
    """
    t = 224
    regions = (
        Region("ihc", 2 * t, 2 * t, 12 * t, 14 * t, grade=2),
        Region("ihc", 14 * t, 2 * t, 10 * t, 8 * t, grade=1),
        Region("ihc", 14 * t, 10 * t, 6 * t, 6 * t, grade=0),
        Region("ihc", 20 * t, 10 * t, 4 * t, 6 * t, grade=2, blur_sigma_px=4.0),
        Region("pen", 6 * t, 15 * t, 16 * t, 2 * t, ink="green"),
    )
    return SyntheticSlideSpec(6000, 4000, mpp_um=0.5, regions=regions, seed=seed, write_mpp=write_mpp)


def graded_ihc_spec(*, block_px: int = 1792, grades: Sequence[int] = (0, 1, 2, 3), mpp_um: float = 0.5,
                    columns: int | None = None, seed: int = 0, dust: bool = True,
                    native_tile_px: int = 256, jpeg_quality: int = 90, write_mpp: bool = True,
                    pyramid_downsamples: tuple[int, ...] = (1, 4, 16)) -> SyntheticSlideSpec:
    """One square IHC block per grade on a ``block_px`` grid with one-block glass gaps.

    Block ``k`` sits at column ``k % columns``, row ``k // columns`` of the block grid, at
    level-0 ``((2 * col + 1) * block_px, (2 * row + 1) * block_px)``; the slide is
    ``(2 * columns + 1)`` by ``(2 * rows + 1)`` blocks. ``columns`` defaults to
    ``ceil(sqrt(len(grades)))``. With the default 1792 px = 8 tiles of 224 px at 0.5 µm/px,
    every 224 px tile lies wholly inside one block or wholly on glass.
    """
    n = len(grades)
    if n == 0:
        raise ConfigError("graded_ihc_spec needs at least one grade")
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    regions = tuple(
        Region("ihc", (2 * (k % cols) + 1) * block_px, (2 * (k // cols) + 1) * block_px,
               block_px, block_px, grade=int(g))
        for k, g in enumerate(grades)
    )
    return SyntheticSlideSpec(
        (2 * cols + 1) * block_px, (2 * rows + 1) * block_px, mpp_um=mpp_um, regions=regions,
        native_tile_px=native_tile_px, jpeg_quality=jpeg_quality, write_mpp=write_mpp,
        pyramid_downsamples=pyramid_downsamples, dust=dust, seed=seed,
    )


def bench_spec(width_px: int = 40000, height_px: int = 30000, *, seed: int = 0) -> SyntheticSlideSpec:
    """A benchmark-sized slide at 0.5 µm/px: about 60 % tissue in six large regions.

    IHC 3+, 2+, 1+ and 0 regions and an H&E region, an out-of-focus 2+ patch and a blue pen
    stroke crossing tissue and glass. Edges snap to multiples of 64 px.
    """
    w, h = width_px, height_px

    def box(fx0: float, fy0: float, fx1: float, fy1: float) -> tuple[int, int, int, int]:
        x0, y0 = _snap(fx0 * w, 64), _snap(fy0 * h, 64)
        return x0, y0, max(64, _snap(fx1 * w, 64) - x0), max(64, _snap(fy1 * h, 64) - y0)

    regions = (
        Region("ihc", *box(0.05, 0.05, 0.45, 0.48), grade=3),
        Region("ihc", *box(0.50, 0.05, 0.95, 0.48), grade=2),
        Region("ihc", *box(0.05, 0.55, 0.33, 0.95), grade=1),
        Region("he", *box(0.38, 0.55, 0.68, 0.95)),
        Region("ihc", *box(0.73, 0.55, 0.95, 0.78), grade=0),
        Region("ihc", *box(0.73, 0.82, 0.95, 0.95), grade=2, blur_sigma_px=4.0),
        Region("pen", *box(0.30, 0.44, 0.80, 0.58), ink="blue"),
    )
    return SyntheticSlideSpec(width_px, height_px, mpp_um=0.5, regions=regions, seed=seed)


PRESETS = {"demo": demo_spec, "graded": graded_ihc_spec, "bench": bench_spec}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write a preset synthetic slide."""
    import dataclasses

    parser = argparse.ArgumentParser(prog="python -m wsi_her2.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="output .svs path")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--width", type=int, help="width px (bench preset only)")
    parser.add_argument("--height", type=int, help="height px (bench preset only)")
    parser.add_argument("--no-mpp", action="store_true", help="write no MPP metadata")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="JPEG encoding threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.preset == "bench":
        spec = bench_spec(args.width or 40000, args.height or 30000, seed=args.seed)
    else:
        if args.width or args.height:
            parser.error("--width/--height apply to --preset bench only")
        spec = PRESETS[args.preset](seed=args.seed)
    if args.no_mpp:
        spec = dataclasses.replace(spec, write_mpp=False)
    write_synthetic_slide(args.out, spec, workers=args.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
