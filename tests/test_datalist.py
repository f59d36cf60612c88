"""Tests of dataset descriptions: dataset.json (Decathlon / nnU-Net v2 styles) and CSV -> case dicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from medseg.data.datalist import (
    CLASSIFICATION,
    SEGMENTATION,
    DatasetError,
    case_id,
    find_description,
    load_dataset,
)


def _write(root: Path, meta: Any, name: str = "dataset.json") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    path.write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return path


def _seg_meta(**changes: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": "toy",
        "labels": {"0": "background", "1": "liver", "2": "tumour"},
        "channel_names": {"0": "CT"},
        "training": [
            {"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz", "patient": "p1"},
            {"image": "imagesTr/b.nii.gz", "label": "labelsTr/b.nii.gz", "patient": 7},
            {"image": "imagesTr/c.nii.gz", "label": "labelsTr/c.nii.gz"},
        ],
    }
    meta.update(changes)
    return meta


# --------------------------------------------------------------------------------------------- happy paths


def test_segmentation_index_to_name(tmp_path: Path) -> None:
    _write(tmp_path, _seg_meta())
    spec = load_dataset(tmp_path)
    root = tmp_path.resolve()
    assert spec.source == root / "dataset.json"
    assert spec.root == root
    assert spec.task == SEGMENTATION
    assert spec.labels == {0: "background", 1: "liver", 2: "tumour"}
    assert spec.num_classes == 3
    assert spec.label_names == ["background", "liver", "tumour"]
    assert spec.channel_names == ["CT"] and spec.in_channels == 1
    assert [c["id"] for c in spec.training] == ["a", "b", "c"]
    first = spec.training[0]
    assert first["image"] == [str(root / "imagesTr" / "a.nii.gz")]
    assert first["label"] == str(root / "labelsTr" / "a.nii.gz")
    assert Path(first["image"][0]).is_absolute() and Path(first["label"]).is_absolute()
    # patient ids are strings; no patient -> None
    assert [c["patient"] for c in spec.training] == ["p1", "7", None]
    assert spec.test == []


def test_nnunet_v2_name_to_index_labels_unordered(tmp_path: Path) -> None:
    """nnU-Net v2 writes ``{"background": 0, ...}``; the result is index -> name sorted by index."""
    _write(tmp_path, _seg_meta(labels={"tumour": 2, "background": 0, "liver": "1"}))
    spec = load_dataset(tmp_path)
    assert list(spec.labels.items()) == [(0, "background"), (1, "liver"), (2, "tumour")]
    assert spec.label_names == ["background", "liver", "tumour"]


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("channel_names", {"1": "ADC", "0": "T2"}, ["T2", "ADC"]),  # nnU-Net v2, keys out of order
        ("modality", {"0": "FLAIR", "1": "T1w", "2": "T1gd"}, ["FLAIR", "T1w", "T1gd"]),  # Decathlon
        ("channel_names", ["T1", "T2"], ["T1", "T2"]),
    ],
)
def test_channel_names_and_modality(tmp_path: Path, key: str, value: Any, expected: list[str]) -> None:
    meta = _seg_meta()
    del meta["channel_names"]
    meta[key] = value
    _write(tmp_path, meta)
    spec = load_dataset(tmp_path)
    assert spec.channel_names == expected
    assert spec.in_channels == len(expected)


def test_no_channel_names_means_one_channel(tmp_path: Path) -> None:
    meta = _seg_meta()
    del meta["channel_names"]
    _write(tmp_path, meta)
    assert load_dataset(tmp_path).in_channels == 1


def test_channel_names_take_precedence_over_modality(tmp_path: Path) -> None:
    _write(tmp_path, _seg_meta(channel_names={"0": "T2", "1": "ADC"}, modality={"0": "CT"}))
    assert load_dataset(tmp_path).channel_names == ["T2", "ADC"]


def test_multi_file_image_list(tmp_path: Path) -> None:
    files = ["imagesTr/a_0000.nii.gz", "imagesTr/a_0001.nii.gz"]
    training = [{"image": files, "label": "labelsTr/a.nii.gz"}]
    _write(tmp_path, _seg_meta(channel_names={"0": "T2", "1": "ADC"}, training=training))
    case = load_dataset(tmp_path).training[0]
    root = tmp_path.resolve()
    assert case["image"] == [str(root / f) for f in files]  # order kept: channel 0 first
    assert case["id"] == "a_0000"  # from the first file's name (documented by case_id)


def test_explicit_id_wins_over_file_name(tmp_path: Path) -> None:
    training = [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz", "id": "subject-1"}]
    _write(tmp_path, _seg_meta(training=training))
    assert load_dataset(tmp_path).training[0]["id"] == "subject-1"


def test_test_list_as_strings_and_dicts(tmp_path: Path) -> None:
    test = [
        "imagesTs/x.nii.gz",
        {"image": "imagesTs/y.nii.gz"},
        {"image": "imagesTs/z.nii.gz", "label": "labelsTs/z.nii.gz", "patient": "p9"},
        ["imagesTs/w_0000.nii.gz"],
    ]
    _write(tmp_path, _seg_meta(test=test))
    spec = load_dataset(tmp_path)
    root = tmp_path.resolve()
    assert [c["id"] for c in spec.test] == ["x", "y", "z", "w_0000"]
    assert spec.test[0]["image"] == [str(root / "imagesTs" / "x.nii.gz")]
    assert [c["label"] for c in spec.test] == [None, None, str(root / "labelsTs" / "z.nii.gz"), None]
    assert [c["patient"] for c in spec.test] == [None, None, "p9", None]


def test_null_test_list_is_empty(tmp_path: Path) -> None:
    _write(tmp_path, _seg_meta(test=None))
    assert load_dataset(tmp_path).test == []


def test_description_file_passed_directly_and_paths_relative_to_it(tmp_path: Path) -> None:
    path = _write(tmp_path / "sub", _seg_meta(), name="my_dataset.json")
    spec = load_dataset(path)
    assert spec.source == path.resolve()
    assert spec.training[0]["image"] == [str((tmp_path / "sub" / "imagesTr" / "a.nii.gz").resolve())]


def test_classification_json_int_labels(tmp_path: Path) -> None:
    meta = {
        "task": "cls",
        "labels": {"0": "benign", "1": "malignant"},
        "training": [
            {"image": "imagesTr/a.nii.gz", "label": 1},
            {"image": "imagesTr/b.nii.gz", "label": "0"},  # an index given as a string is accepted
        ],
        "test": [{"image": "imagesTs/c.nii.gz", "label": 1}, "imagesTs/d.nii.gz"],
    }
    _write(tmp_path, meta)
    spec = load_dataset(tmp_path)
    assert spec.task == CLASSIFICATION
    labels = [c["label"] for c in spec.training]
    assert labels == [1, 0] and all(type(v) is int for v in labels)
    assert [c["label"] for c in spec.test] == [1, None]
    assert spec.label_names == ["benign", "malignant"]


def test_csv_classification_with_patients(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "dataset.csv").write_text(
        "image,label,patient\nimgs/u1.png,0,P1\nimgs/u2.png,2,P1\nimgs/u3.jpg,1,P2\n"
    )
    spec = load_dataset(tmp_path)  # the folder: dataset.csv is found
    root = tmp_path.resolve()
    assert spec.source == root / "dataset.csv"
    assert spec.task == CLASSIFICATION
    assert [c["id"] for c in spec.training] == ["u1", "u2", "u3"]
    assert [c["label"] for c in spec.training] == [0, 2, 1]
    assert [c["patient"] for c in spec.training] == ["P1", "P1", "P2"]
    assert spec.training[0]["image"] == [str(root / "imgs" / "u1.png")]
    # classes 0..max label, named by their index
    assert spec.labels == {0: "0", 1: "1", 2: "2"}
    assert spec.in_channels == 1


def test_csv_without_patient_column(tmp_path: Path) -> None:
    path = tmp_path / "list.csv"
    path.write_text("image,label\na.png,1\nb.png,0\n")
    spec = load_dataset(path)
    assert [c["patient"] for c in spec.training] == [None, None]
    assert spec.num_classes == 2


@pytest.mark.parametrize(
    "path, expected",
    [
        ("a/b/case_001_0000.nii.gz", "case_001_0000"),
        ("/x/y/liver_7.nii", "liver_7"),
        ("us/frame.12.PNG", "frame.12"),
        ("scan.jpeg", "scan"),
        ("x/brain.v2.nii.gz", "brain.v2"),  # only the image suffix is stripped
        ("x/volume.mha", "volume"),
    ],
)
def test_case_id_from_file_name(path: str, expected: str) -> None:
    assert case_id(path) == expected


def test_find_description_prefers_json(tmp_path: Path) -> None:
    _write(tmp_path, _seg_meta())
    (tmp_path / "dataset.csv").write_text("image,label\na.png,0\n")
    assert find_description(tmp_path) == tmp_path / "dataset.json"


# ------------------------------------------------------------------------------------------------ errors


def _error(root: Path) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(root)
    return str(info.value)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda m: m.pop("labels"), "labels"),
        (lambda m: m.update(labels={}), "labels"),
        (lambda m: m.update(labels={"0": "background", "2": "tumour"}), "without gaps"),
        (lambda m: m.update(labels={"background": 0, "tumour": 2}), "without gaps"),
        (lambda m: m.update(labels={"1": "a", "2": "b"}), "without gaps"),  # no 0
        (lambda m: m.update(labels={"background": 0, "tumour": "one"}), "integer index"),
        (lambda m: m.pop("training"), "training"),
        (lambda m: m.update(training={"image": "a.nii.gz"}), "training"),
        (lambda m: m["training"][1].pop("label"), "training[1]"),
        (lambda m: m["training"][2].pop("image"), "training[2]"),
        (lambda m: m["training"].append({"image": [], "label": "l.nii.gz"}), "empty image list"),
        (lambda m: m.update(task="detection"), "detection"),
        (lambda m: m.update(channel_names={"T1": "0"}), "channel_names"),
        (lambda m: m["test"].append({"label": "x.nii.gz"}), "test[0]"),
    ],
)
def test_json_errors_name_the_file(tmp_path: Path, change: Any, words: str) -> None:
    meta = _seg_meta(test=[])
    change(meta)
    path = _write(tmp_path, meta)
    message = _error(tmp_path)
    assert str(path.resolve()) in message
    assert words in message


def test_training_case_without_label_names_its_image(tmp_path: Path) -> None:
    meta = _seg_meta()
    del meta["training"][1]["label"]
    _write(tmp_path, meta)
    assert "imagesTr/b.nii.gz" in _error(tmp_path)


@pytest.mark.parametrize("label", ["malignant", 1.5, True, None])
def test_classification_label_must_be_int(tmp_path: Path, label: Any) -> None:
    meta = {
        "task": "classification",
        "labels": {"0": "a", "1": "b"},
        "training": [{"image": "x.nii.gz", "label": label}],
    }
    path = _write(tmp_path, meta)
    message = _error(tmp_path)
    assert str(path.resolve()) in message and "x.nii.gz" in message


def test_duplicate_training_ids(tmp_path: Path) -> None:
    training = [
        {"image": "site1/case.nii.gz", "label": "l1.nii.gz"},
        {"image": "site2/case.nii.gz", "label": "l2.nii.gz"},
    ]
    path = _write(tmp_path, _seg_meta(training=training))
    message = _error(tmp_path)
    assert str(path.resolve()) in message
    assert "'case'" in message and "site1/case.nii.gz" in message and "site2/case.nii.gz" in message


def test_duplicate_test_ids(tmp_path: Path) -> None:
    """Predictions are written as ``<id>.nii.gz``: two test cases with one id would overwrite each other."""
    path = _write(tmp_path, _seg_meta(test=["site1/case.nii.gz", "site2/case.nii.gz"]))
    message = _error(tmp_path)
    assert str(path.resolve()) in message and "'case'" in message and "test" in message


@pytest.mark.parametrize("text", ["{not json", "", '["a", "b"]', "42"])
def test_bad_json(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    assert str(path.resolve()) in _error(tmp_path)


def test_no_description_in_folder(tmp_path: Path) -> None:
    (tmp_path / "imagesTr").mkdir()
    message = _error(tmp_path)
    assert str(tmp_path) in message and "dataset.json" in message


def test_missing_root(tmp_path: Path) -> None:
    assert str(tmp_path / "nowhere") in _error(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "text, words",
    [
        ("image,label\n", "at least one row"),  # header only
        ("path,class\na.png,0\n", "'image' and 'label'"),
        ("image,label\na.png,zero\n", "a.png"),
        ("image,label\na.png,\n", "a.png"),
        ("image,label\nx/a.png,0\ny/a.png,1\n", "'a'"),
    ],
)
def test_csv_errors_name_the_file(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "dataset.csv"
    path.write_text(text)
    message = _error(tmp_path)
    assert str(path.resolve()) in message and words in message


def test_dataset_error_is_a_value_error() -> None:
    assert issubclass(DatasetError, ValueError)
