"""``wsi-her2 app``: a local web page that tiles and scores one slide and shows the results.

The page (Gradio, imported only here and only when the app starts) takes an uploaded slide, a
plain image with its pixel size, or the bundled demo slide, and runs the same library calls as
``wsi-her2 tile`` and ``wsi-her2 score``. Each run writes into its own folder under the work
directory. Errors a user can cause are shown as the same one line the command line prints.

:func:`analyse` and :func:`handle_run` hold the logic and need no Gradio, so they are testable
without a browser; :func:`build_app` wires them to the page and :func:`serve` starts it.
"""
from __future__ import annotations

import html
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from wsi_her2.errors import ConfigError, MppMissingError, SlideOpenError, WsiHer2Error
from wsi_her2.result import SlideResult

log = logging.getLogger(__name__)

#: plain raster images: tiled only with a pixel size the user types in
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
#: per-tile table columns shown on the page (those present), in this order
TABLE_COLUMNS = ("tile", "x_level0", "y_level0", "qc_pass", "qc_reason", "call", "p_0", "p_1+", "p_2+", "p_3+",
                 "tumour_cell_count", "dab_od_membrane", "her2_index")
TABLE_ROWS = 500
DEMO_SLIDE_NAME = "demo-her2-ihc.svs"  # the name `wsi-her2 demo` gives it
#: the most a .zip upload (a DICOM slide's folder) may unzip to, in bytes (8 GiB): checked against the members'
#: declared sizes before extracting and against the bytes while extracting, so a zip bomb cannot fill the disk
MAX_UNZIPPED_BYTES = 8 * 2**30

Progress = Callable[..., Any]  # gr.Progress or anything called as progress(fraction, desc=...)


@dataclass
class AppSettings:
    work_dir: Path
    max_upload_mb: float = 2048.0
    workers: int | None = None


@dataclass
class RunResult:
    """What one run produced: the slide's result (the call, the tumour numbers, the files written) and the tiling's."""

    run_dir: Path
    result: SlideResult
    store: Path
    qc_png: Path
    n_tiles: int
    n_passed: int
    downloads: list[str] = field(default_factory=list)

    @property
    def json_path(self) -> Path:
        return self.run_dir / f"{self.result.slide_id}.json"


def _no_progress(*_args: Any, **_kwargs: Any) -> None:
    return None


def check_upload_size(path: Path, max_upload_mb: float) -> None:
    size_mb = path.stat().st_size / 2**20
    if size_mb > max_upload_mb:
        raise ConfigError(
            f"{path.name}: {size_mb:.0f} MB is over this app's upload limit of {max_upload_mb:.0f} MB; tile and score it "
            "with `wsi-her2 tile` and `wsi-her2 score`, or restart the app with a larger --max-upload-mb"
        )


