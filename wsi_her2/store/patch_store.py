"""The zarr v3 patch store: the contract between tiling and scoring (zarr is imported only here
and in :mod:`wsi_her2.store.codecs`).

Layout of ``<slide-id>.zarr`` (a zarr v3 group)::

    tiles            (N, tile_px, tile_px, 3) uint8   chunks of ``chunk_tiles`` tiles, codec ``jpeg``
                     (default; q90 4:4:4, one JPEG per chunk), ``zstd``, ``lz4`` or ``none``
    coords_level0    (N, 2) int64     x, y of each tile's top-left, level-0 pixels of the full slide
    grid_rc          (N, 2) int32     row, col on the tile grid
    mask_fraction    (N,)   float32   thumbnail tissue coverage that selected the tile
    tissue_fraction  (N,)   float32   share of the tile covered by the slide's tissue mask
    laplacian_var    (N,)   float32   the papers' blur measure (low = blurry; grows with contrast)
    sharpness        (N,)   float32   contrast-normalised focus measure at 1 µm/px (wsi_her2.tile.qc)
    pen_fraction     (N,)   float32   marker-ink pixels / all pixels
    qc_flags         (N,)   uint8     bit flags (wsi_her2.tile.qc.QC_FLAGS); 0 = passed QC
    unit_done        (U,)   uint8     1 when work unit u (tiles u*chunk_tiles ...) is fully written
                     (per-tile arrays and unit_done are single chunks, written in bulk)
    thumbnail        (h, w, 3) uint8, tissue_mask (h, w) bool, pen_mask (h, w) bool

Group attribute ``wsi_her2`` holds the schema version, the slide (path, SHA-256, reader and
version, MPP and its source), the tiling geometry, QC thresholds and summary, codec, package
version and timings. ``complete`` is set True last: a crashed run never looks complete.
``attrs_sha256`` is the SHA-256 of all the others (canonical JSON, :mod:`wsi_her2.digests`),
rewritten with every change and checked on every open: an edited MPP is damage, not a new slide.

Schema 2 (this version) ends every chunk of every array in a CRC32C checksum and records the
tiling ``settings_key``; schema 1 stores (no checksums) are still read, and
:mod:`wsi_her2.store.verify` checks every chunk is present (zarr would silently read a missing
chunk as its fill value) and, where the array has one, its checksum.
"""
from __future__ import annotations

import itertools
import logging
import math
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
from numpy.typing import NDArray

