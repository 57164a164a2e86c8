"""One GPU check: the GPU tests, scoring throughput per model, an end-to-end slide, one table.

Run through ``benchmarks/gpu_check.sh`` (which installs first). Steps, each in its own process:

1. ``pytest -m gpu``: the tests that need CUDA;
2. ``benchmarks/bench_score.py --device cuda`` for ``ihc_dab``, ``resnet50`` and
   ``convnext_tiny``, eager and ``--compile`` (bf16 autocast and channels_last are its CUDA
   defaults): bare forward (ceiling) vs the full path (store -> GPU -> probabilities);
3. end to end on a synthetic 40,000 x 30,000 px slide (``wsi_her2.synthetic.bench_spec``,
   generated once and cached): ``wsi-her2 tile`` with all cores, then ``wsi-her2 score`` on the
   GPU (``--force``: the slide holds an H&E region), with the peak GPU memory of scoring.

Without CUDA it says ``no GPU: CPU fallback`` and runs the same steps small (an 8000 x 6000
slide, 32-tile score benchmarks, no compile), so the script is exercised on any machine.
``--dry-run`` prints the plan and exits. Targets on one H100/H200 node with 16 cores: full/bare
>= 0.9 for every model; end to end >= 10,000 tiles/s (ihc_dab).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("ihc_dab", "resnet50", "convnext_tiny")
#: (slide width, height, bench_score tiles, batch) on a GPU and in the CPU fallback.
SIZES = {"cuda": (40000, 30000, 8192, 256), "cpu": (8000, 6000, 32, 16)}


def plan(*, cuda: bool, out: Path, data_dir: Path) -> list[tuple[str, list[str]]]:
    """The steps as (name, argv), in order."""
    py = sys.executable
    width, height, n_tiles, batch = SIZES["cuda" if cuda else "cpu"]
    device = "cuda" if cuda else "cpu"
    steps: list[tuple[str, list[str]]] = [("gpu tests", [py, "-m", "pytest", "-q", "-m", "gpu", "tests"])]
    for compiled in ((False, True) if cuda else (False,)):
        tag = "compile" if compiled else "eager"
        steps.append((f"bench_score {tag}", [
            py, "benchmarks/bench_score.py", "--device", device, "--models", ",".join(MODELS),
            "--n-tiles", str(n_tiles), "--batch-size", str(batch), "--json", str(out / f"score-{tag}.json"),
            *(["--compile"] if compiled else []),
        ]))
    steps.append(("end to end", [
        py, str(Path(__file__).resolve()), "--end-to-end", "--device", device, "--width", str(width),
        "--height", str(height), "--out", str(out), "--data-dir", str(data_dir),
    ]))
    return steps


def end_to_end(*, device: str, width: int, height: int, out: Path, data_dir: Path) -> int:
    """Tile with all cores, score on ``device``; write ``out/end_to_end.json``."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_tile import ensure_slide

    from wsi_her2.cli import main as cli_main
    from wsi_her2.store.patch_store import open_store

    slide = ensure_slide(width, height, data_dir=data_dir)
    cores = os.cpu_count() or 1
    tiles_dir, scores_dir = out / "e2e-tiles", out / "e2e-scores"
    t0 = time.perf_counter()
    rc = subprocess.call([sys.executable, "-m", "wsi_her2", "tile", str(slide), "-o", str(tiles_dir), "--workers", str(cores),
                          "--overwrite", "-q"])
    tile_s = time.perf_counter() - t0
    if rc != 0:
        print(f"wsi-her2 tile exited with {rc}", file=sys.stderr)
        return rc
    store = next(tiles_dir.glob("*.zarr"))
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rc = cli_main(["score", str(store), "-o", str(scores_dir), "--device", device, "--force", "--overwrite", "-q"])
    score_s = time.perf_counter() - t0
    if rc != 0:
        return rc
    n = open_store(store).n_tiles
    result = {
        "slide": slide.name, "tiles": n, "cores": cores, "tile_s": tile_s, "score_s": score_s,
        "tile_tiles_s": n / tile_s, "score_tiles_s": n / score_s, "end_to_end_tiles_s": n / (tile_s + score_s),
        "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    (out / "end_to_end.json").write_text(json.dumps(result, indent=2))
    return 0


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def render(out: Path, *, device_name: str, steps_rc: dict[str, int], seconds: float) -> str:
    """The one table: per model and mode full path / bare forward, then the end-to-end line."""
    lines = [
        f"wsi-her2 GPU check  {device_name}  {time.strftime('%Y-%m-%d %H:%M')}  ({seconds:.0f} s)",
        "| model | mode | bare forward img/s | full path tiles/s | full/bare | peak GPU mem GB |",
        "|---|---|---|---|---|---|",
    ]
    for tag in ("eager", "compile"):
        report = _load(out / f"score-{tag}.json")
        for r in (report or {}).get("rows", []):
            mem = r.get("peak_gpu_mem_gb")
            lines.append(f"| {r['model']} | {tag}, {r['precision']}, batch {r['batch']} | {r['ceiling_img_s']:,.0f} | "
                         f"{r['full_path_tiles_s']:,.0f} | {r['ratio']:.2f} | {'-' if mem is None else f'{mem:.1f}'} |")
    e2e = _load(out / "end_to_end.json")
    if e2e:
        mem = e2e["peak_gpu_mem_gb"]
        lines.append(f"| ihc_dab | end to end: tile ({e2e['cores']} cores) + score, {e2e['tiles']:,} tiles of {e2e['slide']} | "
                     f"tile {e2e['tile_tiles_s']:,.0f} | score {e2e['score_tiles_s']:,.0f} | "
                     f"end to end {e2e['end_to_end_tiles_s']:,.0f} tiles/s | {'-' if mem is None else f'{mem:.1f}'} |")
    failed = [name for name, rc in steps_rc.items() if rc != 0]
    lines.append("steps: " + ", ".join(f"{k} {'ok' if v == 0 else f'FAILED (rc {v})'}" for k, v in steps_rc.items()))
    if failed:
        lines.append("FAILED: " + ", ".join(failed))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("WSI_HER2_BENCH_DIR", REPO / "bench-out")) / "gpu-check")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("WSI_HER2_BENCH_DIR", REPO / "bench-out")))
    p.add_argument("--dry-run", action="store_true", help="print the steps and exit")
    p.add_argument("--cpu", action="store_true", help="the CPU fallback even when CUDA is present")
    p.add_argument("--end-to-end", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, default=SIZES["cuda"][0], help=argparse.SUPPRESS)
    p.add_argument("--height", type=int, default=SIZES["cuda"][1], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.end_to_end:
        return end_to_end(device=args.device, width=args.width, height=args.height, out=args.out, data_dir=args.data_dir)
    cuda = False
    if not args.cpu:
        import torch

        cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name(0) if cuda else f"no GPU: CPU fallback ({os.cpu_count()} cores, small sizes)"
    print(device_name if cuda else "no GPU: CPU fallback", flush=True)
    steps = plan(cuda=cuda, out=args.out, data_dir=args.data_dir)
    if args.dry_run:
        for name, cmd in steps:
            print(f"{name}: {shlex.join(cmd)}")
        return 0
    for stale in ("score-eager.json", "score-compile.json", "end_to_end.json"):
        (args.out / stale).unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    rcs: dict[str, int] = {}
    t0 = time.perf_counter()
    for name, cmd in steps:
        print(f"== {name}: {shlex.join(cmd)}", flush=True)
        rc = subprocess.call(cmd, cwd=REPO, env=env)
        rcs[name] = 0 if (name == "gpu tests" and rc == 5) else rc  # 5: pytest collected nothing to run
    print(render(args.out, device_name=device_name, steps_rc=rcs, seconds=time.perf_counter() - t0))
    return 0 if all(rc == 0 for rc in rcs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
