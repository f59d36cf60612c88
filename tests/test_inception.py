"""``inception``: inception blocks (four parallel branches, concatenated), a classifier that learns, predicts
through ``medseg predict`` and exports."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from medseg.cli import main
from medseg.deploy.artifact import read_spec
from medseg.deploy.export import export_model
from medseg.lightning_cli import MedSegCLI
from medseg.models import create_model
from medseg.models.inception import InceptionBlock, branch_widths
from medseg.resume import saved_checkpoint

CONFIGS = Path(__file__).parents[1] / "configs"


def kernel_sizes(module: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(m.kernel_size) for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)]


@pytest.mark.parametrize("width", [4, 7, 16, 64, 256])
def test_branch_widths_add_up_to_the_block_width(width: int) -> None:
    widths = branch_widths(width)
    assert widths["1x1"] + widths["3x3"] + widths["5x5"] + widths["pool"] == width
    assert min(widths.values()) >= 1
    if width == 256:  # GoogLeNet's proportions: a quarter, a half, an eighth, an eighth
        assert (widths["1x1"], widths["3x3"], widths["5x5"], widths["pool"]) == (64, 128, 32, 32)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_block_concatenates_four_branches_of_the_same_size(spatial_dims: int) -> None:
    torch.manual_seed(0)
    block = InceptionBlock(spatial_dims, 3, 16, norm="batch", act="relu").eval()
    x = torch.randn(2, 3, *([9] * spatial_dims))
    y = block(x)
    assert tuple(y.shape) == (2, 16, *([9] * spatial_dims))
    # each branch's channels come from its own path: branch outputs are the slices of the concatenation
    widths = branch_widths(16)
    start = 0
    for branch, key in ((block.branch1, "1x1"), (block.branch3, "3x3"), (block.branch5, "5x5"),
                        (block.branch_pool, "pool")):
        assert torch.equal(y[:, start:start + widths[key]], branch(x))
        start += widths[key]
    assert kernel_sizes(block.branch1) == [(1,) * spatial_dims]
    assert kernel_sizes(block.branch3) == [(1,) * spatial_dims, (3,) * spatial_dims]
    assert kernel_sizes(block.branch5) == [(1,) * spatial_dims] + [(3,) * spatial_dims] * 2  # 5x5 as two 3x3
    unfactorized = InceptionBlock(spatial_dims, 3, 16, norm="batch", act="relu", factorized=False)
    assert kernel_sizes(unfactorized.branch5) == [(1,) * spatial_dims, (5,) * spatial_dims]


def test_network_takes_any_size_and_refuses_narrow_stages() -> None:
    net = create_model("inception", 3, 1, 4, channels=(8, 16), blocks_per_stage=1).eval()
    for shape in ((2, 1, 7, 5, 3), (1, 1, 1, 1, 1), (2, 1, 20, 33, 9)):
        assert tuple(net(torch.randn(shape)).shape) == (shape[0], 4)
    blocks = [m for m in net.modules() if isinstance(m, InceptionBlock)]
    assert len(blocks) == 2
    deeper = create_model("inception", 2, 1, 2, channels=(8, 16), blocks_per_stage=3)
    assert len([m for m in deeper.modules() if isinstance(m, InceptionBlock)]) == 6
    with pytest.raises(ValueError, match=r"every stage width must be >= 4.*\[2, 4\]"):
        create_model("inception", 2, 1, 2, channels=(2, 4))
    with pytest.raises(ValueError, match="'blocks_per_stage' must be a positive int"):
        create_model("inception", 2, 1, 2, blocks_per_stage=0)


@pytest.fixture(scope="module")
def trained_inception(cls2d_root: Path, tmp_path_factory: pytest.TempPathFactory) -> MedSegCLI:
    """A small 2D inception classifier trained on the synthetic 2-class task (shipped config, narrower)."""
    return MedSegCLI(args=[
        "fit", "--config", str(CONFIGS / "cls2d_inception.yaml"), "--data.root", str(cls2d_root),
        "--trainer.default_root_dir", str(tmp_path_factory.mktemp("inception")), "--trainer.accelerator", "cpu",
        "--model.init_args.network_args", '{"channels": [8, 16, 32], "blocks_per_stage": 1, "dropout": 0.0}',
        "--model.init_args.optimizer.init_args.lr", "0.003", "--data.patch_size", "[48, 48]",
        "--trainer.max_epochs", "10", "--data.augmentation", "null", "--trainer.enable_progress_bar", "false",
    ])


def test_inception_learns_the_synthetic_classification_task(trained_inception: MedSegCLI) -> None:
    metrics = trained_inception.trainer.validate(trained_inception.model, datamodule=trained_inception.datamodule,
                                                 ckpt_path="best", verbose=False)[0]
    # 6 held-out cases of 2 balanced classes: chance is 0.5, and 5 of 6 right is 0.83.
    assert metrics["val/acc"] >= 0.8
    assert metrics["val/auroc"] >= 0.8


def test_inception_predicts_and_exports(cls2d_root: Path, tmp_path: Path) -> None:
    """One training step, then ``medseg predict`` from the checkpoint and from its export: the same classes."""
    cli = MedSegCLI(args=[
        "fit", "--config", str(CONFIGS / "cls2d_inception.yaml"), "--data.root", str(cls2d_root),
        "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
        "--model.init_args.network_args", '{"channels": [4, 8], "blocks_per_stage": 1}', "--data.patch_size", "[32, 32]",
        "--trainer.enable_progress_bar", "false",
    ])
    checkpoint = Path(saved_checkpoint(cli.trainer))
    model = export_model([checkpoint], tmp_path / "model", formats="both", bundle=False)
    member = read_spec(model)["members"][0]
    assert member["onnx_max_abs_diff"] <= 1e-4
    dataset = str(cls2d_root / "dataset.json")
    assert main(["predict", "--ckpt", str(checkpoint), "--input", dataset, "--output", str(tmp_path / "ckpt")]) == 0
    assert main(["predict", "--model", str(model), "--input", dataset, "--output", str(tmp_path / "export")]) == 0
    rows = {}
    for name in ("ckpt", "export"):
        with (tmp_path / name / "predictions.csv").open() as handle:
            rows[name] = {row["case"]: row for row in csv.DictReader(handle)}
    assert len(rows["ckpt"]) == 24 and rows["ckpt"].keys() == rows["export"].keys()
    for case, row in rows["ckpt"].items():
        assert row["prediction"] == rows["export"][case]["prediction"]
        assert float(row["p_class1"]) == pytest.approx(float(rows["export"][case]["p_class1"]), abs=1e-4)
