"""Dataset discovery (folders, CSV, BCI names), the group split, and the tile dataset."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from wsi_her2.errors import DatasetError
from wsi_her2.train.data import (
    Augment,
    TileDataset,
    TileRecord,
    balanced_class_weights,
    discover_dataset,
    group_split,
    normalise_label,
)


def _png(path, colour, px=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((px, px, 3), colour, np.uint8)).save(path)
    return path


def test_label_spellings():
    assert [normalise_label(s) for s in ("0", "1", "2+", "3plus", "HER2_3+", "score 1+")] == \
        ["0", "1+", "2+", "3+", "3+", "1+"]
    assert normalise_label("benign") == "benign"


def test_folder_dataset(tmp_path):
    for name, colour in (("0", 10), ("1", 60), ("HER2_2+", 120), ("3+", 200)):
        for i in range(2):
            _png(tmp_path / name / f"t{i}.png", colour)
    ds = discover_dataset(tmp_path)
    assert ds.classes == ("0", "1+", "2+", "3+")
    assert ds.counts() == {"0": 2, "1+": 2, "2+": 2, "3+": 2}
    assert len({r.group for r in ds.records}) == 8  # same file names in different folders stay apart


def test_csv_dataset_with_groups(tmp_path):
    rows = ["path,label,patient"]
    for i in range(6):
        _png(tmp_path / "img" / f"{i}.png", 30 * i)
        rows.append(f"img/{i}.png,{i % 4}{'+' if i % 4 else ''},pt{i // 2}")
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    ds = discover_dataset(tmp_path / "d.csv", group_col="patient")
    assert [r.group for r in ds.records] == ["pt0", "pt0", "pt1", "pt1", "pt2", "pt2"]
    assert ds.records[1].label == "1+"
    with pytest.raises(DatasetError, match="no column 'slide'"):
        discover_dataset(tmp_path / "d.csv", group_col="slide")


def test_bci_names_keep_their_split(tmp_path):
    for i, (split, lab) in enumerate([("train", "0"), ("train", "1+"), ("train", "2+"), ("train", "3+"),
                                      ("test", "2+"), ("test", "3+")]):
        _png(tmp_path / f"{i:05d}_{split}_{lab}.png", 40 * i)
    ds = discover_dataset(tmp_path)
    assert Counter(r.split for r in ds.records) == {"train": 4, "test": 2}
    sp = group_split(ds.records, fractions=(0.75, 0.25, 0.0))
    assert {r.path.name for r in sp["test"]} == {"00004_test_2+.png", "00005_test_3+.png"}
    assert len(sp["train"]) + len(sp["val"]) == 4


def test_bad_inputs(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        discover_dataset(tmp_path / "missing")
    _png(tmp_path / "random_name.png", 5)
    with pytest.raises(DatasetError, match="BCI"):
        discover_dataset(tmp_path)
    with pytest.raises(DatasetError, match="not among the classes"):
        discover_dataset(_folder_with_label(tmp_path / "x", "5+"), classes=("0", "1+"))


def _folder_with_label(root, label):
    _png(root / label / "a.png", 1)
    return root


@pytest.mark.parametrize("seed", range(6))
def test_group_split_never_shares_a_patient(seed):
    rng = np.random.default_rng(seed)
    n_groups = int(rng.integers(5, 40))
    records = []
    for g in range(n_groups):
        label = str(rng.choice(["0", "1+", "2+", "3+"]))
        for i in range(int(rng.integers(1, 12))):
            records.append(TileRecord(f"g{g}_{i}.png", label if rng.random() < 0.8 else "2+", group=f"pt{g}"))
    sp = group_split(records, fractions=(0.7, 0.15, 0.15), seed=seed)
    sides = {name: {r.group for r in rs} for name, rs in sp.items()}
    assert not sides["train"] & sides["val"] and not sides["train"] & sides["test"] and not sides["val"] & sides["test"]
    assert sum(len(v) for v in sp.values()) == len(records)
    share = len(sp["train"]) / len(records)
    assert 0.4 < share < 0.95


def test_group_split_fractions_with_many_groups():
    records = [TileRecord(f"{g}_{i}.png", ["0", "1+", "2+", "3+"][g % 4], group=str(g)) for g in range(200) for i in range(5)]
    sp = group_split(records, fractions=(0.7, 0.15, 0.15), seed=1)
    shares = np.array([len(sp[k]) for k in ("train", "val", "test")]) / len(records)
    np.testing.assert_allclose(shares, [0.7, 0.15, 0.15], atol=0.02)
    for side in sp.values():  # stratified: every class present in every side
        assert set(r.label for r in side) == {"0", "1+", "2+", "3+"}


def test_tile_dataset_resizes_normalises_and_augments():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:16, :16] = 255
    ds = TileDataset([img], [2], input_px=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x, y = ds[0]
    assert tuple(x.shape) == (3, 16, 16) and y == 2
    assert float(x.max()) == pytest.approx(1.0) and float(x.min()) == pytest.approx(-1.0)
    assert float(x[0, 0, 0]) == pytest.approx(1.0)  # top-left stays bright without augmentation
    aug = Augment(hflip=False, vflip=False, rot90=False, shift_frac=0.25)
    out = aug(np.asarray(ds.image(0)), np.random.default_rng(3))
    assert out.shape == (16, 16, 3)
    seen = {TileDataset([img], [0], input_px=16, mean=(0, 0, 0), std=(1, 1, 1), augment=Augment(), seed=s)[0][0][0, 0, 0].item()
            for s in range(12)}
    assert seen == {0.0, 1.0}  # flips move the bright corner away in some draws
    calls = []
    TileDataset([img], [0], input_px=16, mean=(0, 0, 0), std=(1, 1, 1), stain_norm=lambda a: calls.append(a.shape) or a)[0]
    assert calls == [(16, 16, 3)]  # stain normalisation sees the resized tile


def test_balanced_class_weights():
    w = balanced_class_weights(np.array([0, 0, 0, 1]), 3)
    np.testing.assert_allclose(w, [4 / 6, 2.0, 0.0])
