"""The one-page slide report a pathologist files with the case: ``<id>.report.html`` and ``<id>.report.pdf``.

Both are drawn from the same :class:`Report` (built at scoring time from the slide's fresh
:class:`~wsi_her2.result.SlideResult`: what ``<id>.json`` records, and the tiles' QC reasons), so they carry the same
facts: the call and HER2 category, the criteria and calibration used, the tumour-cell percentages that decided the
call against their cut-points as the guideline compares them ("> 10 %" breast, ">= 10 %" gastric) and, for a gastric
biopsy or TMA core, the largest cohesive clusters the cluster rule compared,
the scored tumour (cells, area), QC (tiles kept, rejected by reason, slide flags), the heatmap
over the thumbnail and the QC picture, the model and software version, and the intended-use line.

Layout: A4 portrait, one page, black on white with ruled tables, so it reads the same printed in
grey (no fact is carried by colour alone; the pictures' colours are explained by their legends
and the numbers sit in the tables). The HTML is self-contained (pictures embedded as data URIs,
inline CSS, no script): it opens from an e-mail or a case folder. The PDF is written by fpdf2
(pure Python, no browser or system library at run time) with its built-in Helvetica.

A picture that is missing or cannot be decoded is replaced by a boxed line saying which file
and what to do; the rest of the report is unaffected.
"""
from __future__ import annotations

from datetime import datetime, timezone

import base64
import html
import io
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_her2.criteria import CRITERIA, DEFAULT_CRITERIA, Criteria
from wsi_her2.files import atomic_write_bytes, atomic_write_text
from wsi_her2.result import PartCall, SlideResult

log = logging.getLogger(__name__)

INTENDED_USE = "Research use only; the call must be confirmed by a pathologist."
#: A picture is embedded at most this many pixels on its long side (the report prints it ~90 mm tall:
#: ~250 dpi), as a JPEG (quality 88, no chroma subsampling): ~100 KB a picture instead of ~1 MB.
PICTURE_MAX_PX = 900
PICTURE_JPEG_QUALITY = 88
_REASON_NAMES = {"low_tissue": "too little tissue", "blurry": "out of focus", "pen": "pen ink"}


@dataclass
class Picture:
    title: str
    path: Path | None
    image: Any = None  # a PIL RGB image, or None with ``problem`` set
    problem: str | None = None

    def jpeg(self) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, format="JPEG", quality=PICTURE_JPEG_QUALITY, subsampling=0, optimize=True)
        return buf.getvalue()


@dataclass
class Report:
    slide: str
    score: str
    category: str
    confidence: str
    confidence_method: str  # how the rule measured it (bootstrap agreement, the cluster's margin); empty: no call
    reason: str | None
    sections: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)
    deciding: list[tuple[str, str, str, str]] = field(default_factory=list)  # step, share, cut-point, passed
    deciding_note: str = ""
    pictures: list[Picture] = field(default_factory=list)
    footer: list[str] = field(default_factory=list)


# --- content ------------------------------------------------------------------------------------
def _pct(value: Any, digits: int = 1) -> str:
    try:
        return f"{100 * float(value):.{digits}f} %"
    except (TypeError, ValueError):
        return "n/a"


def format_number(value: Any, fmt: str = ",.0f", missing: str = "n/a") -> str:
    """``value`` formatted as a number; ``missing`` when it is none (the review page shares it)."""
    try:
        return format(float(value), fmt)
    except (TypeError, ValueError):
        return missing


def _criteria_of(call: PartCall) -> Criteria:
    """The guideline the call was made under, as its ``criteria`` record names it."""
    return CRITERIA.get(str(call.criteria.get("criteria")), CRITERIA[DEFAULT_CRITERIA])


def _steps(criteria: Criteria) -> tuple[tuple[str, str, str], ...]:
    """(step, its key in ``fraction_at_least``, the pattern counted) of each grade, in the guideline's words:
    the gastric guideline counts basolateral and lateral rings as complete for 2+ and 3+."""
    rings = "complete, basolateral or lateral" if criteria.incomplete_rings_count else "complete"
    return (("3+", ">=3+", f"{rings}, intense membrane staining"),
            ("2+", ">=2+", f"weak to moderate {rings} membrane staining (or stronger)"),
            ("1+", ">=1+", "faint, incomplete membrane staining (or stronger)"))


