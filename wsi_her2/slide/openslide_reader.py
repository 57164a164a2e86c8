"""OpenSlide backend (the only module that imports openslide)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from wsi_her2.slide.base import SlideReader, rgba_to_rgb_on_white


class OpenSlideReader(SlideReader):
    backend = "openslide"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        import openslide  # the openslide-bin wheel ships the C library

        self._osr = openslide.OpenSlide(str(path))
        self._set_metadata(
            self._osr.level_dimensions, self._osr.level_downsamples, self._osr.properties,
            f"openslide-python {openslide.__version__}; libopenslide {openslide.__library_version__}",
        )

    def read_level_region(self, level: int, x_px: int, y_px: int, w_px: int, h_px: int) -> NDArray[np.uint8]:
        ds = self._levels[level].downsample
        # OpenSlide wants the top-left in level-0 pixels and the size in level pixels.
        region = self._osr.read_region((int(round(x_px * ds)), int(round(y_px * ds))), level, (int(w_px), int(h_px)))
        return rgba_to_rgb_on_white(np.asarray(region))

    def close(self) -> None:
        self._osr.close()
