"""A default (JPEG) patch store reads with plain zarr / dask in an interpreter that never imports wsi_her2."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from wsi_her2.store.patch_store import PatchStore

# Run in a fresh interpreter: the test process has wsi_her2 imported (codec registered by hand).
READER = """
import json, sys
import numpy as np
import zarr
group = zarr.open_group(sys.argv[1], mode="r")
first = np.asarray(group["tiles"][0])
out = {"shape": list(first.shape), "mean": float(first.mean())}
try:
    import dask.array as da
    out["dask_sum"] = int(da.from_zarr(group["tiles"]).sum().compute())
except ModuleNotFoundError:
    out["dask_sum"] = None
print(json.dumps(out))
"""


@pytest.fixture()
def jpeg_store(tmp_path):
    tiles = np.full((5, 16, 16, 3), 180, np.uint8)
    tiles[:, 4:12, 4:12] = (120, 80, 40)
    store = PatchStore.create(tmp_path / "s.zarr", n_tiles=5, tile_px=16, chunk_tiles=4, codec="jpeg",
                              attrs={}, per_tile={}, images={})
    store.write_tiles(0, tiles)
    return store.path, tiles


def test_default_store_opens_with_plain_zarr_in_a_fresh_interpreter(jpeg_store):
    path, tiles = jpeg_store
    meta = json.loads((path / "tiles" / "zarr.json").read_text())
    assert meta["codecs"][0]["name"] == "wsi_her2.jpeg"  # really the JPEG codec, not a lossless one
    proc = subprocess.run([sys.executable, "-c", READER, str(path)], capture_output=True, text=True,
                          timeout=120, cwd=path.parent)  # not the checkout: the installed package only
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shape"] == [16, 16, 3]
    assert abs(out["mean"] - tiles[0].mean()) < 2.0  # JPEG q90: close, not exact
    if out["dask_sum"] is not None:
        assert abs(out["dask_sum"] - int(tiles.astype(np.int64).sum())) < tiles.size * 2


def test_codec_is_declared_as_a_zarr_entry_point():
    from importlib.metadata import entry_points

    found = {e.name: e.value for e in entry_points(group="zarr.codecs")}
    assert found.get("wsi_her2.jpeg") == "wsi_her2.store.codecs:JpegTileCodec"