def _criteria_rows(result: SlideResult) -> list[tuple[str, str]]:
    call, criteria = result.call, result.criteria  # wsi_her2.criteria.ScoringRule.to_dict(), recorded with the call
    rows = [("criteria", str(criteria.get("title") or criteria.get("criteria") or "?"))]
    rows += [(label, str(criteria[k])) for k, label in (("specimen", "specimen"), ("rule", "specimen rule"),
                                                          ("reference", "reference")) if criteria.get(k)]
    rows.append(("rule", str(call.details.get("rule") or f"slide rule '{call.method or result.provenance.aggregation}'")))
    cal = result.provenance.calibration
    if cal:
        rows.append(("calibration", f"{Path(str(cal.get('file', '?'))).name}: DAB gain {cal.get('dab_gain')}, "
                                    f"cut {_pct(cal.get('cell_fraction_cut'))} (from {cal.get('n_slides', '?')} slides)"))
    else:
        rows.append(("calibration", "none: the guideline's cut-points"))
    return rows


def _passed(value: Any) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _cells(n: Any) -> str:
    return f"{format_number(n)} cell" + ("" if n == 1 else "s")


def _percentage_rows(call: PartCall, steps) -> tuple[list[tuple[str, str, str, str]], str]:
    """The tumour-cell share of each step against its cut-point, compared as the guideline does."""
    details = call.details
    # "> cut" (breast) or ">= cut" (gastric: a share equal to the cut counts), as aggregate_asco_cells compared them
    op, above = (">=", "at or above") if _criteria_of(call).inclusive_cut else (">", "above")
    thresholds, passed = details.get("thresholds", {}), details.get("passed", {})
    rows = [(f"{step}: {what}", _pct(call.percentages.get(key)), f"{op} {_pct(thresholds.get(step), 0)}",
             _passed(passed.get(step))) for step, key, what in steps]
    return rows, f"Share of tumour cells showing at least each pattern; the call is the highest step {above} its cut-point."


def _cluster_rows(call: PartCall, steps) -> tuple[list[tuple[str, str, str, str]], str]:
    """The largest cohesive cluster of each step against the minimum: what the gastric biopsy rule decided on
    (wsi_her2.score.aggregate.cluster_call), the percentages shown beside it."""
    clusters, min_cells = call.details["largest_cluster"], call.details.get("cluster_min_cells")
    rows = [(f"{step}: largest cohesive cluster", _cells(clusters.get(key)), f">= {_cells(min_cells)}",
             _passed(None if min_cells is None else clusters.get(key, 0) >= min_cells)) for step, key, _ in steps]
    return rows, (f"Cluster rule (small samples): the call is the highest step with a cluster of at least "
                  f"{format_number(min_cells)} cohesive tumour cells showing it, whatever the percentage; the shares "
                  f"alone would give {call.details.get('percentage_call', '?')}.")


def _deciding(call: PartCall) -> tuple[list[tuple[str, str, str, str]], str]:
    if call.percentages:
        steps = _steps(_criteria_of(call))
        rows, note = _percentage_rows(call, steps)
        if call.details.get("largest_cluster"):  # the cluster rule decided: its note replaces the percentages'
            cluster_rows, note = _cluster_rows(call, steps)
            rows += cluster_rows
        return rows, note
    if not call.n_tiles_used:  # no tissue, or every tile rejected: no shares to show
        return [], "No tile was scored, so nothing decided a grade: see the reason above and the QC picture."
    rows = [(f"tiles called {c}", _pct(v), "", "") for c, v in call.class_fractions.items()]
    return rows, "Share of scored tiles per tile call (this model does not count cells)."


