"""Which torch device to run on: one resolver for scoring, training, evaluation and saliency."""
from __future__ import annotations

import torch

from wsi_her2.errors import ConfigError

DEVICES = ("auto", "cuda", "cpu")


def resolve_device(name: str) -> torch.device:
    """Turn ``"auto"``, ``"cuda"``, ``"cuda:N"`` or ``"cpu"`` into a usable :class:`torch.device`.

    Raises
    ------
    ConfigError
        On an unknown name, or when CUDA is asked for and this torch cannot see a GPU.
    """
    text = str(name).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
            raise ConfigError(
                f"--device {name} asked for CUDA, but no GPU is usable ({build}, "
                f"torch.cuda.is_available() is False); use --device cpu, or --device auto to fall back"
            )
        device = torch.device(text)
        if device.index is None:  # name the GPU explicitly, so results say which one ran
            return torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible; "
                "pick an index below that (see nvidia-smi / CUDA_VISIBLE_DEVICES)"
            )
        return device
    raise ConfigError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)} (or cuda:N)")
