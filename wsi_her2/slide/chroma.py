"""How sharp a slide level's colour is: the chroma subsampling of its JPEG tiles.

Scanners store most pyramid levels as YCbCr JPEG with 4:2:0 subsampling: brightness at full
resolution, colour (Cb, Cr) averaged over 2 x 2 pixels and further thinned by JPEG's coarser
chroma quantisation. For HER2 that matters: a 1 µm membrane keeps its darkness but loses its
brown hue when a pixel is as wide as the membrane, so a 1.0 µm/px level of a 0.25 µm/px scan
reads an intense (OD 1.2) membrane as weak-moderate (measured with
:mod:`wsi_her2.synthetic.membranes`: 0.65 instead of >= 1.2). The tile stage therefore prefers a
level whose *colour* is at least as sharp as the target resolution (:func:`level_chroma_factors`
feeds :func:`wsi_her2.tile.geometry.choose_geometry`).

Read from the JPEG frame header (SOF sampling factors) of the first non-empty tile of each TIFF
page (tifffile), or of the first frame of each DICOM level (else from its PhotometricInterpretation).
1 (full colour) for TIFF pages that are not YCbCr JPEG; ``None`` (unknown) where nothing says, e.g.
a format neither reads (MRXS) or a level the reader lists but the file does not at that size.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from wsi_her2.slide.dicom import JPEG_TRANSFER_SYNTAXES, VolumeFrames, dicom_slide, is_dicom_input, volume_frames

log = logging.getLogger(__name__)

__all__ = ["jpeg_chroma_factor", "level_chroma_factors"]

#: JPEG start-of-frame markers (baseline, extended, progressive, lossless).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3}
#: bytes read from the start of a tile or frame: its headers (tables and frame header) come first
_HEADER_BYTES = 4096
#: DICOM colour spaces -> luma pixels per chroma sample (PS3.3 C.7.6.3.1.2): what a frame without a readable
#: JPEG frame header (JPEG 2000, native pixels) is taken to hold
_DICOM_PHOTOMETRIC_FACTOR = {"RGB": 1, "YBR_FULL": 1, "YBR_ICT": 1, "YBR_RCT": 1, "MONOCHROME1": 1, "MONOCHROME2": 1,
                             "YBR_FULL_422": 2, "YBR_PARTIAL_422": 2, "YBR_PARTIAL_420": 2}


def jpeg_chroma_factor(data: bytes) -> int | None:
    """How many luma pixels one chroma sample spans (1: 4:4:4 or grey; 2: 4:2:0 / 4:2:2), from a JPEG's frame
    header; ``None`` when ``data`` holds no frame header."""
    i = 2 if data[:2] == b"\xff\xd8" else 0
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            i += 2 if marker != 0xFF else 1
            continue
        length = int.from_bytes(data[i + 2: i + 4], "big")
        if marker in _SOF:
            k = data[i + 9] if i + 9 < n else 0
            comps = [data[i + 10 + 3 * j + 1] for j in range(k) if i + 12 + 3 * j <= n]
            if len(comps) < 3:
                return 1
            h = [c >> 4 for c in comps]
            v = [c & 15 for c in comps]
            return max(1, max(h[0] // max(1, min(h[1:])), v[0] // max(1, min(v[1:]))))
        if marker == 0xDA:  # start of scan before any frame header: not a frame we can read
            return None
        i += 2 + length
    return None


def level_chroma_factors(path: str | Path, levels: int | Sequence[tuple[int, int]]) -> list[int | None]:
    """Chroma subsampling factor of each level of the slide at ``path`` (1: full colour, None: unknown).

    ``levels``: the reader's level sizes (width, height), matched to the file's levels by size, since
    the file may list its levels otherwise than the reader does; or only their number, matched by position.
    """
    sizes = None if isinstance(levels, int) else [(int(w), int(h)) for w, h in levels]
    n_levels = levels if sizes is None else len(sizes)
    try:
        found = _dicom_levels(path) if is_dicom_input(Path(path)) else _tiff_levels(path)
    except Exception as exc:  # not a TIFF nor DICOM (MRXS, ...), or unreadable headers: nothing says
        log.debug("%s: chroma subsampling not read (%s); unknown", Path(path).name, exc)
        return [None] * n_levels
    if sizes is None:
        factors = [factor for _, factor in found[:n_levels]]
        return factors + [None] * (n_levels - len(factors))
    by_size: dict[tuple[int, int], int | None] = {}
    for size, factor in found:
        by_size.setdefault(size, factor)
    return [by_size.get(size) for size in sizes]


def _tiff_levels(path: str | Path) -> list[tuple[tuple[int, int], int | None]]:
    """(size, factor) of each level of the TIFF's first series."""
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        levels = tif.series[0].levels if tif.series else []
        return [((int(lvl.keyframe.imagewidth), int(lvl.keyframe.imagelength)), _tiff_page_factor(tif, lvl.keyframe))
                for lvl in levels]


def _tiff_page_factor(tif, page) -> int | None:
    if int(getattr(page, "compression", 0)) != 7 or int(getattr(page, "photometric", 0)) != 6:
        return 1  # not a YCbCr JPEG page (Aperio "RGB" JPEG, lossless codecs): full colour
    # a tile never written (byte count 0) holds no header: the first written one does
    first = next((k for k, count in enumerate(page.databytecounts) if count > 0), None)
    if first is None:
        return None
    tif.filehandle.seek(page.dataoffsets[first])
    return jpeg_chroma_factor(tif.filehandle.read(min(_HEADER_BYTES, page.databytecounts[first])))


def _dicom_levels(path: str | Path) -> list[tuple[tuple[int, int], int | None]]:
    """(size, factor) of each VOLUME file of the DICOM slide at ``path``, largest first."""
    frames = sorted(volume_frames(dicom_slide(path), max_bytes=_HEADER_BYTES), key=lambda v: -v.size_px[0])
    return [(v.size_px, _dicom_frame_factor(v)) for v in frames]


def _dicom_frame_factor(frames: VolumeFrames) -> int | None:
    """The JPEG frame header's sampling factors where the frames are JPEG, else what the colour space implies."""
    if frames.transfer_syntax in JPEG_TRANSFER_SYNTAXES and frames.first_frame:
        factor = jpeg_chroma_factor(frames.first_frame)
        if factor is not None:
            return factor
    return _DICOM_PHOTOMETRIC_FACTOR.get(frames.photometric.upper())
