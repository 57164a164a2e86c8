"""Reading weights files without ever unpickling arbitrary objects: their tensors and the config stored with them.

Safetensors are read as they are; torch ``.pt/.pth/.bin`` files only with ``torch.load(weights_only=True)``, so
a checkpoint that would run code while unpickling is refused before anything in it runs. Nothing here builds
a model (that is :mod:`wsi_her2.models.weights`, through the registry), so the architectures can read
ImageNet checkpoints with it.
"""
from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from wsi_her2.errors import ConfigError, WeightsError
from wsi_her2.models.config import ModelConfig

__all__ = ["CONFIG_METADATA_KEY", "WEIGHTS_SUFFIXES", "config_from_dict", "config_sidecar", "file_config", "is_weights_path",
           "read_checkpoint", "read_config"]

CONFIG_METADATA_KEY = "wsi_her2_config"
WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def is_weights_path(name: str) -> bool:
    """Whether ``--model`` names a weights file (by suffix or a path separator) rather than a
    registered model name."""
    return str(name).lower().endswith(WEIGHTS_SUFFIXES) or os.sep in str(name)


# Keys under which training scripts commonly nest the state_dict of a checkpoint dict.
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


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
    return None if raw is None else config_from_dict(raw, path)


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    sidecar = config_sidecar(path)
    if not sidecar.is_file():
        return None
    try:
        return json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{sidecar} is not a readable model config ({exc}); fix or delete it") from exc


def file_config(path: str | Path) -> ModelConfig | None:
    """The config stored with weights file ``path`` once its tensors are read: its ``<stem>.json`` (the
    safetensors metadata is read by :func:`read_checkpoint`), or None."""
    raw = _read_sidecar(Path(path).expanduser())
    return None if raw is None else config_from_dict(raw, Path(path))


def config_from_dict(raw: Any, path: Path) -> ModelConfig:
    """A stored config dict as a :class:`ModelConfig`; one :class:`WeightsError` line naming ``path`` when invalid."""
    try:
        return ModelConfig.from_dict(raw)
    except ConfigError as exc:
        raise WeightsError(f"the model config stored with {path} is invalid: {exc}") from exc


