"""Slide-level HER2 calls from tile class probabilities.

Three rules share one input (an ``(N, 4)`` array of tile probabilities for the usable,
QC-passed tiles), one output (:class:`SlideCall`) and one confidence measure:

``vote``
    The class called (argmax) on the most tiles.
``mean``
    The argmax of the mean probability over tiles.
``asco``
    The ASCO/CAP 2018 percentage rule for breast HER2 IHC, applied to tile calls (see
    :data:`ASCO_THRESHOLDS`).

Confidence (the same for all three rules)
-----------------------------------------
The fraction of bootstrap resamples of the tiles that reproduce the slide call. Each
resample draws ``N`` tiles with replacement from the ``N`` usable tiles (fixed seed, so
reruns agree), the rule is applied to the resample, and the confidence is the share of
``n_boot`` resamples (default 200) whose call equals the call on all tiles. It answers "if
a different but equally sized set of tiles had been cut from this tissue, how often would
the answer be the same?": near 1 for a clear slide, near 0.5 or below for a slide that sits
on a decision boundary (for example a 3+ fraction of 10.2 % under the ``asco`` rule).
With 200 resamples the confidence has a resolution of 0.005 and a standard error of at most
about 0.035.

Every rule is written as ``decide(stats)``, where ``stats`` is the per-slide mean of a
per-tile feature (one-hot tile calls for ``vote`` and ``asco``, probabilities for ``mean``);
a resample's statistic is the mean of the resampled rows, so the bootstrap is one vectorised
gather per chunk of resamples for every rule.

Ties
----
Ties (equal vote counts, equal mean probabilities, equal probabilities within one tile) go
to the **higher** score. Under-calling is the costlier error for the patient: a tile set
split between 1+ and 2+ is called 2+, which sends the case to reflex in-situ hybridisation
(ISH) where the over-call is caught, whereas calling it 1+ would skip that test; a 0 / 1+
split is called 1+ (HER2-low), which keeps the patient in view for HER2-low therapy and a
pathologist's review instead of closing the question. The rule is deterministic and does
not depend on tile order.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
from numpy.typing import ArrayLike, NDArray

from wsi_her2.criteria import DEFAULT_CRITERIA, Criteria, get_criteria
from wsi_her2.errors import ConfigError
from wsi_her2.jsonable import to_jsonable
from wsi_her2.vocab import HER2_CLASSES, INDETERMINATE

log = logging.getLogger(__name__)


#: The percentage rule of the ``asco`` aggregator; the only place these numbers live.
#:
#: ASCO/CAP 2018 HER2 testing in breast cancer (Wolff et al., J Clin Oncol 2018;36:2105-2122
#: and Arch Pathol Lab Med 2018;142:1364-1382), IHC categories:
#:
#: - 3+ (positive): "circumferential membrane staining that is complete, intense, and in >10%
#:   of tumor cells".
#: - 2+ (equivocal): "weak to moderate complete membrane staining observed in >10% of tumor
#:   cells".
#: - 1+ (negative): "incomplete membrane staining that is faint/barely perceptible and in >10%
#:   of tumor cells".
#: - 0 (negative): "no staining is observed or membrane staining that is incomplete and is
#:   faint/barely perceptible and in <=10% of tumor cells".
#:
#: Applied here to tile calls as a proxy for tumour cells: each value is the fraction of
#: usable tiles that must be called *at least* that score, **strictly exceeded**, checked
#: from 3+ downwards; the first score whose fraction exceeds its threshold is the call,
#: otherwise 0. Approximation, stated plainly: "tumour cells" are approximated by QC-passed
#: tissue tiles (the pipeline has no tumour/stroma segmentation), so stroma-only tiles
#: dilute the fractions, and a tile is counted whole whatever its cell count. Cumulative
#: counting (">= 2+" for the 2+ step) follows the guideline's ordering: a slide with 6 %
#: 3+ tiles and 6 % 2+ tiles has 12 % tiles stained at least 2+, hence 2+ (equivocal).
ASCO_THRESHOLDS: dict[str, float] = {"3+": 0.10, "2+": 0.10, "1+": 0.10}

DEFAULT_N_BOOT = 200
DEFAULT_SEED = 0
# A chunk of resamples materialises (chunk, N) indices and gathered values; bounding
# chunk * N keeps the bootstrap of a 100k-tile slide at a few tens of MB.
_BOOT_CHUNK_ELEMENTS = 4_000_000
# Keyword arguments that belong to another aggregator; accepted (and ignored) by every
# aggregator so that one call site can pass the same settings to whichever rule is chosen.
_SHARED_KWARGS = frozenset({"thresholds"})


@dataclass
class SlideCall:
    """A slide-level HER2 call and what it rests on.

    Attributes
    ----------
    her2_score
        ``"0"``, ``"1+"``, ``"2+"``, ``"3+"`` or ``"indeterminate"``.
    confidence
        Bootstrap agreement in [0, 1] (see the module docstring); 0 when indeterminate.
    class_fractions
        Fraction of usable tiles whose argmax is each class (sums to 1, or all 0 with no tiles).
    n_tiles_used
        Number of usable tiles the call rests on.
    method
        Name of the aggregator (a key of :data:`AGGREGATORS`).
    details
        What the rule compared (fractions, thresholds, mean probabilities, tie-breaks, the
        bootstrap settings, or the reason for an indeterminate call).
    """

    her2_score: str
    confidence: float
    class_fractions: dict[str, float]
    n_tiles_used: int
    method: str
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Return a JSON-serialisable copy (plain Python numbers, no numpy scalars)."""
        return to_jsonable(asdict(self))


