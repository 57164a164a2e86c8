"""The CPU kernel of :class:`wsi_her2.models.ihc_score.IhcDabScorer`: steps 1-3 per tile with OpenCV.

Same definitions as the torch kernel (``IhcDabScorer._cell_evidence_torch``), computed on planar
float32 numpy arrays (per-pixel steps on ``_CHUNK_TILES`` tiles stacked as one image, filters
with a border per tile: the same numbers as tile by tile), where OpenCV's separable filters and
morphology run 10-50x faster than torch's CPU convolutions and pooling on 224 px images:

- background ``I0``: the per-channel quantile read from an 8-bit histogram (exact for 8-bit
  input, which is what the tile store holds; within 1/510 of the intensity otherwise);
- optical density and unmixing: one ``(6, 3) @ (3, H*W)`` product (in single-threaded BLAS pieces) for hematoxylin, neutral,
  DAB (neutral basis), DAB (Ruifrok), the summed OD and the counterstain OD (the nuclear channel);
- Gaussian blurs with the same taps (:func:`wsi_her2.models.ihc_evidence.gaussian_taps`) and the same
  reflect border (``BORDER_REFLECT_101``), block means by ``INTER_AREA`` at integer factors,
  bilinear upsampling with half-pixel centres (as ``F.interpolate(align_corners=False)``),
  local maxima by a rectangular dilation with the border ignored (as ``max_pool2d``),
  neighbour counts by an unnormalised box filter with a zero border (integral images), the
  tile's counterstain level by a partition (the same order statistic as ``kthvalue``), and the
  epithelium stencil's samples gathered from reflect-padded maps (as ``F.pad(mode="reflect")``).

This module imports neither torch nor the model registry (numpy and OpenCV only): everything
that depends on the scorer (taps, ray offsets, stain matrices, cut-points, the glass colour)
arrives in a :class:`KernelPlan` built by :func:`wsi_her2.models.ihc_score_cpu.kernel_plan`.
So the scoring worker processes of :mod:`wsi_her2.score.cpu_pool` start in ~0.1 s instead of
the ~2 s of importing torch. ``tests/test_ihc_kernels.py`` holds this kernel and the torch one
to the same calls and measurements on real and synthetic tiles.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import cv2
import numpy as np

from wsi_her2.cpus import available_cpus
from wsi_her2.models.ihc_thresholds import DOG_QUANTUM_INV, IhcThresholds, counterstain_rank

__all__ = ["ChunkEvidence", "KernelPlan", "STAT_NAMES", "area_fractions", "chunk_evidence", "tile_threads"]

STAT_NAMES = ("tissue_fraction", "hematoxylin_od_mean", "neutral_od_mean", "dab_od_mean", "stained_fraction")
_MIN_TILES_PER_THREAD = 4
#: Tiles whose per-pixel steps run as one stacked image (one call instead of one per tile).
#: Measured at 224 px (~1.7 MB of float planes a tile): 2 is fastest; 4-8 lose more to cache
#: misses than they save in calls.
_CHUNK_TILES = 2
#: Columns per BLAS call. numpy's BLAS (OpenBLAS) wakes its own thread pool for larger products
#: and dot products (~16k+ and 10k+ elements), whose workers then spin beside the kernel's tile
#: threads: measured here, two tile threads cost 2x the CPU of one. Below these sizes every call
#: stays on the calling thread, with the same per-element arithmetic (so the same numbers).
_BLAS_COLUMNS = 8192
_MINUS_LN10 = -float(np.log(10.0))
#: The 256 intensity levels as float32 (``k / 255``, as ``uint8 tensor / 255`` gives them).
_LEVELS = np.arange(256, dtype=np.float32) / np.float32(255.0)


@dataclass(frozen=True, eq=False)
class KernelPlan:
    """Everything the kernel needs for ``h x w`` tiles of one scorer: cut-points, the glass
    colour, stain matrices, taps and window sizes in pixels (numpy only: it pickles to workers)."""

    thresholds: IhcThresholds
    #: ``(3,)`` the slide's glass colour over its brightest channel, or None (grey glass).
    glass_chroma: np.ndarray | None
    #: ``(6, 3)`` rows: hematoxylin, neutral, DAB (neutral basis), DAB (Ruifrok), summed OD, counterstain; columns R, G, B.
    unmix: np.ndarray
    #: Darkest intensity read (``wsi_her2.stain.od.MIN_INTENSITY``) and log10 of the 256 levels clamped to it.
    min_intensity: float
    log10_levels: np.ndarray
    h: int
    w: int
    f: int
    chroma: np.ndarray | None
    nucleus: np.ndarray | None
    surround: np.ndarray | None
    smooth: np.ndarray | None
    seed_window: np.ndarray
    #: Odd side lengths (cell-grid px) of the squares other nuclei are counted in.
    count_windows: tuple[int, ...]
    area_window: np.ndarray
    pad: int
    ray_offsets: np.ndarray
    #: ``ray_offsets`` as ``(L, 1, n_directions)``: gathered samples reduce over the outer axis (one SIMD pass).
    ray_offsets_t: np.ndarray
    #: The epithelium stencil: reflect padding of the maps, each sample's flat offset within its
    #: padded map and its map (0: nucleus scale, 1: surround); None under the cohesion model.
    stencil_pad: int = 0
    stencil_offsets: np.ndarray | None = None
    stencil_maps: np.ndarray | None = None


class _Workspace:
    """float32 buffers of one share of a batch, reused tile after tile and batch after batch.

    Fresh 0.2-1 MB temporaries per tile are mapped, zero-filled and unmapped by the allocator
    each time, which costs as much CPU as the arithmetic and serialises threads on the kernel.
    A share takes an idle set from its plan (:func:`_workspaces`) and gives it back after.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape:
            buf = self._buffers[name] = np.empty(shape, np.float32)
        return buf


