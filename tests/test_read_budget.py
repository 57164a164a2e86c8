"""Memory bounded by design: hostile headers are refused fast under a memory limit, slides without
a pyramid are streamed in bounded reads, and damaged slides give `info` one line."""
from __future__ import annotations

import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from wsi_her2.tile.pixels import read_thumbnail
from wsi_her2.slide import open_slide

MEMORY_LIMIT_MB = 1500


def _hostile_tiff(path):
    """A small JPEG TIFF whose header claims 10^6 x 10^6 px at 0.25 µm/px."""
    import tifffile

    img = np.full((512, 512, 3), 200, np.uint8)
    img[100:300, 100:300] = (120, 60, 40)
    tifffile.imwrite(path, img, tile=(256, 256), compression="jpeg", photometric="rgb",
                     resolution=(40000, 40000), resolutionunit="CENTIMETER")
    with tifffile.TiffFile(path) as tif:
        offsets = [tif.pages[0].tags[code].valueoffset for code in (256, 257)]
        dtypes = [tif.pages[0].tags[code].dtype for code in (256, 257)]
    data = bytearray(path.read_bytes())
    for off, dtype in zip(offsets, dtypes):
        struct.pack_into("<I" if dtype == tifffile.DATATYPE.LONG else "<H", data, off,
                         1_000_000 if dtype == tifffile.DATATYPE.LONG else 65535)
    path.write_bytes(bytes(data))
    return path


def _run_limited(args, tmp_path):
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT_MB} << 20, {MEMORY_LIMIT_MB} << 20))
        from wsi_her2.cli import main
        sys.exit(main({args!r}))
    """)
    return subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)


@pytest.mark.parametrize("command", ["info", "tile"])
def test_hostile_header_is_refused_fast_under_a_memory_limit(command, tmp_path):
    slide = _hostile_tiff(tmp_path / "hostile.tif")
    args = [command, str(slide)] + (["-o", str(tmp_path / "out"), "-q", "--workers", "1"] if command == "tile" else [])
    proc = _run_limited(args, tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    assert "no pyramid level small enough" in proc.stderr and "1000000 x 1000000" in proc.stderr


class _SpyReader:
    """Forwards to a real reader and records the largest region read."""

    def __init__(self, reader):
        self._reader = reader
        self.largest_bytes = 0

    def __getattr__(self, name):
        return getattr(self._reader, name)

    def read_level_region(self, level, x, y, w, h):
        self.largest_bytes = max(self.largest_bytes, w * h * 3)
        return self._reader.read_level_region(level, x, y, w, h)


def test_thumbnail_without_pyramid_is_streamed_in_bounded_reads(tmp_path):
    import tifffile

    rng = np.random.default_rng(0)
    img = np.full((3000, 4000, 3), 235, np.uint8)
    img[500:2500, 800:3200] = rng.integers(60, 200, size=(2000, 2400, 3), dtype=np.uint8)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", resolution=(20000, 20000),
                     resolutionunit="CENTIMETER")  # one level, no pyramid
    with open_slide(path, backend="tiffslide") as reader:
        whole, scale = read_thumbnail(reader, slide_mpp_um=0.5)
        spy = _SpyReader(reader)
        budget = 4 << 20  # a full-width strip (2048 x 4000 px, 24 MB) is over it: columns are split
        streamed, scale2 = read_thumbnail(spy, slide_mpp_um=0.5, max_read_bytes=budget)
    assert spy.largest_bytes <= budget
    assert scale == scale2 and streamed.shape == whole.shape
    assert np.abs(streamed.astype(int) - whole.astype(int)).max() <= 1  # same area averages, split differently


def test_info_on_a_truncated_slide_is_one_line(graded_slide, tmp_path):
    data = graded_slide.read_bytes()
    broken = tmp_path / "broken.svs"
    broken.write_bytes(data[: int(len(data) * 0.6)])
    proc = subprocess.run([sys.executable, "-m", "wsi_her2", "info", str(broken)], check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "wsi-her2 info: error" in line]
