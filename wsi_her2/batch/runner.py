"""Run a cohort on a dask cluster: tile on CPU workers, score on GPU workers, resumable and fault-isolated.

For each slide the runner takes the slide's lock (:mod:`wsi_her2.batch.state`), submits a
tiling task (resources ``{"CPU": 1}`` when the cluster has such workers) and a scoring task
that depends on it (``{"GPU": 1}`` likewise), and records the outcome in the slide's state file.
Only a bounded window of slides is in flight (about twice the cluster's threads), so the GPU
always has tiled slides waiting while other slides are tiled, memory stays bounded, and two
runners sharing an output folder interleave instead of one locking everything up front.

Failures stay with their slide:

- errors the package raises on purpose (:class:`~wsi_her2.errors.WsiHer2Error`: corrupt file,
  no MPP, no tissue, ...) are deterministic: recorded, not retried, and not retried by a later
  run either unless the slide file or its settings change (or ``retry_failed``);
- a worker that dies while holding the task (segfault, out of memory) is re-run by dask on
  another worker up to ``distributed.scheduler.allowed-failures`` times; after that
  (``KilledWorker``) the slide counts as a transient failure, because a slide only queued on a
  worker that another slide crashed is counted as well;
- anything else is taken as transient: retried up to ``retries`` times in this run, and again
  by the next run.

Per-slide products go to ``<out>/per-slide/`` (``<id>.zarr``, ``.qc.png``, ``.geojson``,
``.tiles.parquet``, ``.json``, ``.heatmap.png``); cohort products to ``<out>/`` (``slides.csv``,
``agreement.json``, ``run.json``) and ``<out>/state/``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from wsi_her2 import __version__
from wsi_her2.batch import report
from wsi_her2.batch.cluster import SCORE_RESOURCE, TILE_RESOURCE
from wsi_her2.batch.manifest import SlideJob
from wsi_her2.batch.state import DEFAULT_LOCK_TIMEOUT_S, LockKeeper, LockOwner, SlideState, StateStore, input_key
from wsi_her2.cli.exits import ExitCode  # the one table of exit codes (it imports only wsi_her2.errors)
from wsi_her2.errors import WsiHer2Error
from wsi_her2.files import atomic_write_text
from wsi_her2.tile.pipeline import TileConfig, tile_slide

log = logging.getLogger(__name__)

PER_SLIDE_DIRNAME = "per-slide"
#: Resubmissions of a slide whose tasks were lost with a worker that another slide crashed
#: (queued there, or finished there before the scheduler heard); they spend no retry.
_MAX_REQUEUE = 5
#: Exceptions from these packages mean the slide's bytes cannot be decoded: deterministic, not retried.
_DECODER_MODULES = frozenset({"imagecodecs", "tifffile", "openslide", "tiffslide", "PIL"})
COHORT_FILE = "cohort.json"

TileFn = Callable[..., Any]  # tile_slide-compatible: (slide, out_dir, *, config) -> TileResult
ScoreFn = Callable[[Path, Path, Any], dict]  # (store_path, out_dir, score_config) -> slides.csv row


# --- what runs on the workers ----------------------------------------------------------------------
def _score(store_path: Path, out_dir: Path, score_config: Any) -> dict:
    """Score one store with :func:`wsi_her2.score.pipeline.score_store`; the slides.csv row."""
    from wsi_her2.score.pipeline import ScoreConfig, score_store

    # cpu_workers=1: the cohort's parallelism is dask's (slides side by side), as for tiling.
    config = replace(score_config or ScoreConfig(), cpu_workers=1)
    result = score_store(store_path, out_dir=out_dir, config=config)
    return dict(result.row)


def _mark_started(marker: str | None) -> None:
    if marker:  # lets the runner tell a slide that crashed its worker from one only queued there
        Path(marker).touch()


def _ended(marker: str) -> Path:
    """Written when a task's body returns or raises: a worker that dies after that was not killed by it."""
    return Path(marker).with_suffix(".ended")


@contextlib.contextmanager
def _marked(marker: str | None) -> Iterator[None]:
    _mark_started(marker)
    try:
        yield
    finally:
        if marker:
            _ended(marker).touch()


