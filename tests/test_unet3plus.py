"""UNet 3+: full-scale skip connections wired as the paper draws them, its options, and a model that learns.

The registry tests (tests/test_models.py) cover shapes, backward, shared options, load_pretrained and
freeze_encoder; tests/test_deep_supervision.py covers its deep-supervision outputs and loss.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from medseg.lightning_cli import MedSegCLI
from medseg.models import create_model
from medseg.models.unet3plus import FullScaleNode, UNet3Plus

CONFIGS = Path(__file__).parents[1] / "configs"


def conv_params(cin: int, cout: int, dims: int) -> int:
    """A 3x3(x3) convolution with bias."""
    return 3**dims * cin * cout + cout


def expected_params(dims: int, cin: int, cout: int, widths: list[int], cat: int, side_heads: bool) -> int:
    """UNet 3+ counted from the paper's description (instance norm without affine parameters has none)."""
    depth = len(widths) - 1
    up = cat * (depth + 1)
    encoder = sum(conv_params(a, b, dims) + conv_params(b, b, dims) for a, b in zip([cin, *widths], widths,
                                                                                   strict=False))
    decoder = 0
    for level in range(depth):
        sources = [*widths[: level + 1], *[up] * (depth - 1 - level), widths[-1]]  # e_j (j <= i), d_j, e_depth
        decoder += sum(conv_params(s, cat, dims) for s in sources) + conv_params(up, up, dims)
    heads = conv_params(up, cout, dims)
    if side_heads:
        heads += (depth - 1) * conv_params(up, cout, dims) + conv_params(widths[-1], cout, dims)
    return encoder + decoder + heads


@pytest.mark.parametrize(("dims", "widths", "cat", "side"), [
    (2, [64, 128, 256, 512, 1024], 64, False),  # the paper's configuration
    (3, [4, 8, 16], 4, True),
    (2, [6, 12, 24, 48], 5, True),
])
def test_parameter_count_matches_the_papers_wiring(dims: int, widths: list[int], cat: int, side: bool) -> None:
    net = create_model("unet3plus", dims, 3, 2, channels=widths, cat_channels=cat, norm="instance",
                       deep_supervision=side)
    assert sum(p.numel() for p in net.parameters()) == expected_params(dims, 3, 2, widths, cat, side)


def test_paper_configuration_has_the_papers_parameter_count() -> None:
    # Huang et al. 2020, Table 1: UNet 3+ (batch norm, widths 64..1024, 3 input channels, one output) 26.97 M
    net = create_model("unet3plus", 2, 3, 1, channels=[64, 128, 256, 512, 1024], norm="batch")
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 2) == 26.97


def test_every_decoder_node_sees_every_scale() -> None:
    net = create_model("unet3plus", 2, 1, 2, channels=[4, 8, 16, 32, 64])
    assert isinstance(net, UNet3Plus) and len(net.decoder) == 4
    for node, level in zip(net.decoder, (3, 2, 1, 0), strict=True):  # deepest first
        assert isinstance(node, FullScaleNode) and len(node.branches) == 5
        for j, branch in enumerate(node.branches):
            resample = branch[0]
            if j < level:
                assert isinstance(resample, nn.MaxPool2d) and resample.kernel_size == 2 ** (level - j)
            elif j > level:
                assert isinstance(resample, nn.Upsample) and resample.scale_factor == 2 ** (j - level)
            else:
                assert isinstance(resample, nn.Identity)
    # the full-resolution output depends on the bottom encoder map through the top node directly: cutting
    # that node's bottom branch changes the output
    x = torch.randn(1, 1, 32, 32)
    net.eval()
    with torch.no_grad():
        before = net(x)
        nn.init.zeros_(net.decoder[-1].branches[-1][1].conv.weight)
        nn.init.zeros_(net.decoder[-1].branches[-1][1].conv.bias)
        assert not torch.allclose(before, net(x))


def test_options_are_checked() -> None:
    assert math.isclose(0.3, next(m.p for m in create_model("unet3plus", 2, 1, 2, base_channels=4, depth=1,
                                                             dropout=0.3).modules() if isinstance(m, nn.Dropout)))
    with pytest.raises(ValueError, match="cat_channels"):
        create_model("unet3plus", 2, 1, 2, cat_channels=0)
    with pytest.raises(ValueError, match="deep_supervision"):
        create_model("unet3plus", 2, 1, 2, deep_supervision="yes")
    with pytest.raises(ValueError, match="depth >= 1"):
        create_model("unet3plus", 2, 1, 2, channels=[8])
    default = create_model("unet3plus", 3, 1, 2)
    assert [block[-1].conv.out_channels for block in default.encoder] == [16, 32, 64, 128, 256]


@pytest.mark.slow
def test_unet3plus_learns_the_synthetic_2d_task(seg2d_root: Path, tmp_path: Path) -> None:
    """15 epochs of the shipped 2D config (deep supervision on) on 3-class synthetic data: both structures
    reach a validation Dice of 0.7 (an untrained network scores about 0 on class 2). ~9 s on 2 cores."""
    cli = MedSegCLI(args=[
        "fit", "--config", str(CONFIGS / "seg2d_unet3plus.yaml"), "--data.root", str(seg2d_root),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "15", "--trainer.check_val_every_n_epoch", "15",
        "--trainer.enable_progress_bar", "false",
        "--model.init_args.network_args", '{"channels": [8, 16, 32], "deep_supervision": true}',
        "--model.init_args.optimizer.init_args.lr", "0.02",
        "--data.patch_size", "[48, 48]", "--data.samples_per_volume", "2", "--data.batch_size", "4",
    ])
    with (Path(cli.trainer.log_dir) / "metrics.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/dice")]
    assert len(rows) == 1
    assert float(rows[0]["val/dice_class1"]) >= 0.7 and float(rows[0]["val/dice_class2"]) >= 0.7
