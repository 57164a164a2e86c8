"""``<id>.tma.png``: a tissue microarray's tile calls over the thumbnail, each core circled and labelled
with its grid name and call (``B3: 2+``), the grid positions without tissue marked ``missing``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_her2.outputs.geojson import class_color, qupath_class_name
from wsi_her2.outputs.heatmap import display_thumbnail, render_heatmap, save_heatmap_png
from wsi_her2.outputs.picture_layout import font, font_px_for
from wsi_her2.result import MISSING, Groups, TileResults
from wsi_her2.store.patch_store import PatchStore

_NOT_CALLED = (90, 90, 90)


def write_tma_picture(path: Path, store: PatchStore, groups: Groups, tiles: TileResults) -> Path:
    """Tile calls over the thumbnail, each core circled and labelled with its grid name and call."""
    from PIL import Image, ImageDraw

    thumb, s = display_thumbnail(store.array("thumbnail"), float(store.attrs["thumbnail"]["px_per_level0_px"]))
    image = render_heatmap(thumb, thumb_px_per_level0_px=s, coords_level0=store.coords_level0,
                           tile_size_level0=store.tile_size_level0, calls=tiles.calls, class_names=list(tiles.classes))
    pic = Image.fromarray(image)
    draw = ImageDraw.Draw(pic)
    fnt = font(font_px_for(pic.width))
    for part in groups.parts:
        if part.status == MISSING:
            continue
        x0, y0, x1, y1 = (v * s for v in part.geometry.bounds)
        score = str(part.columns["her2_score"])
        colour = class_color(qupath_class_name(score)) if part.called else _NOT_CALLED
        draw.ellipse([x0, y0, x1, y1], outline=colour, width=3)
        label = f"{part.name}: {score}" if part.called else f"{part.name}: {part.status}"
        draw.text(((x0 + x1) / 2, y1 + 2), label, fill=(0, 0, 0), font=fnt, anchor="mt")
    for part in groups.parts:
        if part.status == MISSING:
            draw.text((part.x_level0 * s, part.y_level0 * s), f"{part.name}: missing", fill=(120, 0, 0), font=fnt, anchor="mm")
    counts = {c: sum(p.called and p.columns["her2_score"] == c for p in groups.parts) for c in tiles.classes}
    legend = {f"{qupath_class_name(c)}: {n} cores": class_color(qupath_class_name(c)) for c, n in counts.items()}
    legend[f"not called: {sum(not p.called for p in groups.parts)} cores"] = _NOT_CALLED
    title = f"{store.slide_id}: TMA, {len(groups.parts)} grid positions, {sum(counts.values())} cores called"
    return save_heatmap_png(np.asarray(pic), path, title=title, legend=legend)
