"""The cohort review page: ``<out>/review.html``, one static page listing every slide of an output folder.

Each row: a small thumbnail of the slide's heatmap (embedded, ~10 KB), the slide id, call,
category, confidence, tumour cells, tiles used and rejected, QC flags, status and reason, and
links to the slide's report (``<id>.report.html`` / ``.pdf``, relative, so the folder can be
moved or served as it is). Failed and indeterminate slides come first; clicking a column header
sorts by it (again: reversed), and the filter and search box narrow the rows. Sorting and
filtering are a few lines of inline JavaScript: the page needs no server and no network.
With labels (``wsi-her2 review --labels CSV``, or a cohort manifest's ``label`` column) a label
column and the agreement table (:func:`wsi_her2.metrics.agreement_report`) are added.

Slides are found from ``<id>.json`` (scored, including slides where ``tile`` found no tissue)
and, for a cohort run, ``state/<id>.json`` (failed, pending or running slides). A slide's picture and
report links are the files its ``<id>.json`` names in ``outputs`` (by name, beside it: the folder may
have moved), so a report left from an earlier run (re-scored with ``--no-report``) is not linked. A
file that is not a JSON object where one is expected is left out with a warning.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path
from typing import Any, Mapping

from wsi_her2.files import atomic_write_text
from wsi_her2.outputs.report import INTENDED_USE, format_number
from wsi_her2.vocab import INDETERMINATE

log = logging.getLogger(__name__)

REVIEW_FILE = "review.html"
THUMB_PX = 220
#: files in an output folder that end in .json but are not slide results
_NOT_RESULTS = ("cohort.json", "run.json", "agreement.json")
#: A cohort run's folders: wsi_her2.batch.runner.PER_SLIDE_DIRNAME and wsi_her2.batch.state.STATE_DIRNAME. Named
#: again here because the writers may not import the cohort runner (tests/test_import_graph.py); a test keeps them equal.
PER_SLIDE_DIRNAME = "per-slide"
STATE_DIRNAME = "state"
#: The outputs of ``<id>.json`` the page links or shows (their keys in its ``outputs``)
_LINKED_OUTPUTS = ("heatmap_png", "report_html", "report_pdf")


def _json_object(path: Path, what: str) -> dict | None:
    """The JSON object ``path`` holds; None, with a warning, when it is unreadable or holds anything else."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
        log.warning("%s: not readable as %s (%s); left out of the review page", path, what, exc)
        return None
    if not isinstance(value, dict):
        log.warning("%s: holds a JSON %s, not %s; left out of the review page", path, type(value).__name__, what)
        return None
    return value


def _section(record: Mapping, key: str) -> Mapping:
    """``record[key]`` when it is a mapping, else empty (a damaged record still lists its slide)."""
    value = record.get(key)
    return value if isinstance(value, Mapping) else {}


def _thumbnail_uri(out: Path, names: list[str | None]) -> str | None:
    """A small JPEG of the first of the pictures ``names`` in ``out`` that can be read, as a data URI; None when none can."""
    from PIL import Image

    for name in filter(None, names):
        path = out / name
        if not path.is_file():
            continue
        try:
            with Image.open(path) as im:  # PNGs: PIL's draft mode (JPEG only) would not shrink them while decoding
                rgb = im.convert("RGB")
        except Exception as exc:  # a damaged picture: the row says so, the page still works
            log.warning("%s: cannot read for the review page (%s)", path, exc)
            continue
        rgb.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return None


def _qc_flags(result: Mapping) -> list[str]:
    qc, row = _section(result, "qc_summary"), _section(result, "row")
    flags = []
    if result.get("no_tissue"):
        flags.append("no tissue")
    if qc.get("pen_marks"):
        flags.append("pen marks")
    if qc.get("out_of_focus_regions"):
        flags.append(f"out of focus ({qc['out_of_focus_regions']} region{'s' if qc['out_of_focus_regions'] > 1 else ''})")
    used, rejected = row.get("tiles_used") or 0, row.get("tiles_rejected") or 0
    if used + rejected and rejected / (used + rejected) > 0.5:
        flags.append(f"{100 * rejected / (used + rejected):.0f} % of tiles rejected")
    return flags


def _scored_row(result: Mapping) -> dict:
    """The slide's row; ``files``: the names of the outputs it links (:data:`_LINKED_OUTPUTS`) its record names."""
    call, row, outputs = result["call"], _section(result, "row"), _section(result, "outputs")
    sid = str(result["slide"])
    score = str(call.get("her2_score", ""))
    return {
        "slide": sid, "status": INDETERMINATE if score == INDETERMINATE else "done", "her2_score": score,
        "category": call.get("her2_category") or "", "category_text": call.get("her2_category_text") or "",
        "confidence": call.get("confidence"), "tumour_cells": _section(result, "tumour").get("cells"),
        "tiles_used": row.get("tiles_used"), "tiles_rejected": row.get("tiles_rejected"),
        "qc_flags": _qc_flags(result), "reason": _section(call, "details").get("reason") or "",
        "files": {k: Path(outputs[k]).name for k in _LINKED_OUTPUTS if isinstance(outputs.get(k), str)},
    }