def _qc_rows(result: SlideResult) -> list[tuple[str, str]]:
    qc = result.qc_summary
    n_tiles = qc.get("n_tiles")
    if n_tiles is None and result.no_tissue:
        return [("tiles", "none cut: the tile stage found no tissue"), ("slide flags", "no tissue")]
    rows = [("tiles", f"{format_number(n_tiles)} cut; {format_number(result.tiles_used)} kept and scored; "
                      f"{format_number(result.tiles_rejected)} not scored")]
    if result.tiles is not None:
        counts = Counter(part for r in result.tiles.reasons if r for part in str(r).split("+"))
        if counts:
            rows.append(("not scored, by reason (a tile may have several)", "; ".join(f"{_REASON_NAMES.get(k, k)} {v:,}"
                                                          for k, v in counts.most_common())))
    elif qc:
        no_tissue = format_number(qc.get("n_tiles", 0) - qc.get("n_tissue_tiles", 0))
        blurry, pen = format_number(qc.get("n_blurry_tissue_tiles")), format_number(qc.get("n_pen_tiles"))
        rows.append(("rejected, by reason", f"too little tissue {no_tissue}; out of focus {blurry}; pen ink {pen}"))
    flags = []
    if qc.get("pen_marks"):
        flags.append(f"pen marks ({qc.get('pen_area_mm2', 0):.2f} mm²)")
    if qc.get("out_of_focus_regions"):
        flags.append(f"{qc['out_of_focus_regions']} out-of-focus region(s)")
    rows.append(("slide flags", ", ".join(flags) if flags else "none"))
    return rows


def load_picture(title: str, path: str | Path | None) -> Picture:
    """The picture at ``path`` as RGB, shrunk to :data:`PICTURE_MAX_PX`; a clear ``problem`` when it cannot be shown."""
    from PIL import Image

    if not path:
        return Picture(title, None, problem=f"{title}: not written for this slide")
    path = Path(path)
    if not path.is_file():
        return Picture(title, path, problem=f"{title}: {path.name} is missing; re-run `wsi-her2 score --overwrite` "
                                            "(or `wsi-her2 tile` for the QC picture) to draw it")
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError ... on damaged files
        return Picture(title, path, problem=f"{title}: {path.name} cannot be read ({type(exc).__name__}: "
                                            f"{str(exc)[:80]}); re-run `wsi-her2 score --overwrite` to redraw it")
    rgb.thumbnail((PICTURE_MAX_PX, PICTURE_MAX_PX))
    return Picture(title, path, image=rgb)


def build_report(result: SlideResult, *, heatmap_png: str | Path | None = None, qc_png: str | Path | None = None) -> Report:
    """The report's content from a slide's fresh result (reports are written at scoring time only) and its pictures."""
    call, tumour, p = result.call, result.tumour, result.provenance
    deciding, note = _deciding(call)
    sections = [("Criteria", _criteria_rows(result))]
    if tumour is not None:
        sections.append(("Scored tumour", [
            ("tumour cells", f"{format_number(tumour.cells)} (of {format_number(tumour.all_cells)} nuclei found)"),
            ("tumour area", f"{format_number(tumour.area_mm2, '.2f')} mm²"),
        ]))
    sections.append(("Quality control", _qc_rows(result)))
    weights = f", weights {Path(str(p.weights)).name}" if p.weights else ""
    sections.append(("Method", [
        ("model", f"{p.model or '?'}{weights}; slide rule {p.aggregation or call.method or '?'}"),
        ("tiles", f"{p.tile_px} px at {p.tile_mpp_um or '?'} µm/px" if p.tile_px else "none"),
        ("software", f"wsi-her2 {p.package_version or '?'}"),
    ]))
    heatmap_png = heatmap_png or result.outputs.get("heatmap_png")
    pictures = [load_picture("Tile calls over the thumbnail (heatmap)", heatmap_png),
                load_picture("QC: tissue and tiles kept / rejected", qc_png)]
    digest = str(p.slide_sha256 or "")[:16]
    return Report(
        slide=result.slide_id, score=call.her2_score, category=call.her2_category_text or call.her2_category,
        confidence=f"{float(call.confidence):.2f}", confidence_method=str(call.details.get("confidence_method") or ""),
        reason=call.reason, sections=sections, deciding=deciding, deciding_note=note, pictures=pictures,
        footer=[f"Slide {result.slide_id}" + (f" (SHA-256 {digest}...)" if digest else "")
                + f"; report by wsi-her2 {p.package_version or '?'} (no date: the same result, the same report).",
                INTENDED_USE],
    )


