"""timm-backed registry entries, and the one place that asks timm for ImageNet weights.

Standard backbones compared for HER2 scoring in the papers under ``shared/papers``:
ConvNeXt-Tiny, ResNet50, InceptionV3 and MobileNetV2 (Abdel-Hamid, "ConvNeXt for Breast Cancer
HER2 Scoring Using Different Types of Histopathological Stained Images", paper 001, which puts a
GAP -> FC512 -> FC256 head with dropout on each, hence ``head="mlp512_256"`` for those four);
ResNet18 and EfficientNet-B0 (the two halves of the hybrid of paper 000); EfficientNetV2-S and
ViT-B/16 (the two halves of the hybrid of paper 002). Those keep timm's own linear classifier.

ImageNet weights are read only from a local file or timm's local cache: the hub is put in
offline mode first, because otherwise it retries for ~47 s before failing on a machine without
internet.
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

from torch import nn

from wsi_her2.errors import WeightsError
from wsi_her2.models.checkpoint import read_checkpoint
from wsi_her2.models.config import ModelConfig
from wsi_her2.models.heads import FeatureClassifier, build_head
from wsi_her2.models.entry import ModelEntry

log = logging.getLogger(__name__)

PRETRAINED_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def _cached_hub_weights(arch: str) -> Path | None:
    """timm's ImageNet weights for ``arch`` if they already sit in the local Hugging Face cache.

    Looked up with ``try_to_load_from_cache``, which never touches the network: the library never
    downloads weights (and changes no process-wide setting such as ``HF_HUB_OFFLINE`` to avoid it).
    """
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm can run without the hub
        return None
    for filename in (getattr(cfg, "hf_hub_filename", None) or "model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def resolve_pretrained_file(pretrained_file: str | Path, arch: str) -> Path:
    """The ImageNet weights file for ``arch``: the file itself, or ``<arch>.<suffix>`` in a folder."""
    path = Path(pretrained_file).expanduser()
    if path.is_dir():
        for suffix in PRETRAINED_SUFFIXES:
            candidate = path / f"{arch}{suffix}"
            if candidate.is_file():
                return candidate
        raise WeightsError(
            f"folder {path} holds no ImageNet weights for {arch}: put {arch}.safetensors (or .pth) there"
        )
    if not path.is_file():
        raise WeightsError(
            f"pretrained file {path} does not exist: pass --pretrained-file PATH to a timm .safetensors/.pth "
            "or train --from-scratch"
        )
    return path


def create_timm(
    arch: str,
    *,
    pretrained: bool = False,
    pretrained_file: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` with offline-only ImageNet weights and errors that say what to do.

    Parameters
    ----------
    arch
        timm model name.
    pretrained
        Load ImageNet weights (from ``pretrained_file`` when given, else timm's local cache).
    pretrained_file
        A timm checkpoint (``.safetensors``, or ``.pth`` read with ``weights_only=True``), or a
        folder holding ``<arch>.safetensors``.
    **kwargs
        Passed to timm (``num_classes``, ``img_size``, ...). Classifier weights whose shape does not
        match ``num_classes`` are dropped by timm, as in any fine-tuning.
    """
    import timm  # here, not at module import: the default scorer (ihc_dab) needs no timm, and timm costs ~2 s

    if not pretrained and pretrained_file is None:
        return timm.create_model(arch, pretrained=False, **kwargs)
    if pretrained_file is None:
        pretrained_file = _cached_hub_weights(arch)
        if pretrained_file is None:
            raise WeightsError(
                f"ImageNet weights for {arch} are not available offline: pass --pretrained-file PATH "
                "(a timm .safetensors/.pth) or train --from-scratch"
            )
    path = resolve_pretrained_file(pretrained_file, arch)
    log.info("loading ImageNet weights for %s from %s", arch, path)
    # Read it with our own safe reader first: it refuses code-running pickles with the same
    # message as trained weights, whatever error timm's loader would raise for them.
    read_checkpoint(path)
    try:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{path} is not a plain tensor checkpoint; refusing to unpickle it; convert it to safetensors "
            "where it was made (safetensors.torch.save_file(state_dict, ...)) or get the timm .safetensors"
        ) from exc
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as exc:
        if "weights_only" in str(exc):
            raise WeightsError(
                f"{path} is not a plain tensor checkpoint; refusing to unpickle it; convert it to safetensors"
            ) from exc
        raise WeightsError(
            f"{path} does not hold usable ImageNet weights for {arch} ({_first_line(exc)}); pass the timm "
            f"checkpoint of {arch} or train --from-scratch"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def timm_input_kwargs(arch: str, input_px: int) -> dict[str, Any]:
    """``img_size`` for architectures whose input size is baked in (ViTs); nothing for CNNs."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is not None and getattr(cfg, "fixed_input_size", False):
        return {"img_size": int(input_px)}
    return {}


def timm_classifier(
    config: ModelConfig,
    pretrained_file: str | Path | None = None,
    *,
    pretrained: bool = False,
) -> nn.Module:
    """Factory shared by every timm entry: ``config.arch`` with ``config.head`` on top."""
    kwargs = timm_input_kwargs(config.arch, config.input_px)
    if config.head == "linear":
        # Keep timm's own classifier so state_dict keys match ordinary timm checkpoints.
        return create_timm(
            config.arch, pretrained=pretrained, pretrained_file=pretrained_file,
            num_classes=config.n_classes, **kwargs,
        )
    backbone = create_timm(
        config.arch, pretrained=pretrained, pretrained_file=pretrained_file, num_classes=0, **kwargs
    )
    return FeatureClassifier(backbone, build_head(backbone.num_features, config), num_features=backbone.num_features)


# name, input_px, head, description
_TIMM_ENTRIES: tuple[tuple[str, int, str, str], ...] = (
    ("convnext_tiny", 224, "mlp512_256", "ConvNeXt-Tiny, best IHC/H&E HER2 network of paper 001"),
    ("resnet50", 224, "mlp512_256", "ResNet50 with the FC512-FC256 head of paper 001"),
    ("inception_v3", 299, "mlp512_256", "InceptionV3 (299 px input) with the FC512-FC256 head of paper 001"),
    ("mobilenetv2_100", 224, "mlp512_256", "MobileNetV2 with the FC512-FC256 head of paper 001"),
    ("resnet18", 224, "linear", "ResNet18, light baseline (a branch of paper 000's hybrid)"),
    ("efficientnet_b0", 224, "linear", "EfficientNet-B0, light baseline (a branch of paper 000's hybrid)"),
    ("tf_efficientnetv2_s", 224, "linear", "EfficientNetV2-S (a branch of paper 002's hybrid)"),
    ("vit_base_patch16_224", 224, "linear", "ViT-B/16 (a branch of paper 002's hybrid); input size fixed at build"),
)

#: The timm classifiers, registered by :mod:`wsi_her2.models.registry`.
ENTRIES: list[ModelEntry] = [
    ModelEntry(ModelConfig(name=name, arch=name, input_px=input_px, head=head, description=description), timm_classifier)
    for name, input_px, head, description in _TIMM_ENTRIES
]
