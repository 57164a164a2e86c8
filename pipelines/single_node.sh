#!/usr/bin/env bash
# One machine (a workstation, or one GPU node of a cluster): a local dask cluster sized to it.
# One scoring worker per visible GPU (dask resource GPU=1) and one tiling worker per remaining core.
#
#   pipelines/single_node.sh SLIDES_DIR_OR_MANIFEST OUT_DIR [extra wsi-her2 run options]
#
# Re-run the same command after an interruption: finished slides are skipped.
set -euo pipefail
src="${1:?usage: $0 SLIDES_DIR_OR_MANIFEST OUT_DIR [options]}"
out="${2:?usage: $0 SLIDES_DIR_OR_MANIFEST OUT_DIR [options]}"
shift 2

# Keep numeric libraries to one thread per worker process (dask sets this for its workers too).
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

# --gpus defaults to every GPU in CUDA_VISIBLE_DEVICES; restrict with e.g. --gpus 0,1
status=0
wsi-her2 run "$src" -o "$out" "$@" || status=$?
wsi-her2 status "$out" || true
exit $status