def _tile_task(job: SlideJob, out_dir: str, tile_config: TileConfig, tile_fn: TileFn | None,
               marker: str | None = None) -> dict:
    # workers=1: the cohort's parallelism is dask's (slides side by side on its workers);
    # tile_slide's per-thread state lets one worker process tile slides on several threads at once.
    config = replace(
        tile_config, workers=1, progress=False,
        slide_mpp_um=job.mpp_um if job.mpp_um is not None else tile_config.slide_mpp_um,
    )
    t0 = time.perf_counter()
    with _marked(marker):
        res = (tile_fn or tile_slide)(job.path, Path(out_dir), config=config)
    return {"store": str(res.store), "n_tiles": int(res.n_tiles), "n_passed": int(res.n_passed),
            "tile_status": res.status, "tile_s": round(time.perf_counter() - t0, 3)}


def _score_task(tiled: dict, out_dir: str, score_config: Any, score_fn: ScoreFn | None,
                marker: str | None = None) -> dict:
    t0 = time.perf_counter()
    with _marked(marker):
        row = (score_fn or _score)(Path(tiled["store"]), Path(out_dir), score_config)
    return dict(tiled, row=dict(row), score_s=round(time.perf_counter() - t0, 3))


# --- configuration and results -----------------------------------------------------------------------
@dataclass
class RunConfig:
    """Settings of a cohort run (the per-slide stages keep their own configs)."""

    tile: TileConfig = field(default_factory=TileConfig)
    score: Any = None  # a wsi_her2.score.pipeline.ScoreConfig; None: its defaults
    retries: int = 2
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S
    retry_failed: bool = False
    wait_for_others: bool = True
    max_in_flight: int | None = None  # slides submitted at once; None: 2 x cluster threads
    poll_s: float = 1.0
    tile_resources: dict | None | str = "auto"  # "auto": {"CPU": 1} if some worker advertises CPU
    score_resources: dict | None | str = "auto"  # "auto": {"GPU": 1} if some worker advertises GPU


@dataclass
class Progress:
    total: int
    done: int
    failed: int
    elapsed_s: float
    tiles: int
    slide: str | None = None
    event: str | None = None  # "done" | "failed" | "retry"

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def slides_per_h(self) -> float:
        return 3600.0 * self.processed_here / self.elapsed_s if self.elapsed_s > 0 else 0.0

    processed_here: int = 0


@dataclass
class CohortResult:
    out_dir: Path
    total: int
    done: list[str]
    failed: dict[str, str]  # slide id -> reason
    pending: list[str]  # neither done nor failed (held by another runner, or the run was stopped)
    processed_here: int
    tiles_here: int
    seconds: float
    slides_csv: Path
    agreement: dict | None = None
    review_html: Path | None = None  # the cohort review page (None: it could not be written)

    @property
    def exit_code(self) -> ExitCode:
        """OK: every slide done; PROBLEMS: some failed; UNFINISHED: some still pending (another runner, or stopped)."""
        if self.failed:
            return ExitCode.PROBLEMS
        return ExitCode.UNFINISHED if self.pending else ExitCode.OK


class _Stop(Exception):
    """Raised inside the loop by the ``stop_after`` test hook."""


# --- the runner ------------------------------------------------------------------------------------------
def run_cohort(
    jobs: Sequence[SlideJob],
    out_dir: str | Path,
    client: Any,
    *,
    config: RunConfig | None = None,
    tile_fn: TileFn | None = None,
    score_fn: ScoreFn | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    stop_after: int | None = None,
) -> CohortResult:
    """Tile and score every job on ``client``'s cluster; write state, ``slides.csv`` and the agreement report.

    Parameters
    ----------
    jobs
        The cohort (see :func:`wsi_her2.batch.manifest.load_jobs`).
    out_dir
        Cohort output folder; re-running on the same folder does only what is missing.
    client
        A connected ``distributed.Client``.
    config
        Run settings.
    tile_fn, score_fn
        Replace the tiling (``tile_slide``-compatible) or scoring (``(store, out_dir, score_config)
        -> row``) function run on the workers; must be picklable. For custom stages and tests.
    on_progress
        Called in this process after each slide finishes or fails.
    stop_after
        Stop (as on Ctrl-C) once this many slides have finished in this run; for tests.

    Returns
    -------
    CohortResult
    """
    return _CohortRun(jobs, Path(out_dir), client, config=config or RunConfig(), tile_fn=tile_fn, score_fn=score_fn,
                      on_progress=on_progress, stop_after=stop_after).run()


