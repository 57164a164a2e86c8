"""Patch classifiers for HER2 scoring: a registry of architectures and safe weight files.

>>> from wsi_her2.models import create_model, save_model, load_model
>>> model = create_model("convnext_tiny")              # random init, 4 HER2 classes
>>> save_model(model, "runs/x/model.safetensors")     # weights + config (and model.json)
>>> model = load_model("runs/x/model.safetensors")     # config from the file, strict load

Only this package imports timm.
"""
from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the submodule defining it. Loaded on first use (PEP 562), so that importing a
#: torch-free submodule (``ihc_thresholds``, ``ihc_cpu_kernel``: what CPU scoring workers need)
#: does not import torch and timm (~2 s).
_EXPORTS = {
    "HEAD_NAMES": "config", "HER2_CLASSES": "config", "IMAGENET_MEAN": "config", "IMAGENET_STD": "config",
    "ModelConfig": "config", "Capabilities": "capabilities", "capabilities_of": "capabilities",
    "FeatureClassifier": "heads", "gradcam_layer": "heads", "parameter_groups": "heads",
    "build_model": "registry", "count_parameters": "registry", "create_model": "registry",
    "get_capabilities": "registry", "get_config": "registry", "list_models": "registry", "register_model": "registry",
    "load_model": "weights", "read_checkpoint": "checkpoint", "read_config": "checkpoint", "save_model": "weights",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "Capabilities",
    "HEAD_NAMES",
    "HER2_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FeatureClassifier",
    "ModelConfig",
    "build_model",
    "capabilities_of",
    "count_parameters",
    "create_model",
    "get_capabilities",
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
