"""Tile codecs for the patch store: bytes per tile, encode/decode tiles/s, and what lossy ones cost.

Samples real-looking 224 px tiles from three sources: two cut at 0.5 µm/px by ``wsi-her2``'s own
tiler, the synthetic benchmark slide (a store left by ``bench_tile.py``, or a small slide tiled
here) and the real Aperio H&E fixture ``CMU-1-Small-Region.svs``; and 224 px crops of the real
HER2 IHC patches in ``fixtures/ihc_dev`` (real DAB; about 1 µm/px). For each codec:

- lossless ``zstd`` level 1 and 3, ``blosc-lz4`` (clevel 5, no shuffle: the store's ``lz4``)
  and ``none``, applied like the store applies them: to a chunk of 64 tiles at once;
- lossy JPEG quality 90 and 95 (libjpeg-turbo, 4:2:0 and 4:4:4 chroma), one JPEG per tile,
  with PSNR against the stored pixels and the change in DAB optical density
  (``skimage.color.rgb2hed``), which is what HER2 scoring measures.

One thread, timed in CPU seconds (best of ``--repeats`` passes): the machine is shared. On a CUDA machine it also times nvJPEG decoding
(``torchvision.io.decode_jpeg(device="cuda")``, batched); elsewhere it says it could not.

    python benchmarks/bench_codecs.py [--tiles 256] [--json-out codecs.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import imagecodecs
import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
DATA_DIR = Path(os.environ.get("WSI_HER2_BENCH_DIR", REPO / "bench-out"))  # or --data-dir
CHUNK_TILES = 64  # TileConfig.chunk_tiles: the store compresses 64 tiles per chunk

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------- sample tiles
def _tile_with_ours(slide: Path, out_dir: Path) -> Path:
    from wsi_her2.tile.pipeline import TileConfig, store_path_for, tile_slide

    store = store_path_for(slide, out_dir)
    if not (store / "zarr.json").exists():
        tile_slide(slide, out_dir, config=TileConfig(target_mpp_um=0.5, tile_px=224, workers=1, qc_png=False, codec="zstd"))
    return store


def sample_tiles(store_path: Path, n: int, *, seed: int = 0) -> np.ndarray:
    """``n`` QC-passed tiles spread over the store (all passed tiles when fewer)."""
    from wsi_her2.store.patch_store import PatchStore

    store = PatchStore.open(store_path)
    ok = np.flatnonzero(store.qc_pass)
    if ok.size == 0:
        ok = np.arange(store.n_tiles)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(ok, size=min(n, ok.size), replace=False))
    return np.stack([store.read_tiles(int(i), int(i) + 1)[0] for i in pick])


def ihc_crops(folder: Path, n: int, *, tile_px: int = 224) -> np.ndarray:
    """Up to ``n`` crops of ``tile_px`` from the real HER2 IHC patches (a grid of crops per image)."""
    from PIL import Image

    crops = []
    for path in sorted(folder.glob("*.jpg")):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        for y in range(0, rgb.shape[0] - tile_px + 1, tile_px):
            for x in range(0, rgb.shape[1] - tile_px + 1, tile_px):
                crops.append(rgb[y : y + tile_px, x : x + tile_px])
    if not crops:
        return np.empty((0, tile_px, tile_px, 3), np.uint8)
    pick = np.linspace(0, len(crops) - 1, num=min(n, len(crops))).round().astype(int)
    return np.stack([crops[i] for i in pick])


def synthetic_store(data_dir: Path) -> Path:
    """A store of the synthetic benchmark slide: the one bench_tile.py left, else tile a small slide."""
    found = sorted((data_dir / "out").glob("wsi_her2_w*/bench_*.zarr"))
    for store in found:
        if (store / "zarr.json").exists():
            try:
                from wsi_her2.store.patch_store import PatchStore

                if PatchStore.open(store).attrs.get("codec") in ("zstd", "lz4", "none"):  # the reference must be lossless
                    return store
            except Exception:
                continue
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_tile import ensure_slide

    slide = ensure_slide(8000, 6000, data_dir=data_dir)
    return _tile_with_ours(slide, data_dir / "out" / "codecs")  # lossless (zstd)


# --------------------------------------------------------------------------- codecs
def _lossless(name: str):
    """(encode, decode) of raw chunk bytes for a lossless codec name."""
    if name.startswith("zstd-"):
        level = int(name.split("-")[1])
        return (lambda b: imagecodecs.zstd_encode(b, level=level)), imagecodecs.zstd_decode
    if name == "blosc-lz4":
        return (lambda b: imagecodecs.blosc_encode(b, level=5, compressor="lz4", shuffle=0, typesize=1, numthreads=1),
                lambda b: imagecodecs.blosc_decode(b, numthreads=1))
    if name == "none":
        return (lambda b: bytes(b)), (lambda b: b)
    raise ValueError(name)


LOSSLESS = ("zstd-1", "zstd-3", "blosc-lz4", "none")
LOSSY = {  # name -> jpeg8_encode kwargs
    "jpeg-q90 (4:2:0)": dict(level=90, subsampling="420"),
    "jpeg-q95 (4:2:0)": dict(level=95, subsampling="420"),
    "jpeg-q90 (4:4:4)": dict(level=90, subsampling="444"),
    "jpeg-q95 (4:4:4)": dict(level=95, subsampling="444"),
}


def _best_time(fn, repeats: int, *, clock=time.process_time) -> float:
    """Best of ``repeats`` runs of ``fn``; CPU seconds by default (single-threaded codecs, busy machine)."""
    best = math.inf
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def bench_lossless(tiles: np.ndarray, name: str, *, repeats: int) -> dict:
    encode, decode = _lossless(name)
    chunks = [np.ascontiguousarray(tiles[i : i + CHUNK_TILES]).tobytes() for i in range(0, len(tiles), CHUNK_TILES)]
    encoded = [encode(c) for c in chunks]
    for raw, enc in zip(chunks, encoded):  # lossless must round-trip exactly
        if bytes(decode(enc)) != raw:
            raise SystemExit(f"{name}: round trip changed the bytes")
    t_enc = _best_time(lambda: [encode(c) for c in chunks], repeats)
    t_dec = _best_time(lambda: [decode(e) for e in encoded], repeats)
    n = len(tiles)
    return {"codec": name, "bytes_per_tile": sum(len(e) for e in encoded) / n, "encode_tiles_per_s": n / t_enc,
            "decode_tiles_per_s": n / t_dec, "psnr_db": math.inf, "dab_mean_delta": 0.0, "dab_p95_delta": 0.0,
            "dab_abs_delta": 0.0}


def _dab(tiles: np.ndarray) -> np.ndarray:
    """Per-pixel DAB optical density ``(n, h, w)`` (rgb2hed's third channel)."""
    from skimage.color import rgb2hed

    return np.stack([rgb2hed(t)[..., 2] for t in tiles])


def bench_lossy(tiles: np.ndarray, name: str, dab_ref: np.ndarray, *, repeats: int) -> dict:
    kwargs = LOSSY[name]
    encoded = [imagecodecs.jpeg8_encode(t, **kwargs) for t in tiles]
    decoded = np.stack([imagecodecs.jpeg8_decode(e) for e in encoded])
    t_enc = _best_time(lambda: [imagecodecs.jpeg8_encode(t, **kwargs) for t in tiles], repeats)
    t_dec = _best_time(lambda: [imagecodecs.jpeg8_decode(e) for e in encoded], repeats)
    mse = np.mean((decoded.astype(np.float64) - tiles.astype(np.float64)) ** 2)
    dab = _dab(decoded)
    per_tile_mean = dab.reshape(len(tiles), -1).mean(1) - dab_ref.reshape(len(tiles), -1).mean(1)
    p95 = np.percentile(dab.reshape(len(tiles), -1), 95, axis=1) - np.percentile(dab_ref.reshape(len(tiles), -1), 95, axis=1)
    n = len(tiles)
    return {"codec": name, "bytes_per_tile": sum(len(e) for e in encoded) / n, "encode_tiles_per_s": n / t_enc,
            "decode_tiles_per_s": n / t_dec, "psnr_db": 10 * math.log10(255**2 / mse) if mse > 0 else math.inf,
            "dab_mean_delta": float(per_tile_mean.mean()), "dab_p95_delta": float(p95.mean()),
            "dab_abs_delta": float(np.abs(per_tile_mean).mean())}


def bench_store_jpeg(tiles: np.ndarray, dab_ref: np.ndarray, *, repeats: int) -> dict:
    """The store's own ``jpeg`` codec: one q90 4:4:4 JPEG per 64-tile chunk (wsi_her2.store.codecs)."""
    from wsi_her2.store.codecs import decode_jpeg_chunk, encode_jpeg_chunk

    chunks = [np.ascontiguousarray(tiles[i : i + CHUNK_TILES]) for i in range(0, len(tiles), CHUNK_TILES)]
    encoded = [encode_jpeg_chunk(c) for c in chunks]
    decoded = np.concatenate([decode_jpeg_chunk(e, c.shape) for e, c in zip(encoded, chunks)])
    t_enc = _best_time(lambda: [encode_jpeg_chunk(c) for c in chunks], repeats)
    t_dec = _best_time(lambda: [decode_jpeg_chunk(e, c.shape) for e, c in zip(encoded, chunks)], repeats)
    mse = np.mean((decoded.astype(np.float64) - tiles.astype(np.float64)) ** 2)
    dab = _dab(decoded)
    n = len(tiles)
    per_tile_mean = dab.reshape(n, -1).mean(1) - dab_ref.reshape(n, -1).mean(1)
    p95 = np.percentile(dab.reshape(n, -1), 95, axis=1) - np.percentile(dab_ref.reshape(n, -1), 95, axis=1)
    return {"codec": "store jpeg (chunk)", "bytes_per_tile": sum(len(e) for e in encoded) / n,
            "encode_tiles_per_s": n / t_enc, "decode_tiles_per_s": n / t_dec,
            "psnr_db": 10 * math.log10(255**2 / mse) if mse > 0 else math.inf,
            "dab_mean_delta": float(per_tile_mean.mean()), "dab_p95_delta": float(p95.mean()),
            "dab_abs_delta": float(np.abs(per_tile_mean).mean())}


def image_call(tile_calls: np.ndarray, *, cut: float = 0.10) -> int:
    """ASCO-style image call from per-tile argmax calls (0-3): the >10 % decision list."""
    n = max(len(tile_calls), 1)
    for grade in (3, 2, 1):
        if (tile_calls >= grade).sum() / n > cut:
            return grade
    return 0


def tiles_of(path: Path, tile_px: int):
    """Non-overlapping ``tile_px`` tiles of an RGB image as ``(N, 3, tile_px, tile_px)`` in [0, 1]."""
    import torch
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    h, w, _ = rgb.shape
    tiles = [rgb[y: y + tile_px, x: x + tile_px]
             for y in range(0, h - tile_px + 1, tile_px) for x in range(0, w - tile_px + 1, tile_px)]
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()


def scorer_agreement(folder: Path, *, tile_px: int = 224) -> dict:
    """What the store's JPEG does to the default scorer: ``ihc_dab`` on the real BCI IHC patches,
    every 224 px tile scored as stored losslessly and after the store's JPEG round trip."""
    import torch

    from wsi_her2.models.ihc_score import IhcDabScorer
    from wsi_her2.store.codecs import decode_jpeg_chunk, encode_jpeg_chunk

    scorer = IhcDabScorer(mpp_um=1.0).eval()
    tile_same, tiles_n, image_same, images_n, index_delta, index_mean = 0, 0, 0, 0, [], []
    for path in sorted(folder.glob("*.jpg")):
        x = tiles_of(path, tile_px)
        u8 = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        j = decode_jpeg_chunk(encode_jpeg_chunk(u8), u8.shape)
        xj = torch.from_numpy(j.astype(np.float32) / 255).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            a, b = scorer.measure(x), scorer.measure(xj)
        ok = (a["reliability"] >= 0.5).numpy()
        ca, cb = a["probs"].argmax(1).numpy(), b["probs"].argmax(1).numpy()
        tile_same += int((ca == cb).sum())
        tiles_n += len(ca)
        image_same += int(image_call(ca[ok]) == image_call(cb[ok]))
        images_n += 1
        index_delta.append(float((a["her2_index"] - b["her2_index"]).abs().mean()))
        index_mean.append(float(a["her2_index"].mean()))
    return {"images": images_n, "tiles": tiles_n, "tile_calls_unchanged": tile_same / max(tiles_n, 1),
            "image_calls_unchanged": image_same, "her2_index_mean_abs_change": float(np.mean(index_delta)),
            "her2_index_mean": float(np.mean(index_mean))}


def bench_gpu_decode(tiles: np.ndarray, *, quality: int = 90, repeats: int = 3) -> dict:
    """nvJPEG through torchvision, batched, on CUDA; a note when there is no CUDA here."""
    try:
        import torch
        import torchvision
        from torchvision.io import decode_jpeg
    except ImportError as exc:
        return {"note": f"torch/torchvision not importable ({exc}); GPU decode not measured"}
    if not torch.cuda.is_available():
        return {"note": "no CUDA device on this machine: nvJPEG (torchvision.io.decode_jpeg(device='cuda')) "
                        "not measured; design/SPEED.md measured ~42,700 tiles/s (256 px, batched) on one H200"}
    data = [torch.frombuffer(bytearray(imagecodecs.jpeg8_encode(t, level=quality, subsampling="420")), dtype=torch.uint8)
            for t in tiles]
    decode_jpeg(data[:8], device="cuda")
    torch.cuda.synchronize()

    def run() -> None:
        decode_jpeg(data, device="cuda")
        torch.cuda.synchronize()

    t = _best_time(run, repeats, clock=time.perf_counter)
    return {"codec": f"jpeg-q{quality} nvJPEG batch", "decode_tiles_per_s": len(tiles) / t,
            "device": torch.cuda.get_device_name(), "torchvision": torchvision.__version__}


# --------------------------------------------------------------------------- main
def render(rows: list[dict], title: str, *, dab_p95_ref: float) -> str:
    head = f"{'codec':<18s} {'bytes/tile':>10s} {'ratio':>6s} {'enc tiles/s':>11s} {'dec tiles/s':>11s} " \
           f"{'PSNR dB':>8s} {'dDAB mean':>10s} {'dDAB p95':>9s} {'|dDAB|':>8s} {'p95 %':>6s}"
    out = [title, head, "-" * len(head)]
    for r in rows:
        raw = r["raw_bytes_per_tile"]
        psnr = "lossless" if math.isinf(r["psnr_db"]) else f"{r['psnr_db']:.1f}"
        # "none" is a memory copy: its rate only measures the clock, so it is not printed
        enc, dec = ("memcpy", "memcpy") if r["codec"] == "none" else (
            f"{r['encode_tiles_per_s']:,.0f}", f"{r['decode_tiles_per_s']:,.0f}")
        out.append(f"{r['codec']:<18s} {r['bytes_per_tile']:>10,.0f} {raw / r['bytes_per_tile']:>6.2f} "
                   f"{enc:>11s} {dec:>11s} {psnr:>8s} "
                   f"{r['dab_mean_delta']:>+10.4f} {r['dab_p95_delta']:>+9.4f} {r['dab_abs_delta']:>8.4f} "
                   f"{100 * r['dab_p95_delta'] / dab_p95_ref:>+6.2f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiles", type=int, default=256, help="tiles sampled per source")
    parser.add_argument("--repeats", type=int, default=5, help="timing passes; the best is kept")
    parser.add_argument("--store", type=Path, help="synthetic-slide store to sample (default: bench_tile's)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)

    sources = {"synthetic bench slide": args.store or synthetic_store(args.data_dir)}
    cmu = FIXTURES / "slides" / "CMU-1-Small-Region.svs"
    if cmu.exists():
        sources["CMU-1-Small-Region.svs (real H&E)"] = _tile_with_ours(cmu, args.data_dir / "out" / "codecs")
    else:
        print(f"{cmu} not found: real-slide rows skipped", file=sys.stderr)
    ihc = FIXTURES / "ihc_dev"
    if ihc.is_dir():
        sources["BCI HER2 IHC patches (real DAB, ~1 µm/px)"] = ihc
    report: dict = {"sources": {}, "gpu": None}
    texts = []
    for label, store in sources.items():
        tiles = ihc_crops(store, args.tiles) if store == ihc else sample_tiles(store, args.tiles)
        if len(tiles) == 0:
            continue
        dab_ref = _dab(tiles)
        rows = [bench_lossless(tiles, name, repeats=args.repeats) for name in LOSSLESS]
        rows += [bench_lossy(tiles, name, dab_ref, repeats=args.repeats) for name in LOSSY]
        rows.append(bench_store_jpeg(tiles, dab_ref, repeats=args.repeats))
        raw = tiles[0].nbytes
        for r in rows:
            r["raw_bytes_per_tile"] = raw
        report["sources"][label] = {"store": str(store), "tiles": len(tiles), "tile_px": tiles.shape[1],
                                    "dab_mean": float(dab_ref.mean()), "dab_p95_mean": float(
                                        np.percentile(dab_ref.reshape(len(tiles), -1), 95, axis=1).mean()),
                                    "rows": rows}
        texts.append(render(rows, f"{label}: {len(tiles)} tiles of {tiles.shape[1]} px (raw {raw:,} B); "
                                  f"mean DAB OD {dab_ref.mean():.4f}, mean per-tile p95 "
                                  f"{report['sources'][label]['dab_p95_mean']:.4f}",
                            dab_p95_ref=report["sources"][label]["dab_p95_mean"]))
        if report["gpu"] is None:
            report["gpu"] = bench_gpu_decode(tiles)
    print("\n\n".join(texts))
    print("\nbytes/tile for lossless codecs: a 64-tile chunk compressed at once (as the store does) / 64. "
          "enc/dec: tiles per CPU-second, one thread, best of the passes. dDAB: change in rgb2hed DAB OD (lossy - stored), per-tile mean and p95 "
          "averaged over tiles; |dDAB|: mean absolute per-tile change of the mean; p95 %: dDAB p95 as a "
          "percentage of the stored tiles' mean p95 (membrane-level DAB).")
    if ihc.is_dir():
        agree = report["scorer_agreement"] = scorer_agreement(ihc)
        print(f"default scorer (ihc_dab) on {agree['images']} real IHC images / {agree['tiles']} tiles, lossless vs the "
              f"store's JPEG: tile calls unchanged {100 * agree['tile_calls_unchanged']:.1f} %, image calls unchanged "
              f"{agree['image_calls_unchanged']}/{agree['images']}, mean |change| of her2_index "
              f"{agree['her2_index_mean_abs_change']:.4f} (mean index {agree['her2_index_mean']:.3f})")
    gpu = report["gpu"] or {}
    print("GPU:", gpu.get("note") or f"{gpu['codec']}: {gpu['decode_tiles_per_s']:,.0f} tiles/s on {gpu['device']}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