#: Idle buffer sets per plan, reused batch after batch; weak keys: they go with their plan.
_IDLE: "weakref.WeakKeyDictionary[KernelPlan, list[_Workspace]]" = weakref.WeakKeyDictionary()
_IDLE_LOCK = threading.Lock()


class _workspaces:
    """``with _workspaces(plan) as ws``: an idle buffer set of ``plan`` (a new one when all are busy)."""

    def __init__(self, plan: KernelPlan) -> None:
        self._plan = plan

    def __enter__(self) -> _Workspace:
        with _IDLE_LOCK:
            idle = _IDLE.setdefault(self._plan, [])
            self._ws = idle.pop() if idle else _Workspace()
        return self._ws

    def __exit__(self, *exc: object) -> None:
        with _IDLE_LOCK:
            _IDLE.setdefault(self._plan, []).append(self._ws)


def _blur_into(src: np.ndarray, taps: np.ndarray | None, dst: np.ndarray) -> np.ndarray:
    """Gaussian blur of one 2-D map into ``dst`` (reflect border); a copy when ``taps`` is None."""
    if taps is None:
        np.copyto(dst, src)
        return dst
    return cv2.sepFilter2D(src, cv2.CV_32F, taps, taps, dst=dst, borderType=cv2.BORDER_REFLECT_101)


def _planes_u8(rgb: np.ndarray) -> list[np.ndarray]:
    """Three ``(H, W)`` uint8 planes of one ``(3, H, W)`` tile: uint8, or float in [0, 1], any strides."""
    _, h, w = rgb.shape
    hwc = np.moveaxis(rgb, 0, -1)  # a view; contiguous for channels-last memory
    if hwc.flags.c_contiguous:
        u8 = hwc if rgb.dtype == np.uint8 else cv2.convertScaleAbs(hwc.reshape(h, w * 3), alpha=255.0).reshape(h, w, 3)
        return list(cv2.split(u8))
    if rgb.dtype == np.uint8:
        return [np.ascontiguousarray(rgb[c]) for c in range(3)]
    u8 = cv2.convertScaleAbs(np.ascontiguousarray(rgb).reshape(3 * h, w), alpha=255.0)
    return [u8[c * h: (c + 1) * h] for c in range(3)]


def _chunk_planes(rgb: np.ndarray) -> list[list[np.ndarray] | None]:
    """Per tile of ``(T, 3, H, W)``: its three uint8 planes, or None when its values are not 8-bit levels.

    Stored tiles (uint8, channels-last memory: what the loader hands over) are split in one call.
    """
    n, _, h, w = rgb.shape
    hwc = np.moveaxis(rgb, 1, -1)
    if rgb.dtype == np.uint8 and hwc.flags.c_contiguous:
        split = cv2.split(hwc.reshape(n * h, w, 3))
        return [[p[i * h: (i + 1) * h] for p in split] for i in range(n)]
    out: list[list[np.ndarray] | None] = []
    for tile in rgb:
        planes = _planes_u8(tile)
        exact = tile.dtype == np.uint8 or all(
            cv2.norm(cv2.LUT(p, _LEVELS), np.ascontiguousarray(tile[c]), cv2.NORM_INF) == 0 for c, p in enumerate(planes))
        out.append(planes if exact else None)
    return out


