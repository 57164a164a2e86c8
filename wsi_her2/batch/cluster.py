"""Build the dask cluster a cohort runs on: local (default), an existing scheduler, or SLURM.

Workers advertise dask *resources* so the scheduler places work where it belongs:

- ``GPU=1`` on a worker that owns one GPU: every scoring task asks for ``{"GPU": 1}``, so one
  GPU never runs two scoring tasks at once;
- ``CPU=n`` on workers meant for tiling: tiling tasks ask for ``{"CPU": 1}``, so they never
  occupy a GPU worker's slot while a tiled slide waits to be scored.

The runner looks at the connected workers: it only asks for a resource that some worker
advertises, so a plain CPU-only cluster (no resources at all) runs both stages anywhere.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from wsi_her2.cpus import available_cpus

log = logging.getLogger(__name__)

TILE_RESOURCE = "CPU"
SCORE_RESOURCE = "GPU"


def detect_gpus() -> list[str]:
    """CUDA device ids this process may use (honours ``CUDA_VISIBLE_DEVICES``), ``[]`` without CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch, or a broken driver: CPU only
        return []


def dashboard_available() -> bool:
    """The dask dashboard needs bokeh; without it the scheduler runs without one."""
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class ClusterHandle:
    """A connected client, the cluster it owns (None for an existing scheduler) and how to describe it."""

    client: Any
    cluster: Any = None
    kind: str = "local"
    description: str = ""
    resources: dict[str, dict | None] = field(default_factory=dict)

    @property
    def dashboard_link(self) -> str | None:
        if not dashboard_available() and self.cluster is not None:
            return None
        try:
            return self.client.dashboard_link
        except Exception:
            return None

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()

    def __enter__(self) -> "ClusterHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def local_cluster(
    *,
    n_workers: int | None = None,
    gpus: list[str] | None = None,
    processes: bool = True,
    memory_limit: str | int | None = "auto",
    dashboard_address: str | None = ":8787",
) -> ClusterHandle:
    """A cluster on this machine, sized to it (worker logs silenced below CRITICAL: failures are
    recorded per slide in the state files).

    Without GPUs: ``n_workers`` (default: one per core) single-threaded workers that tile and
    score. With GPUs: one single-threaded scoring worker per GPU (``GPU=1``, pinned with
    ``CUDA_VISIBLE_DEVICES``) plus ``n_workers`` (default: cores minus GPUs, at least 1) tiling
    workers (``CPU=1``), so the GPUs are fed while other slides are tiled.

    ``processes=False`` runs workers as threads of this process (faster to start; tiling then
    shares the GIL, so it is for tests and small runs).
    """
    from wsi_her2.optional import require

    require("distributed", purpose="a local dask cluster")
    from distributed import Client, LocalCluster

    cores = available_cpus()
    gpus = detect_gpus() if gpus is None else list(gpus)
    dash = dashboard_address if dashboard_available() else None
    if not gpus:
        n = n_workers or cores
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=processes, dashboard_address=dash,
            memory_limit=memory_limit, silence_logs=logging.CRITICAL,
        )
        desc = f"local cluster: {n} worker {'processes' if processes else 'threads'} (tile + score, CPU)"
        return ClusterHandle(Client(cluster), cluster, "local", desc)

    from distributed import Nanny, Scheduler, SpecCluster, Worker
    from distributed.system import MEMORY_LIMIT

    n_cpu = n_workers or max(1, cores - len(gpus))
    per_worker = int(MEMORY_LIMIT / (n_cpu + len(gpus))) if memory_limit == "auto" else memory_limit
    cls = Nanny if processes else Worker
    workers: dict[str, dict] = {}
    for i in range(n_cpu):
        workers[f"tile-{i}"] = {"cls": cls, "options": {
            "nthreads": 1, "resources": {TILE_RESOURCE: 1}, "memory_limit": per_worker}}
    for gpu in gpus:
        opts: dict[str, Any] = {"nthreads": 1, "resources": {SCORE_RESOURCE: 1}, "memory_limit": per_worker}
        if processes:
            opts["env"] = {"CUDA_VISIBLE_DEVICES": gpu}
        workers[f"gpu-{gpu}"] = {"cls": cls, "options": opts}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": dash, "host": "127.0.0.1"}}
    cluster = SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.CRITICAL, name="wsi-her2")
    desc = f"local cluster: {n_cpu} tiling worker(s) (CPU=1) + {len(gpus)} GPU scoring worker(s) (GPU=1)"
    return ClusterHandle(Client(cluster), cluster, "local", desc)