@dataclass
class _InFlight:
    """One slide on the cluster: its score future's companions and bookkeeping."""

    job: SlideJob
    tile: Any  # the tiling future the score future depends on
    attempt: int
    tries: int
    markers: list[str]  # files the tasks create when they start (tells "never started" from "crashed")
    requeued: int = 0
    stage: str = "tile"  # shown by `wsi-her2 status`


class _CohortRun:
    """One ``run_cohort`` call: the loop that keeps the cluster busy, and what it has counted."""

    def __init__(self, jobs: Sequence[SlideJob], out_dir: Path, client: Any, *, config: RunConfig,
                 tile_fn: TileFn | None, score_fn: ScoreFn | None, on_progress: Callable[[Progress], None] | None,
                 stop_after: int | None) -> None:
        self.config, self.out_dir, self.client = config, out_dir, client
        self.tile_fn, self.score_fn, self.on_progress, self.stop_after = tile_fn, score_fn, on_progress, stop_after
        self.per_slide = out_dir / PER_SLIDE_DIRNAME
        self.per_slide.mkdir(parents=True, exist_ok=True)
        self.store = StateStore(out_dir, lock_timeout_s=config.lock_timeout_s)
        self.owner = LockOwner()
        self.jobs = sorted(jobs, key=lambda j: j.slide_id)
        self.order = {j.slide_id: i for i, j in enumerate(self.jobs)}
        self.keys = {j.slide_id: _job_key(j, config) for j in self.jobs}
        self.t_start = time.time()
        self.in_flight: dict[Any, _InFlight] = {}  # score future -> its slide
        self.deferred: list[SlideJob] = []  # slides another runner holds
        self.done = self.failed = self.tiles = self.here = 0
        self.base_done = self.base_failed = 0
        self.keeper: LockKeeper | None = None

    # --- what needs work ---------------------------------------------------------------------------
    def final_for_us(self, state: SlideState | None, *, since: float | None) -> bool:
        """Whether a slide needs no work: done, or failed for good (or failed during this run)."""
        if state is None:
            return False
        if state.status == "done":
            return True
        if state.status != "failed" or self.config.retry_failed and (since is None or state.updated < since):
            return False
        if since is not None and state.updated >= since:
            return True  # another runner gave up on it during this run: do not try again
        return not state.retryable and state.input_key == self.keys[state.slide_id]

    def progress(self, slide: str, event: str) -> None:
        if self.on_progress is not None:
            self.on_progress(Progress(
                total=len(self.jobs), done=self.base_done + self.done, failed=self.base_failed + self.failed,
                elapsed_s=time.time() - self.t_start, tiles=self.tiles, slide=slide, event=event,
                processed_here=self.here,
            ))

    # --- submitting and finishing ------------------------------------------------------------------
    def submit(self, job: SlideJob, attempt: int, tries: int = 1, requeued: int = 0) -> None:
        suffix = f"{job.slide_id}-{attempt}-{self.owner.token[:8]}"
        markers = [str(self.store.dir / f".{stage}-{suffix}.started") for stage in ("tile", "score")]
        prio = -self.order[job.slide_id]  # earlier slides first, so partial cohorts fill in id order
        tile_fut = self.client.submit(
            _tile_task, job, str(self.per_slide), self.config.tile, self.tile_fn, markers[0], key=f"tile-{suffix}",
            pure=False, resources=self.tile_res, priority=prio, retries=0,
        )
        # scoring outranks tiling: a tiled slide never waits behind tiling for a free slot
        score_fut = self.client.submit(
            _score_task, tile_fut, str(self.per_slide), self.config.score, self.score_fn, markers[1],
            key=f"score-{suffix}", pure=False, resources=self.score_res, priority=prio + 10_000_000, retries=0,
        )
        self.in_flight[score_fut] = _InFlight(job, tile_fut, attempt, tries, markers, requeued)
        old = self.store.read(job.slide_id)
        self.store.write(SlideState(
            job.slide_id, status="running", stage="tile", attempts=attempt, input_key=self.keys[job.slide_id],
            n_tiles=getattr(old, "n_tiles", None),
        ))

    def start(self, job: SlideJob) -> bool:
        """Lock and submit ``job``; False when another runner holds it."""
        lock = self.store.try_lock(job.slide_id, owner=self.owner)
        if lock is None:
            return False
        state = self.store.read(job.slide_id)  # re-read under the lock: another runner may have finished it
        if self.final_for_us(state, since=self.t_start) or (state is not None and state.status == "done"):
            lock.release()
            return True
        self.keeper.add(job.slide_id, lock)
        attempt = 1 if state is None or state.status in ("done", "failed") else state.attempts + 1
        self.submit(job, attempt)
        return True

    def finish(self, fut: Any) -> None:
        info = self.in_flight.pop(fut)
        res = fut.result() if fut.status == "finished" else None
        exc = _exception_of(fut) if fut.status != "finished" else None
        tile_erred = info.tile.status == "error"
        # Release now: a result still wanted when its worker dies would be recomputed for nothing.
        fut.release()
        info.tile.release()
        # a task that started and never ended was running when its worker died
        running = [Path(m).exists() and not _ended(m).exists() for m in info.markers]
        for m in info.markers:
            Path(m).unlink(missing_ok=True)
            _ended(m).unlink(missing_ok=True)
        if res is not None:
            self._record_done(info, res)
        else:
            self._record_failure(info, exc, stage="tile" if tile_erred else "score", running=running)

    def _record_done(self, info: _InFlight, res: dict) -> None:
        sid, row = info.job.slide_id, dict(res["row"])
        self.store.write(SlideState(
            sid, status="done", stage=None, attempts=info.attempt, input_key=self.keys[sid], row=row,
            n_tiles=res["n_tiles"], seconds={"tile": res["tile_s"], "score": res["score_s"]},
        ))
        self.keeper.release(sid)
        self.done += 1
        self.here += 1
        self.tiles += int(res["n_tiles"])
        log.info("%s: HER2 %s (%d tiles; tile %.1f s, score %.1f s)", sid, row.get("her2_score"),
                 res["n_tiles"], res["tile_s"], res["score_s"])
        self.progress(sid, "done")

    def _record_failure(self, info: _InFlight, exc: BaseException | None, *, stage: str, running: list[bool]) -> None:
        job, attempt, sid = info.job, info.attempt, info.job.slide_id
        kind, reason, retry_now, retry_later = _classify(exc)
        if kind == "KilledWorker" and not running[stage == "score"] and info.requeued < _MAX_REQUEUE:
            # a bystander: only queued on a worker another slide crashed, or finished there before the
            # scheduler heard; resubmitted without spending a retry (the slide that crashed it does)
            log.info("%s: lost with a worker another slide crashed; resubmitting", sid)
            self.submit(job, attempt + 1, info.tries, info.requeued + 1)
            return
        if retry_now and info.tries <= self.config.retries:
            log.warning("%s: %s failed (%s); retry %d of %d", sid, stage, reason, info.tries, self.config.retries)
            self.submit(job, attempt + 1, info.tries + 1)
            self.progress(sid, "retry")
            return
        self.store.write(SlideState(
            sid, status="failed", stage=stage, attempts=attempt, reason=reason, error_type=kind,
            retryable=retry_later, input_key=self.keys[sid],
        ))
        self.keeper.release(sid)
        self.failed += 1
        self.here += 1
        log.warning("%s: failed in %s: %s", sid, stage, reason)
        self.progress(sid, "failed")

    # --- the loop ----------------------------------------------------------------------------------
    def run(self) -> CohortResult:
        _write_cohort_file(self.out_dir, self.jobs, self.config)
        initial = {j.slide_id: self.store.read(j.slide_id) for j in self.jobs}
        todo = [j for j in self.jobs if not self.final_for_us(initial[j.slide_id], since=None)]
        self.base_done = sum(1 for s in initial.values() if s is not None and s.status == "done")
        self.base_failed = len(self.jobs) - len(todo) - self.base_done
        log.info("%d of %d slides need work (%d already done or failed for good)",
                 len(todo), len(self.jobs), len(self.jobs) - len(todo))
        self.tile_res, self.score_res = _resources(self.client, self.config, wait=bool(todo))
        log.info("tiling tasks ask for %s, scoring tasks for %s",
                 self.tile_res or "any worker", self.score_res or "any worker")
        interrupted = False
        with LockKeeper(interval_s=self.config.lock_timeout_s / 5) as self.keeper:
            try:
                self._loop(todo)
            except (KeyboardInterrupt, _Stop) as exc:
                interrupted = True
                self._abandon_in_flight()
                if isinstance(exc, KeyboardInterrupt):
                    raise
            finally:
                self.keeper.release_all()
        return self._summarise(interrupted)

    def _loop(self, todo: list[SlideJob]) -> None:
        from distributed import wait

        last_deferred_check = 0.0
        while todo or self.in_flight or (self.deferred and self.config.wait_for_others):
            window = self.config.max_in_flight or _default_window(self.client)
            while todo and len(self.in_flight) < window:
                job = todo.pop(0)
                if not self.start(job):
                    self.deferred.append(job)
            if self.deferred and time.time() - last_deferred_check >= self.config.poll_s:
                last_deferred_check = time.time()
                self._retry_deferred(window)
            if not self.in_flight:
                if not todo:
                    time.sleep(self.config.poll_s)
                continue
            try:
                done, _ = wait(list(self.in_flight), timeout=self.config.poll_s, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            self._note_stages()
            for fut in sorted(done, key=lambda f: self.in_flight[f].job.slide_id):
                self.finish(fut)
                if self.stop_after is not None and self.here >= self.stop_after:
                    raise _Stop

    def _retry_deferred(self, window: int) -> None:
        """Slides another runner held: pick them up if it finished, gave up or died."""
        still = []
        for job in self.deferred:
            if self.final_for_us(self.store.read(job.slide_id), since=self.t_start):
                continue
            if len(self.in_flight) >= window or not self.start(job):
                still.append(job)
        self.deferred = still

    def _note_stages(self) -> None:
        """A slide whose tiling finished is at the scoring stage (shown by `wsi-her2 status`)."""
        for info in self.in_flight.values():
            if info.stage == "tile" and info.tile.status == "finished":
                info.stage = "score"
                state = self.store.read(info.job.slide_id)
                if state is not None and state.status == "running":
                    state.stage = "score"
                    self.store.write(state)

    def _abandon_in_flight(self) -> None:
        """Ctrl-C (or ``stop_after``): cancel what runs; those slides are pending for the next run."""
        for fut, info in self.in_flight.items():
            fut.cancel()
            info.tile.cancel()
            for m in info.markers:
                Path(m).unlink(missing_ok=True)
                _ended(m).unlink(missing_ok=True)
            sid = info.job.slide_id
            self.store.write(SlideState(sid, status="pending", attempts=info.attempt - 1, input_key=self.keys[sid]))
        self.in_flight.clear()
        self.keeper.release_all()

    def _write_review(self) -> Path | None:
        """``review.html`` over the cohort, with the manifest's labels; a failure here never fails the run."""
        from wsi_her2.outputs.review import write_review

        labels = {j.slide_id: j.label for j in self.jobs if j.label} or None
        try:
            return write_review(self.out_dir, labels=labels)
        except Exception as exc:  # the slides' own outputs are all written: say so and go on
            log.warning("%s: the review page was not written (%s: %s); run `wsi-her2 review %s`", self.out_dir,
                        type(exc).__name__, exc, self.out_dir)
            return None

    def _summarise(self, interrupted: bool) -> CohortResult:
        # A task that dask re-ran after its worker died (a duplicate of one already finished) may
        # have left its start marker after we removed ours: this run's markers all go now.
        for marker in self.store.dir.glob(f".*-{self.owner.token[:8]}.*"):
            marker.unlink(missing_ok=True)
        states = _states(self.store, self.jobs)
        rows = report.cohort_rows(self.jobs, states)
        csv_path = report.write_slides_csv(rows, self.out_dir / "slides.csv")
        agreement = report.agreement_report(rows)
        if agreement is not None:
            report.write_agreement(agreement, self.out_dir / "agreement.json")
        done_ids = [sid for sid, s in states.items() if s.status == "done"]
        failed = {sid: f"{s.error_type}: {s.reason}" for sid, s in states.items() if s.status == "failed"}
        pending = [j.slide_id for j in self.jobs if j.slide_id not in done_ids and j.slide_id not in failed]
        result = CohortResult(
            out_dir=self.out_dir, total=len(self.jobs), done=sorted(done_ids), failed=dict(sorted(failed.items())),
            pending=pending, processed_here=self.here, tiles_here=self.tiles, seconds=time.time() - self.t_start,
            slides_csv=csv_path, agreement=agreement, review_html=self._write_review(),
        )
        _write_run_json(self.out_dir, result, self.config, interrupted=interrupted)
        return result


# --- helpers ------------------------------------------------------------------------------------------
def _states(store: StateStore, jobs: Sequence[SlideJob]) -> dict[str, SlideState]:
    out = {}
    for job in jobs:
        state = store.read(job.slide_id)
        if state is not None:
            out[job.slide_id] = state
    return out


def _job_key(job: SlideJob, config: RunConfig) -> str:
    return input_key(job.path, mpp_um=job.mpp_um if job.mpp_um is not None else config.tile.slide_mpp_um,
                     extra=str(config.tile.mpp_csv or ""))


def _exception_of(fut: Any) -> BaseException:
    try:
        exc = fut.exception()
    except Exception as err:  # cancelled futures raise instead of returning their exception
        return err
    return exc if exc is not None else RuntimeError(f"task ended with status {fut.status}")


def _classify(exc: BaseException) -> tuple[str, str, bool, bool]:
    """``(error type, reason, retry in this run, retry in a later run)`` for a failed slide."""
    name = type(exc).__name__
    text = " ".join(str(exc).split()) or name
    if isinstance(exc, WsiHer2Error):
        return name, text, False, False  # deterministic: the same input fails the same way
    if type(exc).__module__.split(".")[0] in _DECODER_MODULES:
        # a decoder choking on the file's bytes fails the same way every time: a corrupt slide
        return name, f"cannot decode the slide's pixels ({text}); the file may be truncated or corrupt: re-copy it", False, False
    if name == "KilledWorker":
        # Dask already re-ran the task after each worker death, but a task merely queued on a worker
        # that another slide crashed is counted too: retry, so an innocent slide is not failed.
        return name, (f"the worker running it died (crash or out of memory) on every attempt; "
                      f"check the worker logs ({text})"), True, True
    if name == "CancelledError":
        return name, "the task was cancelled (scheduler restarted or lost); re-run to retry", True, True
    tail = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return name, tail, True, True


def _resources(client: Any, config: RunConfig, *, wait: bool) -> tuple[dict | None, dict | None]:
    if config.tile_resources != "auto" and config.score_resources != "auto":
        return config.tile_resources, config.score_resources  # type: ignore[return-value]
    if wait:
        client.wait_for_workers(1, timeout=None)
    workers = client.scheduler_info(n_workers=-1)["workers"].values() if _takes_n_workers(client) else client.scheduler_info()["workers"].values()
    advertised = set()
    for w in workers:
        advertised.update((w.get("resources") or {}).keys())
    tile = config.tile_resources
    score = config.score_resources
    if tile == "auto":
        tile = {TILE_RESOURCE: 1} if TILE_RESOURCE in advertised else None
    if score == "auto":
        score = {SCORE_RESOURCE: 1} if SCORE_RESOURCE in advertised else None
    return tile, score


def _takes_n_workers(client: Any) -> bool:
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        return False


def _default_window(client: Any) -> int:
    try:
        threads = sum(client.nthreads().values())
    except Exception:
        threads = 2
    return max(4, 2 * threads)


def _write_cohort_file(out_dir: Path, jobs: Sequence[SlideJob], config: RunConfig) -> None:
    """The job list, so `wsi-her2 status` knows the slides not yet started."""
    data = {"jobs": [j.to_dict() for j in jobs], "per_slide_dir": PER_SLIDE_DIRNAME}
    atomic_write_text(out_dir / COHORT_FILE, json.dumps(data, indent=1, sort_keys=True) + "\n")


def _config_dict(config: RunConfig) -> dict:
    out = {k: v for k, v in asdict(config).items() if k not in ("tile", "score")}
    out["tile"] = asdict(config.tile)
    try:
        out["score"] = asdict(config.score) if config.score is not None else None
    except TypeError:
        out["score"] = repr(config.score)
    return out


def _write_run_json(out_dir: Path, result: CohortResult, config: RunConfig, *, interrupted: bool) -> None:
    data = {
        "package": "wsi-her2",
        "package_version": __version__,
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "interrupted": interrupted,
        "seconds": round(result.seconds, 2),
        "slides": {"total": result.total, "done": len(result.done), "failed": len(result.failed),
                   "pending": len(result.pending), "processed_by_this_run": result.processed_here},
        "tiles_per_s": round(result.tiles_here / result.seconds, 2) if result.seconds > 0 else None,
        "config": _config_dict(config),
    }
    atomic_write_text(out_dir / "run.json", json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
