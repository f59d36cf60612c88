"""Region-based models end to end: dataset.json regions, sigmoid training on region targets, per-region Dice in
validation, label maps rebuilt from regions in order, per-region probabilities, per-region evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.data.datalist import DatasetError, load_dataset
from medseg.evaluation.evaluate import evaluate_segmentation
from medseg.lightning_cli import MedSegCLI

CONFIGS = Path(__file__).parents[1] / "configs"
REGION_LOSS = ["--model.init_args.loss", "dice_bce", "--model.init_args.loss_args", '{"include_background": true}']


def _write(tmp_path: Path, meta: dict) -> Path:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"channel_names": {"0": "MRI"}, "training": [], **meta}))
    return path


def test_both_region_forms_read_the_same(tmp_path: Path) -> None:
    medseg_form = load_dataset(_write(tmp_path, {
        "labels": {"0": "background", "1": "edema", "2": "necrosis", "3": "enhancing"},
        "regions": {"whole": [1, 2, 3], "core": [2, 3], "enhancing": [3]}, "regions_class_order": [1, 2, 3]}))
    nnunet_form = load_dataset(_write(tmp_path, {
        "labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3},
        "regions_class_order": [1, 2, 3]}))
    for spec in (medseg_form, nnunet_form):
        assert spec.regions == [("whole", (1, 2, 3)), ("core", (2, 3)), ("enhancing", (3,))]
        assert spec.region_order == [1, 2, 3] and sorted(spec.labels) == [0, 1, 2, 3]


@pytest.mark.parametrize("meta, message", [
    ({"labels": {"0": "bg", "1": "a"}, "regions": {"r": [1, 2]}, "regions_class_order": [1]}, "foreground label values"),
    ({"labels": {"0": "bg", "1": "a"}, "regions": {"r": [1]}}, "regions_class_order"),
    ({"labels": {"0": "bg", "1": "a"}, "regions": {"r": [1]}, "regions_class_order": [1, 1]}, "one foreground label"),
    ({"labels": {"background": 0, "r": [1, 2]}, "regions": {"r": [1]}, "regions_class_order": [1]}, "not both"),
    ({"task": "classification", "labels": {"0": "a", "1": "b"}, "regions": {"r": [1]}, "regions_class_order": [1]},
     "segmentation"),
])
def test_bad_region_declarations_are_refused_naming_the_file(meta: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=message) as caught:
        load_dataset(_write(tmp_path, meta))
    assert str(tmp_path / "dataset.json") in str(caught.value)


def test_region_data_with_a_softmax_or_background_dropping_loss_is_refused(seg2d_regions_root: Path,
                                                                          tmp_path: Path) -> None:
    base = ["fit", "--config", str(CONFIGS / "seg2d_unet.yaml"), "--data.root", str(seg2d_regions_root),
            "--trainer.default_root_dir", str(tmp_path), "--trainer.fast_dev_run", "1"]
    # ConfigError, which jsonargparse wraps into a ValueError that carries its message
    with pytest.raises(ValueError, match="need a sigmoid loss"):
        MedSegCLI(args=base)  # the 2D config trains dice_ce (softmax)
    with pytest.raises(ValueError, match="include_background must be true"):
        MedSegCLI(args=[*base, "--model.init_args.loss", "dice_bce"])  # the config drops channel 0


def test_the_refusal_is_one_line_from_the_command(seg2d_regions_root: Path, tmp_path: Path, capsys) -> None:
    code = main(["fit", "--config", str(CONFIGS / "seg2d_unet.yaml"), "--data.root", str(seg2d_regions_root),
                 "--trainer.default_root_dir", str(tmp_path), "--trainer.fast_dev_run", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "need a sigmoid loss" in err[0] and err[0].startswith("medseg fit: ")


@pytest.fixture(scope="module")
def region_run(seg2d_regions_root: Path, tmp_path_factory: pytest.TempPathFactory) -> MedSegCLI:
    out = tmp_path_factory.mktemp("regions_fit")
    return MedSegCLI(args=[
        "fit", "--config", str(CONFIGS / "seg2d_unet.yaml"), "--data.root", str(seg2d_regions_root),
        "--trainer.default_root_dir", str(out), "--trainer.accelerator", "cpu", *REGION_LOSS,
        "--trainer.max_epochs", "24", "--trainer.check_val_every_n_epoch", "6",
        "--model.init_args.network_args", '{"channels": [8, 16, 32, 64]}', "--model.init_args.optimizer.init_args.lr",
        "0.01", "--data.patch_size", "[48, 48]", "--data.batch_size", "4",
        "--model.init_args.scheduler", "null",  # a constant rate: these 24 short epochs are about the regions
    ])


def test_a_region_model_learns_every_nested_region(region_run: MedSegCLI) -> None:
    metrics = region_run.trainer.callback_metrics
    for k in (1, 2, 3):  # whole, core, inner: chance is far below
        assert float(metrics[f"val/dice_region{k}"]) >= 0.8, {k: float(v) for k, v in metrics.items()}
    assert region_run.model.hparams.regions == [[1, 2, 3], [2, 3], [3]]


def test_region_predictions_rebuild_the_label_map_and_score_per_region(
    region_run: MedSegCLI, seg2d_regions_root: Path, tmp_path: Path
) -> None:
    from medseg.resume import saved_checkpoint

    checkpoint = saved_checkpoint(region_run.trainer)
    out = tmp_path / "pred"
    assert main(["predict", "--ckpt", checkpoint, "--input", str(seg2d_regions_root / "dataset.json"), "--output",
                 str(out), "--device", "cpu", "--save-probabilities", "--tta"]) == 0
    spec = load_dataset(seg2d_regions_root)
    for case in spec.test:
        labels = np.asarray(nib.load(out / f"{case['id']}.nii.gz").dataobj)
        saved = np.load(out / "probabilities" / f"{case['id']}.npz")
        assert list(saved["label_names"]) == ["whole", "core", "inner"]
        p = saved["probabilities"].astype(np.float32)
        assert p.shape == (3, *labels.shape) and p.min() >= 0 and p.max() <= 1
        expected = np.zeros(labels.shape, np.uint8)
        for region, value in enumerate((1, 2, 3)):  # nnU-Net's rule, from the written probabilities
            expected[p[region] > 0.5] = value
        assert np.mean(expected == labels) > 0.999  # float16 rounding may move a voxel sitting at 0.5
        assert set(np.unique(labels)) <= {0, 1, 2, 3}
    summary = evaluate_segmentation(out, seg2d_regions_root / "dataset.json", tmp_path / "eval")
    assert list(summary["per_class"]) == ["whole", "core", "inner"]
    for name in ("whole", "core", "inner"):
        assert summary["per_class"][name]["dice"]["mean"] >= 0.8
    rows = (tmp_path / "eval" / "per_case.csv").read_text().splitlines()
    assert rows[0].startswith("case,class,name,dice") and ",core,core," in rows[2]
    # Calibration per region: channel r against region r's mask (not label value r).
    pooled = summary["calibration"]["pooled"]
    assert list(pooled) == ["whole", "core", "inner"] and all(v["ece"] < 0.1 for v in pooled.values())
    assert summary["undeclared_labels"]["cases"] == 0  # label 3 is scored (it is in every region)
    # A folder of labels does not say which channel is which region: refused, not scored against label values.
    with pytest.raises(ValueError, match="probabilities of a region model"):
        evaluate_segmentation(out, seg2d_regions_root / "labelsTs", tmp_path / "eval_folder")
    with pytest.raises(ValueError, match="declares regions"):
        evaluate_segmentation(out, seg2d_regions_root / "dataset.json", tmp_path / "eval_labels", classes=[1])


def test_a_region_model_and_a_class_model_do_not_form_an_ensemble(region_run: MedSegCLI, seg2d_regions_root: Path,
                                                                  tmp_path: Path, capsys) -> None:
    """Same number of outputs (3), different meaning: refused before any case, naming the checkpoint."""
    import torch

    from medseg.resume import saved_checkpoint

    regions = saved_checkpoint(region_run.trainer)
    classes = tmp_path / "classes.ckpt"
    checkpoint = torch.load(regions, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"].update(regions=None, region_order=None, loss="dice_ce", loss_args={},
                                          label_names=["background", "a", "b"])
    torch.save(checkpoint, classes)
    assert main(["predict", "--ckpt", regions, "--ckpt", str(classes), "--input", str(seg2d_regions_root / "dataset.json"),
                 "--output", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(classes) in err and "regions" in err and "softmax" in err
