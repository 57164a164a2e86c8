"""Periodic stain textures for the synthetic slide generator.

Every texture is a square RGB ``uint8`` tile of :data:`PERIOD_PX` pixels that wraps
seamlessly (all random fields are generated with circular boundary conditions). The slide
renderer indexes these textures by absolute level-0 coordinates modulo the period, which
makes rendering any window of a slide of any size nearly free and exactly reproducible.

Stain physics (Beer-Lambert, base 10)
-------------------------------------
Each pixel carries optical densities (OD) for hematoxylin, eosin and DAB. They are mixed
with the Ruifrok-Johnston stain vectors (the rows of ``skimage.color.rgb_from_hed``,
normalised to unit length) and turned into light by::

    RGB = I_glass * 10 ** -(od_h * H + od_e * E + od_dab * DAB)

with ``I_glass = GLASS_RGB`` (about 240, i.e. the glass itself has OD log10(255/240)), so
``RGB = 255 * 10 ** -(OD_glass + OD_stain)``. Camera noise is added after optics (and after
any out-of-focus blur).
"""
from __future__ import annotations

import functools

import numpy as np
from numpy.typing import NDArray
from scipy import fft as sfft

#: Texture period in level-0 pixels: a multiple of 256 (native tiles slice without wrapping)
#: and of every power-of-two pyramid downsample up to 64 (downsampled textures stay exact).
PERIOD_PX = 1024

#: Ruifrok & Johnston (2001) stain vectors, as in ``skimage.color.rgb_from_hed`` (rows H, E, DAB).
_RGB_FROM_HED_RAW = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
RGB_FROM_HED = _RGB_FROM_HED_RAW / np.linalg.norm(_RGB_FROM_HED_RAW, axis=1, keepdims=True)

#: Mean brightness of empty glass (RGB, 0-255) before camera noise.
GLASS_RGB = np.array([240.0, 240.5, 242.0])
#: Camera noise standard deviation (grey levels), added after optics.
CAMERA_NOISE_SD = 1.0

#: Peak DAB optical density on membranes per HER2 grade (ASCO/CAP 2018 in spirit):
#: 0 none, 1+ faint, 2+ weak-to-moderate, 3+ strong.
GRADE_DAB_OD: dict[int, float] = {0: 0.0, 1: 0.2, 2: 0.5, 3: 1.3}
#: Fraction of each cell's membrane circumference that is stained, per grade:
#: 1+ partial rings (two arcs covering 40 %), 2+ and 3+ complete rings.
GRADE_COMPLETENESS: dict[int, float] = {0: 0.0, 1: 0.4, 2: 1.0, 3: 1.0}
#: Gaussian sigma of the membrane DAB profile (µm): 1+ and 2+ rings absorb as much light as the
#: 1 µm band the scorer's intensity grades are defined on (``IhcThresholds.membrane_width_um``):
#: at OD 0.2-0.5 a Gaussian of sigma 0.34 µm removes the light of a 1 µm band of its peak OD (its
#: tails carry what its narrower core lacks), so their peak OD is their grade's OD; 3+ rings are thick.
GRADE_MEMBRANE_SIGMA_UM: dict[int, float] = {0: 0.34, 1: 0.34, 2: 0.34, 3: 1.2}
#: Diffuse cytoplasmic DAB OD ("blush") per grade: strongly positive cells are brown
#: throughout, which makes 3+ tissue read as saturated brown at low magnification.
GRADE_CYTOPLASM_DAB_OD: dict[int, float] = {0: 0.0, 1: 0.0, 2: 0.03, 3: 0.2}

CELL_PITCH_UM = 14.0
NUCLEUS_DIAMETER_UM = 7.0

#: Hematoxylin OD of an IHC counterstain: deliberately pale (grade-0 tissue is the hard case
#: for tissue detection).
IHC_CYTOPLASM_H_OD = 0.07
IHC_NUCLEUS_H_OD = 0.42


