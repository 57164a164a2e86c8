"""The tile stage on synthetic slides with planted geometry, and on the real fixtures."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import fixture_slide
from wsi_her2.errors import ConfigError, NoTissueError
from wsi_her2.tile.qc import QC_FLAGS, laplacian_variance
from wsi_her2.store.patch_store import PatchStore, open_store
from wsi_her2.synthetic.slides import Region, SyntheticSlideSpec, write_synthetic_slide
from wsi_her2.tile.pipeline import TileConfig, tile_slide
from wsi_her2.tile.geometry import choose_geometry

TILE = 224


def _tiles_in(store: PatchStore, region: Region) -> np.ndarray:
    """Boolean mask of the store's tiles lying wholly inside ``region`` (level-0 px)."""
    xy = store.coords_level0
    size = store.tile_size_level0
    return (
        (xy[:, 0] >= region.x_px) & (xy[:, 0] + size <= region.x_px + region.w_px)
        & (xy[:, 1] >= region.y_px) & (xy[:, 1] + size <= region.y_px + region.h_px)
    )


def _tiles_touching(store: PatchStore, region: Region) -> np.ndarray:
    xy = store.coords_level0
    size = store.tile_size_level0
    return (
        (xy[:, 0] < region.x_px + region.w_px) & (xy[:, 0] + size > region.x_px)
        & (xy[:, 1] < region.y_px + region.h_px) & (xy[:, 1] + size > region.y_px)
    )


