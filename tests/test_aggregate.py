"""Slide-level aggregation: vote, mean and the ASCO/CAP percentage rule, with bootstrap confidence."""
from __future__ import annotations

import json

import numpy as np
import pytest

from wsi_her2.score.aggregate import (
    AGGREGATORS,
    ASCO_THRESHOLDS,
    HER2_CLASSES,
    INDETERMINATE,
    SlideCall,
    aggregate_asco,
    aggregate_mean,
    aggregate_vote,
    argmax_prefer_higher,
    get_aggregator,
)
from wsi_her2.errors import ConfigError, WsiHer2Error


def probs_from_counts(counts, *, peak=0.7, seed=0) -> np.ndarray:
    """Tiles whose argmax is known: ``counts[k]`` tiles peak at class k, shuffled."""
    rows = []
    for k, c in enumerate(counts):
        p = np.full((c, 4), (1.0 - peak) / 3)
        p[:, k] = peak
        rows.append(p)
    probs = np.concatenate(rows) if rows else np.zeros((0, 4))
    return np.random.default_rng(seed).permutation(probs)


def asco_reference(counts, thresholds=ASCO_THRESHOLDS) -> str:
    """Plain-Python statement of the ASCO/CAP rule, written independently of the module."""
    n = sum(counts)
    pct_3 = counts[3] / n
    pct_2_or_more = (counts[2] + counts[3]) / n
    pct_1_or_more = (counts[1] + counts[2] + counts[3]) / n
    if pct_3 > thresholds["3+"]:
        return "3+"
    if pct_2_or_more > thresholds["2+"]:
        return "2+"
    if pct_1_or_more > thresholds["1+"]:
        return "1+"
    return "0"


# --------------------------------------------------------------------------- vote


def test_vote_calls_the_majority_class():
    call = aggregate_vote(probs_from_counts([10, 20, 50, 20]))
    assert call.her2_score == "2+"
    assert call.method == "vote"
    assert call.n_tiles_used == 100
    assert call.class_fractions == pytest.approx({"0": 0.1, "1+": 0.2, "2+": 0.5, "3+": 0.2})


def test_vote_tie_goes_to_the_higher_score():
    call = aggregate_vote(probs_from_counts([0, 30, 30, 10]))
    assert call.her2_score == "2+"
    assert call.details["tie"] == ["1+", "2+"]
    assert "higher" in call.details["tie_break"]


def test_vote_tie_within_a_tile_goes_to_the_higher_score():
    # every tile is 0.5 / 0.5 between 0 and 1+: each tile is called 1+
    probs = np.tile([0.5, 0.5, 0.0, 0.0], (20, 1))
    call = aggregate_vote(probs)
    assert call.her2_score == "1+"
    assert call.class_fractions["1+"] == 1.0


def test_argmax_prefer_higher_breaks_ties_upwards():
    x = np.array([[1, 3, 3, 0], [2, 2, 2, 2], [0, 0, 0, 5]])
    assert argmax_prefer_higher(x, axis=1).tolist() == [2, 3, 3]


# --------------------------------------------------------------------------- mean


def test_mean_differs_from_vote_where_it_should():
    # 60 tiles lean weakly to 0, 40 tiles are confidently 2+:
    # votes 0 (60 vs 40); mean probs 0: .24, 1+: .25, 2+: .51 -> 2+.
    weak = np.tile([0.40, 0.35, 0.25, 0.0], (60, 1))
    strong = np.tile([0.0, 0.1, 0.9, 0.0], (40, 1))
    probs = np.concatenate([weak, strong])
    assert aggregate_vote(probs).her2_score == "0"
    call = aggregate_mean(probs)
    assert call.her2_score == "2+"
    assert call.details["mean_probs"] == pytest.approx({"0": 0.24, "1+": 0.25, "2+": 0.51, "3+": 0.0})


# --------------------------------------------------------------------------- asco


@pytest.mark.parametrize(
    "counts, expected",
    [
        ([90, 0, 0, 10], "0"),  # exactly 10 % 3+ is not ">10 %", and >=1+ is also 10 %
        ([89, 0, 0, 11], "3+"),  # 11 % 3+
        ([88, 0, 6, 6], "2+"),  # 6 % 3+, 12 % at least 2+
        ([89, 3, 3, 5], "1+"),  # 5 % 3+, 8 % >=2+, 11 % >=1+
        ([100, 0, 0, 0], "0"),
        ([0, 100, 0, 0], "1+"),
        ([0, 0, 0, 100], "3+"),
        ([70, 0, 30, 0], "2+"),
    ],
)
def test_asco_rule_on_planted_fractions(counts, expected):
    call = aggregate_asco(probs_from_counts(counts))
    assert call.her2_score == expected
    assert call.her2_score == asco_reference(counts)


def test_asco_matches_reference_on_random_count_vectors():
    rng = np.random.default_rng(7)
    for _ in range(40):
        counts = rng.multinomial(rng.integers(10, 200), rng.dirichlet([3, 1, 0.5, 0.3])).tolist()
        got = aggregate_asco(probs_from_counts(counts), n_boot=5).her2_score
        assert got == asco_reference(counts), counts


def test_asco_details_show_what_was_compared():
    call = aggregate_asco(probs_from_counts([88, 0, 6, 6]))
    d = call.details
    assert d["fraction_at_least"] == pytest.approx({">=1+": 0.12, ">=2+": 0.12, ">=3+": 0.06})
    assert d["thresholds"] == ASCO_THRESHOLDS
    assert d["passed"] == {"1+": True, "2+": True, "3+": False}


