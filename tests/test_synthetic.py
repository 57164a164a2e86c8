"""Tests of the synthetic Aperio-like slide generator (wsi_her2.synthetic.slides)."""
from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest
from scipy import ndimage

from wsi_her2.synthetic import textures as tx
from wsi_her2.errors import ConfigError
from wsi_her2.synthetic.slides import (
    DEMO_PLANTED_SCORE,
    GRADE_COMPLETENESS,
    GRADE_DAB_OD,
    Region,
    SyntheticSlideSpec,
    _plan,
    bench_spec,
    demo_spec,
    graded_ihc_spec,
    level_downsamples,
    main,
    render_region,
    write_synthetic_slide,
)

openslide = pytest.importorskip("openslide")
tiffslide = pytest.importorskip("tiffslide")

LAPLACIAN_THRESHOLD = 75.0


def small_spec(**overrides) -> SyntheticSlideSpec:
    """4200 x 1536 px slide (3 levels) with every kind of region, edges not block-aligned."""
    regions = (
        Region("ihc", 101, 99, 500, 420, grade=0),
        Region("ihc", 650, 99, 500, 420, grade=1),
        Region("ihc", 1203, 130, 500, 420, grade=2),
        Region("ihc", 101, 620, 500, 420, grade=3),
        Region("he", 650, 620, 500, 420),
        Region("ihc", 1203, 620, 500, 420, grade=2, blur_sigma_px=4.0),
        Region("glass", 300, 300, 60, 60),  # a hole punched into the grade-0 tissue
        Region("pen", 400, 1150, 1400, 300, ink="green"),
    )
    base = SyntheticSlideSpec(4200, 1536, mpp_um=0.5, regions=regions, seed=3)
    return dataclasses.replace(base, **overrides)


def centre_box(region: Region, half_px: int) -> tuple[int, int, int, int]:
    cx, cy = region.x_px + region.w_px // 2, region.y_px + region.h_px // 2
    return cx - half_px, cy - half_px, 2 * half_px, 2 * half_px


def laplacian_variance(rgb: np.ndarray) -> float:
    """OpenCV-style: uint8 grey (0.299 R + 0.587 G + 0.114 B), 3x3 Laplacian, reflect-101."""
    grey = np.rint(rgb[..., :3].astype(np.float64) @ [0.299, 0.587, 0.114])
    kernel = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float64)
    return float(ndimage.convolve(grey, kernel, mode="mirror").var())


@pytest.fixture(scope="module", params=[False, True], ids=["ycbcr420", "rgb"])
def small_slide(request, tmp_path_factory):
    spec = small_spec(jpeg_rgb=request.param)
    path = write_synthetic_slide(tmp_path_factory.mktemp("syn") / "small.svs", spec)
    return spec, path


def test_stain_vectors_match_skimage():
    from skimage.color import rgb_from_hed

    expected = rgb_from_hed / np.linalg.norm(rgb_from_hed, axis=1, keepdims=True)
    np.testing.assert_allclose(tx.RGB_FROM_HED, expected, atol=1e-12)


def test_grade_tables_follow_asco_cap_order():
    assert GRADE_DAB_OD[0] == 0 and GRADE_COMPLETENESS[0] == 0
    assert GRADE_DAB_OD[0] < GRADE_DAB_OD[1] < GRADE_DAB_OD[2] < GRADE_DAB_OD[3]
    assert GRADE_COMPLETENESS[1] < 1 <= GRADE_COMPLETENESS[2] <= GRADE_COMPLETENESS[3]


