"""Agreement metrics for ordinal HER2 scores, defined once (evaluation, cohorts, calibration, qc, the review page)."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Sequence

import numpy as np
from numpy.typing import NDArray

from wsi_her2.errors import ConfigError
from wsi_her2.vocab import HER2_CLASSES, parse_her2_label

GROUPS = ("negative", "equivocal", "positive")
#: HER2 score index (0..3) -> clinical group index: 0 and 1+ negative, 2+ equivocal, 3+ positive.
GROUP_OF_SCORE = np.array([0, 0, 1, 2])


def confusion_matrix(truth: Sequence[int], pred: Sequence[int], *, n_classes: int) -> NDArray[np.int64]:
    """``m[i, j]`` = number of items with true class ``i`` predicted as ``j``."""
    t = np.asarray(truth, dtype=np.int64).reshape(-1)
    p = np.asarray(pred, dtype=np.int64).reshape(-1)
    if t.shape != p.shape:
        raise ConfigError(f"truth ({t.size}) and predictions ({p.size}) differ in length")
    if t.size and (t.min() < 0 or p.min() < 0 or t.max() >= n_classes or p.max() >= n_classes):
        raise ConfigError(f"class indices must lie in 0..{n_classes - 1}")
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (t, p), 1)
    return m


def weighted_kappa(confusion: NDArray, *, weights: str = "quadratic") -> float:
    """Cohen's kappa from a confusion matrix; ``weights`` "quadratic", "linear" or "none".

    ``1 - sum(W * O) / sum(W * E)`` (Cohen 1968), ``E`` the outer product of the marginals.
    NaN where kappa is undefined: no items, or no disagreement expected by chance (every item in
    one class on both sides, e.g. truth and prediction all 2+); report agreement there instead.
    """
    o = np.asarray(confusion, dtype=np.float64)
    k = o.shape[0]
    n = o.sum()
    if n == 0:
        return float("nan")
    i, j = np.indices((k, k))
    if weights == "quadratic":
        w = (i - j) ** 2 / max(k - 1, 1) ** 2
    elif weights == "linear":
        w = np.abs(i - j) / max(k - 1, 1)
    elif weights == "none":
        w = (i != j).astype(np.float64)
    else:
        raise ConfigError(f"weights {weights!r}: choose quadratic, linear or none")
    e = np.outer(o.sum(axis=1), o.sum(axis=0)) / n
    denom = float((w * e).sum())
    if denom == 0:
        return float("nan")
    return float(1.0 - (w * o).sum() / denom)


def quadratic_weighted_kappa(truth: Sequence[int], pred: Sequence[int], *, n_classes: int = 4) -> float:
    """Quadratic-weighted kappa of two ordinal ratings in ``0..n_classes-1``."""
    return weighted_kappa(confusion_matrix(truth, pred, n_classes=n_classes), weights="quadratic")


# --- a cohort's agreement with its labels -----------------------------------------------------------
def _score_index(value: object) -> int | None:
    try:
        label = parse_her2_label(value)  # "2+", 2, "2" all map to "2+"
    except ConfigError:
        return None  # "indeterminate" and other non-calls
    return None if label is None else HER2_CLASSES.index(label)


def _nan_to_none(x: float) -> float | None:
    return None if not math.isfinite(x) else round(x, 6)


def agreement_report(rows: Iterable[Mapping]) -> dict | None:
    """Agreement of ``her2_score`` with ``label`` over the rows that have a label; None if none has one."""
    labelled = [r for r in rows if _score_index(r.get("label")) is not None]
    if not labelled:
        return None
    truth, pred, missing = [], [], []
    for r in labelled:
        p = _score_index(r.get("her2_score")) if r.get("status") == "done" else None
        if p is None:
            missing.append(str(r["slide"]))
            continue
        truth.append(_score_index(r["label"]))
        pred.append(p)
    cm = confusion_matrix(truth, pred, n_classes=4)
    n = int(cm.sum())
    g_truth = GROUP_OF_SCORE[np.asarray(truth, dtype=np.int64)] if n else np.zeros(0, np.int64)
    g_pred = GROUP_OF_SCORE[np.asarray(pred, dtype=np.int64)] if n else np.zeros(0, np.int64)
    gm = confusion_matrix(g_truth, g_pred, n_classes=3)
    per_group = {}
    for g, name in enumerate(GROUPS):
        n_g = int(gm[g].sum())
        per_group[name] = {"n": n_g, "agreement": round(float(gm[g, g]) / n_g, 6) if n_g else None}
    return {
        "n_labelled": len(labelled),
        "n_compared": n,
        "not_scored": sorted(missing),
        "classes": list(HER2_CLASSES),
        "confusion_matrix": cm.tolist(),
        "accuracy": round(float(np.trace(cm)) / n, 6) if n else None,
        "quadratic_weighted_kappa": _nan_to_none(weighted_kappa(cm)) if n else None,
        "groups": {
            "definition": {name: [HER2_CLASSES[s] for s in np.flatnonzero(GROUP_OF_SCORE == g)] for g, name in enumerate(GROUPS)},
            "confusion_matrix": gm.tolist(),
            "accuracy": round(float(np.trace(gm)) / n, 6) if n else None,
            "kappa": _nan_to_none(weighted_kappa(gm, weights="none")) if n else None,
            "per_group": per_group,
        },
    }
