"""Evaluation of a patch classifier: metrics (numpy only), a JSON report and PNG plots.

Metrics: accuracy, per-class and macro precision / recall / F1, one-vs-rest ROC-AUC (rank
statistic with ties handled), the confusion matrix, and quadratic-weighted kappa (HER2 grades are
ordered: calling a 3+ a 0 is worse than calling it a 2+, and QWK says so where accuracy does not).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from numpy.typing import NDArray

from wsi_her2.metrics import confusion_matrix, quadratic_weighted_kappa

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def precision_recall_f1(cm: NDArray) -> dict[str, NDArray[np.float64]]:
    """Per-class precision, recall, F1 and support from a confusion matrix (0 where undefined)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    pred_pos = cm.sum(0)
    support = cm.sum(1)
    precision = np.divide(tp, pred_pos, out=np.zeros_like(tp), where=pred_pos > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def roc_auc_binary(y_true: NDArray, score: NDArray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half).

    Returns NaN when only one class is present (AUC is undefined there).
    """
    from scipy.stats import rankdata

    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(y_true: NDArray, score: NDArray) -> tuple[NDArray, NDArray, NDArray]:
    """False-positive rate, true-positive rate and thresholds, from the highest threshold down."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr, np.r_[np.inf, s[distinct]]


def roc_auc_ovr(y_true: NDArray, probs: NDArray) -> NDArray[np.float64]:
    """One-vs-rest AUC per class (NaN for a class absent from ``y_true`` or present alone)."""
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(probs, dtype=np.float64)
    return np.array([roc_auc_binary(y == k, p[:, k]) for k in range(p.shape[1])])


def _nanmean(values: NDArray) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def classification_report(y_true: NDArray, probs: NDArray, classes: Sequence[str]) -> dict[str, Any]:
    """All metrics for integer labels and (N, K) probabilities, as a JSON-able dict."""
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    pred = p.argmax(1) if p.size else np.zeros(0, dtype=int)
    cm = confusion_matrix(y, pred, n_classes=k)
    prf = precision_recall_f1(cm)
    auc = roc_auc_ovr(y, p) if p.size else np.full(k, np.nan)
    per_class = {
        c: {
            "precision": float(prf["precision"][i]),
            "recall": float(prf["recall"][i]),
            "f1": float(prf["f1"][i]),
            "support": int(prf["support"][i]),
            "roc_auc": None if np.isnan(auc[i]) else float(auc[i]),
        }
        for i, c in enumerate(classes)
    }
    present = prf["support"] > 0
    macro_auc = _nanmean(auc)
    return {
        "n": int(y.size),
        "classes": list(classes),
        "accuracy": float((pred == y).mean()) if y.size else float("nan"),
        # Macro averages over classes present in y_true: an absent class has no recall to average.
        "macro_precision": float(prf["precision"][present].mean()) if present.any() else float("nan"),
        "macro_recall": float(prf["recall"][present].mean()) if present.any() else float("nan"),
        "macro_f1": float(prf["f1"][present].mean()) if present.any() else float("nan"),
        "macro_roc_auc": None if np.isnan(macro_auc) else macro_auc,
        "quadratic_weighted_kappa": quadratic_weighted_kappa(y, pred, n_classes=k),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of a report (for the terminal and READMEs)."""
    lines = [f"{'class':>8} {'precision':>9} {'recall':>7} {'f1':>6} {'auc':>6} {'n':>5}"]
    for c, m in report["per_class"].items():
        auc = "  n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.3f}"
        lines.append(f"{c:>8} {m['precision']:9.3f} {m['recall']:7.3f} {m['f1']:6.3f} {auc:>6} {m['support']:5d}")
    mauc = "n/a" if report["macro_roc_auc"] is None else f"{report['macro_roc_auc']:.3f}"
    lines.append(
        f"{'macro':>8} {report['macro_precision']:9.3f} {report['macro_recall']:7.3f} "
        f"{report['macro_f1']:6.3f} {mauc:>6} {report['n']:5d}"
    )
    lines.append(f"accuracy {report['accuracy']:.3f}   quadratic-weighted kappa {report['quadratic_weighted_kappa']:.3f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Prediction over a dataset
# --------------------------------------------------------------------------------------------
def predict_dataset(
    model, dataset, *, batch_size: int = 64, device: str = "cpu", tta: bool | str = False, num_workers: int = 0
) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Labels and class probabilities for every item of a ``(image_tensor, label)`` dataset."""
    import torch

    from wsi_her2.stain.tta import predict_proba

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    model.eval()
    labels, probs = [], []
    with torch.no_grad():
        for x, y in loader:
            probs.append(predict_proba(model, x.to(device), tta=tta).cpu().numpy())
            labels.append(np.asarray(y))
    if not probs:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(labels).astype(np.int64), np.concatenate(probs).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Plots (matplotlib Agg through the object API: no display needed on a cluster node)
# --------------------------------------------------------------------------------------------
def new_figure(ncols: int = 1, *, figsize: tuple[float, float], dpi: int, purpose: str = "evaluation plots"):
    """``(figure, axes)`` drawn by Agg through matplotlib's object API: no pyplot, so the process's
    backend (a notebook's, say) is left alone and no global figure registry needs closing."""
    from wsi_her2.optional import require

    require("matplotlib", purpose=purpose)
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(1, ncols)


def plot_confusion_matrix(cm: NDArray, classes: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """Write a confusion-matrix PNG (counts, with row-normalised shading)."""
    cm = np.asarray(cm)
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    fig, ax = new_figure(figsize=(4.2, 3.8), dpi=120)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_roc_curves(y_true: NDArray, probs: NDArray, classes: Sequence[str], path: str | Path) -> Path:
    """Write one-vs-rest ROC curves (one line per class with both outcomes present)."""
    y = np.asarray(y_true, dtype=int)
    fig, ax = new_figure(figsize=(4.5, 4.2), dpi=120)
    for k, c in enumerate(classes):
        pos = y == k
        if pos.all() or not pos.any():
            continue
        fpr, tpr, _ = roc_curve(pos, probs[:, k])
        ax.plot(fpr, tpr, label=f"{c} (AUC {roc_auc_binary(pos, probs[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("one-vs-rest ROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Loss, accuracy and validation AUC per epoch, with phase boundaries marked."""
    ep = [h["epoch"] for h in history]
    fig, axes = new_figure(3, figsize=(11, 3.2), dpi=110)
    for ax, key, title in zip(axes, ("loss", "acc", "auc"), ("loss", "accuracy", "macro AUC")):
        for split, style in (("train", "-"), ("val", "--")):
            vals = [h.get(f"{split}_{key}") for h in history]
            if any(v is not None for v in vals):
                ax.plot(ep, [np.nan if v is None else v for v in vals], style, marker="o", ms=3, label=split)
        for i in range(1, len(history)):
            if history[i].get("phase") != history[i - 1].get("phase"):
                ax.axvline(ep[i] - 0.5, color="grey", lw=0.7, ls=":")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def write_report(
    report: dict[str, Any], out_dir: str | Path, *, y_true: NDArray | None = None, probs: NDArray | None = None,
    prefix: str = "eval",
) -> dict[str, Path]:
    """Write ``<prefix>_report.json`` and the confusion-matrix / ROC PNGs into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{prefix}_report.json"}
    paths["json"].write_text(json.dumps(report, indent=2))
    paths["confusion_png"] = plot_confusion_matrix(
        np.asarray(report["confusion_matrix"]), report["classes"], out / f"{prefix}_confusion.png"
    )
    if y_true is not None and probs is not None and len(y_true):
        paths["roc_png"] = plot_roc_curves(y_true, probs, report["classes"], out / f"{prefix}_roc.png")
    log.info("wrote evaluation report %s", paths["json"])
    return paths
