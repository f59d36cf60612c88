"""Enhancement generators in `medseg predict` (the generated image on the input's grid) and `medseg evaluate`
(PSNR/SSIM of the prediction and of the degraded input against the target), on fabricated checkpoints whose
output is known: a residual generator with a zero correction returns its input, one whose last layer only adds a
bias returns the input plus that bias, and a random generator is checked against its network run by hand."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from medseg.cli import main
from medseg.data.io import read_image, write_nifti
from medseg.evaluation.enhancement import ssim, target_range
from medseg.inference.native import load_model
from medseg.models import create_model

ROI = [16, 16]


def _affine(spacing: tuple[float, ...], origin: tuple[float, ...]) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def generator_checkpoint(path: Path, bias: float | None = None, condition: str = "image", dims: int = 2,
                         channels: int = 1, orientation: str | None = "RAS", **preprocessing) -> Path:
    """An enhancement checkpoint as the training side saves it: a residual U-Net generator. ``bias``: every weight
    zero and the last layer's bias ``bias``, so the generator returns its input plus ``bias``; ``None``: seeded
    random weights (not flip-equivariant)."""
    torch.manual_seed(0)
    net = create_model("unet", dims, channels, channels, channels=[4, 8])
    state = net.state_dict()
    if bias is not None:
        state = {k: torch.zeros_like(v) for k, v in state.items()}
        last = [k for k in state if k.endswith("bias")][-1]
        assert state[last].shape == (channels,)  # the output layer's bias
        state[last] = torch.full((channels,), float(bias))
    hparams = {"network": "unet", "network_args": {"channels": [4, 8]}, "spatial_dims": dims, "in_channels": channels,
               "num_classes": 1, "label_names": ["image"], "roi_size": ROI[:dims] + [8] * (dims - 2),
               "sw_batch_size": 2, "overlap": 0.5, "condition": condition, "residual": True, "data_range": 1.0,
               "preprocessing_spec": {"orientation": orientation, "intensity": "none", **preprocessing},
               "network_channels": [channels, channels]}
    torch.save({"state_dict": {f"net.{k}": v for k, v in state.items()}, "hyper_parameters": hparams,
                "medseg_task": "enhancement"}, path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Three 2D NIfTI cases with non-identity affines: ``ras`` (20x27, several windows), ``flipped`` (16x16, its
    first axis runs right to left, so RAS preprocessing reorients it) and ``plain`` (16x16, one window)."""
    folder = tmp_path_factory.mktemp("enh_inputs")
    rng = np.random.default_rng(0)
    cases = {"ras": (rng.random((20, 27)), _affine((0.8, 1.2, 1.0), (5.0, -3.0, 2.0))),
             "flipped": (rng.random((16, 16)), _affine((-0.9, 1.1, 1.0), (10.0, 4.0, 0.0))),
             "plain": (rng.random((16, 16)), _affine((0.7, 0.7, 1.0), (-2.0, 1.0, 0.0)))}
    for name, (image, affine) in cases.items():
        write_nifti(image.astype(np.float32), affine, folder / f"{name}.nii.gz")
    return {"folder": folder, **{k: (v.astype(np.float32), a) for k, (v, a) in cases.items()}}


