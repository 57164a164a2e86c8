"""The small interface every slide reader backend implements.

Coordinates: ``level`` pixels for region reads (origin top-left, y down); level-0 pixels everywhere
else in the package. Pixels come back as ``(h, w, 3) uint8`` RGB, transparent areas composited on
white (glass), so downstream code never sees alpha.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class SlideLevel:
    width_px: int
    height_px: int
    downsample: float  # level-0 pixels per level pixel


class SlideReader(ABC):
    """A whole-slide image opened by one backend."""

    backend: str = "?"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # filled by each backend's constructor
        self._levels: tuple[SlideLevel, ...] = ()
        self._props: dict[str, str] = {}
        self._version = ""

    def _set_metadata(self, dims, downsamples, props, version: str) -> None:
        self._levels = tuple(SlideLevel(int(w), int(h), float(d)) for (w, h), d in zip(dims, downsamples))
        self._props = {str(k): str(v) for k, v in props.items()}
        self._version = version

    # --- metadata -------------------------------------------------------------------------
    @property
    def levels(self) -> tuple[SlideLevel, ...]:
        return self._levels

    @property
    def properties(self) -> dict[str, str]:
        return self._props

    @property
    def backend_version(self) -> str:
        return self._version

    @property
    def vendor(self) -> str | None:
        props = self.properties
        return props.get("openslide.vendor") or props.get("tiffslide.vendor") or None

    @property
    def dimensions(self) -> tuple[int, int]:
        lvl = self.levels[0]
        return lvl.width_px, lvl.height_px

    @property
    def bounds_offset_px(self) -> tuple[int, int]:
        """Level-0 offset QuPath subtracts when it crops to ``openslide.bounds-x/y`` (MRXS etc.)."""
        props = self.properties
        return int(props.get("openslide.bounds-x", 0) or 0), int(props.get("openslide.bounds-y", 0) or 0)

    def vendor_mpp_um(self) -> tuple[float, str] | None:
        """Pixel size (µm) from the vendor's metadata, with the property it came from."""
        props = self.properties
        for key in ("openslide.mpp-x", "tiffslide.mpp-x", "aperio.MPP"):
            value = props.get(key)
            if value not in (None, "", "None"):
                try:
                    mpp = float(value)
                except ValueError:
                    continue
                if mpp > 0:
                    return mpp, f"vendor:{key}"
        return None

    # --- pixels -----------------------------------------------------------------------------
    @abstractmethod
    def read_level_region(
        self, level: int, x_px: int, y_px: int, w_px: int, h_px: int
    ) -> NDArray[np.uint8]:
        """Read ``(h_px, w_px, 3)`` RGB pixels at ``level``, top-left ``(x_px, y_px)`` in level pixels."""

    def read_level_squares(
        self, level: int, xy_px: NDArray[np.integer], size_px: int, out: NDArray[np.uint8]
    ) -> None:
        """Fill ``out[i]`` with the ``size_px`` square at level pixels ``xy_px[i]`` (top-left x, y).

        For nearby squares (one block of tiles). This default reads their bounding box once and
        slices it; a backend that can decode its own tiles directly overrides it.
        """
        x0, y0 = (int(v) for v in xy_px.min(axis=0))
        x1, y1 = (int(v) + size_px for v in xy_px.max(axis=0))
        region = self.read_level_region(level, x0, y0, x1 - x0, y1 - y0)
        for i, (x, y) in enumerate(xy_px):
            out[i] = region[y - y0 : y - y0 + size_px, x - x0 : x - x0 + size_px]

    def close(self) -> None:  # pragma: no cover - trivial
        pass

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def short_error(exc: BaseException) -> str:
    """An exception as one short line for a one-line error: its first line (or its type), at most 160 characters."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


def rgba_to_rgb_on_white(rgba: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Composite RGBA (OpenSlide returns premultiplied alpha) onto white glass."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    # premultiplied: rgb already scaled by alpha, so add white * (1 - alpha)
    out = rgb.astype(np.uint16) + (255 - alpha[..., None]).astype(np.uint16)
    return np.minimum(out, 255).astype(np.uint8)
