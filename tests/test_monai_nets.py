"""MONAI networks behind medseg's options: dynunet (planned_unet's topology, deep supervision), segresnet,
swin_unetr (its patch-size and width constraints refused in one line) and densenet121; one learns, each family
predicts through ``medseg predict`` and exports."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medseg.cli import main
from medseg.deploy.artifact import read_spec
from medseg.deploy.export import export_model
from medseg.errors import ConfigError
from medseg.lightning_cli import MedSegCLI
from medseg.models import create_model
from medseg.models.monai_nets import densenet_widths
from medseg.models.planned_unet import default_topology
from medseg.models.swin_unetr import swin_roi_problem
from medseg.resume import saved_checkpoint

CONFIGS = Path(__file__).parents[1] / "configs"
KERNELS_3D = [[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3]]
STRIDES_3D = [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]]


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# -- dynunet --------------------------------------------------------------------------------------------------


def test_dynunet_deep_supervision_returns_a_list_in_training_and_one_tensor_in_eval() -> None:
    torch.manual_seed(0)
    net = create_model("dynunet", 3, 1, 3, base_channels=4, depth=3, deep_supervision=True, deep_supr_num=2)
    x = torch.randn(2, 1, 16, 16, 16)
    outputs = net.train()(x)
    assert isinstance(outputs, list) and len(outputs) == 3  # full resolution + 2 coarser heads
    assert all(tuple(o.shape) == (2, 3, 16, 16, 16) for o in outputs)
    assert not torch.allclose(outputs[0], outputs[1])  # the heads are different outputs, not copies
    sum(o.pow(2).mean() for o in outputs[1:]).backward()
    heads = [p.grad for p in net.deep_supervision_heads.parameters()]
    assert heads and all(g is not None and g.abs().sum() > 0 for g in heads)
    with torch.no_grad():
        single = net.eval()(x)
    assert isinstance(single, torch.Tensor) and torch.allclose(single, outputs[0].detach(), atol=1e-5)
    plain = create_model("dynunet", 3, 1, 3, base_channels=4, depth=3)
    assert isinstance(plain.train()(x), torch.Tensor)
    with pytest.raises(ValueError, match="deep_supr_num must be between 1 and 2"):
        create_model("dynunet", 3, 1, 3, base_channels=4, depth=3, deep_supervision=True, deep_supr_num=3)


def test_dynunet_deep_supervision_trains_every_head_through_the_cli(seg2d_root: Path, tmp_path: Path) -> None:
    cli = MedSegCLI(args=[
        "fit", "--config", str(CONFIGS / "seg2d_dynunet.yaml"), "--data.root", str(seg2d_root),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu", "--trainer.fast_dev_run", "1",
        "--model.init_args.network_args", '{"base_channels": 4, "depth": 3, "deep_supervision": true, '
        '"deep_supr_num": 2}', "--data.patch_size", "[32, 32]",
    ])
    optimizer = cli.trainer.optimizers[0]
    heads = list(cli.model.net.deep_supervision_heads.parameters())
    assert heads and all(optimizer.state[p] for p in heads)  # the coarser heads had gradients and were stepped
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_step"])
    assert "val/dice" in cli.trainer.callback_metrics


def test_dynunet_takes_planned_unet_topology_and_checks() -> None:
    planned = create_model("planned_unet", 3, 1, 2, kernels=KERNELS_3D, strides=STRIDES_3D, features=4)
    dyn = create_model("dynunet", 3, 1, 2, kernels=KERNELS_3D, strides=STRIDES_3D, channels=[4, 8, 16, 32])
    shapes = {k: tuple(v.shape) for k, v in planned.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in dyn.state_dict().items()} == shapes  # the same network
    assert tuple(dyn(torch.randn(1, 1, 16, 16, 8)).shape) == (1, 2, 16, 16, 8)
    kernels, strides = default_topology(2, 3)
    default = create_model("dynunet", 2, 1, 2, base_channels=4, depth=2)
    assert [list(k) for k in default.kernel_size] == kernels and [list(s) for s in default.strides] == strides
    with pytest.raises(ValueError, match=r"^Model 'dynunet': strides\[0\] must be all 1"):
        create_model("dynunet", 3, 1, 2, kernels=KERNELS_3D, strides=[[2, 2, 1], *STRIDES_3D[1:]])
    with pytest.raises(ValueError, match="depth=2 disagrees with the 4 levels"):
        create_model("dynunet", 3, 1, 2, kernels=KERNELS_3D, strides=STRIDES_3D, depth=2)
    with pytest.raises(ValueError, match=r"one width per level of 'strides' \(4\)"):
        create_model("dynunet", 3, 1, 2, kernels=KERNELS_3D, strides=STRIDES_3D, channels=[4, 8])


def test_dynunet_depth_one_has_an_unstrided_bottleneck() -> None:
    net = create_model("dynunet", 2, 1, 2, channels=[4, 8])
    assert [list(s) for s in net.strides] == [[1, 1], [2, 2], [1, 1]] and net.filters == [4, 8, 8]
    assert tuple(net(torch.randn(2, 1, 6, 10)).shape) == (2, 2, 6, 10)  # inputs only need to be even


# -- segresnet, densenet121 -----------------------------------------------------------------------------------


def test_segresnet_levels_follow_depth_or_blocks_down() -> None:
    net = create_model("segresnet", 3, 1, 2, base_channels=4, depth=2)
    assert len(net.down_layers) == 3 and len(net.up_layers) == 2
    assert [len(layer) - 1 for layer in net.down_layers] == [1, 2, 2]  # residual blocks after the pre-conv
    groups = {m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {4}  # the largest group count <= 8 dividing widths 4, 8, 16
    deep = create_model("segresnet", 2, 1, 2, base_channels=4, blocks_down=[1, 1, 1, 1, 1])
    assert len(deep.down_layers) == 5 and tuple(deep(torch.randn(1, 1, 32, 16)).shape) == (1, 2, 32, 16)
    with pytest.raises(ValueError, match=r"depth=2 disagrees with blocks_down=\[1, 2\]"):
        create_model("segresnet", 2, 1, 2, depth=2, blocks_down=[1, 2])
    with pytest.raises(ValueError, match="blocks_up"):
        create_model("segresnet", 2, 1, 2, depth=2, blocks_up=[1])


def test_densenet121_has_its_blocks_a_growth_rate_and_a_linear_head() -> None:
    net = create_model("densenet121", 2, 1, 3, base_channels=8)
    dense_layers = [n for n, _ in net.features.named_children() if n.startswith("denseblock")]
    assert len(dense_layers) == 4
    assert [len(list(getattr(net.features, n).children())) for n in dense_layers] == [6, 12, 24, 16]
    first = net.features.denseblock1.denselayer1
    assert first.layers.conv2.out_channels == 4  # growth rate defaults to half the stem width
    assert isinstance(net.fc, nn.Linear) and net.fc.out_features == 3
    assert tuple(net(torch.randn(2, 1, 40, 32)).shape) == (2, 3)  # 4 halvings and a stride-2 stem: >= 32
    # every norm layer's width is among those the group count was chosen for
    widths = set(densenet_widths(8, 4, 4, (6, 12, 24, 16)))
    norms = {m.num_features for m in net.modules() if isinstance(m, nn.BatchNorm2d)}
    assert norms <= widths


# -- swin_unetr -----------------------------------------------------------------------------------------------


def test_swin_unetr_refuses_a_patch_it_cannot_take_in_one_line() -> None:
    net = create_model("swin_unetr", 3, 1, 2, depths=(1, 1, 1, 1))
    with pytest.raises(ConfigError) as info:
        net(torch.randn(1, 1, 48, 64, 40))
    message = str(info.value)
    assert "\n" not in message and message.startswith("data.patch_size [48, 64, 40] does not suit swin_unetr")
    assert "multiple of 32" in message and "32, 64" in message
    assert swin_roi_problem([64, 32, 96]) is None and swin_roi_problem([32, 32]) is None
    assert "2D" not in (swin_roi_problem([16, 32]) or "") and "32" in swin_roi_problem([16, 32])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"feature_size": 16}, r"'feature_size' must be a positive multiple of 12 \(MONAI SwinUNETR\), e.g. 12"),
        ({"channels": [12, 24, 48, 96]}, "'channels' must be 5 widths, each double the previous"),
        ({"channels": [12, 24, 48, 96, 192], "feature_size": 12}, "not both"),
        ({"num_heads": (5, 6, 12, 24)}, r"num_heads\[0\]=5 must divide the stage width 12"),
        ({"norm": "layer"}, "unknown norm 'layer'"),
    ],
)
def test_swin_unetr_refuses_bad_widths_naming_the_option(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        create_model("swin_unetr", 3, 1, 2, **options)
    assert str(info.value).startswith("Model 'swin_unetr': ") and "\n" not in str(info.value)


def test_swin_unetr_channels_set_feature_size() -> None:
    wide = create_model("swin_unetr", 2, 1, 2, channels=[24, 48, 96, 192, 384])
    assert wide.swinViT.embed_dim == 24


def test_fit_with_a_swin_unetr_patch_that_does_not_fit_stops_in_one_line(seg3d_root: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    code = main(["fit", "--config", str(CONFIGS / "seg3d_swin_unetr.yaml"), "--data.root", str(seg3d_root),
                 "--data.patch_size", "[48, 48, 32]", "--trainer.default_root_dir", str(tmp_path),
                 "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("medseg fit: data.patch_size [48, 48, 32] does not suit swin_unetr")
    assert not list(tmp_path.rglob("*.ckpt"))


# -- learning, prediction and export --------------------------------------------------------------------------


@pytest.mark.slow
def test_dynunet_learns_the_synthetic_segmentation_task(seg2d_root: Path, tmp_path: Path) -> None:
    cli = MedSegCLI(args=[
        "fit", "--config", str(CONFIGS / "seg2d_dynunet.yaml"), "--data.root", str(seg2d_root),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "20", "--trainer.check_val_every_n_epoch", "5",
        "--model.init_args.network_args", '{"base_channels": 8, "depth": 3}',
        "--model.init_args.optimizer.init_args.lr", "0.01", "--trainer.enable_progress_bar", "false",
        "--data.patch_size", "[48, 48]", "--data.samples_per_volume", "2", "--data.batch_size", "4",
    ])
    best = float(cli.trainer.checkpoint_callback.best_model_score)
    # Two foreground classes on held-out patients; an untrained network scores near 0.
    assert best >= 0.8


def _one_step(config: str, root: Path, out: Path, network_args: dict, *extra: str) -> Path:
    cli = MedSegCLI(args=[
        "fit", "--config", str(CONFIGS / config), "--data.root", str(root), "--trainer.default_root_dir", str(out),
        "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--model.init_args.network_args", json.dumps(network_args), *extra,
    ])
    return Path(saved_checkpoint(cli.trainer))


def _outputs(folder: Path) -> dict[str, np.ndarray]:
    if (folder / "predictions.csv").is_file():
        with (folder / "predictions.csv").open() as handle:
            return {row["case"]: np.array([row["prediction"]]) for row in csv.DictReader(handle)}
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


@pytest.mark.parametrize(
    ("config", "root", "network_args", "extra"),
    [
        ("seg2d_dynunet.yaml", "seg2d_root", {"base_channels": 4, "depth": 2, "deep_supervision": True},
         ["--data.patch_size", "[32, 32]"]),
        pytest.param("seg3d_segresnet.yaml", "seg3d_root", {"base_channels": 4, "depth": 2}, [],
                     marks=pytest.mark.slow),
        pytest.param("seg3d_swin_unetr.yaml", "seg3d_root", {"feature_size": 12, "depths": [1, 1, 1, 1]}, [],
                     marks=pytest.mark.slow),
        pytest.param("cls2d_densenet121.yaml", "cls2d_root", {"base_channels": 4},
                     ["--data.patch_size", "[32, 32]"], marks=pytest.mark.slow),
    ],
    ids=["dynunet", "segresnet", "swin_unetr", "densenet121"],
)
def test_family_predicts_and_exports(config: str, root: str, network_args: dict, extra: list[str],
                                     request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """One training step; ``medseg predict`` from the checkpoint and from its export give the same outputs."""
    data = request.getfixturevalue(root)
    checkpoint = _one_step(config, data, tmp_path / "runs", network_args, *extra)
    model = export_model([checkpoint], tmp_path / "model", formats="both", bundle=False)
    assert read_spec(model)["members"][0]["onnx_max_abs_diff"] <= 1e-4
    images = str(data / ("imagesTs" if (data / "imagesTs").is_dir() else "dataset.json"))
    assert main(["predict", "--ckpt", str(checkpoint), "--input", images, "--output", str(tmp_path / "ckpt")]) == 0
    assert main(["predict", "--model", str(model), "--input", images, "--output", str(tmp_path / "export")]) == 0
    from_checkpoint, from_export = _outputs(tmp_path / "ckpt"), _outputs(tmp_path / "export")
    assert from_checkpoint and from_checkpoint.keys() == from_export.keys()
    for name, labels in from_checkpoint.items():
        np.testing.assert_array_equal(labels, from_export[name], err_msg=name)
