"""Open a whole-slide image with one of two backends behind one interface.

``open_slide(path, backend="auto")`` tries tiffslide first for TIFF-family files (.svs, .tif,
.tiff: it decodes their tiles directly, 2-3x faster than OpenSlide's region reads, and also
opens flat, untiled TIFFs that OpenSlide refuses) and OpenSlide first for everything else (the
widest format support: NDPI, MRXS, SCN, VMS, ...), each falling back to the other. A DICOM
slide (its folder of ``.dcm`` files, or one of them) is read through OpenSlide by
:class:`~wsi_her2.slide.dicom.DicomSlideReader`. Every failure becomes one
:class:`SlideOpenError` naming the file and what to do.
"""
from __future__ import annotations

import logging
from pathlib import Path

from wsi_her2.errors import ConfigError, SlideNotFoundError, SlideOpenError
from wsi_her2.slide.base import SlideLevel, SlideReader, short_error

__all__ = ["BACKENDS", "SlideLevel", "SlideReader", "open_slide"]

log = logging.getLogger(__name__)


def _open_openslide(path: Path) -> SlideReader:
    from wsi_her2.slide.openslide_reader import OpenSlideReader

    return OpenSlideReader(path)


def _open_tiffslide(path: Path) -> SlideReader:
    from wsi_her2.slide.tiffslide_reader import TiffSlideReader

    return TiffSlideReader(path)


TIFF_SUFFIXES = (".svs", ".tif", ".tiff")
BACKENDS = {"openslide": _open_openslide, "tiffslide": _open_tiffslide}


def open_slide(path: str | Path, *, backend: str = "auto") -> SlideReader:
    """Open ``path`` with ``backend`` ("auto", "openslide" or "tiffslide").

    Raises
    ------
    SlideNotFoundError
        The path does not exist or is a directory.
    SlideOpenError
        No backend could open it (empty, truncated, corrupt or unsupported file).
    """
    path = Path(path)
    if not path.exists():
        raise SlideNotFoundError(f"{path}: no such file; check the path")
    if backend not in ("auto", *BACKENDS):
        raise ConfigError(f"unknown backend {backend!r}; choose auto, openslide or tiffslide")
    from wsi_her2.slide.dicom import is_dicom_input

    if is_dicom_input(path):
        return _open_dicom(path, backend)
    if path.is_dir():
        raise SlideNotFoundError(f"{path}: is a directory holding no DICOM (.dcm) files; pass the slide file itself, "
                                 "or a DICOM slide's folder")
    if path.stat().st_size == 0:
        raise SlideOpenError(f"{path}: file is empty (0 bytes); re-copy or re-export the slide")
    if backend == "auto":
        tiff_family = path.suffix.lower() in TIFF_SUFFIXES
        order = ["tiffslide", "openslide"] if tiff_family else ["openslide", "tiffslide"]
    else:
        order = [backend]
    reasons = []
    for name in order:
        try:
            reader = _open_checked(BACKENDS[name], path)
        except Exception as exc:  # every backend error means "this backend cannot read it"
            log.debug("%s could not open %s: %s", name, path, exc)
            reasons.append(f"{name}: {short_error(exc)}")
            continue
        log.info("opened %s with %s", path.name, name)
        return reader
    raise SlideOpenError(
        f"{path}: cannot open as a slide ({'; '.join(reasons)}); "
        "check that the file is a complete whole-slide image (SVS, TIFF, NDPI, MRXS, DICOM, ...) or try --backend"
    )


def _open_dicom(path: Path, backend: str) -> SlideReader:
    """A DICOM slide (folder or file) through OpenSlide; header problems are already one-line errors."""
    from wsi_her2.slide.dicom import DicomSlideReader, dicom_slide

    if backend == "tiffslide":
        raise ConfigError(f"{path}: a DICOM slide is read through OpenSlide; use --backend auto or openslide")
    slide = dicom_slide(path)
    try:
        reader = _open_checked(lambda p: DicomSlideReader(p, slide), path)
    except Exception as exc:  # OpenSlide's errors on damaged frames or missing files of the series
        raise SlideOpenError(
            f"{path}: cannot open as a DICOM slide (openslide: {short_error(exc)}); check that every file of the slide "
            "is in its folder and complete (re-copy or re-export it)"
        ) from exc
    log.info("opened DICOM slide %s (%d files) with openslide", slide.slide_id, len(slide.files))
    return reader


def _open_checked(opener, path: Path) -> SlideReader:
    """``opener(path)`` checked readable; closed again when it is not, so a refused slide leaves no handle open."""
    reader = opener(path)
    try:
        _check_readable(reader)
    except BaseException:
        reader.close()
        raise
    return reader


def _check_readable(reader: SlideReader) -> None:
    """Fail at open time, not mid-run, on files whose header parses but whose pixels do not."""
    width, height = reader.dimensions
    if width <= 0 or height <= 0:
        raise ValueError("image has no pixels")
    lvl = len(reader.levels) - 1
    small = reader.levels[lvl]
    reader.read_level_region(lvl, 0, 0, min(small.width_px, 16), min(small.height_px, 16))
