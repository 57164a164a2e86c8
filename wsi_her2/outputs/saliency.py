"""Slide-level saliency for ``wsi-her2 score --explain``: Grad-CAM(++) on every scored tile.

Per-tile maps are reduced to a coarse grid (``GRID_PX`` x ``GRID_PX``) right away so memory stays
small whatever the slide size, pasted into a thumbnail-sized map and written as
``<slide-id>.saliency.png``; each tile's mean saliency also becomes a QuPath measurement.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from wsi_her2.errors import ConfigError

GRID_PX = 16


def tile_saliency(store, model, *, indices: NDArray[np.integer], method: str = "gradcam++", batch_size: int = 16,
                  device: str = "auto") -> NDArray[np.float32]:
    """``(len(indices), GRID_PX, GRID_PX)`` saliency in [0, 1] for the predicted class of each tile."""
    import torch
    import torch.nn.functional as F

    from wsi_her2.devices import resolve_device
    from wsi_her2.score.inference import preprocess_tiles
    from wsi_her2.train.explain import gradcam

    cfg = model.wsi_her2_config
    if not cfg.needs_weights:
        raise ConfigError(
            f"--explain needs a trained network; {cfg.name} is rule-based (its measurements, e.g. completeness "
            "and dab_od_membrane, are its explanation)"
        )
    dev = resolve_device(device)
    model = model.to(dev).eval()
    out = np.zeros((len(indices), GRID_PX, GRID_PX), np.float32)
    for start in range(0, len(indices), batch_size):
        idx = np.asarray(indices[start : start + batch_size])
        tiles = torch.from_numpy(store.read_tiles_at(idx)).to(dev)
        x = preprocess_tiles(tiles, input_px=cfg.input_px, mean=cfg.mean, std=cfg.std, stain_norm=cfg.stain_norm)
        cams = gradcam(model, x, method=method, layer="auto")
        small = F.adaptive_avg_pool2d(cams[:, None].float(), GRID_PX)[:, 0]
        out[start : start + len(idx)] = small.detach().cpu().numpy()
    return out


def slide_saliency_png(store, maps: NDArray[np.float32], indices: NDArray[np.integer], path) -> None:
    from wsi_her2.train.explain import paste_tile_heatmaps, save_slide_heatmap_png

    thumb = store.array("thumbnail")
    scale = float(store.attrs["thumbnail"]["px_per_level0_px"])
    coords = store.coords_level0[indices] * scale
    canvas = paste_tile_heatmaps(
        maps, np.round(coords).astype(int), tile_px=max(1, int(round(store.tile_size_level0 * scale))),
        canvas_hw_px=thumb.shape[:2], downsample=1.0,
    )
    save_slide_heatmap_png(canvas, path, thumbnail_rgb=thumb)
