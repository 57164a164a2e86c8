"""Cohort runs on dask distributed: many slides, tiled on CPU workers and scored on GPU workers.

``wsi-her2 run`` and ``wsi-her2 status`` are the command-line faces of this package:

- :mod:`~wsi_her2.batch.manifest`: a folder of slides or a manifest CSV -> :class:`SlideJob` list;
- :mod:`~wsi_her2.batch.state`: per-slide state files and expiring locks (resume, no double work);
- :mod:`~wsi_her2.batch.cluster`: local, existing-scheduler and SLURM clusters;
- :mod:`~wsi_her2.batch.runner`: the orchestration (:func:`run_cohort`);
- :mod:`~wsi_her2.batch.report`: ``slides.csv`` and the agreement report.

Import the submodules directly; this package imports nothing heavy.
"""
from __future__ import annotations
