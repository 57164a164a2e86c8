"""Patch classifiers for HER2 scoring: a registry of architectures and safe weight files.

>>> from wsi_her2.models import create_model, save_model, load_model
>>> model = create_model("convnext_tiny")              # random init, 4 HER2 classes
>>> save_model(model, "runs/x/model.safetensors")     # weights + config (and model.json)
>>> model = load_model("runs/x/model.safetensors")     # config from the file, strict load

Only this package imports timm.
"""
from __future__ import annotations

from wsi_her2.models.config import HEAD_NAMES, HER2_CLASSES, IMAGENET_MEAN, IMAGENET_STD, ModelConfig
from wsi_her2.models.heads import FeatureClassifier, gradcam_layer, parameter_groups
from wsi_her2.models.registry import (
    build_model,
    count_parameters,
    create_model,
    get_config,
    list_models,
    register_model,
)
from wsi_her2.models.weights import load_model, read_checkpoint, read_config, save_model

# Importing these modules fills the registry.
from wsi_her2.models import archs as _archs  # noqa: E402,F401  isort: skip
from wsi_her2.models import hybrids as _hybrids  # noqa: E402,F401  isort: skip

__all__ = [
    "HEAD_NAMES",
    "HER2_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FeatureClassifier",
    "ModelConfig",
    "build_model",
    "count_parameters",
    "create_model",
    "get_config",
    "gradcam_layer",
    "list_models",
    "load_model",
    "parameter_groups",
    "read_checkpoint",
    "read_config",
    "register_model",
    "save_model",
]
