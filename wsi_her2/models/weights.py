"""Saving and loading trained classifiers without ever unpickling arbitrary objects.

Weights are written as safetensors with the model's :class:`ModelConfig` (JSON) in the file's
metadata, plus a readable ``<stem>.json`` beside it. Loading accepts safetensors, or torch
``.pt/.pth/.bin`` files read with ``torch.load(weights_only=True)``: a checkpoint that would run
code while unpickling is refused before anything in it runs.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from wsi_her2 import __version__
from wsi_her2.files import atomic_target, atomic_write_text
from wsi_her2.errors import ConfigError, WeightsError
from wsi_her2.models.config import ModelConfig
from wsi_her2.models.registry import build_model, get_config, registered

log = logging.getLogger(__name__)

CONFIG_METADATA_KEY = "wsi_her2_config"
WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def is_weights_path(name: str) -> bool:
    """Whether ``--model`` names a weights file (by suffix or a path separator) rather than a
    registered model name."""
    return str(name).lower().endswith(WEIGHTS_SUFFIXES) or os.sep in str(name)
# Keys under which training scripts commonly nest the state_dict of a checkpoint dict.
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
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


def config_sidecar(weights_path: str | Path) -> Path:
    """The readable ``<stem>.json`` that accompanies a weights file."""
    path = Path(weights_path)
    return path.with_name(path.stem + ".json")


def _is_safetensors(path: Path) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'.
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _not_a_checkpoint(path: Path, why: str) -> WeightsError:
    return WeightsError(
        f"{path} is not a model checkpoint ({why}); pass a .safetensors written by `wsi-her2 train` "
        "or a .pt/.pth holding a state_dict"
    )


def _refuse_pickle(path: Path) -> WeightsError:
    return WeightsError(
        f"{path} is not a plain tensor checkpoint; refusing to unpickle it; convert it to safetensors where it "
        "was made (safetensors.torch.save_file(model.state_dict(), 'model.safetensors')) and pass that file"
    )


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read a weights file safely.

    Returns
    -------
    (state_dict, config_dict)
        Tensors on the CPU, and the embedded config dict (None when the file has none).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"weights file {path} does not exist; check the path, or train one with `wsi-her2 train`")
    if not path.is_file():
        raise WeightsError(f"weights path {path} is not a file; pass the .safetensors file inside it")
    if _is_safetensors(path):
        return _read_safetensors(path)
    return _read_torch(path)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            state_dict = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:  # SafetensorError, OSError, ...: one message for a damaged file
        raise _not_a_checkpoint(path, f"unreadable safetensors: {exc}") from exc
    raw = metadata.get(CONFIG_METADATA_KEY)
    if raw is None:
        return state_dict, None
    try:
        return state_dict, json.loads(raw)
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path} carries a damaged model config ({exc}); pass the model name explicitly") from exc


def _read_torch(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the result is what matters
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise _refuse_pickle(path) from None
        raise _not_a_checkpoint(path, _first_line(exc)) from None
    except Exception as exc:  # torch raises KeyError/EOFError/RuntimeError for non-checkpoints
        raise _not_a_checkpoint(path, _first_line(exc)) from None

    config = None
    if isinstance(obj, Mapping) and _all_tensors(obj) and obj:
        state_dict = dict(obj)
    elif isinstance(obj, Mapping):
        nested = next((obj[k] for k in _STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None or not _all_tensors(nested):
            keys = ", ".join(map(repr, list(obj)[:6]))
            raise _not_a_checkpoint(path, f"a dict with keys {keys} but no state_dict of tensors")
        state_dict = dict(nested)
        if isinstance(obj.get("config"), Mapping):
            config = dict(obj["config"])
    else:
        raise _not_a_checkpoint(path, f"it holds a {type(obj).__name__}, not a state_dict")
    return state_dict, config


def _all_tensors(d: Mapping) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def read_config(path: str | Path) -> ModelConfig | None:
    """The config stored with a weights file (metadata, else ``<stem>.json``), without loading tensors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; check the path")
    raw: Any = None
    if _is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                text = (fh.metadata() or {}).get(CONFIG_METADATA_KEY)
            raw = json.loads(text) if text else None
        except Exception as exc:
            raise _not_a_checkpoint(path, f"unreadable safetensors header: {exc}") from exc
    if raw is None:
        raw = _read_sidecar(path)
    return None if raw is None else _config_from(raw, path)


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    sidecar = config_sidecar(path)
    if not sidecar.is_file():
        return None
    try:
        return json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{sidecar} is not a readable model config ({exc}); fix or delete it") from exc


def _config_from(raw: Any, path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(raw)
    except ConfigError as exc:
        raise WeightsError(f"the model config stored with {path} is invalid: {exc}") from exc


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

    state_dict, raw_config = read_checkpoint(weights_path)
    if raw_config is None:
        raw_config = _read_sidecar(weights_path)
    file_config = None if raw_config is None else _config_from(raw_config, weights_path)

    if name is not None:
        registered = get_config(name)
        if file_config is not None and file_config.name != name:
            raise WeightsError(
                f"{weights_path} was saved for model {file_config.name!r} (arch {file_config.arch}), not {name!r}; "
                f"pass --model {file_config.name} or give the file alone"
            )
        config = file_config or registered
    elif file_config is None:
        raise WeightsError(
            f"{weights_path} does not say which model it holds (no embedded config, no {config_sidecar(weights_path).name}); "
            "pass the model name too, e.g. --model resnet50 --weights FILE"
        )
    else:
        config = file_config

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
