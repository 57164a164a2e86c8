"""Peer: WSInfer's patching and patch loading on one slide; prints the runner JSON line.

Run with ``$WSI_HER2_PEER_VENVS/wsinfer/bin/python``. What it does, with WSInfer's own code:
``patchlib.segment_and_patch_one_slide(patch_size_px=224, patch_spacing_um_px=0.5)`` (its
tissue mask and patch coordinates, written to HDF5) -> every patch's pixels through
``modellib.data.WholeSlideImagePatches`` (the Dataset ``wsinfer run`` feeds its model with) and
a ``DataLoader`` of ``--workers`` processes, as ``wsinfer run`` sets it up (``--workers 1``:
read in this process). No model runs; pixels are read, not stored.

WSInfer fetches its model registry when imported; with ``HF_HUB_OFFLINE=1`` it reads a local
registry file, so a stub ``{"models": {}}`` is written there first when none exists.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

t_import = time.perf_counter()

from _common import Stopwatch, emit, runner_parser  # noqa: E402


def _stub_registry() -> None:
    path = Path.home() / ".wsinfer-zoo" / "wsinfer-zoo-registry.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"models": {}}))


def _keep_images(batch: list) -> list:
    return [image for image, _ in batch]


def main() -> None:
    parser = runner_parser(__doc__.split("\n")[0])
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _stub_registry()
    import torch
    import wsinfer
    from wsinfer.modellib.data import WholeSlideImagePatches
    from wsinfer.patchlib import segment_and_patch_one_slide

    sw = Stopwatch()
    imports_s = time.perf_counter() - t_import
    out_dir = Path(args.out_dir)
    t0 = time.perf_counter()
    with sw.lap("tissue_and_coords"):
        segment_and_patch_one_slide(args.slide, out_dir, patch_size_px=args.tile_px, patch_spacing_um_px=args.mpp)
    h5 = out_dir / "patches" / f"{Path(args.slide).stem}.h5"
    n = 0
    with sw.lap("read_tiles"):
        ds = WholeSlideImagePatches(args.slide, h5)
        workers = 0 if args.workers <= 1 else args.workers
        if workers == 0:
            ds.worker_init()  # what wsinfer run does when it loads in-process
        loader = torch.utils.data.DataLoader(
            ds, batch_size=64, shuffle=False, num_workers=workers, worker_init_fn=ds.worker_init,
            collate_fn=_keep_images,
        )
        size = None
        for batch in loader:
            size = batch[0].size
            n += len(batch)
    seconds = time.perf_counter() - t0
    emit(
        tool="wsinfer", version=wsinfer.__version__, tiles=n, seconds=seconds, processes=max(1, args.workers),
        imports_s=round(imports_s, 3), stage_s=sw.laps, read_px=list(size) if size else None,
        what="its tissue mask + patch grid (HDF5), 224 px patches at 0.5 µm/px read via its torch Dataset (not stored)",
    )


if __name__ == "__main__":
    main()