@pytest.fixture(scope="module")
def graded_store(graded_slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("graded-out")
    res = tile_slide(graded_slide, out, config=TileConfig(workers=1, codec="zstd"))  # lossless: pixels compared exactly
    return res, open_store(res.store)


def test_tile_count_matches_planted_geometry(graded_store):
    from wsi_her2.synthetic.slides import graded_ihc_spec

    res, store = graded_store
    spec = graded_ihc_spec()
    expected = sum((r.w_px // TILE) * (r.h_px // TILE) for r in spec.regions)  # blocks align with the grid
    assert store.qc_pass.sum() == expected == 4 * 64
    for region in spec.regions:
        inside = _tiles_in(store, region)
        assert inside.sum() == 64, region
        assert store.qc_pass[inside].all(), f"grade {region.grade} tiles rejected: {np.unique(store.qc_flags[inside])}"
    # nothing outside the planted tissue passes QC
    anywhere = np.any([_tiles_in(store, r) for r in spec.regions], axis=0)
    assert not store.qc_pass[~anywhere].any()


def test_pale_hematoxylin_and_strong_dab_are_both_tissue(graded_store):
    from wsi_her2.synthetic.slides import graded_ihc_spec

    _, store = graded_store
    mask = store.array("tissue_mask")
    scale = store.attrs["thumbnail"]["px_per_level0_px"]
    for region in graded_ihc_spec().regions:
        x0, y0 = int((region.x_px + 200) * scale), int((region.y_px + 200) * scale)
        x1, y1 = int((region.x_px + region.w_px - 200) * scale), int((region.y_px + region.h_px - 200) * scale)
        assert mask[y0:y1, x0:x1].mean() > 0.95, f"grade {region.grade} not detected as tissue"
    # glass (with dust specks) is not tissue: the gaps between blocks
    gap = mask[: int(1792 * scale) - 2, :]
    assert gap.mean() < 0.01


def test_store_is_self_describing(graded_store, graded_slide):
    import hashlib

    res, store = graded_store
    meta = store.attrs
    assert meta["complete"] is True and meta["schema_version"] == 2
    assert meta["slide"]["sha256"] == hashlib.sha256(graded_slide.read_bytes()).hexdigest()
    assert meta["slide"]["mpp_source"].startswith("vendor:")
    assert meta["slide"]["reader"] in ("openslide", "tiffslide") and meta["slide"]["reader_version"]
    assert meta["tiling"]["target_mpp_um"] == 0.5 and meta["tiling"]["tile_px"] == TILE
    assert meta["qc"]["params"]["min_laplacian_var"] == 75.0 and meta["qc"]["params"]["min_tissue_fraction"] == 0.4
    assert meta["tissue"]["params"]["min_od_sum"] == 0.02 and meta["tissue"]["od_threshold"] >= 0.02
    assert meta["qc"]["params"]["blur_metric"] == "sharpness"
    assert meta["package_version"]
    first = store.read_tiles(0, 1)
    assert first.shape == (1, TILE, TILE, 3) and first.dtype == np.uint8 and store.tile_chunks().shape[1:] == (TILE, TILE, 3)
    assert (res.store.parent / "graded.qc.png").is_file()


def test_stored_tiles_equal_slide_pixels(graded_store, graded_slide):
    from wsi_her2.slide import open_slide

    _, store = graded_store
    with open_slide(graded_slide, backend="openslide") as reader:
        for i in (0, store.n_tiles // 2, store.n_tiles - 1):
            x, y = store.coords_level0[i]
            expect = reader.read_level_region(0, int(x), int(y), TILE, TILE)
            assert np.array_equal(store.read_tiles(i, i + 1)[0], expect)


def test_qc_finds_planted_blur_and_pen(demo_slide, tmp_path):
    from wsi_her2.synthetic.slides import demo_spec

    res = tile_slide(demo_slide, tmp_path, config=TileConfig(workers=1))
    store = open_store(res.store)
    spec = demo_spec()
    blur = next(r for r in spec.regions if r.blur_sigma_px > 0)
    pen = next(r for r in spec.regions if r.kind == "pen")
    flags = store.qc_flags
    in_blur = _tiles_in(store, blur) & ~_tiles_touching(store, pen)  # sharp ink edges are not blur
    assert in_blur.sum() > 0
    assert np.all(flags[in_blur] & QC_FLAGS["blurry"]), "blurred region tiles must be flagged blurry"
    sharp = np.any([_tiles_in(store, r) for r in spec.regions if r.kind == "ihc" and r.blur_sigma_px == 0], axis=0)
    sharp &= ~_tiles_touching(store, pen)
    # sharp tissue tiles are not called blurry (except where the pen stroke covers them)
    assert not np.any(flags[sharp] & QC_FLAGS["blurry"])
    assert np.any(flags[_tiles_in(store, pen)] & QC_FLAGS["pen"])
    summary = store.attrs["qc"]["summary"]
    assert summary["pen_marks"] is True
    assert summary["out_of_focus_regions"] >= 1


def test_interrupted_run_resumes_to_identical_store(graded_slide, tmp_path, monkeypatch):
    import wsi_her2.tile.pipeline as tp

    clean = open_store(tile_slide(graded_slide, tmp_path / "clean", config=TileConfig(workers=1, chunk_tiles=32)).store)
    real = tp._process_unit
    calls = {"n": 0}

    def dying(unit):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-run
        return real(unit)

    monkeypatch.setattr(tp, "_process_unit", dying)
    with pytest.raises(KeyboardInterrupt):
        tile_slide(graded_slide, tmp_path / "resumed", config=TileConfig(workers=1, chunk_tiles=32))
    partial = PatchStore.open(tmp_path / "resumed" / "graded.zarr", require_complete=False)
    assert partial.attrs["complete"] is False and partial.units_done().sum() == 3
    with pytest.raises(Exception, match="incomplete"):
        open_store(partial.path)
    monkeypatch.setattr(tp, "_process_unit", real)
    res = tile_slide(graded_slide, tmp_path / "resumed", config=TileConfig(workers=1, chunk_tiles=32))
    assert res.status == "resumed"
    resumed = open_store(res.store)
    for name in ("tiles", "coords_level0", "qc_flags", "laplacian_var", "tissue_fraction", "pen_fraction"):
        assert np.array_equal(clean.array(name), resumed.array(name)), name
    # and a complete store is skipped on the next run
    assert tile_slide(graded_slide, tmp_path / "resumed", config=TileConfig(workers=1, chunk_tiles=32)).status == "skipped"


def test_parallel_workers_give_the_same_store(graded_slide, graded_store, tmp_path):
    _, serial = graded_store
    res = tile_slide(graded_slide, tmp_path, config=TileConfig(workers=2, chunk_tiles=16, codec="zstd"))
    par = open_store(res.store)
    assert np.array_equal(serial.array("tiles"), par.array("tiles"))
    assert np.array_equal(serial.qc_flags, par.qc_flags)


def test_resampled_level_matches_area_average(tmp_path):
    """A 0.25 µm/px slide tiled at 0.5 µm/px: each tile is the 2x2 mean of level-0 pixels."""
    spec = SyntheticSlideSpec(3584, 3584, mpp_um=0.25, regions=(Region("ihc", 0, 0, 3584, 3584, grade=2),),
                              pyramid_downsamples=(1, 4), dust=False)
    slide = write_synthetic_slide(tmp_path / "x40.svs", spec)
    store = open_store(tile_slide(slide, tmp_path, config=TileConfig(workers=1, codec="zstd")).store)
    geo = store.attrs["tiling"]
    assert geo["level"] == 0 and geo["level_px_per_target_px"] == 2.0 and geo["tile_size_level0"] == 448
    from wsi_her2.slide import open_slide

    with open_slide(slide) as reader:
        x, y = store.coords_level0[5]
        raw = reader.read_level_region(0, int(x), int(y), 448, 448).astype(np.float32)
    expect = raw.reshape(224, 2, 224, 2, 3).mean(axis=(1, 3))
    got = store.read_tiles(5, 6)[0].astype(np.float32)
    assert np.abs(got - expect).max() <= 1.0


def test_no_tissue_slide_is_refused_without_a_store(tmp_path):
    slide = write_synthetic_slide(tmp_path / "glass.svs", SyntheticSlideSpec(2048, 2048, regions=(), dust=True))
    with pytest.raises(NoTissueError, match="no tissue"):
        tile_slide(slide, tmp_path / "out", config=TileConfig(workers=1))
    assert not (tmp_path / "out" / "glass.zarr").exists()
    assert (tmp_path / "out" / "glass.qc.png").is_file()  # the user sees what was looked at


def test_no_tissue_slide_reads_indeterminate_in_the_cohort_table():
    """An empty or unstained core fails tiling with its reason; the cohort table calls it
    indeterminate, never HER2 0."""
    from wsi_her2.batch.manifest import SlideJob
    from wsi_her2.batch.report import cohort_rows
    from wsi_her2.batch.state import SlideState

    jobs = [SlideJob(slide_id=s, path=f"/x/{s}.svs") for s in ("empty", "broken")]
    states = {
        "empty": SlideState("empty", status="failed", stage="tile", error_type="NoTissueError", reason="no tissue found"),
        "broken": SlideState("broken", status="failed", stage="tile", error_type="SlideOpenError", reason="corrupt"),
    }
    rows = {r["slide"]: r for r in cohort_rows(jobs, states)}
    assert rows["empty"]["her2_score"] == "indeterminate" and rows["empty"]["reason"] == "no tissue found"
    assert "her2_score" not in rows["broken"]


def test_geometry_rules():
    dims = [(40000, 30000), (10000, 7500), (2500, 1875)]
    # 0.2527 µm/px "40x" scan at 0.25: within tolerance, no resampling
    g = choose_geometry(level_dims=dims, level_downsamples=[1, 4, 16], slide_mpp_um=0.2527, target_mpp_um=0.25, tile_px=256)
    assert g.level == 0 and g.level_px_per_target_px == 1.0 and g.effective_mpp_um == pytest.approx(0.2527)
    # 0.25 -> 1.0 µm/px reads level 1 (ds 4) natively
    g = choose_geometry(level_dims=dims, level_downsamples=[1, 4, 16], slide_mpp_um=0.25, target_mpp_um=1.0, tile_px=224)
    assert g.level == 1 and g.level_px_per_target_px == 1.0 and g.grid_cols == 10000 // 224
    # 0.25 -> 0.5 reads level 0 and halves it
    g = choose_geometry(level_dims=dims, level_downsamples=[1, 4, 16], slide_mpp_um=0.25, target_mpp_um=0.5, tile_px=224)
    assert g.level == 0 and g.level_px_per_target_px == 2.0 and g.tile_size_level0 == 448
    # overlap: stride smaller than the tile
    g = choose_geometry(level_dims=dims, level_downsamples=[1, 4, 16], slide_mpp_um=0.5, target_mpp_um=0.5, tile_px=224, stride_px=112)
    assert g.grid_cols == (40000 - 224) // 112 + 1
    with pytest.raises(ConfigError, match="upsampling"):
        choose_geometry(level_dims=dims, level_downsamples=[1], slide_mpp_um=0.5, target_mpp_um=0.25, tile_px=224)


def test_laplacian_matches_reference_definition():
    """The papers' blur measure, cv2.Laplacian(gray, CV_64F).var(), written out independently:
    OpenCV's fixed-point grey, the 4-neighbour kernel, borders reflected (scipy's 'mirror')."""
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(3, 40, 50, 3), dtype=np.uint8)
    t = tiles.astype(np.int64)
    gray = ((9798 * t[..., 0] + 19235 * t[..., 1] + 3735 * t[..., 2] + 16384) >> 15).astype(np.float64)  # OpenCV's 15-bit fixed point
    from scipy import ndimage

    kernel = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], float)
    expect = [ndimage.convolve(g, kernel, mode="mirror").var() for g in gray]
    assert np.allclose(laplacian_variance(tiles), expect, rtol=1e-6)
    flat = np.full((1, 40, 40, 3), 128, np.uint8)
    assert laplacian_variance(flat)[0] == 0.0
    # a blurred copy scores far lower: the measure separates sharp from blurry
    blurred = np.stack([ndimage.uniform_filter(tile, size=(5, 5, 1)) for tile in tiles])
    assert np.all(laplacian_variance(blurred) < 0.2 * laplacian_variance(tiles))


def test_real_fixture_cmu_tiles_with_both_backends(tmp_path):
    path = fixture_slide("CMU-1-Small-Region.svs")
    a = open_store(tile_slide(path, tmp_path / "o", config=TileConfig(backend="openslide", workers=1, codec="zstd")).store)
    b = open_store(tile_slide(path, tmp_path / "t", config=TileConfig(backend="tiffslide", workers=1, codec="zstd")).store)
    assert a.n_tiles == b.n_tiles > 30
    assert np.array_equal(a.array("tiles"), b.array("tiles"))
    assert 20 < a.qc_pass.sum() < a.n_tiles


def test_slide_corrupt_past_its_header_is_one_clear_error(graded_slide, tmp_path):
    from wsi_her2.cli import main

    data = graded_slide.read_bytes()
    broken = tmp_path / "broken.svs"
    broken.write_bytes(data[: int(len(data) * 0.7)])  # a copy cut short: header fine, tiles missing
    rc = main(["tile", str(broken), "-o", str(tmp_path / "out"), "--workers", "1", "-q"])
    assert rc == 1
    store = tmp_path / "out" / "broken.zarr"
    if store.exists():  # whatever was left must not look complete
        with pytest.raises(Exception, match="incomplete"):
            open_store(store)


def test_in_process_tiling_is_thread_safe(graded_slide, demo_slide, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(tile_slide, s, tmp_path / s.stem, config=TileConfig(workers=1)) for s in (graded_slide, demo_slide)]
        results = [f.result() for f in futs]
    assert all(open_store(r.store).attrs["complete"] for r in results)


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none", "jpeg"])
def test_chunks_written_directly_read_back_through_zarr(codec, tmp_path):
    """The tiler writes tile chunks itself; zarr must read back exactly what zarr would have written."""
    rng = np.random.default_rng(1)
    n, chunk = 10, 4  # 3 units, the last one partial
    tiles = rng.integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)
    tiles[:, :8] = 200  # something compressible
    store = PatchStore.create(tmp_path / "s.zarr", n_tiles=n, tile_px=16, chunk_tiles=chunk, codec=codec,
                              attrs={}, per_tile={}, images={})
    writer = store.chunk_writer()
    for unit in range(3):
        buf = np.zeros((chunk, 16, 16, 3), np.uint8)
        part = tiles[unit * chunk : (unit + 1) * chunk]
        buf[: len(part)] = part
        writer.write(unit, buf)
    reopened = PatchStore.open(store.path, require_complete=False)
    via_zarr = PatchStore.create(tmp_path / "z.zarr", n_tiles=n, tile_px=16, chunk_tiles=chunk, codec=codec,
                                 attrs={}, per_tile={}, images={})
    via_zarr.write_tiles(0, tiles)  # zarr's own write path
    assert np.array_equal(reopened.read_tiles(0, n), via_zarr.read_tiles(0, n))
    if codec != "jpeg":  # lossless
        assert np.array_equal(reopened.read_tiles(0, n), tiles)
    assert not list((tmp_path / "s.zarr").rglob("*.tmp"))  # temporary names renamed away
    with pytest.raises(ValueError, match="chunk must be"):
        writer.write(0, tiles[:3])


