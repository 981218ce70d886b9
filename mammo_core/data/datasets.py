"""Dataset discovery: image files under class (and split) folders, their source-image and patient groups.

A dataset is either a folder of class folders (`benign/`, `malignant/`, any case) or a folder of
split folders (`train/`, `val/`, `test/`) each holding class folders. Every file is one augmented
copy of a source mammogram; `group_key` recovers the source image from the file name, and an
optional patient map (`image_id,patient_id` CSV) groups source images by patient. How the files are
split is `data.splits`; how they are decoded for a model is `data.pipeline`.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Iterable

import pandas as pd

from mammo_core.config import CLASS_NAMES, IMAGE_EXTENSIONS
from mammo_core.data.splits import SPLITS
from mammo_core.errors import DatasetError

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
    from mammo_core.config import data_dir

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
