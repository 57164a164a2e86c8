"""Argument groups shared by several commands (so tile, run and demo cannot drift apart)."""
from __future__ import annotations

import argparse
import contextlib
from typing import Iterator

from wsi_her2.errors import ConfigError
from wsi_her2.tile.qc import BLUR_METRICS, QcParams
from wsi_her2.tile.tissue import THUMB_MAX_MPP_UM, THUMB_MPP_UM, TissueParams
from wsi_her2.store.codecs import DEFAULT_TILE_CODEC, TILE_CODECS


def add_tile_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("tiling")
    g.add_argument("--mpp", dest="target_mpp_um", type=float, default=0.5, help="tile resolution in µm/px (default 0.5, i.e. 20x)")
    g.add_argument("--tile-px", type=int, default=224, help="tile size in pixels at --mpp (default 224)")
    g.add_argument("--stride-px", type=int, default=None, help="grid step in pixels (default: --tile-px, no overlap)")
    g.add_argument("--overlap-px", type=int, default=None, help="overlap between neighbouring tiles (stride = tile - overlap)")
    g.add_argument("--backend", choices=("auto", "openslide", "tiffslide"), default="auto", help="slide reader (auto falls back)")
    g.add_argument("--slide-mpp", dest="slide_mpp_um", type=float, default=None, help="override the slide's level-0 µm/px")
    g.add_argument("--mpp-csv", default=None, help="CSV with columns slide,mpp for slides whose metadata lacks MPP")
    g.add_argument("--codec", choices=TILE_CODECS, default=DEFAULT_TILE_CODEC,
                   help=f"tile compression (default {DEFAULT_TILE_CODEC}): zstd / lz4 / none are lossless; jpeg (quality 90, "
                        "4:4:4) stores 5-8x fewer bytes than zstd and is faster to write, at a small pixel change "
                        "(README, Tile codecs)")
    g.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of the jpeg codec, 50-100 (default 90)")
    g.add_argument("--chunk-tiles", type=int, default=64, help="tiles per zarr chunk and per work unit")
    g.add_argument("--allow-subsampled-chroma", dest="sharp_chroma", action="store_false",
                   help="read the coarsest pyramid level fine enough for --mpp even when its JPEG colour is subsampled "
                        "(faster at --mpp 1.0; default: a level whose colour is as sharp as --mpp, as thin brown "
                        "membranes turn grey at half-resolution colour)")
    g.add_argument("--thumb-mpp", dest="thumb_mpp_um", type=float, default=None,
                   help=f"thumbnail resolution for tissue detection, µm/px (default: a pyramid level of "
                        f"{THUMB_MPP_UM:g}-{THUMB_MAX_MPP_UM:g} µm/px, else {THUMB_MPP_UM:g}: nuclei and fibres still make texture)")
    q = parser.add_argument_group("quality control (defaults from the source papers)")
    q.add_argument("--min-tissue", type=float, default=0.40, help="minimum tissue fraction of a usable tile (0.40)")
    q.add_argument("--blur-metric", choices=BLUR_METRICS, default=QcParams.blur_metric,
                   help="focus measure that flags blurry tiles: 'sharpness' (contrast-normalised, in µm; default) "
                        "or 'laplacian' (the papers' Laplacian variance, with --min-laplacian-var)")
    q.add_argument("--min-sharpness", type=float, default=QcParams.min_sharpness,
                   help=f"tiles below this sharpness are blurry ({QcParams.min_sharpness})")
    q.add_argument("--min-laplacian-var", type=float, default=QcParams.min_laplacian_var,
                   help="with --blur-metric laplacian: tiles below this Laplacian variance are blurry (75)")
    q.add_argument("--max-gray", type=float, default=None,
                   help="also tissue: pixels darker than this grey level (the papers' 220; off by default: wrong on grey glass)")
    q.add_argument("--min-od", type=float, default=TissueParams.min_od_sum,
                   help=f"floor of the tissue absorbance threshold, summed OD vs glass ({TissueParams.min_od_sum})")
    q.add_argument("--max-pen", type=float, default=0.05, help="tiles with more marker ink than this fraction are rejected (0.05)")


def tile_config_from_args(args: argparse.Namespace, *, workers: int, progress: bool):
    from wsi_her2.tile.pipeline import TileConfig

    stride = args.stride_px
    if args.overlap_px is not None:
        if stride is not None:
            raise ConfigError("give --stride-px or --overlap-px, not both")
        if not 0 <= args.overlap_px < args.tile_px:
            raise ConfigError(f"--overlap-px must be in [0, {args.tile_px})")
        stride = args.tile_px - args.overlap_px
    return TileConfig(
        target_mpp_um=args.target_mpp_um,
        tile_px=args.tile_px,
        stride_px=stride,
        backend=args.backend,
        slide_mpp_um=args.slide_mpp_um,
        mpp_csv=args.mpp_csv,
        workers=workers,
        chunk_tiles=args.chunk_tiles,
        codec=args.codec,
        jpeg_quality=args.jpeg_quality,
        thumb_mpp_um=args.thumb_mpp_um,
        sharp_chroma=getattr(args, "sharp_chroma", True),
        tissue=TissueParams(max_gray=args.max_gray, min_od_sum=args.min_od),
        qc=QcParams(min_tissue_fraction=args.min_tissue, blur_metric=args.blur_metric, min_sharpness=args.min_sharpness,
                    min_laplacian_var=args.min_laplacian_var, max_pen_fraction=args.max_pen),
        overwrite=getattr(args, "overwrite", False),
        progress=progress,
    )


def use_worker_threads_for_opencv() -> None:
    """Set this process's OpenCV pool to one thread: the tile stage's worker threads are the
    parallelism, and OpenCV's own pool inside each of them would only spin. A process-wide
    setting, so the command line (which owns the process) makes it, never the library."""
    import cv2

    cv2.setNumThreads(1)


def use_one_torch_thread_on_cpu(model: str, device: str) -> None:
    """For a scorer with its own CPU kernel (the ``cpu_kernel`` capability: the default ``ihc_dab``) on CPU:
    torch on one thread for this process. The scorer's OpenCV kernel runs its own tile threads, and torch's
    OpenMP workers would only spin beside them (15-25 % of the rate). Process-wide, so the command line
    decides it, not the library."""
    if device == "cuda" or device.startswith("cuda:"):
        return
    from wsi_her2.score.scorer import scorer_capabilities

    if not scorer_capabilities(model).cpu_kernel:
        return
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(1)


@contextlib.contextmanager
def cudnn_autotune(device: str) -> Iterator[None]:
    """Let cuDNN pick its fastest convolution kernels while scoring on CUDA (batch shapes are fixed, so
    the search is paid once), and put ``torch.backends.cudnn.benchmark`` back on exit. Process-wide,
    so the command line sets it around its run; library code never touches it. No-op on CPU."""
    if device == "cpu":
        yield
        return
    import torch

    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old
