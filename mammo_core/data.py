"""Dataset discovery, source-image and patient groups, split protocols, and the tf.data input pipeline.

A dataset is either a folder of class folders (`benign/`, `malignant/`, any case) or a folder of
split folders (`train/`, `val/`, `test/`) each holding class folders. Every file is one augmented
copy of a source mammogram; `group_key` recovers the source image from the file name, and an
optional patient map (`image_id,patient_id` CSV) groups source images by patient.

Split protocols:
- `paper`: the split folders as given (copies of every source image on every side: leaky).
- `grouped`: everything pooled and re-split 50/25/25 by group, stratified by label, seeded, so
  that no group has images on two sides.
"""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import pandas as pd

from .config import CLASS_NAMES, IMAGE_EXTENSIONS, IMAGE_SIZE
from .errors import DatasetError, ImageReadError
from .imaging import load_image
from .preprocessing import PREPROCESSING_ID, model_input

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

SPLITS: tuple[str, str, str] = ("train", "val", "test")
PROTOCOLS: tuple[str, ...] = ("paper", "grouped")
GROUP_BY: tuple[str, ...] = ("source", "patient")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "test": "test", "testing": "test"}
_COPY_SUFFIX = re.compile(r"\s*\(\d+\)$")


def group_key(file_name: str) -> str:
    """Source-image id of an augmented copy: `20586934 (17).png` and `20586934.png` -> `20586934`."""
    stem = Path(file_name).stem
    return _COPY_SUFFIX.sub("", stem).strip()


