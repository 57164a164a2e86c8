"""The rule-based ``ihc_dab`` on CPU, chunk by chunk, on every CPU: this process and worker processes.

Why processes and not threads: the OpenCV kernel (:mod:`wsi_her2.models.ihc_cpu_kernel`) makes
~100 small calls per tile with Python in between, and tile threads of one process queue for
the GIL on that glue: measured on this project's 2-core machine, two kernel threads gave
1.1-1.3x the rate of one, two processes 2x.

A worker imports no torch (numpy, OpenCV, imagecodecs: it starts in ~0.2 s, not the ~2 s of
torch). It reads a chunk file of the store, checks its CRC32C, decodes it and runs the kernel
on the chunk's tiles to score, and sends back their evidence (per-tile statistics, per-nucleus
ray maxima: ~5 KB a tile). This process turns each chunk's evidence into measurements with
the scorer's shared steps 4-6 (torch), in store order, and scores chunks itself whenever the
next result is not ready (while the workers start, and as one of them after). The numbers are
those of the in-process kernel: the same functions on the same pixels
(``tests/test_cpu_pool.py``).

Used by :func:`wsi_her2.score.inference.predict_store` when it applies: with one CPU, without
workers (no reading threads to pay for); with more, when asked (``cpu_workers``, which
``wsi-her2 score`` sets to every CPU). Everything else (GPU, trained networks, TTA, stores not
of JPEG tiles) takes the batch loop.
"""
from __future__ import annotations

import multiprocessing
import uuid
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Iterator

import numpy as np
from numpy.typing import NDArray

from wsi_her2.errors import WsiHer2Error
from wsi_her2.cpus import available_cpus
from wsi_her2.models.ihc_cpu_kernel import ChunkEvidence, KernelPlan, chunk_evidence
from wsi_her2.score.cells import cells_to_host
from wsi_her2.store.chunk_file import decode_jpeg_chunk, failure_text

__all__ = ["MAX_DEFAULT_PROCESSES", "TILES_PER_PROCESS", "ChunkPool", "ChunkUnreadable", "score_chunks", "workers_for"]

#: Tiles each process should have at least: a worker costs ~0.23 s to start (spawned side by
#: side), ~1/2 s of scoring at ~1 ms a tile. So 2 processes from 1,024 tiles on.
TILES_PER_PROCESS = 512
#: Processes when none are asked for, however many CPUs: each holds ~70 MB (interpreter,
#: OpenCV, a chunk buffer), and a slide of 10,000 tiles has ~160 chunks to share.
MAX_DEFAULT_PROCESSES = 16
#: Chunks in flight per worker: enough that none waits for the parent, few enough that results
#: waiting to be turned into measurements stay a few MB.
_CHUNKS_AHEAD_PER_WORKER = 2
#: Chunks this process may score ahead of a worker's late result (their evidence waits in
#: memory, ~0.35 MB a chunk); beyond it, it waits for the worker.
_MAX_AHEAD_HERE = 8


class ChunkUnreadable(Exception):
    """A chunk file a worker could not read (missing, failing its checksum, not decodable)."""


class _ChunkScorer:
    """Decodes chunk files into one reused buffer and runs the kernel on their tiles."""

    def __init__(self, plan: KernelPlan, chunk_shape: tuple[int, int, int, int]) -> None:
        self.plan = plan
        self.buffer = np.empty(chunk_shape, np.uint8)

    def __call__(self, path: str, rows: NDArray[np.int64] | None) -> list[ChunkEvidence]:
        """The evidence of chunk file ``path``'s tiles ``rows`` (None: all of them)."""
        try:
            decode_jpeg_chunk(path, self.buffer)
        except Exception as exc:  # missing file, checksum mismatch, undecodable or wrongly sized JPEG
            raise ChunkUnreadable(failure_text(exc)) from None
        tiles = self.buffer if rows is None else self.buffer[rows]
        return chunk_evidence(np.moveaxis(tiles, -1, 1), self.plan)  # (T, 3, H, W) view, channels-last memory


#: In a worker process: its chunk scorers by run (a pool serves the stores of a command one
#: after another), the latest last; each holds a chunk buffer (~10 MB) and kernel buffers.
_WORKER_SCORERS: dict[str, _ChunkScorer] = {}
_WORKER_SCORERS_KEPT = 2


