"""``wsi-her2 explain``: Grad-CAM / Grad-CAM++ heatmaps of a model on tiles."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "explain",
        help="Grad-CAM / Grad-CAM++ heatmaps for tiles",
        description=(
            "Writes, per tile, <stem>_cam.png (heatmap over the tile) and, with --stages, <stem>_stages.png "
            "(one CAM per network stage, input side left)."
        ),
    )
    p.add_argument("model", help="model.safetensors (or a registry name with --weights)")
    p.add_argument("tiles", nargs="+", help="tile images (PNG/JPEG/TIFF) or folders of them")
    p.add_argument("--weights", default=None)
    p.add_argument("--method", default="gradcam", choices=("gradcam", "gradcam++"))
    p.add_argument("--layer", default="auto", help="module name, or auto (the last convolutional stage)")
    p.add_argument("--target", default=None, help="class to explain (name or index; default: predicted)")
    p.add_argument("--stages", action="store_true", help="also write the per-stage row of CAMs")
    p.add_argument("--list-layers", action="store_true", help="print the model's module names and exit")
    p.add_argument("-o", "--out", default="explain", help="output folder")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from wsi_her2.errors import ConfigError
    from wsi_her2.models import load_model
    from wsi_her2.train.data import IMAGE_SUFFIXES, load_tile, to_tensor
    from wsi_her2.outputs.saliency import save_overlay_png
    from wsi_her2.train.explain import cams_for_layers, resolve_layer, save_stage_row_png, stage_layers
    from wsi_her2.stain.normalize import normalizer_from_config
    from wsi_her2.devices import resolve_device

    device = resolve_device(args.device)
    model = load_model(args.model, weights=args.weights, map_location=device)
    cfg = model.wsi_her2_config
    if args.list_layers:
        for name, m in model.named_modules():
            if name:
                print(name, type(m).__name__)
        return 0
    target = None
    if args.target is not None:
        if args.target in cfg.classes:
            target = cfg.classes.index(args.target)
        elif args.target.isdigit() and int(args.target) < len(cfg.classes):
            target = int(args.target)
        else:
            raise ConfigError(f"--target {args.target!r} is not a class of this model ({', '.join(cfg.classes)})")
    files: list[Path] = []
    for t in args.tiles:
        p = Path(t)
        files += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
    norm = normalizer_from_config(cfg.stain_norm)
    layer_name, layer = resolve_layer(model, args.layer)
    stages = stage_layers(model) if args.stages else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        rgb = load_tile(f, input_px=cfg.input_px)
        if norm is not None:
            rgb = norm(rgb)
        x = to_tensor(rgb, cfg.mean, cfg.std)[None].to(device)
        mods = [layer] + [m for _, m in stages]
        cams, logits = cams_for_layers(model, x, mods, method=args.method, target=target)
        probs = torch.softmax(logits, 1)[0].cpu().numpy()
        pred = int(np.argmax(probs))
        cls = cfg.classes[target if target is not None else pred]
        save_overlay_png(rgb, cams[0][0].cpu().numpy(), out / f"{f.stem}_cam.png")
        if stages:
            save_stage_row_png(rgb, [(n, c[0].cpu().numpy()) for (n, _), c in zip(stages, cams[1:])],
                               out / f"{f.stem}_stages.png", title=f"{args.method} for class {cls}")
        print(f"{f.name}: predicted {cfg.classes[pred]} (p={probs[pred]:.3f}); {args.method} of class {cls} "
              f"through {layer_name} -> {out / (f.stem + '_cam.png')}")
    return 0
