"""The training loop behind ``wsi-her2 train``: :func:`fit` runs the recipe's phases (freezing,
optimiser, schedule from :mod:`wsi_her2.train.params`), early stopping and the best checkpoint, on
any module and any ``(tensor, label)`` datasets, which keeps it testable without files. The run
around it (files, split, outputs, record) is :func:`wsi_her2.train.run.train_model`.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_her2.devices import resolve_device
from wsi_her2.errors import DatasetError
from wsi_her2.train.data import balanced_class_weights
from wsi_her2.train.params import (  # noqa: F401 (re-exported: the loop's collaborators)
    ParamPartition, apply_trainable, freeze_frozen_norms, make_optimizer, make_scheduler, partition_parameters,
)
from wsi_her2.train.recipes import Phase, Recipe

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    best_epoch: int
    best_metric: float
    images_per_s: float
    train_seconds: float
    steps: int


def _evaluate_loss(model, loader, device, n_classes: int) -> dict[str, float | None]:
    from wsi_her2.train.evaluate import roc_auc_ovr

    model.eval()
    losses, ys, ps = [], [], []
    with torch.no_grad():
        for x, y in loader:
            logits = model(x.to(device)).float()
            losses.append(nn.functional.cross_entropy(logits, y.to(device), reduction="sum").item())
            ps.append(torch.softmax(logits, 1).cpu().numpy())
            ys.append(y.numpy())
    if not ys:
        return {"loss": None, "acc": None, "auc": None}
    y = np.concatenate(ys)
    p = np.concatenate(ps)
    auc = roc_auc_ovr(y, p)
    auc = auc[~np.isnan(auc)]
    return {
        "loss": float(sum(losses) / len(y)),
        "acc": float((p.argmax(1) == y).mean()),
        "auc": float(auc.mean()) if auc.size else None,
    }


@dataclass
class _FitSetup:
    """What stays fixed for a whole :func:`fit` call (device, loaders, loss, AMP, step budget)."""

    recipe: Recipe
    device: torch.device
    loader: Any
    val_loader: Any
    criterion: nn.Module
    steps_per_epoch: int
    use_amp: bool
    amp_dtype: torch.dtype | None
    n_classes: int
    progress: bool


@dataclass
class _FitProgress:
    """What changes as :func:`fit` runs: counters, history and the best epoch so far."""

    use_max: bool
    best_state: dict[str, Any]
    best_metric: float
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    epoch: int = 0
    steps: int = 0
    train_images: int = 0
    train_seconds: float = 0.0

    def better_than(self, a: float, b: float) -> bool:
        return a > b if self.use_max else a < b

    def worst_metric(self) -> float:
        return -math.inf if self.use_max else math.inf

    def out_of_steps(self, recipe: Recipe) -> bool:
        return recipe.max_steps is not None and self.steps >= recipe.max_steps


def _training_labels(train_ds) -> np.ndarray:
    labels = np.asarray(getattr(train_ds, "labels", [int(train_ds[i][1]) for i in range(len(train_ds))]))
    if len(labels) == 0:
        raise DatasetError("the training split is empty; add tiles or change the split fractions")
    return labels


def _make_loaders(train_ds, val_ds, recipe: Recipe, labels: np.ndarray, n_classes: int):
    """Training loader (shuffled or class-weighted sampling, seeded) and validation loader (or None)."""
    gen = torch.Generator().manual_seed(recipe.seed)
    drop_last = len(labels) > recipe.batch_size
    if recipe.weighted_sampler:
        counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
        w = 1.0 / counts[labels]
        sampler = torch.utils.data.WeightedRandomSampler(w.tolist(), num_samples=len(labels), replacement=True, generator=gen)
        loader = torch.utils.data.DataLoader(train_ds, batch_size=recipe.batch_size, sampler=sampler,
                                             num_workers=recipe.num_workers, drop_last=drop_last)
    else:
        loader = torch.utils.data.DataLoader(train_ds, batch_size=recipe.batch_size, shuffle=True, generator=gen,
                                             num_workers=recipe.num_workers, drop_last=drop_last)
    val_loader = None
    if val_ds is not None and len(val_ds):
        val_loader = torch.utils.data.DataLoader(val_ds, batch_size=max(recipe.batch_size, 32), shuffle=False,
                                                 num_workers=recipe.num_workers)
    else:
        log.warning("no validation tiles: selecting the best epoch by training loss")
    return loader, val_loader


def _fit_setup(model: nn.Module, train_ds, val_ds, recipe: Recipe, *, n_classes: int, device, progress: bool) -> _FitSetup:
    dev = resolve_device(device) if isinstance(device, str) else device
    torch.manual_seed(recipe.seed)
    model.to(dev)
    labels = _training_labels(train_ds)
    weights = None
    if recipe.class_weights == "balanced":
        weights = torch.tensor(balanced_class_weights(labels, n_classes), dtype=torch.float32, device=dev)
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=recipe.label_smoothing)
    loader, val_loader = _make_loaders(train_ds, val_ds, recipe, labels, n_classes)
    use_amp = bool(recipe.amp and dev.type == "cuda")
    steps_per_epoch = len(loader) if recipe.steps_per_epoch is None else min(len(loader), recipe.steps_per_epoch)
    return _FitSetup(recipe, dev, loader, val_loader, criterion, steps_per_epoch, use_amp,
                     torch.bfloat16 if use_amp else None, n_classes, progress)


def _train_epoch(model: nn.Module, s: _FitSetup, fp: _FitProgress, optimizer, scheduler, unit) -> dict[str, Any]:
    """One pass over the training loader; returns the loss/accuracy/throughput part of the history row."""
    recipe, dev = s.recipe, s.device
    model.train()
    freeze_frozen_norms(model)
    t0 = time.perf_counter()
    loss_sum, correct, seen = 0.0, 0, 0
    iterator = s.loader
    if s.progress:
        from tqdm import tqdm

        iterator = tqdm(s.loader, total=s.steps_per_epoch, desc=f"epoch {fp.epoch}", leave=False)
    for i, (x, y) in enumerate(iterator):
        if i >= s.steps_per_epoch or fp.out_of_steps(recipe):
            break
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev.type, dtype=s.amp_dtype, enabled=s.use_amp):
            logits = model(x)
        loss = s.criterion(logits.float(), y)
        loss.backward()
        if recipe.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], recipe.grad_clip_norm)
        optimizer.step()
        if unit == "step":
            scheduler.step()
        fp.steps += 1
        loss_sum += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt_s = time.perf_counter() - t0
    fp.train_seconds += dt_s
    fp.train_images += seen
    return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1), "images": seen,
            "seconds": dt_s, "images_per_s": seen / dt_s if dt_s > 0 else float("nan")}


def _epoch_metric(row: dict[str, Any], recipe: Recipe, has_val: bool) -> float:
    metric = row[recipe.monitor] if has_val else row["train_loss"]
    if metric is None:  # e.g. AUC undefined on a one-class validation split
        metric = row["val_acc"] if row["val_acc"] is not None else row["train_loss"]
    return metric


def _run_phase(model: nn.Module, phase: Phase, part: ParamPartition, s: _FitSetup, fp: _FitProgress) -> None:
    """Train one phase: set what is trainable, then epochs until done, out of steps or stale."""
    recipe = s.recipe
    trainable = apply_trainable(model, part, phase, recipe)
    optimizer = make_optimizer(model, trainable, phase, recipe)
    scheduler, unit = make_scheduler(optimizer, recipe, steps_per_epoch=s.steps_per_epoch)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("%s: %d epochs, %d trainable parameters, lr %s", phase.name, phase.epochs, n_train,
             [round(g["lr"], 10) for g in optimizer.param_groups])
    stale = 0
    phase_best = fp.worst_metric()
    for _ in range(phase.epochs):
        fp.epoch += 1
        trained = _train_epoch(model, s, fp, optimizer, scheduler, unit)
        val = _evaluate_loss(model, s.val_loader, s.device, s.n_classes) if s.val_loader is not None else \
            {"loss": None, "acc": None, "auc": None}
        row = {"epoch": fp.epoch, "phase": phase.name, "lr": [g["lr"] for g in optimizer.param_groups],
               "train_loss": trained["train_loss"], "train_acc": trained["train_acc"],
               "val_loss": val["loss"], "val_acc": val["acc"], "val_auc": val["auc"],
               "images": trained["images"], "seconds": trained["seconds"], "images_per_s": trained["images_per_s"]}
        fp.history.append(row)
        metric = _epoch_metric(row, recipe, s.val_loader is not None)
        if fp.better_than(metric, fp.best_metric) or fp.best_epoch == 0:
            fp.best_metric, fp.best_epoch = metric, fp.epoch
            fp.best_state = copy.deepcopy(model.state_dict())
        if fp.better_than(metric, phase_best):
            phase_best, stale = metric, 0
        else:
            stale += 1
        log.info("epoch %d (%s): train loss %.4f acc %.3f | val loss %s acc %s auc %s | %.1f img/s",
                 fp.epoch, phase.name, row["train_loss"], row["train_acc"], _fmt(val["loss"]), _fmt(val["acc"]),
                 _fmt(val["auc"]), row["images_per_s"])
        if unit == "epoch":
            scheduler.step()
        elif unit == "metric":
            scheduler.step(metric)
        if fp.out_of_steps(recipe):
            break
        if recipe.early_stopping_patience and stale >= recipe.early_stopping_patience:
            # In a phased recipe, stalling ends the phase (the next one unfreezes more);
            # in a single-phase recipe it ends the run.
            log.info("no improvement of %s for %d epochs: ending %s", recipe.monitor, stale, phase.name)
            break


def fit(
    model: nn.Module,
    train_ds,
    val_ds,
    recipe: Recipe,
    *,
    n_classes: int,
    device: str | torch.device = "auto",
    progress: bool = False,
) -> FitResult:
    """Train ``model`` in place following ``recipe``; the best epoch's weights are loaded at the end.

    Parameters
    ----------
    train_ds, val_ds
        Map-style datasets of ``(float tensor (3, H, W), int label)``; ``val_ds`` may be None or
        empty (then the training loss selects the best epoch).
    n_classes
        Number of logits.
    """
    dev = resolve_device(device) if isinstance(device, str) else device
    # The run is seeded from the recipe; the caller's global RNG state is put back afterwards.
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        return _fit_seeded(model, train_ds, val_ds, recipe, n_classes=n_classes, device=dev, progress=progress)


def _fit_seeded(model: nn.Module, train_ds, val_ds, recipe: Recipe, *, n_classes: int, device: torch.device,
                progress: bool) -> FitResult:
    setup = _fit_setup(model, train_ds, val_ds, recipe, n_classes=n_classes, device=device, progress=progress)
    part = partition_parameters(model)
    # Validation metrics other than the loss are maximised; without validation, the training
    # loss (minimised) selects the best epoch.
    use_max = recipe.monitor != "val_loss" and setup.val_loader is not None
    fp = _FitProgress(use_max, copy.deepcopy(model.state_dict()), -math.inf if use_max else math.inf)
    for phase in recipe.phases():
        _run_phase(model, phase, part, setup, fp)
        if fp.out_of_steps(recipe):
            break
    model.load_state_dict(fp.best_state)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    ips = fp.train_images / fp.train_seconds if fp.train_seconds > 0 else float("nan")
    return FitResult(fp.history, fp.best_epoch, float(fp.best_metric), ips, fp.train_seconds, fp.steps)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
