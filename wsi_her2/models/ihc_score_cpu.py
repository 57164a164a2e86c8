"""The CPU kernel of :class:`wsi_her2.models.ihc_score.IhcDabScorer`: steps 1-3 per tile with OpenCV.

Same definitions as the torch kernel (``IhcDabScorer._cell_evidence_torch``), computed per tile
on planar float32 numpy arrays, where OpenCV's separable filters and morphology run 10-50x
faster than torch's CPU convolutions and pooling on 224 px images:

- background ``I0``: the per-channel quantile read from an 8-bit histogram (exact for 8-bit
  input, which is what the tile store holds; within 1/510 of the intensity otherwise);
- optical density and unmixing: one ``(5, 3) @ (3, H*W)`` product (in single-threaded BLAS pieces) for hematoxylin, neutral,
  DAB (neutral basis), DAB (Ruifrok) and the summed OD;
- Gaussian blurs with the same taps (:func:`wsi_her2.models.ihc_score._gaussian_taps`) and the same
  reflect border (``BORDER_REFLECT_101``), block means by ``INTER_AREA`` at integer factors,
  bilinear upsampling with half-pixel centres (as ``F.interpolate(align_corners=False)``),
  local maxima by a rectangular dilation with the border ignored (as ``max_pool2d``),
  neighbour counts by an unnormalised box filter with a zero border.

Tiles of a batch are spread over ``torch.get_num_threads()`` threads (OpenCV and numpy release
the GIL); nothing process-wide is changed. ``tests/test_ihc_kernels.py`` holds this kernel and
the torch one to the same calls and measurements on real and synthetic tiles.
"""
from __future__ import annotations

import math
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from wsi_her2.models.ihc_score import CellEvidence, IhcDabScorer, _gaussian_taps, _odd
from wsi_her2.stain.od import HED_FROM_RGB, HND_FROM_RGB, MIN_INTENSITY

__all__ = ["cell_evidence_opencv"]

STAT_NAMES = ("tissue_fraction", "hematoxylin_od_mean", "neutral_od_mean", "dab_od_mean", "stained_fraction")
#: Rows: hematoxylin, neutral, DAB (neutral basis), DAB (Ruifrok), summed OD; columns R, G, B.
_UNMIX = np.concatenate([
    HND_FROM_RGB.T.numpy(), HED_FROM_RGB.T.numpy()[2:3], np.ones((1, 3)),
]).astype(np.float32)
_MIN_TILES_PER_THREAD = 4
#: Columns per BLAS call. numpy's BLAS (OpenBLAS) wakes its own thread pool for larger products
#: and dot products (~16k+ and 10k+ elements), whose workers then spin beside the kernel's tile
#: threads: measured here, two tile threads cost 2x the CPU of one. Below these sizes every call
#: stays on the calling thread, with the same per-element arithmetic (so the same numbers).
_BLAS_COLUMNS = 8192
#: The 256 intensity levels as float32 (``k / 255``, as ``uint8 tensor / 255`` gives them).
_LEVELS = np.arange(256, dtype=np.float32) / np.float32(255.0)
#: log10 of the 256 intensity levels, the darkest clamped to one grey level (``MIN_INTENSITY``).
_LOG10_LEVELS = np.log10(np.maximum(np.arange(256, dtype=np.float32) / np.float32(255.0), np.float32(MIN_INTENSITY)))


@dataclass(frozen=True)
class _Plan:
    """Per-scorer, per-tile-size constants: taps and window sizes in pixels."""

    h: int
    w: int
    f: int
    chroma: np.ndarray | None
    nucleus: np.ndarray | None
    surround: np.ndarray | None
    smooth: np.ndarray | None
    seed_window: np.ndarray
    cohesion_px: int
    area_window: np.ndarray
    pad: int
    ray_offsets: np.ndarray
    #: ``ray_offsets`` as ``(L, 1, n_directions)``: gathered samples reduce over the outer axis (one SIMD pass).
    ray_offsets_t: np.ndarray
    #: Idle per-share buffer sets (see :func:`_workspaces`), reused batch after batch.
    idle: list = field(default_factory=list, compare=False, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)


#: Plans per scorer, by (thresholds, µm/px, tile size); weak keys: a plan lives as long as its scorer.
_PLANS: "weakref.WeakKeyDictionary[IhcDabScorer, dict]" = weakref.WeakKeyDictionary()


