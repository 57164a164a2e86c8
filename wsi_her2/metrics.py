"""Agreement metrics for ordinal HER2 scores, defined once (evaluation, cohorts, calibration, qc)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.typing import NDArray

from wsi_her2.errors import ConfigError


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
