"""Grad-CAM and Grad-CAM++ for patch classifiers, a per-stage view, and overlay helpers.

Grad-CAM (Selvaraju et al.) weights a layer's feature maps by the spatial mean of the class
score's gradient; Grad-CAM++ (Chattopadhay et al.) weights positive gradients with per-pixel
coefficients so that several separate regions of one class all show up (relevant for IHC, where
membrane staining is scattered over many cells). Both need one forward and one backward pass,
batched; hooks capture the activation and its gradient, no extra dependency.

Layer choice (``layer="auto"``): the model's pooled feature map (the last CNN stage; EfficientNet's
``conv_head`` output). For a ViT the last block's *input* norm (``blocks[-1].norm1``) is used and
its patch tokens are reshaped to a grid: at the last block's output only the class token receives
gradient, so a CAM there would be blank. A hybrid explains through its CNN branch.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from wsi_her2.errors import ConfigError
from wsi_her2.outputs.saliency import overlay_heatmap

log = logging.getLogger(__name__)

METHODS = ("gradcam", "gradcam++")


# --------------------------------------------------------------------------------------------
# Layer resolution
# --------------------------------------------------------------------------------------------
def _name_of(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    return "?"


def _vit_fix(model: nn.Module, module: nn.Module) -> nn.Module:
    # A transformer block's output carries gradient only in the class token: use its input norm.
    if hasattr(module, "norm1") and hasattr(module, "attn"):
        return module.norm1
    blocks = getattr(module, "blocks", None)
    if isinstance(blocks, nn.Sequential) and len(blocks) and hasattr(blocks[-1], "norm1"):
        return blocks[-1].norm1
    return module


def _trace_outputs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """Modules in the order their forward finishes, with output shapes (one sample)."""
    seen: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    handles = []
    for name, m in model.named_modules():
        if name:
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: seen.append((name, mod, tuple(out.shape)))
                if isinstance(out, torch.Tensor) else None))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return seen


def resolve_layer(model: nn.Module, layer: str | nn.Module = "auto", *, x: torch.Tensor | None = None) -> tuple[str, nn.Module]:
    """The module to explain through, and its name.

    Parameters
    ----------
    layer
        ``"auto"``, a dotted module name (``"layer4"``, ``"features.stages.3"``), or a module.
    x
        A sample input, used by the fallback search for models unknown to the registry.
    """
    if isinstance(layer, nn.Module):
        return _name_of(model, layer), layer
    if layer != "auto":
        try:
            return layer, model.get_submodule(layer)
        except AttributeError:
            raise ConfigError(f"model has no layer {layer!r}; use --layer auto or a name from `--list-layers`") from None
    try:
        from wsi_her2.models.heads import gradcam_layer

        mod = _vit_fix(model, gradcam_layer(model))
        return _name_of(model, mod), mod
    except Exception as exc:  # not a registry model: search by output shapes
        log.debug("registry Grad-CAM layer unavailable (%s); tracing the forward pass", exc)
    if x is None:
        px = getattr(getattr(model, "wsi_her2_config", None), "input_px", 224)
        x = torch.zeros(1, 3, px, px, device=next(model.parameters()).device)
    trace = _trace_outputs(model, x)
    spatial = [(n, m) for n, m, s in trace if len(s) == 4 and s[2] * s[3] > 1 and "patch_embed" not in n]
    if spatial:
        return spatial[-1]
    tokens = [(n, m) for n, m, s in trace if len(s) == 3 and n.endswith("norm1")]
    if tokens:
        return tokens[-1]
    raise ConfigError("found no spatial feature map to explain in this model; pass --layer NAME")


def stage_layers(model: nn.Module, *, max_vit_stages: int = 4) -> list[tuple[str, nn.Module]]:
    """One layer per network stage, input side first, ending with the ``auto`` layer.

    Uses timm's ``feature_info`` of the (first) backbone; a ViT gets ``max_vit_stages`` evenly
    spaced blocks. Models without ``feature_info`` fall back to the last module at each spatial
    resolution of the forward pass.
    """
    auto_name, auto_mod = resolve_layer(model, "auto")
    for prefix, sub in model.named_modules():
        info = getattr(sub, "feature_info", None)
        if not info:
            continue
        dicts = info if isinstance(info, list) else info.get_dicts()
        names = [d["module"] for d in dicts]
        pre = f"{prefix}." if prefix else ""
        if hasattr(sub, "patch_embed") and hasattr(sub, "blocks"):
            idx = np.unique(np.linspace(0, len(names) - 1, min(max_vit_stages, len(names))).round().astype(int))
            out = [(f"{pre}{names[i]}.norm1", sub.get_submodule(f"{names[i]}.norm1")) for i in idx]
        else:
            out = [(pre + n, sub.get_submodule(n)) for n in names]
        if out[-1][1] is not auto_mod and all(m is not auto_mod for _, m in out):
            out.append((auto_name, auto_mod))
        return out
    px = getattr(getattr(model, "wsi_her2_config", None), "input_px", 64)
    trace = _trace_outputs(model, torch.zeros(1, 3, px, px, device=next(model.parameters()).device))
    by_size: dict[tuple[int, int], tuple[str, nn.Module]] = {}
    for n, m, s in trace:
        if len(s) == 4 and s[2] * s[3] > 1:
            by_size.pop(s[2:], None)
            by_size[s[2:]] = (n, m)  # re-insert: dict order follows the last module per size
    return list(by_size.values()) or [(auto_name, auto_mod)]


# --------------------------------------------------------------------------------------------
# CAM computation
# --------------------------------------------------------------------------------------------
def _to_grid(t: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) as is; ViT tokens (B, N, C) -> (B, C, s, s) without the prefix tokens."""
    if t.ndim == 4:
        return t
    if t.ndim == 3:
        n = t.shape[1]
        s = int(math.isqrt(n))
        prefix = n - s * s
        if prefix > 8:  # not a square grid of patch tokens plus a few class/register tokens
            raise ConfigError(f"cannot reshape {n} tokens to a square grid; choose a convolutional layer")
        return t[:, prefix:].transpose(1, 2).reshape(t.shape[0], t.shape[2], s, s)
    raise ConfigError(f"cannot explain through a layer with output shape {tuple(t.shape)}")