def image_to_slide(image: Path, out_dir: Path, mpp_um: float | None) -> Path:
    """Write a plain image (JPEG, PNG, ...) as an Aperio-like slide carrying its pixel size."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if mpp_um is None:
        raise MppMissingError(
            f"{image.name}: a plain image has no pixel size (MPP); enter its µm per pixel at full resolution "
            "(e.g. 0.25 for a 40x scan, 0.5 for 20x) in the µm/px field"
        )
    try:
        with Image.open(image) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
        raise SlideOpenError(f"{image.name}: cannot read as an image ({exc}); upload a JPEG/PNG or a slide file") from exc
    from wsi_her2.synthetic.image_slide import write_image_slide

    return write_image_slide(rgb, out_dir / f"{image.stem}.svs", mpp_um=mpp_um)


def _slide_for_run(run_dir: Path, upload: Path | None, mpp_um: float | None, *, demo: bool,
                   max_upload_mb: float) -> tuple[Path, float | None]:
    """The slide file to tile and the level-0 µm/px override (``None``: read it from the slide)."""
    if demo:
        from wsi_her2.synthetic.slides import demo_spec, write_synthetic_slide

        return write_synthetic_slide(run_dir / DEMO_SLIDE_NAME, demo_spec()), None
    if upload is None:
        raise ConfigError("no file uploaded; choose a slide or an image, or run the demo slide")
    if not upload.is_file():
        raise SlideOpenError(f"{upload.name}: the upload did not arrive; upload it again")
    check_upload_size(upload, max_upload_mb)
    if upload.suffix.lower() == ".mrxs":
        raise SlideOpenError(f"{upload.name}: an MRXS slide is a file plus its data folder and cannot be uploaded as one "
                             "file; tile and score it with `wsi-her2 tile` and `wsi-her2 score`")
    if upload.suffix.lower() in IMAGE_SUFFIXES:
        return image_to_slide(upload, run_dir, mpp_um), None  # the TIFF carries the pixel size
    if upload.suffix.lower() == ".zip":
        return unzip_dicom_slide(upload, run_dir / "dicom"), mpp_um
    return upload, mpp_um


def unzip_dicom_slide(archive: Path, folder: Path) -> Path:
    """A DICOM slide uploaded as a .zip of its folder: its files extracted flat into ``folder``, keeping those
    :func:`~wsi_her2.slide.dicom.dicom_files` takes for DICOM (``.dcm``, or the DICM preamble with no extension)."""
    import zipfile

    from wsi_her2.slide.dicom import dicom_files

    try:
        with zipfile.ZipFile(archive) as zf:
            members = _zip_members(archive, zf)
            folder.mkdir(parents=True, exist_ok=True)
            try:
                _extract_flat(archive, zf, members, folder)
            except SlideOpenError:
                shutil.rmtree(folder, ignore_errors=True)  # what came out before the cap stopped it is no slide
                raise
    except zipfile.BadZipFile as exc:
        raise SlideOpenError(f"{archive.name}: not a readable .zip ({exc}); zip the DICOM slide's folder again") from exc
    slide_files = set(dicom_files(folder))
    for extracted in folder.iterdir():  # the folder is the slide: notes and viewers zipped along are dropped
        if extracted not in slide_files:
            extracted.unlink()
    if not slide_files:
        raise SlideOpenError(f"{archive.name}: the .zip holds no DICOM files (.dcm, or with the DICM preamble); "
                             "zip a DICOM slide's folder")
    return folder


def _zip_members(archive: Path, zf) -> list:
    """The files to extract: every non-hidden file, each base name once, their declared sizes within the cap."""
    members = [m for m in zf.infolist() if not m.is_dir() and not Path(m.filename).name.startswith(".")]
    seen: dict[str, str] = {}
    for m in members:
        name = Path(m.filename).name
        if name in seen:
            raise SlideOpenError(f"{archive.name}: {seen[name]} and {m.filename} have the same file name and would "
                                 "overwrite each other; zip one DICOM slide's folder at a time")
        seen[name] = m.filename
    if sum(m.file_size for m in members) > MAX_UNZIPPED_BYTES:
        raise SlideOpenError(_too_large(archive))
    return members


def _extract_flat(archive: Path, zf, members: list, folder: Path) -> None:
    """Copy ``members`` into ``folder`` by base name (no path in the archive can point outside it), counting the
    bytes as they come: a member's declared size is the archive's word, not a promise."""
    written = 0
    for m in members:
        with zf.open(m) as src, (folder / Path(m.filename).name).open("wb") as dst:
            while block := src.read(1 << 20):
                written += len(block)
                if written > MAX_UNZIPPED_BYTES:
                    raise SlideOpenError(_too_large(archive))
                dst.write(block)


def _too_large(archive: Path) -> str:
    return (f"{archive.name}: unzipped it would be over this app's limit of {MAX_UNZIPPED_BYTES / 2**30:.0f} GiB; "
            "tile and score the slide's folder with `wsi-her2 tile` and `wsi-her2 score`")


def analyse(settings: AppSettings, upload: Path | None, mpp_um: float | None = None, *, demo: bool = False,
            progress: Progress = _no_progress) -> RunResult:
    """Tile and score one upload (or the demo slide) into a fresh folder under the work directory."""
    from wsi_her2.score.pipeline import ScoreConfig, score_store
    from wsi_her2.tile.pipeline import TileConfig, default_workers, tile_slide

    settings.work_dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=settings.work_dir))
    progress(0.0, desc="Preparing the slide")
    slide, slide_mpp_um = _slide_for_run(run_dir, upload, mpp_um, demo=demo, max_upload_mb=settings.max_upload_mb)
    progress(0.05, desc="Tiling")
    tile_cfg = TileConfig(workers=settings.workers or default_workers(), slide_mpp_um=slide_mpp_um, progress=True)
    tiled = tile_slide(slide, run_dir, config=tile_cfg)
    progress(0.3, desc="Scoring")
    result = score_store(tiled.store, config=ScoreConfig(progress=True))
    progress(1.0, desc="Done")
    run = RunResult(run_dir, result, Path(tiled.store), run_dir / f"{result.slide_id}.qc.png", tiled.n_tiles, tiled.n_passed)
    # the report's HTML is shown on the page itself (Gradio does not offer .html files for download)
    run.downloads = [result.outputs[k] for k in ("report_pdf", "geojson", "tiles_parquet") if k in result.outputs]
    run.downloads.append(str(run.json_path))
    return run


def call_markdown(res: RunResult) -> str:
    """The call as the page shows it: score, category, confidence, tumour cells and area, tiles."""
    c, tumour = res.result.call, res.result.tumour
    lines = [f"## HER2 {c.her2_score}", f"**{c.her2_category_text or c.her2_category}**", ""]
    facts = [f"confidence {float(c.confidence):.2f}"]
    if tumour is not None:
        facts.append(f"{tumour.cells:,} tumour cells over {tumour.area_mm2:.2f} mm²")
    facts.append(f"{res.result.tiles_used} of {res.n_tiles} tiles scored ({res.n_passed} passed QC)")
    lines.append(" · ".join(facts))
    if c.class_fractions:
        lines += ["", "Class fractions: " + ", ".join(f"{k}: {float(v):.2f}" for k, v in c.class_fractions.items())]
    lines += ["", f"Slide `{res.result.slide_id}`; outputs in `{res.run_dir}`"]
    return "\n".join(lines)


def tile_table(res: RunResult, *, max_rows: int = TABLE_ROWS):
    """The first ``max_rows`` tiles with the key columns (from the result and its store), floats rounded for reading."""
    import pandas as pd

    from wsi_her2.outputs.tables import tile_columns
    from wsi_her2.store.patch_store import open_store

    columns = tile_columns(open_store(res.store), res.result.tiles)
    head = pd.DataFrame({c: list(columns[c][:max_rows]) for c in TABLE_COLUMNS if c in columns})
    floats = head.select_dtypes("floating").columns
    return head.astype({c: "float64" for c in floats}).round(3)  # float32 would show 0.9769999980926514


def parse_mpp(text: str | float | None) -> float | None:
    """The µm/px field: empty means "read it from the slide"; anything else must be a positive number."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    try:
        value = float(str(text).strip().replace(",", "."))
    except ValueError:
        raise ConfigError(f"µm/px {text!r} is not a number; enter e.g. 0.25 or leave it empty") from None
    if not value > 0:
        raise ConfigError(f"µm/px must be positive, got {text!r}")
    return value


