"""A synthetic tissue microarray: round IHC cores of planted grades on a grid, some positions empty.

Each core is a disk drawn as a stack of thin horizontal IHC rectangles (the synthetic slide's
regions are rectangles), so the tissue mask sees round cores while every pixel's grade is known.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from wsi_her2.synthetic.slides import Region, SyntheticSlideSpec

STRIP_PX = 32


def tma_spec(grades: Sequence[Sequence[int | None]] = ((0, 1, 2), (3, None, 2)), *, core_diameter_px: int = 896,
             pitch_px: int = 1344, margin_px: int = 448, mpp_um: float = 0.5, seed: int = 0) -> SyntheticSlideSpec:
    """Cores of ``grades[row][col]`` (``None``: no core at that position) on a ``pitch_px`` grid.

    Core ``(row, col)`` is centred at level-0 ``(margin + pitch * (col + 0.5), margin + pitch * (row + 0.5))``
    with diameter ``core_diameter_px`` (896 px = 448 µm at 0.5 µm/px: a small core, fast to test).
    """
    n_rows, n_cols = len(grades), max(len(r) for r in grades)
    r = core_diameter_px / 2
    regions = []
    for row, line in enumerate(grades):
        for col, grade in enumerate(line):
            if grade is None:
                continue
            cx, cy = margin_px + pitch_px * (col + 0.5), margin_px + pitch_px * (row + 0.5)
            for top in range(int(cy - r), int(cy + r), STRIP_PX):
                dy = max(abs(top - cy), abs(top + STRIP_PX - cy)) if not top < cy < top + STRIP_PX else 0
                half = math.sqrt(max(r * r - dy * dy, 0.0))
                if half >= 1:
                    regions.append(Region("ihc", int(cx - half), top, int(2 * half), STRIP_PX, grade=int(grade)))
    return SyntheticSlideSpec(2 * margin_px + pitch_px * n_cols, 2 * margin_px + pitch_px * n_rows, mpp_um=mpp_um,
                              regions=tuple(regions), dust=False, seed=seed)
