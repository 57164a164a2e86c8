"""Named parts of a slide scored separately: regions drawn in QuPath, or the cores of a TMA.

A :class:`TileGroups` assigns each tile to at most one part (``-1``: in none). The score stage
scores only tiles in some part and calls each part with exactly the slide's rule (the same
function on the part's tiles: :func:`wsi_her2.score.part_call.call_tiles`); the result is one
:class:`~wsi_her2.result.Part` per part (:class:`~wsi_her2.result.Groups`), from which the writers
make one row per part (``regions.csv`` / ``cores.csv``) and one QuPath annotation per called part.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_her2.result import BLANK, NOT_CALLED, SCORED, Groups, Part, PartCall
from wsi_her2.vocab import INDETERMINATE


@dataclass
class TileGroups:
    """Parts of one slide: ``kind`` is ``"region"`` or ``"core"``.

    ``geometries`` are shapely polygons in level-0 pixels of the slide file. ``grid`` holds
    ``(row, col)`` per part (TMA), ``unscored`` the parts reported but never scored (TMA grid
    positions without tissue, status ``missing``).
    """

    kind: str
    names: list[str]
    geometries: list[Any]
    tile_group: NDArray[np.int64]
    grid: list[tuple[int, int]] | None = None
    unscored: list[Part] = field(default_factory=list)

    @property
    def inside(self) -> NDArray[np.bool_]:
        return self.tile_group >= 0

    def members(self) -> list[NDArray[np.int64]]:
        """Each part's tile indices (one sort of the tiles, not one pass over them per part)."""
        order = np.argsort(self.tile_group, kind="stable")
        bounds = np.searchsorted(self.tile_group[order], np.arange(len(self.names) + 1))
        return [order[bounds[g]: bounds[g + 1]] for g in range(len(self.names))]

    def call_each(self, call_part: Callable[[NDArray[np.int64]], PartCall], scored: NDArray[np.bool_], *,
                  qc_pass: NDArray[np.bool_], mpp_um: float) -> Groups:
        """Every part called with ``call_part`` (the slide's rule on some tiles), in file order for regions and
        grid order for cores, the unscored parts after them (:func:`part_status` says which are called)."""
        parts = []
        for g, (name, members) in enumerate(zip(self.names, self.members())):
            call = call_part(members)
            used = int(scored[members].sum())
            status, note = part_status(call, used)
            columns = call.columns()
            if status == BLANK:  # nothing was looked at; a part not called keeps its indeterminate score, as a slide does
                columns["her2_score"] = ""
            geom = self.geometries[g]
            cx, cy = geom.centroid.coords[0]
            parts.append(Part(
                name=name, status=status, columns=columns, tiles_used=used, tiles_rejected=int((~qc_pass[members]).sum()),
                area_mm2=round(float(geom.area) * (mpp_um / 1000.0) ** 2, 4), x_level0=round(cx, 1), y_level0=round(cy, 1),
                note=note, grid=None if self.grid is None else self.grid[g], call=call, geometry=geom,
            ))
        return Groups(self.kind, (*parts, *self.unscored))


def part_status(call: PartCall, tiles_used: int) -> tuple[str, str]:
    """``(status, note)`` of a part from its call alone: ``blank`` with no usable tile at all, ``not called`` when
    its call is indeterminate (the rule's own reason: fewer than 200 tumour cells for a cell-level call, whatever
    the number of tiles they lie in; fewer usable tiles than ``--min-tiles`` for a tile-level one), else ``scored``."""
    if tiles_used == 0:
        return BLANK, "no usable tiles"
    if call.her2_score == INDETERMINATE:
        return NOT_CALLED, call.reason or ""
    return SCORED, ""