def _glass_log10(hist: np.ndarray, t, n_px: int, chroma: np.ndarray | None) -> np.ndarray:
    """``(T, 3)`` log10 of each tile's glass intensity ``I0`` from its ``(T, 3, 256)`` channel histograms.

    As ``estimate_background``: the per-channel quantile (the k-th smallest level: the number of
    levels whose cumulative count is still below k), then :func:`_cast_limited`.
    """
    k = min(n_px, max(1, int(round(t.background_quantile * n_px))))
    i0 = np.count_nonzero(np.cumsum(hist, axis=2) < k - 0.5, axis=2).astype(np.float32) / np.float32(255.0)
    return np.log10(_cast_limited(i0, t, chroma))


def _cast_limited(i0: np.ndarray, t, chroma: np.ndarray | None) -> np.ndarray:
    """``(..., 3)`` glass intensities raised to within ``background_max_cast`` of the brightest channel,
    measured in units of the slide's glass colour ``chroma`` (None: grey), clipped to [min, 1]."""
    if chroma is not None:
        i0 = i0 / chroma
    i0 = np.maximum(i0, i0.max(axis=-1, keepdims=True) * np.float32(1.0 - t.background_max_cast))
    if chroma is not None:
        i0 = i0 * chroma
    return np.clip(i0, t.background_min_intensity, 1.0).astype(np.float32)


def _optical_density_float(rgb: np.ndarray, plan: KernelPlan) -> np.ndarray:
    """``(3, H*W)`` OD of a float tile that is not 8-bit: exact quantile, per-pixel logs."""
    t = plan.thresholds
    _, h, w = rgb.shape
    flat = np.ascontiguousarray(rgb, dtype=np.float32).reshape(3, h * w)
    k = min(h * w, max(1, int(round(t.background_quantile * h * w))))
    i0 = _cast_limited(np.partition(flat, k - 1, axis=1)[:, k - 1], t, plan.glass_chroma)
    od = np.log10(i0.astype(np.float32)).reshape(3, 1) - np.log10(np.maximum(flat, np.float32(plan.min_intensity)))
    return np.maximum(od, np.float32(0.0), out=od)


def _glass_tables(rgb: np.ndarray, plan: KernelPlan) -> np.ndarray:
    """``(T, 3, 256)`` OD tables of 8-bit tiles: ``max(0, log10(I0) - log10(max(I, 1/255)))`` per level.

    ``I0``, each tile's glass, from its channel histograms (exact at 8 bits; stored tiles are
    read in place, channels-last); the small table arithmetic runs once for all ``T`` tiles.
    """
    n, _, h, w = rgb.shape
    hwc = np.moveaxis(rgb, 1, -1)
    stored = rgb.dtype == np.uint8 and hwc.flags.c_contiguous
    hist = np.zeros((n, 3, 256), np.float32)
    for i, tile_planes in enumerate([[hwc[i]] * 3 for i in range(n)] if stored else _chunk_planes(rgb)):
        for c, p in enumerate(tile_planes or ()):
            hist[i, c] = cv2.calcHist([p], [c if stored else 0], None, [256], [0, 256]).ravel()
    log_i0 = _glass_log10(hist, plan.thresholds, h * w, plan.glass_chroma)
    return np.maximum(log_i0[:, :, None] - plan.log10_levels, np.float32(0.0))


def _chunk_od(rgb: np.ndarray, tables: np.ndarray, plan: KernelPlan, ws: _Workspace) -> np.ndarray:
    """``(3, T, H*W)`` float32 OD of ``(T, 3, H, W)`` tiles against each tile's glass.

    8-bit values (what the tile store holds) by the tables of :func:`_glass_tables`; other float
    input by per-pixel logs.
    """
    n, _, h, w = rgb.shape
    od = ws.get("od", (3, n, h * w))
    for i, tile_planes in enumerate(_chunk_planes(rgb)):
        if tile_planes is None:
            od[:, i] = _optical_density_float(rgb[i], plan)
            continue
        for c, p in enumerate(tile_planes):
            cv2.LUT(p, tables[i, c], dst=od[c, i].reshape(h, w))
    return od


