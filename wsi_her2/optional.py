"""Optional dependencies, grouped by pipeline stage as the ``pyproject.toml`` extras.

The core install tiles and scores slides. Cohort runs, training and the web app need more;
:func:`require` imports such a package or raises one clear error naming the extra to install.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from wsi_her2.errors import MissingDependencyError

#: importable module -> (PyPI distribution, extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "distributed": ("dask[distributed]", "cohort"),
    "dask": ("dask[distributed]", "cohort"),
    "dask_jobqueue": ("dask-jobqueue", "cohort"),
    "matplotlib": ("matplotlib", "train"),
    "skimage": ("scikit-image", "train"),
    "gradio": ("gradio", "app"),
}


def require(module: str, *, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` saying which extra installs it.

    ``purpose`` completes the sentence "<purpose> needs ..." (e.g. ``"wsi-her2 run"``).
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.split(".")[0]
        if exc.name is not None and exc.name.split(".")[0] != top:
            raise  # the package is there but one of its own dependencies is broken: show it
        dist, extra = EXTRAS.get(top, (top, "all"))
        raise MissingDependencyError(
            f"{purpose} needs the optional package {dist!r}, which is not installed; "
            f"install it with: pip install 'wsi-her2[{extra}]'"
        ) from exc
