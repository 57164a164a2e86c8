"""Scoring throughput: the full path (store -> device -> model -> probs) against the bare forward pass.

For each model, two rates are measured in the same run on the same machine:

* **ceiling**: the model alone on random tensors already on the device, with the batch size,
  precision (bf16 autocast on CUDA), memory layout and compilation that scoring uses; for a
  rule-based scorer with ``measure()`` the ceiling times ``measure()``, which is what scoring calls;
* **full path**: :func:`wsi_her2.score.inference.predict_store` over a patch store: zarr chunks
  decompressed in background threads, pinned uint8 batches copied to the device, normalised
  there, the model, softmax, results copied back;

and their ratio says how much of the device the pipeline keeps busy. The loader alone (store ->
host batch buffers, no model) is timed too, to tell a read-bound run from a compute-bound one.

The store is built by tiling the real fixture slide ``CMU-1-Small-Region.svs`` (or ``--slide``)
and repeating its QC-passed tiles up to ``--n-tiles`` (so tile content and compression ratio are
those of real tissue), or taken as is with ``--store``. Models get random weights.

Examples::

    PYTHONPATH=. python benchmarks/bench_score.py                     # CPU here: small, ~3 min
    PYTHONPATH=. python benchmarks/bench_score.py --device cuda       # GPU node: 16384 tiles, batch 256
    PYTHONPATH=. python benchmarks/bench_score.py --device cuda --compile --models resnet50,convnext_tiny
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_her2.errors import WsiHer2Error
from wsi_her2.cli.common import cudnn_autotune
from wsi_her2.score.inference import InferenceConfig, StepCache, predict_store, resolve_device
from wsi_her2.score.loader import TileLoader
from wsi_her2.store.patch_store import PatchStore, open_store

log = logging.getLogger("bench_score")

FIXTURE_SLIDE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "slides" / "CMU-1-Small-Region.svs"
DEFAULT_MODELS = ("resnet50", "convnext_tiny", "ihc_dab")
# Defaults per device type: (n_tiles, batch_size, seconds of timed ceiling).
DEFAULTS = {"cpu": (32, 16, 2.0), "cuda": (16384, 256, 2.0)}


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------
def source_tiles(slide: Path, work: Path, *, tile_px: int) -> np.ndarray:
    """QC-passed tiles of ``slide`` (tiled at 0.5 µm/px); a synthetic IHC slide if it is missing."""
    from wsi_her2.tile.pipeline import TileConfig, tile_slide

    if not slide.is_file():
        from wsi_her2.synthetic.slides import graded_ihc_spec, write_synthetic_slide

        log.warning("%s not found; tiling a synthetic IHC slide instead", slide)
        slide = write_synthetic_slide(work / "synthetic.tiff", graded_ihc_spec())
    tiled = tile_slide(slide, work / "src", config=TileConfig(tile_px=tile_px, target_mpp_um=0.5, qc_png=False))
    store = open_store(tiled.store)
    tiles = store.read_tiles(0, store.n_tiles)[store.qc_pass]
    if tiles.shape[0] == 0:
        raise SystemExit(f"{slide}: no tile passed QC; pass another --slide or --store")
    return tiles


def build_bench_store(tiles: np.ndarray, path: Path, *, n_tiles: int, chunk_tiles: int, codec: str) -> PatchStore:
    """A store of ``n_tiles`` tiles cycling through ``tiles``, all passing QC."""
    tile_px = tiles.shape[1]
    store = PatchStore.create(
        path, n_tiles=n_tiles, tile_px=tile_px, chunk_tiles=chunk_tiles, codec=codec,
        attrs={"tiling": {"effective_mpp_um": 0.5, "tile_px": tile_px}, "bench": True},
        per_tile={"qc_flags": np.zeros(n_tiles, dtype=np.uint8)}, images={},
    )
    for start in range(0, n_tiles, chunk_tiles):
        stop = min(start + chunk_tiles, n_tiles)
        store.write_tiles(start, tiles[np.arange(start, stop) % tiles.shape[0]])
    store.update_attrs(complete=True)
    return open_store(path)


# --------------------------------------------------------------------------------------------
# Timings
# --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ceiling(model: torch.nn.Module, *, device: torch.device, batch_size: int, amp: bool, compile: bool,
                 min_seconds: float, min_iters: int = 2, max_iters: int = 20) -> float:
    """Images/s of the bare model call on random device tensors (median over timed batches)."""
    cfg = model.wsi_her2_config
    cuda = device.type == "cuda"
    model.eval().to(device)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    if cuda:
        model.to(memory_format=torch.channels_last)
    call = model.measure if callable(getattr(model, "measure", None)) else model
    if compile and cuda:
        call = torch.compile(call, dynamic=False)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand((batch_size, 3, cfg.input_px, cfg.input_px), generator=gen, device=device)
    if tuple(cfg.std) != (1.0, 1.0, 1.0) or tuple(cfg.mean) != (0.0, 0.0, 0.0):
        x = (x - 0.5) / 0.25  # roughly normalised, like real input
    x = x.contiguous(memory_format=fmt)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and cuda)
    times: list[float] = []
    old_bench = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cuda
    try:
        with torch.inference_mode(), autocast:
            for _ in range(3 if cuda else 1):  # warm-up: cuDNN autotune, compile, allocator
                call(x)
            _sync(device)
            started = time.perf_counter()
            while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - started < min_seconds):
                t0 = time.perf_counter()
                call(x)
                _sync(device)
                times.append(time.perf_counter() - t0)
    finally:
        torch.backends.cudnn.benchmark = old_bench
    return batch_size / statistics.median(times)


def time_loader(store: PatchStore, *, batch_size: int, workers: int, pin: bool) -> float:
    """Tiles/s of the background loader alone (store -> host batch buffers)."""
    idx = np.flatnonzero(store.qc_pass)
    t0 = time.perf_counter()
    with TileLoader(store, idx, batch_size=batch_size, workers=workers, pin_memory=pin) as loader:
        for batch in loader:
            loader.release(batch)
    return idx.size / (time.perf_counter() - t0)


def time_full_path(model: torch.nn.Module, store: PatchStore, config: InferenceConfig) -> float:
    """Tiles/s of predict_store over the whole store, after a short warm-up run."""
    passed = store.qc_pass
    n = int(passed.sum())
    warm = np.flatnonzero(passed)[: config.batch_size * (3 if config.compile else 1)]
    steps = StepCache()  # the warm-up's compiled step is the one timed
    with cudnn_autotune(config.device):  # as `wsi-her2 score` runs
        predict_store(store, model, config=config, indices=warm, step_cache=steps)  # compile / cuDNN autotune / allocator
        t0 = time.perf_counter()
        result = predict_store(store, model, config=config, step_cache=steps)
        seconds = time.perf_counter() - t0
    if not np.array_equal(result.scored, passed) or not np.isfinite(result.probs[passed]).all():
        raise SystemExit("benchmark run left QC-passed tiles unscored or produced NaN probabilities")
    return n / seconds


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu (default auto)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 on CPU, 256 on CUDA")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated registry names")
    p.add_argument("--n-tiles", type=int, default=None, help="tiles in the bench store (default 32 CPU, 16384 CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile on CUDA (ceiling and full path)")
    p.add_argument("--no-amp", action="store_true", help="float32 on CUDA instead of bf16 autocast")
    p.add_argument("--tta", action="store_true", help="full path with 8-view TTA (the ceiling stays one view)")
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--chunk-tiles", type=int, default=64, help="tiles per zarr chunk of the bench store")
    p.add_argument("--codec", default="zstd", choices=("zstd", "lz4", "none"))
    p.add_argument("--slide", type=Path, default=FIXTURE_SLIDE, help="slide whose tiles fill the bench store")
    p.add_argument("--store", type=Path, default=None, help="score this existing store instead")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from wsi_her2.models import create_model

    try:
        device = resolve_device(args.device)
    except WsiHer2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    d_tiles, d_batch, ceiling_s = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    n_tiles = args.n_tiles or d_tiles
    batch = args.batch_size or d_batch
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = not args.no_amp
    cuda = device.type == "cuda"
    config = InferenceConfig(
        batch_size=batch, device=str(device), tta=args.tta, compile=args.compile, amp=amp,
        loader_workers=args.loader_workers,
    )
    work = Path(tempfile.mkdtemp(prefix="wsi-her2-bench-"))
    try:
        t0 = time.perf_counter()
        if args.store is not None:
            store = open_store(args.store)
            src = f"{args.store} ({int(store.qc_pass.sum())} QC-passed tiles)"
        else:
            tiles = source_tiles(args.slide, work, tile_px=224)
            store = build_bench_store(tiles, work / "bench.zarr", n_tiles=n_tiles, chunk_tiles=args.chunk_tiles, codec=args.codec)
            src = f"{store.n_tiles} tiles cycling {tiles.shape[0]} QC-passed tiles of {args.slide.name}"
        build_s = time.perf_counter() - t0
        loader_rate = time_loader(store, batch_size=batch, workers=args.loader_workers, pin=cuda)

        rows: list[dict[str, Any]] = []
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            model = create_model(name)
            cfg = model.wsi_her2_config
            if cfg.tile_px != store.tile_px:
                logging.getLogger().warning("%s expects %d px tiles, the store has %d", name, cfg.tile_px, store.tile_px)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            ceiling = time_ceiling(model, device=device, batch_size=batch, amp=amp, compile=args.compile, min_seconds=ceiling_s)
            full = time_full_path(model, store, config)
            precision = "bf16" if amp and cuda and not callable(getattr(model, "measure", None)) else "fp32"
            rows.append({
                "model": name, "input_px": cfg.input_px, "batch": batch, "precision": precision,
                "compiled": bool(args.compile and cuda), "tta_views": 8 if args.tta else 1,
                "ceiling_img_s": ceiling, "full_path_tiles_s": full, "ratio": full / ceiling,
                "peak_gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
            })
            del model
            if cuda:
                torch.cuda.empty_cache()

        dev_name = torch.cuda.get_device_name(device) if cuda else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"
        print(f"\nwsi-her2 scoring benchmark  device: {device} ({dev_name})  torch {torch.__version__}")
        print(f"store: {src}; chunks of {store.chunk_tiles}, {args.codec}; built in {build_s:.1f} s")
        print(f"loader alone (store -> host batches, {args.loader_workers} threads{', pinned' if cuda else ''}): {loader_rate:,.0f} tiles/s\n")
        header = f"| {'model':<16} | px  | batch | prec | ceiling img/s | full path tiles/s | full/ceiling |"
        print(header)
        print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
        for r in rows:
            model_label = r["model"] + (" +compile" if r["compiled"] else "") + (" +tta8" if r["tta_views"] > 1 else "")
            print(f"| {model_label:<16} | {r['input_px']:<3} | {r['batch']:>5} | {r['precision']:<4} | "
                  f"{r['ceiling_img_s']:>13,.1f} | {r['full_path_tiles_s']:>17,.1f} | {r['ratio']:>12.2f} |")
        if args.tta:
            print("\n(with --tta the full path runs 8 views per tile; the ceiling is one view)")
        if args.json:
            args.json.write_text(json.dumps({
                "device": str(device), "device_name": dev_name, "torch": torch.__version__, "store": src,
                "loader_tiles_s": loader_rate, "rows": rows, "argv": sys.argv,
            }, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
