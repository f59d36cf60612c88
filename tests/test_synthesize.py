"""``medseg synthesize``: pairs drawn by a label-conditioned generator, checked against a generator whose output is
known exactly (a 1x1 convolution mapping each class's one-hot to one intensity)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

from medseg.cli import main
from medseg.data.datalist import load_dataset
from medseg.inference.label_sources import Placement, random_placement

POINTWISE = "tests.test_synthesize:pointwise"
LEVELS = {2: (0.2, 0.8, 0.5), 3: (0.2, 0.8)}  # per class of seg2d_root (3 classes) and seg3d_root (2)
NAMES = {2: ["background", "structure1", "structure2"], 3: ["background", "structure1"]}


def pointwise(spatial_dims: int, in_channels: int, out_channels: int, dropout: float = 0.0) -> nn.Module:
    """A 1x1 convolution (then dropout): with weights ``levels`` and no bias, a one-hot class k maps to
    ``levels[k]``."""
    conv = (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(in_channels, out_channels, 1)
    return nn.Sequential(conv, nn.Dropout(dropout))


def fabricate(path: Path, dims: int, *, condition: str = "label", task: str = "enhancement", dropout: float = 0.0,
              preprocessing: dict | None = None, roi: list[int] | None = None) -> Path:
    """A checkpoint in the enhancement task's format whose generator draws ``LEVELS[dims][k]`` for class k."""
    levels = LEVELS[dims]
    net = pointwise(dims, len(levels), 1, dropout)
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(levels).reshape(1, len(levels), *[1] * dims))
        net[0].bias.zero_()
    hparams = {
        "network": POINTWISE, "network_args": {"dropout": dropout}, "spatial_dims": dims, "in_channels": 1,
        "num_classes": len(levels), "label_names": NAMES[dims], "roi_size": roi or ([32, 32] if dims == 2 else [16, 16, 8]),
        "sw_batch_size": 2, "overlap": 0.25, "preprocessing_spec": preprocessing or {"orientation": "RAS"},
        "condition": condition, "residual": False, "data_range": 1.0, "network_channels": [len(levels), 1],
    }
    state = {f"net.{key}": value for key, value in net.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "medseg_task": task}, path)
    return path


def synthesize(ckpt: Path, labels: Path, out: Path, *extra: str, count: int = 4, seed: int = 0) -> int:
    return main(["synthesize", "--ckpt", str(ckpt), "--labels", str(labels), "--count", str(count), "--out",
                 str(out), "--seed", str(seed), "--device", "cpu", *extra])


def pairs(out: Path) -> list[tuple[dict, nib.Nifti1Image, nib.Nifti1Image]]:
    """``(entry, image, label map)`` of every synthetic case of ``out/dataset.json``."""
    meta = json.loads((out / "dataset.json").read_text())
    return [(entry, nib.load(out / entry["image"]), nib.load(out / entry["label"]))
            for entry in meta["training"] if entry.get("synthetic")]


@pytest.fixture(scope="module", params=[2, 3])
def drawn(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, Path]:
    """``(dims, checkpoint, output)``: 4 pairs drawn from seg2d_root's or seg3d_root's label maps, seed 0."""
    dims = request.param
    root = request.getfixturevalue("seg2d_root" if dims == 2 else "seg3d_root")
    folder = tmp_path_factory.mktemp(f"synth{dims}d")
    ckpt = fabricate(folder / "gen.ckpt", dims)
    assert synthesize(ckpt, root, folder / "out") == 0
    return dims, ckpt, folder / "out"


def test_each_image_is_drawn_from_its_own_label_map(drawn: tuple[int, Path, Path]) -> None:
    dims, _, out = drawn
    found = pairs(out)
    assert len(found) == 4
    assert len(list((out / "imagesTr").iterdir())) == len(list((out / "labelsTr").iterdir())) == 4
    moved = 0
    for entry, image, label in found:
        source = nib.load(entry["source"])
        values, source_values = np.asarray(label.dataobj), np.asarray(source.dataobj).astype(np.int64)
        assert label.get_data_dtype().kind in "iu" and image.get_data_dtype() == np.float32
        assert values.shape == source_values.shape == image.shape
        np.testing.assert_array_equal(label.affine, source.affine)  # the source's grid, voxel for voxel
        np.testing.assert_array_equal(image.affine, source.affine)
        # flips, quarter turns and a shift permute voxels: every class keeps its voxel count
        np.testing.assert_array_equal(np.bincount(values.ravel(), minlength=len(LEVELS[dims])),
                                      np.bincount(source_values.ravel(), minlength=len(LEVELS[dims])))
        # the generator saw this label map, placed as written (the same transform reached both files)
        np.testing.assert_allclose(np.asarray(image.dataobj), np.asarray(LEVELS[dims])[values], atol=1e-5)
        moved += not np.array_equal(values, source_values)
    assert moved > 0