def _start_worker() -> None:
    import cv2

    # This process is the pool's own (spawned for it, gone with it), so setting its OpenCV pool
    # is no side effect on the caller: the workers are the parallelism, OpenCV's threads would spin.
    cv2.setNumThreads(1)


def _score_chunk(run: str, plan: KernelPlan, chunk_shape: tuple[int, int, int, int], path: str,
                 rows: NDArray[np.int64] | None) -> list[ChunkEvidence]:
    """In a worker: chunk ``path``'s evidence for run ``run`` (its plan comes with every task: ~5 KB)."""
    scorer = _WORKER_SCORERS.pop(run, None) or _ChunkScorer(plan, chunk_shape)
    _WORKER_SCORERS[run] = scorer  # the latest last
    while len(_WORKER_SCORERS) > _WORKER_SCORERS_KEPT:
        del _WORKER_SCORERS[next(iter(_WORKER_SCORERS))]
    return scorer(path, rows)


class ChunkPool:
    """Worker processes kept for the stores a command scores one after another (caller-held, like
    :class:`~wsi_her2.score.inference.StepCache`): each store would otherwise pay ~0.23 s to start
    its workers. ``with ChunkPool() as pool``; a pool whose worker died is closed by
    :func:`score_chunks` and started afresh for the next store."""

    def __init__(self) -> None:
        self._executor: ProcessPoolExecutor | None = None
        self._size = 0

    def executor(self, helpers: int) -> ProcessPoolExecutor | None:
        """At least ``helpers`` worker processes (None for 0), started on first use."""
        if helpers < 1:
            return None
        if self._executor is None or self._size < helpers:
            self.close()
            self._executor = ProcessPoolExecutor(helpers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_start_worker)
            self._size = helpers
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor, self._size = None, 0

    def __enter__(self) -> "ChunkPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _done(fn: Any, *args: Any) -> Future:
    """``fn(*args)`` run now, as a finished future (its exception kept for ``result()``)."""
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:  # raised to the caller by future.result(), as from a worker
        future.set_exception(exc)
    return future


