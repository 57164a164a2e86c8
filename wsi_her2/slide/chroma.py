"""How sharp a slide level's colour is: the chroma subsampling of its JPEG tiles.

Scanners store most pyramid levels as YCbCr JPEG with 4:2:0 subsampling: brightness at full
resolution, colour (Cb, Cr) averaged over 2 x 2 pixels and further thinned by JPEG's coarser
chroma quantisation. For HER2 that matters: a 1 µm membrane keeps its darkness but loses its
brown hue when a pixel is as wide as the membrane, so a 1.0 µm/px level of a 0.25 µm/px scan
reads an intense (OD 1.2) membrane as weak-moderate (measured with
:mod:`wsi_her2.synthetic.membranes`: 0.65 instead of >= 1.2). The tile stage therefore prefers a
level whose *colour* is at least as sharp as the target resolution (:func:`level_chroma_factors`
feeds :func:`wsi_her2.tile.geometry.choose_geometry`).

Read from the first tile's JPEG frame header (SOF sampling factors) of each TIFF page, with
tifffile; 1 (full colour) for anything that is not a YCbCr JPEG TIFF or cannot be read.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["jpeg_chroma_factor", "level_chroma_factors"]

#: JPEG start-of-frame markers (baseline, extended, progressive, lossless).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3}


def jpeg_chroma_factor(data: bytes) -> int:
    """How many luma pixels one chroma sample spans (1: 4:4:4 or grey; 2: 4:2:0 / 4:2:2), from a JPEG's frame header."""
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
            return 1
        i += 2 + length
    return 1


def level_chroma_factors(path: str | Path, n_levels: int) -> list[int]:
    """Chroma subsampling factor of each of the slide's ``n_levels`` levels (1 where unknown or full colour)."""
    out = [1] * n_levels
    try:
        import tifffile

        with tifffile.TiffFile(str(path)) as tif:
            levels = tif.series[0].levels if tif.series else []
            for k, lvl in enumerate(levels[:n_levels]):
                page = lvl.keyframe
                if int(getattr(page, "compression", 0)) != 7 or int(getattr(page, "photometric", 0)) != 6:
                    continue  # not a YCbCr JPEG page (Aperio "RGB" JPEG keeps full colour)
                offsets = [o for o, c in zip(page.dataoffsets, page.databytecounts) if c > 0]
                if not offsets:
                    continue
                tif.filehandle.seek(offsets[0])
                out[k] = jpeg_chroma_factor(tif.filehandle.read(min(4096, page.databytecounts[0])))
    except Exception as exc:  # not a TIFF (MRXS, DICOM, ...), or unreadable headers: assume full colour
        log.debug("%s: chroma subsampling not read (%s); assuming full colour", Path(path).name, exc)
    return out
