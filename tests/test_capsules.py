"""Capsule networks (``capsnet``, ``segcaps``): squash and routing against hand computations, 2D only, learning
the synthetic tasks, ``medseg predict`` and export."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from medseg.cli import main
from medseg.deploy.artifact import read_spec
from medseg.deploy.export import export_model
from medseg.lightning_cli import MedSegCLI
from medseg.models import create_model
from medseg.models.capsules import dynamic_routing, length_logits, squash
from medseg.resume import saved_checkpoint

CONFIGS = Path(__file__).parents[1] / "configs"


def test_squash_keeps_direction_and_maps_length_into_unit_interval() -> None:
    s = torch.tensor([[3.0, 4.0], [0.0, 0.5], [0.0, 0.0], [300.0, -400.0]])
    v = squash(s)
    # |s| = 5 -> 25 / 26; |s| = 0.5 -> 0.25 / 1.25 = 0.2; 0 stays 0; |s| = 500 -> just under 1
    lengths = v.norm(dim=-1)
    assert lengths.tolist() == pytest.approx([25 / 26, 0.2, 0.0, 250000 / 250001], abs=1e-6)
    assert torch.allclose(v[0] / lengths[0], torch.tensor([0.6, 0.8]))
    assert torch.allclose(v[3] / lengths[3], torch.tensor([0.6, -0.8]))
    big = squash(torch.full((1, 8), 1e3))
    assert (big.norm(dim=-1) < 1).all()
    # the log-odds of the length is log |s|^2
    assert length_logits(s[:2], dim=-1).tolist() == pytest.approx([math.log(25), math.log(0.25)], rel=1e-5)


def test_dynamic_routing_matches_a_hand_computation() -> None:
    # 2 input capsules, 2 output capsules, 2-D votes, batch 1
    votes = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]],   # input 0 votes for outputs 0, 1
                           [[1.0, 0.0], [0.0, -1.0]]]])  # input 1: agrees on output 0, disagrees on output 1
    # iteration 1: c = 1/2 everywhere; s0 = (1, 0), s1 = (0, 0)
    v, s, c = dynamic_routing(votes, iterations=1)
    assert torch.allclose(c, torch.full((1, 2, 2), 0.5))
    assert torch.allclose(s, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))
    assert torch.allclose(v, torch.tensor([[[0.5, 0.0], [0.0, 0.0]]]), atol=1e-4)  # 1 / (1 + 1) * (1, 0)
    # iteration 2: b_i0 = <(1, 0), (0.5, 0)> = 0.5, b_i1 = 0 -> c_i0 = sigmoid(0.5)
    v, s, c = dynamic_routing(votes, iterations=2)
    c0 = 1 / (1 + math.exp(-0.5))
    assert torch.allclose(c, torch.tensor([[[c0, 1 - c0], [c0, 1 - c0]]]), atol=1e-4)
    assert torch.allclose(c.sum(2), torch.ones(1, 2))  # coupling coefficients sum to 1 over outputs
    assert torch.allclose(s, torch.tensor([[[2 * c0, 0.0], [0.0, 0.0]]]), atol=1e-4)
    n2 = (2 * c0) ** 2
    assert v[0, 0, 0].item() == pytest.approx(n2 / (1 + n2), abs=1e-4)
    # random votes with trailing positions: still a distribution over outputs at every position
    _, _, c = dynamic_routing(torch.randn(2, 5, 3, 4, 6, 7), iterations=3)
    assert c.shape == (2, 5, 3, 6, 7) and torch.allclose(c.sum(2), torch.ones(2, 5, 6, 7), atol=1e-5)


@pytest.mark.parametrize("name", ["capsnet", "segcaps"])
def test_3d_is_refused_in_one_line(name: str) -> None:
    with pytest.raises(ValueError, match=f"Model '{name}' is 2D only: spatial_dims=3 is not supported.") as info:
        create_model(name, 3, 1, 2)
    assert "\n" not in str(info.value)


def test_capsnet_scores_are_the_longest_capsule() -> None:
    torch.manual_seed(0)
    net = create_model("capsnet", 2, 1, 3, base_channels=4, depth=1).eval()
    x = torch.randn(4, 1, 20, 28)
    with torch.no_grad():
        v, _ = net.capsules(x)
        logits = net(x)
    lengths = v.norm(dim=-1)
    assert torch.equal(logits.argmax(1), lengths.argmax(1))
    assert torch.allclose(torch.sigmoid(logits), lengths, atol=1e-4)  # log-odds of the length


def test_segcaps_output_shape_and_size_check() -> None:
    net = create_model("segcaps", 2, 2, 3, channels=(4, 8, 8), capsule_types=2).eval()
    with torch.no_grad():
        assert tuple(net(torch.randn(1, 2, 16, 24)).shape) == (1, 3, 16, 24)
    with pytest.raises(ValueError, match="depth >= 1"):
        create_model("segcaps", 2, 1, 2, channels=(4,))
    with pytest.raises(ValueError, match="'capsule_types' must be a positive int"):
        create_model("segcaps", 2, 1, 2, capsule_types=0)


def _fit(config: str, root: Path, out: Path, *extra: str) -> MedSegCLI:
    return MedSegCLI(args=[
        "fit", "--config", str(CONFIGS / config), "--data.root", str(root), "--trainer.default_root_dir", str(out),
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--data.augmentation", "null",
        *extra,
    ])


def test_capsnet_learns_the_synthetic_classification_task(cls2d_root: Path, tmp_path: Path) -> None:
    cli = _fit("cls2d_capsnet.yaml", cls2d_root, tmp_path, "--data.patch_size", "[48, 48]",
               "--model.init_args.network_args", '{"channels": [8, 16, 32]}', "--trainer.max_epochs", "10")
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)[0]
    # 6 held-out cases of 2 balanced classes: chance is 0.5, and 5 of 6 right is 0.83.
    assert metrics["val/acc"] >= 0.8


def test_segcaps_learns_the_synthetic_segmentation_task(seg2d_root: Path, tmp_path: Path) -> None:
    """A narrow SegCaps (one level, 2 types) for 12 epochs: foreground Dice of the 2 classes well above chance."""
    cli = _fit("seg2d_segcaps.yaml", seg2d_root, tmp_path, "--data.patch_size", "[48, 48]",
               "--model.init_args.network_args", '{"channels": [8, 16], "capsule_types": 2}',
               "--trainer.max_epochs", "12")
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)[0]
    assert metrics["val/dice"] >= 0.7


@pytest.mark.slow
def test_segcaps_shipped_config_learns_the_synthetic_segmentation_task(seg2d_root: Path, tmp_path: Path) -> None:
    cli = _fit("seg2d_segcaps.yaml", seg2d_root, tmp_path, "--data.patch_size", "[48, 48]",
               "--trainer.max_epochs", "30")
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)[0]
    assert metrics["val/dice"] >= 0.85


def _predictions(path: Path) -> dict[str, dict[str, str]]:
    with (path / "predictions.csv").open() as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


@pytest.mark.parametrize("config", ["cls2d_capsnet.yaml", "seg2d_segcaps.yaml"])
def test_capsules_predict_and_export(config: str, cls2d_root: Path, seg2d_root: Path, tmp_path: Path) -> None:
    """One training step, export (TorchScript and ONNX, checked against the network), ``medseg predict``."""
    root = cls2d_root if config.startswith("cls") else seg2d_root
    args = '{"channels": [4, 8, 8]}' if config.startswith("cls") else '{"channels": [4, 8], "capsule_types": 2}'
    cli = _fit(config, root, tmp_path / "runs", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
               "--trainer.limit_val_batches", "1", "--model.init_args.network_args", args,
               "--data.patch_size", "[32, 32]")
    checkpoint = Path(saved_checkpoint(cli.trainer))
    model = export_model([checkpoint], tmp_path / "model", formats="both", bundle=False)
    assert read_spec(model)["members"][0]["onnx_max_abs_diff"] <= 1e-3
    dataset = str(root / "dataset.json")
    assert main(["predict", "--ckpt", str(checkpoint), "--input", dataset, "--output", str(tmp_path / "ckpt")]) == 0
    assert main(["predict", "--model", str(model), "--input", dataset, "--output", str(tmp_path / "export")]) == 0
    if config.startswith("cls"):
        ckpt, exported = _predictions(tmp_path / "ckpt"), _predictions(tmp_path / "export")
        assert len(ckpt) == 24 and ckpt.keys() == exported.keys()
        for case, row in ckpt.items():
            assert row["prediction"] == exported[case]["prediction"]
            assert float(row["p_class1"]) == pytest.approx(float(exported[case]["p_class1"]), abs=1e-4)
    else:
        masks = sorted(p.name for p in (tmp_path / "ckpt").rglob("*.nii.gz"))
        assert masks and masks == sorted(p.name for p in (tmp_path / "export").rglob("*.nii.gz"))