def error_html(message: str) -> str:
    return (f'<div class="wsi-her2-error" role="alert" style="border:1px solid #b00020;background:#fdecea;'
            f'color:#7a0014;padding:10px 14px;border-radius:6px">Error: {html.escape(message)}</div>')


#: the page's outputs, in the order :func:`handle_run` returns them
OUTPUT_NAMES = ("call", "error", "heatmap", "qc", "table", "downloads", "report")


def handle_run(settings: AppSettings, upload: str | Path | None, mpp_um: str | float | None, *, demo: bool = False,
               progress: Progress = _no_progress) -> tuple:
    """Run :func:`analyse` and turn its result, or the error, into the page's outputs (:data:`OUTPUT_NAMES`).

    A :class:`WsiHer2Error` is shown as its one line, as the CLI prints it for the file in its own folder (the
    server's copy of the upload is named by its file name); nothing is ever a traceback.
    """
    path = Path(upload) if upload else None
    try:
        res = analyse(settings, path, parse_mpp(mpp_um), demo=demo, progress=progress)
    except WsiHer2Error as exc:  # the upload's own name, not the server's copy of it, as `wsi-her2 tile NAME` prints it
        message = str(exc).replace(str(path), path.name) if path else str(exc)
        return "", error_html(message), None, None, None, None, ""
    except OSError as exc:  # e.g. a full disk: one line, as the CLI prints it
        name = path.name if path else "demo slide"
        return "", error_html(f"{name}: {exc}"), None, None, None, None, ""
    except Exception as exc:  # a bug: the traceback goes to the server log, not the page
        log.exception("wsi-her2 app: run failed")
        return "", error_html(f"internal error ({type(exc).__name__}: {exc}); see the server log"), None, None, None, None, ""
    outputs = res.result.outputs
    return (call_markdown(res), "", outputs.get("heatmap_png"), str(res.qc_png) if res.qc_png.is_file() else None,
            tile_table(res), res.downloads, report_html(res))


