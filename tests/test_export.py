"""``medseg export`` and ``medseg predict --model``: the exported folder predicts what the checkpoints predict.

Agreement is checked on the label maps written by ``medseg predict`` itself (``--ckpt`` with options against
``--model`` of an export with the same options), in 2D and 3D, with test-time flips and a two-member ensemble
of different networks; ONNX against torch to 1e-4 in logits under onnxruntime.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.deploy.artifact import load_members, read_spec
from medseg.deploy.export import SPEC_NAME, export_model
from medseg.deploy.networks import OnnxNetwork, example_input
from medseg.inference.native import load_model
from tests.conftest import perturbed_checkpoint


@pytest.fixture(scope="module")
def second_3d(seg3d_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return perturbed_checkpoint(seg3d_checkpoint, tmp_path_factory.mktemp("member") / "second.ckpt")


def _labels(folder: Path) -> dict[str, nib.Nifti1Image]:
    return {p.name: nib.load(p) for p in sorted(folder.glob("*.nii.gz"))}


def _same_predictions(a: Path, b: Path) -> None:
    first, second = _labels(a), _labels(b)
    assert first and first.keys() == second.keys()
    for name, image in first.items():
        np.testing.assert_array_equal(np.asarray(image.dataobj), np.asarray(second[name].dataobj), err_msg=name)
        np.testing.assert_allclose(image.affine, second[name].affine, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_exported_model_predicts_the_checkpoints_label_maps(dims: int, request: pytest.FixtureRequest,
                                                            tmp_path: Path) -> None:
    """TTA and a two-member ensemble of different networks: identical label maps, on each input's grid."""
    checkpoint = request.getfixturevalue(f"seg{dims}d_checkpoint")
    root = request.getfixturevalue(f"seg{dims}d_root")
    second = perturbed_checkpoint(checkpoint, tmp_path / "second.ckpt")
    images = root / ("imagesTs" if dims == 3 else "imagesTr")
    options = ["--tta", "--ensemble", "vote"] if dims == 2 else ["--tta", "--tta-axes", "0", "2"]
    assert main(["export", "--ckpt", str(checkpoint), "--ckpt", str(second), "--out", str(tmp_path / "model"),
                 "--no-bundle", *options]) == 0
    assert main(["predict", "--ckpt", str(checkpoint), "--ckpt", str(second), "--input", str(images),
                 "--output", str(tmp_path / "from_ckpt"), *options]) == 0
    assert main(["predict", "--model", str(tmp_path / "model"), "--input", str(images),
                 "--output", str(tmp_path / "from_model")]) == 0
    _same_predictions(tmp_path / "from_ckpt", tmp_path / "from_model")
    # not two all-background maps: the prediction holds foreground
    assert any(len(np.unique(np.asarray(img.dataobj))) >= 2 for img in _labels(tmp_path / "from_model").values())
    # the two members differ, so the ensemble is not one member twice
    alone = load_model(checkpoint).net, load_model(second).net
    x = example_input(1, load_model(checkpoint).hparams["roi_size"])
    assert (alone[0](x) - alone[1](x)).abs().max() > 1e-3


def test_onnx_agrees_with_torch_and_predicts_the_same_labels(seg3d_checkpoint: Path, seg3d_root: Path,
                                                             tmp_path: Path) -> None:
    out = export_model([seg3d_checkpoint], tmp_path / "model", formats="both", bundle=False)
    spec = read_spec(out)
    member = spec["members"][0]
    assert member["onnx_max_abs_diff"] <= 1e-4
    # checked here again, independently of the export's own check, on inputs it did not see
    reference = load_model(seg3d_checkpoint).net
    onnx = OnnxNetwork(out / member["onnx"])
    for batch in (1, 5):
        x = example_input(1, reference_roi(seg3d_checkpoint), batch=batch, seed=7) * 3
        with torch.no_grad():
            assert (onnx(x) - reference(x)).abs().max().item() <= 1e-4
    images = str(seg3d_root / "imagesTs")
    assert main(["predict", "--model", str(out), "--runtime", "onnx", "--input", images,
                 "--output", str(tmp_path / "onnx")]) == 0
    assert main(["predict", "--model", str(out), "--runtime", "torchscript", "--input", images,
                 "--output", str(tmp_path / "ts")]) == 0
    _same_predictions(tmp_path / "onnx", tmp_path / "ts")


