"""`medseg plan`: each rule against a fingerprint with a known answer, the cache, and the written config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from medseg.data.datalist import load_dataset
from medseg.plan import rules
from medseg.plan.fingerprint import fingerprint_dataset
from medseg.plan.planner import make_plan


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
    # compared with the largest other axis, not the finest: 1 x 2.5 x 5 is not anisotropic (5 < 3 x 2.5)
    assert rules.target_spacing(np.array([[1.0, 2.5, 5.0]] * 3)).value == [1.0, 2.5, 5.0]
    # the 10th percentile never goes finer than the other axes
    few_thin = np.array([[0.7, 0.7, 5.0]] * 8 + [[0.7, 0.7, 0.5]] * 2)
    assert rules.target_spacing(few_thin).value == [0.7, 0.7, 0.7]


def test_ct_is_clipped_to_foreground_percentiles_and_z_scored_with_dataset_statistics() -> None:
    stats = {"p00_5": -80.0, "p50": 60.0, "p99_5": 300.0, "mean": 70.0, "std": 50.0}
    values, crop = rules.intensity(["CT"], stats, crop_share=0.9)
    assert values.value == {"intensity": "ct_zscore", "clip": [-80.0, 300.0], "zscore": [70.0, 50.0]}
    assert crop.value is False
    mixed, _ = rules.intensity(["CT", "PET"], stats, crop_share=0.9)  # the CT clip would be wrong for PET
    assert mixed.value == {"intensity": "zscore"}


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
    whole, batch, _ = rules.patch_and_batch([32.0, 32.0, 16.0], spacing, budget=1e9, features=32, cap=320,
                                            cases=400)
    assert whole.value == [32, 32, 16]  # clipped to the image; the budget goes to the batch, up to 5% of the voxels
    assert batch.value == 20  # 0.05 x 400 cases x 32x32x16 voxels / 32x32x16 a patch
    _, few, _ = rules.patch_and_batch([32.0, 32.0, 16.0], spacing, budget=1e9, features=32, cap=320, cases=6)
    assert few.value == 2  # 5% of 6 cases is less than one: at least 2
    rounded, _, _ = rules.patch_and_batch([63.99999, 63.99999], [0.7, 0.7], budget=1e9, features=32, cap=512)
    assert rounded.value == [64, 64]  # float32 spacings: 63.99999 is the whole 64-voxel image


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
    short = rules.schedule(cases=40, batch=2, max_time_s=90)  # 90 s at 2 steps/s: 3 validations, every 60 steps
    assert short["check_val_every_n_epoch"].value == 3
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


@pytest.mark.slow  # 25 s of training by design (the planned max_time), and wall-clock bound: the slow set runs it
def test_a_planned_config_trains_end_to_end(tmp_path: Path) -> None:
    """Plan a small synthetic dataset for 25 s, train the written config as it is (only the device and the run
    folder given), and check it validated on its own and learned."""
    import csv

    from medseg.cli import main
    from medseg.data.synthetic import make_synthetic

    root = make_synthetic(tmp_path / "ds", dims=3, cases=8, classes=2, size=(32, 32, 16), seed=3).parent
    assert main(["plan", str(root), "--out", str(tmp_path / "planned.yaml"), "--max-time", "00:00:00:25"]) == 0
    assert main(["fit", "--config", str(tmp_path / "planned.yaml"), "--trainer.accelerator", "cpu",
                 "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false"]) == 0
    (metrics,) = (tmp_path / "runs").rglob("metrics.csv")
    with metrics.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    dice = [float(row["val/dice"]) for row in rows if row.get("val/dice")]
    rates = [float(row["lr-AdamW"]) for row in rows if row.get("lr-AdamW")]
    assert len(dice) >= 3 and max(dice) > 0.8, dice
    assert rates[-1] < 0.5 * rates[0]  # the rate annealed over the 25 s


def test_bad_plan_requests_are_one_line(seg3d: Path, capsys) -> None:
    from medseg.cli import main

    for args, reason in ((["--max-time", "2h"], "give DD:HH:MM:SS"), (["--network", "unet"], "'planned_unet' only"),
                         (["--dims", "2"], "--dims 2, but the images are 3D")):
        assert main(["plan", str(seg3d), *args]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("medseg plan: ")]
        assert len(lines) == 1 and reason in lines[0] and "Traceback" not in err, err


def test_a_changed_class_index_is_checked_again(cls2d_root: Path, tmp_path: Path) -> None:
    """The case's own entry is part of the checks cache key: a class index edited in dataset.json (no image
    file changes) is checked again."""
    import json
    import shutil

    from medseg.data.checks import check_dataset

    root = Path(shutil.copytree(cls2d_root, tmp_path / "cls"))
    assert check_dataset(root) == []
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["label"] = 7
    (root / "dataset.json").write_text(json.dumps(meta))
    assert "class index 7 is not declared" in str(check_dataset(root))


@pytest.fixture
def seg3d(seg3d_root: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(seg3d_root, tmp_path / "seg3d"))
