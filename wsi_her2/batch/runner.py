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

import json
import logging
import os
import shlex
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from wsi_her2 import __version__
from wsi_her2.batch import report
from wsi_her2.batch.cluster import SCORE_RESOURCE, TILE_RESOURCE
from wsi_her2.batch.manifest import SlideJob
from wsi_her2.batch.state import DEFAULT_LOCK_TIMEOUT_S, LockKeeper, LockOwner, SlideState, StateStore, input_key
from wsi_her2.errors import WsiHer2Error
from wsi_her2.files import atomic_write_text
from wsi_her2.tile.pipeline import TileConfig, tile_slide

log = logging.getLogger(__name__)

PER_SLIDE_DIRNAME = "per-slide"
#: Resubmissions of a slide whose tasks were lost with a worker before they started.
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

    result = score_store(store_path, out_dir=out_dir, config=score_config or ScoreConfig())
    return dict(result.row)


def _mark_started(marker: str | None) -> None:
    if marker:  # lets the runner tell a slide that crashed its worker from one only queued there
        Path(marker).touch()


def _tile_task(job: SlideJob, out_dir: str, tile_config: TileConfig, tile_fn: TileFn | None,
               marker: str | None = None) -> dict:
    # workers=1: the cohort's parallelism is dask's (slides side by side on its workers);
    # tile_slide's per-thread state lets one worker process tile slides on several threads at once.
    config = replace(
        tile_config, workers=1, progress=False,
        slide_mpp_um=job.mpp_um if job.mpp_um is not None else tile_config.slide_mpp_um,
    )
    t0 = time.perf_counter()
    _mark_started(marker)
    res = (tile_fn or tile_slide)(job.path, Path(out_dir), config=config)
    return {"store": str(res.store), "n_tiles": int(res.n_tiles), "n_passed": int(res.n_passed),
            "tile_status": res.status, "tile_s": round(time.perf_counter() - t0, 3)}