def test_both_readers_agree(small_slide):
    spec, path = small_slide
    levels = level_downsamples(spec)
    with openslide.OpenSlide(str(path)) as os_slide, tiffslide.TiffSlide(path) as ts_slide:
        expected_dims = tuple((spec.width_px // d, spec.height_px // d) for d in levels)
        assert os_slide.level_count == ts_slide.level_count == len(levels) == 3
        assert tuple(os_slide.level_dimensions) == tuple(ts_slide.level_dimensions) == expected_dims
        assert float(os_slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(ts_slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)
        assert float(ts_slide.properties["tiffslide.mpp-y"]) == pytest.approx(0.5)
        assert os_slide.properties["openslide.objective-power"] == "20"
        for level, (w, h) in enumerate(expected_dims):
            a = np.asarray(os_slide.read_region((0, 0), level, (w, h)).convert("RGB"), np.int16)
            b = np.asarray(ts_slide.read_region((0, 0), level, (w, h), as_array=True), np.int16)[..., :3]
            assert a.shape == b.shape == (h, w, 3)
            assert np.abs(a - b).max() <= 2, f"readers disagree at level {level}"


def test_pixels_match_render_region(small_slide):
    spec, path = small_slide
    with tiffslide.TiffSlide(path) as slide:
        for region in spec.regions:
            x, y, w, h = centre_box(region, 32)
            decoded = slide.read_region((x, y), 0, (w, h), as_array=True)[..., :3].astype(np.int16)
            truth = render_region(spec, x, y, w, h).astype(np.int16)
            err = np.abs(decoded - truth)
            # thin (1 µm) membranes are the finest detail JPEG 4:2:0 has to keep
            assert err.mean() < 6, f"{region.kind} centre differs by {err.mean():.2f} on average"
            assert np.abs((decoded - truth).mean(axis=(0, 1))).max() < 2  # no colour bias
        # a reduced level: level 1 pixels are block means of level 0
        x1, y1 = 120, 40
        decoded = slide.read_region((x1 * 4, y1 * 4), 1, (100, 80), as_array=True)[..., :3]
        truth = render_region(spec, x1, y1, 100, 80, downsample=4)
        diff = decoded.astype(np.int16) - truth
        assert np.abs(diff).mean() < 7  # reduced levels are all fine detail: JPEG loses more
        assert np.abs(diff.mean(axis=(0, 1))).max() < 2


def test_no_mpp_variant_has_no_mpp_in_either_reader(tmp_path):
    spec = small_spec(write_mpp=False, pyramid_downsamples=(1,), regions=(), dust=False)
    path = write_synthetic_slide(tmp_path / "nompp.svs", spec)
    with openslide.OpenSlide(str(path)) as os_slide:
        assert "openslide.mpp-x" not in os_slide.properties
        assert "aperio.MPP" not in os_slide.properties
        assert os_slide.properties["openslide.vendor"] == "aperio"
    with tiffslide.TiffSlide(path) as ts_slide:
        assert ts_slide.properties.get("tiffslide.mpp-x") is None
        assert ts_slide.properties.get("tiffslide.mpp-y") is None
        assert "MPP" not in ts_slide.properties["tiff.ImageDescription"]


def test_same_spec_gives_identical_bytes(tmp_path):
    spec = small_spec(width_px=1024, height_px=768, pyramid_downsamples=(1, 4))
    a = write_synthetic_slide(tmp_path / "a.svs", spec).read_bytes()
    b = write_synthetic_slide(tmp_path / "b.svs", spec).read_bytes()
    assert a == b
    other = write_synthetic_slide(tmp_path / "c.svs", dataclasses.replace(spec, seed=4)).read_bytes()
    assert other != a


@pytest.mark.parametrize("downsample", [1, 4, 16, 3])
def test_render_is_consistent_across_tile_borders(downsample):
    spec = small_spec()
    speck = _plan(spec).specks[0]
    # a window over region edges, the glass hole, the pen stroke and a dust speck
    x0, y0 = 0, 0
    w = spec.width_px // downsample
    h = spec.height_px // downsample
    whole = render_region(spec, x0, y0, w, h, downsample=downsample)
    cuts_x = sorted({0, w, *(np.random.default_rng(downsample).integers(1, w, 5))})
    cuts_y = sorted({0, h, *(np.random.default_rng(downsample + 1).integers(1, h, 4))})
    stitched = np.zeros_like(whole)
    for ya, yb in zip(cuts_y, cuts_y[1:]):
        for xa, xb in zip(cuts_x, cuts_x[1:]):
            stitched[ya:yb, xa:xb] = render_region(spec, x0 + xa, y0 + ya, xb - xa, yb - ya,
                                                   downsample=downsample)
    np.testing.assert_array_equal(stitched, whole)
    if downsample > 1:
        # the fast path from pre-downsampled textures equals the definition (block means)
        level0 = render_region(spec, 0, 0, w * downsample, h * downsample)
        np.testing.assert_array_equal(whole, tx.block_mean(level0, downsample))
    sx, sy = int(speck.cx) // downsample, int(speck.cy) // downsample
    assert whole[sy, sx].mean() < render_region(spec, sx, sy - 40, 1, 1, downsample=downsample).mean() - 5


def test_blurred_tiles_have_low_laplacian_variance(small_slide):
    spec, path = small_slide
    sharp, blurred = [], []
    with tiffslide.TiffSlide(path) as slide:
        for region in spec.tissue_regions:
            x, y, w, h = centre_box(region, 112)  # a 224 px tile at 0.5 µm/px
            tile = slide.read_region((x, y), 0, (w, h), as_array=True)
            (blurred if region.blur_sigma_px > 0 else sharp).append(laplacian_variance(tile))
    assert len(sharp) == 5 and len(blurred) == 1
    assert min(sharp) > 2 * LAPLACIAN_THRESHOLD, sharp
    assert max(blurred) < LAPLACIAN_THRESHOLD / 2, blurred


def test_mean_dab_increases_with_grade_and_grade0_is_pale():
    from skimage.color import rgb2hed

    spec = graded_ihc_spec(block_px=448, dust=False)
    dab, grey = {}, {}
    for region in spec.regions:
        rgb = render_region(spec, region.x_px, region.y_px, region.w_px, region.h_px)
        dab[region.grade] = float(rgb2hed(rgb)[..., 2].mean())
        grey[region.grade] = float(rgb.mean())
    glass = render_region(spec, 0, 0, 448, 448)
    assert dab[0] < dab[1] < dab[2] < dab[3]
    assert dab[3] - dab[2] > dab[1] - dab[0]
    assert grey[0] > 190  # pale: hard for tissue detection, yet darker than glass
    assert grey[0] < float(glass.mean()) - 10
    assert grey[3] < 160  # saturated brown
    r, g, b = render_region(spec, *centre_box(spec.regions[3], 100)).reshape(-1, 3).mean(axis=0)
    assert r > g > b  # brown, not grey or blue


def test_pen_is_saturated_ink_and_dust_is_small_and_on_glass():
    spec = small_spec()
    plan = _plan(spec)
    pen = plan.pens[0]
    xs = np.arange(pen.x0, pen.x1, 97)
    k = 2 * np.pi / pen.wavelength
    ys = pen.centre + pen.amplitude * np.sin(k * (xs + 0.5 - pen.x0) + pen.phase)
    ink = np.array([render_region(spec, int(x), int(y), 1, 1)[0, 0] for x, y in zip(xs, ys)], np.int16)
    assert np.all(ink[:, 1] - ink[:, 0] > 40) and np.all(ink[:, 1] - ink[:, 2] > 30)  # green
    assert plan.specks
    for speck in plan.specks:
        assert 2 * max(speck.rx, speck.ry) * spec.mpp_um < 15
        assert not any(r.contains(speck.cx, speck.cy) for r in spec.regions)
    glass = render_region(spec, 0, 0, 64, 64)
    assert 235 <= glass.mean() <= 245 and glass.std() < 4


def test_writing_memory_stays_bounded(tmp_path):
    spec = SyntheticSlideSpec(
        12000, 9000, mpp_um=0.5, seed=11,  # a fresh seed: textures are built inside the window
        regions=(Region("ihc", 1000, 1000, 6000, 5000, grade=2),
                 Region("he", 7500, 1000, 3000, 7000),
                 Region("pen", 2000, 6500, 6000, 800)),
    )
    full_image_bytes = spec.width_px * spec.height_px * 3
    tracemalloc.start()
    try:
        write_synthetic_slide(tmp_path / "big.svs", spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # ~95 MB, almost all of it the cached periodic textures: constant whatever the slide size
    assert peak < full_image_bytes / 3, f"peak {peak / 1e6:.0f} MB"
    with tiffslide.TiffSlide(tmp_path / "big.svs") as slide:
        assert slide.dimensions == (12000, 9000)


def test_demo_spec_plants_a_2plus_call():
    spec = demo_spec()
    assert (spec.width_px, spec.height_px, spec.mpp_um) == (6000, 4000, 0.5)
    sharp = [r for r in spec.tissue_regions if r.blur_sigma_px == 0]
    area = {g: sum(r.area_px for r in sharp if r.grade == g) for g in range(4)}
    total = sum(area.values())
    assert area[3] == 0 and not any(r.grade == 3 for r in spec.tissue_regions)
    assert 0.45 < area[2] / total < 0.65 and 0.2 < area[1] / total < 0.33 and area[0] > 0
    assert max(area, key=area.get) == DEMO_PLANTED_SCORE == 2
    assert any(r.blur_sigma_px > 0 for r in spec.tissue_regions)
    assert any(r.kind == "pen" for r in spec.regions)
    for r in spec.tissue_regions:  # glass margins all round
        assert r.x_px > 0 and r.y_px > 0
        assert r.x_px + r.w_px < spec.width_px and r.y_px + r.h_px < spec.height_px


def test_graded_and_bench_layouts():
    spec = graded_ihc_spec()
    assert [r.grade for r in spec.regions] == [0, 1, 2, 3]
    for r in spec.regions:
        assert r.w_px == r.h_px == 1792 and r.x_px % 1792 == 0 and r.y_px % 1792 == 0
        assert r.x_px % 224 == 0
    xs = sorted({r.x_px for r in spec.regions})
    assert xs[1] - xs[0] == 2 * 1792  # one block of glass between blocks
    assert spec.width_px % 1792 == 0 and spec.height_px % 1792 == 0

    bench = bench_spec()
    assert (bench.width_px, bench.height_px) == (40000, 30000)
    tissue_mask_area = sum(r.area_px for r in bench.tissue_regions)  # regions do not overlap
    assert 0.55 < tissue_mask_area / (bench.width_px * bench.height_px) < 0.7
    assert {r.grade for r in bench.tissue_regions if r.kind == "ihc"} == {0, 1, 2, 3}
    assert any(r.kind == "he" for r in bench.regions) and any(r.kind == "pen" for r in bench.regions)
    assert level_downsamples(bench) == (1, 4, 16)


def test_level_rule_and_bad_specs():
    assert level_downsamples(SyntheticSlideSpec(1000, 600)) == (1,)  # 250 < 256 px
    assert level_downsamples(SyntheticSlideSpec(1100, 600)) == (1, 4)
    with pytest.raises(ConfigError):
        Region("ihc", 0, 0, 10, 10)  # no grade
    with pytest.raises(ConfigError):
        Region("tumour", 0, 0, 10, 10)
    with pytest.raises(ValueError):  # ConfigError is also a ValueError
        SyntheticSlideSpec(100, 100, pyramid_downsamples=(2, 4))


def test_cli_writes_a_readable_slide_without_mpp(tmp_path):
    out = tmp_path / "bench.svs"
    assert main([str(out), "--preset", "bench", "--width", "1536", "--height", "1024", "--no-mpp"]) == 0
    with tiffslide.TiffSlide(out) as slide:
        assert slide.dimensions == (1536, 1024)
        assert slide.properties.get("tiffslide.mpp-x") is None