def results_dir(out: Path) -> Path:
    """Where the slides' files are: ``out`` itself (``wsi-her2 score -o``), or a cohort run's per-slide folder."""
    cohort = out / "cohort.json"
    name = (_json_object(cohort, "a cohort record") or {}).get("per_slide_dir") if cohort.is_file() else None
    folder = out / (name if isinstance(name, str) and name else PER_SLIDE_DIRNAME)
    return folder if folder.is_dir() else out


def collect_rows(out: str | Path) -> list[dict]:
    """One row per slide of the output folder ``out`` (see the module docstring), sorted by slide id.
    Picture and report paths are relative to ``out``."""
    out = Path(out)
    where = results_dir(out)
    prefix = "" if where == out else f"{where.name}/"
    rows: dict[str, dict] = {}
    for path in sorted(where.glob("*.json")):
        if path.name in _NOT_RESULTS or path.name.endswith(".no_tissue.json"):
            continue
        result = _json_object(path, "a slide result")
        if result is None or "slide" not in result or "call" not in result:
            continue
        if not isinstance(result["call"], Mapping):
            log.warning("%s: its call is not a JSON object; left out of the review page", path)
            continue
        rows[str(result["slide"])] = _scored_row(result)
    for path in sorted((out / STATE_DIRNAME).glob("*.json")):
        state = _json_object(path, "a slide's cohort state")
        if state is None:
            continue
        sid = str(state.get("slide_id", path.stem))
        status = state.get("status", "pending")
        if status == "done" and sid in rows:
            continue
        if status == "failed":
            reason = f"{state.get('error_type') or 'error'}: {state.get('reason') or ''}"
            rows[sid] = {**rows.get(sid, {}), "slide": sid, "status": "failed", "reason": reason,
                         "her2_score": rows.get(sid, {}).get("her2_score", ""), "qc_flags": rows.get(sid, {}).get("qc_flags", [])}
        elif sid not in rows:
            rows[sid] = {"slide": sid, "status": status, "her2_score": "", "qc_flags": [], "reason": ""}
    for sid, row in rows.items():
        files = row.pop("files", {})  # only what the slide's record names: an earlier run's leftovers are not linked
        # the QC picture is the tile stage's, not in the record: shown by its name when there is no heatmap
        row["thumbnail"] = _thumbnail_uri(where, [files.get("heatmap_png"), f"{sid}.qc.png"])
        for key in ("report_html", "report_pdf"):
            row[key] = f"{prefix}{files[key]}" if key in files and (where / files[key]).is_file() else None
    return [rows[sid] for sid in sorted(rows)]


def review_order(row: Mapping) -> tuple[int, str]:
    """Failed first, then indeterminate, then pending/running, then called slides; by id within each."""
    rank = {"failed": 0, INDETERMINATE: 1, "pending": 2, "running": 2}.get(str(row.get("status")), 3)
    return rank, str(row.get("slide"))


# --- the page -------------------------------------------------------------------------------------
_CSS = """
body { font: 13px/1.35 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 16px 24px; color: #111; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 22px 0 6px; }
.controls { display: flex; gap: 14px; align-items: center; margin: 10px 0; flex-wrap: wrap; }
table { border-collapse: collapse; } th, td { border: 1px solid #bbb; padding: 3px 6px; vertical-align: middle; text-align: left; }
#slides th { background: #eee; cursor: pointer; user-select: none; white-space: nowrap; position: sticky; top: 0; }
#slides th.sorted-asc::after { content: " \\25B2"; } #slides th.sorted-desc::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } td.pic img { display: block; width: 120px; }
.score { font-weight: bold; font-size: 16px; white-space: nowrap; }
tr.failed td { background: #fdecea; } tr.indeterminate td { background: #fff6db; }
.flag { display: inline-block; border: 1px solid #666; border-radius: 3px; padding: 0 4px; margin: 1px; font-size: 12px; }
.reason { font-size: 12px; color: #333; max-width: 300px; overflow-wrap: anywhere; } .use { font-weight: bold; }
"""