def _score_task(tiled: dict, out_dir: str, score_config: Any, score_fn: ScoreFn | None,
                marker: str | None = None) -> dict:
    _mark_started(marker)
    t0 = time.perf_counter()
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

    @property
    def exit_code(self) -> int:
        """0: every slide done; 1: some failed; 3: some still pending (another runner, or stopped)."""
        if self.failed:
            return 1
        return 3 if self.pending else 0


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
    config = config or RunConfig()
    out_dir = Path(out_dir)
    per_slide = out_dir / PER_SLIDE_DIRNAME
    per_slide.mkdir(parents=True, exist_ok=True)
    store = StateStore(out_dir, lock_timeout_s=config.lock_timeout_s)
    owner = LockOwner()
    jobs = sorted(jobs, key=lambda j: j.slide_id)
    order = {j.slide_id: i for i, j in enumerate(jobs)}
    _write_cohort_file(out_dir, jobs, config)
    keys = {j.slide_id: _job_key(j, config) for j in jobs}
    t_start = time.time()

    def final_for_us(state: SlideState | None, *, since: float | None) -> bool:
        """Whether a slide needs no work: done, or failed for good (or failed during this run)."""
        if state is None:
            return False
        if state.status == "done":
            return True
        if state.status != "failed" or config.retry_failed and (since is None or state.updated < since):
            return False
        if since is not None and state.updated >= since:
            return True  # another runner gave up on it during this run: do not try again
        return not state.retryable and state.input_key == keys[state.slide_id]

    initial = {j.slide_id: store.read(j.slide_id) for j in jobs}
    todo = [j for j in jobs if not final_for_us(initial[j.slide_id], since=None)]
    base = {"done": sum(1 for j in jobs if initial[j.slide_id] is not None and initial[j.slide_id].status == "done")}
    base["failed"] = len(jobs) - len(todo) - base["done"]
    log.info("%d of %d slides need work (%d already done or failed for good)", len(todo), len(jobs), len(jobs) - len(todo))
    tile_res, score_res = _resources(client, config, wait=bool(todo))
    log.info("tiling tasks ask for %s, scoring tasks for %s", tile_res or "any worker", score_res or "any worker")

    in_flight: dict[Any, dict] = {}  # score future -> {"job", "tile", "attempt", "stage"}
    deferred: list[SlideJob] = []
    counters = {"done": 0, "failed": 0, "tiles": 0, "here": 0}
    last_deferred_check = 0.0

    def progress(slide: str, event: str) -> None:
        if on_progress is not None:
            on_progress(Progress(
                total=len(jobs), done=base["done"] + counters["done"], failed=base["failed"] + counters["failed"],
                elapsed_s=time.time() - t_start, tiles=counters["tiles"], slide=slide, event=event,
                processed_here=counters["here"],
            ))

    def submit(job: SlideJob, attempt: int, tries: int = 1, requeued: int = 0) -> None:
        suffix = f"{job.slide_id}-{attempt}-{owner.token[:8]}"
        markers = [str(store.dir / f".{stage}-{suffix}.started") for stage in ("tile", "score")]
        prio = -order[job.slide_id]  # earlier slides first, so partial cohorts fill in id order
        tile_fut = client.submit(
            _tile_task, job, str(per_slide), config.tile, tile_fn, markers[0], key=f"tile-{suffix}", pure=False,
            resources=tile_res, priority=prio, retries=0,
        )
        # scoring outranks tiling: a tiled slide never waits behind tiling for a free slot
        score_fut = client.submit(
            _score_task, tile_fut, str(per_slide), config.score, score_fn, markers[1], key=f"score-{suffix}", pure=False,
            resources=score_res, priority=prio + 10_000_000, retries=0,
        )
        in_flight[score_fut] = {"job": job, "tile": tile_fut, "attempt": attempt, "tries": tries, "stage": "tile",
                                "markers": markers, "requeued": requeued}
        old = store.read(job.slide_id)
        store.write(SlideState(
            job.slide_id, status="running", stage="tile", attempts=attempt, input_key=keys[job.slide_id],
            n_tiles=getattr(old, "n_tiles", None),
        ))

    def start(job: SlideJob) -> bool:
        lock = store.try_lock(job.slide_id, owner=owner)
        if lock is None:
            return False
        state = store.read(job.slide_id)  # re-read under the lock: another runner may have finished it
        if final_for_us(state, since=t_start) or (state is not None and state.status == "done"):
            lock.release()
            return True
        keeper.add(job.slide_id, lock)
        attempt = 1 if state is None or state.status in ("done", "failed") else state.attempts + 1
        submit(job, attempt)
        return True

    def finish(fut: Any) -> None:
        info = in_flight.pop(fut)
        job, attempt = info["job"], info["attempt"]
        status = fut.status
        res = fut.result() if status == "finished" else None
        exc = _exception_of(fut) if status != "finished" else None
        tile_erred = info["tile"].status == "error"
        # Release now: a result still wanted when its worker dies would be recomputed for nothing.
        fut.release()
        info["tile"].release()
        started = [Path(m).exists() for m in info["markers"]]
        for m in info["markers"]:
            Path(m).unlink(missing_ok=True)
        sid = job.slide_id
        if res is not None:
            row = dict(res["row"])
            store.write(SlideState(
                sid, status="done", stage=None, attempts=attempt, input_key=keys[sid], row=row,
                n_tiles=res["n_tiles"], seconds={"tile": res["tile_s"], "score": res["score_s"]},
            ))
            keeper.release(sid)
            counters["done"] += 1
            counters["here"] += 1
            counters["tiles"] += int(res["n_tiles"])
            log.info("%s: HER2 %s (%d tiles; tile %.1f s, score %.1f s)", sid, row.get("her2_score"),
                     res["n_tiles"], res["tile_s"], res["score_s"])
            progress(sid, "done")
            return
        stage = "tile" if tile_erred else "score"
        kind, reason, retry_now, retry_later = _classify(exc)
        if kind == "KilledWorker" and not started[stage == "score"] and info["requeued"] < _MAX_REQUEUE:
            # never started: it was only queued on a worker that another slide crashed
            log.info("%s: its worker died before it started (another slide's crash); resubmitting", sid)
            submit(job, attempt + 1, info["tries"], info["requeued"] + 1)
            return
        if retry_now and info["tries"] <= config.retries:
            log.warning("%s: %s failed (%s); retry %d of %d", sid, stage, reason, info["tries"], config.retries)
            submit(job, attempt + 1, info["tries"] + 1)
            progress(sid, "retry")
            return
        store.write(SlideState(
            sid, status="failed", stage=stage, attempts=attempt, reason=reason, error_type=kind,
            retryable=retry_later, input_key=keys[sid],
        ))
        keeper.release(sid)
        counters["failed"] += 1
        counters["here"] += 1
        log.warning("%s: failed in %s: %s", sid, stage, reason)
        progress(sid, "failed")

    from distributed import wait

    interrupted = False
    with LockKeeper(interval_s=config.lock_timeout_s / 5) as keeper:
        try:
            while todo or in_flight or (deferred and config.wait_for_others):
                window = config.max_in_flight or _default_window(client)
                while todo and len(in_flight) < window:
                    job = todo.pop(0)
                    if not start(job):
                        deferred.append(job)
                # slides another runner holds: pick them up if it finished, gave up or died
                if deferred and time.time() - last_deferred_check >= config.poll_s:
                    last_deferred_check = time.time()
                    still = []
                    for job in deferred:
                        if final_for_us(store.read(job.slide_id), since=t_start):
                            continue
                        if len(in_flight) >= window or not start(job):
                            still.append(job)
                    deferred = still
                if not in_flight:
                    if todo:
                        continue
                    time.sleep(config.poll_s)
                    continue
                try:
                    done, _ = wait(list(in_flight), timeout=config.poll_s, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    done = set()
                for fut, info in list(in_flight.items()):  # stage shows in `wsi-her2 status`
                    if info["stage"] == "tile" and info["tile"].status == "finished":
                        info["stage"] = "score"
                        state = store.read(info["job"].slide_id)
                        if state is not None and state.status == "running":
                            state.stage = "score"
                            store.write(state)
                for fut in sorted(done, key=lambda f: in_flight[f]["job"].slide_id):
                    finish(fut)
                    if stop_after is not None and counters["here"] >= stop_after:
                        raise _Stop
        except (KeyboardInterrupt, _Stop) as exc:
            interrupted = True
            for fut, info in in_flight.items():
                fut.cancel()
                info["tile"].cancel()
                for m in info["markers"]:
                    Path(m).unlink(missing_ok=True)
                sid = info["job"].slide_id
                store.write(SlideState(sid, status="pending", attempts=info["attempt"] - 1, input_key=keys[sid]))
            in_flight.clear()
            keeper.release_all()
            if isinstance(exc, KeyboardInterrupt):
                raise
        finally:
            keeper.release_all()

    states = _states(store, jobs)
    rows = report.cohort_rows(jobs, states)
    csv_path = report.write_slides_csv(rows, out_dir / "slides.csv")
    agreement = report.agreement_report(rows)
    if agreement is not None:
        report.write_agreement(agreement, out_dir / "agreement.json")
    done_ids = [sid for sid, s in states.items() if s.status == "done"]
    failed = {sid: f"{s.error_type}: {s.reason}" for sid, s in states.items() if s.status == "failed"}
    pending = [j.slide_id for j in jobs if j.slide_id not in done_ids and j.slide_id not in failed]
    result = CohortResult(
        out_dir=out_dir, total=len(jobs), done=sorted(done_ids), failed=dict(sorted(failed.items())), pending=pending,
        processed_here=counters["here"], tiles_here=counters["tiles"], seconds=time.time() - t_start,
        slides_csv=csv_path, agreement=agreement,
    )
    _write_run_json(out_dir, result, config, interrupted=interrupted)
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