def test_the_seed_alone_decides(drawn: tuple[int, Path, Path], tmp_path: Path) -> None:
    dims, ckpt, out = drawn
    root = Path(pairs(out)[0][0]["source"]).parent.parent
    assert synthesize(ckpt, root, tmp_path / "again") == 0
    assert synthesize(ckpt, root, tmp_path / "other", seed=1) == 0
    first = [np.asarray(label.dataobj) for _, _, label in pairs(out)]
    again = [np.asarray(label.dataobj) for _, _, label in pairs(tmp_path / "again")]
    other = [np.asarray(label.dataobj) for _, _, label in pairs(tmp_path / "other")]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_dropout_stays_active_as_noise(seg2d_root: Path, tmp_path: Path) -> None:
    ckpt = fabricate(tmp_path / "gen.ckpt", 2, dropout=0.5, roi=[48, 48])  # one window: no blending of noise
    runs = []
    for name in ("a", "b"):
        assert synthesize(ckpt, seg2d_root, tmp_path / name, count=1, seed=3) == 0
        (_, image, label), = pairs(tmp_path / name)
        runs.append(np.asarray(image.dataobj))
    np.testing.assert_array_equal(runs[0], runs[1])
    values, levels = np.asarray(label.dataobj), np.asarray(LEVELS[2])
    # inverted dropout: each voxel is 0 or its class's level / (1 - p); both occur in the background
    kept = np.isclose(runs[0], levels[values] / 0.5, atol=1e-5)
    assert np.all(kept | np.isclose(runs[0], 0.0, atol=1e-5))
    assert 0.3 < kept[values == 0].mean() < 0.7


def test_the_generator_runs_on_its_training_grid(seg2d_root: Path, tmp_path: Path) -> None:
    """A checkpoint trained at 1.6 mm (the maps are 0.8 mm): its image comes back on the label map's grid, the
    class levels inside each structure, away from its edges (one coarse voxel and the linear resampling)."""
    ckpt = fabricate(tmp_path / "gen.ckpt", 2, preprocessing={"orientation": "RAS", "spacing": [1.6, 1.6]})
    assert synthesize(ckpt, seg2d_root, tmp_path / "out", count=2) == 0
    for entry, image, label in pairs(tmp_path / "out"):
        values = np.asarray(label.dataobj)
        assert image.shape == values.shape
        np.testing.assert_array_equal(image.affine, nib.load(entry["source"]).affine)
        windows = sliding_window_view(np.pad(values, 3, mode="edge"), (7, 7))
        inside = windows.min(axis=(-2, -1)) == windows.max(axis=(-2, -1))
        assert inside.mean() > 0.5
        np.testing.assert_allclose(np.asarray(image.dataobj)[inside], np.asarray(LEVELS[2])[values[inside]],
                                   atol=1e-4)
        # at the edges the image shows it was drawn on the coarser grid (nearest there, linear back here)
        assert np.abs(np.asarray(image.dataobj) - np.asarray(LEVELS[2])[values]).max() > 0.05


def test_real_and_synthetic_cases_train_together(seg2d_root: Path, tmp_path: Path) -> None:
    ckpt = fabricate(tmp_path / "gen.ckpt", 2)
    out = tmp_path / "out"
    assert synthesize(ckpt, seg2d_root, out, "--dataset", str(seg2d_root), count=3) == 0
    assert main(["check-data", str(out)]) == 0
    spec, real = load_dataset(out), load_dataset(seg2d_root)
    assert spec.task == "segmentation" and spec.label_names == NAMES[2]
    assert len(spec.training) == len(real.training) + 3
    listed = {case["id"]: case for case in spec.training}
    for case in real.training:
        assert listed[case["id"]]["image"] == case["image"] and listed[case["id"]]["label"] == case["label"]
    entries = json.loads((out / "dataset.json").read_text())["training"]
    by_label = {entry["label"]: entry for entry in entries}
    for entry in entries[len(real.training):]:
        assert entry["synthetic"] is True
        # a pair is the patient of its source, so a split never puts them on both sides
        assert by_label[entry["source"]]["patient"] == entry["patient"]


