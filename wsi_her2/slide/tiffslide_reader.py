"""tiffslide backend (pure Python on tifffile; also opens flat, untiled TIFFs)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from wsi_her2.slide.base import SlideLevel, SlideReader, rgba_to_rgb_on_white


class TiffSlideReader(SlideReader):
    backend = "tiffslide"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        import tiffslide

        self._ts = tiffslide.TiffSlide(str(path))
        self._version = f"tiffslide {tiffslide.__version__}"
        self._levels = tuple(
            SlideLevel(int(w), int(h), float(d))
            for (w, h), d in zip(self._ts.level_dimensions, self._ts.level_downsamples)
        )
        self._props = {str(k): str(v) for k, v in self._ts.properties.items()}

    @property
    def levels(self) -> tuple[SlideLevel, ...]:
        return self._levels

    @property
    def properties(self) -> dict[str, str]:
        return self._props

    @property
    def backend_version(self) -> str:
        return self._version

    def read_level_region(self, level: int, x_px: int, y_px: int, w_px: int, h_px: int) -> NDArray[np.uint8]:
        ds = self._levels[level].downsample
        arr = self._ts.read_region(
            (int(round(x_px * ds)), int(round(y_px * ds))), level, (int(w_px), int(h_px)), as_array=True
        )
        arr = np.asarray(arr)
        if arr.ndim == 2:  # grayscale slide
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.shape[-1] == 4:
            arr = rgba_to_rgb_on_white(arr)
        if arr.dtype != np.uint8:
            raise TypeError(f"{self.path.name}: {arr.dtype} pixels are not supported; export the slide as 8-bit RGB")
        return np.ascontiguousarray(arr[..., :3])

    def close(self) -> None:
        self._ts.close()
