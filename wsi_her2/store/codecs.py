"""Tile codecs of the patch store: lossless (zstd, blosc-lz4, none) and high-quality JPEG.

Why JPEG is the default (``benchmarks/bench_codecs.py``): tissue tiles compress poorly
losslessly (zstd keeps 55-90 % of the bytes), while JPEG at quality 90 *without chroma
subsampling* (4:4:4) keeps 6-19 % and moves the mean DAB optical density of a tile by
~1e-4 OD, a thousandth of the faint-staining cut-point of the default scorer (0.10 OD);
chroma subsampling (4:2:0), not quantisation, is what shifted DAB in the measurements,
so it is never used. JPEG is also what a GPU decodes natively (nvJPEG).

The JPEG codec is a zarr v3 array->bytes codec named ``wsi_her2.jpeg``: one baseline JPEG per
chunk, the chunk's tiles stacked into one tall image (8x8 blocks never straddle two tiles when
the tile size is a multiple of 8, so each tile decodes exactly as if it were encoded alone).
zarr finds the codec through the ``zarr.codecs`` entry point (pyproject.toml), so plain zarr
reads such a store with the package installed, imported or not; lossless stores are plain zarr.

Every chunk of every array ends in a CRC32C checksum (zarr v3's core ``crc32c`` codec, last in
each array's pipeline): a truncated, overwritten or bit-flipped chunk fails to read instead of
decoding into wrong pixels (``wsi_her2.store.verify`` checks a whole store).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.registry import register_codec

from wsi_her2.store.chunk_file import append_crc32c, crc32c_ok, crc32c_value  # noqa: F401 (re-exported)

JPEG_CODEC_NAME = "wsi_her2.jpeg"
JPEG_QUALITY = 90
JPEG_MAX_SIDE_PX = 65_500  # the JPEG format's limit on the tall image's height
ZSTD_LEVEL = 1  # bench_codecs: level 1 encodes ~4x faster than level 3 for ~15 % more bytes
TILE_CODECS = ("jpeg", "zstd", "lz4", "none")
# JPEG by default (README, "Tile codecs"): a fifth of zstd's bytes (a cohort's stores in GB, not
# TB), faster to write, GPU-decodable, and on the real IHC patches it changed no image call and
# 0.9 % of tile calls of the default scorer. ``--codec zstd`` keeps the slide's pixels exactly.
DEFAULT_TILE_CODEC = "jpeg"


def check_jpeg_quality(quality: int) -> int:
    if not 50 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality {quality} is outside 50-100 (90 is the measured default)")
    return int(quality)


def encode_jpeg_chunk(tiles: NDArray[np.uint8], quality: int = JPEG_QUALITY) -> bytes:
    """``(n, h, w, 3)`` uint8 tiles -> one 4:4:4 baseline JPEG of the ``(n*h, w, 3)`` stack."""
    import imagecodecs

    n, h, w, c = tiles.shape
    return bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(tiles).reshape(n * h, w, c), level=quality,
                                          subsampling="444"))


def decode_jpeg_chunk(data: bytes, shape: tuple[int, ...]) -> NDArray[np.uint8]:
    import imagecodecs

    return np.asarray(imagecodecs.jpeg8_decode(data)).reshape(shape)


@dataclass(frozen=True)
class JpegTileCodec(ArrayBytesCodec):
    """zarr v3 array->bytes codec: a chunk of RGB tiles as one 4:4:4 JPEG (see module docstring)."""

    is_fixed_size = False
    quality: int = JPEG_QUALITY

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JpegTileCodec":
        config = data.get("configuration") or {}
        return cls(quality=int(config.get("quality", JPEG_QUALITY)))

    def to_dict(self) -> dict[str, Any]:
        return {"name": JPEG_CODEC_NAME, "configuration": {"quality": self.quality, "subsampling": "444"}}

    def validate(self, *, shape: tuple[int, ...], dtype: Any, chunk_grid: Any) -> None:
        chunks = getattr(chunk_grid, "chunk_shape", None)
        if len(shape) != 4 or shape[-1] != 3 or np.dtype(getattr(dtype, "to_native_dtype", lambda: dtype)()) != np.uint8:
            raise ValueError(f"{JPEG_CODEC_NAME} stores (n, h, w, 3) uint8 tiles, not {shape} {dtype}")
        if chunks is not None and chunks[0] * chunks[1] > JPEG_MAX_SIDE_PX:
            raise ValueError(
                f"{JPEG_CODEC_NAME}: {chunks[0]} tiles of {chunks[1]} px per chunk exceed the JPEG height limit "
                f"({JPEG_MAX_SIDE_PX} px); use fewer tiles per chunk"
            )

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        tiles = decode_jpeg_chunk(chunk_bytes.to_bytes(), tuple(chunk_spec.shape))
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(tiles)

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        data = encode_jpeg_chunk(np.asarray(chunk_array.as_ndarray_like()), self.quality)
        return chunk_spec.prototype.buffer.from_bytes(data)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable size


register_codec(JPEG_CODEC_NAME, JpegTileCodec)


def zarr_codecs(name: str, *, jpeg_quality: int = JPEG_QUALITY) -> dict[str, Any]:
    """``create_array`` keyword arguments (serializer / compressors) for tile codec ``name``."""
    import zarr

    crc = zarr.codecs.Crc32cCodec()
    if name == "jpeg":
        return {"serializer": JpegTileCodec(quality=check_jpeg_quality(jpeg_quality)), "compressors": [crc]}
    if name == "zstd":
        return {"compressors": [zarr.codecs.ZstdCodec(level=ZSTD_LEVEL), crc]}
    if name == "lz4":
        return {"compressors": [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"), crc]}
    if name == "none":
        return {"compressors": [crc]}
    raise ValueError(f"unknown tile codec {name!r}; choose {', '.join(TILE_CODECS)}")


def small_array_codecs() -> dict[str, Any]:
    """``create_array`` keyword arguments of the per-tile and image arrays: zarr's default zstd, then crc32c."""
    import zarr

    return {"compressors": [zarr.codecs.ZstdCodec(level=0), zarr.codecs.Crc32cCodec()]}


def chunk_encoder(name: str, *, jpeg_quality: int = JPEG_QUALITY):
    """``(chunk_tiles, h, w, 3)`` uint8 array -> the bytes zarr writes for that chunk with codec ``name``
    (the codec's bytes followed by their CRC32C)."""
    encode = _codec_encoder(name, jpeg_quality=jpeg_quality)
    return lambda tiles: append_crc32c(encode(tiles))


def _codec_encoder(name: str, *, jpeg_quality: int = JPEG_QUALITY):
    import numcodecs

    if name == "jpeg":
        quality = check_jpeg_quality(jpeg_quality)
        return lambda tiles: encode_jpeg_chunk(tiles, quality)
    if name == "zstd":
        return numcodecs.Zstd(level=ZSTD_LEVEL, checksum=False).encode
    if name == "lz4":
        return numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.NOSHUFFLE).encode
    if name == "none":
        return lambda tiles: np.ascontiguousarray(tiles).tobytes()
    raise ValueError(f"unknown tile codec {name!r}; choose {', '.join(TILE_CODECS)}")
