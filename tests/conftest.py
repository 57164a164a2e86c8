from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep torch/numpy from oversubscribing the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
SLIDES = FIXTURES / "slides"


def one_line_error(capsys, *, exactly_one: bool = False) -> str:
    """The first line a command wrote to stderr, after checking it wrote no traceback (and, with
    ``exactly_one``, nothing else)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err), err
    assert not exactly_one or len(err) == 1, err
    return err[0]


def fixture_slide(name: str) -> Path:
    path = SLIDES / name
    if not path.is_file():
        pytest.skip(f"real fixture {path} not available")
    return path


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="session")
def graded_slide(synthetic_dir) -> Path:
    """Four 1792 px IHC blocks (grades 0..3) on glass; tiles of 224 px align with them."""
    from wsi_her2.synthetic.slides import graded_ihc_spec, write_synthetic_slide

    return write_synthetic_slide(synthetic_dir / "graded.svs", graded_ihc_spec(dust=True))


@pytest.fixture(scope="session")
def demo_slide(synthetic_dir) -> Path:
    from wsi_her2.synthetic.slides import demo_spec, write_synthetic_slide

    return write_synthetic_slide(synthetic_dir / "demo.svs", demo_spec())


@pytest.fixture(scope="session", autouse=True)
def _torch_one_thread_for_the_run():
    """torch on one thread for the whole run, the previous count restored at the end. On the
    2-core CI machine OpenMP workers beside the tile threads and dask workers only spin-wait;
    set here once, not as a side effect of whichever test module happens to be imported first."""
    try:
        import torch
    except ImportError:  # pragma: no cover - the torch-free parts still test
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def torch_one_thread():
    """torch on one thread for the test, the previous count restored after it (the scorer's
    equivalence checks compare numbers that threads may sum in another order)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def ihc_texture_with(monkeypatch):
    """``make(grade, mpp_um, size_px, **constants)``: the synthetic IHC texture
    (:func:`wsi_her2.synthetic.textures.ihc_texture`, 3 cells' seed) with module constants of
    :mod:`wsi_her2.synthetic.textures` overridden, e.g. ``IHC_NUCLEUS_H_OD=0.0``, cut to
    ``size_px`` square. The generator's caches are cleared before and after, so other tests see
    the default texture."""
    import numpy as np

    import wsi_her2.synthetic.textures as tx

    cached = [f for f in vars(tx).values() if hasattr(f, "cache_clear")]

    def make(grade: int, mpp_um: float, size_px: int, **constants: float):
        for name, value in constants.items():
            assert hasattr(tx, name), name
            monkeypatch.setattr(tx, name, value)
        for f in cached:
            f.cache_clear()
        return np.ascontiguousarray(tx.ihc_texture(grade, mpp_um, 3)[:size_px, :size_px])

    yield make
    for f in cached:
        f.cache_clear()