def _confidence_text(report: Report) -> str:
    """The confidence and what it measures, as the rule that made the call recorded it."""
    return f"confidence {report.confidence}" + (f" ({report.confidence_method})" if report.confidence_method else "")


# --- HTML ---------------------------------------------------------------------------------------
_CSS = """
@page { size: A4 portrait; margin: 10mm; }
* { box-sizing: border-box; }
body { font: 9.5pt/1.3 "Helvetica Neue", Helvetica, Arial, sans-serif; color: #000; background: #fff; margin: 0; }
.page { width: 190mm; margin: 0 auto; padding: 4mm 0; }
h1 { font-size: 14pt; margin: 0 0 1mm; } h2 { font-size: 10pt; margin: 3mm 0 1mm; border-bottom: 1px solid #000; }
.use { font-weight: bold; border: 1px solid #000; padding: 1mm 2mm; margin: 1mm 0 2mm; }
.call { border: 2px solid #000; padding: 2mm 3mm; display: flex; gap: 6mm; align-items: baseline; }
.score { font-size: 22pt; font-weight: bold; white-space: nowrap; } .category { font-size: 11pt; font-weight: bold; }
.reason { margin-top: 1mm; }
.cols { display: flex; gap: 5mm; } .left { flex: 1 1 0; min-width: 0; } .right { flex: 0 0 78mm; }
table { border-collapse: collapse; width: 100%; } th, td { border: 1px solid #000; padding: 0.6mm 1.5mm; text-align: left; vertical-align: top; }
th { background: #e6e6e6; } table.kv th { width: 32mm; } td.num { text-align: right; white-space: nowrap; } .note { font-size: 8.5pt; margin: 0.5mm 0 0; }
figure { margin: 0 0 2mm; } figure img { width: 100%; max-height: 92mm; object-fit: contain; border: 1px solid #000; display: block; }
figcaption { font-size: 8.5pt; } .missing { border: 1px dashed #000; padding: 3mm; font-style: italic; }
footer { margin-top: 3mm; border-top: 1px solid #000; font-size: 8.5pt; padding-top: 1mm; }
@media print { .page { width: auto; padding: 0; } }
"""


def _data_uri(pic: Picture) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(pic.jpeg()).decode("ascii")


def render_html(report: Report) -> str:
    e = html.escape
    parts = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>HER2 report: {e(report.slide)}</title>',
             f"<style>{_CSS}</style></head><body><div class=\"page\">",
             f"<h1>HER2 IHC slide report: {e(report.slide)}</h1>",
             f'<div class="use" id="intended-use">{e(INTENDED_USE)}</div>',
             f'<div class="call" id="call"><div class="score">HER2 {e(report.score)}</div><div>'
             f'<div class="category">{e(report.category)}</div><div>{e(_confidence_text(report))}</div>'
             + (f'<div class="reason">Reason: {e(report.reason)}</div>' if report.reason else "") + "</div></div>",
             '<div class="cols"><div class="left">',
             "<h2>What decided the call</h2>",
             '<table id="deciding"><tr><th>step</th><th>share</th><th>cut-point</th><th>passed</th></tr>']
    for step, share, cut, passed in report.deciding:
        parts.append(f'<tr><td>{e(step)}</td><td class="num">{e(share)}</td><td class="num">{e(cut)}</td><td>{e(passed)}</td></tr>')
    parts.append(f'</table><p class="note">{e(report.deciding_note)}</p>')
    for heading, rows in report.sections:
        parts.append(f'<h2>{e(heading)}</h2><table class="kv">')
        parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows]
        parts.append("</table>")
    parts.append('</div><div class="right">')
    for i, pic in enumerate(report.pictures):
        if pic.image is not None:
            parts.append(f'<figure id="picture-{i}"><img alt="{e(pic.title)}" src="{_data_uri(pic)}">'
                         f"<figcaption>{e(pic.title)}</figcaption></figure>")
        else:
            parts.append(f'<figure id="picture-{i}"><div class="missing" role="note">Picture not shown. {e(pic.problem or "")}'
                         "</div></figure>")
    parts.append("</div></div><footer>" + "<br>".join(e(line) for line in report.footer) + "</footer></div></body></html>\n")
    return "".join(parts)