def _predict(ckpt: Path, inputs: Path, out: Path, *extra: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    assert main(["predict", "--ckpt", str(ckpt), "--input", str(inputs), "--output", str(out), *extra]) == 0
    return {p.name[: -len(".nii.gz")]: read_image(p) for p in sorted(out.glob("*.nii.gz"))}


def test_known_generators_give_known_images_on_the_input_grid(inputs, tmp_path: Path) -> None:
    identity = _predict(generator_checkpoint(tmp_path / "zero.ckpt", bias=0.0), inputs["folder"], tmp_path / "zero")
    plus = _predict(generator_checkpoint(tmp_path / "plus.ckpt", bias=0.5), inputs["folder"], tmp_path / "plus",
                    "--tta")  # flips of a flip-equivariant generator change nothing
    assert sorted(identity) == sorted(plus) == ["flipped", "plain", "ras"]
    for name in identity:
        image, affine = inputs[name]
        for (predicted, predicted_affine), expected in ((identity[name], image), (plus[name], image + 0.5)):
            assert predicted.shape == image.shape
            np.testing.assert_allclose(predicted_affine, affine, atol=1e-6)
            np.testing.assert_allclose(predicted, expected, atol=1e-5)
    assert read_image(tmp_path / "zero" / "ras.nii.gz", dtype=None)[0].dtype == np.float32


def test_random_generator_matches_its_network_with_reorientation_and_flips(inputs, tmp_path: Path) -> None:
    ckpt = generator_checkpoint(tmp_path / "random.ckpt")
    net = load_model(ckpt).net

    def generated(image: np.ndarray, flips: list[tuple[int, ...]]) -> np.ndarray:
        x = torch.from_numpy(image)[None, None]
        with torch.no_grad():
            outs = [torch.flip(net(torch.flip(x, [a + 2 for a in f])) + torch.flip(x, [a + 2 for a in f]),
                               [a + 2 for a in f]) for f in flips]
        return torch.stack(outs).mean(0)[0, 0].numpy()

    plain = _predict(ckpt, inputs["folder"], tmp_path / "plain")
    image = inputs["plain"][0]
    assert np.abs(generated(image, [()]) - image).max() > 0.05  # the network really changes the image
    np.testing.assert_allclose(plain["plain"][0], generated(image, [()]), atol=1e-5)
    # reoriented to RAS (its first axis flipped), generated, and put back on the file's grid
    flipped = inputs["flipped"][0]
    expected = generated(flipped[::-1].copy(), [()])[::-1]
    assert np.abs(expected - generated(flipped, [()])).max() > 0.01  # the reorientation matters
    np.testing.assert_allclose(plain["flipped"][0], expected, atol=1e-5)
    tta = _predict(ckpt, inputs["folder"], tmp_path / "tta", "--tta")
    np.testing.assert_allclose(tta["plain"][0], generated(image, [(), (0,), (1,), (0, 1)]), atol=1e-5)


def test_resampled_and_cropped_preprocessing_gives_back_the_input_grid(tmp_path: Path) -> None:
    """A checkpoint trained at 1.5 mm on foreground crops, given a ramp on a 0.8 mm grid whose first axis runs right
    to left: the image comes back on the file's exact grid (shape, sform and qform), and, a zero correction
    resampled linearly there and back, equal to the ramp away from the edges (linear interpolation of a linear
    function is exact)."""
    i, j = np.meshgrid(np.arange(24), np.arange(20), indexing="ij")
    ramp = (1.0 + 0.3 * i + 0.1 * j).astype(np.float32)
    affine = _affine((-0.8, 0.8, 1.0), (10.0, 4.0, 0.0))
    write_nifti(ramp, affine, tmp_path / "in" / "ramp.nii.gz")
    ckpt = generator_checkpoint(tmp_path / "coarse.ckpt", bias=0.0, spacing=[1.5, 1.5], crop_foreground=True)
    out = _predict(ckpt, tmp_path / "in", tmp_path / "out")
    predicted, predicted_affine = out["ramp"]
    assert predicted.shape == ramp.shape
    np.testing.assert_allclose(predicted_affine, affine, atol=1e-6)
    inner = (slice(3, -3), slice(3, -3))  # where both resamplings interpolate inside their grids
    np.testing.assert_allclose(predicted[inner], ramp[inner], atol=1e-3)
    header = nib.load(tmp_path / "out" / "ramp.nii.gz").header
    assert int(header["sform_code"]) == int(header["qform_code"]) == 1
    np.testing.assert_allclose(header.get_sform(), affine, atol=1e-6)
    np.testing.assert_allclose(header.get_qform(), affine, atol=1e-5)


def test_multichannel_3d_image_written_channels_last(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = rng.random((12, 10, 8, 2)).astype(np.float32)
    affine = _affine((1.0, 1.5, 2.0), (1.0, 2.0, 3.0))
    write_nifti(image, affine, tmp_path / "in" / "vol.nii.gz")
    ckpt = generator_checkpoint(tmp_path / "g3.ckpt", bias=-1.0, dims=3, channels=2)
    out = _predict(ckpt, tmp_path / "in", tmp_path / "out")
    np.testing.assert_allclose(out["vol"][0], image - 1.0, atol=1e-5)
    np.testing.assert_allclose(out["vol"][1], affine, atol=1e-6)


def test_resume_skips_finished_cases_and_options_are_refused(inputs, tmp_path: Path, capsys) -> None:
    ckpt = generator_checkpoint(tmp_path / "zero.ckpt", bias=0.0)
    out = tmp_path / "out"
    _predict(ckpt, inputs["folder"], out)
    kept = (out / "ras.nii.gz").stat().st_mtime_ns
    (out / "plain.nii.gz").unlink()
    capsys.readouterr()
    assert main(["predict", "--ckpt", str(ckpt), "--input", str(inputs["folder"]), "--output", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    done = _predict(ckpt, inputs["folder"], out, "--resume")
    assert "predicted 1 case(s), skipped 2" in capsys.readouterr().out
    assert (out / "ras.nii.gz").stat().st_mtime_ns == kept
    np.testing.assert_allclose(done["plain"][0], inputs["plain"][0], atol=1e-5)
    for extra in (["--save-probabilities"], ["--ensemble", "vote"]):
        assert main(["predict", "--ckpt", str(ckpt), "--input", str(inputs["folder"]), "--output",
                     str(tmp_path / "other"), *extra]) == 2
        err = capsys.readouterr().err
        assert str(ckpt) in err and " ".join(extra) in err
    label_ckpt = generator_checkpoint(tmp_path / "label.ckpt", bias=0.0, condition="label")
    assert main(["predict", "--ckpt", str(label_ckpt), "--input", str(inputs["folder"]), "--output",
                 str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert str(label_ckpt) in err and "medseg synthesize" in err


# ----------------------------------------------------------------------------------------------- evaluation


def _psnr(prediction: np.ndarray, target: np.ndarray, data_range: float) -> float:
    return float(peak_signal_noise_ratio(torch.from_numpy(prediction).double(), torch.from_numpy(target).double(),
                                         data_range=data_range))


def _ssim(prediction: np.ndarray, target: np.ndarray, data_range: float) -> float:
    """torchmetrics' SSIM map (reflect-padded) cut to where the 11x11 window fits, as MONAI and scikit-image
    average it."""
    _, full = structural_similarity_index_measure(
        torch.from_numpy(prediction).double()[None, None], torch.from_numpy(target).double()[None, None],
        data_range=data_range, return_full_image=True)
    return float(full[..., 5:-5, 5:-5].mean())


@pytest.fixture()
def scored(tmp_path: Path) -> dict:
    """An enhancement dataset whose test list holds four 2D cases (targets in about 0..190, not [0, 1]) and whose
    training list one more (its target up to about 400: not scored, so not in the range); predictions closer to
    the targets than the degraded inputs for three test cases, and one prediction of an unknown case."""
    rng = np.random.default_rng(3)
    root, pred = tmp_path / "ds", tmp_path / "pred"
    entries, arrays = {}, {}
    for name, scale in (("c0", 1.0), ("c1", 1.0), ("c2", 1.0), ("c3", 1.5), ("tr0", 3.0)):
        affine = _affine((0.9, 1.1, 1.0), (len(entries), 0.0, 0.0))
        target = np.cumsum(rng.random((28, 24)), axis=0) * 200 / 28 * scale  # rising along the first axis
        degraded, prediction = (target + s * rng.standard_normal(target.shape) for s in (20.0, 6.0))
        write_nifti(target.astype(np.float32), affine, root / "targets" / f"{name}.nii.gz")
        write_nifti(degraded.astype(np.float32), affine, root / "images" / f"{name}.nii.gz")
        entries[name] = {"image": f"images/{name}.nii.gz", "target": f"targets/{name}.nii.gz"}
        if name in ("c0", "c1", "c2"):
            write_nifti(prediction.astype(np.float32), affine, pred / f"{name}.nii.gz")
        arrays[name] = tuple(a.astype(np.float32) for a in (prediction, degraded, target))
    write_nifti(arrays["c0"][0], np.eye(4), pred / "stray.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "task": "enhancement", "training": [entries["tr0"]], "test": [entries[f"c{i}"] for i in range(4)]}))
    return {"root": root, "pred": pred, "arrays": arrays, "out": tmp_path / "eval"}


def test_evaluate_scores_agree_with_references(scored: dict, capsys) -> None:
    code = main(["evaluate", "--pred", str(scored["pred"]), "--truth", str(scored["root"]), "--output",
                 str(scored["out"])])
    captured = capsys.readouterr()
    assert code == 1  # c3 has no prediction
    assert "missing predictions: c3" in captured.err and "unmatched predictions: stray" in captured.err
    assert "3 case(s): PSNR" in captured.out
    summary = json.loads((scored["out"] / "summary.json").read_text())
    targets = [scored["arrays"][f"c{i}"][2] for i in range(4)]  # every scored case's target, c3's too
    data_range = max(float(t.max()) for t in targets) - min(float(t.min()) for t in targets)
    assert summary["data_range"] == pytest.approx(data_range, rel=1e-6)
    assert summary["missing_predictions"] == ["c3"] and summary["unmatched_predictions"] == ["stray"]  # not tr0
    rows = {r["case"]: r for r in _csv(scored["out"] / "per_case.csv")}
    assert sorted(rows) == ["c0", "c1", "c2"]
    for case, row in rows.items():
        prediction, degraded, target = scored["arrays"][case]
        # rel 1e-6: torchmetrics takes the range and log(10) as float32 tensors
        assert float(row["psnr"]) == pytest.approx(_psnr(prediction, target, data_range), rel=1e-6)
        assert float(row["psnr_input"]) == pytest.approx(_psnr(degraded, target, data_range), rel=1e-6)
        assert float(row["ssim"]) == pytest.approx(_ssim(prediction, target, data_range), abs=1e-9)
        assert float(row["ssim_input"]) == pytest.approx(_ssim(degraded, target, data_range), abs=1e-9)
        assert float(row["psnr_gain"]) == pytest.approx(float(row["psnr"]) - float(row["psnr_input"]), abs=1e-9)
        assert float(row["psnr_gain"]) > 5  # noise 6 instead of 20: about 10 dB
    gains = [float(r["psnr_gain"]) for r in rows.values()]
    assert summary["psnr_gain"]["mean"] == pytest.approx(np.mean(gains))
    assert summary["ssim"]["median"] == pytest.approx(np.median([float(r["ssim"]) for r in rows.values()]))
    assert (scored["out"] / "enhancement.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {r["metric"] for r in _csv(scored["out"] / "summary.csv")} >= {"psnr", "ssim", "psnr_gain"}


def test_predictions_of_no_case_of_the_dataset_are_refused_in_one_line(scored: dict, tmp_path: Path,
                                                                        capsys) -> None:
    other = tmp_path / "other"  # e.g. a multitask model's label maps, named after that dataset's cases
    other.mkdir()
    for name in ("case_024", "case_025"):
        write_nifti(np.zeros((28, 24), np.uint8), np.eye(4), other / f"{name}.nii.gz")
    (other / "predictions.csv").write_text("case,prediction\n")
    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(other), "--truth", str(scored["root"]), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert f"{other}: none of its 2 prediction image(s) (case_024, case_025) is a case of " in err
    assert "(c0, c1, c2, ... 1 more)" in err
    assert not out.exists()


def test_export_refuses_a_generator_in_one_line(tmp_path: Path, capsys) -> None:
    checkpoint = generator_checkpoint(tmp_path / "g.ckpt", bias=0.0)
    assert main(["export", "--ckpt", str(checkpoint), "--out", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert f"{checkpoint}: enhancement models cannot be exported yet (its prediction is an image" in err


def test_prediction_on_another_grid_is_refused(scored: dict, capsys) -> None:
    moved = scored["pred"] / "c1.nii.gz"
    values, affine = read_image(moved)
    write_nifti(values, affine @ np.diag([2.0, 1.0, 1.0, 1.0]), moved)
    assert main(["evaluate", "--pred", str(scored["pred"]), "--truth", str(scored["root"]), "--output",
                 str(scored["out"])]) == 2
    assert f"{moved}: grid" in capsys.readouterr().err


def test_predict_then_evaluate_a_dataset(scored: dict, tmp_path: Path, capsys) -> None:
    """`predict --input dataset.json` predicts the test cases that `evaluate` scores: with a zero-correction
    generator every prediction is its degraded input, so the gain is 0."""
    ckpt = generator_checkpoint(tmp_path / "zero.ckpt", bias=0.0)
    pred, out = tmp_path / "roundtrip", tmp_path / "roundtrip_eval"
    _predict(ckpt, scored["root"] / "dataset.json", pred)
    assert main(["evaluate", "--pred", str(pred), "--truth", str(scored["root"] / "dataset.json"), "--output",
                 str(out)]) == 0
    assert "4 case(s): PSNR" in capsys.readouterr().out
    rows = _csv(out / "per_case.csv")
    assert [r["case"] for r in rows] == ["c0", "c1", "c2", "c3"]
    for row in rows:
        assert float(row["psnr"]) == pytest.approx(float(row["psnr_input"]), abs=1e-4)
        assert float(row["ssim"]) == pytest.approx(float(row["ssim_input"]), abs=1e-6)


def test_ssim_in_slabs_of_a_multichannel_3d_image_and_the_unit_range(tmp_path: Path, monkeypatch) -> None:
    from monai.metrics import SSIMMetric

    import medseg.evaluation.enhancement as enhancement

    rng = np.random.default_rng(4)
    target = (rng.random((20, 18, 7, 2)) * 50).astype(np.float32)
    prediction = (target + 5 * rng.standard_normal(target.shape)).astype(np.float32)
    monkeypatch.setattr(enhancement, "SSIM_SLAB_VALUES", 2000)  # several slabs along the last axis
    as_batch = lambda a: torch.from_numpy(np.moveaxis(a, -1, 0).copy())[None]  # noqa: E731
    expected = float(SSIMMetric(3, 50.0, win_size=[11, 11, 7])(as_batch(prediction), as_batch(target)))
    assert ssim(prediction, target, 3, 50.0) == pytest.approx(expected, abs=1e-5)
    for i, values in enumerate((rng.random((8, 8)), rng.random((8, 8)) * 0.5)):
        write_nifti(values.astype(np.float32), np.eye(4), tmp_path / f"t{i}.nii.gz")
    assert target_range([str(tmp_path / "t0.nii.gz"), str(tmp_path / "t1.nii.gz")]) == 1.0


def _csv(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_label_maps_and_nonfinite_voxels_are_refused_naming_the_file(scored: dict, capsys) -> None:
    """A folder of label maps (whole numbers) given as the enhanced images, and NaN in a prediction or in a
    degraded image, each stop evaluate with one line naming the file instead of scoring it."""
    label_map = scored["pred"] / "c0.nii.gz"
    values, affine = read_image(label_map)
    write_nifti((values > values.mean()).astype(np.uint8), affine, label_map)
    argv = ["evaluate", "--pred", str(scored["pred"]), "--truth", str(scored["root"]), "--output", str(scored["out"])]
    assert main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert line.startswith(f"medseg evaluate: {label_map}: every voxel is a whole number (0..1)")
    values[3, 4] = np.nan
    write_nifti(values, affine, label_map)
    assert main(argv) == 2
    assert f"{label_map}: NaN or infinite voxels" in capsys.readouterr().err
    write_nifti(scored["arrays"]["c0"][0], affine, label_map)
    degraded = scored["root"] / "images" / "c1.nii.gz"
    values, affine = read_image(degraded)
    values[0, 0] = np.inf
    write_nifti(values, affine, degraded)
    assert main(argv) == 2
    assert f"{degraded}: NaN or infinite voxels" in capsys.readouterr().err
