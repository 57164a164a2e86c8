"""slides.csv and the agreement metrics (confusion matrix, accuracy, QWK, clinical groups)."""
from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest

from wsi_her2.batch.manifest import SlideJob
from wsi_her2.batch.report import (
    agreement_report, cohort_rows, confusion_matrix, format_agreement, quadratic_weighted_kappa,
    slides_csv_text, weighted_kappa, write_agreement, write_slides_csv,
)
from wsi_her2.batch.state import SlideState
from wsi_her2.errors import ConfigError


def _qwk_by_pairs(truth, pred) -> float:
    """Independent formulation: 1 - mean squared disagreement / mean over all (truth_i, pred_j) pairs."""
    t = np.asarray(truth, float)
    p = np.asarray(pred, float)
    observed = np.mean((t - p) ** 2)
    chance = np.mean((t[:, None] - p[None, :]) ** 2)
    return 1.0 - observed / chance


def test_confusion_matrix_counts():
    m = confusion_matrix([0, 1, 2, 3, 3, 2], [0, 1, 3, 3, 2, 2], n_classes=4)
    assert m.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    with pytest.raises(ConfigError):
        confusion_matrix([0, 4], [0, 1], n_classes=4)
    with pytest.raises(ConfigError):
        confusion_matrix([0], [0, 1], n_classes=4)


def test_kappa_known_values():
    # Cohen's textbook 2 x 2 table: p_o = 0.7, p_e = 0.5 -> kappa 0.4 (quadratic = unweighted for 2 classes)
    table = np.array([[20, 5], [10, 15]])
    assert weighted_kappa(table, weights="none") == pytest.approx(0.4)
    assert weighted_kappa(table, weights="quadratic") == pytest.approx(0.4)
    assert quadratic_weighted_kappa([0, 1, 2, 3], [0, 1, 2, 3]) == pytest.approx(1.0)
    assert quadratic_weighted_kappa([0, 0, 1, 1], [1, 1, 0, 0], n_classes=2) == pytest.approx(-1.0)
    assert np.isnan(quadratic_weighted_kappa([2, 2, 2], [2, 2, 2]))  # no chance disagreement: undefined


def test_qwk_matches_pairwise_definition_and_penalises_distance():
    rng = random.Random(3)
    for _ in range(20):
        truth = [rng.randrange(4) for _ in range(30)]
        pred = [min(3, max(0, t + rng.choice((-2, -1, 0, 0, 1)))) for t in truth]
        assert quadratic_weighted_kappa(truth, pred) == pytest.approx(_qwk_by_pairs(truth, pred))
    truth = [0, 1, 2, 3] * 5
    near = [min(3, t + 1) for t in truth]
    far = [3 - t for t in truth]
    assert quadratic_weighted_kappa(truth, near) > quadratic_weighted_kappa(truth, far)


def _rows(pairs):
    return [{"slide": f"s{i:02d}", "status": "done", "her2_score": p, "label": t} for i, (t, p) in enumerate(pairs)]


def test_agreement_report_matrices_and_groups():
    pairs = [("0", "0"), ("0", "1+"), ("1+", "1+"), ("2+", "2+"), ("2+", "3+"), ("3+", "3+"), ("3+", "2+"), ("1+", "2+")]
    rows = _rows(pairs) + [
        {"slide": "failed", "status": "failed", "label": "2+"},
        {"slide": "nocall", "status": "done", "her2_score": "indeterminate", "label": "0"},
        {"slide": "unlabelled", "status": "done", "her2_score": "3+", "label": None},
    ]
    rep = agreement_report(rows)
    assert rep["n_labelled"] == 10 and rep["n_compared"] == 8 and rep["not_scored"] == ["failed", "nocall"]
    assert rep["confusion_matrix"] == [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert rep["accuracy"] == pytest.approx(4 / 8)
    idx = {"0": 0, "1+": 1, "2+": 2, "3+": 3}
    assert rep["quadratic_weighted_kappa"] == pytest.approx(
        _qwk_by_pairs([idx[t] for t, _ in pairs], [idx[p] for _, p in pairs]), abs=1e-6)
    g = rep["groups"]
    # negative = {0, 1+}: 0->1+ now agrees; 1+->2+ does not
    assert g["confusion_matrix"] == [[3, 1, 0], [0, 1, 1], [0, 1, 1]]
    assert g["accuracy"] == pytest.approx(5 / 8)
    assert g["per_group"]["negative"] == {"n": 4, "agreement": 0.75}
    assert g["per_group"]["equivocal"] == {"n": 2, "agreement": 0.5}
    text = format_agreement(rep)
    assert "quadratic-weighted kappa" in text and "failed, nocall" in text
    json.dumps(rep, allow_nan=False)  # strict JSON: no NaN


def test_agreement_report_absent_without_labels_and_numeric_labels():
    assert agreement_report([{"slide": "a", "status": "done", "her2_score": "2+", "label": None}]) is None
    rep = agreement_report([{"slide": "a", "status": "done", "her2_score": 2, "label": "2"}])
    assert rep["accuracy"] == 1.0 and rep["quadratic_weighted_kappa"] is None  # one class: kappa undefined


def test_slides_csv_is_deterministic(tmp_path):
    jobs = [SlideJob("b", tmp_path / "b.svs", label="2+"), SlideJob("a", tmp_path / "a.svs", mpp_um=0.25, patient_id="P")]
    states = {
        "a": SlideState("a", status="done", row={"slide": "a", "her2_score": "3+", "confidence": 0.912345678,
                                                 "tiles_used": 12, "extra_metric": 1.5}, seconds={"tile": 3.2}),
        "b": SlideState("b", status="failed", error_type="MppMissingError", reason="no MPP,\nset --slide-mpp"),
    }
    rows = cohort_rows(jobs, states)
    text = slides_csv_text(rows)
    lines = text.splitlines()
    assert lines[0].split(",")[:3] == ["slide", "status", "her2_score"] and lines[0].endswith("extra_metric")
    assert lines[1].startswith("a,done,3+,0.912346,") and ",P,0.25," in lines[1]
    assert lines[2].startswith("b,failed,") and '"no MPP, set --slide-mpp"' in lines[2]
    assert "3.2" not in text  # timings never enter the table
    for perm in itertools.permutations(rows):
        assert slides_csv_text(list(perm)) == text
    c = cohort_rows(jobs + [SlideJob("c", tmp_path / "c.svs")], states)
    assert slides_csv_text(c).splitlines()[3].startswith("c,pending,")
    path = write_slides_csv(rows, tmp_path / "out" / "slides.csv")
    assert path.read_text() == text
    rep_path = write_agreement({"x": 1}, tmp_path / "out" / "agreement.json")
    assert json.loads(rep_path.read_text()) == {"x": 1}