def _coarse_tiles(img: np.ndarray, n: int, f: int) -> np.ndarray:
    """``(n, H // f, W // f)`` block means (``INTER_AREA``) of ``n`` tiles stacked as ``(n * H, W)``.

    At an integer factor each output pixel is the mean of its own ``f x f`` block, so one call on
    the stack gives each tile's own means (tiles whose height is not a multiple of ``f`` are
    cropped first, as per tile).
    """
    h, w = img.shape[0] // n, img.shape[1]
    if f == 1:
        return img.reshape(n, h, w)
    hc, wc = h // f, w // f
    if h % f:
        img = np.ascontiguousarray(img.reshape(n, h, w)[:, : hc * f]).reshape(n * hc * f, w)
    return cv2.resize(img[:, : wc * f], (wc, n * hc), interpolation=cv2.INTER_AREA).reshape(n, hc, wc)


def _clamp_low(img: np.ndarray) -> np.ndarray:
    """``max(img, 0)`` in place (OpenCV's to-zero threshold: one SIMD pass)."""
    cv2.threshold(img, 0.0, 0.0, cv2.THRESH_TOZERO, dst=img)
    return img


def _brown_dab(cells: np.ndarray, dab_hed: np.ndarray, t, plan: KernelPlan, ws: _Workspace) -> np.ndarray:
    """``(T * H, W)`` brown DAB OD: Ruifrok DAB times its brown share, read on the cell grid.

    ``cells``: ``(2, T, hc, wc)`` cell-grid DAB (neutral basis, Ruifrok); ``dab_hed``: ``(T * H, W)``.
    """
    f, h, w = plan.f, plan.h, plan.w
    n, hc, wc = cells.shape[1:]
    hnd_s, hed_s = ws.get("hnd_s", cells.shape[1:]), ws.get("hed_s", cells.shape[1:])
    for i in range(n):
        _blur_into(cells[0, i], plan.chroma, hnd_s[i])
        _blur_into(cells[1, i], plan.chroma, hed_s[i])
    share = np.divide(hnd_s, np.maximum(hed_s, np.float32(t.chroma_min_od), out=hed_s), out=hnd_s)
    share *= np.float32(1.0 / t.brown_full_share)
    brown = _clamp_low(cv2.threshold(share.reshape(n * hc, wc), 1.0, 0.0, cv2.THRESH_TRUNC, dst=share.reshape(n * hc, wc))[1])
    brown = brown.reshape(n, hc, wc)  # clipped to [0, 1]
    if f > 1:
        brown_px = ws.get("brown", (n, h, w))
        for i in range(n):
            if (hc * f, wc * f) == (h, w):
                cv2.resize(brown[i], (w, h), dst=brown_px[i], interpolation=cv2.INTER_LINEAR)
            else:
                up = cv2.resize(brown[i], (wc * f, hc * f), interpolation=cv2.INTER_LINEAR)
                cv2.copyMakeBorder(up, 0, h - hc * f, 0, w - wc * f, cv2.BORDER_REPLICATE, dst=brown_px[i])
        brown = brown_px
    dab = cv2.multiply(dab_hed, brown.reshape(n * h, w), dst=ws.get("dab", dab_hed.shape))
    if t.dab_gain != 1.0:
        dab *= np.float32(t.dab_gain)
    return dab


def _tissue_stats(unmixed: np.ndarray, dab: np.ndarray, t, n: int, ws: _Workspace) -> np.ndarray:
    """``(T, 5)`` tissue statistics (:data:`STAT_NAMES`) from the ``(6, T * H * W)`` unmixed OD (its rows 0, 1 and 4 are read) and brown DAB.

    Masked sums as a product and an OpenCV sum (double accumulators) per tile and plane.
    """
    px = unmixed.shape[1] // n
    tissue = cv2.threshold(unmixed[4], t.tissue_od_sum, 1.0, cv2.THRESH_BINARY, dst=ws.get("tissue", unmixed[4].shape))[1]
    stained = cv2.threshold(dab.ravel(), t.dab_faint_od, 1.0, cv2.THRESH_BINARY, dst=ws.get("stained", tissue.shape))[1]
    product = ws.get("product", (px,))
    out = np.zeros((n, 5), np.float64)
    for i in range(n):
        mask = tissue[i * px: (i + 1) * px]
        out[i, 0] = cv2.sumElems(mask)[0]
        for j, plane in enumerate((unmixed[0], unmixed[1], dab.ravel(), stained), start=1):
            out[i, j] = cv2.sumElems(cv2.multiply(plane[i * px: (i + 1) * px], mask, dst=product))[0]
    out[:, 1:] /= np.maximum(out[:, :1], 1.0)
    out[:, 0] /= px
    return out


