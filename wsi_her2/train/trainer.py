"""The training loop behind ``wsi-her2 train``: phases, freezing, schedules, checkpoints, reports.

:func:`train_model` is the orchestrator (dataset on disk -> split -> model -> :func:`fit` ->
``model.safetensors`` + history + plots + test report). :func:`fit` is the loop itself and works on
any module and any ``(tensor, label)`` datasets, which keeps it testable without files.

Freezing works on a :class:`ParamPartition`: the head, and for each backbone its stages in input
-> output order (from timm's ``group_matcher`` where the backbone is a timm model, else its
top-level children). ``trainable="last"`` unfreezes the last ``last_stages`` stages of each CNN
backbone and the last ``last_vit_blocks`` blocks (+ final norm) of each ViT; ``"fraction"``
freezes the first ``freeze_fraction`` of each backbone's parameterised layers.
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from wsi_her2.devices import resolve_device
from torch import nn

from wsi_her2.errors import ConfigError, DatasetError, WeightsError
from wsi_her2.train.data import (
    Augment,
    LabelledTiles,
    TileDataset,
    balanced_class_weights,
    group_split,
    write_split_csv,
)
from wsi_her2.train.evaluate import classification_report, plot_training_curves, predict_dataset, write_report
from wsi_her2.train.recipes import Phase, Recipe

log = logging.getLogger(__name__)

HEAD_NAME_HINTS = ("head", "fc", "classifier", "fusion", "last_linear")


# --------------------------------------------------------------------------------------------
# Parameter partition (head / backbone stages)
# --------------------------------------------------------------------------------------------
@dataclass
class Backbone:
    prefix: str
    is_vit: bool
    stages: list[list[str]]  # parameter names, input side first
    layers: list[list[str]]  # parameterised leaf modules' parameter names, input side first


@dataclass
class ParamPartition:
    head: list[str]
    backbones: list[Backbone]

    def backbone_names(self) -> list[str]:
        return [n for b in self.backbones for s in b.stages for n in s]


def _head_param_ids(model: nn.Module) -> set[int] | None:
    try:
        from wsi_her2.models.heads import parameter_groups
    except Exception:  # the models package is optional for the loop itself
        return None
    return {id(p) for p in parameter_groups(model)["head"]}


def _timm_like(m: nn.Module) -> bool:
    return callable(getattr(m, "group_matcher", None))


def _leaf_layers(module: nn.Module, prefix: str, allowed: set[str]) -> list[list[str]]:
    layers = []
    for name, sub in module.named_modules():
        own = [f"{prefix}{name}.{n}" if name else f"{prefix}{n}" for n, _ in sub.named_parameters(recurse=False)]
        own = [n for n in own if n in allowed]
        if own:
            layers.append(own)
    return layers


def partition_parameters(model: nn.Module) -> ParamPartition:
    """Split a model's trainable parameters into the head and ordered backbone stages."""
    names = {id(p): n for n, p in model.named_parameters()}
    head_ids = _head_param_ids(model)
    if head_ids is None:
        head_ids = {
            id(p) for n, p in model.named_parameters() if n.split(".")[0] in HEAD_NAME_HINTS
        }
    head = {names[i] for i in head_ids if i in names}

    # Top-most timm models inside the network are its backbones (two for a hybrid).
    found: list[tuple[str, nn.Module]] = []
    for name, sub in model.named_modules():
        if _timm_like(sub) and not any(name.startswith(f"{p}.") or p == "" for p, _ in found):
            found.append((name, sub))
    backbones: list[Backbone] = []
    claimed: set[str] = set(head)
    for prefix, sub in found:
        pre = f"{prefix}." if prefix else ""
        try:
            from timm.models import group_parameters

            groups = group_parameters(sub, sub.group_matcher(coarse=True))
            stages = [[pre + n for n in groups[k] if pre + n not in head] for k in sorted(groups)]
        except Exception as exc:  # a custom group_matcher we cannot use: fall back to children
            log.debug("group_matcher failed for %s (%s); using top-level children", prefix or "model", exc)
            stages = [[pre + n for n, _ in child.named_parameters(prefix=cname)] for cname, child in sub.named_children()]
            stages = [[n for n in s if n not in head] for s in stages]
        stages = [s for s in stages if s]
        allowed = {n for s in stages for n in s}
        is_vit = hasattr(sub, "patch_embed") and hasattr(sub, "blocks")
        backbones.append(Backbone(prefix, is_vit, stages, _leaf_layers(sub, pre, allowed)))
        claimed |= allowed
    rest = [n for n in names.values() if n not in claimed]
    if rest and backbones:
        # Layers added around pretrained backbones (an SE block, a fusion block) start from
        # random weights: they train with the head, never frozen with the backbone.
        head |= set(rest)
    elif rest:
        # No timm backbone (a custom network): one "backbone" whose stages are the top-level
        # children in registration order.
        order: dict[str, list[str]] = {}
        for n in rest:
            order.setdefault(n.split(".")[0], []).append(n)
        allowed = set(rest)
        backbones.append(Backbone("", False, list(order.values()), _leaf_layers(model, "", allowed)))
    return ParamPartition(sorted(head, key=list(names.values()).index), backbones)