def _cached_plan(scorer: IhcDabScorer, h: int, w: int) -> _Plan:
    """The scorer's plan for ``h x w`` tiles, built once (taps and ray offsets cost ~0.1 ms)."""
    plans = _PLANS.setdefault(scorer, {})
    key = (scorer.thresholds, scorer.mpp_um, scorer.cell_grid_factor, h, w)
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = _plan(scorer, h, w)
    return plan


def _plan(scorer: IhcDabScorer, h: int, w: int) -> _Plan:
    t, f = scorer.thresholds, scorer.cell_grid_factor
    mpp_c = scorer.mpp_um * f
    hc, wc = h // f, w // f

    def taps(sigma_px: float, hh: int, ww: int) -> np.ndarray | None:
        k = _gaussian_taps(sigma_px, hh, ww)
        return None if k is None else k.numpy().reshape(-1, 1)

    sigma1 = t.nucleus_diameter_um / (2.0 * math.sqrt(2.0)) / mpp_c
    seed_win = _odd(t.seed_min_distance_um / mpp_c)
    area_win = _odd(2 * t.cell_radius_um / mpp_c)
    pad = scorer.ray_pad_px(h, w)
    offsets = scorer.ray_offsets_flat(w + 2 * pad, pad).numpy().astype(np.int32)
    return _Plan(
        h=h, w=w, f=f,
        chroma=taps(t.chroma_sigma_um / mpp_c, hc, wc),
        nucleus=taps(sigma1, hc, wc),
        surround=taps(1.6 * sigma1, hc, wc),
        smooth=taps(t.dab_smooth_sigma_um / scorer.mpp_um, h, w),
        seed_window=np.ones((seed_win, seed_win), np.uint8),
        cohesion_px=_odd(t.cohesion_window_um / mpp_c),
        area_window=np.ones((area_win, area_win), np.uint8),
        pad=pad,
        ray_offsets=offsets,
        ray_offsets_t=np.ascontiguousarray(offsets.T)[:, None, :],
    )


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


class _workspaces:
    """``with _workspaces(plan) as ws``: an idle buffer set of ``plan`` (a new one when all are busy)."""

    def __init__(self, plan: _Plan) -> None:
        self._plan = plan

    def __enter__(self) -> _Workspace:
        with self._plan.lock:
            self._ws = self._plan.idle.pop() if self._plan.idle else _Workspace()
        return self._ws

    def __exit__(self, *exc: object) -> None:
        with self._plan.lock:
            self._plan.idle.append(self._ws)


def _blur(img: np.ndarray, taps: np.ndarray | None) -> np.ndarray:
    if taps is None:
        return img
    return cv2.sepFilter2D(img, cv2.CV_32F, taps, taps, borderType=cv2.BORDER_REFLECT_101)


def _planes_u8(rgb: np.ndarray) -> list[np.ndarray]:
    """Three ``(H, W)`` uint8 planes of one ``(3, H, W)`` tile: uint8, or float in [0, 1], any strides."""
    _, h, w = rgb.shape
    hwc = np.moveaxis(rgb, 0, -1)  # a view; contiguous for channels-last memory (what the loader hands over)
    if hwc.flags.c_contiguous:
        u8 = hwc if rgb.dtype == np.uint8 else cv2.convertScaleAbs(hwc.reshape(h, w * 3), alpha=255.0).reshape(h, w, 3)
        return list(cv2.split(u8))
    if rgb.dtype == np.uint8:
        return [np.ascontiguousarray(rgb[c]) for c in range(3)]
    u8 = cv2.convertScaleAbs(np.ascontiguousarray(rgb).reshape(3 * h, w), alpha=255.0)
    return [u8[c * h: (c + 1) * h] for c in range(3)]


