"""Lab calibration of the default scorer: fit its two documented cut-points to slides of known score.

What is fitted, and only that:

- ``dab_gain``: one factor on every DAB optical density (:class:`wsi_her2.models.ihc_score.IhcThresholds`),
  i.e. all three intensity cut-points (faint / weak-moderate / intense) divided by it. It is
  what differs between labs: DAB development time, antibody clone, scanner response.
- ``cell_fraction_cut``: the share of tumour cells a pattern must exceed (ASCO/CAP: 10 %).

Everything else (membrane geometry, completeness, tumour-cell rule) stays stain physics and
guideline. The fit is a grid search (gains 0.25-4, geometric; cuts 5-20 %) maximising
quadratic-weighted kappa, then exact agreement, then nearness to the defaults; its honesty is
shown by leave-one-out: each slide is called with parameters fitted to the others.

How many slides: the gain moves the 1+/2+/3+ borders together, so a lab needs slides on both
sides of each border it cares about: at least 3 per score (12), better 5 (20), scanned and
stained as the slides to be scored. With fewer, leave-one-out agreement will not beat the
defaults and the defaults should be kept.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from wsi_her2 import __version__
from wsi_her2.errors import ConfigError
from wsi_her2.score.calibration import CALIBRATION_SCHEMA, Calibration
from wsi_her2.vocab import HER2_CLASSES, parse_her2_label

log = logging.getLogger(__name__)

#: 0.25-4 in steps of 2**(1/3) (~26 %): a lab's DAB can read at half or twice the reference's OD (and
#: an uncorrected gamma-encoded scan at about half), and the best fit must lie inside the grid, not on
#: its edge (an edge fit is reported: the true gain may lie beyond it).
DAB_GAINS = tuple(float(g) for g in np.round(2.0 ** np.linspace(-2.0, 2.0, 13), 4))
CELL_FRACTION_CUTS = (0.05, 0.10, 0.15, 0.20)


def read_labels(path: str | Path) -> dict[str, str]:
    """Slide id (file stem of the first column) -> HER2 score, from a CSV whose score column is
    named ``her2_score``, ``label`` or ``score`` (or contains ``her2``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: labels file not found; give a CSV with columns slide,her2_score")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ConfigError(f"{path}: no rows; give a CSV with columns slide,her2_score")
    cols = list(rows[0])
    score_col = next((c for c in cols if c.lower() in ("her2_score", "label", "score")), None)
    score_col = score_col or next((c for c in cols if "her2" in c.lower()), None)
    if score_col is None or score_col == cols[0]:
        raise ConfigError(f"{path}: no score column (her2_score / label / score) beside the slide column {cols[0]!r}")
    labels = {}
    for i, row in enumerate(rows, start=2):
        label = parse_her2_label(row[score_col], where=f"{path}:{i}: ")
        if label is not None:
            name = row[cols[0]].strip()
            labels[name] = label  # a slide id as written ...
            labels.setdefault(Path(name).stem, label)  # ... or a slide file name
    return labels


def measure_store(store_path: str | Path, gains: Sequence[float], *, device: str = "auto", batch_size: int = 64) -> dict:
    """Per gain: the slide's tumour-cell fractions at least 1+/2+/3+ and its tumour cells."""
    from wsi_her2.score.aggregate import CELL_FRACTION_KEYS, TUMOUR_CELLS_KEY
    from wsi_her2.score.inference import InferenceConfig, predict_store
    from wsi_her2.score.scorer import DEFAULT_MODEL, load_scoring_model
    from wsi_her2.store.patch_store import open_store

    store = open_store(store_path)
    model = load_scoring_model(DEFAULT_MODEL, store_mpp_um=float(store.attrs["tiling"]["effective_mpp_um"]),
                               store_tile_px=store.tile_px)
    base = model.thresholds
    out = {"slide": store.slide_id, "by_gain": {}}
    for gain in gains:
        model.thresholds = replace(base, dab_gain=float(gain))
        pred = predict_store(store, model, config=InferenceConfig(batch_size=batch_size, device=device))
        w = np.nan_to_num(np.asarray(pred.measurements[TUMOUR_CELLS_KEY], np.float64)[pred.scored])
        f = np.stack([np.asarray(pred.measurements[k], np.float64)[pred.scored] for k in CELL_FRACTION_KEYS], axis=1)
        total = float(w.sum())
        at_least = (w[:, None] * np.nan_to_num(f)).sum(axis=0) / max(total, 1e-12)
        out["by_gain"][float(gain)] = {"at_least": at_least.tolist(), "tumour_cells": total}
    return out


def call_from(at_least: Sequence[float], tumour_cells: float, cut: float) -> int | None:
    """The ASCO/CAP decision on pooled fractions (None: too little tumour; see aggregate_asco_cells)."""
    from wsi_her2.score.aggregate import MIN_TUMOUR_CELLS

    if tumour_cells < MIN_TUMOUR_CELLS:
        return None
    for grade in (3, 2, 1):
        if at_least[grade - 1] > cut:
            return grade
    return 0


def _scores(truth: list[int], pred: list[int | None]) -> dict:
    from wsi_her2.metrics import confusion_matrix, weighted_kappa

    pairs = [(t, p) for t, p in zip(truth, pred) if p is not None]
    exact = sum(t == p for t, p in pairs)
    if not pairs:
        return {"exact": 0, "n_called": 0, "n": len(truth), "qwk": float("nan")}
    m = confusion_matrix([t for t, _ in pairs], [p for _, p in pairs], n_classes=4)
    return {"exact": exact, "n_called": len(pairs), "n": len(truth), "qwk": weighted_kappa(m)}


def _fit(measured: list[dict], truth: list[int], gains: Sequence[float]) -> Calibration:
    best, best_key = Calibration(), None
    for gain in gains:
        for cut in CELL_FRACTION_CUTS:
            pred = [call_from(m["by_gain"][gain]["at_least"], m["by_gain"][gain]["tumour_cells"], cut) for m in measured]
            s = _scores(truth, pred)
            qwk = s["qwk"] if np.isfinite(s["qwk"]) else -1.0
            key = (round(qwk, 6), s["exact"], -abs(np.log(gain)) - abs(cut - 0.10))
            if best_key is None or key > best_key:
                best, best_key = Calibration(gain, cut), key
    return best


def calibrate(stores: Sequence[str | Path], labels_csv: str | Path, out: str | Path, *, device: str = "auto",
              gains: Sequence[float] = DAB_GAINS) -> dict:
    """Fit, report leave-one-out agreement before (defaults) and after, write ``out`` (JSON).

    ``gains`` is the DAB-gain grid (must hold 1.0, the default); each costs one scoring pass."""
    from wsi_her2.files import atomic_write_text, prepare_output_file

    gains = tuple(sorted({float(g) for g in gains}))
    if 1.0 not in gains or min(gains) <= 0:
        raise ConfigError(f"--gains {gains}: give positive gains including 1.0 (the default)")
    prepare_output_file(out, what="calibration file (-o)")  # before the scoring passes, which are the cost
    labels = read_labels(labels_csv)
    measured, truth = [], []
    for path in stores:
        sid = Path(path).name.removesuffix(".zarr")
        if sid not in labels:  # checked before the scoring passes, which are the cost
            log.warning("%s: no label in %s; left out of the fit", sid, labels_csv)
            continue
        measured.append(measure_store(path, gains, device=device))
        truth.append(HER2_CLASSES.index(labels[sid]))
    if len(measured) < 4:
        raise ConfigError(f"only {len(measured)} labelled store(s); calibration needs at least 4 (a lab should use 12-20)")
    default = Calibration()
    before = [call_from(m["by_gain"][1.0]["at_least"], m["by_gain"][1.0]["tumour_cells"], default.cell_fraction_cut)
              for m in measured]
    loo = []
    for i in range(len(measured)):
        cal = _fit(measured[:i] + measured[i + 1:], truth[:i] + truth[i + 1:], gains)
        g = measured[i]["by_gain"][cal.dab_gain]
        loo.append(call_from(g["at_least"], g["tumour_cells"], cal.cell_fraction_cut))
    fitted = _fit(measured, truth, gains)
    at_edge = len(gains) > 1 and fitted.dab_gain in (gains[0], gains[-1])
    if at_edge:
        log.warning("the best DAB gain, %g, lies on the edge of the grid (%g-%g): the lab's true gain may lie beyond it; "
                    "check the slides' stain and scanner, or widen --gains", fitted.dab_gain, gains[0], gains[-1])
    report = {
        "schema": CALIBRATION_SCHEMA, "package_version": __version__, **asdict(fitted), "gain_at_grid_edge": at_edge,
        "n_slides": len(measured), "grid": {"dab_gain": list(gains), "cell_fraction_cut": list(CELL_FRACTION_CUTS)},
        "before": _scores(truth, before), "leave_one_out": _scores(truth, loo),
        "slides": [{"slide": m["slide"], "label": HER2_CLASSES[t], "default_call": _name(b), "loo_call": _name(c)}
                   for m, t, b, c in zip(measured, truth, before, loo)],
    }
    atomic_write_text(Path(out), json.dumps(report, indent=2))
    return report


def _name(call: int | None) -> str:
    return "indeterminate" if call is None else HER2_CLASSES[call]
