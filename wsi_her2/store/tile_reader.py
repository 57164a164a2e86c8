"""Reading a JPEG patch store's tile chunks straight from their files into caller buffers.

The read twin of :class:`wsi_her2.store.patch_store.TileChunkWriter`: for the store's default
layout (``tiles`` encoded by the ``wsi_her2.jpeg`` codec, then zarr's ``crc32c``), a chunk is one
file holding one JPEG and its CRC32C. Reading it here checks the checksum exactly as zarr does
and decodes the JPEG with the same libjpeg-turbo call, into a buffer the caller owns, so the
pixels are zarr's to the bit (``tests/test_tile_reader.py``), without zarr's per-read machinery
(an asyncio round trip and a fresh output array per chunk) on the scoring loop's threads.
Stores of other codecs are read through zarr (:func:`jpeg_chunk_reader` returns ``None``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_her2.store.chunk_file import decode_jpeg_chunk, failure_text
from wsi_her2.store.codecs import JPEG_CODEC_NAME
from wsi_her2.store.patch_store import PatchStore, TileChunks

__all__ = ["JpegChunkReader", "jpeg_chunk_reader"]


class JpegChunkReader:
    """``read(chunk, out)``: decode chunk ``chunk`` of the store's ``tiles`` into ``out``.

    ``out`` is a C-contiguous ``(chunk_tiles, tile_px, tile_px, 3)`` uint8 array (:meth:`buffer`).
    A chunk that is missing, fails its checksum or does not decode to that shape raises the
    store's :class:`~wsi_her2.errors.StoreError`, as a zarr read of it would.
    """

    def __init__(self, store: PatchStore, chunks: TileChunks | None = None) -> None:
        self._store = store
        self._chunks = chunks or store.tile_chunks()  # given: already read (each read opens tiles/zarr.json)
        self.chunk_shape = self._chunks.shape

    def buffer(self) -> NDArray[np.uint8]:
        """A buffer of one chunk's tiles for :meth:`read`."""
        return np.empty(self.chunk_shape, np.uint8)

    def chunk_path(self, chunk: int) -> Path:
        """The file of chunk ``chunk``."""
        return self._chunks.path(chunk)

    def read(self, chunk: int, out: NDArray[np.uint8]) -> NDArray[np.uint8]:
        if out.shape != self.chunk_shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous {self.chunk_shape} uint8 buffer, got {out.shape} {out.dtype}")
        try:
            return decode_jpeg_chunk(self.chunk_path(chunk), out)
        except Exception as exc:  # missing file, checksum mismatch, undecodable or wrongly sized JPEG
            raise self.unreadable(chunk, failure_text(exc)) from exc

    def unreadable(self, chunk: int, why: str) -> Exception:
        """The store's one-line error for chunk ``chunk`` (its tile range) that could not be read, and ``why``."""
        n = self.chunk_shape[0]
        first, last = chunk * n, min((chunk + 1) * n, int(self._store.n_tiles)) - 1
        return self._store.damaged(f"tiles {first}-{last} unreadable ({why})")

def jpeg_chunk_reader(store: Any) -> JpegChunkReader | None:
    """A :class:`JpegChunkReader` for a patch store of JPEG tiles with checksummed chunks; else ``None``."""
    if not isinstance(store, PatchStore):  # a stand-in store (tests): read through its read_tiles
        return None
    chunks = store.tile_chunks()
    if chunks.codecs != (JPEG_CODEC_NAME, "crc32c") or len(chunks.shape) != 4 or chunks.shape[-1] != 3:
        return None
    return JpegChunkReader(store, chunks)
