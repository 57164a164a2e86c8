"""Direct JPEG chunk reads (wsi_her2.store.tile_reader) give zarr's pixels, and the loader uses them."""
from __future__ import annotations

import numpy as np
import pytest

from wsi_her2.errors import StoreError
from wsi_her2.score.loader import TileLoader
from wsi_her2.store.patch_store import PatchStore
from wsi_her2.store.tile_reader import jpeg_chunk_reader

N_TILES, TILE_PX, CHUNK_TILES = 10, 16, 4  # three chunks, the last one partly beyond the last tile


def _store(tmp_path, codec: str = "jpeg") -> PatchStore:
    rng = np.random.default_rng(7)
    tiles = rng.integers(0, 256, size=(N_TILES, TILE_PX, TILE_PX, 3), dtype=np.uint8)
    tiles[:, :8] = rng.integers(100, 140, size=3, dtype=np.uint8)  # flat areas as well as noise
    store = PatchStore.create(tmp_path / f"{codec}.zarr", n_tiles=N_TILES, tile_px=TILE_PX, chunk_tiles=CHUNK_TILES,
                              codec=codec, attrs={}, per_tile={}, images={})
    store.write_tiles(0, tiles)
    return store


def test_chunks_decode_to_zarrs_pixels(tmp_path):
    store = _store(tmp_path)
    reader = jpeg_chunk_reader(store)
    assert reader is not None
    buf = reader.buffer()
    for chunk in range(3):
        want = store.read_tiles(chunk * CHUNK_TILES, min((chunk + 1) * CHUNK_TILES, N_TILES))
        got = reader.read(chunk, buf)
        assert np.array_equal(got[: len(want)], want), chunk


def test_the_tile_layout_is_read_once_per_reader(tmp_path, monkeypatch):
    store = _store(tmp_path)
    calls = []
    real = PatchStore.tile_chunks
    monkeypatch.setattr(PatchStore, "tile_chunks", lambda self: calls.append(1) or real(self))
    assert jpeg_chunk_reader(store) is not None
    assert len(calls) == 1  # each call reads tiles/zarr.json


def test_other_codecs_are_left_to_zarr(tmp_path):
    assert jpeg_chunk_reader(_store(tmp_path, "zstd")) is None


def test_a_wrong_buffer_is_refused(tmp_path):
    reader = jpeg_chunk_reader(_store(tmp_path))
    with pytest.raises(ValueError, match="contiguous"):
        reader.read(0, np.empty((2, TILE_PX, TILE_PX, 3), np.uint8))


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_damaged_chunk_is_a_store_error(tmp_path, damage):
    store = _store(tmp_path)
    chunk = store.path / "tiles" / "c" / "1" / "0" / "0" / "0"
    if damage == "flip":
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x10
        chunk.write_bytes(bytes(data))
    else:
        chunk.unlink()
    reader = jpeg_chunk_reader(store)
    reader.read(0, reader.buffer())  # undamaged chunk reads
    with pytest.raises(StoreError, match="damaged patch store.*tiles 4-7"):
        reader.read(1, reader.buffer())
    with pytest.raises(StoreError, match="tiles 4-7"), TileLoader(store, np.arange(N_TILES), batch_size=3) as loader:
        for batch in loader:
            loader.release(batch)


@pytest.mark.parametrize("codec", ["jpeg", "zstd"])
@pytest.mark.parametrize("batch_size, workers", [(3, 1), (4, 2), (64, 2)])
def test_loader_batches_hold_the_selected_tiles(tmp_path, codec, batch_size, workers):
    store = _store(tmp_path, codec)
    every = store.read_tiles(0, N_TILES)
    indices = np.array([0, 1, 2, 3, 5, 6, 9])  # a whole chunk, a gap, a partial last chunk
    got, where = [], []
    with TileLoader(store, indices, batch_size=batch_size, workers=workers) as loader:
        for batch in loader:
            got.append(batch.tiles.numpy().copy())
            where.append(batch.indices)
            loader.release(batch)
    assert np.array_equal(np.concatenate(where), indices)
    assert np.array_equal(np.concatenate(got), every[indices])


def test_the_store_hands_out_tiles_through_its_own_api_only(tmp_path):
    """No raw zarr array leaves the store: reads go through read_tiles / read_tiles_at (one-line damage errors)."""
    store = _store(tmp_path)
    assert not hasattr(store, "tiles") and not hasattr(store, "_tiles")
    every = store.read_tiles(0, N_TILES)
    picked = [7, 2, 9]
    assert np.array_equal(store.read_tiles_at(picked), every[picked])
    chunks = store.tile_chunks()
    assert chunks.shape == (CHUNK_TILES, TILE_PX, TILE_PX, 3) and chunks.path(1).is_file()
    chunks.path(2).write_bytes(b"not a chunk")
    with pytest.raises(StoreError, match="damaged patch store .*tiles 2-9 unreadable"):
        store.read_tiles_at([2, 9])