def _optical_density(planes: list[np.ndarray], scorer: IhcDabScorer, ws: _Workspace) -> np.ndarray:
    """``(3, H*W)`` float32 OD against the tile's glass, as ``estimate_background`` + ``rgb_to_od``.

    The glass quantile comes from each plane's histogram and the OD from a 256-entry table per
    channel (``max(0, log10(I0) - log10(max(I, 1/255)))``), both exact at 8 bits.
    """
    t = scorer.thresholds
    h, w = planes[0].shape
    k = min(h * w, max(1, int(round(t.background_quantile * h * w))))
    hist = np.stack([cv2.calcHist([p], [0], None, [256], [0, 256]).ravel() for p in planes])
    # The k-th smallest level: the number of levels whose cumulative count is still below k.
    i0 = np.count_nonzero(np.cumsum(hist, axis=1) < k - 0.5, axis=1).astype(np.float32) / np.float32(255.0)
    i0 = np.clip(np.maximum(i0, i0.max() * np.float32(1.0 - t.background_max_cast)), t.background_min_intensity, 1.0)
    tables = np.maximum(np.log10(i0.astype(np.float32)).reshape(3, 1) - _LOG10_LEVELS, np.float32(0.0))
    od = ws.get("od", (3, h * w))
    for c in range(3):
        cv2.LUT(planes[c], tables[c], dst=od[c].reshape(h, w))
    return od


def _optical_density_float(rgb: np.ndarray, scorer: IhcDabScorer) -> np.ndarray:
    """As :func:`_optical_density` for float input that is not 8-bit: exact quantile, per-pixel logs."""
    t = scorer.thresholds
    _, h, w = rgb.shape
    flat = np.ascontiguousarray(rgb, dtype=np.float32).reshape(3, h * w)
    k = min(h * w, max(1, int(round(t.background_quantile * h * w))))
    i0 = np.partition(flat, k - 1, axis=1)[:, k - 1]
    i0 = np.clip(np.maximum(i0, i0.max() * np.float32(1.0 - t.background_max_cast)), t.background_min_intensity, 1.0)
    od = np.log10(i0.astype(np.float32)).reshape(3, 1) - np.log10(np.maximum(flat, np.float32(MIN_INTENSITY)))
    return np.maximum(od, np.float32(0.0), out=od)


def _tile_od(rgb: np.ndarray, scorer: IhcDabScorer, ws: _Workspace) -> np.ndarray:
    """``(3, H*W)`` OD of one tile: by 256-entry tables when its values are 8-bit levels (exact)."""
    planes = _planes_u8(rgb)
    if rgb.dtype != np.uint8 and any(
        cv2.norm(cv2.LUT(p, _LEVELS), np.ascontiguousarray(rgb[c]), cv2.NORM_INF) > 0 for c, p in enumerate(planes)
    ):
        return _optical_density_float(rgb, scorer)
    return _optical_density(planes, scorer, ws)


