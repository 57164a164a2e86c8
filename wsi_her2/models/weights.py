"""Saving and loading trained classifiers without ever unpickling arbitrary objects.

Weights are written as safetensors with the model's :class:`ModelConfig` (JSON) in the file's
metadata, plus a readable ``<stem>.json`` beside it. Loading reads the file with
:mod:`wsi_her2.models.checkpoint` (safetensors, or torch ``.pt/.pth/.bin`` with
``torch.load(weights_only=True)``: a checkpoint that would run code while unpickling is refused
before anything in it runs) and builds the model through the registry.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from wsi_her2 import __version__
from wsi_her2.files import atomic_target, atomic_write_text
from wsi_her2.errors import ConfigError, WeightsError
from wsi_her2.models.checkpoint import (
    CONFIG_METADATA_KEY, config_from_dict, config_sidecar, file_config, is_weights_path, read_checkpoint,
)
from wsi_her2.models.config import ModelConfig
from wsi_her2.models.registry import build_model, get_config, registered

log = logging.getLogger(__name__)

# Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def save_model(model: nn.Module, path: str | Path) -> Path:
    """Write ``model``'s weights and config as safetensors, plus ``<stem>.json`` beside them.

    Parameters
    ----------
    model
        A module built by ``create_model``/``load_model`` (it carries ``wsi_her2_config``).
    path
        Destination; ``.safetensors`` is appended when the name has another suffix.

    Returns
    -------
    Path
        The weights file written. Both files are written atomically (temp file, then rename).
    """
    from safetensors.torch import save_file

    config = getattr(model, "wsi_her2_config", None)
    if not isinstance(config, ModelConfig):
        raise ConfigError("this model carries no wsi_her2_config; build it with wsi_her2.models.create_model")
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; cannot save it")
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        # safetensors refuses tensors that share storage (tied or viewed weights): copy those only,
        # since copying everything doubles the memory of a 100M-parameter model.
        ptr = storage.data_ptr()
        if ptr and (ptr in storages or tensor.nbytes != storage.nbytes()):
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    metadata = {
        CONFIG_METADATA_KEY: config.to_json(),
        "wsi_her2_version": __version__,
        "format": "pt",
    }
    with atomic_target(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    atomic_write_text(config_sidecar(path), config.to_json(indent=2) + "\n")
    log.info("saved %s (%d tensors) to %s", config.name, len(tensors), path)
    return path


def _looks_like_path(name_or_path: str | Path) -> bool:
    if isinstance(name_or_path, Path):
        return True
    text = str(name_or_path)
    if registered(text):
        return False
    return is_weights_path(text) or "/" in text or Path(text).expanduser().exists()


def load_model(
    name_or_path: str | Path,
    *,
    weights: str | Path | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a classifier and load its weights strictly; the result is in eval mode.

    Parameters
    ----------
    name_or_path
        A weights file that carries its config (``runs/x/model.safetensors``), or a registry name.
    weights
        Weights for the named model (``.safetensors``, or ``.pt/.pth/.bin`` holding a state_dict
        or ``{"state_dict": ..., "config": {...}}``). Required for models that need weights.
    map_location
        Device the model is moved to.

    Raises
    ------
    ModelNotFoundError
        Unknown model name.
    WeightsError
        Missing, unsafe or unreadable file; weights that do not fit the architecture; a model
        that needs weights given none.
    """
    if _looks_like_path(name_or_path):
        if weights is not None:
            raise ConfigError(
                f"got two weights files ({name_or_path} and {weights}); pass a model name with --weights, or one file"
            )
        weights_path, name = Path(name_or_path).expanduser(), None
    else:
        weights_path, name = (None if weights is None else Path(weights).expanduser()), str(name_or_path)

    if weights_path is None:
        config = get_config(name)  # type: ignore[arg-type]
        if config.needs_weights:
            raise WeightsError(
                f"{name} needs trained weights: pass --weights FILE (a .safetensors written by `wsi-her2 train`)"
            )
        model = build_model(config)
        return model.to(map_location).eval()

    state_dict, stored = read_checkpoint(weights_path)
    stored_config = file_config(weights_path) if stored is None else config_from_dict(stored, weights_path)

    if name is not None:
        registered = get_config(name)
        if stored_config is not None and stored_config.name != name:
            raise WeightsError(
                f"{weights_path} was saved for model {stored_config.name!r} (arch {stored_config.arch}), not {name!r}; "
                f"pass --model {stored_config.name} or give the file alone"
            )
        config = stored_config or registered
    elif stored_config is None:
        raise WeightsError(
            f"{weights_path} does not say which model it holds (no embedded config, no {config_sidecar(weights_path).name}); "
            "pass the model name too, e.g. --model resnet50 --weights FILE"
        )
    else:
        config = stored_config

    model = _build_and_load(config, state_dict, source=weights_path)
    log.info("loaded %s weights from %s", config.name, weights_path)
    return model.to(map_location).eval()


def _build_and_load(config: ModelConfig, state_dict: dict[str, torch.Tensor], *, source: Path) -> nn.Module:
    # Build on the meta device and adopt the file's tensors: random initialisation of a 100M
    # parameter model costs seconds and would be overwritten anyway.
    try:
        with torch.device("meta"):
            model = build_model(config)
    except Exception as exc:  # a factory that cannot run on meta: build normally
        log.debug("cannot build %s on the meta device (%s); building normally", config.name, exc)
        model = build_model(config)
        load_state_dict_strict(model, state_dict, source=source)
        return model
    load_state_dict_strict(model, state_dict, source=source, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        # Non-persistent buffers are not in the file and stayed on meta: rebuild for real.
        model = build_model(config)
        load_state_dict_strict(model, state_dict, source=source)
    return model


def load_state_dict_strict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str | Path, assign: bool = False
) -> None:
    """Load every tensor or fail with a message listing what does not fit.

    With ``assign=True`` (for a model built on the meta device) the module adopts the tensors,
    cast to the dtypes the module declares.
    """
    state_dict = _strip_wrapper_prefixes(state_dict)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        config = getattr(model, "wsi_her2_config", None)
        what = f"model {config.name!r} (arch {config.arch}, {config.n_classes} classes)" if config else "this model"
        parts = []
        for label, items in (("shape mismatches", mismatched), ("missing keys", missing), ("unexpected keys", unexpected)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {'; '.join(items[:3])})")
        raise WeightsError(
            f"weights in {source} do not fit {what}: {', '.join(parts)}; pass the --model the weights were trained "
            "as (same architecture, head and class list)"
        )
    if assign:
        state_dict = {k: v.to(dtype=expected[k].dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=assign)


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict
