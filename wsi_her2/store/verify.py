"""Check a patch store chunk by chunk before trusting it (``wsi-her2 verify``, and ``score``).

zarr reads a missing chunk as the array's fill value and, without a checksum, decodes a
truncated or overwritten chunk into wrong pixels. This module checks that every array of the
store exists, that every chunk file its shape implies is present, and (schema 2 stores) that
every chunk's trailing CRC32C matches its bytes. It reads raw bytes only: nothing is decoded.
A damaged store is one :class:`~wsi_her2.errors.StoreError` naming the store, what is wrong
and the ``wsi-her2 tile ... --overwrite`` command that rebuilds it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wsi_her2.store.patch_store import ALL_ARRAYS, PatchStore
from wsi_her2.store.codecs import crc32c_ok


@dataclass(frozen=True)
class VerifyReport:
    store: Path
    n_tiles: int
    n_chunks: int
    n_checksummed: int
    n_bytes: int


def verify_store(path: str | Path) -> VerifyReport:
    """Every array, every chunk file, every checksum of the complete store at ``path``; raise if damaged."""
    store = PatchStore.open(path, require_complete=True)
    n_chunks = n_summed = n_bytes = 0
    for name in ALL_ARRAYS:
        keys, summed = store.chunk_keys(name)
        for key in keys:
            chunk = store.path / name / key
            try:
                data = chunk.read_bytes()
            except FileNotFoundError as exc:
                raise store.damaged(f"chunk {name}/{key} is missing") from exc
            if summed and not crc32c_ok(data):
                raise store.damaged(f"chunk {name}/{key} fails its CRC32C checksum (truncated or overwritten)")
            n_chunks += 1
            n_summed += summed
            n_bytes += len(data)
    if not store.units_done().all():
        raise store.damaged("marked complete but not every work unit is done")
    return VerifyReport(store.path, store.n_tiles, n_chunks, n_summed, n_bytes)
