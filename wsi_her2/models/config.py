"""The configuration that travels with every patch classifier and its weights file.

A :class:`ModelConfig` says what the network expects (input size, normalisation, stain
normalisation), at which physical resolution its tiles must be cut (``tile_px`` at
``mpp_um``) and what its outputs mean (``classes``). It is stored inside every weights file so
that tiles and model cannot drift apart. This module has no torch dependency.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from wsi_her2.errors import ConfigError
from wsi_her2.vocab import HER2_CLASSES

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Head designs understood by :mod:`wsi_her2.models.heads` ("none": the model has no learned head).
HEAD_NAMES: tuple[str, ...] = ("linear", "mlp512_256", "fusion1024_512", "none")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a patch classifier and feed it correctly cut tiles.

    Attributes
    ----------
    name
        Registry key, e.g. ``"convnext_tiny"``.
    arch
        timm model name, or the key of a custom architecture.
    classes
        Class names, in logit order.
    tile_px
        Tile edge cut from the slide, in pixels at ``mpp_um``.
    input_px
        Network input edge in pixels; tiles are resized when it differs from ``tile_px``.
    mpp_um
        Physical pixel size (micrometres per pixel) the model was trained at.
    mean, std
        Per-channel normalisation applied to RGB values scaled to [0, 1].
    head
        Classification head, one of :data:`HEAD_NAMES`.
    dropout
        Dropout probability of the MLP heads (the plain ``"linear"`` head has none).
    stain_norm
        Stain normalisation applied to tiles before ``mean``/``std``, e.g.
        ``{"method": "reinhard", "target_means": [...], "target_stds": [...]}``; ``None`` for none.
    needs_weights
        ``False`` for rule-based scorers that work without trained weights.
    description
        One line for ``wsi-her2 models``.
    extra
        Architecture-specific, JSON-serialisable settings.
    """

    name: str
    arch: str
    classes: tuple[str, ...] = HER2_CLASSES
    tile_px: int = 224
    input_px: int = 224
    mpp_um: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    head: str = "linear"
    dropout: float = 0.5
    stain_norm: dict | None = None
    needs_weights: bool = True
    description: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Normalise JSON round-trip artefacts (lists) so that equality holds after loading.
        self.classes = tuple(str(c) for c in self.classes)
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        self.tile_px = _as_int(self.tile_px, "tile_px", self.name)
        self.input_px = _as_int(self.input_px, "input_px", self.name)
        self.mpp_um = float(self.mpp_um)
        self.dropout = float(self.dropout)
        self.needs_weights = bool(self.needs_weights)
        self.extra = dict(self.extra or {})
        self.stain_norm = None if self.stain_norm is None else dict(self.stain_norm)
        self._validate()

    def _validate(self) -> None:
        where = f"model config {self.name!r}"
        if not self.name or not self.arch:
            raise ConfigError(f"{where}: 'name' and 'arch' must be non-empty strings")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"{where}: classes must be at least two distinct names, got {self.classes}")
        if self.tile_px <= 0 or self.input_px <= 0:
            raise ConfigError(f"{where}: tile_px and input_px must be positive, got {self.tile_px}, {self.input_px}")
        if not (math.isfinite(self.mpp_um) and self.mpp_um > 0):
            raise ConfigError(f"{where}: mpp_um must be a positive number of micrometres, got {self.mpp_um}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"{where}: mean and std need one value per RGB channel, got {self.mean}, {self.std}")
        if any(not (math.isfinite(s) and s > 0) for s in self.std):
            raise ConfigError(f"{where}: std values must be positive, got {self.std}")
        if self.head not in HEAD_NAMES:
            raise ConfigError(f"{where}: head {self.head!r} is not one of {', '.join(HEAD_NAMES)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}: dropout must be in [0, 1), got {self.dropout}")
        if self.stain_norm is not None and "method" not in self.stain_norm:
            raise ConfigError(f"{where}: stain_norm needs a 'method' key, e.g. {{'method': 'reinhard', ...}}")
        try:
            json.dumps({"stain_norm": self.stain_norm, "extra": self.extra, "description": self.description})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: stain_norm and extra must be JSON-serialisable ({exc})") from exc

    @property
    def n_classes(self) -> int:
        """Number of output logits."""
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        out = {}
        for f in dataclasses.fields(self):
            value = copy.deepcopy(getattr(self, f.name))
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self, *, indent: int | None = None) -> str:
        """The config as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Rebuild a config; keys written by a newer version are dropped with a warning."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a model config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            log.warning("ignoring unknown model config keys %s (written by a newer wsi-her2?)", unknown)
        missing = [k for k in ("name", "arch") if k not in d]
        if missing:
            raise ConfigError(f"model config lacks {missing}; it was not written by wsi_her2.models.save_model")
        return cls(**{k: copy.deepcopy(v) for k, v in d.items() if k in known})

    def with_overrides(self, **overrides: Any) -> ModelConfig:
        """A validated copy with some fields replaced (``name`` cannot change)."""
        known = {f.name for f in dataclasses.fields(self)} - {"name"}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ConfigError(
                f"unknown setting(s) {bad} for model {self.name!r}; valid settings: {', '.join(sorted(known))}"
            )
        return dataclasses.replace(copy.deepcopy(self), **copy.deepcopy(overrides))


def _as_int(value: Any, what: str, name: str) -> int:
    try:
        ok = not isinstance(value, bool) and float(value).is_integer()
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"model config {name!r}: {what} must be a whole number of pixels, got {value!r}")
    return int(value)
