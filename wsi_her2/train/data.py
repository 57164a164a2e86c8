"""Labelled tile datasets for training and evaluation, and the patient-level group split.

Three layouts are read (:func:`discover_dataset`):

* a folder per class: ``data/0/*.png``, ``data/1+/*.png``, ... (``3``, ``HER2_3+`` and ``3plus``
  are read as ``3+`` too);
* a CSV with a path column, a label column and optionally a group column (patient or slide) and
  a ``split`` column; relative paths are relative to the CSV;
* the BCI file-name convention ``00000_train_1+.png`` (the split in the name is kept).

Tiles of one patient are strongly correlated, so any split that puts one patient on both sides
overstates accuracy; :func:`group_split` splits by group and never does that.
"""
from __future__ import annotations

import csv
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from numpy.typing import NDArray

from wsi_her2.csv_cells import safe_row
from wsi_her2.errors import ConfigError, DatasetError
from wsi_her2.vocab import HER2_CLASSES, parse_her2_label

log = logging.getLogger(__name__)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
BCI_NAME = re.compile(r"^(?P<id>[^_]+)_(?P<split>train|test|val)_(?P<label>[0-3]\+?)$", re.IGNORECASE)


@dataclass(frozen=True)
class TileRecord:
    """One labelled tile on disk."""

    path: Path
    label: str
    group: str
    split: str | None = None  # a split fixed by the dataset itself (BCI names, a CSV column)


@dataclass
class LabelledTiles:
    """Records plus the ordered class names their labels index into."""

    records: list[TileRecord]
    classes: tuple[str, ...]
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def label_index(self) -> NDArray[np.int64]:
        lookup = {c: i for i, c in enumerate(self.classes)}
        return np.array([lookup[r.label] for r in self.records], dtype=np.int64)

    def counts(self) -> dict[str, int]:
        c = Counter(r.label for r in self.records)
        return {k: c.get(k, 0) for k in self.classes}


def normalise_label(raw: str, classes: Sequence[str] | None = None) -> str:
    """A HER2 label in any spelling (:func:`wsi_her2.vocab.parse_her2_label`) as ``0``..``3+``;
    labels of other tasks (e.g. ``benign``) are returned stripped."""
    s = str(raw).strip()
    if classes is not None and s in classes:
        return s
    try:
        return parse_her2_label(s) or s
    except ConfigError:
        return s


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _resolve_classes(labels: set[str], classes: Sequence[str] | None) -> tuple[str, ...]:
    if classes is not None:
        unknown = labels - set(classes)
        if unknown:
            raise DatasetError(
                f"labels {sorted(unknown)} are not among the classes {list(classes)}; "
                "fix the labels or pass the class list"
            )
        return tuple(classes)
    if labels <= set(HER2_CLASSES):
        return HER2_CLASSES  # keep all four grades even if a small set lacks one
    return tuple(sorted(labels))


def discover_dataset(
    source: str | Path,
    *,
    classes: Sequence[str] | None = None,
    path_col: str = "path",
    label_col: str = "label",
    group_col: str | None = None,
) -> LabelledTiles:
    """Find labelled tiles in a class-folder tree, a CSV, or a folder of BCI-named files.

    Parameters
    ----------
    source
        A directory or a ``.csv`` file.
    classes
        Class names in model-output order; default the HER2 grades when all labels are grades,
        else the sorted label names.
    path_col, label_col, group_col
        CSV column names; ``group_col`` (patient or slide id) drives the group split.

    Raises
    ------
    DatasetError
        When the source is missing, empty, or has labels outside ``classes``.
    """
    src = Path(source)
    if not src.exists():
        raise DatasetError(f"dataset {src} does not exist; pass a class-folder tree, a CSV, or BCI-named tiles")
    notes: list[str] = []
    if src.is_file():
        records = _read_csv(src, path_col=path_col, label_col=label_col, group_col=group_col, classes=classes)
        kind = "csv"
        if group_col is None:
            notes.append("no --group-col: each tile is its own group, so tiles of one patient can land in both "
                         "train and test; pass --group-col patient for a patient-level split")
    else:
        subdirs = sorted(d for d in src.iterdir() if d.is_dir())
        records = []
        if subdirs:
            kind = "folders"
            for d in subdirs:
                label = normalise_label(d.name, classes)
                for p in _images_in(d):
                    records.append(TileRecord(p, label, group=str(p.relative_to(src))))
        if not records:
            kind = "bci"
            for p in _images_in(src):
                m = BCI_NAME.match(p.stem)
                if not m:
                    raise DatasetError(
                        f"{p.name} is neither in a class folder nor named like BCI's 00000_train_1+.png; "
                        "arrange tiles as data/<class>/*.png or list them in a CSV"
                    )
                records.append(TileRecord(p, normalise_label(m["label"]), group=m["id"], split=m["split"].lower()))
        notes.append("no patient ids in a folder dataset: tiles are split individually; use a CSV with a patient "
                     "column when tiles of one patient are present")
    if not records:
        raise DatasetError(f"no image tiles ({', '.join(IMAGE_SUFFIXES)}) found in {src}")
    resolved = _resolve_classes({r.label for r in records}, classes)
    ds = LabelledTiles(records, resolved, source=f"{kind}:{src}", notes=notes)
    log.info("dataset %s: %d tiles, counts %s", src, len(records), ds.counts())
    return ds


