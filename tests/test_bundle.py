"""The MONAI bundle of an exported model: MONAI's own runner predicts what ``medseg predict`` predicts, without
medseg installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.data.io import write_nifti
from medseg.deploy import bundle as bundle_module
from medseg.deploy.bundle import BundleUnsupported, write_bundle
from medseg.inference.batch import PredictOptions, predict_batch
from medseg.inference.native import LoadedModel, flip_sets, load_model

# MONAI's CLI (``python -m monai.bundle run ...``, once per argument list in the JSON file given) in a process
# where ``import medseg`` fails: medseg is installed (editable) in this environment, so a finder placed first on
# sys.meta_path refuses it; ``-I`` keeps the working directory and PYTHONPATH off sys.path. The script exits early
# if medseg can still be imported. One process runs every bundle: importing MONAI is most of a run's time.
NO_MEDSEG_RUNNER = textwrap.dedent("""
    import importlib.abc
    import json
    import runpy
    import sys


    class NoMedseg(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "medseg" or name.startswith("medseg."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: the bundle must not need medseg)")
            return None


    sys.meta_path.insert(0, NoMedseg())
    try:
        import medseg  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        sys.exit("medseg is still importable: this process proves nothing")
    with open(sys.argv[1]) as handle:
        runs = json.load(handle)
    for arguments in runs:
        sys.argv = ["monai.bundle", *arguments]
        runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
        print("bundle run finished:", arguments[-1], flush=True)
""")


def _start_runner(runs: list[tuple[Path, Path, Path]], workdir: Path) -> subprocess.Popen:
    """``python -m monai.bundle run --config_file ... --dataset_dir IN --output_dir OUT`` for each ``(bundle,
    IN, OUT)`` in one background process without medseg, on the CPU."""
    script, arguments = workdir / "no_medseg_runner.py", workdir / "runs.json"
    script.write_text(NO_MEDSEG_RUNNER)
    arguments.write_text(json.dumps([
        ["run", "--config_file", str(bundle / "configs" / "inference.json"),
         "--meta_file", str(bundle / "configs" / "metadata.json"),
         "--bundle_root", str(bundle), "--dataset_dir", str(inputs), "--output_dir", str(output)]
        for bundle, inputs, output in runs]))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # medseg's reference runs on the CPU too
    return subprocess.Popen([sys.executable, "-I", str(script), str(arguments)], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _resampled_cropped(checkpoint: Path, out: Path) -> Path:
    """The same network with a preprocessing that resamples (coarser than the 1x1x2 mm images) and crops
    the foreground: the paths where the inverted grid does not cover every input voxel."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    saved["hyper_parameters"]["preprocessing_spec"].update(spacing=[1.5, 0.8, 3.0], crop_foreground=True)
    torch.save(saved, out)
    return out


def _with_zero_border(images: list[Path], folder: Path) -> Path:
    """Copies of ``images`` with zeroed slabs on three sides (something for the foreground crop to remove)."""
    folder.mkdir()
    for path in images:
        image = nib.load(path)
        voxels = np.asarray(image.dataobj, dtype=np.float32).copy()
        voxels[:3], voxels[:, -5:], voxels[..., :2] = 0, 0, 0
        write_nifti(voxels, image.affine, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def bundle_runs(seg3d_root: Path, seg3d_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two bundles predicted by MONAI's runner (in a background process) and by medseg: ``name -> (bundle,
    bundle's predictions, medseg's predictions, runner output)``.

    * ``plain``: the checkpoint alone, no TTA, on two of the dataset's images as they are;
    * ``ensemble_tta``: the same network twice with all 8 flips, preprocessed with resampling and a foreground
      crop, on the same images with zeroed borders.
    """
    work = tmp_path_factory.mktemp("bundle")
    images = sorted((seg3d_root / "imagesTs").glob("*.nii.gz"))[:2]
    plain_in = work / "plain_in"
    plain_in.mkdir()
    for path in images:
        (plain_in / path.name).write_bytes(path.read_bytes())
    cropped = _resampled_cropped(seg3d_checkpoint, work / "cropped.ckpt")
    scenarios = {
        "plain": ([seg3d_checkpoint], False, plain_in),
        "ensemble_tta": ([cropped, cropped], True, _with_zero_border(images, work / "tta_in")),
    }
    for name, (checkpoints, tta, _) in scenarios.items():
        write_bundle(work / f"{name}_bundle", [load_model(path) for path in checkpoints],
                     flip_sets(3) if tta else [()], name)
    process = _start_runner([(work / f"{name}_bundle", inputs, work / f"{name}_out")
                             for name, (_, _, inputs) in scenarios.items()], work)
    for name, (checkpoints, tta, inputs) in scenarios.items():  # meanwhile, medseg's own predictions
        report = predict_batch(checkpoints, inputs, PredictOptions(output=work / f"{name}_medseg", tta=tta,
                                                                   device="cpu"))
        assert sorted(report.done) == [p.name.removesuffix(".nii.gz") for p in images]
    log, _ = process.communicate(timeout=600)
    assert process.returncode == 0, log[-3000:]
    return {name: (work / f"{name}_bundle", work / f"{name}_out", work / f"{name}_medseg", log)
            for name in scenarios}


@pytest.mark.parametrize("scenario", ["plain", "ensemble_tta"])
def test_monai_runner_predicts_what_medseg_predicts(bundle_runs: dict, seg3d_root: Path, scenario: str) -> None:
    _, output, reference, _ = bundle_runs[scenario]
    expected = sorted(p.name for p in reference.glob("*.nii.gz"))
    assert len(expected) == 2
    assert sorted(p.name for p in output.glob("*.nii.gz")) == expected  # <case>.nii.gz, nothing else
    for name in expected:
        ours, theirs = nib.load(output / name), nib.load(reference / name)
        source = nib.load(seg3d_root / "imagesTs" / name)
        assert ours.shape == theirs.shape == source.shape
        np.testing.assert_allclose(ours.affine, source.affine, atol=1e-5)
        np.testing.assert_allclose(theirs.affine, source.affine, atol=1e-5)
        labels, medseg_labels = np.asarray(ours.dataobj), np.asarray(theirs.dataobj)
        assert labels.dtype == np.uint8
        # Exact: the same MONAI transforms, windows and inversion in float32 (measured: 100% of voxels agree).
        # A resampled, cropped case whose background is not refilled where the crop's zero padding enters the
        # inverse resampling agrees at only ~93% of voxels, so this comparison sees that rule.
        np.testing.assert_array_equal(labels, medseg_labels)
        assert len(np.unique(medseg_labels)) == 2  # both classes occur: the agreement is not all-background


def test_bundle_files_are_monai_only(bundle_runs: dict, seg3d_checkpoint: Path) -> None:
    bundle, _, _, log = bundle_runs["ensemble_tta"]
    assert sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()) == [
        "configs/inference.json", "configs/metadata.json", "models/model.ts"]
    config_text = (bundle / "configs" / "inference.json").read_text()
    assert "medseg" not in config_text
    config = json.loads(config_text)
    window = load_model(seg3d_checkpoint).window
    assert config["inferer"] == {"_target_": "SlidingWindowInferer", "roi_size": list(window.roi),
                                 "sw_batch_size": window.batch_size, "overlap": window.overlap, "mode": "gaussian"}
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background",
                                                                                  "1": "structure1"}
    assert metadata["inference"]["members"] == 2 and len(metadata["inference"]["flips"]) == 8
    assert any("post-processing" in item for item in metadata["left_out_compared_to_medseg_predict"])
    assert log.count("bundle run finished") == 2


def _variant(model: LoadedModel, **hparams: object) -> LoadedModel:
    return replace(model, hparams={**model.hparams, **hparams})


def test_unsupported_models_are_refused_with_a_reason(seg3d_checkpoint: Path, tmp_path: Path) -> None:
    model = load_model(seg3d_checkpoint)
    regions = _variant(model, regions=[[1]], region_order=[1], label_names=["structure1"], num_classes=1)
    other_intensity = _variant(model, preprocessing_spec={**model.hparams["preprocessing_spec"],
                                                          "intensity": "zscore"})
    other_window = _variant(model, overlap=0.5)
    cases = {
        "2 input channels": ([_variant(model, in_channels=2)], "mean"),
        "region": ([regions], "mean"),
        "preprocessing": ([model, other_intensity], "mean"),
        "window": ([model, other_window], "mean"),
        "classifier": ([replace(model, task="classification")], "mean"),
        "vote": ([model], "vote"),
    }
    for reason, (models, ensemble) in cases.items():
        with pytest.raises(BundleUnsupported, match=reason):
            write_bundle(tmp_path, models, [()], "refused", ensemble=ensemble)
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_an_unknown_intensity_preset_is_refused_not_left_out() -> None:
    from medseg.data.transforms import Preprocessing

    spec = Preprocessing.from_dict({"intensity": "ct"})
    assert bundle_module.preprocessing_transforms(spec, 3)[-2]["_target_"] == "ScaleIntensityRanged"
    spec.intensity = "histogram_matching"  # a preset added to medseg but not to the bundle
    with pytest.raises(BundleUnsupported, match="'histogram_matching' has no MONAI equivalent"):
        bundle_module.preprocessing_transforms(spec, 3)


def test_a_failure_after_the_network_leaves_no_partial_bundle(seg3d_checkpoint: Path, tmp_path: Path,
                                                               monkeypatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise BundleUnsupported("metadata refused (simulated)")

    monkeypatch.setattr(bundle_module, "_ensemble_module",
                        lambda models, flips: (torch.jit.script(torch.nn.Identity()), [False]))  # fast stand-in
    monkeypatch.setattr(bundle_module, "bundle_metadata", fail)
    with pytest.raises(BundleUnsupported, match="simulated"):
        write_bundle(tmp_path / "bundle", [load_model(seg3d_checkpoint)], [()], "partial")
    assert not (tmp_path / "bundle").exists()


def test_the_runner_fails_on_a_folder_without_nifti_files(bundle_runs: dict, tmp_path: Path) -> None:
    """A 2D model trained on PNG gets a bundle too, and MONAI's runner must not exit 0 having written nothing."""
    import monai.bundle

    bundle = bundle_runs["plain"][0]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "case.png").write_bytes(b"not read")
    with pytest.raises(RuntimeError) as caught:  # MONAI's "Failed to evaluate ConfigExpression" from the cause
        monai.bundle.run(config_file=str(bundle / "configs" / "inference.json"),
                         meta_file=str(bundle / "configs" / "metadata.json"), bundle_root=str(bundle),
                         dataset_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out"))
    cause = caught.value.__cause__
    assert isinstance(cause, FileNotFoundError)
    assert str(cause) == f"no *.nii or *.nii.gz file directly in {tmp_path / 'in'}: the bundle reads NIfTI files"
    assert not (tmp_path / "out").exists()
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["input_files"].startswith("one NIfTI file per case")
