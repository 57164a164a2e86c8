"""A training run behind ``wsi-her2 train``: dataset on disk -> split -> model -> :func:`~wsi_her2.train.trainer.fit`
-> ``model.safetensors`` + history + plots + test report + run record."""
from __future__ import annotations

import csv
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from torch import nn

from wsi_her2.csv_cells import safe_dict_row
from wsi_her2.devices import resolve_device

from wsi_her2.errors import ConfigError, WeightsError
from wsi_her2.train.data import (
    Augment,
    LabelledTiles,
    TileDataset,
    group_split,
    write_split_csv,
)
from wsi_her2.train.evaluate import classification_report, plot_training_curves, predict_dataset, write_report
from wsi_her2.train.recipes import Recipe

from wsi_her2.train.trainer import FitResult, fit

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: nn.Module
    fit: FitResult
    out_dir: Path
    paths: dict[str, Path] = field(default_factory=dict)
    split_sizes: dict[str, int] = field(default_factory=dict)
    test_report: dict[str, Any] | None = None


def build_model_for_training(
    model_name: str,
    *,
    recipe: Recipe,
    classes: Sequence[str],
    pretrained_file: str | Path | None = None,
    from_scratch: bool = False,
    stain_norm_cfg: dict | None = None,
    input_px: int | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> nn.Module:
    """Create a registry model configured for the recipe; ImageNet weights unless ``from_scratch``."""
    from wsi_her2.models import create_model

    overrides: dict[str, Any] = {"classes": tuple(classes)}
    if recipe.head:
        overrides["head"] = recipe.head
    if recipe.dropout is not None:
        overrides["dropout"] = recipe.dropout
    px = input_px or recipe.input_px
    if px:
        overrides["input_px"] = int(px)
    overrides["stain_norm"] = stain_norm_cfg
    overrides.update(config_overrides or {})
    try:
        return create_model(model_name, pretrained=not from_scratch, pretrained_file=pretrained_file, **overrides)
    except WeightsError as exc:
        raise WeightsError(
            f"{exc} (training starts from ImageNet weights: pass --pretrained-file FILE, fill the timm cache, "
            "or pass --from-scratch to train from random initialisation)"
        ) from exc


def _model_for_dataset(model: nn.Module | None, dataset: LabelledTiles, recipe: Recipe, *, model_name: str | None,
                       stain_cfg: dict | None, pretrained_file, from_scratch: bool, input_px: int | None,
                       config_overrides: dict[str, Any] | None) -> nn.Module:
    """The model to train (built from the registry unless given), checked against the dataset's classes."""
    if model is None:
        model = build_model_for_training(model_name or recipe.default_model, recipe=recipe, classes=dataset.classes,
                                         pretrained_file=pretrained_file, from_scratch=from_scratch,
                                         stain_norm_cfg=stain_cfg, input_px=input_px,
                                         config_overrides=config_overrides)
    cfg = model.wsi_her2_config
    if tuple(cfg.classes) != tuple(dataset.classes):
        raise ConfigError(f"model classes {list(cfg.classes)} differ from the dataset's {list(dataset.classes)}")
    return model


def _split_datasets(splits: dict[str, list], dataset: LabelledTiles, cfg, recipe: Recipe, normaliser):
    """``(train, val, test)`` tile datasets at the model's input size and normalisation; only train augments."""
    common = dict(input_px=cfg.input_px, mean=cfg.mean, std=cfg.std, stain_norm=normaliser,
                  cache=recipe.cache_images, seed=recipe.seed)
    augment = Augment(hflip=recipe.hflip, vflip=recipe.vflip, rot90=recipe.rot90,
                      shift_frac=recipe.shift_frac, color_jitter=recipe.color_jitter)
    train_ds = TileDataset.from_records(splits["train"], dataset.classes, augment=augment, **common)
    val_ds = TileDataset.from_records(splits["val"], dataset.classes, **common)
    test_ds = TileDataset.from_records(splits["test"], dataset.classes, **common)
    return train_ds, val_ds, test_ds


def _write_fit_outputs(model: nn.Module, result: FitResult, out: Path) -> dict[str, Path]:
    from wsi_her2.models import save_model

    paths = {"model": Path(out / "model.safetensors")}
    save_model(model, paths["model"])
    paths["history"] = out / "history.json"
    paths["history"].write_text(json.dumps(result.history, indent=2))
    paths["metrics_csv"] = _write_metrics_csv(result.history, out / "metrics.csv")
    paths["curves_png"] = plot_training_curves(result.history, out / "training_curves.png")
    return paths


def _report_on_test_split(model: nn.Module, test_ds, classes: Sequence[str], recipe: Recipe, device: str,
                          out: Path, paths: dict[str, Path]) -> dict[str, Any] | None:
    """Classification report on the held-out side (None when it is empty); its files go into ``paths``."""
    if not len(test_ds):
        return None
    dev = resolve_device(device)
    y, p = predict_dataset(model.to(dev), test_ds, batch_size=max(recipe.batch_size, 32), device=str(dev))
    model.to("cpu")
    report = classification_report(y, p, classes)
    paths.update({f"test_{k}": v for k, v in write_report(report, out, y_true=y, probs=p, prefix="test").items()})
    return report


def _run_record(*, dataset: LabelledTiles, cfg, recipe: Recipe, sizes: dict[str, int], result: FitResult,
                wall_seconds: float, device: str, command_line: Sequence[str] | None,
                test_report: dict[str, Any] | None) -> dict[str, Any]:
    """The content of ``run.json``: what ran, on what, with which outcome and timings."""
    return {
        "command_line": list(command_line) if command_line else sys.argv,
        "model": cfg.name,
        "model_config": cfg.to_dict(),
        "recipe": recipe.to_dict(),
        "dataset": {"source": dataset.source, "classes": list(dataset.classes), "counts": dataset.counts()},
        "split_sizes": sizes,
        "best_epoch": result.best_epoch,
        "best_metric": result.best_metric,
        "monitor": recipe.monitor,
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "train_images_per_s": result.images_per_s,
        "wall_seconds": wall_seconds,
        "device": str(resolve_device(device)),
        "versions": _versions(),
        "test_report": test_report,
    }


def train_model(
    dataset: LabelledTiles,
    *,
    recipe: Recipe,
    out_dir: str | Path,
    model_name: str | None = None,
    model: nn.Module | None = None,
    pretrained_file: str | Path | None = None,
    from_scratch: bool = False,
    stain_norm: str = "none",
    stain_ref: str | Path | None = None,
    input_px: int | None = None,
    config_overrides: dict[str, Any] | None = None,
    device: str = "auto",
    progress: bool = False,
    command_line: Sequence[str] | None = None,
) -> TrainResult:
    """Split, train, save and report.

    Writes into ``out_dir``: ``model.safetensors`` (+ ``model.json``), ``history.json``,
    ``metrics.csv``, ``training_curves.png``, ``split.csv`` (every tile with its side),
    ``run.json`` (versions, recipe, timings) and, when the test side is non-empty,
    ``test_report.json`` with confusion-matrix and ROC PNGs.
    """
    from wsi_her2.stain.normalize import fit_stain_normalizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    for note in dataset.notes:
        log.warning(note)
    splits = group_split(dataset.records, fractions=recipe.split, seed=recipe.seed)
    sizes = {k: len(v) for k, v in splits.items()}
    log.info("split by group: %s", sizes)
    paths = {"split_csv": write_split_csv(splits, out / "split.csv")}

    normaliser = fit_stain_normalizer(stain_norm, ref=stain_ref)
    model = _model_for_dataset(model, dataset, recipe, model_name=model_name,
                               stain_cfg=normaliser.to_dict() if normaliser is not None else None,
                               pretrained_file=pretrained_file, from_scratch=from_scratch, input_px=input_px,
                               config_overrides=config_overrides)
    cfg = model.wsi_her2_config
    train_ds, val_ds, test_ds = _split_datasets(splits, dataset, cfg, recipe, normaliser)

    result = fit(model, train_ds, val_ds, recipe, n_classes=len(dataset.classes), device=device, progress=progress)
    model.to("cpu")
    paths.update(_write_fit_outputs(model, result, out))
    test_report = _report_on_test_split(model, test_ds, dataset.classes, recipe, device, out, paths)

    run = _run_record(dataset=dataset, cfg=cfg, recipe=recipe, sizes=sizes, result=result,
                      wall_seconds=time.perf_counter() - t_start, device=device, command_line=command_line,
                      test_report=test_report)
    paths["run_json"] = out / "run.json"
    paths["run_json"].write_text(json.dumps(run, indent=2, default=str))
    return TrainResult(model, result, out, paths, sizes, test_report)


def _write_metrics_csv(history: list[dict[str, Any]], path: Path) -> Path:
    keys = ["epoch", "phase", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "images",
            "seconds", "images_per_s"]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for row in history:
            r = dict(row)
            r["lr"] = ";".join(f"{v:.3g}" for v in row["lr"])
            w.writerow(safe_dict_row({k: r.get(k) for k in keys}))
    return path


def _versions() -> dict[str, str]:
    import wsi_her2

    out = {"python": platform.python_version(), "wsi_her2": wsi_her2.__version__, "torch": torch.__version__,
           "numpy": np.__version__}
    try:
        import timm

        out["timm"] = timm.__version__
    except Exception:
        pass
    return out
