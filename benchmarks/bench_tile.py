"""Tiling throughput in one run on one slide: wsi-her2 vs the JPEG decode ceiling vs peer tilers.

Measured back to back on the same synthetic Aperio-like slide (tiled JPEG SVS, 256 px native
tiles, 0.5 µm/px; generated once and cached outside the repository):

1. the ceiling: libjpeg-turbo (imagecodecs) decoding the slide's own native tiles, bytes read
   straight from the file, with the same number of processes as the tiler;
2. ``wsi-her2 tile`` end to end (224 px tiles at 0.5 µm/px over tissue, QC, zarr store) with
   1 and 2 worker processes, in a fresh interpreter, peak RSS of its process tree;
3. peer tilers from PyPI, each in its own virtual environment (``$WSI_HER2_PEER_VENVS/<name>``, default ``bench-out/peer-venvs``),
   producing the same tiles (224 px at 0.5 µm/px over tissue), same processes where possible;
4. when wsi-her2 is below the target fraction of the ceiling, where its time goes (stage by
   stage, in one process).

    python benchmarks/bench_tile.py                      # full run (40000 x 30000 px)
    python benchmarks/bench_tile.py --width 8000 --height 6000 --peers lazyslide   # quick check

See benchmarks/README.md for the definitions.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import math
import multiprocessing as mp
import os
import platform
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
PEERS_DIR = Path(__file__).resolve().parent / "peers"
# Machine-specific places come from the environment (or --data-dir), never from the code.
DATA_DIR = Path(os.environ.get("WSI_HER2_BENCH_DIR", REPO / "bench-out"))
PEER_VENVS = Path(os.environ.get("WSI_HER2_PEER_VENVS", DATA_DIR / "peer-venvs"))
TARGET_FRACTION_OF_CEILING = 0.6
PEER_MAX_PROCESSES = {"histolab": 1}  # peers without a parallel path run once, at 1 process
PEERS = {  # name -> runner script (run with $WSI_HER2_PEER_VENVS/<name>/bin/python)
    "lazyslide": "run_lazyslide.py",
    "wsinfer": "run_wsinfer.py",
    "histolab": "run_histolab.py",
}

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------- the slide
def ensure_slide(width_px: int, height_px: int, *, data_dir: Path, seed: int = 0, wait_s: float = 600) -> Path:
    """The cached benchmark slide, generated on first use (written to a temp name, then renamed)."""
    path = data_dir / f"bench_{width_px}x{height_px}_seed{seed}.svs"
    if path.exists():
        return path
    data_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:  # the generator module may still be landing in the checkout
        try:
            from wsi_her2.synthetic.slides import bench_spec, write_synthetic_slide

            break
        except ImportError:
            if time.monotonic() > deadline:
                raise
            print("waiting for wsi_her2.synthetic.slides ...", file=sys.stderr)
            time.sleep(10)
    tmp = data_dir / f".tmp_{os.getpid()}_{path.name}"
    t0 = time.perf_counter()
    write_synthetic_slide(tmp, bench_spec(width_px, height_px, seed=seed), workers=os.cpu_count() or 1)
    tmp.rename(path)
    print(f"generated {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


# --------------------------------------------------------------------------- running a tool
class TreeRssMonitor:
    """Polls the summed RSS of a process and all its descendants; keeps the peak (MB)."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid, self.interval_s, self.peak_mb = pid, interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak_mb = max(self.peak_mb, total / 2**20)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "TreeRssMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_tool(cmd: list[str], *, env: dict | None = None, timeout_s: float = 1800) -> dict:
    """Run one runner script; return its JSON line plus wall time and peak tree RSS."""
    cpu0 = _children_cpu_s()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with TreeRssMonitor(proc.pid) as mon:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    wall = time.perf_counter() - t0
    cpu = _children_cpu_s() - cpu0  # every reaped descendant: the tool, its pool workers, DataLoader workers
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"rc={proc.returncode}: {err.strip()[-1500:]}", "wall_s": round(wall, 3), "cmd": cmd}
    result = json.loads(lines[-1])
    result["wall_s"] = round(wall, 3)
    result["cpu_s"] = round(cpu, 3)
    result["peak_tree_rss_mb"] = round(mon.peak_mb, 1)
    return result


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def project_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(PEERS_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _fresh_dir(path: Path) -> None:
    """Empty ``path`` and let the kernel write back what was deleted or written before, so one
    run's write-back does not land in the next run's time."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_ours(slide: Path, *, workers: int, out_dir: Path, codec: str) -> dict:
    _fresh_dir(out_dir)
    cmd = [sys.executable, str(PEERS_DIR / "run_wsi_her2.py"), str(slide), str(out_dir), "--workers", str(workers),
           "--codec", codec]
    return run_tool(cmd, env=project_env())


def run_peer(name: str, slide: Path, *, workers: int, out_dir: Path) -> dict:
    python = PEER_VENVS / name / "bin" / "python"
    if not python.exists():
        return {"error": f"no venv at {python.parent.parent} (see benchmarks/README.md)"}
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["HF_HUB_OFFLINE"] = "1"
    env["MPLBACKEND"] = "Agg"
    _fresh_dir(out_dir)
    cmd = [str(python), str(PEERS_DIR / PEERS[name]), str(slide), str(out_dir), "--workers", str(workers)]
    return run_tool(cmd, env=env)


# --------------------------------------------------------------------------- the decode ceiling
_C: dict = {}


def _ceiling_init(slide: str) -> None:
    import imagecodecs
    import tifffile

    with tifffile.TiffFile(slide) as tif:
        page = tif.pages[0]
        _C["offsets"] = np.asarray(page.dataoffsets, np.int64)
        _C["counts"] = np.asarray(page.databytecounts, np.int64)
        _C["tables"] = page.jpegtables
        _C["colorspace"] = tifffile.tifffile.jpeg_decode_colorspace(
            page.photometric, page.planarconfig, page.extrasamples, bool(getattr(page, "is_jfif", False))
        )
    _C["fd"] = os.open(slide, os.O_RDONLY)
    _C["decode"] = imagecodecs.jpeg8_decode


def _ceiling_decode(indices: np.ndarray) -> tuple[int, float]:
    """Read and decode native tiles ``indices`` (linear, row-major); returns (how many, CPU s)."""
    fd, offsets, counts, tables = _C["fd"], _C["offsets"], _C["counts"], _C["tables"]
    colorspace, outcolorspace = _C["colorspace"]
    decode = _C["decode"]
    n = 0
    cpu0 = time.process_time()
    for i in indices:
        if counts[i] == 0:
            continue
        data = os.pread(fd, int(counts[i]), int(offsets[i]))
        decode(data, tables=tables, colorspace=colorspace, outcolorspace=outcolorspace)
        n += 1
    return n, time.process_time() - cpu0


def _native_grid(slide: Path) -> tuple[int, int, int, int]:
    """(native tile w, h, tiles across, tiles down) of level 0."""
    import tifffile

    with tifffile.TiffFile(slide) as tif:
        page = tif.pages[0]
        if not page.is_tiled or page.compression != 7:
            raise SystemExit(f"{slide}: level 0 is not tiled JPEG; the decode ceiling needs one")
        tw, th = page.tilewidth, page.tilelength
        return tw, th, math.ceil(page.imagewidth / tw), math.ceil(page.imagelength / th)


def native_tiles_covering(coords_level0: np.ndarray, tile_size_level0: float, *, grid: tuple[int, int, int, int]) -> np.ndarray:
    """Linear indices of the native tiles that the output tiles (level-0 boxes) touch, each once."""
    tw, th, across, down = grid
    size = int(math.ceil(tile_size_level0))
    x0, y0 = coords_level0[:, 0], coords_level0[:, 1]
    tx0, ty0 = x0 // tw, y0 // th
    tx1 = np.minimum((x0 + size - 1) // tw, across - 1)
    ty1 = np.minimum((y0 + size - 1) // th, down - 1)
    covered = np.zeros((down, across), bool)
    for dy in range(int((ty1 - ty0).max()) + 1):
        for dx in range(int((tx1 - tx0).max()) + 1):
            ok = (ty0 + dy <= ty1) & (tx0 + dx <= tx1)
            covered[ty0[ok] + dy, tx0[ok] + dx] = True
    return np.flatnonzero(covered.ravel())


def check_ceiling_decoder(slide: Path) -> None:
    """The raw decode must give the pixels tifffile gives (same tables, colour space)."""
    import tifffile

    _ceiling_init(str(slide))
    try:
        with tifffile.TiffFile(slide) as tif:
            page = tif.pages[0]
            tw, th = page.tilewidth, page.tilelength
            across = math.ceil(page.imagewidth / tw)
            i = (math.ceil(page.imagelength / th) // 2) * across + across // 2  # a tile from the middle
            ref = page.asarray()[(i // across) * th : (i // across + 1) * th, (i % across) * tw : (i % across + 1) * tw] \
                if page.imagewidth * page.imagelength <= 2e8 else None
            data = os.pread(_C["fd"], int(_C["counts"][i]), int(_C["offsets"][i]))
            cs, ocs = _C["colorspace"]
            got = _C["decode"](data, tables=_C["tables"], colorspace=cs, outcolorspace=ocs)
            if got.shape[:2] != (th, tw) or got.ndim != 3:
                raise SystemExit(f"raw decode gave shape {got.shape}, expected ({th}, {tw}, 3)")
            if ref is not None and not np.array_equal(got, ref):
                raise SystemExit("raw decode differs from tifffile's pixels; the ceiling would be measuring the wrong thing")
    finally:
        os.close(_C.pop("fd"))
        _C.clear()


def measure_ceiling(slide: Path, indices: np.ndarray, *, processes: int, repeats: int) -> tuple[float, float]:
    """(wall s, CPU s) to read + decode exactly ``indices`` with ``processes`` warm processes; best of ``repeats``."""
    n_chunks = max(processes * 16, 1)
    chunks = [c for c in np.array_split(indices, n_chunks) if c.size]
    best_wall, best_cpu = math.inf, math.inf
    if processes == 1:
        _ceiling_init(str(slide))
        _ceiling_decode(indices[:8])  # warm up: code paths and page cache
        for _ in range(repeats):
            t0 = time.perf_counter()
            cpu = sum(_ceiling_decode(c)[1] for c in chunks)
            best_wall, best_cpu = min(best_wall, time.perf_counter() - t0), min(best_cpu, cpu)
        os.close(_C.pop("fd"))
        _C.clear()
        return best_wall, best_cpu
    ctx = mp.get_context("spawn")  # same start method as the tiler's pool
    with ctx.Pool(processes, initializer=_ceiling_init, initargs=(str(slide),)) as pool:
        pool.map(_ceiling_decode, [indices[:4]] * processes * 2, chunksize=1)  # warm up every worker
        for _ in range(repeats):
            t0 = time.perf_counter()
            cpu = sum(c for _, c in pool.map(_ceiling_decode, chunks, chunksize=1))
            best_wall, best_cpu = min(best_wall, time.perf_counter() - t0), min(best_cpu, cpu)
    return best_wall, best_cpu


# --------------------------------------------------------------------------- where the time goes
CPROFILE_UNITS = 8


def _top_functions(prof: "cProfile.Profile", *, n_tiles: int, top: int = 8) -> list[dict]:
    """The functions with the most own time under ``prof``, in ms per tile."""
    stats = pstats.Stats(prof)
    rows = []
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():
        where = Path(filename).name if filename != "~" else "builtin"
        rows.append({"function": f"{where}:{line}({name})" if filename != "~" else name, "calls": ncalls,
                     "own_ms_per_tile": round(1e3 * tottime / n_tiles, 4),
                     "cum_ms_per_tile": round(1e3 * cumtime / n_tiles, 4)})
    rows.sort(key=lambda r: -r["own_ms_per_tile"])
    return rows[:top]


def profile_stages(slide: Path, store_path: Path, *, max_units: int = 48, codec: str = "zstd") -> dict:
    """Time each stage of the tiler's per-unit work in this process, on the first ``max_units`` units.

    Mirrors ``tile_pipeline._process_unit``: read the unit's tiles (``read_tiles``: native
    slide tiles decoded once and copied into the tiles), QC (tissue, pen, Laplacian), encode
    and write the chunk file. Also decodes the native tiles that the same tiles cover, for the
    same tiles' ceiling. Stages are timed in CPU seconds of this process (user + system: the
    kernel's share of writing the chunk files counts), which a busy shared machine disturbs far
    less than wall time.
    """
    from wsi_her2.tile.pixels import read_tiles
    from wsi_her2.tile.qc import QcParams, tile_qc
    from wsi_her2.slide import open_slide
    from wsi_her2.store.patch_store import PatchStore
    from wsi_her2.store.codecs import chunk_encoder
    from wsi_her2.tile.geometry import TileGeometry
    from wsi_her2.tile.tissue import TissueParams

    store = PatchStore.open(store_path)
    attrs = store.attrs
    fields = TileGeometry.__dataclass_fields__
    geometry = TileGeometry(**{k: v for k, v in attrs["tiling"].items() if k in fields and k != "tile_size_level0"})
    tissue_params = TissueParams(**attrs["tissue"]["params"])
    mask_fraction = store.array("mask_fraction")  # each tile's tissue fraction is its mask coverage
    mpp_um = float(attrs["tiling"]["effective_mpp_um"])
    qc_params = QcParams(**attrs["qc"]["params"])
    block_tiles = int(attrs["tiling"].get("block_tiles", 8))
    chunk = store.chunk_tiles
    n_units = min(max_units, store.n_units)
    grid_all = store.grid_rc
    scratch = Path(tempfile.mkdtemp(prefix="bench_profile_", dir=store_path.parent))  # beside the store: --data-dir
    clock = time.process_time  # user + system, all threads, high resolution
    try:
        out = PatchStore.create(
            scratch / "p.zarr", n_tiles=n_units * chunk, tile_px=store.tile_px, chunk_tiles=chunk, codec=codec,
            attrs={}, per_tile={}, images={},
        )
        writer = out.chunk_writer()
        encode = chunk_encoder(codec)
        t = {k: 0.0 for k in ("read", "qc", "encode_only", "encode_and_write", "decode_native")}
        n_tiles = 0
        reader = open_slide(slide, backend=attrs["slide"].get("reader", "auto"))
        _ceiling_init(str(slide))
        grid = _native_grid(slide)
        prof = cProfile.Profile()
        cprofiled_tiles = 0
        tiles = np.zeros((chunk, store.tile_px, store.tile_px, 3), np.uint8)
        for unit in range(n_units):
            sel_unit = grid_all[unit * chunk : (unit + 1) * chunk]
            n = len(sel_unit)
            n_tiles += n
            blocks = (sel_unit[:, 0] // block_tiles) * 1_000_003 + sel_unit[:, 1] // block_tiles
            t0 = clock()
            for b in np.unique(blocks):
                sel = np.flatnonzero(blocks == b)
                tiles[sel] = read_tiles(reader, geometry=geometry, grid_rc=sel_unit[sel])
            t["read"] += clock() - t0
            t0 = clock()
            tile_qc(tiles[:n], tissue_fraction=mask_fraction[unit * chunk : unit * chunk + n], mpp_um=mpp_um,
                    tissue_params=tissue_params, qc_params=qc_params)
            t["qc"] += clock() - t0
            if unit < CPROFILE_UNITS:  # a function-level breakdown, apart from the timings above
                cprofiled_tiles += n
                prof.enable()
                tile_qc(tiles[:n], tissue_fraction=mask_fraction[unit * chunk : unit * chunk + n], mpp_um=mpp_um,
                        tissue_params=tissue_params, qc_params=qc_params)
                prof.disable()
            t0 = clock()
            encode(tiles)
            t["encode_only"] += clock() - t0
            t0 = clock()
            writer.write(unit, tiles)
            t["encode_and_write"] += clock() - t0
            coords = store.coords_level0[unit * chunk : (unit + 1) * chunk]
            idx = native_tiles_covering(coords, geometry.tile_size_level0, grid=grid)
            t0 = clock()
            _ceiling_decode(idx)
            t["decode_native"] += clock() - t0
        reader.close()
        os.close(_C.pop("fd"))
        _C.clear()
        stages = {
            f"read tiles ({attrs['slide'].get('reader')}: decode + copy)": t["read"],
            "QC (tile_qc)": t["qc"],
            f"encode + write chunk ({codec})": t["encode_and_write"],
        }
        total = sum(stages.values())
        return {
            "units": n_units,
            "tiles": n_tiles,
            "total_s": round(total, 4),
            "ms_per_tile": {k: round(1e3 * v / n_tiles, 4) for k, v in stages.items()},
            "share": {k: round(v / total, 4) for k, v in stages.items()},
            "reference_ms_per_tile": {
                "raw decode of the native tiles these tiles cover": round(1e3 * t["decode_native"] / n_tiles, 4),
                f"{codec} encode only (inside encode + write)": round(1e3 * t["encode_only"] / n_tiles, 4),
            },
            "tile_qc_cprofile": _top_functions(prof, n_tiles=cprofiled_tiles),
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --------------------------------------------------------------------------- report
def _add_ratios(run: dict, ceiling: dict) -> None:
    run["wall_tiles_per_s"] = round(run["tiles"] / run["wall_s"], 1)
    run["tiles_per_cpu_s"] = round(run["tiles"] / run["cpu_s"], 1) if run["cpu_s"] > 0 else None
    run["x_ceiling"] = round(run["wall_tiles_per_s"] / ceiling["output_tiles_per_s"], 3)
    run["x_ceiling_cpu"] = round(run["tiles_per_cpu_s"] / ceiling["output_tiles_per_cpu_s"], 3) if run["tiles_per_cpu_s"] else None


def _fmt(v: object, spec: str = ",.0f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def render_table(report: dict) -> str:
    """One row per measurement: wall-clock and CPU-time rates, each as a fraction of the ceiling."""
    head = ("measurement", "procs", "tiles", "wall s", "tiles/s", "x ceil", "ours/peer",
            "CPU s", "tiles/CPU-s", "x ceil CPU", "ours/peer CPU", "peak RSS MB")
    rows = []
    for c in report["ceiling"]:
        rows.append((f"ceiling: raw JPEG decode, native {c['native_tile_px']} px tiles", c["processes"],
                     c["native_tiles"], c["seconds"], c["native_tiles_per_s"], None, None,
                     c["cpu_s"], c["native_tiles_per_cpu_s"], None, None, None))
        rows.append(("ceiling: as output 224 px tiles", c["processes"], c["output_tiles"], c["seconds"],
                     c["output_tiles_per_s"], 1.0, None, c["cpu_s"], c["output_tiles_per_cpu_s"], 1.0, None, None))
    for r in report["runs"]:
        if "error" in r:
            rows.append((f"{r['label']}: FAILED ({r['error'][-70:]!r})", r.get("processes_requested"),
                         *([None] * (len(head) - 2))))
            continue
        rows.append((r["label"], r["processes"], r["tiles"], r["wall_s"], r["wall_tiles_per_s"], r.get("x_ceiling"),
                     r.get("ours_over_peer"), r["cpu_s"], r.get("tiles_per_cpu_s"), r.get("x_ceiling_cpu"),
                     r.get("ours_over_peer_cpu"), r["peak_tree_rss_mb"]))
    cells = [[_cell(v, i) for i, v in enumerate(row)] for row in [head, *rows]]
    cells[0] = list(head)
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    out = []
    for k, row in enumerate(cells):
        out.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
        if k == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def _cell(v: object, col: int) -> str:
    if v is None:
        return "-"
    if col in (0, 1) or isinstance(v, str):
        return str(v)
    if col in (3, 7):
        return _fmt(v, ",.1f")
    if col in (5, 6, 9, 10):
        return _fmt(v, ".2f")
    return _fmt(v)


def render_profile(profile: dict) -> str:
    lines = [f"where the time goes (CPU ms per tile, 1 process, first {profile['units']} units = {profile['tiles']} tiles):"]
    for k, v in profile["ms_per_tile"].items():
        lines.append(f"  {k:<50s} {v:8.3f} ms/tile  {100 * profile['share'][k]:5.1f} %")
    lines.append(f"  {'total':<50s} {1e3 * profile['total_s'] / profile['tiles']:8.3f} ms/tile")
    lines.append("  for reference:")
    for k, v in profile["reference_ms_per_tile"].items():
        lines.append(f"  {k:<50s} {v:8.3f} ms/tile")
    lines.append("  tile_qc under cProfile (own time; cProfile adds overhead):")
    for r in profile["tile_qc_cprofile"]:
        lines.append(f"    {r['function'][:60]:<60s} {r['own_ms_per_tile']:8.3f} ms/tile own, "
                     f"{r['cum_ms_per_tile']:8.3f} cum, {r['calls']} calls")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=40000, help="slide width px (level 0, 0.5 µm/px)")
    parser.add_argument("--height", type=int, default=30000, help="slide height px")
    parser.add_argument("--slide", type=Path, help="use this tiled-JPEG slide instead of the synthetic one")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    parser.add_argument("--peers", default="lazyslide,wsinfer",
                        help="comma-separated peers to run where their venv exists ('' for none); "
                             "histolab adds ~9 min at 40000 x 30000")
    parser.add_argument("--codec", nargs="+", default=["jpeg", "zstd"],
                        help="wsi-her2 tile codecs to run (the first is the headline: peers are compared with it)")
    parser.add_argument("--repeats", type=int, default=1, help="ceiling repeats (best kept); tools run once")
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                        help="stage timing when below the target (auto), always or never")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)

    slide = args.slide or ensure_slide(args.width, args.height, data_dir=args.data_dir)
    out_root = args.data_dir / "out"
    out_root.mkdir(parents=True, exist_ok=True)
    check_ceiling_decoder(slide)
    grid = _native_grid(slide)
    peers = [p for p in args.peers.split(",") if p]
    report: dict = {
        "slide": {"path": str(slide), "size_bytes": slide.stat().st_size, "native_tile_px": grid[0],
                  "native_tiles_level0": grid[2] * grid[3]},
        "machine": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "load_avg_start": [round(x, 2) for x in os.getloadavg()]},
        "target_fraction_of_ceiling": TARGET_FRACTION_OF_CEILING,
        "ceiling": [],
        "runs": [],
    }
    started = time.perf_counter()
    for workers in args.workers:
        # ours first: its plan (the output tiles) defines which native tiles the ceiling decodes
        runs_w = []
        for codec in args.codec:
            res = run_ours(slide, workers=workers, out_dir=out_root / f"wsi_her2_w{workers}_{codec}", codec=codec)
            res.update(label=f"wsi-her2 tile (codec {codec})", processes_requested=workers, kind="ours", codec=codec)
            runs_w.append(res)
            if "error" in res:
                print(f"wsi-her2 failed: {res['error']}", file=sys.stderr)
        ok = [r for r in runs_w if "error" not in r]
        if not ok:
            report["runs"].extend(runs_w)
            continue
        ours = ok[0]
        from wsi_her2.store.patch_store import PatchStore

        store = PatchStore.open(ours["store"])
        indices = native_tiles_covering(store.coords_level0, store.tile_size_level0, grid=grid)
        seconds, cpu_s = measure_ceiling(slide, indices, processes=workers, repeats=args.repeats)
        ceiling = {
            "processes": workers, "native_tile_px": grid[0], "native_tiles": int(indices.size),
            "output_tiles": store.n_tiles, "seconds": round(seconds, 4), "cpu_s": round(cpu_s, 4),
            "native_tiles_per_s": round(indices.size / seconds, 1), "output_tiles_per_s": round(store.n_tiles / seconds, 1),
            "native_tiles_per_cpu_s": round(indices.size / cpu_s, 1),
            "output_tiles_per_cpu_s": round(store.n_tiles / cpu_s, 1),
        }
        report["ceiling"].append(ceiling)
        for r in ok:
            _add_ratios(r, ceiling)
            r["store_mb"] = round(_dir_bytes(Path(r["store"])) / 2**20, 1)
            r["tile_stage_tiles_per_s"] = round(r["tiles"] / r["stage_s"]["tiles"], 1) if r["stage_s"].get("tiles") else None
            print(f"[{time.perf_counter() - started:.0f} s] wsi-her2 w{workers} {r['codec']}: {r['wall_tiles_per_s']} tiles/s, "
                  f"{r['x_ceiling']} x ceiling", file=sys.stderr)
        report["runs"].extend(runs_w)
        for peer in peers:
            if not (PEER_VENVS / peer / "bin" / "python").exists():
                continue
            if workers > PEER_MAX_PROCESSES.get(peer, workers):
                continue  # no parallel path: its 1-process row stands
            res = run_peer(peer, slide, workers=workers, out_dir=out_root / f"{peer}_w{workers}")
            res.update(label=f"peer: {peer}", processes_requested=workers, kind="peer")
            if "error" not in res:
                res["label"] = f"peer: {peer} {res.get('version', '')}".strip()
                _add_ratios(res, ceiling)
                res["ours_over_peer"] = round(ours["wall_tiles_per_s"] / res["wall_tiles_per_s"], 2)
                res["ours_over_peer_cpu"] = round(ours["tiles_per_cpu_s"] / res["tiles_per_cpu_s"], 2)
            report["runs"].append(res)
            print(f"[{time.perf_counter() - started:.0f} s] {peer} w{workers}: "
                  f"{res.get('wall_tiles_per_s', res.get('error'))}", file=sys.stderr)
    ours_runs = [r for r in report["runs"] if r.get("kind") == "ours" and "error" not in r]
    below = any(r["x_ceiling"] < TARGET_FRACTION_OF_CEILING for r in ours_runs)
    if ours_runs and (args.profile == "always" or (args.profile == "auto" and below)):
        report["profile"] = profile_stages(slide, Path(ours_runs[0]["store"]), codec=ours_runs[0]["codec"])
    report["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["total_s"] = round(time.perf_counter() - started, 1)

    print(f"slide: {slide.name} ({report['slide']['size_bytes'] / 2**20:.0f} MB, {grid[2]}x{grid[3]} native tiles of "
          f"{grid[0]} px); load avg {report['machine']['load_avg_start']} -> {report['machine']['load_avg_end']}")
    print(render_table(report))
    print("tiles/s: tiles / wall time of the whole command (interpreter start to exit). CPU s: user+sys of the "
          "command's whole process tree (ceiling: of the decode calls only). x ceil: rate / the ceiling's output-tile "
          "rate at the same process count. ours/peer: wsi-her2's rate / the peer's at the same process count.")
    for r in ours_runs:
        print(f"wsi-her2 w{r['processes']} {r['codec']}: store {r['store_mb']:,.0f} MB; stage seconds {r['stage_s']} "
              f"(imports {r['imports_s']} s); tile stage alone {r['tile_stage_tiles_per_s']} tiles/s")
    if "profile" in report:
        print(render_profile(report["profile"]))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
