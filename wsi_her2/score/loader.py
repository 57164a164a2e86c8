"""Background tile loader for scoring: chunk-aligned reads from the patch store into batch buffers.

The patch store keeps tiles in zarr chunks of ``chunk_tiles`` consecutive tiles, and a chunk is
decompressed as a whole whenever any of its tiles is read. The loader therefore groups the
requested tile indices by chunk, reads each chunk's span exactly once (a few chunks ahead, on a
small thread pool: the decoders release the GIL), and packs the rows into a fixed ring of batch
buffers. JPEG stores (the default) are decoded by :mod:`wsi_her2.store.tile_reader` into a few
reused chunk buffers, without zarr's per-read machinery; other codecs are read through zarr. On CUDA those buffers are pinned, so the host-to-device copy can
be asynchronous; a buffer is refilled only after the copy out of it has finished (a CUDA event
recorded by the consumer). Memory is bounded by the ring and the read-ahead, never by the slide.

Consumer protocol::

    with TileLoader(store, indices, batch_size=64) as loader:
        for batch in loader:
            x = batch.tiles.to(device, non_blocking=True)   # (n, T, T, 3) uint8
            loader.release(batch, event=record_event_or_None)
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from numpy.typing import NDArray

from wsi_her2.errors import ConfigError
from wsi_her2.store.tile_reader import jpeg_chunk_reader

log = logging.getLogger(__name__)

#: Batches decoded ahead of the consumer. Two hide the jitter of one slow chunk; more only costs memory.
PREFETCH_BATCHES = 3
_POLL_S = 0.1  # how often blocked threads look at the stop flag


@dataclass
class TileBatch:
    """One batch handed to the consumer.

    Attributes
    ----------
    tiles
        ``(n, tile_px, tile_px, 3)`` uint8 tensor, a view into a reusable (pinned) buffer; valid
        until :meth:`TileLoader.release` is called with this batch.
    indices
        ``(n,)`` int64 store indices of the rows of ``tiles``.
    slot
        Buffer id (internal).
    """

    tiles: torch.Tensor
    indices: NDArray[np.int64]
    slot: int


@dataclass
class _Slot:
    buffer: torch.Tensor  # (batch_size, T, T, 3) uint8
    array: NDArray[np.uint8]  # numpy view of ``buffer``
    event: Any = None  # torch.cuda.Event the consumer recorded after its copy, or None


def chunk_groups(indices: NDArray[np.int64], chunk_tiles: int) -> list[tuple[int, int]]:
    """Split sorted store indices into runs that fall in one zarr chunk.

    Parameters
    ----------
    indices
        Sorted, unique tile indices.
    chunk_tiles
        Tiles per zarr chunk.

    Returns
    -------
    list of (lo, hi)
        Half-open ranges into ``indices``; ``indices[lo:hi]`` share one chunk.
    """
    if indices.size == 0:
        return []
    chunk_id = indices // int(chunk_tiles)
    cuts = np.flatnonzero(np.diff(chunk_id)) + 1
    bounds = np.concatenate([[0], cuts, [indices.size]])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


class TileLoader:
    """Iterate over ``indices`` of a patch store in batches, decoding in background threads.

    Parameters
    ----------
    store
        A :class:`wsi_her2.store.patch_store.PatchStore` (anything with ``read_tiles``, ``tile_px``,
        ``chunk_tiles``).
    indices
        Sorted, unique tile indices to load.
    batch_size
        Tiles per batch (the last batch may be shorter).
    workers
        Threads decompressing chunks concurrently.
    pin_memory
        Allocate the batch buffers in page-locked memory (only meaningful with CUDA).
    prefetch_batches
        Ready batches kept ahead of the consumer.
    """

    def __init__(
        self,
        store: Any,
        indices: NDArray[np.int64],
        *,
        batch_size: int,
        workers: int = 2,
        pin_memory: bool = False,
        prefetch_batches: int = PREFETCH_BATCHES,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if workers < 1:
            raise ConfigError(f"loader_workers must be >= 1, got {workers}")
        self._store = store
        self._indices = np.asarray(indices, dtype=np.int64)
        self._batch_size = int(batch_size)
        self._workers = int(workers)
        self._groups = chunk_groups(self._indices, int(store.chunk_tiles))
        tile_px = int(store.tile_px)
        # Batches this loader will ever produce: no point allocating more buffers than that.
        n_batches = -(-self._indices.size // self._batch_size)
        n_slots = max(1, min(prefetch_batches + 2, n_batches))  # + one being filled, one in use
        # Read-ahead in chunks: enough to keep every worker busy plus one to smooth over a slow read.
        self._read_ahead = self._workers + 1
        # Direct JPEG chunk reads decode into these (one per read in flight, one being copied out).
        self._reader = jpeg_chunk_reader(store) if self._indices.size else None
        self._chunk_buffers: queue.Queue[NDArray[np.uint8]] = queue.Queue()
        if self._reader is not None:
            for _ in range(self._read_ahead + 1):
                self._chunk_buffers.put(self._reader.buffer())
        self._slots: list[_Slot] = []
        for _ in range(n_slots if self._indices.size else 0):
            buf = torch.empty((self._batch_size, tile_px, tile_px, 3), dtype=torch.uint8, pin_memory=pin_memory)
            self._slots.append(_Slot(buffer=buf, array=buf.numpy()))
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(len(self._slots)):
            self._free.put(i)
        self._ready: queue.Queue[Any] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False

    # -- producer ------------------------------------------------------------------------------
    def _read_group(self, lo: int, hi: int) -> tuple[NDArray[np.uint8], NDArray[np.int64] | None, NDArray[np.uint8] | None]:
        """One chunk's tiles ``indices[lo:hi]``: ``(block, rows, buffer)``.

        The tiles are ``block[rows]`` (``rows`` None: all of ``block``, in order); ``buffer``: the
        chunk buffer ``block`` lies in, to give back once the rows are copied out (None: zarr's array).
        """
        idx = self._indices[lo:hi]
        first, last = int(idx[0]), int(idx[-1])
        if self._reader is None:
            block = self._store.read_tiles(first, last + 1)  # one chunk, decompressed once
            return block, None if idx.size == last - first + 1 else idx - first, None
        chunk_tiles = self._reader.chunk_shape[0]
        chunk = first // chunk_tiles
        buf = self._chunk_buffers.get()
        try:
            self._reader.read(chunk, buf)
        except BaseException:
            self._chunk_buffers.put(buf)
            raise
        lo_row = first - chunk * chunk_tiles
        if idx.size == last - first + 1:  # a run of consecutive tiles: a view, no index
            return buf[lo_row:lo_row + idx.size], None, buf
        return buf, idx - chunk * chunk_tiles, buf

    def _give_back(self, buffer: NDArray[np.uint8] | None) -> None:
        if buffer is not None:
            self._chunk_buffers.put(buffer)

    def _acquire_slot(self) -> int | None:
        while not self._stop.is_set():
            try:
                slot = self._free.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            event = self._slots[slot].event
            if event is not None:
                event.synchronize()  # the device copy out of this buffer must be done before refilling it
                self._slots[slot].event = None
            return slot
        return None

    def _produce(self) -> None:
        try:
            with ThreadPoolExecutor(self._workers, thread_name_prefix="wsi-her2-tiles") as pool:
                pending: deque[tuple[int, int, Future]] = deque()
                try:
                    self._fill_batches(pool, pending)
                finally:
                    for _, _, future in pending:  # stopped early: do not wait for reads nobody wants
                        future.cancel()
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._ready.put(exc)
            return
        self._ready.put(None)

    def _fill_batches(self, pool: ThreadPoolExecutor, pending: deque[tuple[int, int, Future]]) -> None:
        start = 0
        groups = iter(self._groups)
        slot: int | None = None
        fill = 0
        while not self._stop.is_set():
            while len(pending) < self._read_ahead:
                group = next(groups, None)
                if group is None:
                    break
                pending.append((*group, pool.submit(self._read_group, *group)))
            if not pending:
                break
            lo, hi, future = pending.popleft()
            block, rows, buffer = future.result()
            try:
                slot, fill, start = self._pack(block, rows, lo, hi, slot, fill, start)
            finally:
                self._give_back(buffer)
            if slot == -1:  # stopped
                return
        if slot is not None and not self._stop.is_set():
            self._emit(slot, start, fill)

    def _pack(self, block: NDArray[np.uint8], rows: NDArray[np.int64] | None, lo: int, hi: int,
              slot: int | None, fill: int, start: int) -> tuple[int | None, int, int]:
        """Copy one chunk's tiles (``indices[lo:hi]``) into batch slots, emitting each full one.

        Returns the slot being filled, its fill and its first position (slot -1: stopped).
        """
        offset, n = 0, hi - lo
        while offset < n:
            if slot is None:
                slot = self._acquire_slot()
                if slot is None:
                    return -1, fill, start
                fill = 0
                start = lo + offset
            take = min(self._batch_size - fill, n - offset)
            dst = self._slots[slot].array[fill:fill + take]
            if rows is None:
                dst[...] = block[offset:offset + take]
            else:
                np.take(block, rows[offset:offset + take], axis=0, out=dst)
            fill += take
            offset += take
            if fill == self._batch_size:
                self._emit(slot, start, fill)
                slot = None
        return slot, fill, start

    def _emit(self, slot: int, start: int, n: int) -> None:
        # Batches are contiguous runs of ``indices``: ``start`` is where this one begins.
        self._ready.put((slot, start, n))

    # -- consumer ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[TileBatch]:
        if self._started:
            raise RuntimeError("a TileLoader can be iterated once")
        self._started = True
        if self._indices.size == 0:
            return
        self._thread = threading.Thread(target=self._produce, name="wsi-her2-loader", daemon=True)
        self._thread.start()
        while True:
            item = self._ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            slot, start, n = item
            yield TileBatch(
                tiles=self._slots[slot].buffer[:n],
                indices=self._indices[start:start + n],
                slot=slot,
            )

    def release(self, batch: TileBatch, *, event: Any = None) -> None:
        """Give a batch's buffer back; with ``event`` it is refilled only after that event."""
        self._slots[batch.slot].event = event
        self._free.put(batch.slot)

    def close(self) -> None:
        """Stop the background thread (idempotent); call when leaving the loop early."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "TileLoader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