def od_to_rgb(od_h: NDArray | float, od_e: NDArray | float, od_dab: NDArray | float) -> NDArray[np.float32]:
    """Beer-Lambert mixing of H, E and DAB optical densities into float RGB (0-255 scale).

    Parameters
    ----------
    od_h, od_e, od_dab
        Base-10 optical densities per stain, broadcastable to one shape ``S``.

    Returns
    -------
    ndarray
        ``S + (3,)`` float32 RGB, ``GLASS_RGB * 10 ** -(OD @ stain vectors)``, not yet noisy.
    """
    od_h, od_e, od_dab = np.broadcast_arrays(
        np.asarray(od_h, np.float32), np.asarray(od_e, np.float32), np.asarray(od_dab, np.float32)
    )
    out = np.empty((*od_h.shape, 3), np.float32)
    for c in range(3):
        od = (od_h * np.float32(RGB_FROM_HED[0, c]) + od_e * np.float32(RGB_FROM_HED[1, c])
              + od_dab * np.float32(RGB_FROM_HED[2, c]))
        out[..., c] = np.float32(GLASS_RGB[c]) * np.power(np.float32(10.0), -od)
    return out


def _rng(seed: int, *salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *[int(s) for s in salt]])


def _periodic_gaussian(field: NDArray, sigma_px: float | tuple[float, float]) -> NDArray[np.float32]:
    """Gaussian filter with wrap-around boundaries, done in Fourier space (cost independent
    of sigma; the result tiles seamlessly)."""
    field = np.asarray(field, np.float32)
    spectrum = sfft.rfft2(field, axes=(0, 1), workers=1)
    sig = (sigma_px, sigma_px) if np.isscalar(sigma_px) else tuple(sigma_px)
    fy = sfft.fftfreq(field.shape[0])[:, None]
    fx = sfft.rfftfreq(field.shape[1])[None, :]
    # separable kernel, built as an outer product in float32 (small temporaries)
    kernel = (np.exp(-2 * np.pi**2 * (fy * sig[0]) ** 2).astype(np.float32)
              * np.exp(-2 * np.pi**2 * (fx * sig[1]) ** 2).astype(np.float32))
    if field.ndim == 3:
        kernel = kernel[..., None]
    spectrum *= kernel
    return sfft.irfft2(spectrum, s=field.shape[:2], axes=(0, 1), workers=1).astype(np.float32, copy=False)


def _smooth_noise(rng: np.random.Generator, sigma_px: float | tuple[float, float]) -> NDArray[np.float32]:
    """Periodic Gaussian-filtered white noise over the texture period, zero mean, unit SD."""
    field = _periodic_gaussian(rng.standard_normal((PERIOD_PX, PERIOD_PX), np.float32), sigma_px)
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def _finish(rgb: NDArray, rng: np.random.Generator, blur_sigma_px: float) -> NDArray[np.uint8]:
    """Optional out-of-focus blur (in light, not OD), then camera noise, then quantisation."""
    out = np.empty(rgb.shape, np.uint8)
    for c in range(rgb.shape[-1]):  # channel by channel: keeps the float temporaries small
        channel = np.array(rgb[..., c], np.float32)
        if blur_sigma_px > 0:
            channel = _periodic_gaussian(channel, blur_sigma_px)
        channel += rng.standard_normal(channel.shape, np.float32) * np.float32(CAMERA_NOISE_SD)
        out[..., c] = np.clip(np.rint(channel), 0, 255)
    return out


