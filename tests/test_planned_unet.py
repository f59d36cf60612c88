"""planned_unet: nnU-Net-style topology from per-level kernels and strides (MONAI DynUNet underneath)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import DynUNet
from torch import nn

from medseg.models import create_model, planned_unet_min_size
from medseg.models.planned_unet import default_topology, planned_unet_widths

CONFIGS = Path(__file__).parents[1] / "configs"
# 0.7 x 0.7 x 5 mm voxels: no pooling and in-plane kernels along the thick axis at the top two levels.
KERNELS_3D = [[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3]]
STRIDES_3D = [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]]
KERNELS_2D = [[3, 1], [3, 3], [3, 3]]
STRIDES_2D = [[1, 1], [2, 1], [2, 2]]


def planned(spatial_dims: int = 3, out_channels: int = 2, **options: Any) -> nn.Module:
    kernels, strides = (KERNELS_3D, STRIDES_3D) if spatial_dims == 3 else (KERNELS_2D, STRIDES_2D)
    options = {"kernels": kernels, "strides": strides, "features": 4, **options}
    return create_model("planned_unet", spatial_dims, 1, out_channels, **options)


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def conv_shapes(module: nn.Module) -> set[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(kernel_size, stride) of every plain convolution under ``module``."""
    return {
        (tuple(m.kernel_size), tuple(m.stride))
        for m in module.modules()
        if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd)
    }