def apply_trainable(model: nn.Module, part: ParamPartition, phase: Phase, recipe: Recipe) -> dict[str, list[str]]:
    """Set ``requires_grad`` for a phase; returns the trainable ``head`` and ``backbone`` names."""
    mode = phase.trainable
    backbone_on: set[str] = set()
    if phase.backbone_lr is not None and phase.backbone_lr == 0:
        mode = "head"  # a zero backbone LR means frozen: skip its gradients entirely
    if mode == "all":
        backbone_on = set(part.backbone_names())
    elif mode == "last":
        for b in part.backbones:
            if b.is_vit:
                # the last k transformer blocks and whatever follows them (the final norm)
                block_idx = [i for i, s in enumerate(b.stages) if any("blocks." in n for n in s)]
                start = block_idx[-recipe.last_vit_blocks] if 0 < recipe.last_vit_blocks <= len(block_idx) \
                    else (0 if recipe.last_vit_blocks > 0 else len(b.stages))
            else:
                start = max(len(b.stages) - recipe.last_stages, 0) if recipe.last_stages > 0 else len(b.stages)
            for s in b.stages[start:]:
                backbone_on.update(s)
    elif mode == "fraction":
        for b in part.backbones:
            n_frozen = int(math.floor(recipe.freeze_fraction * len(b.layers)))
            for layer in b.layers[n_frozen:]:
                backbone_on.update(layer)
    head = set(part.head)
    if not head and mode == "head":
        raise ConfigError("this model has no separate head to train alone; use trainable=all or fraction")
    for n, p in model.named_parameters():
        p.requires_grad_(n in head or n in backbone_on)
    return {"head": [n for n in part.head], "backbone": sorted(backbone_on)}


def _freeze_frozen_norms(model: nn.Module) -> None:
    # A frozen backbone must not keep updating BatchNorm running statistics on a small dataset:
    # that silently changes the pretrained features the head is being fitted to.
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()


# --------------------------------------------------------------------------------------------
# Optimiser and schedules
# --------------------------------------------------------------------------------------------
def make_optimizer(model: nn.Module, trainable: dict[str, list[str]], phase: Phase, recipe: Recipe):
    params = dict(model.named_parameters())
    head = [params[n] for n in trainable["head"] if params[n].requires_grad]
    backbone = [params[n] for n in trainable["backbone"] if params[n].requires_grad]
    backbone_lr = phase.lr if phase.backbone_lr is None else phase.backbone_lr
    groups = []
    if head:
        groups.append({"params": head, "lr": phase.lr, "name": "head"})
    if backbone:
        groups.append({"params": backbone, "lr": backbone_lr, "name": "backbone"})
    if not groups:
        raise ConfigError(f"phase {phase.name}: nothing is trainable; check trainable/freeze_fraction")
    wd = recipe.weight_decay
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, weight_decay=wd)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=wd)
    return torch.optim.SGD(groups, momentum=recipe.momentum, weight_decay=wd)


def make_scheduler(optimizer, recipe: Recipe, *, steps_per_epoch: int):
    """Returns ``(scheduler, unit)`` with unit ``"epoch"``, ``"metric"`` or ``"step"``; or (None, None)."""
    if recipe.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.step_epochs, gamma=recipe.step_gamma), "epoch"
    if recipe.schedule == "plateau":
        mode = "min" if recipe.monitor == "val_loss" else "max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=recipe.plateau_factor, patience=recipe.plateau_patience
        ), "metric"
    if recipe.schedule == "cyclic":
        up = max(1, int(round(recipe.cyclic_half_period_epochs * steps_per_epoch)))
        # Per-group bounds keep the ratio between head and backbone learning rates.
        ratios = [g["lr"] / max(recipe.lr, 1e-12) for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.CyclicLR(
            optimizer,
            base_lr=[recipe.cyclic_base_lr * r for r in ratios],
            max_lr=[recipe.cyclic_max_lr * r for r in ratios],
            step_size_up=up,
            mode=recipe.cyclic_mode,
            cycle_momentum=False,
        ), "step"
    return None, None


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
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
    _freeze_frozen_norms(model)
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


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------
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
            w.writerow({k: r.get(k) for k in keys})
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