def _cam_from(act: torch.Tensor, grad: torch.Tensor, method: str) -> torch.Tensor:
    a, g = _to_grid(act).float(), _to_grid(grad).float()
    if method == "gradcam":
        weights = g.mean(dim=(2, 3), keepdim=True)
    else:  # Grad-CAM++ with the exponential-score closed form
        g2, g3 = g.pow(2), g.pow(3)
        sum_a = a.sum(dim=(2, 3), keepdim=True)
        denom = 2 * g2 + sum_a * g3
        alpha = torch.where(g != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g))
        weights = (alpha * torch.relu(g)).sum(dim=(2, 3), keepdim=True)
    return torch.relu((weights * a).sum(dim=1))


def _normalise(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    up = nn.functional.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    flat = up.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 1e-12, (flat - lo) / torch.where(span > 1e-12, span, torch.ones_like(span)),
                      torch.zeros_like(flat))
    return out.view_as(up)


def cams_for_layers(
    model: nn.Module,
    x: torch.Tensor,
    layers: Sequence[nn.Module],
    *,
    method: str = "gradcam",
    target: int | Sequence[int] | torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """CAMs for several layers from one forward/backward pass.

    Returns
    -------
    (cams, logits): ``cams[i]`` is (B, H, W) in [0, 1] on ``x.device``; ``logits`` detached.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}")
    acts: dict[int, torch.Tensor] = {}
    grads: dict[int, torch.Tensor] = {}

    def make_hook(i: int):
        def hook(mod, inp, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            acts[i] = t.detach()
            if t.requires_grad:
                t.register_hook(lambda g: grads.__setitem__(i, g.detach()))
        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            xin = x.detach().clone().requires_grad_(True)  # so frozen models still build a graph
            logits = model(xin)
            if target is None:
                idx = logits.argmax(1)
            else:
                idx = torch.as_tensor(target, device=logits.device).long().expand(logits.shape[0])
            score = logits.gather(1, idx[:, None]).sum()
            model.zero_grad(set_to_none=True)
            score.backward()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    size = tuple(x.shape[-2:])
    cams = []
    for i in range(len(layers)):
        if i not in grads:
            raise ConfigError(f"layer {i} received no gradient; it does not influence the output")
        cams.append(_normalise(_cam_from(acts[i], grads[i], method), size).detach())
    return cams, logits.detach()


def gradcam(
    model: nn.Module,
    x: torch.Tensor,
    *,
    method: str = "gradcam",
    layer: str | nn.Module = "auto",
    target: int | Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Class-activation heatmaps for a batch.

    Parameters
    ----------
    model
        Patch classifier (logits out); its training mode is restored afterwards.
    x
        Normalised float tensor (B, 3, H, W) on the model's device.
    method
        ``"gradcam"`` or ``"gradcam++"``.
    layer
        ``"auto"`` (see module docstring), a module name, or a module.
    target
        Class index (one for all, or one per sample); None explains each sample's predicted class.

    Returns
    -------
    (B, H, W) float tensor in [0, 1] on ``x.device`` (all zeros where the map is flat).
    """
    _, mod = resolve_layer(model, layer, x=x)
    cams, _ = cams_for_layers(model, x, [mod], method=method, target=target)
    return cams[0]


def stage_cams(
    model: nn.Module, x: torch.Tensor, *, method: str = "gradcam", target: int | None = None
) -> list[tuple[str, torch.Tensor]]:
    """One CAM per stage (see :func:`stage_layers`), for the per-stage view."""
    layers = stage_layers(model)
    cams, _ = cams_for_layers(model, x, [m for _, m in layers], method=method, target=target)
    return [(n, c) for (n, _), c in zip(layers, cams)]


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------
def save_stage_row_png(
    rgb: NDArray[np.uint8], cams: Sequence[tuple[str, NDArray]], path: str | Path, *, title: str = ""
) -> Path:
    """A row: the tile, then one overlay per stage (input side left), titled by layer name."""
    from wsi_her2.train.evaluate import new_figure

    n = len(cams) + 1
    fig, axes = new_figure(n, figsize=(2.6 * n, 2.9), dpi=110, purpose="saliency pictures")
    axes = np.atleast_1d(axes)
    axes[0].imshow(rgb)
    axes[0].set_title("tile", fontsize=9)
    for ax, (name, heat) in zip(axes[1:], cams):
        ax.imshow(overlay_heatmap(rgb, np.asarray(heat)))
        ax.set_title(name, fontsize=8)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
