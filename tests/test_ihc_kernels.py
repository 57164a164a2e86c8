"""ihc_dab's two kernels (OpenCV on CPU, torch anywhere) and the previous implementation agree.

Tolerances, stated once (absolute unless marked relative):

- **OpenCV vs torch kernel** (the same definitions; differences are float summation order,
  and 8-bit reading of non-8-bit input): identical calls; ``KERNEL_TOL``; under both tumour
  models (the epithelium detector's weights also in ``tests/test_epithelium.py``).
- **Now vs before** (``tests/_ihc_reference.py``, the implementation frozen before cell-scale
  evidence moved to a ~1 µm grid and rays were read at seeds only): ``REFERENCE_TOL`` on what
  that implementation still defines: the tissue statistics (``UNCHANGED``). At 1 µm/px (the real
  dev tiles) the grid is the tile itself and they match to float precision. The membrane reading
  was replaced since (light loss over the cell's cytoplasm, blur-corrected:
  ``wsi_her2.stain.membrane``) and is held instead to membranes of known OD
  (``tests/test_membrane_intensity.py``); nuclei were redefined since (blobs of the counterstain
  OD, orthogonal to DAB, against thresholds relative to the tile's counterstain level: the old
  hematoxylin + neutral sum read DAB membranes of off-hue brown as nuclei, e.g. 93 "nuclei" in a
  224 px synthetic 3+ tile of 64 cells, 385 in a real 3+ tile where 153 are found now) and are
  held to nuclei counted by eye (``tests/test_pale_nuclei.py``); tumour weights to the drawn
  annotations (``tests/test_epithelium.py``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_her2.errors import ConfigError
from wsi_her2.models.ihc_score import MEASUREMENT_NAMES, TUMOUR_MODELS, IhcDabScorer, IhcThresholds
from wsi_her2.synthetic.slides import graded_ihc_spec, render_region
from wsi_her2.synthetic.cores import jpeg_roundtrip

import _ihc_reference as reference  # tests/ is on sys.path (pytest prepends the test file's folder)

IHC_DEV = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ihc_dev"
needs_dev = pytest.mark.skipif(not IHC_DEV.is_dir(), reason="../shared/fixtures/ihc_dev not present")

COUNTS = ("cell_count", "tumour_cell_count")
#: name -> (absolute, relative) tolerance; a difference passes when <= abs + rel * |reference|.
KERNEL_TOL = {name: (1e-3, 1e-3) for name in MEASUREMENT_NAMES} | {
    "cell_count": (1.0, 0.0), "cell_density_per_mm2": (1.0 / 0.0125, 0.0), "tumour_cell_count": (1.0, 0.0),
    "frac_cells_1plus_or_more": (0.02, 0.0), "frac_cells_2plus_or_more": (0.02, 0.0), "frac_cells_3plus": (0.02, 0.0),
    "her2_index": (0.05, 0.0), "completeness": (0.02, 0.0), "dab_od_membrane": (0.01, 0.0),
    "tumour_area_mm2": (2e-4, 0.02), "reliability": (0.01, 0.0),
}
REFERENCE_TOL = {
    "tissue_fraction": (0.002, 0.0), "hematoxylin_od_mean": (0.002, 0.0), "neutral_od_mean": (0.002, 0.0),
    "dab_od_mean": (0.005, 0.0), "stained_fraction": (0.01, 0.0),
    "cell_count": (3.0, 0.10), "cell_density_per_mm2": (3.0 / 0.0125, 0.10), "tumour_cell_count": (3.0, 0.12),
    "tumour_area_mm2": (5e-4, 0.10), "dab_od_membrane": (0.03, 0.0), "completeness": (0.04, 0.0),
    "frac_cells_1plus_or_more": (0.05, 0.0), "frac_cells_2plus_or_more": (0.05, 0.0), "frac_cells_3plus": (0.05, 0.0),
    "her2_index": (0.10, 0.0), "reliability": (0.05, 0.0),
}


#: What the frozen implementation still defines (its nuclei, tumour weights, membrane reading and calls were replaced).
UNCHANGED = ("tissue_fraction", "hematoxylin_od_mean", "neutral_od_mean", "dab_od_mean", "stained_fraction")


@pytest.fixture(autouse=True)
def _one_thread(torch_one_thread):
    """Every test here runs torch on one thread (the conftest fixture restores the caller's count)."""


def _reference(mpp_um: float):
    """The previous implementation with today's cut-points (those may still be tuned; its method may not)."""
    known = {f.name for f in dataclasses.fields(reference.IhcThresholds)}
    today = {k: v for k, v in dataclasses.asdict(IhcThresholds()).items() if k in known}
    return reference.IhcDabScorer(mpp_um=mpp_um, thresholds=reference.IhcThresholds(**today))


def _float(tiles_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(tiles_u8)).permute(0, 3, 1, 2).float() / 255.0


def _dev_tiles(per_image: int = 2) -> np.ndarray:
    import cv2

    out = []
    for path in sorted(IHC_DEV.glob("*.jpg")):
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        for k in range(per_image):
            y = x = 224 * (1 + 2 * k)
            out.append(rgb[y: y + 224, x: x + 224])
    return np.stack(out)


def _graded_tiles(per_grade: int = 4, quality: int = 85) -> np.ndarray:
    spec = graded_ihc_spec()
    tiles = [
        jpeg_roundtrip(render_region(spec, r.x_px + 224 * i, r.y_px + 448, 224, 224), quality)
        for r in spec.regions for i in range(per_grade)
    ]
    return np.stack(tiles)


def _assert_close(got: dict, want: dict, tol: dict, *, min_same_calls: float | None, what: str) -> None:
    if min_same_calls is not None:
        same = (got["probs"].argmax(1) == want["probs"].argmax(1)).float().mean().item()
        assert same >= min_same_calls, f"{what}: only {same:.1%} of tile calls agree"
    for name, (abs_tol, rel_tol) in tol.items():
        diff = (got[name] - want[name]).abs()
        bound = abs_tol + rel_tol * want[name].abs()
        worst = int((diff - bound).argmax())
        assert bool((diff <= bound).all()), (
            f"{what}: {name} differs by {diff[worst].item():.4g} at tile {worst} "
            f"({got[name][worst].item():.4g} vs {want[name][worst].item():.4g})"
        )


@pytest.fixture(scope="module")
def graded() -> np.ndarray:
    return _graded_tiles()


@pytest.fixture(scope="module")
def dev() -> np.ndarray:
    if not IHC_DEV.is_dir():
        pytest.skip("../shared/fixtures/ihc_dev not present")
    return _dev_tiles()


@pytest.mark.parametrize("tumour_model", TUMOUR_MODELS)
@pytest.mark.parametrize("which, mpp", [("graded", 0.5), ("dev", 1.0)])
def test_opencv_and_torch_kernels_agree(which, mpp, tumour_model, request):
    tiles = request.getfixturevalue(which)
    x = _float(tiles)
    fast = IhcDabScorer(mpp_um=mpp, kernel="opencv", tumour_model=tumour_model).measure(x)
    slow = IhcDabScorer(mpp_um=mpp, kernel="torch", tumour_model=tumour_model).measure(x)
    _assert_close(fast, slow, KERNEL_TOL, min_same_calls=1.0, what=f"{which} {tumour_model} opencv vs torch")


@pytest.mark.parametrize("which, mpp", [("graded", 0.5), ("dev", 1.0)])
def test_calls_and_measurements_match_the_previous_implementation(which, mpp, request):
    tiles = request.getfixturevalue(which)
    x = _float(tiles)
    now = IhcDabScorer(mpp_um=mpp).measure(x)
    before = _reference(mpp).measure(x)
    _assert_close(now, before, {k: REFERENCE_TOL[k] for k in UNCHANGED}, min_same_calls=None, what=f"{which} now vs before")
    if mpp == 1.0:  # the cell grid is the tile grid: the same numbers up to float rounding
        _assert_close(now, before, {k: KERNEL_TOL[k] for k in UNCHANGED}, min_same_calls=None,
                      what=f"{which} now vs before at 1 µm/px")


@pytest.mark.slow
@needs_dev
def test_every_dev_and_graded_tile_matches_the_previous_implementation():
    """All 320 dev tiles (16 per 1024 px patch) and 8 tiles per grade of the synthetic slide."""
    import cv2

    dev_tiles = []
    for path in sorted(IHC_DEV.glob("*.jpg")):
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        dev_tiles += [rgb[y: y + 224, x: x + 224] for y in range(0, 800, 224) for x in range(0, 800, 224)]
    for tiles, mpp in ((np.stack(dev_tiles), 1.0), (_graded_tiles(per_grade=8), 0.5)):
        x = _float(tiles)
        now = IhcDabScorer(mpp_um=mpp).measure(x)
        before = _reference(mpp).measure(x)
        _assert_close(now, before, {k: REFERENCE_TOL[k] for k in UNCHANGED}, min_same_calls=None, what=f"{mpp} µm/px, all tiles")
        _assert_close(IhcDabScorer(mpp_um=mpp, kernel="torch").measure(x), now, KERNEL_TOL, min_same_calls=1.0,
                      what=f"{mpp} µm/px torch vs opencv")


def test_uint8_entry_gives_the_same_numbers_as_float_input(graded):
    scorer = IhcDabScorer(mpp_um=0.5)
    u8 = torch.from_numpy(graded[:6])
    via_u8 = scorer.measure_u8(u8)
    via_float = scorer.measure(u8.permute(0, 3, 1, 2).float() / 255.0)  # channels-last memory, as the loader's
    via_planar = scorer.measure(u8.permute(0, 3, 1, 2).contiguous().float() / 255.0)
    for name in (*MEASUREMENT_NAMES, "probs"):
        assert torch.equal(via_u8[name], via_float[name]), name
        assert torch.equal(via_planar[name], via_float[name]), name


def test_non_8bit_input_and_odd_tile_sizes_stay_within_kernel_tolerance(graded):
    """Float input between grey levels (read at 8 bits by OpenCV) and a 225 px tile (a 2 x 2 grid leaves a row)."""
    rng = np.random.default_rng(0)
    x = (_float(graded[::4]) + torch.from_numpy(rng.uniform(-0.4, 0.4, (4, 3, 224, 224)).astype(np.float32)) / 255).clamp(0, 1)
    x = torch.nn.functional.pad(x, (0, 1, 0, 1), mode="replicate")
    fast = IhcDabScorer(mpp_um=0.5, kernel="opencv").measure(x)
    slow = IhcDabScorer(mpp_um=0.5, kernel="torch").measure(x)
    _assert_close(fast, slow, KERNEL_TOL, min_same_calls=1.0, what="float 225 px")


def test_opencv_kernel_changes_no_process_wide_thread_setting(graded):
    before = torch.get_num_threads()
    IhcDabScorer(mpp_um=0.5, threads=2).measure_u8(torch.from_numpy(graded[:8]))
    assert torch.get_num_threads() == before


def test_kernel_choice_and_inputs_are_checked():
    with pytest.raises(ConfigError, match="kernel"):
        IhcDabScorer(kernel="numba")
    with pytest.raises(ConfigError, match="uint8"):
        IhcDabScorer().measure_u8(torch.zeros(1, 3, 8, 8))
    empty = IhcDabScorer(kernel="opencv").measure(torch.zeros(0, 3, 32, 32))
    assert empty["probs"].shape == (0, 4)
    grad_input = torch.rand(1, 3, 64, 64, requires_grad=True)
    assert not IhcDabScorer(kernel="opencv").use_opencv(grad_input)  # gradients need the torch kernel


def test_default_tile_threads_follow_the_cpus_this_process_may_use(monkeypatch):
    """Under ``taskset -c 0`` (or a batch scheduler's CPU set) the kernel runs one share, not os.cpu_count()."""
    import os

    from wsi_her2.models import ihc_score_cpu

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert ihc_score_cpu.tile_threads(64, None) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert ihc_score_cpu.tile_threads(64, None) == 3
    assert ihc_score_cpu.tile_threads(64, 2) == 2 and ihc_score_cpu.tile_threads(6, None) == 1  # >= 4 tiles a thread


def test_two_kernel_threads_give_the_one_thread_numbers(graded):
    """Shares of a batch on helper threads (buffers reused across calls) change no number."""
    u8 = torch.from_numpy(graded)
    one = IhcDabScorer(mpp_um=0.5, threads=1)
    two = IhcDabScorer(mpp_um=0.5, threads=2)
    first = one.measure_u8(u8)
    for _ in range(2):  # the second call reuses the first one's buffers
        again = two.measure_u8(u8)
        for name in (*MEASUREMENT_NAMES, "probs"):
            assert torch.equal(again[name], first[name]), name


def test_blas_pieces_give_the_whole_products():
    """The kernel's products in single-threaded BLAS pieces equal the one-call products."""
    from wsi_her2.models import ihc_cpu_kernel as k
    from wsi_her2.models.ihc_score_cpu import _UNMIX

    rng = np.random.default_rng(1)
    od = rng.random((3, 224 * 225), dtype=np.float32)  # not a multiple of the piece size
    assert np.array_equal(k._unmix(_UNMIX, od, np.empty((_UNMIX.shape[0], od.shape[1]), np.float32)), _UNMIX @ od)


@pytest.mark.parametrize("chunk_tiles", [1, 3, 8])
def test_stacked_chunks_give_the_per_tile_numbers(graded, monkeypatch, chunk_tiles):
    """Tiles stacked into one image per step (any chunk size, a short last chunk) change no number."""
    from wsi_her2.models import ihc_cpu_kernel as k

    u8 = torch.from_numpy(graded[:7])
    monkeypatch.setattr(k, "_CHUNK_TILES", 1)
    per_tile = IhcDabScorer(mpp_um=0.5).measure_u8(u8)
    monkeypatch.setattr(k, "_CHUNK_TILES", chunk_tiles)
    stacked = IhcDabScorer(mpp_um=0.5).measure_u8(u8)
    for name in (*MEASUREMENT_NAMES, "probs"):
        assert torch.equal(stacked[name], per_tile[name]), name


def test_neighbour_counts_and_tumour_area_equal_the_filters_they_replace():
    """Integral-image window counts = a zero-bordered box filter; the stacked dilation = one per tile."""
    import cv2

    from wsi_her2.models import ihc_cpu_kernel as k
    from wsi_her2.models.ihc_score_cpu import kernel_plan

    rng = np.random.default_rng(2)
    seeds = rng.random((3, 112, 112)) > 0.985
    idx = np.flatnonzero(seeds)
    counts = k._window_counts(seeds, idx, [20, 5], k._Workspace())
    for j, size in enumerate((41, 11)):
        box = np.stack([cv2.boxFilter(m.view(np.uint8), cv2.CV_32F, (size, size), normalize=False,
                                      borderType=cv2.BORDER_CONSTANT) for m in seeds])
        assert np.array_equal(counts[:, j], box.ravel()[idx])
    plan = kernel_plan(IhcDabScorer(mpp_um=0.5), 224, 224)
    area = k.area_fractions(idx, 3, plan)
    per_tile = [cv2.countNonZero(cv2.dilate(m.view(np.uint8), plan.area_window, borderType=cv2.BORDER_CONSTANT,
                                            borderValue=0)) / m.size for m in seeds]
    assert np.array_equal(area, per_tile)