def test_asco_custom_thresholds():
    counts = [70, 0, 0, 30]
    assert aggregate_asco(probs_from_counts(counts)).her2_score == "3+"
    strict = {"3+": 0.5, "2+": 0.5, "1+": 0.2}
    assert aggregate_asco(probs_from_counts(counts), thresholds=strict).her2_score == "1+"
    assert asco_reference(counts, strict) == "1+"


@pytest.mark.parametrize(
    "bad", [{"3+": 0.1, "2+": 0.1}, {"3+": 0.1, "2+": 0.1, "1+": 1.5}, {"3+": -0.1, "2+": 0.1, "1+": 0.1}]
)
def test_asco_rejects_bad_thresholds(bad):
    with pytest.raises(ConfigError):
        aggregate_asco(probs_from_counts([10, 10, 10, 10]), thresholds=bad)


# --------------------------------------------------------------------------- common behaviour


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_too_few_tiles_is_indeterminate(name):
    call = AGGREGATORS[name](probs_from_counts([0, 0, 0, 9]), min_tiles=10)
    assert call.her2_score == INDETERMINATE
    assert call.confidence == 0.0
    assert "min_tiles" in call.details["reason"] and "9" in call.details["reason"]
    assert call.n_tiles_used == 9
    # one tile more and the same tiles give a call
    assert AGGREGATORS[name](probs_from_counts([0, 0, 0, 10]), min_tiles=10).her2_score == "3+"


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_no_tiles_is_indeterminate(name):
    call = AGGREGATORS[name](np.zeros((0, 4)))
    assert call.her2_score == INDETERMINATE
    assert call.n_tiles_used == 0
    assert call.class_fractions == {c: 0.0 for c in HER2_CLASSES}


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_unanimous_slide_has_full_confidence(name):
    call = AGGREGATORS[name](probs_from_counts([0, 0, 50, 0]))
    assert call.her2_score == "2+"
    assert call.confidence == 1.0


def test_confidence_is_bootstrap_agreement():
    # 11 of 100 tiles 3+: the call is 3+, and a resample keeps it exactly when it holds
    # more than 10 3+ tiles, so the confidence estimates P(Binomial(100, 0.11) > 10).
    from scipy.stats import binom

    call = aggregate_asco(probs_from_counts([89, 0, 0, 11]), n_boot=2000)
    assert call.her2_score == "3+"
    expected = binom.sf(10, 100, 0.11)
    assert call.confidence == pytest.approx(expected, abs=0.05)
    assert 0.2 < call.confidence < 0.8


def test_confidence_grows_with_the_margin():
    near = aggregate_asco(probs_from_counts([89, 0, 0, 11])).confidence
    far = aggregate_asco(probs_from_counts([80, 0, 0, 20])).confidence
    assert far > near
    assert far > 0.95


def test_confidence_is_reproducible_and_seeded():
    probs = probs_from_counts([45, 55, 0, 0])
    a = aggregate_vote(probs, seed=3)
    b = aggregate_vote(probs, seed=3)
    assert a.confidence == b.confidence
    confs = {aggregate_vote(probs, seed=s).confidence for s in range(6)}
    assert len(confs) > 1  # the seed is really used


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_tile_order_does_not_change_the_call(name):
    probs = probs_from_counts([30, 25, 25, 20])
    a = AGGREGATORS[name](probs)
    b = AGGREGATORS[name](probs[::-1])
    assert a.her2_score == b.her2_score
    assert a.class_fractions == pytest.approx(b.class_fractions)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_to_dict_is_plain_json(name):
    d = AGGREGATORS[name](probs_from_counts([20, 30, 40, 10])).to_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back["her2_score"] in HER2_CLASSES
    assert back["method"] == name
    assert set(back) == {"her2_score", "confidence", "class_fractions", "n_tiles_used", "method", "details"}
    assert SlideCall(**back).to_dict() == d


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10, 3)),
        np.zeros(10),
        np.full((10, 4), np.nan),
        np.full((10, 4), -0.5),
        np.full((10, 4), 3.0),
    ],
)
def test_bad_probabilities_raise_config_error(bad):
    with pytest.raises(ConfigError) as err:
        aggregate_vote(bad)
    assert isinstance(err.value, ValueError) and isinstance(err.value, WsiHer2Error)


def test_unknown_settings_are_refused_but_shared_ones_pass():
    probs = probs_from_counts([10, 10, 10, 10])
    with pytest.raises(ConfigError, match="min_tile"):
        aggregate_vote(probs, min_tile=3)
    # one call site may pass the asco thresholds to any rule
    assert aggregate_vote(probs, thresholds=ASCO_THRESHOLDS).her2_score == "3+"
    with pytest.raises(ConfigError):
        aggregate_mean(probs, min_tiles=0)


def test_registry_and_lookup():
    assert set(AGGREGATORS) == {"vote", "mean", "asco"}
    assert get_aggregator("asco") is aggregate_asco
    with pytest.raises(ConfigError, match="asco"):
        get_aggregator("median")


@pytest.mark.slow
def test_every_rule_calls_a_100k_tile_slide():
    # Speed at this size is benchmarks/bench_aggregate.py's business; here: it works and uses every tile.
    probs = np.random.default_rng(0).dirichlet(np.ones(4), size=100_000)
    for fn in AGGREGATORS.values():
        assert fn(probs).n_tiles_used == 100_000


def test_her2_classes_agree_with_the_model_config():
    # Two definitions exist because importing wsi_her2.models pulls in torch and timm, which
    # the scoring writers must not need; this pins them together.
    try:
        from wsi_her2.models.config import HER2_CLASSES as model_classes
    except ImportError as err:  # pragma: no cover - models package absent or broken
        pytest.skip(f"wsi_her2.models not importable: {err}")
    assert tuple(model_classes) == HER2_CLASSES