def report_html(res: RunResult) -> str:
    """The slide report shown on the page: the report itself in a frame (it is self-contained HTML)."""
    path = res.result.outputs.get("report_html")
    if not path or not Path(path).is_file():
        return ""
    doc = html.escape(Path(path).read_text(encoding="utf-8"), quote=True)
    return (f'<iframe id="report-frame" title="slide report" srcdoc="{doc}" '
            'style="width:100%;height:1180px;border:1px solid #888;background:#fff"></iframe>')


INTRO = """# wsi-her2: HER2 IHC scoring of one slide
Upload a whole-slide image (SVS, TIFF, NDPI, a DICOM slide as one .dcm file or a .zip of its folder, ...) or a
plain image (JPEG/PNG, with its µm per pixel), or run the bundled synthetic demo slide (planted call HER2 2+).
Everything runs on this computer."""


def build_app(settings: AppSettings):
    """The Gradio page (a ``gr.Blocks``); nothing is started."""
    from wsi_her2.optional import require

    gr = require("gradio", purpose="wsi-her2 app")
    with gr.Blocks(title="wsi-her2", analytics_enabled=False) as page:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.File(label="Slide or image", type="filepath", elem_id="upload")
                mpp = gr.Textbox(label="µm/px at full resolution: needed for JPEG/PNG; for a slide, overrides its own",
                                 placeholder="e.g. 0.25 (40x) or 0.5 (20x); empty: read it from the slide", elem_id="mpp")
            with gr.Column(scale=1):
                run_btn = gr.Button("Tile and score the upload", variant="primary", elem_id="run-upload")
                demo_btn = gr.Button("Run the demo slide", elem_id="run-demo")
        error = gr.HTML(elem_id="error")
        call = gr.Markdown(elem_id="call")
        with gr.Row():  # no label badge: it would cover the pictures' own titles
            heatmap = gr.Image(show_label=False, type="filepath", interactive=False, elem_id="heatmap")
            qc = gr.Image(show_label=False, type="filepath", interactive=False, elem_id="qc")
        table = gr.Dataframe(label=f"Tiles (first {TABLE_ROWS})", interactive=False, elem_id="tiles")
        downloads = gr.File(label="Downloads: slide report (PDF), QuPath GeoJSON, per-tile parquet, result JSON",
                            file_count="multiple", interactive=False, elem_id="downloads")
        with gr.Accordion("Slide report (one A4 page: print it or download the PDF above)", open=True):
            report = gr.HTML(elem_id="report")
        outputs = [call, error, heatmap, qc, table, downloads, report]

        def run_upload(file, mpp_um, progress=gr.Progress(track_tqdm=True)):
            return handle_run(settings, file, mpp_um, progress=progress)

        def run_demo(progress=gr.Progress(track_tqdm=True)):
            return handle_run(settings, None, None, demo=True, progress=progress)

        run_btn.click(run_upload, inputs=[upload, mpp], outputs=outputs)
        demo_btn.click(run_demo, inputs=None, outputs=outputs)
    return page


def serve(settings: AppSettings, *, host: str = "127.0.0.1", port: int = 7860, open_browser: bool = True,
          block: bool = True):
    """Start the page on ``host:port``; with ``block`` return only when the server stops."""
    page = build_app(settings)
    page.queue(default_concurrency_limit=1)  # one slide at a time: tiling and scoring use every core
    page.launch(server_name=host, server_port=port, inbrowser=open_browser, prevent_thread_lock=not block,
                max_file_size=f"{settings.max_upload_mb:.0f}mb", allowed_paths=[str(settings.work_dir)], quiet=True)
    return page
