"""Metrics against hand-computed values, report files, and test-time augmentation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wsi_her2.train.evaluate import (
    classification_report,
    confusion_matrix,
    format_table,
    quadratic_weighted_kappa,
    roc_auc_binary,
    roc_auc_ovr,
    roc_curve,
    write_report,
)
from wsi_her2.stain.tta import TTA_SETS, VIEWS, tta_predict


def test_qwk_hand_computed():
    assert quadratic_weighted_kappa([0, 1, 2, 3], [0, 1, 2, 3], n_classes=4) == pytest.approx(1.0)
    # 2 classes: O=[[1,1],[0,2]], E=[[.5,1.5],[.5,1.5]] -> 1 - 1/2
    assert quadratic_weighted_kappa([0, 0, 1, 1], [0, 1, 1, 1], n_classes=2) == pytest.approx(0.5)
    # full reversal over 3 classes: observed disagreement 2, expected 1 -> -1
    assert quadratic_weighted_kappa([0, 1, 2], [2, 1, 0], n_classes=3) == pytest.approx(-1.0)
    # quadratic weights: an off-by-two error costs 4x an off-by-one error
    near = quadratic_weighted_kappa([0, 1, 2, 3, 3], [0, 1, 2, 3, 2], n_classes=4)
    far = quadratic_weighted_kappa([0, 1, 2, 3, 3], [0, 1, 2, 3, 1], n_classes=4)
    assert far < near < 1


def test_auc_hand_computed_with_ties():
    assert roc_auc_binary([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc_binary([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc_binary([0, 0, 1], [0.2, 0.9, 0.9]) == pytest.approx(0.75)  # one tie counts 1/2
    assert np.isnan(roc_auc_binary([1, 1], [0.2, 0.3]))
    fpr, tpr, _ = roc_curve([0, 0, 1, 1, 0, 1], [0.1, 0.4, 0.35, 0.8, 0.8, 0.2])
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_binary([0, 0, 1, 1, 0, 1], [0.1, 0.4, 0.35, 0.8, 0.8, 0.2]))


def test_report_per_class_values():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .8, .1], [.1, .6, .3], [.1, .2, .7], [.5, .1, .4]])
    cm = confusion_matrix(y, probs.argmax(1), n_classes=3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    rep = classification_report(y, probs, ["0", "1+", "2+"])
    assert rep["accuracy"] == pytest.approx(4 / 6)
    assert rep["per_class"]["1+"]["precision"] == pytest.approx(2 / 3)
    assert rep["per_class"]["0"]["recall"] == pytest.approx(0.5)
    assert rep["per_class"]["2+"]["f1"] == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert rep["macro_f1"] == pytest.approx(np.mean([0.5, 0.8, 2 / 3]))
    auc = roc_auc_ovr(y, probs)
    assert rep["per_class"]["1+"]["roc_auc"] == pytest.approx(auc[1])
    assert "accuracy" in format_table(rep)


def test_write_report_files(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 40)
    p = rng.dirichlet(np.ones(4), 40)
    rep = classification_report(y, p, ["0", "1+", "2+", "3+"])
    paths = write_report(rep, tmp_path, y_true=y, probs=p)
    assert json.loads(paths["json"].read_text())["n"] == 40
    for key in ("confusion_png", "roc_png"):
        assert paths[key].stat().st_size > 1000 and paths[key].read_bytes()[:4] == b"\x89PNG"


class _Corner(torch.nn.Module):
    """Logits from the top-left pixel only: every view sees a different pixel."""

    def forward(self, x):
        return torch.stack([x[:, 0, 0, 0] * 3, -x[:, 0, 0, 0] * 3], dim=1)


def test_tta_averages_distinct_views():
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0, 0, 0] = 1.0  # only the identity (and transpose) views see this corner
    probs = tta_predict(_Corner(), x, views="d4")
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    p_one = torch.softmax(torch.tensor([3.0, -3.0]), 0)
    p_zero = torch.tensor([0.5, 0.5])
    expected0 = (2 * p_one + 6 * p_zero) / 8  # identity and transpose keep (0, 0) in place
    torch.testing.assert_close(probs[0], expected0)
    torch.testing.assert_close(probs[1], p_zero)
    # the eight views of an asymmetric image are eight different images
    img = torch.arange(16.0).view(1, 1, 4, 4)
    outs = {tuple(VIEWS[v](img).flatten().tolist()) for v in TTA_SETS["d4"]}
    assert len(outs) == 8


def test_plots_leave_the_process_matplotlib_backend_alone(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    from wsi_her2.train.evaluate import plot_confusion_matrix, plot_roc_curves, plot_training_curves

    monkeypatch.setitem(matplotlib.rcParams, "backend", "pdf")  # what a caller (a notebook, say) chose
    history = [{"epoch": e, "phase": "p1" if e < 2 else "p2", "train_loss": 1.0 / e, "val_loss": None,
                "train_acc": 0.5, "val_acc": None, "train_auc": None, "val_auc": None} for e in (1, 2)]
    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.6, 0.4]])
    paths = [plot_training_curves(history, tmp_path / "curves.png"),
             plot_confusion_matrix(np.array([[2, 0], [0, 2]]), ["a", "b"], tmp_path / "cm.png"),
             plot_roc_curves(y, probs, ["a", "b"], tmp_path / "roc.png")]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    assert dict.__getitem__(matplotlib.rcParams, "backend") == "pdf"
