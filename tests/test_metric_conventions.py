"""One metric convention from validation to report (medseg.metrics.conventions): the Dice that picks checkpoints
is the Dice evaluate reports, a missed structure never improves a mean, and the truth may be given either way."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from monai.metrics import compute_dice

from medseg.data.synthetic import make_synthetic
from medseg.evaluation.evaluate import evaluate_segmentation
from medseg.metrics.conventions import EmptyMaskRules, image_diagonal_mm, mask_dice
from medseg.tasks.segmentation import SegmentationModule


def test_mask_dice_agrees_with_monai_without_ignore_empty() -> None:
    rng = np.random.default_rng(0)
    pred = torch.from_numpy(rng.random((6, 3, 10, 9)) > 0.6)
    ref = torch.from_numpy(rng.random((6, 3, 10, 9)) > 0.5)
    pred[0, 1] = False  # missed
    ref[1, 2] = False  # spurious
    pred[2, 0] = ref[2, 0] = False  # both empty
    ours = mask_dice(pred, ref)
    monai = compute_dice(pred.float(), ref.float(), include_background=True, ignore_empty=False)
    assert torch.allclose(ours.float(), monai, atol=1e-6)
    assert ours[0, 1] == 0 and ours[1, 2] == 0 and ours[2, 0] == 1
    # MONAI's ignore_empty (what val/dice used to be) drops the spurious structure: no cost for over-segmenting.
    assert math.isnan(compute_dice(pred.float(), ref.float(), ignore_empty=True)[1, 2].item())
    assert math.isnan(mask_dice(pred, ref, both_empty=float("nan"))[2, 0].item())


class _Replay(SegmentationModule):
    """A "model" whose prediction for a case is the case's image (a 0/1 mask): validation scores exactly it."""

    def predict_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        return torch.cat([1.0 - image, image], dim=1)


def _val_dice(cases: list[tuple[np.ndarray, np.ndarray]]) -> float:
    model = _Replay(network="unet", spatial_dims=2, network_args={"channels": [4, 8]}, roi_size=[16, 16])
    batches = [{"image": torch.from_numpy(p[None, None]).float(), "label": torch.from_numpy(r[None, None]).long()}
               for p, r in cases]
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    return trainer.validate(model, dataloaders=loader, verbose=False)[0]["val/dice"]


def _square(lo: int, hi: int) -> np.ndarray:
    mask = np.zeros((16, 16), np.uint8)
    mask[lo:hi, lo:hi] = 1
    return mask


def test_over_segmenting_cases_without_the_class_lowers_val_dice(tmp_path: Path) -> None:
    with_class, without = _square(4, 10), np.zeros((16, 16), np.uint8)
    exact = [(with_class, with_class), (without, without)]
    over = [(with_class, with_class), (_square(2, 5), without)]  # a structure where the reference has none
    assert _val_dice(exact) == pytest.approx(1.0)
    assert _val_dice(over) == pytest.approx(0.5)  # the spurious case scores 0, as `medseg evaluate` scores it
    # ... and it is the Dice evaluate reports for the same masks.
    affine = np.eye(4)
    for name, cases in (("over", over), ("exact", exact)):
        for folder, index in (("pred", 0), ("ref", 1)):
            (tmp_path / name / folder).mkdir(parents=True)
            for i, case in enumerate(cases):
                nib.save(nib.Nifti1Image(case[index][..., None], affine), tmp_path / name / folder / f"c{i}.nii.gz")
    summary = evaluate_segmentation(tmp_path / "over" / "pred", tmp_path / "over" / "ref", tmp_path / "ev",
                                    classes=[1])
    assert summary["foreground_mean"]["dice"] == pytest.approx(_val_dice(over))


def _cubes_dataset(tmp_path: Path) -> tuple[Path, list[np.ndarray], np.ndarray]:
    """Six 3D cases each with one cube of class 1, spacing 1 x 1 x 2 mm."""
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    refs = []
    (tmp_path / "ref").mkdir()
    for i in range(6):
        ref = np.zeros((24, 24, 12), np.uint8)
        ref[6:14, 6:14, 3:8] = 1
        refs.append(ref)
        nib.save(nib.Nifti1Image(ref, affine), tmp_path / "ref" / f"c{i}.nii.gz")
    return tmp_path / "ref", refs, affine