def existing_cluster(address: str, *, timeout_s: float = 30.0) -> ClusterHandle:
    """Connect to a running scheduler (``tcp://head:8786`` or a scheduler JSON file)."""
    from distributed import Client

    from wsi_her2.errors import ConfigError

    try:
        if address.endswith(".json") and os.path.isfile(address):
            client = Client(scheduler_file=address, timeout=timeout_s)
        else:
            client = Client(address, timeout=timeout_s)
    except (OSError, TimeoutError) as exc:
        raise ConfigError(
            f"cannot reach the dask scheduler at {address} ({exc}); start it with `dask scheduler` "
            "and check the address and firewall"
        ) from exc
    return ClusterHandle(client, None, "scheduler", f"existing scheduler {address}")


def slurm_cluster(*, jobs: int, **options: Any) -> ClusterHandle:
    """:func:`make_slurm_cluster` scaled to ``jobs`` batch jobs, with a client connected."""
    from distributed import Client

    from wsi_her2.errors import ConfigError

    if jobs < 1:
        raise ConfigError("--jobs must be >= 1")
    cluster = make_slurm_cluster(**options)
    cluster.scale(jobs=jobs)
    gpus = options.get("gpus_per_job", 1)
    cores = options.get("cores", 8)
    desc = (f"SLURM: {jobs} job(s) of {cores} cores, {options.get('memory', '32GB')}, {options.get('walltime', '04:00:00')}"
            + (f", 1 GPU each (CPU={max(1, cores - 1)},GPU=1)" if gpus else ", CPU only"))
    return ClusterHandle(Client(cluster), cluster, "slurm", desc)


def make_slurm_cluster(
    *,
    queue: str | None = None,
    account: str | None = None,
    cores: int = 8,
    memory: str = "32GB",
    walltime: str = "04:00:00",
    gpus_per_job: int = 1,
    job_extra: list[str] | None = None,
    prologue: list[str] | None = None,
    local_directory: str | None = None,
    log_directory: str | None = None,
) -> ClusterHandle:
    """A dask-jobqueue ``SLURMCluster`` (no jobs submitted yet; see ``cluster.job_script()``).

    With ``gpus_per_job=1`` each job is one worker process with ``cores`` threads that advertises
    ``CPU=cores-1,GPU=1``: ``cores - 1`` slides are tiled in threads while the job's GPU scores
    one slide at a time. With ``gpus_per_job=0`` each job runs ``cores`` single-threaded
    workers that tile and score on CPU. More GPUs per job are not split between worker
    processes: ask for more jobs instead.
    """
    from wsi_her2.optional import require

    require("dask_jobqueue", purpose="wsi-her2 run --slurm")
    from dask_jobqueue import SLURMCluster

    from wsi_her2.errors import ConfigError

    if gpus_per_job not in (0, 1):
        raise ConfigError("--gpus-per-job must be 0 or 1; ask for more --jobs to use more GPUs")
    if cores < 1:
        raise ConfigError("--cores must be >= 1")
    directives = list(job_extra or [])
    if gpus_per_job:
        directives.append(f"--gres=gpu:{gpus_per_job}")
        processes = 1
        worker_args = ["--resources", f"{TILE_RESOURCE}={max(1, cores - 1)},{SCORE_RESOURCE}=1"]
    else:
        processes = cores
        worker_args = []
    return SLURMCluster(
        queue=queue, account=account, cores=cores, processes=processes, memory=memory, walltime=walltime,
        job_extra_directives=directives, worker_extra_args=worker_args,
        job_script_prologue=list(prologue or []), local_directory=local_directory,
        log_directory=log_directory, scheduler_options={"dashboard_address": ":8787" if dashboard_available() else None},
    )
