"""Deep supervision: the weighted multi-scale loss, networks that return several scales in training only, and a
checkpoint trained that way predicting and exporting through the one full-resolution output."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg.cli import main
from medseg.deploy.artifact import read_spec
from medseg.deploy.export import export_model
from medseg.inference.native import load_model
from medseg.losses import create_loss, deep_supervision_loss, deep_supervision_weights, nearest_resize
from medseg.models import create_model
from medseg.tasks.segmentation import SegmentationModule
from tests.conftest import _one_epoch_checkpoint

NO_TRAINER = r"ignore:You are trying to `self\.log\(\)`"  # training_step called without a Trainer, on purpose


def test_weights_halve_per_scale_and_sum_to_one() -> None:
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    weights = deep_supervision_weights(5)
    assert sum(weights) == pytest.approx(1.0)
    assert all(a == pytest.approx(2 * b) for a, b in zip(weights, weights[1:], strict=False))
    with pytest.raises(ValueError, match="at least one"):
        deep_supervision_weights(0)


def test_nearest_resize_picks_labels_as_torch_nearest_does() -> None:
    labels = torch.arange(16).view(1, 1, 4, 4)
    assert torch.equal(nearest_resize(labels, (2, 2)), torch.tensor([[[[0, 2], [8, 10]]]]))
    assert nearest_resize(labels, (4, 4)) is labels
    torch.manual_seed(0)
    for shape, size in (((2, 1, 5, 7), (3, 2)), ((1, 3, 8, 6, 4), (4, 3, 1)), ((2, 9, 6), (3, 2))):
        target = torch.randint(0, 4, shape)
        got = nearest_resize(target, size)
        assert got.dtype == torch.long  # label maps keep their integer type (torch's interpolate refuses long)
        expected = F.interpolate(target.float().unsqueeze(0) if len(shape) == 3 else target.float(), size=size,
                                 mode="nearest")
        expected = expected[0] if len(shape) == 3 else expected
        assert torch.equal(got, expected.long())
        assert set(got.unique().tolist()) <= set(target.unique().tolist())  # values picked, none made up


def _hand_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over voxels of -log softmax(logits)[true class], written out."""
    log_p = logits - logits.exp().sum(1, keepdim=True).log()
    return -log_p.gather(1, labels).mean()