from wsi_her2.digests import record_sha256
from wsi_her2.errors import StoreError
from wsi_her2.files import atomic_target, check_store_slot
from wsi_her2.store.codecs import (  # importing it registers the JPEG codec
    JPEG_QUALITY,
    chunk_encoder,
    small_array_codecs,
    zarr_codecs,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # 1: no chunk checksums (verified for presence only)
IMAGE_ARRAYS = ("thumbnail", "tissue_mask", "pen_mask")
ATTR_KEY = "wsi_her2"
#: The attributes' own SHA-256 (wsi_her2.digests.record_sha256 of every other key), checked on open.
ATTRS_DIGEST_KEY = "attrs_sha256"
PER_TILE_ARRAYS = {  # name -> (dtype, trailing shape)
    "coords_level0": ("int64", (2,)),
    "grid_rc": ("int32", (2,)),
    "mask_fraction": ("float32", ()),
    "tissue_fraction": ("float32", ()),
    "laplacian_var": ("float32", ()),
    "sharpness": ("float32", ()),
    "pen_fraction": ("float32", ()),
    "qc_flags": ("uint8", ()),
}
QC_ARRAYS = ("tissue_fraction", "laplacian_var", "sharpness", "pen_fraction", "qc_flags")
ALL_ARRAYS = ("tiles", *PER_TILE_ARRAYS, "unit_done", *IMAGE_ARRAYS)  # what a complete store holds
STORE_ENTRIES = frozenset(ALL_ARRAYS)


@dataclass(frozen=True)
class TileChunks:
    """How a store's tiles lie on disk: ``shape`` of a chunk (tiles, px, px, 3), the ``codecs`` by name, the
    JPEG quality (None for other codecs) and the file of each chunk (:meth:`path`)."""

    shape: tuple[int, ...]
    codecs: tuple[str, ...]
    jpeg_quality: int | None
    root: Path
    chunk_key: Callable[[tuple[int, ...]], str]

    def path(self, chunk: int) -> Path:
        """The file of chunk ``chunk`` (tiles ``chunk * shape[0]`` on)."""
        return self.root / self.chunk_key((chunk, 0, 0, 0))


class PatchStore:
    """Read (and, for the tiler, write) one slide's patch store."""

    def __init__(self, path: Path, group: Any) -> None:
        self.path = Path(path)
        self._group = group

    # --- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, require_complete: bool = True, mode: str = "r") -> "PatchStore":
        import zarr

        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path}: not a wsi-her2 patch store (no zarr.json); run `wsi-her2 tile` first")
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
        except Exception as exc:
            raise StoreError(f"{path}: unreadable patch store ({exc}); delete it and re-run `wsi-her2 tile`") from exc
        store = cls(path, group)
        meta = store.attrs
        if meta.get("schema_version") not in READABLE_SCHEMAS:
            raise StoreError(
                f"{path}: store schema {meta.get('schema_version')!r}, this wsi-her2 reads {SCHEMA_VERSION}; "
                "re-tile the slide with --overwrite"
            )
        store._check_attrs(meta)
        if require_complete and not meta.get("complete"):
            raise StoreError(f"{path}: incomplete patch store (tiling was interrupted); re-run `wsi-her2 tile` to resume it")
        return store

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        n_tiles: int,
        tile_px: int,
        chunk_tiles: int,
        codec: str,
        attrs: dict,
        jpeg_quality: int = JPEG_QUALITY,
        per_tile: dict[str, NDArray],
        images: dict[str, NDArray],
    ) -> "PatchStore":
        """Create an empty store (``complete=False``) with the plan and thumbnail already written."""
        import zarr

        path = Path(path)
        remove_store(path)
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        try:
            codec_kwargs = zarr_codecs(codec, jpeg_quality=jpeg_quality)
        except ValueError as exc:
            raise StoreError(str(exc)) from exc
        group.create_array(
            "tiles",
            shape=(n_tiles, tile_px, tile_px, 3),
            chunks=(chunk_tiles, tile_px, tile_px, 3),
            dtype="uint8",
            fill_value=0,
            **codec_kwargs,
        )
        # Per-tile arrays are a few bytes per tile: one chunk each, written in bulk by the
        # tiler's coordinating thread (a chunk per work unit would mean thousands of tiny files).
        for name, (dtype, trailing) in PER_TILE_ARRAYS.items():
            group.create_array(name, shape=(n_tiles, *trailing), chunks=(max(n_tiles, 1), *trailing), dtype=dtype,
                               fill_value=0, **small_array_codecs())
        n_units = (n_tiles + chunk_tiles - 1) // chunk_tiles
        group.create_array("unit_done", shape=(n_units,), chunks=(max(n_units, 1),), dtype="uint8", fill_value=0,
                           **small_array_codecs())
        for name, value in per_tile.items():
            _every_chunk(group[name])[...] = value
        for name, image in images.items():
            group.create_array(name, data=np.ascontiguousarray(image), chunks=image.shape, config=WRITE_EVERY_CHUNK,
                               **small_array_codecs())
        meta = dict(attrs, schema_version=SCHEMA_VERSION, complete=False, chunk_tiles=chunk_tiles, codec=codec,
                    jpeg_quality=jpeg_quality if codec == "jpeg" else None)
        store = cls(path, group)
        store._write_attrs(meta)
        return store

    # --- metadata ----------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        return dict(self._group.attrs.get(ATTR_KEY, {}))

    def update_attrs(self, **values: Any) -> None:
        meta = self.attrs
        meta.update(values)
        self._write_attrs(meta)

    def _write_attrs(self, meta: dict) -> None:
        """Write the attributes with their digest (every attribute change goes through here)."""
        meta = {k: v for k, v in meta.items() if k != ATTRS_DIGEST_KEY}
        self._group.attrs[ATTR_KEY] = {**meta, ATTRS_DIGEST_KEY: record_sha256(meta)}

    def _check_attrs(self, meta: dict) -> None:
        """Slide identity, MPP, tiling and QC settings as written: an edited or corrupted attribute is damage."""
        recorded = meta.get(ATTRS_DIGEST_KEY)
        if recorded is None:  # written before attributes carried a digest: still read
            log.info("%s: store attributes carry no digest (an older wsi-her2 wrote them); not verified", self.path)
            return
        if recorded != record_sha256({k: v for k, v in meta.items() if k != ATTRS_DIGEST_KEY}):
            raise self.damaged("its attributes in zarr.json (slide, MPP, tiling, QC settings) do not match their "
                               "SHA-256: edited or corrupted")

    @property
    def slide_id(self) -> str:
        return self.attrs.get("slide", {}).get("id") or self.path.name.removesuffix(".zarr")

    @property
    def n_tiles(self) -> int:
        return int(self._group["tiles"].shape[0])

    @property
    def tile_px(self) -> int:
        return int(self._group["tiles"].shape[1])

    @property
    def chunk_tiles(self) -> int:
        return int(self._group["tiles"].chunks[0])

    @property
    def n_units(self) -> int:
        return int(self._group["unit_done"].shape[0])

    def tile_chunks(self) -> TileChunks:
        """How the tiles lie on disk (chunk shape, codecs, chunk files): what the direct chunk readers and
        writers need, without handing out the zarr array."""
        array = self._group["tiles"]
        codecs = tuple(_codec_name(c) for c in array.metadata.codecs)
        quality = getattr(array.metadata.codecs[0], "quality", None)  # the JPEG codec carries its quality
        return TileChunks(shape=tuple(int(c) for c in array.chunks), codecs=codecs, jpeg_quality=quality,
                          root=self.path / "tiles", chunk_key=array.metadata.encode_chunk_key)

    def chunk_keys(self, name: str) -> tuple[list[str], bool]:
        """The chunk keys (``c/0/0/...``, under ``<store>/<name>/``) array ``name`` must have on disk, and
        whether its chunks carry a CRC32C; a missing array is the store's one-line error."""
        try:
            array = self._group[name]
        except (KeyError, FileNotFoundError) as exc:
            raise self.damaged(f"array {name!r} is missing") from exc
        summed = any(_codec_name(c) == "crc32c" for c in array.metadata.codecs)
        if any(s == 0 for s in array.shape):
            return [], summed
        counts = [math.ceil(s / c) for s, c in zip(array.shape, array.chunks)]
        encode = array.metadata.encode_chunk_key
        return [encode(idx) for idx in itertools.product(*(range(n) for n in counts))], summed

    def has_array(self, name: str) -> bool:
        """Whether the store holds array ``name`` (older schemas lack newer QC arrays)."""
        return name in self._group

    def array(self, name: str) -> NDArray:
        try:
            return np.asarray(self._group[name][...])
        except Exception as exc:  # a missing or damaged array: one line naming the store and the fix
            raise self.damaged(f"array {name!r} unreadable ({type(exc).__name__}: {_first_line(exc)})") from exc

    def damaged(self, problem: str) -> StoreError:
        """The one-line error for a damaged store: what is wrong and the command that rebuilds it."""
        slide = self.attrs.get("slide", {}).get("path") or "SLIDE"
        return StoreError(
            f"{self.path}: damaged patch store ({problem}); rebuild it with "
            f"`wsi-her2 tile {slide} -o {self.path.parent} --overwrite`"
        )

    # per-tile metadata is small (bytes per tile): load once and cache
    @cached_property
    def coords_level0(self) -> NDArray[np.int64]:
        return self.array("coords_level0")

    @cached_property
    def grid_rc(self) -> NDArray[np.int32]:
        return self.array("grid_rc")

    @cached_property
    def qc_flags(self) -> NDArray[np.uint8]:
        return self.array("qc_flags")

    @property
    def qc_pass(self) -> NDArray[np.bool_]:
        return self.qc_flags == 0

    @property
    def tile_size_level0(self) -> float:
        return float(self.attrs["tiling"]["tile_size_level0"])

    def read_tiles(self, start: int, stop: int) -> NDArray[np.uint8]:
        """Tiles ``start`` to ``stop - 1``; a damaged chunk is the store's one-line error."""
        try:
            return np.asarray(self._group["tiles"][start:stop])
        except Exception as exc:  # checksum mismatch or undecodable chunk
            raise self.damaged(f"tiles {start}-{stop - 1} unreadable ({type(exc).__name__}: {_first_line(exc)})") from exc

    def read_tiles_at(self, indices: NDArray[np.integer]) -> NDArray[np.uint8]:
        """The tiles at store indices ``indices``, in that order; a damaged chunk is the store's one-line error."""
        idx = np.asarray(indices, dtype=np.int64)
        try:
            return np.asarray(self._group["tiles"].oindex[idx])
        except Exception as exc:  # checksum mismatch or undecodable chunk
            raise self.damaged(f"tiles {idx.min() if idx.size else '-'}-{idx.max() if idx.size else '-'} unreadable "
                               f"({type(exc).__name__}: {_first_line(exc)})") from exc

    def write_tiles(self, start: int, tiles: NDArray[np.uint8]) -> None:
        """Write ``tiles`` from tile ``start`` on through zarr's own write path (small stores made by tests and
        benchmarks; the tile stage writes whole chunks with :meth:`chunk_writer`)."""
        _every_chunk(self._group["tiles"])[start:start + len(tiles)] = tiles

    def units_done(self) -> NDArray[np.bool_]:
        return self.array("unit_done").astype(bool)

    # --- writing -------------------------------------------------------------------------------
    # Tiles: one chunk per work unit, written by the worker that made it (thread-safe: each unit
    # has its own file). QC values and unit_done: in bulk by one coordinating thread, QC first,
    # so a unit counts as done only once its tiles and its QC values are both on disk.
    def chunk_writer(self) -> "TileChunkWriter":
        return TileChunkWriter(self)

    def write_qc(self, qc: dict[str, NDArray], units_done: NDArray[np.bool_]) -> None:
        """Write whole QC arrays (``QC_ARRAYS``), then ``unit_done``."""
        for name in QC_ARRAYS:
            _every_chunk(self._group[name])[...] = qc[name]
        _every_chunk(self._group["unit_done"])[...] = units_done.astype(np.uint8)