def workers_for(requested: int | None, n_tiles: int) -> int:
    """Processes to score ``n_tiles`` tiles with (this one and that many minus one workers):
    ``requested`` (None: every CPU this process may use, at most :data:`MAX_DEFAULT_PROCESSES`),
    at most one per :data:`TILES_PER_PROCESS` tiles; 0 (no workers) when that leaves fewer than 2."""
    want = min(available_cpus(), MAX_DEFAULT_PROCESSES) if requested is None else int(requested)
    n = min(want, n_tiles // TILES_PER_PROCESS)
    return n if n >= 2 else 0


def _tasks(reader: Any, idx: NDArray[np.int64]) -> Iterator[tuple[int, int, str, NDArray[np.int64] | None]]:
    """``(lo, hi, chunk file, rows)`` per chunk: ``idx[lo:hi]`` are its tiles, ``rows`` their rows (None: all)."""
    from wsi_her2.score.loader import chunk_groups

    n = reader.chunk_shape[0]
    for lo, hi in chunk_groups(idx, n):
        chunk = int(idx[lo]) // n
        rows = idx[lo:hi] - chunk * n
        whole = rows.size == n and int(rows[-1]) == n - 1
        yield lo, hi, str(reader.chunk_path(chunk)), None if whole else rows


def _in_order(tasks: list[tuple], here: _ChunkScorer, pool: ProcessPoolExecutor | None,
              window: int, run: str) -> Iterator[tuple[int, int, Future]]:
    """Yield ``(lo, hi, future)`` per task, in task order, each chunk scored by a worker or here.

    Workers are kept ``window`` chunks ahead; whenever the next result in order is not ready,
    this process scores the next chunk itself instead of waiting (so it works while the workers
    start, ~0.2 s, and as one of them after: ``N`` CPUs are ``N - 1`` workers and this process).
    """
    pending: deque[tuple[int, int, Future]] = deque()
    try:
        yield from _schedule(tasks, here, pool, window, run, pending)
    finally:  # closed early (an error): the pool may serve other stores, so drop this one's queued chunks
        for *_, future in pending:
            future.cancel()


def _schedule(tasks: list[tuple], here: _ChunkScorer, pool: ProcessPoolExecutor | None, window: int, run: str,
              pending: deque[tuple[int, int, Future]]) -> Iterator[tuple[int, int, Future]]:
    queued = 0  # tasks handed out so far
    while queued < len(tasks) or pending:
        in_pool = sum(1 for *_, f in pending if not f.done())
        while pool is not None and queued < len(tasks) and in_pool < window:
            lo, hi, path, rows = tasks[queued]
            pending.append((lo, hi, pool.submit(_score_chunk, run, here.plan, here.buffer.shape, path, rows)))
            queued, in_pool = queued + 1, in_pool + 1
        if pending and (pending[0][2].done() or queued == len(tasks) or len(pending) >= window + _MAX_AHEAD_HERE):
            yield pending.popleft()
        elif queued < len(tasks):
            lo, hi, path, rows = tasks[queued]
            pending.append((lo, hi, _done(here, path, rows)))
            queued += 1


def score_chunks(store: Any, scorer: Any, idx: NDArray[np.int64], *, workers: int, bar: Any = None,
                 pool: ChunkPool | None = None) -> list[tuple]:
    """Score tiles ``idx`` of a JPEG patch store with ``scorer`` (an ``IhcDabScorer``) chunk by chunk
    on ``workers`` CPUs: this process and ``workers - 1`` worker processes (0 or 1: this process
    alone); :func:`predict_store`'s host parts ``(indices, probs, measurements, cells)``, in order.

    ``pool``: the caller's :class:`ChunkPool`, kept across stores (default: one for this call).
    A chunk a worker cannot read raises the store's ``StoreError``, as the batch loop does.
    """
    own = pool is None
    pool = ChunkPool() if own else pool
    try:
        return _score_chunks(store, scorer, idx, workers=workers, bar=bar, pool=pool)
    finally:
        if own:
            pool.close()


def _score_chunks(store: Any, scorer: Any, idx: NDArray[np.int64], *, workers: int, bar: Any, pool: ChunkPool) -> list[tuple]:
    from wsi_her2.models.ihc_score_cpu import kernel_plan
    from wsi_her2.store.tile_reader import jpeg_chunk_reader

    reader = jpeg_chunk_reader(store)
    plan = kernel_plan(scorer, *reader.chunk_shape[1:3])
    helpers = max(0, workers - 1)  # this process is one of the workers
    run = uuid.uuid4().hex  # the workers' key for this store's plan and buffers
    try:
        here = _ChunkScorer(plan, reader.chunk_shape)
        results = _in_order(list(_tasks(reader, idx)), here, pool.executor(helpers), helpers * _CHUNKS_AHEAD_PER_WORKER, run)
        try:
            return [_measured(reader, scorer, plan, idx, lo, hi, future, bar) for lo, hi, future in results]
        finally:
            results.close()  # after an error: this store's chunks still queued are dropped
    except BrokenProcessPool:  # from a result, or from handing the broken pool the next chunk
        pool.close()
        raise WsiHer2Error(
            "a scoring worker process ended abruptly (killed, or out of memory?); nothing was written "
            "for this slide: run the command again, or with --workers 1") from None


def _measured(reader: Any, scorer: Any, plan: KernelPlan, idx: NDArray[np.int64], lo: int, hi: int, future: Future,
              bar: Any) -> tuple:
    """The host part ``(indices, probs, measurements, cells)`` of tiles ``idx[lo:hi]`` from their chunk's evidence."""
    import torch

    from wsi_her2.models.ihc_score_cpu import evidence_from_chunks

    try:
        chunks = future.result()
    except ChunkUnreadable as exc:
        raise reader.unreadable(int(idx[lo]) // reader.chunk_shape[0], str(exc)) from None
    n = hi - lo
    with torch.inference_mode():
        meas = scorer.measure_evidence(evidence_from_chunks(chunks, scorer, plan, n), (n, 3, plan.h, plan.w))
    probs = meas.pop("probs").float()
    cells = cells_to_host(meas.pop("cells", None), idx[lo:hi])
    if bar is not None:
        bar.update(n)
    return idx[lo:hi], probs, {k: v.float() for k, v in meas.items()}, cells