# --------------------------------------------------------------------------- helpers


def _validate_probs(probs: ArrayLike) -> NDArray[np.float64]:
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, len(HER2_CLASSES))
    if arr.ndim != 2 or arr.shape[1] != len(HER2_CLASSES):
        raise ConfigError(
            f"tile probabilities must have shape (n_tiles, {len(HER2_CLASSES)}) for classes "
            f"{HER2_CLASSES}, got {arr.shape}; pass one row of class probabilities per usable tile"
        )
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.all(np.isfinite(arr), axis=1)))
        raise ConfigError(
            f"{bad} tile probability rows contain NaN or infinity; drop QC-rejected or unscored "
            "tiles before aggregating"
        )
    if arr.size and (arr.min() < -1e-6 or arr.max() > 1 + 1e-6):
        raise ConfigError(
            f"tile probabilities must lie in [0, 1], got values in [{arr.min():.4g}, "
            f"{arr.max():.4g}]; apply softmax to model logits before aggregating"
        )
    return arr


def _check_common(min_tiles: int, n_boot: int, kw: Mapping[str, Any], method: str) -> None:
    unknown = set(kw) - _SHARED_KWARGS
    if unknown:
        raise ConfigError(
            f"aggregator {method!r} got unknown setting(s) {sorted(unknown)}; "
            f"accepted: min_tiles, n_boot, seed{', thresholds' if method == 'asco' else ''}"
        )
    if int(min_tiles) < 1:
        raise ConfigError(f"min_tiles must be >= 1, got {min_tiles}")
    if int(n_boot) < 1:
        raise ConfigError(f"n_boot must be >= 1, got {n_boot}")


def argmax_prefer_higher(x: NDArray, axis: int = -1) -> NDArray[np.intp]:
    """Argmax along ``axis`` where ties go to the highest index (the higher HER2 score).

    ``np.argmax`` returns the first maximum; reversing the axis and mapping the index back
    returns the last one. See the module docstring for why ties go upwards.
    """
    x = np.asarray(x)
    k = x.shape[axis]
    return (k - 1) - np.argmax(np.flip(x, axis=axis), axis=axis)


def _one_hot_calls(probs: NDArray[np.float64]) -> NDArray[np.float64]:
    calls = argmax_prefer_higher(probs, axis=1)
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(calls)), calls] = 1.0
    return onehot


def _named(values: NDArray) -> dict[str, float]:
    return {c: float(v) for c, v in zip(HER2_CLASSES, values)}


