#!/usr/bin/env bash
# Use a dask cluster that is already running (started by you or your platform).
#
# Start it once, e.g. on a head node and on the worker machines:
#   dask scheduler --port 8786 --dashboard-address :8787
#   dask worker tcp://head:8786 --nworkers 8 --nthreads 1 --resources "CPU=1"    # tiling machines
#   CUDA_VISIBLE_DEVICES=0 dask worker tcp://head:8786 --nthreads 1 --resources "GPU=1"   # one per GPU
#
# Workers need wsi-her2 installed (same version) and must see the slides and the output folder
# at the same paths as this script (a shared file system).
#
#   pipelines/existing_cluster.sh tcp://head:8786 SLIDES_DIR_OR_MANIFEST OUT_DIR [options]
set -euo pipefail
scheduler="${1:?usage: $0 SCHEDULER SLIDES_DIR_OR_MANIFEST OUT_DIR [options]}"
src="${2:?usage: $0 SCHEDULER SLIDES_DIR_OR_MANIFEST OUT_DIR [options]}"
out="${3:?usage: $0 SCHEDULER SLIDES_DIR_OR_MANIFEST OUT_DIR [options]}"
shift 3
status=0
wsi-her2 run "$src" -o "$out" --scheduler "$scheduler" "$@" || status=$?
wsi-her2 status "$out" || true
exit $status