# zarr skips (and deletes) a chunk equal to the fill value unless told otherwise; a store writes
# every chunk so that a missing chunk file always means damage (wsi_her2.store.verify).
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}


def _every_chunk(array: Any) -> Any:
    return array.with_config(WRITE_EVERY_CHUNK)


def _codec_name(codec: Any) -> str | None:
    """A zarr codec's name as its metadata writes it (``crc32c``, ``wsi_her2.jpeg``, ...)."""
    return getattr(codec, "to_dict", dict)().get("name")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


WRITE_PIECE_BYTES = 1 << 20


class TileChunkWriter:
    """Writes one work unit's tiles as the ``tiles`` array's chunk file, bypassing zarr's
    per-write machinery (which costs more than the compression itself at 64 tiles a chunk).

    The bytes are what zarr writes for the chunk (same codec, same parameters, the same CRC32C
    appended, zarr's own chunk key; ``tests/test_store_safety.py`` compares them), written to a temporary name and renamed, so a killed run never leaves half a
    chunk. ``tests/test_tile_stage.py`` reads them back through zarr.
    """

    def __init__(self, store: PatchStore) -> None:
        self._chunks = store.tile_chunks()
        self.chunk_shape = self._chunks.shape
        quality = self._chunks.jpeg_quality  # the JPEG codec carries its quality; the others ignore it
        self._encode = chunk_encoder(store.attrs["codec"], jpeg_quality=JPEG_QUALITY if quality is None else quality)
        self.n_tiles = store.n_tiles

    def write(self, unit: int, tiles: NDArray[np.uint8]) -> None:
        """``tiles``: the unit's tiles, ``chunk_tiles`` of them (the last unit: padded with zeros)."""
        if tiles.shape != self.chunk_shape or tiles.dtype != np.uint8:
            raise ValueError(f"chunk must be {self.chunk_shape} uint8, got {tiles.shape} {tiles.dtype}")
        data = self._encode(tiles)
        path = self._chunks.path(unit)
        path.parent.mkdir(parents=True, exist_ok=True)
        view = memoryview(data).cast("B")
        with atomic_target(path) as tmp, open(tmp, "wb", buffering=0) as fh:
            # 1 MiB per write() call: one multi-MB write() cost 5-10x more kernel time here
            # (benchmarks/README.md, "writing chunks"), pieces keep the page-cache copy cheap
            for i in range(0, len(view), WRITE_PIECE_BYTES):
                fh.write(view[i : i + WRITE_PIECE_BYTES])


def remove_store(path: str | Path) -> None:
    """Remove the wsi-her2 store (or a creation of one cut short) at ``path``; anything else there
    (a user's directory or file) is refused with an error, never removed."""
    path = Path(path)
    check_store_slot(path, known_entries=STORE_ENTRIES)
    if path.exists():
        shutil.rmtree(path)


def open_store(path: str | Path) -> PatchStore:
    """Open a complete patch store for reading (scoring, reports)."""
    return PatchStore.open(path, require_complete=True)
