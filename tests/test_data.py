"""Dataset discovery, group keys, split protocols and the input pipeline, on tiny datasets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mammo_core.data import datasets
from mammo_core.data.pipeline import load_images, make_tf_dataset
from mammo_core.data.splits import assign_split, group_folds
from mammo_core.errors import DatasetError

from .factories import make_dataset, synthetic_mammogram, write_png


@pytest.mark.parametrize(
    "name, key",
    [("20586934 (17).png", "20586934"), ("20586934.png", "20586934"), ("20586934(3).PNG", "20586934"),
     ("abc_def (2).jpg", "abc_def"), ("22580341 (100).png", "22580341")],
)
def test_group_key_strips_copy_suffix(name, key):
    assert datasets.group_key(name) == key


def test_scan_split_layout(tmp_path):
    root = make_dataset(tmp_path / "ds", sources_per_class=4, copies=6)
    frame = datasets.scan_dataset(root)
    assert len(frame) == 2 * 4 * 6
    assert set(frame["given_split"]) == {"train", "val", "test"}
    assert frame["group"].nunique() == 8
    assert frame.groupby("group")["label"].nunique().max() == 1
    assert (frame["patient"] == frame["group"]).all()


def test_scan_flat_layout_any_case(tmp_path):
    root = make_dataset(tmp_path / "ds", splits=False, class_dirs=("Benign", "MALIGNANT"))
    frame = datasets.scan_dataset(root)
    assert set(frame["given_split"]) == {""}
    assert sorted(frame["label"].unique()) == [0, 1]


def test_missing_class_folder_names_path(tmp_path):
    root = tmp_path / "ds"
    write_png(root / "benign" / "1.png", synthetic_mammogram(1, malignant=False))
    (root / "cats").mkdir()
    with pytest.raises(DatasetError, match="missing class folder.*malignant"):
        datasets.scan_dataset(root)


def test_empty_class_folder_names_path(tmp_path):
    root = tmp_path / "ds"
    write_png(root / "benign" / "1.png", synthetic_mammogram(1, malignant=False))
    (root / "malignant").mkdir()
    with pytest.raises(DatasetError, match=r"malignant: folder holds no image files"):
        datasets.scan_dataset(root)


def test_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        datasets.scan_dataset(tmp_path / "nope")
    (tmp_path / "other").mkdir()
    with pytest.raises(DatasetError, match="expected class folders"):
        datasets.scan_dataset(tmp_path)


def test_unreadable_file_is_named(tmp_path):
    root = make_dataset(tmp_path / "ds", splits=False)
    bad = root / "benign" / "9999 (1).png"
    bad.write_bytes(b"not a png")
    frame = datasets.scan_dataset(root)
    with pytest.raises(DatasetError, match="9999 \\(1\\).png"):
        load_images(frame["path"].tolist())


def test_grouped_split_has_no_shared_groups_and_is_seeded(tmp_path):
    root = make_dataset(tmp_path / "ds", sources_per_class=8, copies=4)
    frame = datasets.scan_dataset(root)
    a = assign_split(frame, protocol="grouped", seed=3)
    b = assign_split(frame, protocol="grouped", seed=3)
    c = assign_split(frame, protocol="grouped", seed=4)
    assert (a["split"] == b["split"]).all()
    assert not (a["split"] == c["split"]).all()
    sides = a.groupby("group")["split"].nunique()
    assert sides.max() == 1
    counts = a.groupby("split")["group"].nunique()
    assert counts.to_dict() == {"train": 8, "val": 4, "test": 4}  # 50/25/25 of 16 groups
    # stratified: both classes on every side
    assert (a.groupby("split")["label"].nunique() == 2).all()


def test_patient_grouping(tmp_path):
    root = make_dataset(tmp_path / "ds", sources_per_class=8, copies=2)
    frame = datasets.scan_dataset(root)
    groups = sorted(frame["group"].unique())
    # two source images per patient
    mapping = pd.DataFrame({"image_id": groups, "patient_id": [f"p{i // 2}" for i in range(len(groups))]})
    mapping.to_csv(tmp_path / "patients.csv", index=False)
    frame = datasets.scan_dataset(root, patient_map=tmp_path / "patients.csv")
    split = assign_split(frame, protocol="grouped", seed=0, group_by="patient")
    assert split.groupby("patient")["split"].nunique().max() == 1


def test_patient_map_must_cover_all_images(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (tmp_path / "p.csv").write_text("image_id,patient_id\n1000,a\n")
    with pytest.raises(DatasetError, match="no patient for"):
        datasets.scan_dataset(root, patient_map=tmp_path / "p.csv")


def test_paper_protocol_needs_split_folders(tmp_path):
    frame = datasets.scan_dataset(make_dataset(tmp_path / "ds", splits=False))
    with pytest.raises(DatasetError, match="train/val/test"):
        assign_split(frame, protocol="paper")


def test_group_folds_balanced(tmp_path):
    frame = datasets.scan_dataset(make_dataset(tmp_path / "ds", sources_per_class=10, copies=2))
    folds = group_folds(frame, n_folds=5, seed=0)
    per_fold = frame.assign(fold=folds).groupby("fold")["group"].nunique()
    assert per_fold.tolist() == [4, 4, 4, 4, 4]


def test_tf_dataset_scales_and_batches():
    images = np.stack([np.full((224, 224), v, np.uint8) for v in (0, 255, 51)])
    ds = make_tf_dataset(images, [0, 1, 0], batch_size=2, channels=3)
    batches = list(ds.as_numpy_iterator())
    x, y = batches[0]
    assert x.shape == (2, 224, 224, 3) and x.dtype == np.float32
    assert x[0].max() == 0.0 and x[1].min() == 1.0
    assert y.tolist() == [0.0, 1.0]
    assert batches[1][0][0, 0, 0, 0] == pytest.approx(0.2)


def test_fingerprint_changes_with_files(tmp_path):
    root = make_dataset(tmp_path / "ds")
    a = datasets.fingerprint(datasets.scan_dataset(root), root)
    write_png(root / "train" / "benign" / "5555.png", synthetic_mammogram(5, malignant=False))
    b = datasets.fingerprint(datasets.scan_dataset(root), root)
    assert a["n_files"] + 1 == b["n_files"] and a["sha256"] != b["sha256"]


def test_portable_paths_replace_the_data_dir(tmp_path, monkeypatch):
    from mammo_core.data.datasets import DATA_DIR_TOKEN, portable_paths

    root = tmp_path / "ds"
    root.mkdir()
    monkeypatch.setenv("MAMMO_DATA_DIR", str(root))
    card = {"dataset": {"path": str(root)}, "config": {"patient_map": str(root / "patients.csv")},
            "other": [str(tmp_path / "elsewhere"), 3]}
    out = portable_paths(card, root)
    assert out["dataset"]["path"] == DATA_DIR_TOKEN
    assert out["config"]["patient_map"] == DATA_DIR_TOKEN + "/patients.csv"
    assert out["other"] == [str(tmp_path / "elsewhere"), 3]
    monkeypatch.delenv("MAMMO_DATA_DIR")
    assert portable_paths(card, root) == card  # not the named folder: left as it is
