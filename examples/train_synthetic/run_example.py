"""End to end on synthetic data: labelled IHC tiles -> train -> evaluate -> explain -> score a slide.

Run from the repository root (a few minutes on a laptop CPU)::

    python examples/train_synthetic/run_example.py [--out example-out] [--per-class 40] [--epochs 4]

Every step is a plain ``wsi-her2`` command, printed before it runs, so the same lines work on
real data. Outputs land in ``--out`` (default ``./example-out``).
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def sh(*args: str) -> None:
    cmd = [sys.executable, "-m", "wsi_her2", *args]
    print("\n$ wsi-her2 " + " ".join(shlex.quote(a) for a in args), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"  ({time.perf_counter() - t0:.1f} s)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="example-out")
    ap.add_argument("--per-class", type=int, default=40, help="tiles per HER2 grade")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--skip-slide", action="store_true", help="stop after training, evaluation and explanation")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    sys.path.insert(0, str(ROOT))

    # 1. Labelled synthetic IHC tiles: 224 px at 0.5 µm/px cut from the graded synthetic slide
    #    (label = planted grade), 8 pseudo-patients per grade, listed in labels.csv.
    from wsi_her2.train.data import write_synthetic_dataset

    t0 = time.perf_counter()
    csv_path = write_synthetic_dataset(out / "data", a.per_class, tile_px=224, n_groups=8)
    print(f"1. wrote {4 * a.per_class} labelled tiles and {csv_path} ({time.perf_counter() - t0:.1f} s)")

    # 2. Train a small model from scratch (no ImageNet weights offline) at 64 px network input;
    #    the model keeps tile_px 224 at 0.5 µm/px so `wsi-her2 score` cuts slides the same way.
    run = out / "run"
    sh("train", str(csv_path), "--model", a.model, "--recipe", "all-trainable", "--group-col", "patient",
       "--from-scratch", "--input-px", "64", "--tile-px", "224", "--mpp", "0.5", "--epochs", str(a.epochs),
       "--set", "lr=1e-3", "--set", "step_epochs=3", "--threads", "2", "--quiet", "-o", str(run))

    # 3. Evaluate on the held-out patients of the split (with 8-view TTA).
    sh("evaluate", str(run / "model.safetensors"), str(run / "split.csv"), "--split", "test", "--tta",
       "-o", str(run / "eval_test"))

    # 4. Explain one tile of each grade (Grad-CAM++ and the per-stage row).
    tiles = [sorted((out / "data" / c).glob("*.png"))[0] for c in ("0", "1+", "2+", "3+")]
    sh("explain", str(run / "model.safetensors"), *map(str, tiles), "--method", "gradcam++", "--stages",
       "-o", str(run / "explain"))

    if a.skip_slide:
        return 0
    # 5. Score a synthetic slide (the bundled demo slide, planted call 2+) with the trained model.
    slide = out / "demo.svs"
    subprocess.run([sys.executable, "-m", "wsi_her2.synthetic.slides", str(slide), "--preset", "demo"], check=True, cwd=ROOT)
    sh("tile", str(slide), "--mpp", "0.5", "--tile-px", "224", "-o", str(out / "stores"))
    sh("score", str(out / "stores"), "--model", str(run / "model.safetensors"), "--agg", "vote",
       "-o", str(out / "scored"))
    print(f"\nDone. Open {slide} in QuPath and drag the GeoJSON from {out / 'scored'} onto it (see README.md).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