def reference_roi(checkpoint: Path) -> list[int]:
    return list(load_model(checkpoint).hparams["roi_size"])


def test_loading_an_export_unpickles_nothing_and_refuses_changed_files(seg3d_checkpoint: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = export_model([seg3d_checkpoint], tmp_path / "model", bundle=False)

    def no_pickle(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load was called while loading an exported model")

    monkeypatch.setattr(torch, "load", no_pickle)
    members = load_members(out)
    assert len(members) == 1 and isinstance(members[0].net, torch.jit.ScriptModule)
    monkeypatch.undo()

    network = out / "networks" / "member_0.ts"
    network.write_bytes(network.read_bytes()[:-10])  # cut short
    with pytest.raises(ValueError, match=r"member_0\.ts: its checksum differs"):
        load_members(out)
    with pytest.raises(ValueError, match=r"member_0\.ts: its checksum differs"):
        read_spec(out, verify=True)
    network.unlink()
    with pytest.raises(FileNotFoundError, match="member_0.ts: missing"):
        load_members(out)


@pytest.mark.parametrize("edit, reason", [
    (lambda spec: spec["members"][0].update(torchscript="../evil.ts"), "not among its checksummed files"),
    (lambda spec: spec["files"].update({"../evil.ts": "0" * 64}), "not a path inside the model folder"),
    (lambda spec: spec["files"].update({"/etc/passwd": "0" * 64}), "not a path inside the model folder"),
    (lambda spec: spec.pop("files"), "no list of files"),
    (lambda spec: spec.update(format_version="x"), "format_version"),
    (lambda spec: spec.pop("members"), "lists no members"),
])
def test_a_spec_that_points_outside_or_lacks_checksums_is_refused(seg3d_checkpoint: Path, tmp_path: Path,
                                                                  edit, reason: str) -> None:
    """Nothing outside the folder, and nothing unchecked, is ever loaded."""
    out = export_model([seg3d_checkpoint], tmp_path / "model", bundle=False)
    evil = tmp_path / "evil.ts"
    shutil.copy(out / "networks" / "member_0.ts", evil)  # a loadable network beside the folder
    spec = json.loads((out / SPEC_NAME).read_text())
    edit(spec)
    (out / SPEC_NAME).write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=reason) as caught:
        load_members(out)
    assert str(out / SPEC_NAME) in str(caught.value) and "\n" not in str(caught.value)


def test_spec_records_options_versions_and_checksums(seg3d_checkpoint: Path, tmp_path: Path) -> None:
    steps = [{"op": "keep_largest_component"}]
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"temperature": 1.7, "activation": "softmax", "task": "segmentation"}))
    out = export_model([seg3d_checkpoint], tmp_path / "model", tta=True, postprocess=steps,
                       calibration=calibration)
    spec = json.loads((out / SPEC_NAME).read_text())
    assert spec["inference"]["postprocess"][0]["op"] == "keep_largest_component"
    assert spec["inference"]["temperature"] == pytest.approx(1.7)
    assert len(spec["inference"]["flips"]) == 8 and spec["inference"]["tta"] is True
    assert spec["label_names"] == ["background", "structure1"] and spec["versions"]["medseg"]
    bundle = {"configs/inference.json", "configs/metadata.json", "models/model.ts"}  # run in tests/test_bundle.py
    assert set(spec["files"]) == {"networks/member_0.ts", *bundle}
    assert spec["bundle"]["config"] == "configs/inference.json"
    assert all((out / name).is_file() for name in bundle)
    vote = export_model([seg3d_checkpoint], tmp_path / "vote", ensemble="vote")
    assert "vote" in read_spec(vote)["bundle"]["omitted"] and not (vote / "configs").exists()
    assert spec["members"][0]["hparams"]["preprocessing_spec"]["intensity"] == "mri"


def test_model_applies_its_temperature_as_predict_calibration_does(seg3d_checkpoint: Path, seg3d_root: Path,
                                                                   tmp_path: Path) -> None:
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"temperature": 2.5, "activation": "softmax", "task": "segmentation"}))
    images = str(seg3d_root / "imagesTs")
    export_model([seg3d_checkpoint], tmp_path / "model", calibration=calibration, bundle=False)
    runs = {"ckpt": ["--ckpt", str(seg3d_checkpoint), "--calibration", str(calibration)],
            "plain": ["--ckpt", str(seg3d_checkpoint)], "model": ["--model", str(tmp_path / "model")]}
    for name, source in runs.items():
        assert main(["predict", *source, "--save-probabilities", "--input", images,
                     "--output", str(tmp_path / name)]) == 0
    for file in (tmp_path / "ckpt" / "probabilities").glob("*.npz"):
        calibrated, plain, model = (np.load(tmp_path / name / "probabilities" / file.name)["probabilities"]
                                    for name in ("ckpt", "plain", "model"))
        np.testing.assert_array_equal(model, calibrated)
        assert np.abs(plain.astype(np.float32) - calibrated.astype(np.float32)).max() > 0.01  # T = 2.5 shows


