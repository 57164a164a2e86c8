"""Training, evaluation, explanation and stain normalisation for wsi-her2 patch classifiers.

Modules: :mod:`~wsi_her2.train.data` (datasets, group split), :mod:`~wsi_her2.train.recipes`
(the papers' presets), :mod:`~wsi_her2.train.trainer` (the loop), :mod:`~wsi_her2.train.evaluate`
(metrics and reports), :mod:`~wsi_her2.train.explain` (Grad-CAM / Grad-CAM++),
:mod:`~wsi_her2.stain.normalize` (Reinhard, Macenko) and :mod:`~wsi_her2.stain.tta`
(test-time augmentation shared with scoring). Import the submodule you need: torch is only
loaded by those that use it.
"""
from __future__ import annotations
