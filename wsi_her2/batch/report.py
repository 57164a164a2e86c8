"""Cohort outputs: ``slides.csv`` (one row per slide) and the agreement report against manifest labels.

``slides.csv`` is rebuilt from the per-slide state files at the end of every run, sorted by slide
id, with no timings in it, so a resumed run writes the same bytes as an uninterrupted one.

The agreement metrics themselves (confusion matrices, kappas, the negative / equivocal / positive
grouping) are defined once in :mod:`wsi_her2.metrics` and re-exported here; this module only lays
their report out as text (:func:`format_agreement`) and writes it (:func:`write_agreement`).
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from wsi_her2.batch.manifest import SlideJob
from wsi_her2.csv_cells import safe_cell
from wsi_her2.files import atomic_write_text
from wsi_her2.metrics import (  # noqa: F401 (re-exported: the cohort's agreement)
    GROUPS, agreement_report, confusion_matrix, quadratic_weighted_kappa, weighted_kappa,
)

#: The columns of ``slides.csv``, in order; extra keys a scorer adds follow, sorted by name.
CSV_COLUMNS = (
    "slide", "status", "her2_score", "confidence", "frac_0", "frac_1+", "frac_2+", "frac_3+",
    "tiles_used", "tiles_rejected", "model", "aggregation", "label", "patient_id", "mpp_um",
    "error_type", "reason",
)


# --- slides.csv ------------------------------------------------------------------------------------
def cohort_rows(jobs: Sequence[SlideJob], states: Mapping[str, object]) -> list[dict]:
    """One row per job, from its state (a :class:`~wsi_her2.batch.state.SlideState` or None), sorted by slide id."""
    rows = []
    for job in sorted(jobs, key=lambda j: j.slide_id):
        state = states.get(job.slide_id)
        status = getattr(state, "status", None) or "pending"
        row: dict = {"slide": job.slide_id, "status": status}
        if status == "done" and getattr(state, "row", None):
            row.update({k: v for k, v in state.row.items() if k not in ("slide", "status")})
        if status == "failed":
            row["error_type"] = state.error_type
            row["reason"] = state.reason
            if state.error_type == "NoTissueError":  # an empty or unstained core: no call, never HER2 0
                row["her2_score"] = "indeterminate"
        row["label"] = job.label
        row["patient_id"] = job.patient_id
        row["mpp_um"] = job.mpp_um
        rows.append(row)
    return rows


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            return ""
        return f"{float(value):.6g}"  # fixed precision: the same value always prints the same
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return " ".join(str(value).split())  # one line per row, whatever the reason text holds


def slides_csv_text(rows: Iterable[Mapping]) -> str:
    rows = sorted(rows, key=lambda r: str(r["slide"]))
    extra = sorted({k for r in rows for k in r} - set(CSV_COLUMNS))
    columns = list(CSV_COLUMNS) + extra
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([safe_cell(_cell(row.get(c))) for c in columns])
    return buf.getvalue()


def write_slides_csv(rows: Iterable[Mapping], path: str | Path) -> Path:
    """Write ``slides.csv`` atomically (two runners finishing together never leave a torn file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, slides_csv_text(rows))




def _matrix_text(matrix: Sequence[Sequence[int]], names: Sequence[str]) -> list[str]:
    width = max(9, *(len(n) + 2 for n in names))
    lines = ["label \\ call".ljust(width) + "".join(n.rjust(width) for n in names)]
    for name, row in zip(names, matrix):
        lines.append(name.ljust(width) + "".join(str(v).rjust(width) for v in row))
    return lines


def format_agreement(report: Mapping) -> str:
    """The agreement report as a few lines of text for the terminal."""
    def num(x: object) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    g = report["groups"]
    lines = [f"Agreement with labels: {report['n_compared']} of {report['n_labelled']} labelled slides scored"]
    if report["not_scored"]:
        lines.append(f"  not scored (failed or no call): {', '.join(report['not_scored'])}")
    lines += ["  " + s for s in _matrix_text(report["confusion_matrix"], report["classes"])]
    lines.append(f"  accuracy {num(report['accuracy'])}   quadratic-weighted kappa {num(report['quadratic_weighted_kappa'])}")
    lines.append("  negative (0/1+) / equivocal (2+) / positive (3+):")
    lines += ["  " + s for s in _matrix_text(g["confusion_matrix"], GROUPS)]
    per = "  ".join(f"{k} {num(v['agreement'])} (n={v['n']})" for k, v in g["per_group"].items())
    lines.append(f"  accuracy {num(g['accuracy'])}   kappa {num(g['kappa'])}   per group: {per}")
    return "\n".join(lines)


def write_agreement(report: Mapping, path: str | Path) -> Path:
    return atomic_write_text(Path(path), json.dumps(report, indent=2, sort_keys=True) + "\n")
