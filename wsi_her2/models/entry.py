"""A registered model: its default config, the factory that builds it, and what it can do.

The modules that define architectures (:mod:`~wsi_her2.models.archs`, :mod:`~wsi_her2.models.hybrids`)
declare their entries here; :mod:`~wsi_her2.models.registry` collects them. Declaring does not import
the registry, so the registry imports the architectures and never the other way round.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from wsi_her2.models.capabilities import PLAIN_CLASSIFIER, Capabilities
from wsi_her2.models.config import ModelConfig

#: ``factory(config, pretrained_file=None, *, pretrained=False) -> nn.Module``
Factory = Callable[..., Any]

__all__ = ["Factory", "ModelEntry", "declare"]


@dataclass(frozen=True)
class ModelEntry:
    config: ModelConfig
    factory: Factory
    capabilities: Capabilities = PLAIN_CLASSIFIER


def declare(entries: list[ModelEntry], *, config: ModelConfig,
            capabilities: Capabilities = PLAIN_CLASSIFIER) -> Callable[[Factory], Factory]:
    """Decorator: add ``factory`` to ``entries`` as the model ``config.name`` (the registry registers them)."""

    def decorator(factory: Factory) -> Factory:
        entries.append(ModelEntry(config, factory, capabilities))
        return factory

    return decorator
