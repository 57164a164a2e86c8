"""Which parameters train, and how: the head/backbone partition, freezing per phase, the optimiser and the schedule.

Freezing works on a :class:`ParamPartition`: the head, and for each backbone its stages in input
-> output order (from timm's ``group_matcher`` where the backbone is a timm model, else its
top-level children). ``trainable="last"`` unfreezes the last ``last_stages`` stages of each CNN
backbone and the last ``last_vit_blocks`` blocks (+ final norm) of each ViT; ``"fraction"``
freezes the first ``freeze_fraction`` of each backbone's parameterised layers.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from wsi_her2.errors import ConfigError
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


def freeze_frozen_norms(model: nn.Module) -> None:
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