@pytest.mark.parametrize(
    ("spatial_dims", "shape"),
    [(3, (2, 1, 16, 16, 8)), (2, (2, 1, 16, 8))],
    ids=["3d", "2d"],
)
def test_anisotropic_topology_builds_and_keeps_the_input_size(
    spatial_dims: int, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    net = planned(spatial_dims, out_channels=3)
    y = net(torch.randn(shape))
    assert tuple(y.shape) == (shape[0], 3, *shape[2:])
    assert torch.isfinite(y).all()
    kernels, strides = (KERNELS_3D, STRIDES_3D) if spatial_dims == 3 else (KERNELS_2D, STRIDES_2D)
    assert (tuple(kernels[0]), (1,) * spatial_dims) in conv_shapes(net.input_block)
    assert (tuple(kernels[1]), tuple(strides[1])) in conv_shapes(net.downsamples[0])
    assert (tuple(kernels[-1]), tuple(strides[-1])) in conv_shapes(net.bottleneck)


def test_min_size_is_the_product_of_strides_per_axis() -> None:
    assert planned_unet_min_size(STRIDES_3D) == [8, 8, 4]
    assert planned_unet_min_size(STRIDES_2D) == [4, 2]
    assert planned_unet_min_size([[1, 1, 1], [2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 1, 2]]) == [16, 8, 4]
    assert planned_unet_min_size(default_topology(3)[1]) == [8, 8, 8]
    with pytest.raises(ValueError, match=r"strides\[1\] must have 3 values"):
        planned_unet_min_size([[1, 1, 1], [2, 2]])
    with pytest.raises(ValueError, match="'strides' must be a non-empty list"):
        planned_unet_min_size([])


def test_patches_that_are_multiples_of_min_size_run_in_training_and_sliding_window() -> None:
    torch.manual_seed(0)
    net = planned(3)
    minimum = planned_unet_min_size(STRIDES_3D)
    patch = [2 * m for m in minimum]
    assert tuple(net.train()(torch.randn(1, 1, *patch)).shape) == (1, 2, *patch)
    volume = torch.randn(1, 1, 21, 18, 11)  # not a multiple: sliding window pads every ROI to the patch size
    with torch.no_grad():
        y = sliding_window_inference(
            volume, roi_size=patch, sw_batch_size=2, predictor=net.eval(), overlap=0.25
        )
    assert tuple(y.shape) == (1, 2, 21, 18, 11)


def test_default_topology_is_four_isotropic_levels() -> None:
    kernels, strides = default_topology(2)
    assert kernels == [[3, 3]] * 4 and strides == [[1, 1]] + [[2, 2]] * 3
    net = create_model("planned_unet", 3, 1, 2, features=4)
    assert len(net.downsamples) == 2  # levels 1..2; level 3 is the bottleneck
    assert tuple(net(torch.randn(1, 1, 16, 16, 16)).shape) == (1, 2, 16, 16, 16)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"strides": STRIDES_3D[:3]}, r"'kernels' has 4 levels but 'strides' has 3"),
        ({"kernels": [[3, 3, 1], [3, 3], [3, 3, 3], [3, 3, 3]]}, r"kernels\[1\] must have 3 values"),
        ({"strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2]]}, r"strides\[3\] must have 3 values"),
        ({"kernels": [[3, 3, 1], [3, 3, 1], [3, 2, 3], [3, 3, 3]]}, r"kernels\[2\] must be odd"),
        ({"strides": [[2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]]}, r"strides\[0\] must be all 1"),
        (
            {"strides": [[1, 1, 1], [2, 2, 1.5], [2, 2, 2], [2, 2, 2]]},
            r"strides\[1\] must hold positive ints",
        ),
        ({"strides": [[1, 1, 1], [2, 2, 3], [2, 2, 2], [2, 2, 2]]}, r"strides\[1\]=\[2, 2, 3\] is too large"),
        (
            {"kernels": KERNELS_3D[:2], "strides": STRIDES_3D[:2]},
            "'kernels'/'strides' need at least 3 levels",
        ),
        ({"strides": None}, "give both 'kernels' and 'strides'"),
        ({"kernels": "3x3x3"}, "'kernels' must be a non-empty list"),
        ({"features": 0}, "'features' must be a positive int"),
        ({"max_features": 2}, r"'max_features' \(2\) must be >= 'features' \(4\)"),
        ({"norm": "layer"}, "unknown norm 'layer'"),
        ({"act": "sparkle"}, "unknown act 'sparkle'"),
        ({"dropout": 1.0}, "'dropout' must be a float"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        planned(3, **options)
    text = str(info.value)
    assert text.startswith("Model 'planned_unet': ") and "\n" not in text


def test_deep_supervision_is_refused_until_the_losses_take_it() -> None:
    with pytest.raises(ValueError, match="deep_supervision=True is not wired into medseg's losses"):
        planned(3, deep_supervision=True)
    assert isinstance(planned(3, deep_supervision=False), nn.Module)


def test_monai_deep_supervision_output_matches_the_documented_form() -> None:
    """The builder docstring's account of DynUNet's stacked train output; wiring it later relies on it."""
    torch.manual_seed(0)
    net = DynUNet(
        3,
        1,
        2,
        kernel_size=KERNELS_3D,
        strides=STRIDES_3D,
        upsample_kernel_size=STRIDES_3D[1:],
        filters=[4, 8, 16, 32],
        deep_supervision=True,
        deep_supr_num=2,
    )
    x = torch.randn(2, 1, 16, 16, 8)
    stacked = net.train()(x)
    assert tuple(stacked.shape) == (2, 3, 2, 16, 16, 8)  # (B, 1 + heads, C, *S), heads resized to S
    full = net.eval()(x)
    assert tuple(full.shape) == (2, 2, 16, 16, 8)
    assert torch.allclose(stacked[:, 0], full, atol=1e-6)  # index 0 is the full-resolution output


def test_parameter_count_grows_with_features_and_max_features_caps_widths() -> None:
    counts = [n_params(planned(3, features=f)) for f in (2, 4, 8)]
    assert counts[0] < counts[1] < counts[2]
    assert n_params(planned(3, features=4, max_features=8)) < n_params(planned(3, features=4))
    assert planned(3, features=4, max_features=8).filters == [4, 8, 8, 8]
    assert planned_unet_widths(6, 32, 320) == [32, 64, 128, 256, 320, 320]


@pytest.mark.parametrize(("spatial_dims", "cap"), [(2, 512), (3, 320)])
def test_default_width_cap_follows_nnunet(spatial_dims: int, cap: int) -> None:
    kernels, strides = default_topology(spatial_dims, levels=5)
    net = create_model("planned_unet", spatial_dims, 1, 2, kernels=kernels, strides=strides, features=64)
    assert net.filters == [64, 128, 256, min(512, cap), cap]


def test_norm_and_act_defaults_are_nnunet_and_options_apply() -> None:
    net = planned(3)
    norms = [m for m in net.modules() if isinstance(m, nn.modules.instancenorm._InstanceNorm)]
    assert norms and all(m.affine for m in norms)
    slopes = {m.negative_slope for m in net.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.01}
    batch = planned(3, norm="batch", act="elu")
    assert any(isinstance(m, nn.BatchNorm3d) for m in batch.modules())
    assert not any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in batch.modules())
    assert any(isinstance(m, nn.ELU) for m in batch.modules())
    plain = planned(3, norm=("instance", {"affine": False}))
    assert not any(m.affine for m in plain.modules() if isinstance(m, nn.modules.instancenorm._InstanceNorm))


def test_trains_and_validates_through_the_cli(seg3d_root: Path, tmp_path: Path) -> None:
    """One fit step plus validation (sliding window) with the network swapped for a planned topology."""
    from medseg.lightning_cli import MedSegCLI

    network_args = {"kernels": KERNELS_3D, "strides": STRIDES_3D, "features": 4}
    cli = MedSegCLI(
        args=[
            "fit", "--config", str(CONFIGS / "seg3d_unet.yaml"), "--data.root", str(seg3d_root),
            "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.accelerator", "cpu", "--model.init_args.network", "planned_unet",
            "--model.init_args.network_args", json.dumps(network_args),
        ]
    )  # fmt: skip
    assert isinstance(cli.model.net, DynUNet)
    patch = cli.datamodule.patch_size
    assert all(p % m == 0 for p, m in zip(patch, planned_unet_min_size(STRIDES_3D), strict=True))
    assert cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_step"])
    assert "val/dice" in cli.trainer.callback_metrics