@functools.lru_cache(maxsize=4)
def _cell_geometry(mpp_um: float, seed: int) -> dict[str, NDArray]:
    """Jittered-lattice cells over one texture period.

    Returns per-pixel ``cell`` (index of the owning cell), ``dx``/``dy`` (offset from its
    centre, px), ``bdist`` (distance to the Voronoi boundary with the second-nearest cell, px)
    and per-cell random attributes.
    """
    n = max(4, round(PERIOD_PX / (CELL_PITCH_UM / mpp_um)))
    pitch = PERIOD_PX / n
    rng = _rng(seed, 101)
    jitter = rng.uniform(-0.25, 0.25, (n, n, 2)) * pitch  # (row j, col i, [x, y])
    cell = np.empty((PERIOD_PX, PERIOD_PX), np.int32)
    dx = np.empty((PERIOD_PX, PERIOD_PX), np.float32)
    dy = np.empty_like(dx)
    bdist = np.empty_like(dx)
    xs = np.arange(PERIOD_PX, dtype=np.float64) + 0.5
    ci = np.floor(xs / pitch).astype(np.int64)
    offsets = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)]
    rows = 128  # chunked so the transient arrays stay a few MB
    for y0 in range(0, PERIOD_PX, rows):
        ys = xs[y0 : y0 + rows]
        cj = ci[y0 : y0 + rows]
        shape = (len(ys), PERIOD_PX)
        best_d = np.full(shape, np.inf)
        second_d = np.full(shape, np.inf)
        best_x, best_y, second_x, second_y = (np.zeros(shape) for _ in range(4))
        best_id = np.zeros(shape, np.int64)
        # the two nearest centres lie in the 3x3 neighbourhood of the pixel's lattice cell
        for dj, di in offsets:
            jj = (cj + dj)[:, None]
            ii = (ci + di)[None, :]
            jw, iw = jj % n, ii % n
            cx = (ii + 0.5) * pitch + jitter[jw, iw, 0]
            cy = (jj + 0.5) * pitch + jitter[jw, iw, 1]
            d2 = (cx - xs[None, :]) ** 2 + (cy - ys[:, None]) ** 2
            closer = d2 < best_d
            middle = ~closer & (d2 < second_d)
            second_d = np.where(closer, best_d, np.where(middle, d2, second_d))
            second_x = np.where(closer, best_x, np.where(middle, cx, second_x))
            second_y = np.where(closer, best_y, np.where(middle, cy, second_y))
            best_d = np.where(closer, d2, best_d)
            best_x = np.where(closer, cx, best_x)
            best_y = np.where(closer, cy, best_y)
            best_id = np.where(closer, jw * n + iw, best_id)
        sep = np.hypot(second_x - best_x, second_y - best_y)
        sl = slice(y0, y0 + len(ys))
        cell[sl] = best_id
        dx[sl] = xs[None, :] - best_x
        dy[sl] = ys[:, None] - best_y
        # exact distance to the perpendicular bisector of the two nearest centres
        bdist[sl] = (second_d - best_d) / (2.0 * np.maximum(sep, 1e-6))
    ncell = n * n

    def per_cell(values: NDArray) -> NDArray[np.float32]:
        return values.astype(np.float32)

    return {
        "cell": cell,
        "dx": dx,
        "dy": dy,
        "bdist": bdist,
        "pitch_px": np.float64(pitch),
        "nuc_scale": per_cell(rng.uniform(0.85, 1.15, ncell)),
        "nuc_aspect": per_cell(rng.uniform(1.0, 1.35, ncell)),
        "nuc_angle": per_cell(rng.uniform(0, np.pi, ncell)),
        "nuc_strength": per_cell(rng.uniform(0.8, 1.2, ncell)),
        "nuc_present": rng.random(ncell) > 0.12,  # some nuclei lie outside the section plane
        "mem_phase": per_cell(rng.uniform(0, 2 * np.pi, ncell)),
        "mem_strength": per_cell(rng.uniform(0.8, 1.15, ncell)),
        "stroma_nucleus": rng.random(ncell) < 0.15,
    }