def _read_csv(
    path: Path, *, path_col: str, label_col: str, group_col: str | None, classes: Sequence[str] | None
) -> list[TileRecord]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        for col in (path_col, label_col) + ((group_col,) if group_col else ()):
            if col not in cols:
                raise DatasetError(f"{path} has no column {col!r} (columns: {cols}); name the columns with "
                                   "--path-col/--label-col/--group-col")
        records = []
        for i, row in enumerate(reader):
            p = Path(row[path_col])
            p = p if p.is_absolute() else (path.parent / p)
            if not p.is_file():
                raise DatasetError(f"{path} row {i + 2}: image {p} does not exist")
            group = row[group_col] if group_col else p.stem
            split = (row.get("split") or "").strip().lower() or None
            records.append(TileRecord(p, normalise_label(row[label_col], classes), group=str(group), split=split))
    return records


# --------------------------------------------------------------------------------------------
# Group split
# --------------------------------------------------------------------------------------------
def group_split(
    records: Sequence[TileRecord],
    *,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    respect_fixed: bool = True,
) -> dict[str, list[TileRecord]]:
    """Split records into train/val/test so that no group (patient) is on two sides.

    Groups are bucketed by their majority label and the buckets are dealt out in turn, which
    keeps the class mix of the three sides close to the whole: shuffled groups go one by one to
    the side furthest below its target share of the tiles dealt so far.

    Parameters
    ----------
    fractions
        Target tile shares of train, val, test (normalised to sum 1; zero allowed).
    respect_fixed
        Keep a split already fixed by the dataset (BCI names, a CSV ``split`` column): ``test``
        stays test, and ``train`` is divided into train and val by the train/val ratio.
    """
    names = ("train", "val", "test")
    frac = np.asarray(fractions, dtype=np.float64)
    if frac.shape != (3,) or (frac < 0).any() or frac.sum() <= 0:
        raise DatasetError(f"split fractions must be three non-negative numbers; got {list(fractions)}")
    frac = frac / frac.sum()
    out: dict[str, list[TileRecord]] = {n: [] for n in names}
    if respect_fixed and any(r.split for r in records):
        fixed_test = [r for r in records if r.split == "test"]
        fixed_val = [r for r in records if r.split == "val"]
        rest = [r for r in records if r.split not in ("test", "val")]
        tv = frac[:2] / max(frac[:2].sum(), 1e-12)
        sub = group_split(rest, fractions=(tv[0], 0.0 if fixed_val else tv[1], 0.0), seed=seed, respect_fixed=False)
        return {"train": sub["train"], "val": fixed_val + sub["val"], "test": fixed_test}

    by_group: dict[str, list[TileRecord]] = defaultdict(list)
    for r in records:
        by_group[r.group].append(r)
    buckets: dict[str, list[str]] = defaultdict(list)
    for g, rs in by_group.items():
        buckets[Counter(r.label for r in rs).most_common(1)[0][0]].append(g)
    rng = np.random.default_rng(seed)
    counts = np.zeros(3)
    for label in sorted(buckets):
        groups = sorted(buckets[label])
        rng.shuffle(groups)
        for g in groups:
            # Running totals across buckets: small buckets still feed val and test in turn
            # instead of each rounding its few groups into train.
            deficit = frac * (counts.sum() + len(by_group[g])) - counts
            deficit[frac == 0] = -np.inf
            k = int(np.argmax(deficit))
            counts[k] += len(by_group[g])
            out[names[k]].extend(by_group[g])
    return out


