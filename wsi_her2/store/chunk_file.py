"""One chunk file of a patch store: its CRC32C (zarr's ``crc32c`` codec) and, for the JPEG tile
codec, its pixels.

No zarr here (numpy, imagecodecs and google-crc32c only): the scoring worker processes of
:mod:`wsi_her2.score.cpu_pool` read chunk files with this module alone and start in ~0.1 s.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray

__all__ = ["append_crc32c", "crc32c_ok", "crc32c_value", "decode_jpeg_chunk", "failure_text"]


def crc32c_value(data: bytes) -> int:
    import google_crc32c

    return int(google_crc32c.value(data))


def append_crc32c(data: bytes) -> bytes:
    """What zarr's ``crc32c`` codec writes: the data, then its CRC32C as 4 little-endian bytes."""
    return bytes(data) + crc32c_value(data).to_bytes(4, "little")


def crc32c_ok(chunk: bytes) -> bool:
    """True when a chunk file's trailing 4 bytes are the CRC32C of the rest."""
    return len(chunk) >= 4 and crc32c_value(chunk[:-4]) == int.from_bytes(chunk[-4:], "little")


def decode_jpeg_chunk(path: Path, out: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Decode the JPEG chunk file ``path`` (one JPEG of the chunk's tiles stacked, then its CRC32C)
    into ``out``, a C-contiguous ``(tiles, H, W, 3)`` uint8 array, checking the checksum as zarr does.

    Raises OSError (missing file), ValueError (checksum mismatch) or the decoder's error (a JPEG
    that does not decode to ``out``'s shape).
    """
    import imagecodecs

    n, h, w, c = out.shape
    data = Path(path).read_bytes()
    if not crc32c_ok(data):
        raise ValueError("the chunk fails its CRC32C checksum (truncated or overwritten)")
    imagecodecs.jpeg8_decode(memoryview(data)[:-4], out=out.reshape(n * h, w, c))
    return out


def failure_text(exc: BaseException) -> str:
    """``"Type: first line"`` of an exception, at most 200 characters of it (for one-line errors)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return f"{type(exc).__name__}: {text}"