def test_sampled_qc_fractions_match_full_resolution(tmp_path):
    """Pen fractions on every 4th pixel agree with every pixel on real H&E tiles; the stored
    tissue fraction is the tile's coverage by the slide's tissue mask (they cannot disagree)."""
    from wsi_her2.tile.qc import QcParams, tile_qc

    path = fixture_slide("CMU-1-Small-Region.svs")
    store = open_store(tile_slide(path, tmp_path, config=TileConfig(workers=1, codec="zstd")).store)
    tiles = store.read_tiles(0, store.n_tiles)
    cover = store.array("mask_fraction")
    mpp = store.attrs["tiling"]["effective_mpp_um"]
    fast = tile_qc(tiles, tissue_fraction=cover, mpp_um=mpp)
    full = tile_qc(tiles, tissue_fraction=cover, mpp_um=mpp, qc_params=QcParams(fraction_step_px=1))
    assert np.abs(fast.pen_fraction - full.pen_fraction).max() < 0.01
    assert np.array_equal(fast.laplacian_var, full.laplacian_var)
    assert np.array_equal(store.array("tissue_fraction"), cover)  # what the tiler stored
    assert np.array_equal(store.array("sharpness"), fast.sharpness)
    # the in-focus real H&E passes the focus gate wherever there is structure to judge
    judged = store.array("tissue_fraction") >= 0.4
    assert (fast.sharpness[judged] >= QcParams().min_sharpness).mean() > 0.95