_JS = """
(function () {
  var table = document.getElementById('slides'), body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows), sortKey = null, sortDir = 1;
  function value(row, key, type) {
    var v = row.getAttribute('data-' + key);
    if (type === 'num') { var n = parseFloat(v); return isNaN(n) ? -Infinity : n; }
    return (v || '').toLowerCase();
  }
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
    var key = th.getAttribute('data-key');
    if (!key) return;
    th.addEventListener('click', function () {
      var type = th.getAttribute('data-type');
      sortDir = (sortKey === key) ? -sortDir : 1; sortKey = key;
      rows.sort(function (a, b) {
        var x = value(a, key, type), y = value(b, key, type);
        if (x < y) return -sortDir; if (x > y) return sortDir;
        return a.getAttribute('data-slide') < b.getAttribute('data-slide') ? -1 : 1;
      });
      rows.forEach(function (r) { body.appendChild(r); });
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) { c.classList.remove('sorted-asc', 'sorted-desc'); });
      th.classList.add(sortDir === 1 ? 'sorted-asc' : 'sorted-desc');
    });
  });
  var filter = document.getElementById('filter'), search = document.getElementById('search');
  function apply() {
    var f = filter.value, q = search.value.trim().toLowerCase(), shown = 0;
    rows.forEach(function (r) {
      var status = r.getAttribute('data-status'), score = r.getAttribute('data-her2_score');
      var ok = f === 'all' || (f === 'review' ? (status === 'failed' || status === 'indeterminate')
               : f === 'status:' + status || f === 'score:' + score);
      ok = ok && (!q || r.getAttribute('data-slide').toLowerCase().indexOf(q) >= 0);
      r.style.display = ok ? '' : 'none'; if (ok) shown++;
    });
    document.getElementById('count').textContent = shown + ' of ' + rows.length + ' slides shown';
  }
  filter.addEventListener('change', apply); search.addEventListener('input', apply); apply();
})();
"""

#: (data key, header, sort type) of the sortable columns, in order
_COLUMNS = (("slide", "slide", "text"), ("her2_score", "call", "text"), ("category", "category", "text"),
            ("confidence", "confidence", "num"), ("tumour_cells", "tumour cells", "num"),
            ("tiles_used", "tiles used", "num"), ("tiles_rejected", "rejected", "num"), ("qc", "QC flags", "text"),
            ("status", "status", "text"))


def _attr(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, fmt: str) -> str:
    """A number cell: blank when there is none (the report's formatting)."""
    return format_number(value, fmt, missing="")


def _row_html(row: Mapping, *, with_labels: bool) -> str:
    e = html.escape
    sid = str(row["slide"])
    data = {"slide": sid, "her2_score": row.get("her2_score", ""), "category": row.get("category", ""),
            "confidence": row.get("confidence"), "tumour_cells": row.get("tumour_cells"), "tiles_used": row.get("tiles_used"),
            "tiles_rejected": row.get("tiles_rejected"), "qc": " ".join(row.get("qc_flags") or []),
            "status": row.get("status", ""), "label": row.get("label") or ""}
    attrs = " ".join(f'data-{k}="{_attr(v)}"' for k, v in data.items())
    pic = (f'<img alt="{_attr(sid)} heatmap" loading="lazy" src="{row["thumbnail"]}">' if row.get("thumbnail")
           else "<em>no picture</em>")
    pic = f'<a href="{_attr(row["report_html"])}">{pic}</a>' if row.get("report_html") else pic
    links = " ".join(f'<a class="{kind}" href="{_attr(row[kind])}">{label}</a>'
                     for kind, label in (("report_html", "report"), ("report_pdf", "PDF")) if row.get(kind)) or "-"
    flags = "".join(f'<span class="flag">{e(f)}</span>' for f in row.get("qc_flags") or []) or "-"
    status = e(str(row.get("status", "")))
    reason = f'<div class="reason">{e(str(row["reason"]))}</div>' if row.get("reason") else ""
    cells = [f'<td class="pic">{pic}</td>', f"<td>{e(sid)}</td>",
             f'<td class="score">{e(str(row.get("her2_score") or "-"))}</td>',
             f'<td title="{_attr(row.get("category_text"))}">{e(str(row.get("category") or "-"))}</td>',
             f'<td class="num">{_num(row.get("confidence"), ".2f")}</td>', f'<td class="num">{_num(row.get("tumour_cells"), ",.0f")}</td>',
             f'<td class="num">{_num(row.get("tiles_used"), ",.0f")}</td>', f'<td class="num">{_num(row.get("tiles_rejected"), ",.0f")}</td>',
             f"<td>{flags}</td>", f"<td>{status}{reason}</td>"]
    if with_labels:
        cells.append(f'<td class="label">{e(str(row.get("label") or "-"))}</td>')
    cells.append(f"<td>{links}</td>")
    return f'<tr class="{_attr(row.get("status"))}" {attrs}>' + "".join(cells) + "</tr>"


def _matrix_html(matrix, names, caption: str) -> str:
    e = html.escape
    head = "<tr><th>label \\ call</th>" + "".join(f"<th>{e(str(n))}</th>" for n in names) + "</tr>"
    body = "".join(f"<tr><th>{e(str(n))}</th>" + "".join(f'<td class="num">{int(v)}</td>' for v in r) + "</tr>"
                   for n, r in zip(names, matrix))
    return f"<table><caption>{e(caption)}</caption>{head}{body}</table>"


