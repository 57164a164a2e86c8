"""One rule for a slide, a TMA core and a region: the same tiles give the same call wherever they sit.

:func:`call_tiles` is the only place a call is made from scored tiles. The slide, each TMA core
(``--tma``) and each region (``--roi``) pass their own tiles to it, so a core gets the call it would
get as a slide of its own (tested: ``tests/test_criteria.py``, ``tests/test_real_stain_check.py``). With a cell-level scorer
(``ihc_dab``) and ``--agg asco``:

- the guideline's percentage rule on tumour cells pooled over the part's tiles
  (:func:`wsi_her2.score.aggregate.aggregate_asco_cells`, ">" or ">=" the cut by the criteria);
- for gastric biopsies and TMA cores, the cluster rule on the part's cells
  (:func:`wsi_her2.score.aggregate.cluster_call`), the percentages kept beside it;
- fewer than 200 tumour cells: indeterminate, with the reason (the number of tiles they lie in does not matter).

Other rules (``vote``, ``mean``) and trained models call from tile probabilities: fewer usable
tiles than ``--min-tiles`` is indeterminate there.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_her2.criteria import ScoringRule
from wsi_her2.result import PartCall
from wsi_her2.score.aggregate import (
    AGGREGATORS, CELL_FRACTION_KEYS, HER2_CATEGORIES, TUMOUR_CELLS_KEY, aggregate_asco_cells, cluster_call,
    her2_category,
)
from wsi_her2.score.cells import largest_clusters
from wsi_her2.vocab import INDETERMINATE

__all__ = ["call_tiles"]


def call_tiles(pred: Any, tiles: NDArray, *, agg: str, min_tiles: int, rule: ScoringRule,
               cell_fraction_cut: float | None = None, cell_xy_um: NDArray[np.float64] | None = None) -> PartCall:
    """The call of some tiles: the rule's :class:`SlideCall` with its HER2 category and the criteria.

    ``pred``: the store's :class:`~wsi_her2.score.inference.PredictResult`; ``tiles``: store tile
    indices, or a mask with one entry per store tile (unscored tiles are left out either way);
    ``cell_fraction_cut``: a lab calibration's cut in place of the guideline's 10 %;
    ``cell_xy_um``: ``(cells, 2)`` centres of ``pred.cells`` in µm (needed by the cluster rule).
    """
    tiles = np.asarray(tiles)
    use = np.flatnonzero(tiles) if tiles.dtype == bool else tiles.astype(np.int64)
    use = use[pred.scored[use]]
    meas = pred.measurements
    cell_level = agg == "asco" and all(k in meas for k in (*CELL_FRACTION_KEYS, TUMOUR_CELLS_KEY))
    if cell_level:  # judged by its tumour cells (>= 200), whatever the number of tiles they lie in
        call = _cell_call(pred, use, rule=rule, cut=cell_fraction_cut, cell_xy_um=cell_xy_um)
    else:
        call = AGGREGATORS[agg](pred.probs[use], min_tiles=min_tiles)
    out = call.to_dict()
    any_staining = out["details"].get("fraction_at_least", {}).get(">=1+") if cell_level else None
    key = her2_category(out["her2_score"], any_staining, rule.criteria)
    return PartCall(**out, her2_category=key, her2_category_text=HER2_CATEGORIES[key], criteria=rule.to_dict())


def _cell_call(pred: Any, use: NDArray[np.int64], *, rule: ScoringRule, cut: float | None,
               cell_xy_um: NDArray[np.float64] | None):
    meas = pred.measurements
    fractions = np.stack([np.asarray(meas[k])[use] for k in CELL_FRACTION_KEYS], axis=1)
    thresholds = dict.fromkeys(("1+", "2+", "3+"), rule.criteria.cell_fraction_cut if cut is None else cut)
    call = aggregate_asco_cells(fractions, np.asarray(meas[TUMOUR_CELLS_KEY])[use], thresholds=thresholds,
                                inclusive=rule.criteria.inclusive_cut)
    if not rule.uses_clusters or call.her2_score == INDETERMINATE or pred.cells is None or cell_xy_um is None:
        return call
    rows = pred.cells.rows_of_tiles(use)
    largest = largest_clusters(pred.cells.take(rows), cell_xy_um[rows])
    return cluster_call(call, largest, min_cells=rule.criteria.cluster_min_cells)
