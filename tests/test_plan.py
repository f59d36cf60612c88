"""`medseg plan`: each rule against a fingerprint with a known answer, the cache, and the written config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from medseg.data.datalist import load_dataset
from medseg.plan import rules
from medseg.plan.fingerprint import Fingerprint, fingerprint_dataset
from medseg.plan.planner import make_plan, write_config


def test_target_spacing_is_the_median_per_axis() -> None:
    spacings = np.array([[0.8, 0.8, 1.0], [1.0, 1.0, 1.2], [1.2, 1.2, 1.4]])
    decision = rules.target_spacing(spacings)
    assert decision.value == [1.0, 1.0, 1.2] and "median" in decision.reason


def test_an_anisotropic_axis_gets_its_10th_percentile() -> None:
    z = np.array([5.0, 5.0, 4.0, 6.0, 3.0, 5.0, 5.0, 5.0, 5.0, 5.0])
    spacings = np.stack([np.full(10, 0.7), np.full(10, 0.7), z], axis=1)
    decision = rules.target_spacing(spacings)
    assert decision.value == [0.7, 0.7, pytest.approx(np.percentile(z, 10))]  # 3.9, not the median 5.0
    assert "axis 2 is anisotropic (5 > 3 x 0.7)" in decision.reason
    # 2.0 / 0.7 < 3: not anisotropic, the median stays
    assert rules.target_spacing(np.array([[0.7, 0.7, 2.0], [0.7, 0.7, 2.1]])).value == [0.7, 0.7, 2.05]


def test_ct_is_clipped_to_foreground_percentiles_and_z_scored_with_dataset_statistics() -> None:
    stats = {"p00_5": -80.0, "p50": 60.0, "p99_5": 300.0, "mean": 70.0, "std": 50.0}
    values, crop = rules.intensity(["CT"], stats, crop_share=0.9)
    assert values.value == {"intensity": "ct_zscore", "clip": [-80.0, 300.0], "zscore": [70.0, 50.0]}
    assert crop.value is False


def test_mri_is_z_scored_per_case_inside_the_mask_only_when_cropping_helps() -> None:
    stats = {"p00_5": 0.0, "p50": 1.0, "p99_5": 2.0, "mean": 1.0, "std": 1.0}
    values, crop = rules.intensity(["T1"], stats, crop_share=0.5)
    assert values.value == {"intensity": "mri"} and crop.value is True  # non-zero z-score, cropped
    values, crop = rules.intensity(["T1"], stats, crop_share=0.9)
    assert values.value == {"intensity": "zscore"} and crop.value is False


def test_topology_of_an_anisotropic_volume() -> None:
    """0.7 x 0.7 x 5 mm, patch 160 x 160 x 16: z is too coarse to halve until x/y catch up (0.7 -> 1.4 -> 2.8 mm:
    5 mm is then within 2x), and its kernel is 1 until then; the last z halving would leave 2 voxels."""
    plan = rules.topology([0.7, 0.7, 5.0], [160, 160, 16]).value
    assert plan["strides"] == [[1, 1, 1], [2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
    assert plan["kernels"] == [[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    assert rules.divisor(plan["strides"]) == [32, 32, 4]


def test_topology_stops_when_a_feature_map_would_drop_below_4() -> None:
    plan = rules.topology([1.0, 1.0], [32, 24]).value
    # 32 -> 16 -> 8 -> 4 (stop); 24 -> 12 -> 6 (stop: 3 < 4)
    assert plan["strides"] == [[1, 1], [2, 2], [2, 2], [2, 1]]
    assert all(k == [3, 3] for k in plan["kernels"]) and len(plan["kernels"]) == 4


def test_patch_fills_the_budget_follows_the_median_shape_and_is_clipped_to_it() -> None:
    spacing, shape = [1.0, 1.0, 1.0], [200.0, 160.0, 120.0]
    patch, batch, topology = rules.patch_and_batch(shape, spacing, budget=2e7, features=32, cap=320)
    widths = rules.feature_widths(len(topology.value["strides"]), 32, 320)
    cost = rules.activation_cost(patch.value, topology.value["strides"], widths)
    assert 2 * cost <= 2e7 and batch.value == 2
    multiple = rules.divisor(topology.value["strides"])
    assert all(p % m == 0 for p, m in zip(patch.value, multiple, strict=True))
    assert patch.value[0] > patch.value[1] > patch.value[2]  # the aspect of the median shape
    bigger, _, _ = rules.patch_and_batch(shape, spacing, budget=8e7, features=32, cap=320)
    assert np.prod(bigger.value) > np.prod(patch.value)  # a larger budget, a larger patch
    whole, batch, _ = rules.patch_and_batch([32.0, 32.0, 16.0], spacing, budget=1e9, features=32, cap=320)
    assert whole.value == [32, 32, 16] and batch.value > 2  # clipped to the image; the budget goes to the batch


def test_a_measured_cost_replaces_the_estimate() -> None:
    """On a GPU, `medseg plan` measures each candidate; here a stand-in that reports 4x the estimate must give
    a smaller patch than the estimate alone."""
    spacing, shape = [1.0, 1.0, 1.0], [200.0, 160.0, 120.0]
    seen = []

    def measured(patch: list[int], topology: dict, widths: list[int]) -> float:
        seen.append(patch)
        return 4 * rules.activation_cost(patch, topology["strides"], widths)

    estimated, _, _ = rules.patch_and_batch(shape, spacing, budget=2e7, features=32, cap=320)
    smaller, _, _ = rules.patch_and_batch(shape, spacing, budget=2e7, features=32, cap=320, cost_of=measured)
    assert seen and np.prod(smaller.value) < np.prod(estimated.value)


def test_schedule_follows_dataset_size_and_max_time() -> None:
    timed = rules.schedule(cases=40, batch=2, max_time_s=3600)
    assert timed["max_time"].value == "00:01:00:00" and timed["max_epochs"].value == -1
    assert timed["samples_per_volume"].value == 1  # a step sees `batch` different cases
    assert timed["check_val_every_n_epoch"].value == 5  # 20 steps a pass: validation about every 100 steps
    assert rules.schedule(cases=400, batch=2, max_time_s=None)["check_val_every_n_epoch"].value == 1
    assert timed["pos_fraction"].value == pytest.approx(0.33)
    untimed = rules.schedule(cases=4, batch=2, max_time_s=None)
    assert untimed["max_steps"].value == 250_000 and "max_time" not in untimed
    assert rules.parse_duration("01:02:03:04") == 93784.0
    with pytest.raises(ValueError, match="DD:HH:MM:SS"):
        rules.parse_duration("2h")


def test_the_fingerprint_is_cached_and_refreshed_after_a_file_changes(seg3d: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import medseg.plan.fingerprint as fingerprint_module

    reads: list[str] = []
    real = fingerprint_module.read_image
    monkeypatch.setattr(fingerprint_module, "read_image", lambda path, **kw: reads.append(path) or real(path, **kw))
    first = fingerprint_dataset(seg3d, progress=False)
    assert len(reads) == 2 * len(first.cases)  # image + label of every case
    reads.clear()
    again = fingerprint_dataset(seg3d, progress=False)
    assert reads == [] and again.cases == first.cases  # nothing read again
    case = load_dataset(seg3d).training[1]
    Path(case["image"][0]).write_bytes(Path(load_dataset(seg3d).training[2]["image"][0]).read_bytes())
    fingerprint_dataset(seg3d, progress=False)
    assert sorted(reads) == sorted([case["image"][0], case["label"]])  # only the changed case


def test_the_integrity_checks_share_the_cache(seg3d: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medseg.data.checks as checks

    reads: list[str] = []
    real = checks.read_image
    monkeypatch.setattr(checks, "read_image", lambda path, **kw: reads.append(path) or real(path, **kw))
    assert checks.check_dataset(seg3d) == []
    assert len(reads) == 16  # 8 cases (6 training + 2 test), image and label
    reads.clear()
    assert checks.check_dataset(seg3d) == [] and reads == []  # a second fit reads no voxel
    label = Path(load_dataset(seg3d).training[0]["label"])
    label.write_bytes(label.read_bytes()[: label.stat().st_size // 2])
    problems = checks.check_dataset(seg3d)
    assert [p.file for p in problems] == [str(label)] and reads == [str(label), *load_dataset(seg3d).training[0]["image"]]
    assert checks.check_dataset(seg3d, tolerance=0.5) == problems  # other settings: checked again, same answer


def test_fingerprint_figures_of_a_known_dataset(tmp_path: Path) -> None:
    from medseg.data.synthetic import make_synthetic

    root = make_synthetic(tmp_path / "ds", dims=3, cases=3, classes=3, size=(40, 32, 12), spacing=(0.7, 0.7, 5.0)).parent
    fingerprint = fingerprint_dataset(root, progress=False)
    # The synthetic affine flips the first axis; RAS order keeps the axes here, so the figures are the file's.
    assert np.allclose(fingerprint.spacings, [[0.7, 0.7, 5.0]] * 3)
    assert [c["shape"] for c in fingerprint.cases] == [[40, 32, 12]] * 3
    stats = fingerprint.class_stats()
    assert set(stats) == {1, 2} and all(s["components_per_case"] == 1.0 for s in stats.values())
    for label, figures in stats.items():  # fraction and component volume agree with the label maps
        import nibabel as nib

        maps = [np.asarray(nib.load(c["label"]).dataobj) for c in load_dataset(root).training]
        assert figures["fraction"] == pytest.approx(np.mean([(m == label).mean() for m in maps]))
        volumes = sorted((m == label).sum() * 0.7 * 0.7 * 5.0 for m in maps)
        assert figures["component_mm3_median"] == pytest.approx(volumes[1], rel=1e-4)


def test_plan_writes_a_commented_config_that_parses(seg3d: Path, tmp_path: Path, capsys) -> None:
    from medseg.cli import main

    assert main(["plan", str(seg3d), "--max-time", "00:00:10:00"]) == 0
    out = capsys.readouterr().out
    written = seg3d / "plans" / "3d.yaml"
    assert f"wrote {written}" in out and "patch x batch" in out
    text = written.read_text()
    config = yaml.safe_load(text)
    assert config["trainer"]["max_time"] == "00:00:10:00" and config["data"]["root"] == str(seg3d)
    assert config["model"]["init_args"]["network"] == "planned_unet"
    assert "EarlyStopping" not in text
    assert "# median spacing" in text and "# a third of the patches centred on foreground" in text
    assert config["data"]["pos_fraction"] == pytest.approx(0.33)


def test_dims_that_the_images_do_not_have_are_refused(seg3d: Path) -> None:
    with pytest.raises(ValueError, match="--dims 2, but the images are 3D"):
        make_plan(fingerprint_dataset(seg3d, progress=False), 2)


@pytest.fixture
def seg3d(seg3d_root: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(seg3d_root, tmp_path / "seg3d"))


def _unused(fingerprint: Fingerprint, path: Path) -> None:  # keeps the writer import honest for linters
    write_config(make_plan(fingerprint, 3), path, [])


def test_a_planned_config_trains_end_to_end(tmp_path: Path) -> None:
    """Plan a small synthetic dataset, train the written config unchanged (a few epochs), and check it learned."""
    import csv

    from medseg.cli import main
    from medseg.data.synthetic import make_synthetic

    root = make_synthetic(tmp_path / "ds", dims=3, cases=8, classes=2, size=(32, 32, 16), seed=3).parent
    assert main(["plan", str(root), "--out", str(tmp_path / "planned.yaml")]) == 0
    assert main(["fit", "--config", str(tmp_path / "planned.yaml"), "--trainer.max_epochs", "6",
                 "--trainer.check_val_every_n_epoch", "1", "--trainer.accelerator", "cpu",
                 "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false"]) == 0
    (metrics,) = (tmp_path / "runs").rglob("metrics.csv")
    with metrics.open(newline="") as handle:
        dice = [float(row["val/dice"]) for row in csv.DictReader(handle) if row.get("val/dice")]
    assert len(dice) == 6 and max(dice) > 0.8, dice