@functools.lru_cache(maxsize=4)
def _nucleus_mask(mpp_um: float, seed: int, *, aspect_boost: float = 1.0,
                  size: float = 1.0) -> NDArray[np.float32]:
    """Soft elliptical nucleus of each cell (1 inside, 0 outside, ~1 px edge)."""
    geo = _cell_geometry(mpp_um, seed)
    cell = geo["cell"]
    r = np.float32(NUCLEUS_DIAMETER_UM / 2 / mpp_um * size) * geo["nuc_scale"][cell]
    root_aspect = np.sqrt(geo["nuc_aspect"][cell] * np.float32(aspect_boost))
    ang = geo["nuc_angle"][cell]
    c, s = np.cos(ang), np.sin(ang)
    u = (geo["dx"] * c + geo["dy"] * s) / (r * root_aspect)
    v = (geo["dy"] * c - geo["dx"] * s) * root_aspect / r
    d_ell = np.sqrt(u * u + v * v)
    return np.clip((1.0 - d_ell) * r + 0.5, 0.0, 1.0)


@functools.lru_cache(maxsize=4)
def _ihc_counterstain(mpp_um: float, seed: int) -> NDArray[np.float32]:
    """Hematoxylin OD of the IHC tissue, shared by every grade (same tissue, other HER2)."""
    geo = _cell_geometry(mpp_um, seed)
    rng = _rng(seed, 200)
    cell = geo["cell"]
    fine = _smooth_noise(rng, 1.0)
    cyto = np.float32(IHC_CYTOPLASM_H_OD) * (1.0 + 0.25 * _smooth_noise(rng, 3.0))
    nuc = _nucleus_mask(mpp_um, seed) * geo["nuc_present"][cell]
    strength = np.float32(IHC_NUCLEUS_H_OD) * geo["nuc_strength"][cell]
    return np.clip(cyto, 0, None) + nuc * strength * (1 + 0.3 * fine)


@functools.lru_cache(maxsize=16)
def ihc_texture(grade: int, mpp_um: float, seed: int, blur_sigma_px: float = 0.0) -> NDArray[np.uint8]:
    """HER2 IHC (DAB + hematoxylin counterstain) texture of one grade, ``(P, P, 3) uint8``."""
    geo = _cell_geometry(mpp_um, seed)
    rng = _rng(seed, 201 + grade, int(round(blur_sigma_px * 100)))
    cell = geo["cell"]
    od_h = _ihc_counterstain(mpp_um, seed)
    od_dab: NDArray | float = 0.0
    peak = GRADE_DAB_OD[grade]
    completeness = GRADE_COMPLETENESS[grade]
    if peak > 0 and completeness > 0:
        sigma_px = GRADE_MEMBRANE_SIGMA_UM[grade] / mpp_um
        profile = np.exp(np.float32(-0.5 / sigma_px**2) * geo["bdist"] ** 2)
        if completeness < 1:
            # partial rings: two arcs per cell, starting at a random angle
            theta = np.arctan2(geo["dy"], geo["dx"]) - geo["mem_phase"][cell]
            covered = np.mod(theta * np.float32(1 / np.pi), 1.0) < completeness
            profile = profile * covered
        noise = 1 + 0.15 * _smooth_noise(rng, 1.5)
        od_dab = np.clip(np.float32(peak) * profile * geo["mem_strength"][cell] * noise, 0, None)
        od_dab += np.float32(GRADE_CYTOPLASM_DAB_OD[grade])
    return _finish(od_to_rgb(od_h, 0.0, od_dab), rng, blur_sigma_px)