def test_weighted_loss_equals_a_hand_computation() -> None:
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 1, 4, 4))
    scales = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2), torch.randn(2, 3, 1, 1)]
    by_hand = (4 / 7) * _hand_ce(scales[0], target) + (2 / 7) * _hand_ce(scales[1], target[..., ::2, ::2]) \
        + (1 / 7) * _hand_ce(scales[2], target[..., :1, :1])
    loss = create_loss("ce")
    assert deep_supervision_loss(loss, scales, target).item() == pytest.approx(by_hand.item(), rel=1e-6)
    # one tensor is the plain loss
    assert deep_supervision_loss(loss, scales[0], target).item() == pytest.approx(_hand_ce(scales[0], target).item())
    # equal sizes (UNet++ heads): the target is used as is, the weights still halve
    same = [scales[0], scales[0] * 2]
    expected = (2 / 3) * _hand_ce(same[0], target) + (1 / 3) * _hand_ce(same[1], target)
    assert deep_supervision_loss(loss, same, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_dense_region_targets_are_resized_too() -> None:
    torch.manual_seed(1)
    regions = (torch.rand(1, 2, 4, 4, 4) > 0.5).float()
    scales = [torch.randn(1, 2, 4, 4, 4), torch.randn(1, 2, 2, 2, 2)]
    loss = create_loss("bce")
    expected = (2 / 3) * F.binary_cross_entropy_with_logits(scales[0], regions) \
        + (1 / 3) * F.binary_cross_entropy_with_logits(scales[1], regions[..., ::2, ::2, ::2])
    assert deep_supervision_loss(loss, scales, regions).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(("name", "options", "sizes"), [
    ("unetpp", {"base_channels": 4}, [32, 32, 32, 32]),
    ("unet3plus", {"base_channels": 4, "depth": 3}, [32, 16, 8, 4]),
])
def test_networks_return_every_scale_in_training_and_one_tensor_in_eval(name: str, options: dict,
                                                                       sizes: list[int]) -> None:
    torch.manual_seed(0)
    net = create_model(name, 2, 1, 3, deep_supervision=True, **options)
    x = torch.randn(2, 1, 32, 32)
    outputs = net.train()(x)
    assert isinstance(outputs, list) and [o.shape[-1] for o in outputs] == sizes
    assert all(o.shape[:2] == (2, 3) for o in outputs)
    with torch.no_grad():
        single = net.eval()(x)
    assert isinstance(single, torch.Tensor) and torch.allclose(single, outputs[0], atol=1e-5)  # no dropout/BN
    plain = create_model(name, 2, 1, 3, **options)
    assert isinstance(plain.train()(x), torch.Tensor)
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params > sum(p.numel() for p in plain.parameters())  # the extra heads exist only when asked for


@pytest.mark.filterwarnings(NO_TRAINER)
@pytest.mark.parametrize(("name", "options"), [
    ("unetpp", {"base_channels": 4}),
    ("unet3plus", {"base_channels": 4, "depth": 2}),
])
def test_training_step_uses_every_scale_and_validation_one(name: str, options: dict) -> None:
    torch.manual_seed(0)
    module = SegmentationModule(network=name, network_args={**options, "deep_supervision": True}, spatial_dims=2,
                                num_classes=3, roi_size=[32, 32], loss="ce")
    seen: list[object] = []
    module.net.register_forward_hook(lambda _m, _i, out: seen.append(out))
    batch = {"image": torch.randn(2, 1, 32, 32), "label": torch.randint(0, 3, (2, 1, 32, 32))}
    loss = module.train().training_step(batch, 0)
    outputs = seen[-1]
    assert isinstance(outputs, list) and len(outputs) == (4 if name == "unetpp" else 3)
    label = batch["label"]
    weights = deep_supervision_weights(len(outputs))
    by_hand = sum(w * _hand_ce(o, nearest_resize(label, o.shape[2:])) for w, o in zip(weights, outputs, strict=True))
    assert loss.detach().item() == pytest.approx(float(by_hand.detach()), rel=1e-5)
    loss.backward()
    heads = [p for n, p in module.net.named_parameters() if "final_conv_0_1" in n or "side_heads" in n]
    assert heads and all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)

    seen.clear()
    module.eval()
    with torch.no_grad():
        module.validation_step({**batch, "image": torch.randn(1, 1, 48, 40), "label": torch.zeros(1, 1, 48, 40)}, 0)
        probabilities = module.predict_probabilities(torch.randn(1, 1, 40, 40))
    assert seen and all(isinstance(o, torch.Tensor) and tuple(o.shape[2:]) == (32, 32) for o in seen)
    assert probabilities.shape == (1, 3, 40, 40)


@pytest.fixture(scope="module")
def supervised_checkpoint(seg2d_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2D UNet 3+ trained one step with deep supervision (the shipped config has it on)."""
    return _one_epoch_checkpoint("seg2d_unet3plus.yaml", seg2d_root, tmp_path_factory.mktemp("ds"),
                                 "--data.patch_size", "[32, 32]",
                                 "--model.init_args.network_args",
                                 '{"channels": [4, 8, 16], "deep_supervision": true}')


def test_deep_supervision_checkpoint_predicts_and_exports(supervised_checkpoint: Path, seg2d_root: Path,
                                                          tmp_path: Path) -> None:
    loaded = load_model(supervised_checkpoint)
    assert loaded.hparams["network_args"]["deep_supervision"] is True and len(loaded.net.side_heads) == 2
    images = sorted((seg2d_root / "imagesTr").glob("*.nii.gz"))[:2]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for image in images:
        (inputs / image.name).symlink_to(image)
    assert main(["predict", "--ckpt", str(supervised_checkpoint), "--input", str(inputs),
                 "--output", str(tmp_path / "pred")]) == 0
    for image in images:
        source, written = nib.load(image), nib.load(tmp_path / "pred" / image.name)
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
        assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= {0, 1, 2}
    out = export_model([supervised_checkpoint], tmp_path / "model", formats="both", bundle=False)
    member = read_spec(out)["members"][0]
    assert member["onnx_max_abs_diff"] <= 1e-4
    assert main(["predict", "--model", str(out), "--input", str(inputs), "--output", str(tmp_path / "pred_ts")]) == 0
    for image in images:
        np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "pred" / image.name).dataobj),
                                      np.asarray(nib.load(tmp_path / "pred_ts" / image.name).dataobj))