def _dab_mean_per_tile(tiles_u8: np.ndarray) -> np.ndarray:
    """Mean of ``skimage.color.rgb2hed(tiles / 255)[..., 2]`` per tile (its separate_stains formula)."""
    from skimage.color import hed_from_rgb

    log_od = np.log(np.maximum(np.arange(256) / 255.0, 1e-6)) / np.log(1e-6)
    dab = sum(log_od[tiles_u8[..., c]] * hed_from_rgb[c, 2] for c in range(3))
    return np.maximum(dab, 0).mean(axis=(1, 2))


def test_jpeg_store_is_close_to_the_slide_and_small(graded_store, graded_slide, tmp_path):
    """The default JPEG store: same plan and QC as the lossless one (QC runs before encoding),
    pixels within JPEG q90 error of the slide, DAB optical density unchanged to ~1e-3, far fewer bytes."""
    from skimage.color import rgb2hed

    _, lossless = graded_store
    res = tile_slide(graded_slide, tmp_path, config=TileConfig(workers=2, codec="jpeg"))
    jpeg = open_store(res.store)
    assert jpeg.attrs["codec"] == "jpeg"
    for name in ("coords_level0", "qc_flags", "laplacian_var", "tissue_fraction", "pen_fraction"):
        assert np.array_equal(lossless.array(name), jpeg.array(name)), name
    a = lossless.read_tiles(0, lossless.n_tiles)
    b = jpeg.read_tiles(0, jpeg.n_tiles)
    psnr = 10 * np.log10(255.0**2 / np.mean(np.square(a.astype(np.int32) - b)))
    assert psnr > 38, psnr
    # skimage's rgb2hed DAB channel, by a lookup over the 256 levels (the full conversion of every
    # tile in float64 took seconds); pinned to rgb2hed itself on two tiles
    np.testing.assert_allclose(_dab_mean_per_tile(b[:2]), rgb2hed(b[:2] / 255.0)[..., 2].mean(axis=(1, 2)), atol=1e-9)
    assert np.abs(_dab_mean_per_tile(a) - _dab_mean_per_tile(b)).max() < 2e-3

    def size(path):
        return sum(f.stat().st_size for f in (path / "tiles").rglob("*") if f.is_file())

    assert size(jpeg.path) < size(lossless.path) / 3


