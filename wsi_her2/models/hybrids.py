"""Custom architectures from the HER2 papers in ``shared/papers``, and the rule-based IHC scorer.

Each design follows its paper where the paper is specific; where it is vague the choice made
here is stated in the docstring. All of them are :class:`FeatureClassifier` s (``features`` ->
pooled vector -> ``head``), so :func:`parameter_groups` can freeze the backbones as the papers do.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from wsi_her2.errors import ConfigError, WsiHer2Error
from wsi_her2.models.archs import create_timm, resolve_pretrained_file, timm_input_kwargs
from wsi_her2.models.config import HER2_CLASSES, ModelConfig
from wsi_her2.models.heads import FeatureClassifier, build_head, timm_gradcam_layer
from wsi_her2.vocab import DAB_IHC, TUMOUR_MODELS
from wsi_her2.models.capabilities import Capabilities
from wsi_her2.models.entry import ModelEntry, declare


#: The hybrid networks and the rule-based IHC scorer, registered by :mod:`wsi_her2.models.registry`.
ENTRIES: list[ModelEntry] = []


class FusionFeatures(nn.Module):
    """Concatenation of the pooled features of several backbones (late feature fusion).

    Parameters
    ----------
    branches
        Name -> timm model built with ``num_classes=0`` (so that calling it returns pooled
        features). The first branch provides the Grad-CAM layer.
    """

    def __init__(self, branches: dict[str, nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleDict(branches)
        self.num_features = sum(int(b.num_features) for b in self.branches.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches.values()], dim=1)

    def gradcam_layer(self) -> nn.Module:
        return timm_gradcam_layer(next(iter(self.branches.values())))


def _branch(
    arch: str,
    config: ModelConfig,
    pretrained_file: str | Path | None,
    *,
    pretrained: bool,
) -> nn.Module:
    # One file cannot hold two ImageNet backbones, so a hybrid takes a folder with one file per arch.
    branch_file = None if pretrained_file is None else resolve_pretrained_file(pretrained_file, arch)
    return create_timm(
        arch, pretrained=pretrained, pretrained_file=branch_file, num_classes=0,
        **timm_input_kwargs(arch, config.input_px),
    )


def _fusion_model(
    archs: tuple[str, ...],
    config: ModelConfig,
    pretrained_file: str | Path | None,
    *,
    pretrained: bool,
) -> FeatureClassifier:
    if pretrained_file is not None and not Path(pretrained_file).expanduser().is_dir():
        raise ConfigError(
            f"{config.name} fuses {' + '.join(archs)}: pass --pretrained-file a folder holding "
            f"{' and '.join(a + '.safetensors' for a in archs)}, not a single file"
        )
    if pretrained_file is not None:  # fail before building anything if a branch file is missing
        for arch in archs:
            resolve_pretrained_file(pretrained_file, arch)
    features = FusionFeatures({
        f"b{i}_{arch}": _branch(arch, config, pretrained_file, pretrained=pretrained) for i, arch in enumerate(archs)
    })
    return FeatureClassifier(features, build_head(features.num_features, config), num_features=features.num_features)


@declare(ENTRIES, config=ModelConfig(
    name="hybrid_resnet18_effb0",
    arch="hybrid_resnet18_effb0",
    head="mlp512_256",
    description="ResNet18 + EfficientNet-B0 feature fusion (paper 000)",
    extra={"branches": ["resnet18", "efficientnet_b0"]},
))
def hybrid_resnet18_effb0(
    config: ModelConfig, pretrained_file: str | Path | None = None, *, pretrained: bool = False
) -> nn.Module:
    """ResNet-18 + EfficientNet-B0 feature-fusion hybrid.

    Nabi, Fauzi & Karim, "Hybrid Deep Learning Framework for Multi-Class Breast Cancer Scoring
    Using Grad-CAM++", InCIT 2025 (paper 000): ResNet-18's spatial features and EfficientNet-B0's
    multi-scale texture features, from frozen ImageNet backbones, classify IHC patches into
    0/1+/2+/3+. Only the abstract is available, so the fusion is the usual late fusion: both
    globally average-pooled vectors (512 + 1280) are concatenated and fed to the FC512 -> FC256
    head with dropout (shared with paper 001). Train with ``parameter_groups(model)["backbone"]``
    frozen to follow the paper.
    """
    return _fusion_model(("resnet18", "efficientnet_b0"), config, pretrained_file, pretrained=pretrained)


@declare(ENTRIES, config=ModelConfig(
    name="hybrid_effv2s_vitb16",
    arch="hybrid_effv2s_vitb16",
    head="fusion1024_512",
    dropout=0.7,
    description="EfficientNetV2-S + ViT-B/16 fusion with LayerNorm/GELU fusion block (paper 002)",
    extra={"branches": ["tf_efficientnetv2_s", "vit_base_patch16_224"], "fusion_dropout": 0.6},
))
def hybrid_effv2s_vitb16(
    config: ModelConfig, pretrained_file: str | Path | None = None, *, pretrained: bool = False
) -> nn.Module:
    """EfficientNetV2-S + ViT-B/16 hybrid with the fusion block and head of its paper.

    Khaled, Ahmed, Gamal & Mohamed, "Hybrid Deep Learning for Breast Cancer Histopathology:
    Phased Fine-Tuning, Cross-Dataset Generalization with Adaptive Normalization, and Web
    Deployment", 2025 (paper 002), section 3.3: the EfficientNetV2-S feature map is globally
    average-pooled (1280), the ViT-B/16 gives its [CLS] token (768); the concatenation (2048)
    goes through LayerNorm -> Linear(2048, 1024) -> GELU -> LayerNorm -> Dropout(0.6) ->
    Linear(1024, 1024), then LayerNorm -> Linear(1024, 512) -> GELU -> Dropout(0.7) ->
    Linear(512, classes) (``head="fusion1024_512"``). The paper is binary (BreaKHis); here it has
    the four HER2 classes. timm's ``tf_efficientnetv2_s`` and ``vit_base_patch16_224`` stand in
    for the torchvision backbones. The paper trains in three phases (head only; then the last 3
    EfficientNet stages and last 4 ViT blocks; then everything) with label smoothing 0.2, and
    Reinhard-normalises external H&E data to LAB means [180.8, 148.6, 116.5] / stds
    [35.4, 17.5, 11.1] (OpenCV 8-bit LAB); ``stain_norm`` stays None here because HER2 IHC
    tiles are scored as stained.
    """
    return _fusion_model(("tf_efficientnetv2_s", "vit_base_patch16_224"), config, pretrained_file, pretrained=pretrained)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation channel attention (Hu et al.): GAP -> FC/r -> ReLU -> FC -> sigmoid -> scale."""

    def __init__(self, channels: int, *, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(dim=(2, 3), keepdim=True)
        w = torch.sigmoid(self.fc2(torch.relu(self.fc1(w))))
        return x * w


class DepthwiseSeparableConv(nn.Module):
    """3x3 depthwise conv -> BN -> ReLU -> 1x1 pointwise conv -> BN -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.depthwise(x)))
        return self.act(self.bn2(self.pointwise(x)))


class SeDscFeatures(nn.Module):
    """ResNet50 trunk -> squeeze-and-excitation -> depthwise-separable conv -> global average pool."""

    def __init__(self, trunk: nn.Module, *, se_reduction: int, dsc_channels: int) -> None:
        super().__init__()
        self.trunk = trunk
        channels = int(trunk.num_features)
        self.se = SqueezeExcite(channels, reduction=se_reduction)
        self.dsc = DepthwiseSeparableConv(channels, dsc_channels)
        self.num_features = int(dsc_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.trunk.forward_features(x)  # (B, 2048, h, w), before timm's pooling
        return self.dsc(self.se(fmap)).mean(dim=(2, 3))

    def gradcam_layer(self) -> nn.Module:
        return self.dsc


@declare(ENTRIES, config=ModelConfig(
    name="resnet50_se_dsc",
    arch="resnet50_se_dsc",
    head="linear",
    description="ResNet50 cascaded with squeeze-excitation and depthwise-separable conv (paper 003)",
    extra={"se_reduction": 16, "dsc_channels": 512},
))
def resnet50_se_dsc(
    config: ModelConfig, pretrained_file: str | Path | None = None, *, pretrained: bool = False
) -> nn.Module:
    """ResNet50 cascaded with a squeeze-and-excitation block and a depthwise-separable convolution.

    Joshi, Chaudhari, Bongale et al., "An Improved ResNet Architecture for Accurate Patch-Level
    HER2 Overexpression Classification in Breast Cancer Tissue Images", ETASR 2025 (paper 003):
    the ResNet50 feature map is "cascaded with a squeeze and excitation block and a depth-wise
    separable convolutional layer" (98.04 % patch accuracy, 3 classes). The abstract gives no
    sizes, so: SE with reduction ``extra["se_reduction"]`` (16, as in Hu et al.) on the 2048
    channels, then a 3x3 depthwise + 1x1 pointwise conv to ``extra["dsc_channels"]`` (512) with
    BN/ReLU, global average pooling and a linear head over the four HER2 classes. ImageNet
    weights, when asked for, initialise the ResNet50 trunk only.
    """
    trunk_file = None if pretrained_file is None else resolve_pretrained_file(pretrained_file, "resnet50")
    trunk = create_timm("resnet50", pretrained=pretrained, pretrained_file=trunk_file, num_classes=0)
    features = SeDscFeatures(
        trunk,
        se_reduction=int(config.extra.get("se_reduction", 16)),
        dsc_channels=int(config.extra.get("dsc_channels", 512)),
    )
    return FeatureClassifier(features, build_head(features.num_features, config), num_features=features.num_features)


@declare(ENTRIES, config=ModelConfig(
    name="ihc_dab",
    arch="ihc_dab",
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    head="none",
    dropout=0.0,
    needs_weights=False,
    description="rule-based DAB membrane-stain scorer for IHC tiles; needs no weights",
), capabilities=Capabilities(cell_evidence=True, stain=DAB_IHC, calibration=True, glass_colour=True, criteria=True,
                             adapts_to_store=True, gradients=False, cpu_kernel=True,
                             tumour_models=TUMOUR_MODELS,
                             colour_subsampling=True))
def ihc_dab(config: ModelConfig, pretrained_file: str | Path | None = None, *, pretrained: bool = False) -> nn.Module:
    """Default rule-based IHC scorer (:class:`wsi_her2.models.ihc_score.IhcDabScorer`); input is RGB in [0, 1]."""
    if config.classes != HER2_CLASSES:
        raise ConfigError(f"ihc_dab scores the four HER2 classes {HER2_CLASSES}; it cannot output {config.classes}")
    if pretrained or pretrained_file is not None:
        raise ConfigError("ihc_dab is rule-based: it has no ImageNet weights; drop --pretrained/--pretrained-file")
    try:  # imported here so the registry works even where the scorer module is absent
        from wsi_her2.models.ihc_score import IhcDabScorer
    except ModuleNotFoundError as exc:
        if exc.name != "wsi_her2.models.ihc_score":
            raise
        raise WsiHer2Error(
            "the rule-based scorer wsi_her2.models.ihc_score is missing from this installation; reinstall wsi-her2 "
            "or pick a trained model with --model NAME --weights FILE"
        ) from exc
    return IhcDabScorer(mpp_um=config.mpp_um)