def test_refusals(seg2d_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def refused(ckpt: Path, labels: Path, out: Path, *extra: str, count: int = 2) -> str:
        capsys.readouterr()
        assert synthesize(ckpt, labels, out, *extra, count=count) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("medseg synthesize: ")
        return lines[0]

    enhancer = fabricate(tmp_path / "enhancer.ckpt", 2, condition="image")
    assert f"{enhancer}: an image-to-image" in refused(enhancer, seg2d_root, tmp_path / "a")
    segmenter = fabricate(tmp_path / "segmenter.ckpt", 2, task="segmentation")
    assert f"{segmenter}: a segmentation checkpoint" in refused(segmenter, seg2d_root, tmp_path / "b")
    ckpt = fabricate(tmp_path / "gen.ckpt", 2)
    folder = tmp_path / "maps"
    folder.mkdir()
    good, bad = np.zeros((12, 12), np.uint8), np.zeros((12, 12), np.uint8)
    good[2:5, 3:6], bad[2:5, 3:6], bad[8, 8] = 1, 2, 5
    nib.save(nib.Nifti1Image(good, np.eye(4)), folder / "a.nii.gz")
    nib.save(nib.Nifti1Image(bad, np.eye(4)), folder / "b.nii.gz")
    line = refused(ckpt, folder, tmp_path / "c")
    assert str(folder / "b.nii.gz") in line and "[5]" in line
    assert not (tmp_path / "c").exists()  # every source is checked before anything is written
    odd = tmp_path / "odd"
    odd.mkdir()
    floats = good.astype(np.float32)
    floats[0, 0], floats[1, 1] = 1.5, np.nan  # read in the file's own type: whole numbers only
    nib.save(nib.Nifti1Image(floats, np.eye(4)), odd / "f.nii.gz")
    assert f"{odd / 'f.nii.gz'}: label values [1.5, nan]" in refused(ckpt, odd, tmp_path / "e")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"{empty}: no label maps" in refused(ckpt, empty, tmp_path / "e")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    assert "not empty" in refused(ckpt, seg2d_root, tmp_path / "d")
    assert "the folder of the input" in refused(ckpt, folder, folder, "--overwrite")
    assert synthesize(ckpt, seg2d_root, tmp_path / "d", "--overwrite", count=1) == 0
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("seed", range(20))
def test_placement_keeps_every_structure_inside(seed: int) -> None:
    label = np.zeros((10, 7, 10), np.uint8)
    label[0:3, 5:7, 1:3], label[1, 6, 2] = 1, 2  # touching three faces: only some shifts keep it inside
    placement = random_placement(np.random.default_rng(seed), label, np.array([1.0, 1.0, 1.0]))
    moved = placement.apply(label)
    np.testing.assert_array_equal(np.bincount(moved.ravel()), np.bincount(label.ravel()))
    assert placement.plane in (None, (0, 2))  # axis 1 has another size: no turn may involve it
    # undoing the shift without wrapping around gives back the structure turned and flipped, all of it
    unshifted = Placement(placement.flips, placement.plane, placement.turns).apply(label)
    assert np.count_nonzero(_shift_no_wrap(unshifted, placement.shift)) == np.count_nonzero(label)


def test_placement_turns_only_in_isotropic_planes() -> None:
    label = np.zeros((8, 8), np.uint8)
    label[1, 2] = 1
    turned = {random_placement(np.random.default_rng(s), label, np.array([1.0, 2.0])).turns for s in range(20)}
    assert turned == {0}
    placements = [random_placement(np.random.default_rng(s), label, np.array([1.0, 1.0])) for s in range(20)]
    assert {p.turns for p in placements} == {0, 1, 2, 3}
    assert {p.plane for p in placements if p.turns} == {(0, 1)}


def _shift_no_wrap(array: np.ndarray, shift: tuple[int, ...]) -> np.ndarray:
    """``array`` shifted by ``shift`` with zero padding (what leaves the grid is lost)."""
    out = np.zeros_like(array)
    src = tuple(slice(max(-s, 0), n - max(s, 0)) for s, n in zip(shift, array.shape, strict=True))
    dst = tuple(slice(max(s, 0), n - max(-s, 0)) for s, n in zip(shift, array.shape, strict=True))
    out[dst] = array[src]
    return out


def test_help_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys\nfrom medseg.cli import main\ntry:\n    main(['synthesize', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('IMPORTED', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'monai'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "--count" in result.stdout and "IMPORTED []" in result.stdout, result.stdout + result.stderr
