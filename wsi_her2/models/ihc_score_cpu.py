"""The torch side of :class:`wsi_her2.models.ihc_score.IhcDabScorer`'s CPU kernel.

The kernel itself (numpy and OpenCV, no torch) is :mod:`wsi_her2.models.ihc_cpu_kernel`. Here:
its :class:`~wsi_her2.models.ihc_cpu_kernel.KernelPlan` built from a scorer (once per scorer and
tile size), a batch spread over ``threads`` tile threads (OpenCV and numpy release the GIL;
nothing process-wide is changed), and the chunks' numbers turned into the :class:`CellEvidence`
that the scorer's shared steps 4-6 take.
"""
from __future__ import annotations

import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from wsi_her2.models.ihc_cpu_kernel import (
    STAT_NAMES,
    ChunkEvidence,
    KernelPlan,
    area_fractions,
    chunk_evidence,
    tile_threads,
)
from wsi_her2.models.epithelium import MAP_SCALES
# ``scorer`` parameters are IhcDabScorer instances, typed Any: importing the class here would make
# a circle (ihc_score imports this module for its OpenCV kernel).
from wsi_her2.models.ihc_evidence import COUNTERSTAIN_FROM_RGB, CellEvidence, gaussian_taps, odd_px
from wsi_her2.stain.od import HED_FROM_RGB, HND_FROM_RGB, MIN_INTENSITY

__all__ = ["cell_evidence_opencv", "evidence_from_chunks", "kernel_plan", "tile_threads"]

#: Rows: hematoxylin, neutral, DAB (neutral basis), DAB (Ruifrok), summed OD, counterstain; columns R, G, B.
_UNMIX = np.concatenate([
    HND_FROM_RGB.T.numpy(), HED_FROM_RGB.T.numpy()[2:3], np.ones((1, 3)), COUNTERSTAIN_FROM_RGB.numpy()[None, :],
]).astype(np.float32)
#: log10 of the 256 intensity levels, the darkest clamped to one grey level (``MIN_INTENSITY``).
_LOG10_LEVELS = np.log10(np.maximum(np.arange(256, dtype=np.float32) / np.float32(255.0), np.float32(MIN_INTENSITY)))

#: Plans per scorer, by (thresholds, glass, µm/px, tile size); weak keys: a plan lives as long as its scorer.
_PLANS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def kernel_plan(scorer: Any, h: int, w: int) -> KernelPlan:
    """The scorer's plan for ``h x w`` tiles, built once (taps and ray offsets cost ~0.1 ms)."""
    plans = _PLANS.setdefault(scorer, {})
    key = (scorer.thresholds, scorer.glass_rgb, scorer.mpp_um, scorer.cell_grid_factor, scorer.tumour_model, h, w)
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = _plan(scorer, h, w)
    return plan


def _plan(scorer: Any, h: int, w: int) -> KernelPlan:
    t, f = scorer.thresholds, scorer.cell_grid_factor
    mpp_c = scorer.mpp_um * f
    hc, wc = h // f, w // f

    def taps(sigma_px: float, hh: int, ww: int) -> np.ndarray | None:
        k = gaussian_taps(sigma_px, hh, ww)
        return None if k is None else k.numpy().reshape(-1, 1)

    sigma1 = scorer.nucleus_sigma_px(mpp_c)
    seed_win = odd_px(t.seed_min_distance_um / mpp_c)
    area_win = odd_px(2 * t.cell_radius_um / mpp_c)
    pad = scorer.ray_pad_px(h, w)
    offsets = scorer.ray_offsets_flat(w + 2 * pad, pad).numpy().astype(np.int32)
    stencil_offsets, stencil_maps, stencil_pad = None, None, 0
    if scorer.tumour_model == "epithelium":
        stencil = scorer.nucleus_stencil()
        stencil_pad = min(stencil.pad, hc - 1, wc - 1)
        dy, dx = np.clip(stencil.dy, -stencil_pad, stencil_pad), np.clip(stencil.dx, -stencil_pad, stencil_pad)
        stencil_offsets = (dy * (wc + 2 * stencil_pad) + dx).astype(np.int64)
        stencil_maps = stencil.map_index.astype(np.int64)
    return KernelPlan(
        thresholds=t,
        glass_chroma=None if scorer.glass_chroma is None else scorer.glass_chroma.numpy(),
        unmix=_UNMIX, min_intensity=MIN_INTENSITY, log10_levels=_LOG10_LEVELS,
        h=h, w=w, f=f,
        chroma=taps(t.chroma_sigma_um / mpp_c, hc, wc),
        nucleus=taps(sigma1, hc, wc),
        surround=taps(MAP_SCALES[1] * sigma1, hc, wc),
        smooth=taps(scorer.membrane_sigma_px, h, w),
        seed_window=np.ones((seed_win, seed_win), np.uint8),
        count_windows=tuple(scorer.count_windows_px()),
        area_window=np.ones((area_win, area_win), np.uint8),
        pad=pad,
        ray_offsets=offsets,
        ray_offsets_t=np.ascontiguousarray(offsets.T)[:, None, :],
        stencil_pad=stencil_pad,
        stencil_offsets=stencil_offsets,
        stencil_maps=stencil_maps,
    )


