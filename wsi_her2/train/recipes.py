"""Named training presets taken from the papers, with every hyperparameter visible.

A recipe is a flat dataclass so that any field can be overridden from the command line
(``--set lr=3e-4 --set phase_epochs=2,2,2``). Where a paper does not state a value, the field's
comment says "not stated" and the value is a conventional choice.

=================  ==========================================================================
recipe             source
=================  ==========================================================================
all-trainable      ConvNeXt/ResNet50 on BCI (paper 001): GAP -> FC512 -> dropout -> FC256 ->
                   dropout -> classes; all layers trainable; Adam 1e-4, /10 after 15 of 30
                   epochs; flips and shifts; batch 16.
phased             EfficientNetV2-S + ViT-B/16 hybrid (paper 002): head only, then the last
                   stages, then everything, with per-group learning rates; AdamW (wd 1e-5);
                   ReduceLROnPlateau on validation AUC (patience 3, factor 0.2); early stopping
                   (patience 7); label smoothing 0.2; balanced class weights and a weighted
                   sampler; AMP with gradient clipping 1.0; patient-level 70/15/15 split.
frozen-fusion      ResNet18 + EfficientNet-B0 hybrid (paper 000): pretrained backbones frozen,
                   fusion head trained.
selective-freeze   Selective layer freezing + cyclic learning rate (paper 004): the first
                   ``freeze_fraction`` of the backbone's layers frozen (50% was best).
=================  ==========================================================================
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from wsi_her2.errors import ConfigError

TRAINABLE = ("all", "head", "last", "fraction")
SCHEDULES = ("constant", "step", "plateau", "cyclic")
OPTIMIZERS = ("adam", "adamw", "sgd")
MONITORS = ("val_auc", "val_loss", "val_acc")


@dataclass(frozen=True)
class Phase:
    """One stage of training with its own trainable set and learning rates."""

    name: str
    epochs: int
    trainable: str
    lr: float  # head (and whole model when backbone_lr is None)
    backbone_lr: float | None


@dataclass
class Recipe:
    """Every knob of a training run. See the module docstring for the presets."""

    name: str = "custom"
    description: str = ""
    default_model: str = "resnet18"

    # -- model -----------------------------------------------------------------------------
    head: str | None = None  # ModelConfig head override ("linear" | "mlp512_256"); None keeps the model's
    dropout: float | None = None  # head dropout override
    input_px: int | None = None  # None: the model's input_px

    # -- data ------------------------------------------------------------------------------
    batch_size: int = 16
    split: tuple[float, ...] = (0.7, 0.15, 0.15)  # train/val/test tile shares, split by group
    hflip: bool = True
    vflip: bool = True
    rot90: bool = False
    shift_frac: float = 0.0
    color_jitter: float = 0.0  # brightness/saturation; keep 0 for IHC (DAB intensity is the label)
    weighted_sampler: bool = False
    cache_images: bool = True  # keep decoded tiles in memory (turn off for large datasets)
    num_workers: int = 0

    # -- optimisation ----------------------------------------------------------------------
    optimizer: str = "adam"
    lr: float = 1e-4
    backbone_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only
    epochs: int = 30
    schedule: str = "constant"
    step_epochs: int = 15  # schedule=step: multiply by step_gamma every step_epochs
    step_gamma: float = 0.1
    plateau_patience: int = 3  # schedule=plateau: epochs without improvement of `monitor`
    plateau_factor: float = 0.2
    cyclic_base_lr: float = 1e-5  # schedule=cyclic (per optimiser step)
    cyclic_max_lr: float = 1e-3
    cyclic_half_period_epochs: float = 2.0
    cyclic_mode: str = "triangular"

    # -- loss, precision -------------------------------------------------------------------
    label_smoothing: float = 0.0
    class_weights: str = "none"  # "none" | "balanced"
    amp: bool = False  # autocast (bf16) on CUDA; ignored on CPU
    grad_clip_norm: float | None = None

    # -- freezing --------------------------------------------------------------------------
    trainable: str = "all"  # all | head | last | fraction (single-phase recipes)
    freeze_fraction: float = 0.0  # trainable=fraction: share of backbone layers frozen, from the input side
    last_stages: int = 3  # trainable=last: CNN stages unfrozen per backbone
    last_vit_blocks: int = 4  # trainable=last: transformer blocks unfrozen per ViT backbone

    # -- phases (empty: one phase from the fields above) -----------------------------------
    phase_epochs: tuple[int, ...] = ()
    phase_trainable: tuple[str, ...] = ()
    phase_lr: tuple[float, ...] = ()
    phase_backbone_lr: tuple[float, ...] = ()

    # -- selection, stopping, smoke runs ---------------------------------------------------
    monitor: str = "val_auc"
    early_stopping_patience: int = 0  # 0: off
    seed: int = 0
    max_steps: int | None = None  # stop the whole run after this many optimiser steps
    steps_per_epoch: int | None = None  # cap optimiser steps per epoch (smoke runs)

    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "Recipe":
        """Raise ConfigError on values out of range or inconsistent with each other."""
        checks = [
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
            (self.monitor in MONITORS, f"monitor must be one of {MONITORS}"),
            (self.trainable in TRAINABLE, f"trainable must be one of {TRAINABLE}"),
            (self.class_weights in ("none", "balanced"), "class_weights must be none or balanced"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (0.0 <= self.freeze_fraction <= 1.0, "freeze_fraction must be in [0, 1]"),
            (0.0 <= self.label_smoothing < 1.0, "label_smoothing must be in [0, 1)"),
            (len(self.split) == 3 and all(s >= 0 for s in self.split) and self.split[0] > 0,
             "split must be three non-negative shares with train > 0, e.g. 0.7,0.15,0.15"),
        ]
        n = len(self.phase_epochs)
        if n:
            checks += [
                (len(self.phase_trainable) == n and len(self.phase_lr) == n and len(self.phase_backbone_lr) == n,
                 "phase_epochs, phase_trainable, phase_lr and phase_backbone_lr must have the same length"),
                (all(t in TRAINABLE for t in self.phase_trainable), f"phase_trainable entries must be in {TRAINABLE}"),
            ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"recipe {self.name!r}: {msg}")
        return self

    def phases(self) -> list[Phase]:
        """The phase plan, with phase lengths rescaled to ``epochs`` (at least one epoch each).

        Overriding ``epochs`` on a phased recipe keeps the published proportions
        (7:10:13 of 30), so ``--epochs 3`` gives one epoch per phase.
        """
        if not self.phase_epochs:
            return [Phase("train", self.epochs, self.trainable, self.lr, self.backbone_lr)]
        plan = list(self.phase_epochs)
        total = sum(plan)
        if total != self.epochs:
            plan = [max(1, round(e * self.epochs / total)) for e in plan]
            # absorb rounding in the longest phase so the total matches when it can
            diff = self.epochs - sum(plan)
            i = max(range(len(plan)), key=lambda j: plan[j])
            plan[i] = max(1, plan[i] + diff)
        return [
            Phase(f"phase{i + 1}-{t}", e, t, lr, None if blr is None else float(blr))
            for i, (e, t, lr, blr) in enumerate(zip(plan, self.phase_trainable, self.phase_lr, self.phase_backbone_lr))
        ]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPES: dict[str, Recipe] = {
    "all-trainable": Recipe(
        name="all-trainable",
        description="Paper 001 (ConvNeXt/ResNet50, BCI): all layers trainable, MLP head 512-256, Adam, step LR.",
        default_model="convnext_tiny",
        head="mlp512_256",
        dropout=0.5,  # not stated (dropout after each FC layer)
        batch_size=16,
        hflip=True,
        vflip=True,
        shift_frac=0.1,  # not stated (Keras width/height shift)
        optimizer="adam",
        lr=1e-4,
        epochs=30,
        schedule="step",
        step_epochs=15,
        step_gamma=0.1,
        trainable="all",
        monitor="val_acc",
    ),
    "phased": Recipe(
        name="phased",
        description="Paper 002 (EfficientNetV2-S + ViT-B/16): head -> last stages -> all, per-group LRs, AdamW.",
        default_model="hybrid_effv2s_vitb16",
        batch_size=32,
        hflip=True,
        vflip=True,
        rot90=True,
        shift_frac=0.1,
        color_jitter=0.0,  # the paper jittered H&E colour; off by default so IHC grades stay intact
        weighted_sampler=True,
        optimizer="adamw",
        lr=1e-4,
        weight_decay=1e-5,
        epochs=30,
        schedule="plateau",
        plateau_patience=3,
        plateau_factor=0.2,
        label_smoothing=0.2,
        class_weights="balanced",
        amp=True,
        grad_clip_norm=1.0,
        last_stages=3,
        last_vit_blocks=4,
        phase_epochs=(7, 10, 13),
        phase_trainable=("head", "last", "all"),
        phase_lr=(1e-4, 2e-5, 1e-5),
        phase_backbone_lr=(0.0, 1e-6, 5e-7),
        monitor="val_auc",
        early_stopping_patience=7,
    ),
    "frozen-fusion": Recipe(
        name="frozen-fusion",
        description="Paper 000 (ResNet18 + EfficientNet-B0 hybrid): frozen pretrained backbones, trained fusion head.",
        default_model="hybrid_resnet18_effb0",
        batch_size=32,  # not stated
        hflip=True,
        vflip=True,
        rot90=True,
        optimizer="adam",
        lr=1e-3,  # not stated; a head-only run tolerates a larger LR
        epochs=20,  # not stated
        schedule="plateau",
        plateau_patience=3,
        plateau_factor=0.2,
        trainable="head",
        monitor="val_auc",
        early_stopping_patience=6,
    ),
    "selective-freeze": Recipe(
        name="selective-freeze",
        description="Paper 004: freeze the first 50% of backbone layers, cyclic learning rate.",
        default_model="resnet50",
        batch_size=32,  # not stated
        hflip=True,
        vflip=True,
        rot90=True,
        optimizer="adam",  # not stated
        lr=1e-4,
        epochs=20,  # not stated
        schedule="cyclic",
        cyclic_base_lr=1e-5,
        cyclic_max_lr=1e-3,
        cyclic_half_period_epochs=2.0,
        cyclic_mode="triangular",
        trainable="fraction",
        freeze_fraction=0.5,
        monitor="val_auc",
    ),
}


def _coerce(value: str, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    text = value.strip()
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if text.lower() in ("none", "null", ""):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(text, inner[0], key)
    if origin is tuple:
        inner = args[0] if args else str
        parts = [p for p in text.replace(";", ",").split(",") if p.strip()]
        return tuple(_coerce(p, inner, key) for p in parts)
    if typ is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--set {key}={value}: expected true or false")
    if typ in (int, float):
        try:
            return typ(float(text)) if typ is int and float(text).is_integer() else typ(text)
        except ValueError:
            raise ConfigError(f"--set {key}={value}: expected a number") from None
    return text


def parse_overrides(pairs: list[str] | None) -> dict[str, str]:
    """``["epochs=3", "lr=1e-3"]`` -> ``{"epochs": "3", "lr": "1e-3"}``."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set expects KEY=VALUE; got {pair!r}")
        k, v = pair.split("=", 1)
        out[k.strip().replace("-", "_")] = v
    return out


def get_recipe(name: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """A copy of a preset with overrides applied (strings are parsed to the field's type).

    Raises
    ------
    ConfigError
        For an unknown recipe, an unknown field, or a value out of range.
    """
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    recipe = dataclasses.replace(RECIPES[name])
    hints = typing.get_type_hints(Recipe)
    for key, value in (overrides or {}).items():
        if key not in hints or key in ("extra",):
            raise ConfigError(f"recipe has no field {key!r}; fields: {', '.join(k for k in hints if k != 'extra')}")
        setattr(recipe, key, _coerce(value, hints[key], key) if isinstance(value, str) else value)
    return recipe.validate()


def describe(recipe: Recipe) -> str:
    """All fields, one per line (for ``wsi-her2 train --show-recipe``)."""
    return "\n".join(f"{k} = {v!r}" for k, v in recipe.to_dict().items() if k != "extra")
