"""Test-time augmentation: flips and 90-degree rotations, class probabilities averaged.

Tissue has no preferred orientation, so the eight symmetries of the square (the dihedral group
D4) are all valid views of a tile. The phased EfficientNetV2-S + ViT-B/16 study averaged seven
views (identity, h-flip, v-flip, h+v-flip, 90/180/270 rotations); h+v-flip equals the 180-degree
rotation, so ``"d4"`` here uses the eight distinct views instead. Shared by evaluation and scoring.
"""
from __future__ import annotations

from typing import Callable

import torch

View = Callable[[torch.Tensor], torch.Tensor]


def _rot(k: int) -> View:
    return lambda x: torch.rot90(x, k, dims=(-2, -1))


#: Named views on (B, C, H, W) tensors.
VIEWS: dict[str, View] = {
    "identity": lambda x: x,
    "hflip": lambda x: torch.flip(x, dims=(-1,)),
    "vflip": lambda x: torch.flip(x, dims=(-2,)),
    "rot90": _rot(1),
    "rot180": _rot(2),
    "rot270": _rot(3),
    "transpose": lambda x: x.transpose(-2, -1),
    "antitranspose": lambda x: torch.rot90(x, 2, dims=(-2, -1)).transpose(-2, -1),
}

#: Named sets of views (the CLI's choices come from here).
TTA_SETS: dict[str, tuple[str, ...]] = {
    "none": ("identity",),
    "flips": ("identity", "hflip", "vflip", "rot180"),
    "rot90": ("identity", "rot90", "rot180", "rot270"),
    "d4": tuple(VIEWS),
}


@torch.no_grad()
def tta_predict(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    views: str | tuple[str, ...] = "d4",
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Average softmax probabilities over augmented views of a batch.

    Parameters
    ----------
    model
        Patch classifier returning logits (B, n_classes); used as is (call ``model.eval()``).
    x
        Normalised float tensor (B, 3, H, W) on the model's device. Rotations need square tiles
        for models with a fixed input size (ViT).
    views
        A key of :data:`TTA_SETS` or a tuple of :data:`VIEWS` keys.
    amp_dtype
        Optional autocast dtype (e.g. ``torch.bfloat16`` on CUDA).

    Returns
    -------
    (B, n_classes) float32 probabilities on ``x.device``; rows sum to 1.
    """
    names = TTA_SETS[views] if isinstance(views, str) else tuple(views)
    probs = None
    for name in names:
        xv = VIEWS[name](x).contiguous()
        with torch.autocast(device_type=x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(xv)
        p = torch.softmax(logits.float(), dim=1)
        probs = p if probs is None else probs + p
    return probs / len(names)


@torch.no_grad()
def predict_proba(model: torch.nn.Module, x: torch.Tensor, *, tta: bool | str = False) -> torch.Tensor:
    """Probabilities for a batch, with TTA (``True`` -> ``"d4"``, or a set name) or without."""
    if tta:
        return tta_predict(model, x, views="d4" if tta is True else tta)
    return torch.softmax(model(x).float(), dim=1)