def _bootstrap_agreement(
    features: NDArray[np.float64],
    decide: Callable[[NDArray[np.float64]], NDArray[np.intp]],
    call: int,
    *,
    n_boot: int,
    seed: int,
) -> float:
    """Share of bootstrap resamples of the rows of ``features`` whose ``decide`` equals ``call``.

    ``decide`` maps a ``(B, K)`` array of per-resample mean features to ``(B,)`` class indices.
    """
    n = features.shape[0]
    rng = np.random.default_rng(seed)
    # One contiguous 1-D array per feature column: gathering from those and summing is
    # ~10x faster than gathering (chunk, N, K) rows and averaging over the middle axis.
    columns = [np.ascontiguousarray(features[:, k]) for k in range(features.shape[1])]
    chunk = max(1, min(n_boot, _BOOT_CHUNK_ELEMENTS // max(n, 1)))
    idx_dtype = np.int32 if n < 2**31 else np.int64
    agree = 0
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        idx = rng.integers(0, n, size=(b, n), dtype=idx_dtype)
        stats = np.stack([col[idx].sum(axis=1) for col in columns], axis=1) / n
        agree += int(np.count_nonzero(decide(stats) == call))
        done += b
    return agree / n_boot


def _indeterminate(
    probs: NDArray[np.float64], *, method: str, min_tiles: int, fractions: dict[str, float]
) -> SlideCall:
    n = probs.shape[0]
    reason = (
        f"only {n} usable tile(s), fewer than min_tiles={min_tiles}; the slide is not called"
    )
    log.info("slide call indeterminate (%s): %s", method, reason)
    return SlideCall(
        her2_score=INDETERMINATE,
        confidence=0.0,
        class_fractions=fractions,
        n_tiles_used=n,
        method=method,
        details={"reason": reason, "min_tiles": int(min_tiles)},
    )


def _run_rule(
    probs: ArrayLike,
    *,
    method: str,
    min_tiles: int,
    n_boot: int,
    seed: int,
    kw: Mapping[str, Any],
    use_probs: bool,
    decide: Callable[[NDArray[np.float64]], NDArray[np.intp]],
    describe: Callable[[NDArray[np.float64]], dict],
) -> SlideCall:
    _check_common(min_tiles, n_boot, kw, method)
    p = _validate_probs(probs)
    n = p.shape[0]
    onehot = _one_hot_calls(p)
    fractions = _named(onehot.mean(axis=0) if n else np.zeros(len(HER2_CLASSES)))
    if n < min_tiles:
        return _indeterminate(p, method=method, min_tiles=min_tiles, fractions=fractions)
    features = p if use_probs else onehot
    stats = features.mean(axis=0)
    call = int(decide(stats[None, :])[0])
    confidence = _bootstrap_agreement(features, decide, call, n_boot=int(n_boot), seed=int(seed))
    details = describe(stats)
    details.update(
        mean_probs=_named(p.mean(axis=0)),
        confidence_method="bootstrap agreement: share of tile resamples (with replacement) "
        "that reproduce the call",
        n_boot=int(n_boot),
        seed=int(seed),
    )
    return SlideCall(
        her2_score=HER2_CLASSES[call],
        confidence=float(confidence),
        class_fractions=fractions,
        n_tiles_used=n,
        method=method,
        details=details,
    )


# --------------------------------------------------------------------------- rules


def _decide_argmax(stats: NDArray[np.float64]) -> NDArray[np.intp]:
    return argmax_prefer_higher(stats, axis=1)


def _tie_note(stats: NDArray[np.float64]) -> dict:
    top = stats.max()
    tied = [HER2_CLASSES[i] for i in np.flatnonzero(stats == top)]
    if len(tied) > 1:
        return {"tie": tied, "tie_break": "higher score wins"}
    return {}


def aggregate_vote(
    probs: ArrayLike,
    *,
    min_tiles: int = 10,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = DEFAULT_SEED,
    **kw: Any,
) -> SlideCall:
    """Call the slide by majority vote of the tile argmax calls.

    Parameters
    ----------
    probs
        ``(N, 4)`` class probabilities of the usable (QC-passed) tiles, columns in
        :data:`HER2_CLASSES` order.
    min_tiles
        Fewer usable tiles than this gives ``"indeterminate"`` with confidence 0.
    n_boot, seed
        Bootstrap resamples and RNG seed of the confidence.
    **kw
        Settings of other aggregators (``thresholds``) are accepted and ignored, so one call
        site serves every rule; anything else raises :class:`ConfigError`.

    Returns
    -------
    SlideCall
        ``details`` holds the vote fractions and any tie.
    """

    def describe(stats: NDArray[np.float64]) -> dict:
        return {"vote_fractions": _named(stats), **_tie_note(stats)}

    return _run_rule(
        probs, method="vote", min_tiles=min_tiles, n_boot=n_boot, seed=seed, kw=kw,
        use_probs=False, decide=_decide_argmax, describe=describe,
    )


def aggregate_mean(
    probs: ArrayLike,
    *,
    min_tiles: int = 10,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = DEFAULT_SEED,
    **kw: Any,
) -> SlideCall:
    """Call the slide by the argmax of the mean tile probability.

    Parameters and return value as :func:`aggregate_vote`; ``details["mean_probs"]`` holds
    the compared means.
    """

    def describe(stats: NDArray[np.float64]) -> dict:
        return _tie_note(stats)

    return _run_rule(
        probs, method="mean", min_tiles=min_tiles, n_boot=n_boot, seed=seed, kw=kw,
        use_probs=True, decide=_decide_argmax, describe=describe,
    )


def _validate_thresholds(thresholds: Mapping[str, float]) -> dict[str, float]:
    needed = HER2_CLASSES[1:]
    if set(thresholds) != set(needed):
        raise ConfigError(
            f"ASCO thresholds need exactly the keys {list(needed)}, got {sorted(thresholds)}"
        )
    out = {}
    for k in needed:
        v = float(thresholds[k])
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"ASCO threshold for {k} must be a fraction in [0, 1), got {v}")
        out[k] = v
    return out


def _asco_decider(th: Mapping[str, float]) -> Callable[[NDArray[np.float64]], NDArray[np.intp]]:
    # Thresholds indexed by class index 1..3; index 0 (score 0) is the fallback.
    th_arr = np.array([np.inf] + [th[c] for c in HER2_CLASSES[1:]])

    def decide(stats: NDArray[np.float64]) -> NDArray[np.intp]:
        # at_least[:, k] = fraction of tiles called k or higher (reverse cumulative sum).
        at_least = np.flip(np.cumsum(np.flip(stats, axis=1), axis=1), axis=1)
        passed = at_least > th_arr  # strictly greater: ">10%" in the guideline
        # Highest passing score; rows where nothing passes fall back to 0 (column 0 is
        # never True because its threshold is +inf).
        return np.where(passed.any(axis=1), argmax_prefer_higher(passed, axis=1), 0)

    return decide


def aggregate_asco(
    probs: ArrayLike,
    *,
    min_tiles: int = 10,
    thresholds: Mapping[str, float] = ASCO_THRESHOLDS,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = DEFAULT_SEED,
    **kw: Any,
) -> SlideCall:
    """Call the slide with the ASCO/CAP 2018 percentage rule applied to tile calls.

    3+ if more than ``thresholds["3+"]`` of the tiles are called 3+; else 2+ if more than
    ``thresholds["2+"]`` are called 2+ or 3+; else 1+ if more than ``thresholds["1+"]`` are
    called 1+ or higher; else 0. See :data:`ASCO_THRESHOLDS` for the guideline wording and
    the tile-for-tumour-cell approximation.

    Parameters
    ----------
    probs, min_tiles, n_boot, seed, **kw
        As :func:`aggregate_vote`.
    thresholds
        Fractions (not percentages) keyed ``"1+"``, ``"2+"``, ``"3+"``; default
        :data:`ASCO_THRESHOLDS`.

    Returns
    -------
    SlideCall
        ``details`` holds the cumulative fractions, the thresholds and which steps passed.
    """
    th = _validate_thresholds(thresholds)
    decide = _asco_decider(th)

    def describe(stats: NDArray[np.float64]) -> dict:
        at_least = np.flip(np.cumsum(np.flip(stats))).tolist()
        frac = {f">={c}": float(at_least[i]) for i, c in enumerate(HER2_CLASSES) if i > 0}
        return {
            "fraction_at_least": frac,
            "thresholds": dict(th),
            "passed": {c: bool(at_least[i] > th[c]) for i, c in enumerate(HER2_CLASSES) if i},
            "rule": "highest score whose at-least fraction is strictly above its threshold; "
            "tumour cells approximated by QC-passed tiles",
        }

    return _run_rule(
        probs, method="asco", min_tiles=min_tiles, n_boot=n_boot, seed=seed, kw=kw,
        use_probs=False, decide=decide, describe=describe,
    )


#: Per-tile measurements of a cell-level scorer (``ihc_dab``) that the cell-level ASCO rule uses:
#: the fractions of tumour cells at least 1+, at least 2+, and 3+, and the tumour cells they rest on.
CELL_FRACTION_KEYS = ("frac_cells_1plus_or_more", "frac_cells_2plus_or_more", "frac_cells_3plus")
TUMOUR_CELLS_KEY = "graded_cell_count"  # the tumour cells the fractions are over (their ring inside the tile)
#: Fewer tumour cells than this over the whole slide (or region) and the call is indeterminate.
#: Why 200: at the guideline's 10 % cut a percentage from n cells has a binomial standard error
#: of sqrt(0.1 * 0.9 / n): 2.1 points at 200 cells, enough to tell 5 % from 15 %; a 1 mm² of
#: carcinoma holds thousands. Stated in cells, never tiles.
MIN_TUMOUR_CELLS = 200
#: HER2-ultralow needs *some* faint membrane staining: more than this fraction of tumour cells
#: (1 %, above what stray DAB specks on a negative slide reach) and at most the 10 % cut.
ULTRALOW_MIN_FRACTION = 0.01


def aggregate_asco_cells(
    cell_fractions: ArrayLike,
    tumour_cells: ArrayLike,
    *,
    min_tumour_cells: float = MIN_TUMOUR_CELLS,
    thresholds: Mapping[str, float] = ASCO_THRESHOLDS,
    inclusive: bool = False,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = DEFAULT_SEED,
) -> SlideCall:
    """The guideline's percentage rule on tumour-cell percentages pooled over tiles (its own unit).

    ``cell_fractions``: ``(N, 3)`` per tile, the fractions of its tumour cells at least 1+, at
    least 2+ and 3+ (:data:`CELL_FRACTION_KEYS`); ``tumour_cells``: ``(N,)`` tumour cells per
    tile. The slide's fractions are the tumour-cell-weighted means, so stroma, muscle and fat
    tiles (few tumour cells) barely count and a small tumour nest decides. A grade needs more
    than its threshold (ASCO/CAP breast: "> 10 %"), or at least it with ``inclusive`` (the gastric
    resection rule: ">= 10 %"). Indeterminate below ``min_tumour_cells``. Confidence: the
    bootstrap agreement over tiles, as for every rule.
    """
    th = _validate_thresholds(thresholds)
    f = np.asarray(cell_fractions, np.float64).reshape(-1, 3)
    w = np.clip(np.nan_to_num(np.asarray(tumour_cells, np.float64).reshape(-1)), 0.0, None)
    f = np.clip(np.nan_to_num(f), 0.0, 1.0)
    total = float(w.sum())
    th_arr = np.array([th["1+"], th["2+"], th["3+"]])

    def above(at_least: NDArray[np.float64]) -> NDArray[np.bool_]:
        return at_least >= th_arr if inclusive else at_least > th_arr

    def decide(stats: NDArray[np.float64]) -> NDArray[np.intp]:
        passed = above(stats[:, :3] / np.maximum(stats[:, 3:4], 1e-12))
        return np.where(passed[:, 2], 3, np.where(passed[:, 1], 2, np.where(passed[:, 0], 1, 0)))

    at_least = (w[:, None] * f).sum(axis=0) / max(total, 1e-12)
    shares = np.clip(-np.diff(np.concatenate([[1.0], at_least, [0.0]])), 0.0, 1.0)
    fractions = _named(shares)  # share of tumour cells whose best pattern is 0 / 1+ / 2+ / 3+
    details = {
        "unit": "tumour cells", "tumour_cells": round(total, 1), "min_tumour_cells": float(min_tumour_cells),
        "fraction_at_least": {">=1+": float(at_least[0]), ">=2+": float(at_least[1]), ">=3+": float(at_least[2])},
        "thresholds": dict(th),
    }
    if total < min_tumour_cells:
        details["reason"] = (f"too little tumour to judge: {total:.0f} tumour cells, fewer than "
                             f"{min_tumour_cells:.0f}; score a region with more invasive carcinoma")
        return SlideCall(INDETERMINATE, 0.0, fractions, int(f.shape[0]), "asco", details)
    features = np.concatenate([w[:, None] * f, w[:, None]], axis=1)
    call = int(decide(features.sum(axis=0)[None, :])[0])
    details.update(
        passed=dict(zip(("1+", "2+", "3+"), above(at_least).tolist())),
        rule="highest score whose share of tumour cells (at least that pattern) is "
             + ("at least its threshold" if inclusive else "strictly above its threshold"),
        confidence_method="bootstrap agreement: share of tile resamples that reproduce the call",
        n_boot=int(n_boot), seed=int(seed),
    )
    confidence = _bootstrap_agreement(features, decide, call, n_boot=int(n_boot), seed=int(seed))
    return SlideCall(HER2_CLASSES[call], float(confidence), fractions, int(f.shape[0]), "asco", details)


#: The categories oncologists act on: breast (ASCO/CAP 2023; DESTINY-Breast04/06 for HER2-low/ultralow)
#: and gastro-oesophageal (CAP/ASCP/ASCO 2016: 0 and 1+ negative, 2+ equivocal, 3+ positive).
HER2_CATEGORIES = {
    "null": "HER2-null (0: no membrane staining)",
    "ultralow": "HER2-ultralow (0: faint, incomplete staining in <=10% of tumour cells)",
    "low": "HER2-low (1+)",
    "equivocal": "HER2 2+ equivocal: reflex ISH advised (HER2-low if ISH-negative)",
    "positive": "HER2-positive (3+)",
    "zero": "HER2 0 (null vs ultralow not resolved by this model)",
    "negative": "HER2-negative (0 or 1+, gastroesophageal)",
    "gastric_equivocal": "HER2 2+ equivocal: reflex ISH advised (gastroesophageal)",
    "gastric_positive": "HER2-positive (3+, gastroesophageal)",
    "indeterminate": "indeterminate",
}


def her2_category(score: str, fraction_any_staining: float | None, criteria: Criteria | None = None) -> str:
    """Key of :data:`HER2_CATEGORIES` for a call under ``criteria`` (default breast);
    ``fraction_any_staining`` is the share of tumour cells with any membrane staining (None when
    the model does not measure cells: HER2 0 is then not split into null and ultralow)."""
    if (key := (criteria or get_criteria(DEFAULT_CRITERIA)).category_of(score)) is not None:
        return key
    if score == "0":  # a guideline that leaves 0 whole (breast): null or ultralow by any membrane staining
        if fraction_any_staining is None:
            return "zero"
        return "ultralow" if fraction_any_staining > ULTRALOW_MIN_FRACTION else "null"
    return "indeterminate"


def cluster_call(percentage_call: SlideCall, largest: Mapping[str, int], *, min_cells: int) -> SlideCall:
    """The gastric biopsy rule: the highest grade with a cluster of >= ``min_cells`` cohesive tumour
    cells decides, whatever the percentage (``largest``: :func:`wsi_her2.score.cells.largest_clusters`).

    The pooled percentages stay in ``details``. Confidence is the deciding cluster's margin over the
    minimum: 1 when it holds at least twice ``min_cells`` cells (for 0: 1 minus the largest stained
    cluster's share of ``min_cells``), so a call resting on one small cluster says so.
    """
    sizes = [int(largest.get(k, 0)) for k in (">=1+", ">=2+", ">=3+")]
    grade = max([k + 1 for k, n in enumerate(sizes) if n >= min_cells], default=0)
    confidence = min(1.0, sizes[grade - 1] / (2.0 * min_cells)) if grade else 1.0 - min(1.0, sizes[0] / min_cells)
    details = dict(percentage_call.details)
    details.update(
        largest_cluster=dict(zip((">=1+", ">=2+", ">=3+"), sizes)), cluster_min_cells=int(min_cells),
        percentage_call=percentage_call.her2_score,
        rule=f"highest grade with a cluster of >= {min_cells} cohesive tumour cells showing it, whatever the percentage",
        confidence_method="margin of the deciding cluster over the minimum (1 at twice the minimum)",
    )
    return SlideCall(HER2_CLASSES[grade], float(confidence), percentage_call.class_fractions,
                     percentage_call.n_tiles_used, percentage_call.method, details)


#: The closed set of slide aggregators; the CLI's ``--aggregate`` choices come from here.
AGGREGATORS: dict[str, Callable[..., SlideCall]] = {
    "vote": aggregate_vote,
    "mean": aggregate_mean,
    "asco": aggregate_asco,
}


def get_aggregator(name: str) -> Callable[..., SlideCall]:
    """Return the aggregator called ``name`` or raise :class:`ConfigError` listing the choices."""
    try:
        return AGGREGATORS[name]
    except KeyError:
        raise ConfigError(
            f"unknown aggregation method {name!r}; choose one of {sorted(AGGREGATORS)}"
        ) from None