def _unmix(matrix: np.ndarray, od: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``matrix @ od`` into ``out`` (``(6, n)``), in single-threaded BLAS pieces (see ``_BLAS_COLUMNS``)."""
    for i in range(0, od.shape[1], _BLAS_COLUMNS):
        np.matmul(matrix, od[:, i: i + _BLAS_COLUMNS], out=out[:, i: i + _BLAS_COLUMNS])
    return out


def _levels(h1: np.ndarray, t) -> np.ndarray:
    """``(T,)`` float32 counterstain level of each tile: the ``counterstain_quantile`` order statistic
    of its smoothed counterstain OD over every second cell-grid pixel in each direction (as
    ``IhcDabScorer.counterstain_level``)."""
    sub = h1[:, ::2, ::2].reshape(h1.shape[0], -1)
    k = counterstain_rank(sub.shape[1], t.counterstain_quantile)
    return np.ascontiguousarray(np.partition(sub, k - 1, axis=1)[:, k - 1], dtype=np.float32)


def _relative_cut(level: np.ndarray, rel: float, floor: float) -> np.ndarray:
    """``max(level * rel, floor)`` in float32 (as ``IhcDabScorer.nucleus_thresholds``)."""
    return np.maximum(level * np.float32(rel), np.float32(floor))


def _seeds(nuclear: np.ndarray, t, plan: KernelPlan, ws: _Workspace) -> tuple[np.ndarray, ...]:
    """Nuclei on the ``(T, hc, wc)`` cell grids: flat indices of DoG maxima, each one's counts of other
    nuclei per window ``(N, K)``, each tile's counterstain level ``(T,)`` and the epithelium stencil's
    samples ``(N, S)`` (None under the cohesion model)."""
    n = nuclear.shape[0]
    h1, h2, dog, local_max = (ws.get(name, nuclear.shape) for name in ("h1", "h2", "dog", "local_max"))
    for i in range(n):
        _blur_into(nuclear[i], plan.nucleus, h1[i])
        _blur_into(nuclear[i], plan.surround, h2[i])
    np.subtract(h1, h2, out=dog)
    level = _levels(h1, t)
    contrast_min = _relative_cut(level, t.nuclear_contrast_rel, t.nuclear_contrast_min)
    od_min = _relative_cut(level, t.nuclear_od_rel, t.nuclear_od_min)
    quantised = ws.get("dog_q", dog.shape)  # maxima of the DoG rounded to 2**-20 OD (see DOG_QUANTUM_INV)
    np.rint(np.multiply(dog, np.float32(DOG_QUANTUM_INV), out=quantised), out=quantised)
    for i in range(n):
        cv2.dilate(quantised[i], plan.seed_window, dst=local_max[i], borderType=cv2.BORDER_CONSTANT, borderValue=-np.inf)
    seed_map = (quantised >= local_max) & (dog > contrast_min[:, None, None]) & (h1 > od_min[:, None, None])
    idx = np.flatnonzero(seed_map)
    counts = _window_counts(seed_map, idx, [k // 2 for k in plan.count_windows], ws) - 1.0
    samples = None if plan.stencil_offsets is None else _stencil_samples(h1, h2, idx, plan, ws)
    return idx, counts, level, samples


def _stencil_samples(h1: np.ndarray, h2: np.ndarray, idx: np.ndarray, plan: KernelPlan, ws: _Workspace) -> np.ndarray:
    """``(N, S)`` the epithelium stencil's samples of the two counterstain maps (nucleus scale and
    surround, each tile's map reflect-padded), at the seeds ``idx`` of the ``(T, hc, wc)`` grids."""
    n, hc, wc = h1.shape
    p = plan.stencil_pad
    hp, wp = hc + 2 * p, wc + 2 * p
    padded = ws.get("stencil_maps", (2, n, hp, wp))
    for i in range(n):
        cv2.copyMakeBorder(h1[i], p, p, p, p, cv2.BORDER_REFLECT_101, dst=padded[0, i])
        cv2.copyMakeBorder(h2[i], p, p, p, p, cv2.BORDER_REFLECT_101, dst=padded[1, i])
    tile, cell = np.divmod(idx, hc * wc)
    base = (tile * hp + cell // wc + p) * wp + cell % wc + p
    offsets = plan.stencil_maps * (n * hp * wp) + plan.stencil_offsets
    return np.take(padded.ravel(), base[:, None] + offsets[None, :])


def _window_counts(seed_map: np.ndarray, idx: np.ndarray, halves: list[int], ws: _Workspace) -> np.ndarray:
    """``(N, K)`` seeds of ``(T, hc, wc)`` maps within ``halves[k]`` cells (a square, cut at the tile edge)
    of each of ``idx``.

    Four reads of each tile's integral image per seed and window: the box sum with a zero border, exact.
    """
    n, hc, wc = seed_map.shape
    integral = ws.get("integral", (n, hc + 1, wc + 1)).view(np.int32)
    for i in range(n):
        cv2.integral(seed_map[i].view(np.uint8), sum=integral[i], sdepth=cv2.CV_32S)
    tile, cell = np.divmod(idx, hc * wc)
    y, x = np.divmod(cell, wc)
    flat, row = integral.reshape(-1), wc + 1
    base = tile * (hc + 1) * row
    out = np.empty((idx.size, len(halves)), np.float32)
    for j, half in enumerate(halves):
        y0, y1 = np.maximum(y - half, 0), np.minimum(y + half + 1, hc)
        x0, x1 = np.maximum(x - half, 0), np.minimum(x + half + 1, wc)
        out[:, j] = (flat[base + y1 * row + x1] - flat[base + y0 * row + x1] - flat[base + y1 * row + x0]
                     + flat[base + y0 * row + x0])
    return out


def _ray_contrast(dab: np.ndarray, idx: np.ndarray, grid_w: int, plan: KernelPlan, ws: _Workspace) -> np.ndarray:
    """``(N, n_directions)``: each seed's membrane contrast along each ray (``ihc_cells.ray_contrast``:
    the largest outward rise of the light loss over the lightest point before it, ``(m - b) / (1 - b)``).

    ``dab``: ``(T, H, W)`` brown DAB OD, turned into light loss ``1 - 10**-OD`` and blurred to the
    membrane resolution (each tile's map reflect-padded); ``idx``: the seeds' flat indices into
    the ``(T, hc, wc)`` cell grids.
    """
    f, p, h, w = plan.f, plan.pad, plan.h, plan.w
    n = dab.shape[0]
    padded = ws.get("loss_padded", (n, h + 2 * p, w + 2 * p))
    loss = ws.get("loss", (h, w))
    smooth = ws.get("loss_smooth", (h, w))
    for i in range(n):
        cv2.exp(cv2.multiply(dab[i], _MINUS_LN10, dst=loss), dst=loss)
        cv2.subtract(1.0, loss, dst=loss)
        cv2.copyMakeBorder(_blur_into(loss, plan.smooth, smooth), p, p, p, p, cv2.BORDER_REFLECT_101, dst=padded[i])
    tile, cell = np.divmod(idx, (h // f) * grid_w)
    base = (tile * (h + 2 * p) + (cell // grid_w) * f + f // 2 + p) * (w + 2 * p) + (cell % grid_w) * f + f // 2 + p
    # (L, N, n_directions) samples, outward along the outer axis
    samples = np.take(padded.ravel(), plan.ray_offsets_t + base.astype(np.int32)[:, None])
    return _largest_rise(samples)


def _largest_rise(samples: np.ndarray) -> np.ndarray:
    """``max_l (s_l - b_l) / (1 - b_l)`` over the outer axis of ``(L, N, R)``, ``b_l`` the lightest
    sample up to ``l``: step by step on ``(N, R)`` planes that stay in cache (4x faster than whole-array
    passes). A sample lighter than all before it rises by 0 either way, so ``b`` need not include it."""
    lightest = samples[0].copy()
    best = np.zeros_like(lightest)
    rise, room = np.empty_like(lightest), np.empty_like(lightest)
    for s in samples[1:]:
        np.subtract(s, lightest, out=rise)
        np.maximum(np.subtract(np.float32(1.0), lightest, out=room), np.float32(1e-3), out=room)
        np.maximum(best, np.divide(rise, room, out=rise), out=best)
        np.minimum(lightest, s, out=lightest)
    return best


@dataclass
class ChunkEvidence:
    """Steps 1-3 and the ray extrema of step 4 for ``T`` tiles (seed indices into the ``(T, hc, wc)`` grids)."""

    stats: np.ndarray
    idx: np.ndarray
    #: ``(N, K)`` other nuclei per count window (not edge-corrected).
    counts: np.ndarray
    ray_contrast: np.ndarray
    #: ``(T,)`` each tile's counterstain level.
    level: np.ndarray
    #: ``(N, S)`` epithelium stencil samples, or None (cohesion model).
    samples: np.ndarray | None


def _chunk(rgb: np.ndarray, tables: np.ndarray, plan: KernelPlan, ws: _Workspace) -> ChunkEvidence:
    """Steps 1-3 and the ray contrasts of step 4 for ``(T, 3, H, W)`` tiles (``tables``: their OD tables, see
    :func:`_glass_tables`).

    Per-pixel steps run once on the ``T`` tiles stacked as one ``(T * H, W)`` image (the same
    numbers as per tile: nothing there reads a neighbour); filters with a border run per tile.
    """
    t, h, w, f = plan.thresholds, plan.h, plan.w, plan.f
    n = rgb.shape[0]
    unmixed = _unmix(plan.unmix, _chunk_od(rgb, tables, plan, ws).reshape(3, -1), ws.get("unmixed", (6, n * h * w)))
    _clamp_low(unmixed[:4])  # stain ODs clamped at 0 (the four rows in one pass); the summed OD is not
    _clamp_low(unmixed[5])  # the counterstain OD (the nuclear channel) clamped at 0 as well
    stacked = unmixed.reshape(6, n * h, w)
    cells = _coarse_tiles(stacked[2:4].reshape(2 * n * h, w), 2 * n, f).reshape(2, n, h // f, w // f)
    dab = _brown_dab(cells, stacked[3], t, plan, ws)
    stats = _tissue_stats(unmixed, dab, t, n, ws)
    nuclear = _coarse_tiles(stacked[5], n, f)
    idx, counts, level, samples = _seeds(nuclear, t, plan, ws)
    return ChunkEvidence(stats, idx, counts, _ray_contrast(dab.reshape(n, h, w), idx, w // f, plan, ws), level, samples)


def area_fractions(idx: np.ndarray, n: int, plan: KernelPlan) -> np.ndarray:
    """``(n,)`` fraction of each tile's cell grid within the area window of a kept nucleus.

    ``idx``: the kept nuclei's flat indices into the ``(n, hc, wc)`` grids. The grids are dilated
    in one call, stacked with zero rows between them (as wide as the window's reach), which
    gives each grid its own zero border.
    """
    hc, wc, gap = plan.h // plan.f, plan.w // plan.f, plan.area_window.shape[0] // 2
    grid = np.zeros((n, hc + gap, wc), np.uint8)
    tile, cell = np.divmod(idx, hc * wc)
    grid[tile, cell // wc, cell % wc] = 1
    covered = cv2.dilate(grid.reshape(n * (hc + gap), wc), plan.area_window, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return np.count_nonzero(covered.reshape(n, hc + gap, wc)[:, :hc], axis=(1, 2)) / float(hc * wc)


def tile_threads(n_tiles: int, threads: int | None) -> int:
    """Threads the kernel spreads a batch over: ``threads`` (default: the CPUs this process may
    use, at most 8), with at least 4 tiles each."""
    want = threads if threads is not None else min(available_cpus(), 8)
    return max(1, min(int(want), n_tiles // _MIN_TILES_PER_THREAD))


def chunk_evidence(rgb: np.ndarray, plan: KernelPlan) -> list[ChunkEvidence]:
    """Steps 1-3 and the ray contrasts for ``(T, 3, H, W)`` tiles (uint8, or float in [0, 1]), in
    chunks of ``_CHUNK_TILES`` (seed indices into each chunk's own ``(t, hc, wc)`` grids)."""
    if rgb.dtype != np.uint8:
        rgb = rgb.astype(np.float32, copy=False)
    tables = _glass_tables(rgb, plan)
    with _workspaces(plan) as ws:
        return [_chunk(rgb[i: i + _CHUNK_TILES], tables[i: i + _CHUNK_TILES], plan, ws)
                for i in range(0, rgb.shape[0], _CHUNK_TILES)]
