"""Classification heads, the backbone+head wrapper, and helpers that see through both layouts.

Two module layouts leave the registry:

* a plain timm model with its own linear classifier (``head="linear"`` on a timm entry), so that
  its state_dict keys stay those of timm checkpoints;
* :class:`FeatureClassifier`: ``features`` (input -> pooled vector) followed by ``head``, used by
  every other head and by the custom architectures.

:func:`parameter_groups` and :func:`gradcam_layer` hide the difference from training and
explanation code.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from wsi_her2.errors import ConfigError
from wsi_her2.models.config import HEAD_NAMES, ModelConfig


class FeatureClassifier(nn.Module):
    """A pooled-feature extractor followed by a classification head.

    Parameters
    ----------
    features
        Module mapping ``(B, 3, H, W)`` to ``(B, num_features)``.
    head
        Module mapping ``(B, num_features)`` to logits ``(B, n_classes)``.
    num_features
        Width of the pooled feature vector.
    """

    def __init__(self, features: nn.Module, head: nn.Module, *, num_features: int) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.num_features = int(num_features)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, num_features)``."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _linear(in_features: int, n_classes: int, config: ModelConfig) -> nn.Module:
    return nn.Linear(in_features, n_classes)


def _mlp512_256(in_features: int, n_classes: int, config: ModelConfig) -> nn.Module:
    # Abdel-Hamid (paper 001, ConvNeXt for HER2 scoring): GAP -> FC512 -> dropout -> FC256 ->
    # dropout -> softmax. The paper names no activation; ReLU is the Keras default it implies.
    p = config.dropout
    return nn.Sequential(
        nn.Linear(in_features, 512), nn.ReLU(inplace=True), nn.Dropout(p),
        nn.Linear(512, 256), nn.ReLU(inplace=True), nn.Dropout(p),
        nn.Linear(256, n_classes),
    )


def _fusion1024_512(in_features: int, n_classes: int, config: ModelConfig) -> nn.Module:
    # Khaled et al. (paper 002, EfficientNetV2-S + ViT-B/16 hybrid), section 3.3, verbatim:
    # fusion block LayerNorm -> Linear(in, 1024) -> GELU -> LayerNorm(1024) -> Dropout(0.6)
    # -> Linear(1024, 1024); classifier LayerNorm(1024) -> Linear(1024, 512) -> GELU
    # -> Dropout(0.7) -> Linear(512, n_classes).
    fusion_p = float(config.extra.get("fusion_dropout", 0.6))
    return nn.Sequential(
        nn.LayerNorm(in_features), nn.Linear(in_features, 1024), nn.GELU(),
        nn.LayerNorm(1024), nn.Dropout(fusion_p), nn.Linear(1024, 1024),
        nn.LayerNorm(1024), nn.Linear(1024, 512), nn.GELU(), nn.Dropout(config.dropout),
        nn.Linear(512, n_classes),
    )


HEADS: dict[str, Callable[[int, int, ModelConfig], nn.Module]] = {
    "linear": _linear,
    "mlp512_256": _mlp512_256,
    "fusion1024_512": _fusion1024_512,
}
assert set(HEADS) | {"none"} == set(HEAD_NAMES), "HEADS and config.HEAD_NAMES drifted apart"


def build_head(in_features: int, config: ModelConfig) -> nn.Module:
    """Build ``config.head`` on top of ``in_features`` pooled features."""
    try:
        builder = HEADS[config.head]
    except KeyError:
        raise ConfigError(
            f"model {config.name!r} cannot use head {config.head!r}; choose one of {', '.join(HEADS)}"
        ) from None
    return builder(int(in_features), config.n_classes, config)


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    if isinstance(model, FeatureClassifier):
        return model.features, model.head
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):  # a timm model with its own classifier
        return model, get_classifier()
    return model, None


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Split parameters into ``"backbone"`` and ``"head"`` (for freezing or per-group learning rates).

    Returns
    -------
    dict
        ``{"backbone": [...], "head": [...]}``; a model without a learned head has an empty
        ``"head"`` list. Every parameter appears exactly once.
    """
    _, head = _backbone_and_head(model)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    params = list(model.parameters())
    return {
        "backbone": [p for p in params if id(p) not in head_ids],
        "head": [p for p in params if id(p) in head_ids],
    }


def gradcam_layer(model: nn.Module) -> nn.Module:
    """The last spatial feature layer, the usual Grad-CAM target.

    For CNNs its output is ``(B, C, h, w)``. For a ViT it is the last block, whose output is
    tokens ``(B, 1 + h*w, C)``: callers must drop the class token and reshape. Hybrids return the
    CNN branch's layer.
    """
    backbone, _ = _backbone_and_head(model)
    custom = getattr(backbone, "gradcam_layer", None)
    if callable(custom):
        return custom()
    return timm_gradcam_layer(backbone)


def timm_gradcam_layer(backbone: nn.Module) -> nn.Module:
    """Grad-CAM target inside a timm model."""
    # EfficientNet/MobileNet put a 1x1 conv + BN/act after the last stage; its output is the
    # map that is pooled, so it is the faithful target (feature_info stops one stage earlier).
    if hasattr(backbone, "conv_head") and hasattr(backbone, "bn2"):
        return backbone.bn2
    info = getattr(backbone, "feature_info", None)
    if info:
        last = info[-1] if isinstance(info, list) else info.get_dicts()[-1]
        return backbone.get_submodule(last["module"])
    raise ConfigError(f"no Grad-CAM layer known for {type(backbone).__name__}")
