#!/usr/bin/env bash
# SLURM via dask-jobqueue: this script runs the scheduler and the runner (on a login node, or
# better inside a small long-running job); the workers are submitted as SLURM jobs, one GPU each.
#
#   pipelines/slurm_cluster.sh SLIDES_DIR_OR_MANIFEST OUT_DIR [options]
#
# Each job: --cores cores, one worker process advertising CPU=cores-1,GPU=1 (tile cores-1 slides
# at a time, score one at a time on the GPU). Adjust the partition, account and sizes below.
set -euo pipefail
src="${1:?usage: $0 SLIDES_DIR_OR_MANIFEST OUT_DIR [options]}"
out="${2:?usage: $0 SLIDES_DIR_OR_MANIFEST OUT_DIR [options]}"
shift 2
status=0
wsi-her2 run "$src" -o "$out" --slurm \
  --jobs "${JOBS:-20}" --queue "${QUEUE:-gpu}" ${ACCOUNT:+--account "$ACCOUNT"} \
  --cores "${CORES:-8}" --memory "${MEMORY:-32GB}" --walltime "${WALLTIME:-04:00:00}" \
  --gpus-per-job 1 --prologue "${PROLOGUE:-source $HOME/venvs/wsi-her2/bin/activate}" \
  "$@" || status=$?
wsi-her2 status "$out" || true
exit $status
