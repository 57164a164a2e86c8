"""Tile geometry at a physical resolution, and the plan of which tiles to cut.

Tiles live on a grid in *target* pixels (``target_mpp_um`` per pixel) anchored at the slide's
level-0 origin. Each tile is read from the pyramid level closest to the target without being
coarser than it, then resized. When a level is within ``mpp_tolerance`` of the target (a 0.2527
µm/px "40x" scan read at 0.25) it is used as is: resampling by 1 % blurs tiles for no gain, and
the true pixel size is recorded as ``effective_mpp_um``. Among the levels fine enough, one whose
*colour* is also fine enough is preferred: a 4:2:0 JPEG level stores colour at half its
resolution, which turns thin brown membranes grey (:mod:`wsi_her2.slide.chroma`); when no level's
colour is that sharp, the coarsest fine-enough level is used, and its colour resolution recorded.

Tiles are ordered block by block (``block_tiles`` x ``block_tiles`` tiles per block) so a chunk
of consecutive tiles comes from one compact slide region that is read and decoded once.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import NDArray

from wsi_her2.errors import ConfigError


@dataclass(frozen=True)
class TileGeometry:
    target_mpp_um: float
    tile_px: int
    stride_px: int
    slide_mpp_um: float
    level: int
    level_downsample: float
    level_px_per_target_px: float  # 1.0 when the level is used without resizing
    effective_mpp_um: float  # pixel size of the stored tiles
    grid_cols: int
    grid_rows: int
    chroma_factor: int | None = 1  # luma pixels per chroma sample of the level read (2: 4:2:0 JPEG; None: unknown)

    @property
    def chroma_mpp_um(self) -> float:
        """Resolution of the colour in the stored tiles, µm/px (coarser than the tiles' own when subsampled).

        An unknown factor gives the level's own pixel size, the finest the colour can be: the scorer then
        corrects for the pixel size alone, as it does for full colour."""
        return max(self.effective_mpp_um, self.slide_mpp_um * self.level_downsample * (self.chroma_factor or 1))

    @property
    def level0_px_per_target_px(self) -> float:
        return self.level_px_per_target_px * self.level_downsample

    @property
    def tile_size_level0(self) -> float:
        return self.tile_px * self.level0_px_per_target_px

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tile_size_level0"] = self.tile_size_level0
        d["chroma_mpp_um"] = self.chroma_mpp_um
        return d


def choose_geometry(
    *,
    level_dims: list[tuple[int, int]],
    level_downsamples: list[float],
    slide_mpp_um: float,
    target_mpp_um: float,
    tile_px: int,
    stride_px: int | None = None,
    mpp_tolerance: float = 0.025,
    level_chroma: list[int] | None = None,
    prefer_sharp_chroma: bool = True,
) -> TileGeometry:
    """Pick the pyramid level and scale for tiles of ``tile_px`` at ``target_mpp_um``.

    ``level_chroma``: each level's chroma subsampling factor (None: full colour everywhere; a level's
    None: unknown, taken as full colour); a level whose colour is as sharp as the target is preferred
    (module docstring)."""
    if tile_px < 16:
        raise ConfigError(f"--tile-px {tile_px} is too small (minimum 16)")
    stride_px = tile_px if stride_px is None else stride_px
    if not 0 < stride_px:
        raise ConfigError(f"stride {stride_px} px must be positive")
    if target_mpp_um <= 0:
        raise ConfigError(f"--mpp {target_mpp_um} must be positive")
    if target_mpp_um < slide_mpp_um * (1 - mpp_tolerance):
        raise ConfigError(
            f"target {target_mpp_um} µm/px is finer than the slide's {slide_mpp_um:.4f} µm/px; "
            "upsampling invents detail: use --mpp >= the slide's MPP"
        )
    chroma = list(level_chroma) if level_chroma is not None else [1] * len(level_downsamples)
    limit = target_mpp_um * (1 + mpp_tolerance)
    # levels are ordered fine to coarse: keep the coarsest that is fine enough, in colour too if one is
    fine = [i for i, ds in enumerate(level_downsamples) if slide_mpp_um * ds <= limit] or [0]
    sharp = [i for i in fine if slide_mpp_um * level_downsamples[i] * (chroma[i] or 1) <= limit]
    best = max(sharp) if sharp and prefer_sharp_chroma else max(fine)
    ds = float(level_downsamples[best])
    level_mpp = slide_mpp_um * ds
    ratio = target_mpp_um / level_mpp
    if abs(ratio - 1.0) <= mpp_tolerance:
        ratio, effective = 1.0, level_mpp
    else:
        effective = target_mpp_um
    w0, h0 = level_dims[0]
    target_w = int(np.floor(w0 / (ratio * ds)))
    target_h = int(np.floor(h0 / (ratio * ds)))
    cols = max(0, (target_w - tile_px) // stride_px + 1) if target_w >= tile_px else 0
    rows = max(0, (target_h - tile_px) // stride_px + 1) if target_h >= tile_px else 0
    # guard: the level's own size can be a pixel short of level0/ds; keep tiles inside it
    lw, lh = level_dims[best]
    while cols and ((cols - 1) * stride_px + tile_px) * ratio > lw:
        cols -= 1
    while rows and ((rows - 1) * stride_px + tile_px) * ratio > lh:
        rows -= 1
    return TileGeometry(
        target_mpp_um=float(target_mpp_um),
        tile_px=int(tile_px),
        stride_px=int(stride_px),
        slide_mpp_um=float(slide_mpp_um),
        level=int(best),
        level_downsample=ds,
        level_px_per_target_px=float(ratio),
        effective_mpp_um=float(effective),
        grid_cols=int(cols),
        grid_rows=int(rows),
        chroma_factor=None if chroma[best] is None else int(chroma[best]),
    )


@dataclass
class TilePlan:
    grid_rc: NDArray[np.int32]  # (N, 2) row, col on the tile grid
    coords_level0: NDArray[np.int64]  # (N, 2) x, y top-left in level-0 pixels
    mask_fraction: NDArray[np.float32]  # (N,) thumbnail tissue coverage that selected the tile
    block_id: NDArray[np.int32]  # (N,) block each tile is read with

    @property
    def n_tiles(self) -> int:
        return int(self.grid_rc.shape[0])


def mask_coverage(
    mask: NDArray[np.bool_], *, geometry: TileGeometry, thumb_px_per_level0_px: float
) -> NDArray[np.float32]:
    """Fraction of each grid tile's footprint covered by ``mask``: ``(grid_rows, grid_cols)``.

    Uses a summed-area table, so it costs O(mask pixels + tiles) however many tiles there are.
    """
    rows, cols = geometry.grid_rows, geometry.grid_cols
    if rows == 0 or cols == 0:
        return np.zeros((rows, cols), np.float32)
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1)
    scale = geometry.level0_px_per_target_px * thumb_px_per_level0_px  # thumb px per target px
    x0 = np.arange(cols) * geometry.stride_px * scale
    y0 = np.arange(rows) * geometry.stride_px * scale
    size = geometry.tile_px * scale
    xa = np.clip(np.floor(x0).astype(int), 0, mask.shape[1])
    xb = np.clip(np.maximum(np.ceil(x0 + size).astype(int), xa + 1), 0, mask.shape[1])
    ya = np.clip(np.floor(y0).astype(int), 0, mask.shape[0])
    yb = np.clip(np.maximum(np.ceil(y0 + size).astype(int), ya + 1), 0, mask.shape[0])
    total = sat[yb][:, xb] - sat[ya][:, xb] - sat[yb][:, xa] + sat[ya][:, xa]
    area = np.maximum((yb - ya)[:, None] * (xb - xa)[None, :], 1)
    return (total / area).astype(np.float32)


def plan_tiles(
    coverage: NDArray[np.float32],
    *,
    geometry: TileGeometry,
    min_mask_fraction: float = 0.05,
    block_tiles: int = 8,
) -> TilePlan:
    """Tiles whose thumbnail tissue coverage reaches ``min_mask_fraction``, in block-major order."""
    rr, cc = np.nonzero(coverage >= min_mask_fraction)
    block_cols = (geometry.grid_cols + block_tiles - 1) // block_tiles
    br, bc = rr // block_tiles, cc // block_tiles
    order = np.lexsort((cc, rr, bc, br))  # last key sorts first: block row, block col, row, col
    rr, cc, br, bc = rr[order], cc[order], br[order], bc[order]
    f = geometry.level0_px_per_target_px
    xs = np.round(cc * geometry.stride_px * f).astype(np.int64)
    ys = np.round(rr * geometry.stride_px * f).astype(np.int64)
    return TilePlan(
        grid_rc=np.stack([rr, cc], axis=1).astype(np.int32),
        coords_level0=np.stack([xs, ys], axis=1),
        mask_fraction=coverage[rr, cc].astype(np.float32),
        block_id=(br * block_cols + bc).astype(np.int32),
    )