def _coarse(img: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return img
    hc, wc = img.shape[0] // f, img.shape[1] // f
    return cv2.resize(img[: hc * f, : wc * f], (wc, hc), interpolation=cv2.INTER_AREA)


def _clamp_low(img: np.ndarray) -> np.ndarray:
    """``max(img, 0)`` in place (OpenCV's to-zero threshold: one SIMD pass)."""
    cv2.threshold(img, 0.0, 0.0, cv2.THRESH_TOZERO, dst=img)
    return img


def _brown_dab(dab_hnd: np.ndarray, dab_hed: np.ndarray, t, plan: _Plan, ws: _Workspace) -> np.ndarray:
    """Brown DAB OD at tile resolution: Ruifrok DAB times its brown share, read on the cell grid."""
    f, h, w = plan.f, plan.h, plan.w
    hed_s = _blur(_coarse(dab_hed, f), plan.chroma)
    share = _blur(_coarse(dab_hnd, f), plan.chroma) / np.maximum(hed_s, np.float32(t.chroma_min_od))
    share *= np.float32(1.0 / t.brown_full_share)
    brown = _clamp_low(cv2.threshold(share, 1.0, 0.0, cv2.THRESH_TRUNC)[1])  # clip to [0, 1]
    if f > 1:
        hc, wc = brown.shape
        if (hc * f, wc * f) == (h, w):
            brown = cv2.resize(brown, (w, h), dst=ws.get("brown", (h, w)), interpolation=cv2.INTER_LINEAR)
        else:
            brown = cv2.resize(brown, (wc * f, hc * f), interpolation=cv2.INTER_LINEAR)
            brown = cv2.copyMakeBorder(brown, 0, h - hc * f, 0, w - wc * f, cv2.BORDER_REPLICATE)
    dab = cv2.multiply(dab_hed, brown, dst=ws.get("dab", (h, w)))
    if t.dab_gain != 1.0:
        dab *= np.float32(t.dab_gain)
    return dab


def _tissue_stats(od_sum: np.ndarray, hema: np.ndarray, neutral: np.ndarray, dab: np.ndarray, t,
                  ws: _Workspace) -> tuple[float, ...]:
    """The five per-tile tissue statistics of :data:`STAT_NAMES`."""
    tissue = cv2.threshold(od_sum, t.tissue_od_sum, 1.0, cv2.THRESH_BINARY, dst=ws.get("tissue", od_sum.shape))[1].ravel()
    stained = cv2.threshold(dab, t.dab_faint_od, 1.0, cv2.THRESH_BINARY, dst=ws.get("stained", dab.shape))[1].ravel()
    n_tissue = float(tissue.sum())
    denom = max(n_tissue, 1.0)
    return (
        n_tissue / float(tissue.size), _dot(hema.ravel(), tissue) / denom, _dot(neutral.ravel(), tissue) / denom,
        _dot(dab.ravel(), tissue) / denom, _dot(stained, tissue) / denom,
    )


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """``a @ b`` of two float32 vectors, in single-threaded BLAS pieces (see ``_BLAS_COLUMNS``)."""
    return float(sum(float(a[i: i + _BLAS_COLUMNS] @ b[i: i + _BLAS_COLUMNS]) for i in range(0, a.size, _BLAS_COLUMNS)))


def _unmix(od: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``_UNMIX @ od`` into ``out`` (``(5, n)``), in single-threaded BLAS pieces (see ``_BLAS_COLUMNS``)."""
    for i in range(0, od.shape[1], _BLAS_COLUMNS):
        np.matmul(_UNMIX, od[:, i: i + _BLAS_COLUMNS], out=out[:, i: i + _BLAS_COLUMNS])
    return out


def _seeds(nuclear: np.ndarray, t, plan: _Plan) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei on the cell grid: flat indices of DoG maxima, and each one's count of other nuclei nearby."""
    h1 = _blur(nuclear, plan.nucleus)
    dog = h1 - _blur(nuclear, plan.surround)
    local_max = cv2.dilate(dog, plan.seed_window, borderType=cv2.BORDER_CONSTANT, borderValue=-np.inf)
    seed_map = (dog >= local_max) & (dog > t.dog_contrast_min) & (h1 > t.hema_od_min)
    idx = np.flatnonzero(seed_map)
    k = plan.cohesion_px
    box = cv2.boxFilter(seed_map.view(np.uint8), cv2.CV_32F, (k, k), normalize=False, borderType=cv2.BORDER_CONSTANT)
    return idx, box.ravel()[idx] - 1.0


def _ray_maxima(dab: np.ndarray, idx: np.ndarray, grid_w: int, plan: _Plan, ws: _Workspace) -> np.ndarray:
    """``(N, n_directions)`` maxima of the smoothed DAB along each seed's rays (reflect-padded map)."""
    f, p, w = plan.f, plan.pad, plan.w
    smooth = dab if plan.smooth is None else cv2.sepFilter2D(
        dab, cv2.CV_32F, plan.smooth, plan.smooth, dst=ws.get("dab_smooth", dab.shape), borderType=cv2.BORDER_REFLECT_101)
    dab_s = cv2.copyMakeBorder(smooth, p, p, p, p, cv2.BORDER_REFLECT_101,
                               dst=ws.get("dab_padded", (dab.shape[0] + 2 * p, dab.shape[1] + 2 * p)))
    base = ((idx // grid_w) * f + f // 2 + p) * (w + 2 * p) + (idx % grid_w) * f + f // 2 + p
    # (L, N, n_directions) samples, the maximum over the outer axis: elementwise, not a reduction per ray
    return np.take(dab_s.ravel(), plan.ray_offsets_t + base.astype(np.int32)[:, None]).max(axis=0)


def _tile(rgb: np.ndarray, scorer: IhcDabScorer, plan: _Plan, ws: _Workspace):
    """Steps 1-3 and the ray maxima of step 4 for one ``(3, H, W)`` tile.

    Returns the five tissue statistics, the seeds' flat cell-grid indices, their neighbour
    counts, the cell-grid shape and the ``(N, n_directions)`` ray maxima.
    """
    t, h, w = scorer.thresholds, plan.h, plan.w
    unmixed = _unmix(_tile_od(rgb, scorer, ws), ws.get("unmixed", (5, h * w)))
    _clamp_low(unmixed[:4])  # stain ODs clamped at 0 (the four rows in one pass); the summed OD is not
    hema, neutral, dab_hnd, dab_hed, od_sum = unmixed.reshape(5, h, w)
    dab = _brown_dab(dab_hnd, dab_hed, t, plan, ws)
    stats = _tissue_stats(od_sum, hema, neutral, dab, t, ws)
    nuclear = _coarse(cv2.add(hema, neutral), plan.f)
    idx, neighbours = _seeds(nuclear, t, plan)
    return stats, idx, neighbours, nuclear.shape, _ray_maxima(dab, idx, nuclear.shape[1], plan, ws)


def _area_fraction(idx: np.ndarray, keep: np.ndarray, shape: tuple[int, int], plan: _Plan) -> float:
    """Fraction of the cell grid within the area window of a kept nucleus."""
    if not keep.any():
        return 0.0
    grid = np.zeros(shape, np.uint8)
    grid.ravel()[idx[keep]] = 1
    covered = cv2.dilate(grid, plan.area_window, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return cv2.countNonZero(covered) / float(shape[0] * shape[1])


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under ``taskset`` or a batch scheduler)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return os.cpu_count() or 1


def tile_threads(n_tiles: int, threads: int | None) -> int:
    """Threads the kernel spreads a batch over: ``threads`` (default: the CPUs this process may
    use, at most 8), with at least 4 tiles each."""
    want = threads if threads is not None else min(available_cpus(), 8)
    return max(1, min(int(want), n_tiles // _MIN_TILES_PER_THREAD))


def cell_evidence_opencv(scorer: IhcDabScorer, x: torch.Tensor, *, threads: int = 1) -> CellEvidence:
    """Steps 1-3 of ``scorer`` for a CPU batch ``(B, 3, H, W)``: float RGB in [0, 1], or uint8."""
    b, _, h, w = x.shape
    if b == 0:
        return scorer._cell_evidence_torch(x)
    plan = _cached_plan(scorer, h, w)
    rgb = x.detach().numpy()
    if rgb.dtype != np.uint8:
        rgb = rgb.astype(np.float32, copy=False)

    def run(tiles: range) -> list:
        with _workspaces(plan) as ws:
            return [_tile(rgb[i], scorer, plan, ws) for i in tiles]

    # One contiguous share of the batch per thread; the calling thread takes the first share itself.
    bounds = np.linspace(0, b, max(1, threads) + 1).astype(int)
    shares = [range(bounds[j], bounds[j + 1]) for j in range(len(bounds) - 1)]
    if len(shares) > 1:
        with ThreadPoolExecutor(len(shares) - 1) as pool:
            helpers = pool.map(run, shares[1:])
            per_tile = run(shares[0]) + [r for share in helpers for r in share]
    else:
        per_tile = run(shares[0])

    counts = [len(p[1]) for p in per_tile]
    seed_tile = torch.from_numpy(np.repeat(np.arange(b, dtype=np.int64), counts))
    neighbours = torch.from_numpy(np.concatenate([p[2] for p in per_tile]).astype(np.float32))
    idx = torch.from_numpy(np.concatenate([p[1] for p in per_tile]).astype(np.int64))
    grid_hw = per_tile[0][3]
    neighbours = scorer.edge_corrected_neighbours(neighbours, idx // grid_hw[1], idx % grid_hw[1], grid_hw)
    weights = scorer._cohesion_weight(neighbours)
    keep = (weights > 0.5).numpy()
    starts = np.concatenate([[0], np.cumsum(counts)])
    area = [_area_fraction(p[1], keep[starts[i]: starts[i + 1]], p[3], plan) for i, p in enumerate(per_tile)]
    stats = torch.tensor([p[0] for p in per_tile], dtype=torch.float32).reshape(b, len(STAT_NAMES))
    ray_max = np.concatenate([p[4] for p in per_tile]).reshape(-1, plan.ray_offsets.shape[0])
    return CellEvidence(
        stats={name: stats[:, j] for j, name in enumerate(STAT_NAMES)}, seed_tile=seed_tile,
        ray_max=torch.from_numpy(ray_max.astype(np.float32, copy=False)),
        tumour_weight=weights, tumour_area_fraction=torch.tensor(area, dtype=torch.float32),
    )