def _agreement_html(report: Mapping | None) -> str:
    if report is None:
        return "<h2>Agreement with labels</h2><p>No slide has a label.</p>"

    def num(x: Any) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    g = report["groups"]
    per = "; ".join(f"{k} {num(v['agreement'])} (n={v['n']})" for k, v in g["per_group"].items())
    not_scored = (f"<p>Labelled but not scored (failed or no call): {html.escape(', '.join(report['not_scored']))}</p>"
                  if report["not_scored"] else "")
    return (f'<h2>Agreement with labels</h2><div id="agreement"><p>{report["n_compared"]} of {report["n_labelled"]} labelled '
            f"slides compared: accuracy {num(report['accuracy'])}, quadratic-weighted kappa "
            f"{num(report['quadratic_weighted_kappa'])}.</p>{not_scored}"
            + _matrix_html(report["confusion_matrix"], report["classes"], "HER2 score")
            + f"<p>negative (0, 1+) / equivocal (2+) / positive (3+): accuracy {num(g['accuracy'])}, kappa {num(g['kappa'])}; "
              f"per group: {html.escape(per)}</p>"
            + _matrix_html(g["confusion_matrix"], list(g["per_group"]), "clinical group") + "</div>")


def render_review(rows: list[dict], *, title: str, labels: Mapping[str, str] | None = None) -> str:
    """The page's HTML for ``rows`` (:func:`collect_rows`); ``labels`` (slide id -> score) add the agreement."""
    from wsi_her2.metrics import agreement_report

    e = html.escape
    with_labels = labels is not None
    rows = sorted(rows, key=review_order)
    if with_labels:
        for row in rows:
            row["label"] = labels.get(str(row["slide"]))
    counts: dict[str, int] = {}
    for row in rows:
        status = row.get("status")
        key = status if status in ("failed", INDETERMINATE, "pending", "running") else f"HER2 {row.get('her2_score')}"
        counts[str(key)] = counts.get(str(key), 0) + 1
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    options = [("all", "all slides"), ("review", "needs review: failed or indeterminate"),
               (f"status:{INDETERMINATE}", "indeterminate"), ("status:failed", "failed")]
    options += [(f"score:{s}", f"HER2 {s}") for s in ("0", "1+", "2+", "3+")]
    headers = [f'<th data-key="{k}" data-type="{t}">{e(h)}</th>' for k, h, t in _COLUMNS]
    if with_labels:
        headers.append('<th data-key="label" data-type="text">label</th>')
    parts = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{_CSS}</style></head><body>',
        f"<h1>{e(title)}</h1>",
        f"<p>{len(rows)} slides: {e(summary)}. Failed and indeterminate slides first; click a column header to sort "
        f"(again to reverse). <span class=\"use\">{e(INTENDED_USE)}</span></p>",
        '<div class="controls"><label>show <select id="filter">'
        + "".join(f'<option value="{_attr(v)}">{e(t)}</option>' for v, t in options)
        + '</select></label><label>slide <input id="search" type="search" placeholder="id contains"></label>'
          '<span id="count"></span></div>',
        '<table id="slides"><thead><tr><th>heatmap</th>' + "".join(headers) + "<th>report</th></tr></thead><tbody>",
        *(_row_html(r, with_labels=with_labels) for r in rows),
        "</tbody></table>",
    ]
    if with_labels:
        parts.append(_agreement_html(agreement_report(
            [{"slide": r["slide"], "status": "done" if r.get("status") in ("done", INDETERMINATE) else r.get("status"),
              "her2_score": r.get("her2_score"), "label": r.get("label")} for r in rows])))
    parts.append(f"<script>{_JS}</script></body></html>\n")
    return "".join(parts)


def write_review(out: str | Path, *, labels: Mapping[str, str] | None = None) -> Path:
    """Write ``<out>/review.html`` for the output folder ``out`` (beside the files it links to); its path.

    Raises
    ------
    StoreError
        ``out`` is not a folder, or holds no slide result.
    """
    from wsi_her2.errors import StoreError

    out = Path(out)
    if not out.is_dir():
        raise StoreError(f"{out}: no such folder; give the output folder of `wsi-her2 score` or `wsi-her2 run`")
    rows = collect_rows(out)
    if not rows:
        raise StoreError(f"{out}: no slide results (<id>.json) or cohort states in it; score slides into it first "
                         f"(`wsi-her2 score ... -o {out}` or `wsi-her2 run ... -o {out}`)")
    return atomic_write_text(out / REVIEW_FILE, render_review(rows, title=f"wsi-her2 review: {out.resolve().name}",
                                                              labels=labels))