# --------------------------------------------------------------------------------------------
# Augmentation and datasets
# --------------------------------------------------------------------------------------------
@dataclass
class Augment:
    """Training augmentation of uint8 RGB tiles.

    ``shift_frac`` is the largest translation as a fraction of the tile side (Keras-style
    width/height shift with reflected borders). ``color_jitter`` scales brightness and saturation
    by up to +/- that fraction: keep it 0 for IHC, where brightness of DAB is the label.
    """

    hflip: bool = True
    vflip: bool = True
    rot90: bool = False
    shift_frac: float = 0.0
    color_jitter: float = 0.0

    def __call__(self, img: NDArray[np.uint8], rng: np.random.Generator) -> NDArray[np.uint8]:
        out = img
        if self.hflip and rng.random() < 0.5:
            out = out[:, ::-1]
        if self.vflip and rng.random() < 0.5:
            out = out[::-1]
        if self.rot90:
            out = np.rot90(out, int(rng.integers(4)))
        if self.shift_frac > 0:
            h, w = out.shape[:2]
            dy, dx = (rng.uniform(-self.shift_frac, self.shift_frac, 2) * (h, w)).astype(int)
            if dy or dx:
                pad = ((abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0))
                big = np.pad(out, pad, mode="reflect")
                out = big[abs(dy) - dy: abs(dy) - dy + h, abs(dx) - dx: abs(dx) - dx + w]
        if self.color_jitter > 0:
            f = out.astype(np.float32)
            b, s = 1 + rng.uniform(-self.color_jitter, self.color_jitter, 2)
            grey = f.mean(axis=2, keepdims=True)
            f = (grey + (f - grey) * s) * b
            out = np.clip(f, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(out)


def load_tile(path: str | Path, *, input_px: int | None = None) -> NDArray[np.uint8]:
    """Read an image as uint8 RGB, resized (area-averaging) to ``input_px`` square if given."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if input_px and im.size != (input_px, input_px):
                im = im.resize((input_px, input_px), Image.BILINEAR, reducing_gap=None)
            return np.asarray(im)
    except OSError as exc:
        raise DatasetError(f"cannot read tile {path}: {exc}; remove or replace the file") from exc


def to_tensor(img: NDArray[np.uint8], mean: Sequence[float], std: Sequence[float]):
    """uint8 HWC -> normalised float CHW tensor (the model's input convention)."""
    import torch

    t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (t - m) / s


class TileDataset:
    """A map-style torch dataset over tiles (files or in-memory arrays).

    Items are ``(normalised float tensor (3, input_px, input_px), label index)``. The order of
    operations is the one scoring uses: resize to ``input_px``, stain normalisation (if any),
    then (training only) augmentation, then mean/std normalisation.

    Parameters
    ----------
    items
        Tile paths, or uint8 RGB arrays (H, W, 3).
    labels
        Integer class indices, one per item.
    stain_norm
        A callable uint8 RGB -> uint8 RGB (see :mod:`wsi_her2.stain.normalize`) or None.
    augment
        An :class:`Augment` for training, None for evaluation.
    cache
        Keep decoded, resized, stain-normalised tiles in memory (small datasets; saves decoding
        every epoch).
    """

    def __init__(
        self,
        items: Sequence[str | Path | NDArray],
        labels: Sequence[int],
        *,
        input_px: int,
        mean: Sequence[float],
        std: Sequence[float],
        stain_norm: Callable[[NDArray], NDArray] | None = None,
        augment: Augment | None = None,
        cache: bool = False,
        seed: int = 0,
    ) -> None:
        if len(items) != len(labels):
            raise DatasetError(f"{len(items)} tiles but {len(labels)} labels")
        self.items = list(items)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.input_px = int(input_px)
        self.mean, self.std = tuple(mean), tuple(std)
        self.stain_norm = stain_norm
        self.augment = augment
        self.cache: dict[int, NDArray] | None = {} if cache else None
        self._seed = seed
        self._calls = 0

    @classmethod
    def from_records(cls, records: Sequence[TileRecord], classes: Sequence[str], **kwargs: Any) -> "TileDataset":
        lookup = {c: i for i, c in enumerate(classes)}
        return cls([r.path for r in records], [lookup[r.label] for r in records], **kwargs)

    def __len__(self) -> int:
        return len(self.items)

    def image(self, i: int) -> NDArray[np.uint8]:
        """The tile as the model sees it before augmentation (uint8 RGB, input_px square)."""
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        item = self.items[i]
        if isinstance(item, (str, Path)):
            img = load_tile(item, input_px=self.input_px)
        else:
            img = np.asarray(item)[..., :3]
            if img.shape[:2] != (self.input_px, self.input_px):
                from PIL import Image

                img = np.asarray(Image.fromarray(img).resize((self.input_px, self.input_px), Image.BILINEAR))
        if self.stain_norm is not None:
            img = self.stain_norm(img)
        if self.cache is not None:
            self.cache[i] = img
        return img

    def __getitem__(self, i: int):
        img = self.image(i)
        if self.augment is not None:
            self._calls += 1
            # Seeded per call so runs repeat; differs between worker processes via torch's seed.
            import torch

            rng = np.random.default_rng([self._seed, i, self._calls, torch.initial_seed() % (2**31)])
            img = self.augment(img, rng)
        return to_tensor(img, self.mean, self.std), int(self.labels[i])


def balanced_class_weights(labels: NDArray, n_classes: int) -> NDArray[np.float64]:
    """``n / (k * count_c)`` as scikit-learn's 'balanced'; classes absent from ``labels`` get 0."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def write_split_csv(splits: dict[str, list[TileRecord]], path: str | Path) -> Path:
    """Write ``path,label,group,split`` rows (absolute paths) so a run's test set can be re-read."""
    p = Path(path)
    with p.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group", "split"])
        for name, rs in splits.items():
            for r in rs:
                w.writerow(safe_row([str(Path(r.path).resolve()), r.label, r.group, name]))
    return p


# --------------------------------------------------------------------------------------------
# Synthetic labelled IHC tiles (tests and the end-to-end example)
# --------------------------------------------------------------------------------------------
def synthetic_ihc_tiles(
    n_per_class: int,
    *,
    tile_px: int = 224,
    n_groups: int = 4,
    seed: int = 0,
    grades: Sequence[int] = (0, 1, 2, 3),
) -> tuple[NDArray[np.uint8], NDArray[np.int64], list[str]]:
    """Tiles cut from the graded synthetic IHC slide: the label is the planted grade.

    Each grade's block is divided into ``n_groups`` horizontal strips, one per pseudo-patient
    (group ``"g<grade>-p<strip>"``), so a group split keeps strips apart.

    Returns
    -------
    images (N, tile_px, tile_px, 3) uint8, labels (N,) grade index into ``grades``, groups (N,).
    """
    from wsi_her2.synthetic.slides import graded_ihc_spec, render_region

    block_px = max(1792, 4 * tile_px)
    spec = graded_ihc_spec(block_px=block_px, grades=tuple(grades), dust=False, seed=0)
    rng = np.random.default_rng(seed)
    strip_h = block_px // n_groups
    if strip_h < tile_px:
        raise DatasetError(f"{n_groups} groups of {tile_px} px tiles do not fit a {block_px} px block")
    images, labels, groups = [], [], []
    for k, region in enumerate(spec.tissue_regions):
        for i in range(n_per_class):
            g = i % n_groups
            x = region.x_px + int(rng.integers(0, block_px - tile_px + 1))
            y = region.y_px + g * strip_h + int(rng.integers(0, strip_h - tile_px + 1))
            images.append(render_region(spec, x, y, tile_px, tile_px))
            labels.append(k)
            groups.append(f"g{grades[k]}-p{g}")
    return np.stack(images), np.asarray(labels, dtype=np.int64), groups


def write_synthetic_dataset(
    out_dir: str | Path,
    n_per_class: int,
    *,
    tile_px: int = 224,
    n_groups: int = 4,
    seed: int = 0,
    classes: Sequence[str] = HER2_CLASSES,
) -> Path:
    """Write synthetic IHC tiles as ``<out>/<class>/<group>_<i>.png`` and ``<out>/labels.csv``.

    The CSV (``path,label,patient``) allows a patient-level split with ``--group-col patient``.
    Returns the CSV path.
    """
    from PIL import Image

    out = Path(out_dir)
    images, labels, groups = synthetic_ihc_tiles(n_per_class, tile_px=tile_px, n_groups=n_groups, seed=seed,
                                                 grades=tuple(range(len(classes))))
    rows = []
    for i, (img, lab, grp) in enumerate(zip(images, labels, groups)):
        cls = classes[int(lab)]
        p = out / cls / f"{grp}_{i:05d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(p)
        rows.append((str(p.relative_to(out)), cls, grp))
    csv_path = out / "labels.csv"
    with csv_path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient"])
        w.writerows(safe_row(r) for r in rows)
    return csv_path