@functools.lru_cache(maxsize=4)
def he_texture(mpp_um: float, seed: int, blur_sigma_px: float = 0.0) -> NDArray[np.uint8]:
    """H&E texture: epithelial nests (dense nuclei, pink cytoplasm) in fibrous eosin stroma."""
    geo = _cell_geometry(mpp_um, seed)
    rng = _rng(seed, 300, int(round(blur_sigma_px * 100)))
    cell = geo["cell"]
    nest = np.clip((_smooth_noise(rng, 40.0 / mpp_um) - 0.1) * 2.0, 0.0, 1.0)
    fibres = np.clip(0.8 + 0.35 * _smooth_noise(rng, (1.0, 5.0)), 0.3, 1.5)
    fine = _smooth_noise(rng, 1.0)
    epi_nuc = _nucleus_mask(mpp_um, seed) * geo["nuc_present"][cell]
    str_nuc = _nucleus_mask(mpp_um, seed, aspect_boost=3.0, size=0.7) * geo["stroma_nucleus"][cell]
    od_h = (0.03 + nest * epi_nuc * 0.85 * geo["nuc_strength"][cell]
            + (1 - nest) * str_nuc * 0.8) * (1 + 0.25 * fine)
    del str_nuc, fine
    membrane = np.exp(np.float32(-0.5 * (mpp_um / 0.5) ** 2) * geo["bdist"] ** 2)
    od_e = nest * (0.22 + 0.1 * membrane) * (1 - 0.5 * epi_nuc) + (1 - nest) * 0.3 * fibres
    del membrane, epi_nuc, fibres, nest
    rgb = od_to_rgb(od_h, od_e, 0.0)
    del od_h, od_e
    return _finish(rgb, rng, blur_sigma_px)


@functools.lru_cache(maxsize=2)
def glass_texture(seed: int) -> NDArray[np.uint8]:
    """Empty glass: near white with faint shading and camera noise."""
    rng = _rng(seed, 400)
    shade = 1.0 + 0.004 * _smooth_noise(rng, 64.0)
    return _finish(GLASS_RGB.astype(np.float32) * shade[..., None], rng, 0.0)


@functools.lru_cache(maxsize=2)
def unit_noise(seed: int) -> NDArray[np.float32]:
    """Smooth periodic noise (unit SD) used to modulate ink density along pen strokes."""
    return _smooth_noise(_rng(seed, 500), 6.0)


def block_mean(img: NDArray[np.uint8], factor: int) -> NDArray[np.uint8]:
    """Exact box downsampling: mean of each ``factor`` x ``factor`` block, rounded half up.

    Integer arithmetic so that every code path producing a pyramid level agrees bit for bit.
    """
    if factor == 1:
        return img
    h, w = img.shape[0] // factor, img.shape[1] // factor
    blocks = img[: h * factor, : w * factor].reshape(h, factor, w, factor, -1)
    total = blocks.sum(axis=(1, 3), dtype=np.uint32)
    area = factor * factor
    return ((total + area // 2) // area).astype(np.uint8)


@functools.lru_cache(maxsize=64)
def downsampled(key: tuple, mpp_um: float, seed: int, factor: int) -> NDArray[np.uint8]:
    """Texture ``key`` box-downsampled by ``factor`` (must divide :data:`PERIOD_PX`)."""
    return block_mean(texture(key, mpp_um, seed), factor)


def texture(key: tuple, mpp_um: float, seed: int) -> NDArray[np.uint8]:
    """Texture for ``key``: ``("glass",)``, ``("ihc", grade, blur_px)`` or ``("he", None, blur_px)``."""
    if key[0] == "glass":
        return glass_texture(seed)
    if key[0] == "ihc":
        return ihc_texture(int(key[1]), mpp_um, seed, float(key[2]))
    if key[0] == "he":
        return he_texture(mpp_um, seed, float(key[2]))
    raise ValueError(f"unknown texture key {key!r}")


def wrap_window(tex: NDArray, x0: int, y0: int, w: int, h: int) -> NDArray:
    """Window ``[y0:y0+h, x0:x0+w]`` of a periodic texture, wrapping at its edges."""
    period_y, period_x = tex.shape[:2]
    xs, ys = x0 % period_x, y0 % period_y
    if xs + w <= period_x and ys + h <= period_y:
        return tex[ys : ys + h, xs : xs + w]
    iy = (np.arange(h) + ys) % period_y
    ix = (np.arange(w) + xs) % period_x
    return tex[iy[:, None], ix[None, :]]