def test_model_options_apply_and_cannot_be_overridden(seg3d_checkpoint: Path, seg3d_root: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    steps = json.dumps([{"op": "keep_largest_component"}])
    images = str(seg3d_root / "imagesTs")
    export_model([seg3d_checkpoint], tmp_path / "model", postprocess=steps, bundle=False)
    assert main(["predict", "--ckpt", str(seg3d_checkpoint), "--postprocess", steps, "--input", images,
                 "--output", str(tmp_path / "ckpt")]) == 0
    assert main(["predict", "--model", str(tmp_path / "model"), "--input", images,
                 "--output", str(tmp_path / "model_out")]) == 0
    _same_predictions(tmp_path / "ckpt", tmp_path / "model_out")
    capsys.readouterr()
    assert main(["predict", "--model", str(tmp_path / "model"), "--tta", "--input", images,
                 "--output", str(tmp_path / "x")]) == 2
    assert "carries its own TTA" in capsys.readouterr().err


def test_export_refuses_an_existing_folder_and_mismatched_members(seg3d_checkpoint: Path, seg2d_checkpoint: Path,
                                                                  tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "taken").mkdir()
    assert main(["export", "--ckpt", str(seg3d_checkpoint), "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(seg3d_checkpoint), "--ckpt", str(seg2d_checkpoint),
                 "--out", str(tmp_path / "mixed")]) == 2
    err = capsys.readouterr().err
    assert str(seg2d_checkpoint) in err and "differs" in err
    assert not (tmp_path / "mixed").exists() and not list(tmp_path.glob(".mixed.*"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "important.txt").write_text("keep me")
    assert main(["export", "--ckpt", str(seg3d_checkpoint), "--out", str(tmp_path / "data"), "--overwrite"]) == 2
    assert "not an exported model" in capsys.readouterr().err
    assert (tmp_path / "data" / "important.txt").read_text() == "keep me"
    first = export_model([seg3d_checkpoint], tmp_path / "model", bundle=False)
    again = export_model([seg3d_checkpoint], first, tta=True, bundle=False, overwrite=True)
    assert read_spec(again, verify=True)["inference"]["tta"] and not list(tmp_path.glob(".model.*"))


def test_a_folder_is_not_a_checkpoint_and_onnx_runs_in_float32(seg3d_checkpoint: Path, seg3d_root: Path,
                                                                tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = export_model([seg3d_checkpoint], tmp_path / "model", formats="both", bundle=False)
    images = str(seg3d_root / "imagesTs")
    assert main(["predict", "--ckpt", str(out), "--input", images, "--output", str(tmp_path / "a")]) == 2
    assert f"{out}: an exported model folder, not a checkpoint; predict with --model" in capsys.readouterr().err
    assert main(["predict", "--model", str(out), "--runtime", "onnx", "--precision", "bf16", "--input", images,
                 "--output", str(tmp_path / "b")]) == 2
    assert "onnxruntime runs the ONNX networks in float32" in capsys.readouterr().err
    assert main(["predict", "--model", str(out), "--input", images, "--output", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    # the same output folder refuses the other runtime: their windows are not computed alike
    assert main(["predict", "--model", str(out), "--runtime", "onnx", "--resume", "--input", images,
                 "--output", str(tmp_path / "c")]) == 2
    assert "runtime" in capsys.readouterr().err


def test_python_api_matches_predict_and_measures_volumes(seg3d_checkpoint: Path, seg3d_root: Path,
                                                         tmp_path: Path) -> None:
    import medseg

    out = export_model([seg3d_checkpoint], tmp_path / "model", tta=True, bundle=False)
    images = seg3d_root / "imagesTs"
    assert main(["predict", "--model", str(out), "--input", str(images), "--output", str(tmp_path / "cli")]) == 0
    model = medseg.load(out, device="cpu")
    for file in sorted(images.glob("*.nii.gz")):
        result = model.predict(file)
        written = nib.load(tmp_path / "cli" / file.name)
        np.testing.assert_array_equal(result.labels, np.asarray(written.dataobj))
        np.testing.assert_allclose(result.affine, written.affine, atol=1e-6)
        voxel_ml = float(np.prod(written.header.get_zooms()[:3])) / 1000.0
        sizes = result.summary["structures"]["structure1"]
        assert sizes["voxels"] == int((result.labels == 1).sum())
        assert sizes["volume_ml"] == pytest.approx(sizes["voxels"] * voxel_ml, rel=1e-6)
        assert result.probabilities.shape == (2, *result.labels.shape)
        assert result.summary["members"] == 8 and 0.0 <= result.summary["doubt"] <= np.log(2)
        source = nib.load(file)  # an array with its affine predicts as the file does
        again = model.predict(np.asarray(source.dataobj, dtype=np.float32), source.affine)
        np.testing.assert_array_equal(again.labels, result.labels)
    with pytest.raises(ValueError, match="carries its own TTA"):
        medseg.load(out, tta=True)
    from medseg.errors import InputError

    file = next(images.glob("*.nii.gz"))
    with pytest.raises(InputError, match="a file carries its own affine"):
        model.predict(file, np.eye(4))
    with pytest.raises(InputError, match=r"^array: \d+ of \d+ voxels are NaN"):
        model.predict(np.full((24, 24, 12), np.nan, dtype=np.float32))
    with pytest.raises(InputError, match=r"^affine: expected a finite, invertible \(4, 4\)"):
        model.predict(np.zeros((24, 24, 12), dtype=np.float32), np.eye(3))


def test_python_api_classifies(cls2d_checkpoint: Path, cls2d_root: Path) -> None:
    import medseg

    model = medseg.load(cls2d_checkpoint, device="cpu")
    file = sorted((cls2d_root / "imagesTr").iterdir())[0]
    result = model.predict(file)
    probabilities = result.summary["probabilities"]
    assert result.labels is None and set(probabilities) == set(model.label_names)
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert result.summary["prediction"] == max(probabilities, key=probabilities.get)


def test_an_export_can_be_moved(seg3d_checkpoint: Path, seg3d_root: Path, tmp_path: Path) -> None:
    """Self-contained: after the checkpoint is gone and the folder moved, it still predicts."""
    import medseg

    source = tmp_path / "source.ckpt"
    shutil.copy(seg3d_checkpoint, source)
    out = export_model([source], tmp_path / "model", bundle=False)
    expected = medseg.load(out, device="cpu").predict(next((seg3d_root / "imagesTs").glob("*.nii.gz"))).labels
    source.unlink()
    moved = Path(shutil.move(str(out), str(tmp_path / "elsewhere")))
    again = medseg.load(moved, device="cpu").predict(next((seg3d_root / "imagesTs").glob("*.nii.gz"))).labels
    np.testing.assert_array_equal(expected, again)


def test_exported_classifier_predicts_the_checkpoints_rows(cls2d_checkpoint: Path, cls2d_root: Path,
                                                           tmp_path: Path) -> None:
    """Classification: the same predictions.csv from --model (TorchScript) as from --ckpt, with TTA; ONNX within
    1e-5 in probabilities and the same classes."""
    import csv

    images = str(cls2d_root / "imagesTr")
    assert main(["export", "--ckpt", str(cls2d_checkpoint), "--tta", "--format", "both", "--no-bundle",
                 "--out", str(tmp_path / "model")]) == 0
    runs = {"ckpt": ["--ckpt", str(cls2d_checkpoint), "--tta"], "ts": ["--model", str(tmp_path / "model")],
            "onnx": ["--model", str(tmp_path / "model"), "--runtime", "onnx"]}
    rows = {}
    for name, source in runs.items():
        assert main(["predict", *source, "--input", images, "--output", str(tmp_path / name)]) == 0
        with open(tmp_path / name / "predictions.csv") as handle:
            rows[name] = sorted(csv.DictReader(handle), key=lambda row: row["case"])
    assert len(rows["ckpt"]) == 24
    assert rows["ts"] == rows["ckpt"]
    for onnx, torch_row in zip(rows["onnx"], rows["ckpt"], strict=True):
        assert onnx["prediction"] == torch_row["prediction"]
        assert abs(float(onnx["p_class1"]) - float(torch_row["p_class1"])) < 1e-5