def test_jpeg_quality_reaches_the_chunk_files(tmp_path):
    """--jpeg-quality is the quality of the zarr codec and of the tiler's direct writes alike."""
    rng = np.random.default_rng(2)
    tiles = np.clip(rng.normal(170, 25, size=(4, 32, 32, 3)), 0, 255).astype(np.uint8)
    sizes = {}
    for quality in (60, 95):
        direct = PatchStore.create(tmp_path / f"d{quality}.zarr", n_tiles=4, tile_px=32, chunk_tiles=4, codec="jpeg",
                                   attrs={}, per_tile={}, images={}, jpeg_quality=quality)
        direct.chunk_writer().write(0, tiles)
        via_zarr = PatchStore.create(tmp_path / f"z{quality}.zarr", n_tiles=4, tile_px=32, chunk_tiles=4, codec="jpeg",
                                     attrs={}, per_tile={}, images={}, jpeg_quality=quality)
        via_zarr.write_tiles(0, tiles)
        assert np.array_equal(direct.read_tiles(0, 4), via_zarr.read_tiles(0, 4))
        assert direct.attrs["jpeg_quality"] == quality
        sizes[quality] = (direct.path / "tiles" / "c" / "0" / "0" / "0" / "0").stat().st_size
    assert sizes[95] > sizes[60]
    with pytest.raises(ConfigError, match="jpeg-quality"):
        TileConfig(jpeg_quality=30).validate()


