"""What a slide is on disk, for store identity: its files, their size and time, their SHA-256.

A slide is one file (SVS, TIFF, NDPI, ...: the file's own SHA-256), or a DICOM slide: its
series' ``.dcm`` files (see :mod:`wsi_her2.slide.dicom` for the digest over them). The quick
check (``slide_stat``: total bytes, newest modification time) decides whether a complete store
may be reused without hashing the slide again.
"""
from __future__ import annotations

from pathlib import Path

from wsi_her2.digests import sha256_file


def _dicom_files(path: Path) -> tuple[Path, ...] | None:
    from wsi_her2.slide.dicom import dicom_slide, is_dicom_input

    return dicom_slide(path).files if is_dicom_input(path) else None


def slide_files(path: str | Path) -> tuple[Path, ...]:
    """The files whose bytes are the slide: the file itself, or a DICOM slide's series."""
    path = Path(path)
    return _dicom_files(path) or (path,)


def slide_stat(path: str | Path) -> tuple[int, int]:
    """(total bytes, newest modification time in ns) of the slide's files."""
    stats = [p.stat() for p in slide_files(path)]
    return sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)


def slide_sha256(path: str | Path) -> str:
    """The slide's digest: the file's SHA-256, or a DICOM slide's digest over its series' files."""
    from wsi_her2.slide.dicom import series_sha256

    path = Path(path)
    files = _dicom_files(path)
    return series_sha256(files) if files else sha256_file(path)
