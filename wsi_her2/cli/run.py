"""``wsi-her2 run``: tile and score a whole cohort on a dask cluster (local, existing scheduler or SLURM)."""
from __future__ import annotations

import argparse
import logging
import sys

from wsi_her2.cli.common import add_tile_options, tile_config_from_args
from wsi_her2.cli.score import add_score_options, score_config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="tile and score a cohort (folder or manifest.csv) on a dask cluster, resumably",
        description="Tile and score every slide of a cohort. Re-running the same command on the same output "
                    "folder does only what is missing; several runners may share one output folder.",
    )
    p.add_argument("source", help="a folder of slides, or a manifest .csv (columns slide, and optionally mpp, label, patient)")
    p.add_argument("-o", "--out", default="wsi-her2-out", help="cohort output folder (default ./wsi-her2-out)")
    p.add_argument("--recursive", action="store_true", help="also look for slides in sub-folders of SOURCE")
    c = p.add_argument_group("cluster (default: a local cluster sized to this machine)")
    c.add_argument("--scheduler", default=None, help="address of a running dask scheduler (tcp://head:8786) or its scheduler JSON file")
    c.add_argument("--workers", type=int, default=None, help="local tiling workers (default: cores, minus one per GPU)")
    c.add_argument("--gpus", default=None, help="local GPUs to score on, e.g. 0,1 (default: all visible; 'none' for CPU only)")
    c.add_argument("--threads", action="store_true", help="local workers as threads of this process, not processes (small runs)")
    c.add_argument("--dashboard-address", default=":8787", help="local dashboard address (default :8787; needs bokeh)")
    s = p.add_argument_group("SLURM (dask-jobqueue)")
    s.add_argument("--slurm", action="store_true", help="start workers as SLURM batch jobs")
    s.add_argument("--jobs", type=int, default=4, help="SLURM jobs to start (default 4)")
    s.add_argument("--queue", default=None, help="SLURM partition")
    s.add_argument("--account", default=None, help="SLURM account")
    s.add_argument("--cores", type=int, default=8, help="cores per job (default 8)")
    s.add_argument("--memory", default="32GB", help="memory per job (default 32GB)")
    s.add_argument("--walltime", default="04:00:00", help="wall time per job (default 04:00:00)")
    s.add_argument("--gpus-per-job", type=int, default=1, choices=(0, 1), help="1: one GPU per job (default); 0: CPU-only jobs")
    s.add_argument("--job-extra", action="append", default=[], help="extra #SBATCH directive, e.g. --job-extra=--constraint=a100 (repeatable)")
    s.add_argument("--prologue", action="append", default=[], help="shell line run before each worker, e.g. 'module load cuda' (repeatable)")
    r = p.add_argument_group("run")
    r.add_argument("--retries", type=int, default=2, help="retries of a slide after a transient failure (default 2)")
    r.add_argument("--retry-failed", action="store_true", help="also retry slides that failed for good in earlier runs")
    r.add_argument("--lock-timeout", type=float, default=300.0, help="seconds without heartbeat before a slide lock counts as abandoned (300)")
    r.add_argument("--no-wait", action="store_true", help="do not wait for slides another runner is processing")
    r.add_argument("--max-in-flight", type=int, default=None, help="slides submitted at once (default: 2 x cluster threads)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_tile_options(p)
    add_score_options(p)
    p.set_defaults(func=run)


def _open_cluster(args: argparse.Namespace):
    from wsi_her2.batch import cluster
    from wsi_her2.errors import ConfigError

    if args.slurm and args.scheduler:
        raise ConfigError("give --slurm or --scheduler, not both")
    if args.scheduler:
        return cluster.existing_cluster(args.scheduler), ("auto", "auto")
    if args.slurm:
        handle = cluster.slurm_cluster(
            jobs=args.jobs, queue=args.queue, account=args.account, cores=args.cores, memory=args.memory,
            walltime=args.walltime, gpus_per_job=args.gpus_per_job, job_extra=args.job_extra, prologue=args.prologue,
        )
        # workers arrive as jobs start: state the resources instead of looking at who is there now
        if args.gpus_per_job:
            return handle, ({cluster.TILE_RESOURCE: 1}, {cluster.SCORE_RESOURCE: 1})
        return handle, (None, None)
    gpus = None
    if args.gpus is not None:
        gpus = [] if args.gpus.strip().lower() in ("none", "", "-1") else [g.strip() for g in args.gpus.split(",")]
    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers must be >= 1")
    handle = cluster.local_cluster(
        n_workers=args.workers, gpus=gpus, processes=not args.threads, dashboard_address=args.dashboard_address,
    )
    return handle, ("auto", "auto")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from wsi_her2.optional import require

    require("distributed", purpose="wsi-her2 run")  # first: it sets its loggers' levels on import

    from wsi_her2.batch.manifest import load_jobs
    from wsi_her2.batch.report import format_agreement
    from wsi_her2.batch.runner import RunConfig, run_cohort
    from wsi_her2.score.pipeline import validate_score_config

    jobs = load_jobs(args.source, recursive=args.recursive)
    tile_config = tile_config_from_args(args, workers=1, progress=False)
    tile_config.validate()
    score_config = score_config_from_args(args, progress=False)
    validate_score_config(score_config)
    _prepare_output(Path(args.out))  # every check before the cluster starts: a bad -o is one line, not a traceback

    for name in ("distributed", "tornado", "bokeh"):  # dask's INFO chatter drowns the progress line
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    out = Path(args.out)
    print(f"wsi-her2 run: {len(jobs)} slides from {args.source} -> {out}", file=sys.stderr)
    handle, (tile_res, score_res) = _open_cluster(args)
    with handle:
        link = handle.dashboard_link
        print(f"  {handle.description}", file=sys.stderr)
        print(f"  dashboard: {link}" if link else "  dashboard: not available (install bokeh)", file=sys.stderr)
        config = RunConfig(
            tile=tile_config, score=score_config, retries=args.retries, lock_timeout_s=args.lock_timeout,
            retry_failed=args.retry_failed, wait_for_others=not args.no_wait, max_in_flight=args.max_in_flight,
            tile_resources=tile_res, score_resources=score_res,
        )
        bar = _ProgressBar(len(jobs), enabled=not args.quiet)
        try:
            result = run_cohort(jobs, out, handle.client, config=config, on_progress=bar.update)
        finally:
            bar.close()
    print(f"{len(result.done)} done, {len(result.failed)} failed, {len(result.pending)} pending of {result.total} slides "
          f"({result.processed_here} processed in {result.seconds:.0f} s"
          + (f", {result.tiles_here / result.seconds:.1f} tiles/s" if result.seconds > 0 else "") + ")")
    for sid, reason in result.failed.items():
        print(f"  FAILED {sid}: {reason}")
    if result.pending:
        print(f"  pending (held by another runner or stopped): {', '.join(result.pending)}")
    print(f"slides table: {result.slides_csv}")
    if result.review_html is not None:
        print(f"review page: {result.review_html}")
    if result.agreement is not None:
        print(format_agreement(result.agreement))
        print(f"agreement report: {out / 'agreement.json'}")
    return result.exit_code


def _prepare_output(out) -> None:
    """The cohort folder and the folders the runner writes in it, made and writable, or one clear error."""
    from wsi_her2.batch.runner import PER_SLIDE_DIRNAME
    from wsi_her2.batch.state import STATE_DIRNAME
    from wsi_her2.files import prepare_output_dir

    prepare_output_dir(out, what="cohort output folder (-o)")
    for name in (PER_SLIDE_DIRNAME, STATE_DIRNAME):
        prepare_output_dir(out / name, what=f"cohort's {name} folder")


class _ProgressBar:
    def __init__(self, total: int, *, enabled: bool) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, disable=not enabled, unit="slide", file=sys.stderr, desc="cohort")
        self._shown = 0

    def update(self, p) -> None:
        finished = p.done + p.failed
        self._bar.update(max(0, finished - self._shown))
        self._shown = max(self._shown, finished)
        self._bar.set_postfix_str(f"done {p.done}, failed {p.failed}, {p.tiles_per_s:.1f} tiles/s")
        if p.event == "failed":
            self._bar.write(f"  failed: {p.slide}")

    def close(self) -> None:
        self._bar.close()