def test_large_tiles_get_fewer_tiles_per_jpeg_chunk(tmp_path):
    """1024 px tiles x 64 per chunk would be a 65,536 px tall JPEG (limit 65,500): the tiler fits the chunk."""
    spec = SyntheticSlideSpec(4096, 3072, regions=(Region("ihc", 0, 0, 4096, 3072, grade=2),), dust=False)
    slide = write_synthetic_slide(tmp_path / "big-tiles.svs", spec)
    store = open_store(tile_slide(slide, tmp_path / "out", config=TileConfig(workers=1, tile_px=1024)).store)
    assert store.chunk_tiles * 1024 <= 65_500 and store.n_tiles == 12


def test_interrupted_threaded_run_resumes_to_identical_store(graded_slide, tmp_path, monkeypatch):
    """Ctrl-C reaching a worker thread: finished units are kept, the rest is redone, same store."""
    import threading
    import time

    import wsi_her2.tile.pipeline as tp

    config = TileConfig(workers=2, chunk_tiles=16, codec="jpeg")
    clean = open_store(tile_slide(graded_slide, tmp_path / "clean", config=config).store)
    real = tp._process_unit
    lock, calls = threading.Lock(), {"n": 0}

    def dying(unit):
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n > 4:
            time.sleep(0.5)  # let the coordinator record the finished units first
            raise KeyboardInterrupt
        return real(unit)

    monkeypatch.setattr(tp, "_process_unit", dying)
    with pytest.raises(KeyboardInterrupt):
        tile_slide(graded_slide, tmp_path / "resumed", config=config)
    partial = PatchStore.open(tmp_path / "resumed" / "graded.zarr", require_complete=False)
    assert partial.attrs["complete"] is False and 0 < partial.units_done().sum() < partial.n_units
    monkeypatch.setattr(tp, "_process_unit", real)
    resumed = open_store(tile_slide(graded_slide, tmp_path / "resumed", config=config).store)
    for name in ("tiles", "qc_flags", "laplacian_var", "tissue_fraction", "pen_fraction"):
        assert np.array_equal(clean.array(name), resumed.array(name)), name
