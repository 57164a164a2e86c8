"""The patch-classifier registry: a dict of models by name, ``create_model`` builds from it.

In the spirit of timm's registry, each entry pairs a :class:`ModelConfig` with a factory
``factory(config, pretrained_file=None, *, pretrained=False) -> nn.Module`` and the model's
:class:`~wsi_her2.models.capabilities.Capabilities`. The factory builds the network described by
``config`` (class count, input size, head); the registry attaches the config and the capabilities to
the module as ``wsi_her2_config`` and ``wsi_her2_capabilities`` so that they travel with the model.
The built-in entries are declared by :mod:`~wsi_her2.models.archs` and :mod:`~wsi_her2.models.hybrids`
(imported here, never importing this module); :func:`register_model` adds others.
"""
from __future__ import annotations

import copy
import difflib
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from wsi_her2.errors import ConfigError, ModelNotFoundError
from wsi_her2.models import archs, hybrids
from wsi_her2.models.capabilities import PLAIN_CLASSIFIER, Capabilities
from wsi_her2.models.config import ModelConfig
from wsi_her2.models.entry import Factory, ModelEntry

log = logging.getLogger(__name__)

#: Every registered model by name: the built-in ones (declared by the architecture modules), then any
#: registered with :func:`register_model`.
_REGISTRY: dict[str, ModelEntry] = {entry.config.name: entry for entry in (*archs.ENTRIES, *hybrids.ENTRIES)}


def registered(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    return name in _REGISTRY


def register_model(name: str, *, config: ModelConfig,
                   capabilities: Capabilities = PLAIN_CLASSIFIER) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory(config, pretrained_file=None, *, pretrained=False)`` as ``name``
    (a model of your own; the built-in ones are declared in :mod:`~wsi_her2.models.archs` and
    :mod:`~wsi_her2.models.hybrids`).

    Parameters
    ----------
    name
        Registry key; must equal ``config.name``.
    config
        Default configuration of the entry (callers may override fields in ``create_model``).
    capabilities
        What the model can do beyond class probabilities (:class:`~wsi_her2.models.capabilities.Capabilities`).
    """
    if config.name != name:
        raise ConfigError(f"register_model({name!r}): config.name is {config.name!r}; they must match")

    def decorator(factory: Factory) -> Factory:
        old = _REGISTRY.get(name)
        if old is not None and _qualname(old.factory) != _qualname(factory):
            raise ConfigError(
                f"model {name!r} is already registered by {_qualname(old.factory)}; pick another name"
            )
        _REGISTRY[name] = ModelEntry(copy.deepcopy(config), factory, capabilities)
        return factory

    return decorator


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        pass
    names = list_models()
    lowered = {n.lower(): n for n in names}
    close = difflib.get_close_matches(str(name).lower(), list(lowered), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(lowered[c]) for c in close)}? " if close else ""
    raise ModelNotFoundError(
        f"unknown model {name!r}; {hint}run `wsi-her2 models` to list them (available: {', '.join(names)})"
    )


def get_config(name: str) -> ModelConfig:
    """A copy of the registered default config of ``name`` (raises ModelNotFoundError)."""
    return copy.deepcopy(_entry(name).config)


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    pretrained_file: str | Path | None = None,
    **config_overrides: Any,
) -> nn.Module:
    """Build a registered classifier, randomly initialised or from ImageNet weights.

    Parameters
    ----------
    name
        Registry key (see :func:`list_models`).
    pretrained
        Start from ImageNet weights found offline (timm's local cache); with ``pretrained_file``
        the weights come from that file (a timm ``.safetensors``/``.pth``; for a hybrid, a folder
        holding one ``<arch>.safetensors`` per backbone).
    **config_overrides
        Fields of :class:`ModelConfig` to change, e.g. ``input_px=64`` or ``classes=("neg", "pos")``.

    Returns
    -------
    torch.nn.Module
        In training mode, with attribute ``wsi_her2_config``. ``forward`` takes normalised float
        ``(B, 3, input_px, input_px)`` and returns logits ``(B, n_classes)``.
    """
    config = _entry(name).config.with_overrides(**config_overrides)
    return build_model(config, pretrained=pretrained, pretrained_file=pretrained_file)


def build_model(
    config: ModelConfig,
    *,
    pretrained: bool = False,
    pretrained_file: str | Path | None = None,
) -> nn.Module:
    """Build the model a full config describes (the factory is looked up by ``config.name``)."""
    entry = _entry(config.name)
    use_pretrained = bool(pretrained or pretrained_file is not None)
    model = entry.factory(config, pretrained_file, pretrained=use_pretrained)
    model.wsi_her2_config = copy.deepcopy(config)
    model.wsi_her2_capabilities = entry.capabilities
    return model


def get_capabilities(name: str) -> Capabilities:
    """What the registered model ``name`` can do (raises ModelNotFoundError)."""
    return _entry(name).capabilities


def count_parameters(name_or_config: str | ModelConfig) -> int | None:
    """Parameter count without allocating weights (built on the meta device); None if that fails."""
    config = name_or_config if isinstance(name_or_config, ModelConfig) else get_config(name_or_config)
    try:
        with torch.device("meta"):
            model = build_model(config)
    except Exception as exc:  # a listing must not die because one entry cannot be built here
        log.debug("cannot count parameters of %s: %s", config.name, exc)
        return None
    return sum(p.numel() for p in model.parameters())