# --- PDF ----------------------------------------------------------------------------------------
_LATIN1 = str.maketrans({"≥": ">=", "≤": "<=", "–": "-", "—": "-", "…": "...", "’": "'", "‘": "'", "“": '"', "”": '"'})


def _latin1(text: str) -> str:
    """fpdf2's built-in Helvetica is Latin-1: the few other characters the report uses, spelled out."""
    return str(text).translate(_LATIN1).encode("latin-1", "replace").decode("latin-1")


def render_pdf(report: Report) -> bytes:
    """The report as a one-page A4 PDF (fpdf2, Helvetica)."""
    from fpdf import FPDF

    pdf = FPDF(orientation="P", unit="mm", format="A4")
    pdf.set_auto_page_break(False)
    pdf.set_margins(12, 10, 12)
    pdf.add_page()
    pdf.set_title(_latin1(f"HER2 report: {report.slide}"))
    pdf.set_creator("wsi-her2")
    # A fixed creation date (the Unix epoch, as reproducible builds use): the same result gives the same
    # bytes, so a rebuilt report matches the SHA-256 recorded in <id>.json.
    pdf.set_creation_date(datetime(1970, 1, 1, tzinfo=timezone.utc))
    width = pdf.w - 24
    pdf.set_font("Helvetica", "B", 14)
    pdf.multi_cell(width, 6.5, _latin1(f"HER2 IHC slide report: {report.slide}"), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(1)
    pdf.set_font("Helvetica", "B", 9.5)
    pdf.multi_cell(width, 5.5, _latin1(INTENDED_USE), border=1, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)
    # the call, in a heavy box
    y0 = pdf.get_y()
    pdf.set_line_width(0.6)
    pdf.set_xy(14, y0 + 2)
    pdf.set_font("Helvetica", "B", 22)
    pdf.cell(40, 10, _latin1(f"HER2 {report.score}"))
    pdf.set_xy(60, y0 + 2)
    pdf.set_font("Helvetica", "B", 11)
    pdf.multi_cell(width - 50, 5, _latin1(report.category), new_x="LMARGIN", new_y="NEXT")
    pdf.set_x(60)
    pdf.set_font("Helvetica", "", 9)
    text = _confidence_text(report)
    pdf.multi_cell(width - 50, 4.5, _latin1(text + (f"\nReason: {report.reason}" if report.reason else "")),
                   new_x="LMARGIN", new_y="NEXT")
    y1 = max(pdf.get_y(), y0 + 14) + 2
    pdf.rect(12, y0, width, y1 - y0)
    pdf.set_line_width(0.2)
    # left column: tables; right column: pictures
    left_w, right_x = 104.0, 12 + 104.0 + 5
    right_w = pdf.w - 12 - right_x
    pdf.set_y(y1 + 2)
    _pdf_heading(pdf, "What decided the call", left_w)
    _pdf_table(pdf, [("step", "share", "cut-point", "passed"), *report.deciding], (54, 18, 20, 12), header=True)
    pdf.set_font("Helvetica", "I", 7.5)
    pdf.multi_cell(left_w, 3.6, _latin1(report.deciding_note), new_x="LMARGIN", new_y="NEXT")
    for heading, rows in report.sections:
        _pdf_heading(pdf, heading, left_w)
        _pdf_table(pdf, rows, (30, left_w - 30))
    y_left = pdf.get_y()
    y = y1 + 2
    picture_h = 92.0 if len(report.pictures) < 2 else 100.0
    for pic in report.pictures:
        y = _pdf_picture(pdf, pic, right_x, y, right_w, picture_h) + 3
    pdf.set_y(max(y_left, y) + 3)
    pdf.line(12, pdf.get_y(), 12 + width, pdf.get_y())
    pdf.ln(1)
    pdf.set_font("Helvetica", "", 8)
    for line in report.footer:
        pdf.multi_cell(width, 4, _latin1(line), new_x="LMARGIN", new_y="NEXT")
    if pdf.get_y() > pdf.h - 5:
        log.warning("%s: the report runs past the page's foot", report.slide)
    return bytes(pdf.output())


def _pdf_heading(pdf, text: str, w: float) -> None:
    pdf.ln(1.5)
    pdf.set_font("Helvetica", "B", 10)
    pdf.cell(w, 5, _latin1(text), border="B", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(0.8)


def _pdf_table(pdf, rows, widths, *, header: bool = False) -> None:
    """Ruled rows; cells wrap, each row as tall as its tallest cell."""
    line_h = 4.0
    for i, row in enumerate(rows):
        bold_first = header and i == 0
        texts = [_latin1(str(v)) for v in row]
        heights = []
        for text, w in zip(texts, widths):
            pdf.set_font("Helvetica", "B" if bold_first else "", 8.5)
            heights.append(len(pdf.multi_cell(w, line_h, text, dry_run=True, output="LINES")) * line_h)
        h = max(heights)
        x, y = pdf.l_margin, pdf.get_y()
        for j, (text, w) in enumerate(zip(texts, widths)):
            shaded = bold_first or (not header and j == 0)
            pdf.set_fill_color(230, 230, 230)
            pdf.rect(x, y, w, h, style="DF" if shaded else "D")
            pdf.set_font("Helvetica", "B" if bold_first or (not header and j == 0) else "", 8.5)
            pdf.set_xy(x, y)
            pdf.multi_cell(w, line_h, text, align="R" if header and not bold_first and j in (1, 2) else "L")
            x += w
        pdf.set_xy(pdf.l_margin, y + h)


def _pdf_picture(pdf, pic: Picture, x: float, y: float, w: float, max_h: float) -> float:
    """Draw ``pic`` at (x, y) in a box ``w`` wide; the y below it and its caption."""
    if pic.image is not None:
        iw, ih = pic.image.size
        h = min(max_h, w * ih / iw)
        draw_w = h * iw / ih
        pdf.image(io.BytesIO(pic.jpeg()), x=x + (w - draw_w) / 2, y=y, w=draw_w, h=h)
        pdf.rect(x + (w - draw_w) / 2, y, draw_w, h)
        pdf.set_xy(x, y + h + 0.5)
        pdf.set_font("Helvetica", "", 7.5)
        pdf.multi_cell(w, 3.5, _latin1(pic.title), new_x="LEFT", new_y="NEXT")
        return pdf.get_y()
    pdf.set_xy(x, y)
    pdf.set_font("Helvetica", "I", 8.5)
    pdf.set_dash_pattern(dash=1, gap=1)
    pdf.multi_cell(w, 4, _latin1(f"Picture not shown. {pic.problem}"), border=1, padding=2, new_x="LEFT", new_y="NEXT")
    pdf.set_dash_pattern()
    return pdf.get_y()


# --- files --------------------------------------------------------------------------------------
def write_slide_report(out: str | Path, result: SlideResult, *, qc_png: str | Path | None = None) -> dict[str, str]:
    """Write ``<id>.report.html`` and ``<id>.report.pdf`` into ``out``; their paths by output name."""
    out = Path(out)
    report = build_report(result, qc_png=qc_png)
    sid = report.slide
    html_path = atomic_write_text(out / f"{sid}.report.html", render_html(report))
    pdf_path = atomic_write_bytes(out / f"{sid}.report.pdf", render_pdf(report))
    return {"report_html": str(html_path), "report_pdf": str(pdf_path)}
