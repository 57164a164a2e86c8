"""tiffslide backend (pure Python on tifffile; also opens flat, untiled TIFFs).

Reading a large region through ``tiffslide.read_region`` goes through a zarr view of the file
with per-chunk overhead that costs 2-4x the JPEG decode itself. For tiled pages we therefore
decode the slide's own tiles directly with tifffile's page decoder (imagecodecs underneath,
the same codecs tiffslide uses) and paste them into the region: each native tile is read with
one ``pread`` and decoded once per region. Anything unusual (untiled, planar, tiled in depth,
non-uint8) falls back to ``tiffslide.read_region``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from wsi_her2.slide.base import SlideReader, rgba_to_rgb_on_white


class _TiledPageDecoder:
    """Direct region reads from one tiled TIFF page."""

    def __init__(self, page, fd: int) -> None:
        self.page = page
        self.fd = fd
        self.tile_w = int(page.tilewidth)
        self.tile_h = int(page.tilelength)
        self.width = int(page.imagewidth)
        self.height = int(page.imagelength)
        self.tiles_across = math.ceil(self.width / self.tile_w)
        self.offsets = page.dataoffsets
        self.counts = page.databytecounts
        self.tables = getattr(page, "jpegtables", None)
        # Plain JPEG tiles go straight to libjpeg-turbo (tifffile's generic decode path adds ~30 %).
        # Aperio "RGB" JPEGs must not be colour-converted, YCbCr ones must.
        self.jpeg_direct = int(page.compression) == 7 and int(page.photometric) in (2, 6)
        self.jpeg_rgb = int(page.photometric) == 2
        # Decoded native tiles of the previous ``read_squares`` call: consecutive calls are
        # neighbouring blocks of tiles that share a row or column of native tiles (a work unit
        # of 64 tiles rarely matches a block exactly), and each should be decoded once.
        self._recent: dict[int, NDArray[np.uint8] | None] = {}

    @staticmethod
    def usable(page) -> bool:
        return (
            page.is_tiled
            and page.imagedepth == 1
            and page.tiledepth == 1
            and page.planarconfig == 1
            and page.dtype == np.uint8
            and page.samplesperpixel in (3, 4)
        )

    def _decode(self, data: bytes, index: int) -> NDArray[np.uint8]:
        if self.jpeg_direct:
            import imagecodecs

            if self.jpeg_rgb:
                return imagecodecs.jpeg8_decode(data, tables=self.tables, colorspace=2, outcolorspace=2)
            return imagecodecs.jpeg8_decode(data, tables=self.tables)
        return self.page.decode(data, index, jpegtables=self.tables)[0][0]

    def read_squares(self, xy_px: NDArray[np.integer], size_px: int, out: NDArray[np.uint8]) -> None:
        """Fill ``out[i]`` with the square at ``xy_px[i]``: each native tile decoded once, copied
        straight into every output square it overlaps (no intermediate region: one memory pass)."""
        x = xy_px[:, 0].astype(np.int64)
        y = xy_px[:, 1].astype(np.int64)
        # np.minimum/maximum, not np.clip: this runs per block and np.clip's overhead is ~20x
        cx0, cx1 = np.minimum(np.maximum(x, 0), self.width), np.minimum(np.maximum(x + size_px, 0), self.width)
        cy0, cy1 = np.minimum(np.maximum(y, 0), self.height), np.minimum(np.maximum(y + size_px, 0), self.height)
        for i in np.flatnonzero((cx1 - cx0 < size_px) | (cy1 - cy0 < size_px)):
            out[i] = 255  # hangs over the slide's edge: glass there
        users: dict[int, list[int]] = {}  # native tile index -> output squares it overlaps
        for i in np.flatnonzero((cx1 > cx0) & (cy1 > cy0)):
            for ty in range(int(cy0[i]) // self.tile_h, (int(cy1[i]) - 1) // self.tile_h + 1):
                for tx in range(int(cx0[i]) // self.tile_w, (int(cx1[i]) - 1) // self.tile_w + 1):
                    users.setdefault(ty * self.tiles_across + tx, []).append(int(i))
        recent, self._recent = self._recent, {}
        for index in sorted(users):  # file order
            ty, tx = divmod(index, self.tiles_across)
            sx, sy = tx * self.tile_w, ty * self.tile_h
            if index in recent:
                seg = recent[index]
            else:
                count = int(self.counts[index])
                seg = self._decode(os.pread(self.fd, count, int(self.offsets[index])), index) if count else None
            self._recent[index] = seg
            for i in users[index]:
                ax0, ax1 = max(int(cx0[i]), sx), min(int(cx1[i]), sx + self.tile_w)
                ay0, ay1 = max(int(cy0[i]), sy), min(int(cy1[i]), sy + self.tile_h)
                dst = out[i, ay0 - y[i] : ay1 - y[i], ax0 - x[i] : ax1 - x[i]]
                dst[...] = 255 if seg is None else seg[ay0 - sy : ay1 - sy, ax0 - sx : ax1 - sx, :3]

    def read(self, x: int, y: int, w: int, h: int) -> NDArray[np.uint8]:
        out = np.full((h, w, 3), 255, dtype=np.uint8)  # outside the image and empty tiles: glass
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, self.width), min(y + h, self.height)
        if x0 >= x1 or y0 >= y1:
            return out
        for ty in range(y0 // self.tile_h, (y1 - 1) // self.tile_h + 1):
            for tx in range(x0 // self.tile_w, (x1 - 1) // self.tile_w + 1):
                index = ty * self.tiles_across + tx
                count = int(self.counts[index])
                if count == 0:
                    continue
                data = os.pread(self.fd, count, int(self.offsets[index]))
                seg = self._decode(data, index)  # (th, tw, samples)
                sx, sy = tx * self.tile_w, ty * self.tile_h
                ax0, ay0 = max(x0, sx), max(y0, sy)
                ax1, ay1 = min(x1, sx + seg.shape[1]), min(y1, sy + seg.shape[0])
                out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = seg[ay0 - sy : ay1 - sy, ax0 - sx : ax1 - sx, :3]
        return out


class TiffSlideReader(SlideReader):
    backend = "tiffslide"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        import tiffslide

        self._ts = tiffslide.TiffSlide(str(path))
        self._set_metadata(
            self._ts.level_dimensions, self._ts.level_downsamples, self._ts.properties, f"tiffslide {tiffslide.__version__}"
        )
        self._fd: int | None = None
        self._decoders: dict[int, _TiledPageDecoder | None] = {}

    def _decoder(self, level: int) -> _TiledPageDecoder | None:
        if level not in self._decoders:
            decoder = None
            try:
                series = self._ts.ts_tifffile.series[0]
                page = series.levels[level].keyframe
                lvl = self._levels[level]
                if _TiledPageDecoder.usable(page) and (page.imagewidth, page.imagelength) == (lvl.width_px, lvl.height_px):
                    if self._fd is None:
                        self._fd = os.open(self.path, os.O_RDONLY)
                    decoder = _TiledPageDecoder(page, self._fd)
            except (AttributeError, IndexError, KeyError):
                decoder = None
            self._decoders[level] = decoder
        return self._decoders[level]

    def read_level_region(self, level: int, x_px: int, y_px: int, w_px: int, h_px: int) -> NDArray[np.uint8]:
        decoder = self._decoder(level)
        if decoder is not None:
            return decoder.read(int(x_px), int(y_px), int(w_px), int(h_px))
        ds = self._levels[level].downsample
        arr = self._ts.read_region(
            (int(round(x_px * ds)), int(round(y_px * ds))), level, (int(w_px), int(h_px)), as_array=True
        )
        arr = np.asarray(arr)
        if arr.ndim == 2:  # grayscale slide
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.shape[-1] == 4:
            arr = rgba_to_rgb_on_white(arr)
        if arr.dtype != np.uint8:
            raise TypeError(f"{self.path.name}: {arr.dtype} pixels are not supported; export the slide as 8-bit RGB")
        return np.ascontiguousarray(arr[..., :3])

    def read_level_squares(self, level: int, xy_px: NDArray[np.integer], size_px: int, out: NDArray[np.uint8]) -> None:
        decoder = self._decoder(level)
        if decoder is None:
            super().read_level_squares(level, xy_px, size_px, out)
        else:
            decoder.read_squares(xy_px, size_px, out)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._ts.close()
