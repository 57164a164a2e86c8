"""Grad-CAM(++) over a slide's scored tiles, for ``wsi-her2 score --explain``.

Per-tile maps are reduced to a coarse grid (:data:`GRID_PX` x :data:`GRID_PX`) right away, so memory stays
small whatever the slide size; each tile's mean saliency becomes a measurement, and the writers paste
the maps over the thumbnail (``<slide-id>.saliency.png``, :mod:`wsi_her2.outputs.saliency`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_her2.errors import ConfigError
from wsi_her2.models.capabilities import capabilities_of
from wsi_her2.result import Saliency

GRID_PX = 16


def tile_saliency(store: Any, model: Any, *, indices: NDArray[np.integer], method: str = "gradcam++", batch_size: int = 16,
                  device: str = "auto") -> Saliency:
    """Saliency in [0, 1] for the predicted class of each tile ``indices``: ``(len(indices), GRID_PX, GRID_PX)`` maps."""
    import torch
    import torch.nn.functional as F

    from wsi_her2.devices import resolve_device
    from wsi_her2.score.inference import preprocess_tiles
    from wsi_her2.train.explain import gradcam

    cfg = model.wsi_her2_config
    if not capabilities_of(model).gradients:
        raise ConfigError(
            f"--explain needs a trained network; {cfg.name} is rule-based (its measurements, e.g. completeness "
            "and dab_od_membrane, are its explanation)"
        )
    dev = resolve_device(device)
    model = model.to(dev).eval()
    indices = np.asarray(indices, dtype=np.int64)
    out = np.zeros((len(indices), GRID_PX, GRID_PX), np.float32)
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        tiles = torch.from_numpy(store.read_tiles_at(idx)).to(dev)
        x = preprocess_tiles(tiles, input_px=cfg.input_px, mean=cfg.mean, std=cfg.std, stain_norm=cfg.stain_norm)
        cams = gradcam(model, x, method=method, layer="auto")
        small = F.adaptive_avg_pool2d(cams[:, None].float(), GRID_PX)[:, 0]
        out[start : start + len(idx)] = small.detach().cpu().numpy()
    return Saliency(maps=out, tiles=indices)