def _write(folder: Path, masks: list[np.ndarray], affine: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, mask in enumerate(masks):
        nib.save(nib.Nifti1Image(mask, affine), folder / f"c{i}.nii.gz")
    return folder


def test_missing_more_structures_never_improves_the_mean_hd95(tmp_path: Path) -> None:
    ref_dir, refs, affine = _cubes_dataset(tmp_path)
    # Model A finds every cube, shifted by 1..6 voxels; model B is A minus the two worst-placed cubes (missed).
    a = [np.roll(r, shift, axis=0) for r, shift in zip(refs, range(1, 7), strict=True)]
    b = [m if i < 4 else np.zeros_like(m) for i, m in enumerate(a)]
    pa, pb = _write(tmp_path / "a", a, affine), _write(tmp_path / "b", b, affine)
    hd95 = {}
    for rules in (EmptyMaskRules(), EmptyMaskRules(distance_penalty="nan")):
        for name, folder in (("a", pa), ("b", pb)):
            out = tmp_path / f"ev_{name}_{rules.distance_penalty}"
            hd95[name, rules.distance_penalty] = evaluate_segmentation(folder, ref_dir, out, rules=rules)
    default_a, default_b = (hd95[k, "diagonal"]["foreground_mean"]["hd95"] for k in "ab")
    assert default_b > default_a  # the default never rewards a miss ...
    assert hd95["b", "diagonal"]["conventions"]["prediction_empty"] == 2  # ... and counts the penalties
    diagonal = image_diagonal_mm((24, 24, 12), (1.0, 1.0, 2.0))
    per_case_b = (tmp_path / "ev_b_diagonal" / "per_case.csv").read_text()
    assert per_case_b.count(f"{diagonal}") >= 4  # hd95 and assd of the two missed cubes
    # With NaN on request the same miss flatters the mean (what the default prevents), and it is counted.
    nan_a, nan_b = (hd95[k, "nan"]["foreground_mean"]["hd95"] for k in "ab")
    assert nan_b < nan_a
    assert hd95["b", "nan"]["left_out"] == {"hd95": 2, "assd": 2}


def test_a_penalised_distance_is_larger_than_any_real_one() -> None:
    ref = np.zeros((10, 6, 4), bool)
    ref[0, 0, 0] = True
    pred = np.zeros_like(ref)
    pred[-1, -1, -1] = True  # opposite corners: the largest distance two masks in this image can have
    from medseg.metrics.segmentation import binary_metrics

    spacing = (0.7, 0.7, 5.0)
    assert binary_metrics(pred, ref, spacing)["hd95"] < binary_metrics(np.zeros_like(ref), ref, spacing)["hd95"]


def test_truth_as_a_folder_or_a_dataset_json_gives_identical_tables(tmp_path: Path) -> None:
    root = tmp_path / "data"
    description = make_synthetic(root, dims=3, cases=4, classes=3, task="seg", size=(24, 24, 12), seed=3)
    labels = sorted((root / "labelsTr").glob("*.nii.gz"))
    first = nib.load(labels[0])
    no_class_2 = np.asarray(first.dataobj).copy()
    no_class_2[no_class_2 == 2] = 0  # class 2 absent from case 0's reference
    nib.save(nib.Nifti1Image(no_class_2, first.affine), labels[0])
    pred = tmp_path / "pred"
    pred.mkdir()
    for i, path in enumerate(labels):
        image = nib.load(path)
        values = np.asarray(image.dataobj).copy()
        if i == 1:
            values[values == 2] = 0  # class 2 missed in case 1
        if i == 2:
            values[0, 0, :3] = 1  # a few spurious class-1 voxels
        nib.save(nib.Nifti1Image(values, image.affine), pred / path.name)
    by_folder = evaluate_segmentation(pred, root / "labelsTr", tmp_path / "folder")
    by_json = evaluate_segmentation(pred, description, tmp_path / "json")
    by_option = evaluate_segmentation(pred, root / "labelsTr", tmp_path / "option", classes=[1, 2])
    import csv

    def table(folder: str, name: str) -> list[dict[str, str]]:  # all but the names (a folder names no class)
        with (tmp_path / folder / name).open() as handle:
            return [{k: v for k, v in row.items() if k != "name"} for row in csv.DictReader(handle)]

    for name in ("summary.csv", "per_case.csv"):
        assert table("folder", name) == table("json", name) == table("option", name)
    assert by_json["per_class"]["2"]["name"] == "structure2" and by_folder["per_class"]["2"]["name"] == "2"
    assert by_folder["classes"] == by_json["classes"] == [1, 2]
    # Case 0 has no class 2 on either side: it scores by the both-empty rule (1), in both ways.
    per_class_2 = by_folder["per_class"]["2"]["dice"]
    assert per_class_2["n"] == 4 and by_option["per_class"]["2"]["dice"]["n"] == 4


def test_evaluate_warns_when_nan_is_asked_for(tmp_path: Path, seg3d_root: Path) -> None:
    from medseg.cli import main

    pred = tmp_path / "pred"
    shutil.copytree(seg3d_root / "labelsTs", pred)
    first = sorted(pred.glob("*.nii.gz"))[0]
    image = nib.load(first)
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), first)  # a missed structure
    out = tmp_path / "ev"
    assert main(["evaluate", "--pred", str(pred), "--truth", str(seg3d_root / "dataset.json"), "--output", str(out),
                 "--empty-distance", "nan"]) == 0
    summary = (out / "summary.csv").read_text().splitlines()
    hd95 = next(line for line in summary if line.startswith("1,structure1,hd95,"))
    assert hd95.endswith(",1,1")  # n = 1 case scored, 1 left out: visible beside the mean


def test_a_scored_class_no_reference_holds_is_warned_and_counted(tmp_path: Path, capsys) -> None:
    ref_dir, refs, affine = _cubes_dataset(tmp_path)
    pred = _write(tmp_path / "pred", [np.roll(r, 2, axis=0) for r in refs], affine)
    summary = evaluate_segmentation(pred, ref_dir, tmp_path / "ev", classes=[1, 7])
    assert summary["absent_classes"] == [7]  # its Dice 1 in every case raises the mean: never silently
    assert "class(es) [7] are in no reference file" in capsys.readouterr().err


def test_a_zero_or_negative_distance_penalty_is_refused() -> None:
    for penalty in ("0", "-3", "inf"):
        with pytest.raises(ValueError, match="a miss must cost something"):
            EmptyMaskRules.parse("1", penalty)
    assert math.isnan(EmptyMaskRules.parse("NAN", "diagonal").both_empty)
    assert EmptyMaskRules.parse("1", " NaN ").distance_penalty == "nan"
