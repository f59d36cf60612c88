"""`medseg predict`: native-grid outputs, TTA, ensembles, robustness to bad cases, resume, classification CSV."""

from __future__ import annotations

import csv
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.data.datalist import load_dataset
from medseg.data.discovery import find_cases
from medseg.inference.ensemble import combine
from medseg.inference.native import LoadedModel, flip_sets
from medseg.inference.pipeline import group_models, prepare_case, segment


def _probabilities(models: list[LoadedModel], image: list[str], flips=((),)) -> np.ndarray:
    """Mean probabilities ``(K, *S)`` of ``models`` x ``flips`` on the input's grid."""
    groups = group_models(models)
    return segment(prepare_case({"id": "c", "image": image}, groups), groups, flips, probabilities=True).probabilities


def test_flip_sets_cover_every_combination() -> None:
    assert flip_sets(2) == [(), (0,), (1,), (0, 1)]
    assert len(flip_sets(3)) == 8 and flip_sets(3, [2]) == [(), (2,)]
    with pytest.raises(ValueError, match="not spatial axes"):
        flip_sets(2, [2])


def test_combine_mean_and_vote_on_hand_made_maps() -> None:
    # Class-1 probabilities of three members at three voxels (class 0 = 1 - p).
    p = [np.array([0.9, 0.99, 0.6]), np.array([0.8, 0.45, 0.4]), np.array([0.7, 0.45, 0.6])]
    members = [np.stack([1 - q, q]) for q in p]
    mean, labels = combine(members, "mean")
    assert np.allclose(mean[1], [0.8, 1.89 / 3, 1.6 / 3])
    assert labels.tolist() == [1, 1, 1]
    _, votes = combine(members, "vote")
    assert votes.tolist() == [1, 0, 1]  # voxel 1: two of three members chose class 0 despite the mean
    # A 1-1 tie goes to the class with the higher mean probability: (0.9 + 0.2) / 2 = 0.55 for class 1.
    _, tie = combine([np.stack([1 - q, q]) for q in (np.array([0.9]), np.array([0.2]))], "vote")
    assert tie.tolist() == [1]
    with pytest.raises(ValueError, match="unknown ensemble mode"):
        combine(members, "median")


def test_entropy_agrees_with_scipy() -> None:
    from scipy.stats import entropy as scipy_entropy

    from medseg.inference.outputs import OutputSpec

    p = np.random.default_rng(0).dirichlet([1.0, 2.0, 3.0], size=(5, 4)).transpose(2, 0, 1).astype(np.float32)
    ours = OutputSpec("softmax", ("a", "b", "c")).entropy(torch.from_numpy(p)).numpy()
    assert np.allclose(ours, scipy_entropy(p, axis=0), atol=1e-5)
    q = np.random.default_rng(1).uniform(0.01, 0.99, size=(2, 6)).astype(np.float32)
    binary = sum(scipy_entropy(np.stack([q[c], 1 - q[c]]), axis=0) for c in range(2))
    assert np.allclose(OutputSpec("sigmoid", ("a", "b")).entropy(torch.from_numpy(q)).numpy(), binary, atol=1e-5)