def _class_dirs(folder: Path) -> dict[str, Path]:
    """Map class name -> subfolder (case-insensitive); raise naming the folder when one is missing."""
    found = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()}
    missing = [c for c in CLASS_NAMES if c not in found]
    if missing:
        raise DatasetError(
            f"{folder}: missing class folder(s) {', '.join(missing)}; expected "
            f"{' and '.join(CLASS_NAMES)} (any case)."
        )
    return {c: found[c] for c in CLASS_NAMES}


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DatasetError(f"{folder}: folder holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    return files


def load_patient_map(path: str | Path) -> dict[str, str]:
    """Read a CSV with `image_id,patient_id` columns (extra columns ignored) into a dict."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DatasetError(f"{path}: cannot read patient map ({exc}).") from None
    if not {"image_id", "patient_id"} <= set(table.columns):
        raise DatasetError(f"{path}: patient map needs columns image_id,patient_id; found {list(table.columns)}.")
    return dict(zip(table["image_id"].str.strip(), table["patient_id"].str.strip()))


def default_patient_map(root: str | Path) -> Path | None:
    """The dataset's own `patients.csv`, when it has one."""
    candidate = Path(root) / "patients.csv"
    return candidate if candidate.is_file() else None


def patient_map_for(root: str | Path, group_by: str, given: str | None) -> str | None:
    """The patient map a run uses: the one given, else (grouping by patient) the dataset's own."""
    if given is not None or group_by != "patient":
        return given
    found = default_patient_map(root)
    return str(found) if found else None


def scan_dataset(root: str | Path, *, patient_map: str | Path | None = None) -> pd.DataFrame:
    """Index a dataset folder without decoding images.

    Returns a DataFrame with one row per file: `path` (str), `label` (0 benign, 1 malignant),
    `group` (source image id), `patient` (patient id, or the group when no map is given),
    `given_split` (the split folder the file is in, or "" for a flat class-folder layout).

    Raises DatasetError for a missing folder, a missing class folder or an empty folder, and when
    a patient map is given but does not cover every source image.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found.")
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    split_dirs = {_SPLIT_ALIASES[n]: p for n, p in subdirs.items() if n in _SPLIT_ALIASES}
    if split_dirs:
        layout = [(name, split_dirs[name]) for name in SPLITS if name in split_dirs]
    elif any(c in subdirs for c in CLASS_NAMES):
        layout = [("", root)]
    else:
        raise DatasetError(
            f"{root}: expected class folders ({', '.join(CLASS_NAMES)}) or split folders "
            f"({', '.join(SPLITS)}) holding them; found neither."  # never list a folder's contents
        )
    rows = []
    for split, folder in layout:
        for label, class_name in enumerate(CLASS_NAMES):
            for path in _image_files(_class_dirs(folder)[class_name]):
                rows.append((str(path), label, group_key(path.name), split))
    frame = pd.DataFrame(rows, columns=["path", "label", "group", "given_split"])
    if patient_map is not None:
        mapping = load_patient_map(patient_map)
        unmapped = sorted(set(frame["group"]) - set(mapping))
        if unmapped:
            raise DatasetError(
                f"{patient_map}: no patient for {len(unmapped)} source image(s), e.g. {unmapped[:3]}."
            )
        frame["patient"] = frame["group"].map(mapping)
    else:
        frame["patient"] = frame["group"]
    mixed = frame.groupby("group")["label"].nunique()
    if (mixed > 1).any():
        bad = list(mixed[mixed > 1].index[:3])
        raise DatasetError(f"{root}: source image(s) {bad} have copies under both classes.")
    return frame


#: How a card names the dataset folder named by MAMMO_DATA_DIR (cards hold no machine paths).
DATA_DIR_TOKEN = "$MAMMO_DATA_DIR"


def portable_paths(obj: object, root: str | Path | None) -> object:
    """`obj` (a card or results dict) with every string that is `root` or a path under it rewritten as
    `$MAMMO_DATA_DIR/...`, when `root` is the folder MAMMO_DATA_DIR names; otherwise unchanged."""
    from .config import data_dir

    named = data_dir()
    if root is None or named is None or Path(root).resolve() != named.resolve():
        return obj
    prefixes = sorted({str(root), str(Path(root).resolve()), os.environ.get("MAMMO_DATA_DIR", "")} - {""},
                      key=len, reverse=True)

    def fix(value: object) -> object:
        if isinstance(value, str):
            for prefix in prefixes:
                if value == prefix or value.startswith(prefix.rstrip("/") + "/"):
                    return DATA_DIR_TOKEN + value[len(prefix.rstrip("/")):]
            return value
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    return fix(obj)


def fingerprint(frame: pd.DataFrame, root: str | Path) -> dict[str, object]:
    """File count and a sha256 over the sorted relative paths and sizes: identifies a dataset."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(frame["path"]):
        rel = os.path.relpath(path, root)
        digest.update(f"{rel}\t{os.path.getsize(path)}\n".encode())
    return {"n_files": int(len(frame)), "sha256": digest.hexdigest()}


def _group_column(group_by: str) -> str:
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {GROUP_BY}, got {group_by!r}")
    return "group" if group_by == "source" else "patient"


def assign_split(
    frame: pd.DataFrame, *, protocol: str, seed: int = 0, group_by: str = "source"
) -> pd.DataFrame:
    """Return a copy of `frame` with a `split` column ("train", "val" or "test").

    `paper` keeps the split folders; `grouped` splits 50/25/25 by group (source image, or patient
    with `group_by="patient"`), stratified by label, seeded, so no group is on two sides.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    out = frame.copy()
    if protocol == "paper":
        if (out["given_split"] == "").any():
            raise DatasetError("the paper protocol needs train/val/test folders; this dataset has none. Use --protocol grouped.")
        out["split"] = out["given_split"]
        missing = [s for s in SPLITS if not (out["split"] == s).any()]
        if missing:
            raise DatasetError(f"the dataset has no {', '.join(missing)} folder; the paper protocol needs all three.")
        return out
    folds = group_folds(out, n_folds=4, seed=seed, group_by=group_by)
    out["split"] = np.where(folds == 0, "test", np.where(folds == 1, "val", "train"))
    return out


def group_folds(frame: pd.DataFrame, *, n_folds: int, seed: int = 0, group_by: str = "source") -> np.ndarray:
    """Fold index (0..n_folds-1) per row: stratified by label, every group entirely in one fold.

    Groups are dealt per label in a seeded random order, so each fold gets the same share of
    benign and malignant groups (to within one). A patient with both benign and malignant images
    is dealt with the label of the majority of its images.
    """
    column = _group_column(group_by)
    group_label = frame.groupby(column)["label"].agg(lambda s: int(round(s.mean())))
    n_groups = group_label.groupby(group_label).size()
    if (n_groups < n_folds).any():
        raise DatasetError(
            f"need at least {n_folds} {group_by} groups per class to split; have "
            f"{dict(zip((CLASS_NAMES[i] for i in n_groups.index), n_groups.tolist()))}."
        )
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    offset = 0
    for label in sorted(group_label.unique()):
        groups = sorted(group_label.index[group_label == label])
        rng.shuffle(groups)
        for i, g in enumerate(groups):
            fold_of[g] = (i + offset) % n_folds
        # Continue dealing where the previous class stopped, so fold sizes stay balanced overall.
        offset = (offset + len(groups)) % n_folds
    return frame[column].map(fold_of).to_numpy()


def load_images(paths: Sequence[str], *, workers: int | None = None, preprocessing: str = PREPROCESSING_ID) -> np.ndarray:
    """Decode files once into a (N, IMAGE_SIZE, IMAGE_SIZE) uint8 array of model inputs, in parallel threads.

    Every file goes through `preprocessing.model_input` with the named preprocessing, the same function
    the CLI and the app use. Raises DatasetError listing every file that could not be read.
    """
    out = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    errors: list[str] = []

    def work(i_path: tuple[int, str]) -> None:
        i, path = i_path
        try:
            out[i] = model_input(load_image(path).pixels, preprocessing)
        except ImageReadError as exc:
            errors.append(str(exc))

    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) * 2)) as pool:
        list(pool.map(work, enumerate(paths)))
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise DatasetError(f"{len(errors)} unreadable file(s) in the dataset: " + "; ".join(errors[:5]) + more)
    return out


def make_tf_dataset(
    images: np.ndarray,
    labels: Iterable[int] | None = None,
    *,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    channels: int = 1,
    augment: "callable | None" = None,
) -> "tf.data.Dataset":
    """Batches of float32 (B, 224, 224, channels) in [0, 1] (and float32 labels) from decoded uint8 images.

    The images are already decoded in memory (`load_images`), so each epoch only shuffles, batches,
    scales and prefetches. `channels=3` repeats the gray channel (the authors' RGB copies).
    `augment`, if given, maps a float batch to a float batch at train time.
    """
    import tensorflow as tf

    tensors = (images,) if labels is None else (images, np.asarray(labels, dtype=np.float32))
    ds = tf.data.Dataset.from_tensor_slices(tensors)
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

    def scale(x, *rest):
        x = tf.cast(x[..., None], tf.float32) / 255.0
        if channels != 1:
            x = tf.repeat(x, channels, axis=-1)
        if augment is not None:
            x = augment(x)
        return (x, *rest) if rest else x

    return ds.map(scale, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Expand folders (recursively) to the image files inside, in sorted order; keep files as given."""
    out: list[Path] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            out.append(p)
    return out