def cell_evidence_opencv(scorer: Any, x: torch.Tensor, *, threads: int = 1) -> CellEvidence:
    """Steps 1-3 of ``scorer`` for a CPU batch ``(B, 3, H, W)``: float RGB in [0, 1], or uint8."""
    b, _, h, w = x.shape
    if b == 0:
        return scorer._cell_evidence_torch(x)
    plan = kernel_plan(scorer, h, w)
    rgb = x.detach().numpy()

    # One contiguous share of the batch per thread; the calling thread takes the first share itself.
    bounds = np.linspace(0, b, max(1, threads) + 1).astype(int)
    shares = [rgb[bounds[j]: bounds[j + 1]] for j in range(len(bounds) - 1)]
    if len(shares) > 1:
        with ThreadPoolExecutor(len(shares) - 1) as pool:
            helpers = pool.map(chunk_evidence, shares[1:], [plan] * (len(shares) - 1))
            chunks = chunk_evidence(shares[0], plan) + [c for share in helpers for c in share]
    else:
        chunks = chunk_evidence(shares[0], plan)
    return evidence_from_chunks(chunks, scorer, plan, b)


def evidence_from_chunks(chunks: list[ChunkEvidence], scorer: Any, plan: KernelPlan, b: int) -> CellEvidence:
    """The :class:`CellEvidence` of ``b`` tiles from their chunks, in order: tumour weights (the
    scorer's tumour model, applied once to every nucleus of the batch), tumour area."""
    grid_hw = (plan.h // plan.f, plan.w // plan.f)
    offsets = np.cumsum([0] + [c.stats.shape[0] for c in chunks[:-1]]) * (grid_hw[0] * grid_hw[1])
    idx_np = np.concatenate([c.idx + o for c, o in zip(chunks, offsets)]).astype(np.int64)
    tile_np, cell = np.divmod(idx_np, grid_hw[0] * grid_hw[1])
    cell_t = torch.from_numpy(cell)
    counts = torch.from_numpy(np.concatenate([c.counts for c in chunks]).astype(np.float32, copy=False))
    counts = scorer.edge_corrected_counts(counts, cell_t // grid_hw[1], cell_t % grid_hw[1], grid_hw)
    level = torch.from_numpy(np.concatenate([c.level for c in chunks]).astype(np.float32, copy=False))
    samples = None
    if plan.stencil_offsets is not None:
        samples = torch.from_numpy(np.concatenate([c.samples for c in chunks]).astype(np.float32, copy=False))
    weights = scorer.tumour_weights(counts, samples, level[torch.from_numpy(tile_np)])
    area = area_fractions(idx_np[(weights > 0.5).numpy()], b, plan)
    stats = torch.from_numpy(np.concatenate([c.stats for c in chunks]).astype(np.float32))
    rays = plan.ray_offsets.shape[0]
    contrast = np.concatenate([c.ray_contrast for c in chunks]).reshape(-1, rays)
    f = plan.f
    seed_yx = np.stack([(cell // grid_hw[1]) * f + f // 2, (cell % grid_hw[1]) * f + f // 2], axis=1)
    return CellEvidence(
        stats={name: stats[:, j] for j, name in enumerate(STAT_NAMES)}, seed_tile=torch.from_numpy(tile_np),
        seed_yx=torch.from_numpy(seed_yx), ray_contrast=torch.from_numpy(contrast.astype(np.float32, copy=False)),
        tumour_weight=weights, tumour_area_fraction=torch.from_numpy(area.astype(np.float32)),
        counts=counts, samples=samples, level=level,
    )