class Threshold(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 10


def test_tta_on_a_flip_equivariant_model_equals_no_tta(seg3d_root: Path) -> None:
    model = LoadedModel(Threshold(), {"network": "t", "spatial_dims": 3, "in_channels": 1, "num_classes": 2,
                                      "roi_size": [16, 16, 8], "preprocessing_spec": {"intensity": "mri"}},
                        "segmentation")
    image = load_dataset(seg3d_root).training[0]["image"]
    plain = _probabilities([model], image)
    assert np.allclose(_probabilities([model], image, flip_sets(3)), plain, atol=1e-5)


def _run(*args: str) -> int:
    return main(["predict", "--device", "cpu", *args])


def test_outputs_land_on_the_input_grid(seg3d_checkpoint: Path, seg3d_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run("--ckpt", str(seg3d_checkpoint), "--input", str(seg3d_root / "dataset.json"),
                "--output", str(out), "--save-probabilities") == 0
    for case in load_dataset(seg3d_root).test:
        source = nib.load(case["image"][0])
        written = nib.load(out / f"{case['id']}.nii.gz")
        assert written.shape == source.shape
        assert np.allclose(written.affine, source.affine)
        assert np.allclose(written.get_qform(), source.affine) and np.allclose(written.get_sform(), source.affine)
        assert np.issubdtype(written.get_data_dtype(), np.integer)
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}
        saved = np.load(out / "probabilities" / f"{case['id']}.npz")
        assert saved["probabilities"].shape == (2, *source.shape) and saved["probabilities"].dtype == np.float16


def test_a_corrupt_case_fails_alone_and_resume_redoes_only_the_rest(
    seg3d_checkpoint: Path, seg3d_root: Path, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "in"
    shutil.copytree(seg3d_root / "imagesTr", folder)
    corrupt = sorted(folder.glob("*.nii.gz"))[2]
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    out = tmp_path / "out"
    assert _run("--ckpt", str(seg3d_checkpoint), "--input", str(folder), "--output", str(out)) == 1
    written = sorted(p.name for p in out.glob("*.nii.gz"))
    assert len(written) == 5 and corrupt.name not in written
    assert corrupt.name in capsys.readouterr().err
    leftovers = [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".medseg-predict.lock"]
    assert not leftovers, "a temporary file or a lock of this run was left behind"

    assert _run("--ckpt", str(seg3d_checkpoint), "--input", str(folder), "--output", str(out)) == 2  # no flag
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    shutil.copy(seg3d_root / "imagesTr" / corrupt.name, corrupt)  # repaired
    assert _run("--ckpt", str(seg3d_checkpoint), "--input", str(folder), "--output", str(out), "--resume") == 0
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    assert set(after) == set(before) | {corrupt.name}
    assert all(after[name] == before[name] for name in before), "--resume rewrote a finished case"


def test_same_names_in_different_folders_do_not_collide(seg3d_root: Path, tmp_path: Path) -> None:
    source = sorted((seg3d_root / "imagesTr").glob("*.nii.gz"))[0]
    for site in ("siteA", "siteB"):
        (tmp_path / site).mkdir()
        shutil.copy(source, tmp_path / site / "scan.nii.gz")
    shutil.copy(source, tmp_path / "siteA_scan.nii.gz")  # the name a naive "<folder>_<name>" id would take
    (tmp_path / ".hidden.nii.gz").write_bytes(b"partial")  # temporary files are never inputs
    ids = [c["id"] for c in find_cases(tmp_path, in_channels=1)]
    assert sorted(ids) == ["siteA__scan", "siteA_scan", "siteB__scan"]
    assert len(set(ids)) == len(ids)


def test_the_output_folder_inside_the_input_is_not_read_back(seg3d_checkpoint: Path, seg3d_root: Path,
                                                             tmp_path: Path) -> None:
    folder = tmp_path / "in"
    shutil.copytree(seg3d_root / "imagesTr", folder)
    out = folder / "preds"
    assert _run("--ckpt", str(seg3d_checkpoint), "--input", str(folder), "--output", str(out)) == 0
    assert len(find_cases(folder, 1, exclude=out)) == 6  # the 6 predictions are not new cases
    with pytest.raises(ValueError, match="the output folder is the input folder"):
        find_cases(folder, 1, exclude=folder)


def test_bad_checkpoints_and_options_stop_before_any_case(seg3d_checkpoint: Path, cls2d_checkpoint: Path,
                                                          seg3d_root: Path, tmp_path: Path, capsys) -> None:
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    data = str(seg3d_root / "dataset.json")
    assert _run("--ckpt", str(garbage), "--input", data, "--output", str(tmp_path / "a")) == 2
    assert "garbage.ckpt" in capsys.readouterr().err
    assert _run("--ckpt", str(seg3d_checkpoint), "--ckpt", str(cls2d_checkpoint), "--input", data,
                "--output", str(tmp_path / "b")) == 2
    assert str(cls2d_checkpoint) in capsys.readouterr().err
    assert _run("--ckpt", str(seg3d_checkpoint), "--input", data, "--output", str(tmp_path / "c"),
                "--tta", "--tta-axes", "3") == 2
    assert "not spatial axes" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in "abc")


def test_ensemble_with_tta_and_uncertainty(seg3d_checkpoint: Path, seg3d_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run("--ckpt", str(seg3d_checkpoint), "--ckpt", str(seg3d_checkpoint), "--input",
                str(seg3d_root / "dataset.json"), "--output", str(out), "--tta", "--tta-axes", "0",
                "--save-uncertainty", "--ensemble", "vote") == 0
    with (out / "uncertainty.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["case"] for r in rows} == {c["id"] for c in load_dataset(seg3d_root).test}
    assert all(r["members"] == "4" for r in rows)  # 2 models x 2 flips
    doubts = [float(r["doubt"]) for r in rows]
    assert doubts == sorted(doubts, reverse=True)
    assert (out / "uncertainty" / f"{rows[0]['case']}_variance.nii.gz").is_file()


def test_classification_csv(cls2d_checkpoint: Path, cls2d_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run("--ckpt", str(cls2d_checkpoint), "--input", str(cls2d_root / "dataset.json"),
                "--output", str(out), "--tta") == 0
    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["case", "prediction", "p_class0", "p_class1"]
    assert len(rows) == len(load_dataset(cls2d_root).training)
    for row in rows:
        p = [float(row["p_class0"]), float(row["p_class1"])]
        assert sum(p) == pytest.approx(1.0, abs=1e-5)
        assert row["prediction"] == ("class0" if p[0] >= p[1] else "class1")


def test_postprocess_spec_is_applied_in_physical_units(
    seg3d_checkpoint: Path, seg3d_root: Path, tmp_path: Path, capsys
) -> None:
    """Every foreground component smaller than a huge volume goes: the written labels must be all background."""
    spec = tmp_path / "post.json"
    spec.write_text('{"steps": [{"op": "remove_small_components", "min_volume_mm3": 1e9}]}')
    out = tmp_path / "out"
    assert _run("--ckpt", str(seg3d_checkpoint), "--input", str(seg3d_root / "dataset.json"),
                "--output", str(out), "--postprocess", str(spec)) == 0
    for path in out.glob("*.nii.gz"):
        assert not np.asarray(nib.load(path).dataobj).any()
    bad = tmp_path / "bad.json"
    bad.write_text('[{"op": "dilate_everything"}]')
    assert _run("--ckpt", str(seg3d_checkpoint), "--input", str(seg3d_root / "dataset.json"),
                "--output", str(tmp_path / "o2"), "--postprocess", str(bad)) == 2
    assert "dilate_everything" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_several_workers_predict_each_case_exactly_once(
    seg3d_checkpoint: Path, seg3d_root: Path, tmp_path: Path, capsys
) -> None:
    """`--devices 2` on CPU: two worker processes, disjoint shards (the same code path as one per GPU)."""
    out = tmp_path / "out"
    assert _run("--ckpt", str(seg3d_checkpoint), "--input", str(seg3d_root / "imagesTr"), "--output", str(out),
                "--devices", "2") == 0
    assert "predicted 6 case(s), skipped 0, failed 0" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(p.name for p in (seg3d_root / "imagesTr").glob("*.nii.gz"))


def test_inputs_the_model_cannot_take_are_refused_with_the_file(seg3d_checkpoint: Path, seg3d_root: Path,
                                                                seg2d_root: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(sorted((seg2d_root / "imagesTr").glob("*.nii.gz"))[0], folder / "flat.nii.gz")  # 2D image
    shutil.copy(sorted((seg3d_root / "imagesTr").glob("*.nii.gz"))[0], folder / "good.nii.gz")
    assert _run("--ckpt", str(seg3d_checkpoint), "--input", str(folder), "--output", str(tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert "flat.nii.gz" in err and "2D image, but the model is 3D" in err
    assert (tmp_path / "o" / "good.nii.gz").is_file()


def test_ensemble_members_with_different_preprocessing_meet_on_the_input_grid(seg3d_root: Path) -> None:
    def member(spacing: list[float] | None) -> LoadedModel:
        return LoadedModel(Threshold(), {"network": "t", "spatial_dims": 3, "in_channels": 1, "num_classes": 2,
                                         "roi_size": [16, 16, 8],
                                         "preprocessing_spec": {"intensity": "mri", "spacing": spacing}},
                           "segmentation")

    image = load_dataset(seg3d_root).training[0]["image"]
    native = _probabilities([member(None)], image)
    coarse = _probabilities([member([2.0, 2.0, 3.0])], image)
    assert native.shape == coarse.shape  # both on the input grid, though one ran on a 2x coarser grid
    both = _probabilities([member(None), member([2.0, 2.0, 3.0])], image)
    assert np.allclose(both, (native + coarse) / 2, atol=1e-5)  # two groups, combined on the input grid
    assert float(np.mean(both.argmax(0) == native.argmax(0))) > 0.95


def test_window_precision_follows_the_checkpoint_on_cuda_and_float32_on_the_cpu() -> None:
    from medseg.inference.members import autocast_for
    from medseg.inference.pipeline import window_dtype

    assert window_dtype("auto", "cuda:0", "16-mixed") == torch.float16
    assert window_dtype("auto", "cuda", "bf16-mixed") == torch.bfloat16
    assert window_dtype("auto", "cuda", "32-true") is None and window_dtype("auto", "cuda", None) is None
    assert window_dtype("auto", "cpu", "16-mixed") is None  # fp16 on the CPU is slow: float32 there
    assert window_dtype("16", "cpu", None) == torch.float16 and window_dtype("32", "cuda", "16-mixed") is None
    with pytest.raises(ValueError, match="precision must be one of"):
        window_dtype("fp8", "cpu", None)
    with warnings.catch_warnings():  # "CUDA is not available": the context is only built here, not entered
        warnings.simplefilter("ignore")
        assert isinstance(autocast_for("cuda:0", torch.float16)(), torch.autocast)
    assert not isinstance(autocast_for("cpu", None)(), torch.autocast)


def test_probabilities_outside_a_foreground_crop_are_background(tmp_path: Path) -> None:
    from medseg.data.io import write_nifti

    image = np.zeros((20, 20, 10), np.float32)
    image[5:15, 5:15, 3:7] = 1.0  # crop_foreground keeps only this box
    path = write_nifti(image, np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "boxed.nii.gz")
    model = LoadedModel(Threshold(), {"network": "t", "spatial_dims": 3, "in_channels": 1, "num_classes": 2,
                                      "roi_size": [16, 16, 8],
                                      "preprocessing_spec": {"crop_foreground": True}}, "segmentation")
    probabilities = _probabilities([model], [str(path)], flip_sets(3))  # TTA: every flip inverts the crop
    assert np.allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)
    assert np.array_equal(probabilities.argmax(0), image.astype(np.int64))


def test_resume_redoes_a_case_whose_side_outputs_are_missing(seg3d_checkpoint: Path, seg3d_root: Path,
                                                             tmp_path: Path, capsys) -> None:
    data, out = str(seg3d_root / "dataset.json"), tmp_path / "out"
    assert _run("--ckpt", str(seg3d_checkpoint), "--input", data, "--output", str(out), "--save-probabilities") == 0
    lost = sorted((out / "probabilities").glob("*.npz"))[0]
    lost.unlink()  # as if the run died between the two writes
    capsys.readouterr()
    assert _run("--ckpt", str(seg3d_checkpoint), "--input", data, "--output", str(out), "--save-probabilities",
                "--resume") == 0
    assert "predicted 1 case(s), skipped 1" in capsys.readouterr().out
    assert lost.is_file()
