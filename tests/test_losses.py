"""Tests for medseg.losses: every registered loss, known values, torch/MONAI references, refused options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai import losses as monai_losses

from medseg.losses import create_loss, list_losses

TOL = {"atol": 1e-6, "rtol": 1e-6}
SIGMOID_LOSSES = {"bce", "dice_bce"}


def _close(actual: torch.Tensor, expected: torch.Tensor | float) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), **TOL)


def _seg(shape: tuple[int, ...], num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits ``(B, C, *spatial)`` and a label map ``(B, 1, *spatial)`` with values 0..C-1."""
    gen = torch.Generator().manual_seed(seed)
    batch, spatial = shape[0], shape[1:]
    logits = torch.randn(batch, num_classes, *spatial, generator=gen)
    labels = torch.randint(0, max(num_classes, 2), (batch, 1, *spatial), generator=gen)
    return logits, labels


def test_list_losses_names() -> None:
    assert list_losses() == sorted(["dice", "bce", "ce", "dice_ce", "dice_bce", "focal"])


@pytest.mark.parametrize("name", list_losses())
@pytest.mark.parametrize("spatial", [(6, 5), (4, 5, 3)], ids=["2d", "3d"])
def test_every_loss_finite_scalar_and_grads(name: str, spatial: tuple[int, ...]) -> None:
    num_classes = 3
    logits, labels = _seg((2, *spatial), num_classes)
    logits.requires_grad_(True)
    value = create_loss(name)(logits, labels)
    assert value.shape == () and torch.isfinite(value)
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["bce", "dice_bce", "dice", "focal"])
def test_single_sigmoid_channel_binary_segmentation(name: str) -> None:
    logits, labels = _seg((2, 7, 6), 1)  # labels in {0, 1}: 1 is foreground of the single channel
    logits.requires_grad_(True)
    value = create_loss(name, activation="sigmoid")(logits, labels)
    value.backward()
    assert value.shape == () and torch.isfinite(value) and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- known values


def test_perfect_prediction_gives_zero() -> None:
    logits, labels = _seg((2, 6, 5), 3)
    perfect = 100.0 * F.one_hot(labels[:, 0], 3).movedim(-1, 1).float()
    for name in ("dice", "ce", "dice_ce", "focal"):
        assert create_loss(name)(perfect, labels).item() < 1e-5, name
    onehot = F.one_hot(labels[:, 0], 3).movedim(-1, 1).float()
    for name in ("bce", "dice_bce"):
        assert create_loss(name)(200.0 * onehot - 100.0, labels).item() < 1e-5, name


@pytest.mark.parametrize("num_classes", [2, 5])
def test_uniform_logits(num_classes: int) -> None:
    logits, labels = _seg((2, 4, 4), num_classes)
    uniform = torch.zeros_like(logits)
    _close(create_loss("ce")(uniform, labels), math.log(num_classes))
    _close(create_loss("bce")(uniform, labels), math.log(2.0))  # sigmoid(0) = 1/2 for every term


def test_dice_by_hand_softmax() -> None:
    # One 2x2 image, 2 classes, zero logits -> softmax p = 0.5 everywhere.
    logits = torch.zeros(1, 2, 2, 2)
    labels = torch.tensor([[[[0, 1], [1, 1]]]])
    # class 0: g = [1,0,0,0]; sum(p*g) = 0.5, sum(p) = 2, sum(g) = 1 -> dice = 2*0.5/(2+1) = 1/3 -> loss 2/3
    # class 1: g = [0,1,1,1]; sum(p*g) = 1.5, sum(p) = 2, sum(g) = 3 -> dice = 2*1.5/(2+3) = 3/5 -> loss 2/5
    _close(create_loss("dice", smooth=0.0)(logits, labels), (2 / 3 + 2 / 5) / 2)  # = 8/15
    _close(create_loss("dice", smooth=0.0, include_background=False)(logits, labels), 2 / 5)
    # class weights scale each class's loss before the mean: (1 * 2/3 + 3 * 2/5) / 2 = 14/15
    _close(create_loss("dice", smooth=0.0, class_weights=[1.0, 3.0])(logits, labels), 14 / 15)


def test_dice_by_hand_sigmoid_single_channel() -> None:
    # logits ln3, 0, -ln3, 0 -> sigmoid p = 3/4, 1/2, 1/4, 1/2; foreground g = 1, 1, 0, 0
    ln3 = math.log(3.0)
    logits = torch.tensor([[[[ln3, 0.0], [-ln3, 0.0]]]])
    labels = torch.tensor([[[[1, 1], [0, 0]]]])
    # sum(p*g) = 3/4 + 1/2 = 5/4; sum(p) = 2; sum(g) = 2 -> dice = (5/2)/4 = 5/8 -> loss 3/8
    _close(create_loss("dice", activation="sigmoid", smooth=0.0)(logits, labels), 3 / 8)


# ---------------------------------------------------------------- references


@pytest.mark.parametrize("weights", [None, [0.2, 1.0, 3.0]])
def test_ce_matches_torch(weights: list[float] | None) -> None:
    loss = create_loss("ce", class_weights=weights)
    w = None if weights is None else torch.tensor(weights)
    logits, labels = _seg((2, 5, 4, 3), 3, seed=1)  # 3D segmentation
    _close(loss(logits, labels), F.cross_entropy(logits, labels[:, 0], weight=w))
    _close(loss(logits, labels[:, 0]), F.cross_entropy(logits, labels[:, 0], weight=w))  # (B, *spatial) too
    cls_logits, cls_labels = torch.randn(8, 3), torch.tensor([0, 1, 2, 2, 1, 0, 0, 2])  # classification
    _close(loss(cls_logits, cls_labels), F.cross_entropy(cls_logits, cls_labels, weight=w))
    probs = torch.softmax(torch.randn(8, 3), 1)  # dense class-probability target
    _close(loss(cls_logits, probs), F.cross_entropy(cls_logits, probs, weight=w))


def test_bce_matches_torch_with_class_and_pos_weights() -> None:
    logits, labels = _seg((2, 6, 5), 3, seed=2)
    onehot = F.one_hot(labels[:, 0], 3).movedim(-1, 1).float()
    _close(create_loss("bce")(logits, labels), F.binary_cross_entropy_with_logits(logits, onehot))
    w, p = [0.5, 1.0, 2.0], [1.0, 3.0, 4.0]
    expected = F.binary_cross_entropy_with_logits(
        logits, onehot, weight=torch.tensor(w).view(1, 3, 1, 1), pos_weight=torch.tensor(p).view(3, 1, 1)
    )
    _close(create_loss("bce", class_weights=w, pos_weight=p)(logits, labels), expected)
    multi_hot = (torch.rand(2, 3, 6, 5) > 0.5).float()  # multi-label target given dense
    _close(create_loss("bce")(logits, multi_hot), F.binary_cross_entropy_with_logits(logits, multi_hot))
    # classification: multi-label (B, C) float, and single-logit binary (B, 1) with (B,) labels
    cls_logits, cls_target = torch.randn(6, 4), (torch.rand(6, 4) > 0.5).float()
    _close(
        create_loss("bce")(cls_logits, cls_target), F.binary_cross_entropy_with_logits(cls_logits, cls_target)
    )
    bin_logits, bin_labels = torch.randn(6, 1), torch.tensor([0, 1, 1, 0, 1, 0])
    _close(
        create_loss("bce")(bin_logits, bin_labels),
        F.binary_cross_entropy_with_logits(bin_logits[:, 0], bin_labels.float()),
    )


@pytest.mark.parametrize("include_background", [True, False])
def test_dice_matches_monai(include_background: bool) -> None:
    logits, labels = _seg((2, 5, 4, 3), 4, seed=3)
    ref = monai_losses.DiceLoss(to_onehot_y=True, softmax=True, include_background=include_background)
    _close(create_loss("dice", include_background=include_background)(logits, labels), ref(logits, labels))
    ref_sig = monai_losses.DiceLoss(to_onehot_y=True, sigmoid=True)
    _close(create_loss("dice", activation="sigmoid")(logits, labels), ref_sig(logits, labels))


@pytest.mark.parametrize("include_background", [True, False])
def test_dice_ce_is_dice_plus_ce_and_matches_monai(include_background: bool) -> None:
    logits, labels = _seg((2, 6, 5), 3, seed=4)
    w = [0.5, 1.0, 2.0]
    dice_w = w if include_background else w[1:]  # MONAI's Dice weights cover only the channels it scores
    dice = monai_losses.DiceLoss(
        to_onehot_y=True, softmax=True, weight=dice_w, include_background=include_background
    )(logits, labels)
    ce = F.cross_entropy(logits, labels[:, 0], weight=torch.tensor(w))
    loss = create_loss(
        "dice_ce", class_weights=w, include_background=include_background, lambda_dice=0.3, lambda_ce=2.0
    )
    value = loss(logits, labels)
    _close(value, 0.3 * dice + 2.0 * ce)
    ref = monai_losses.DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        include_background=include_background,
        weight=torch.tensor(w),
        lambda_dice=0.3,
        lambda_ce=2.0,
    )
    _close(value, ref(logits, labels))


def test_dice_bce_is_dice_plus_bce() -> None:
    logits, labels = _seg((2, 6, 5), 3, seed=5)
    onehot = F.one_hot(labels[:, 0], 3).movedim(-1, 1).float()
    dice = monai_losses.DiceLoss(sigmoid=True, include_background=False)(logits, onehot)
    bce = F.binary_cross_entropy_with_logits(logits, onehot)
    _close(create_loss("dice_bce", include_background=False, lambda_ce=0.5)(logits, labels), dice + 0.5 * bce)


def test_focal_softmax_hand_formula_and_gamma0_is_ce() -> None:
    logits, labels = _seg((2, 6, 5), 3, seed=6)
    p_true = torch.softmax(logits, 1).gather(1, labels)  # p_t, (B, 1, H, W)
    expected = (-((1 - p_true) ** 2) * torch.log(p_true)).mean()  # focal with gamma = 2
    _close(create_loss("focal", gamma=2.0)(logits, labels), expected)
    w = [0.2, 1.0, 3.0]
    _close(
        create_loss("focal", gamma=0.0, class_weights=w)(logits, labels),
        F.cross_entropy(logits, labels[:, 0], weight=torch.tensor(w)),
    )
    cls_logits, cls_labels = torch.randn(8, 3), torch.tensor([0, 1, 2, 2, 1, 0, 0, 2])
    _close(create_loss("focal", gamma=0.0)(cls_logits, cls_labels), F.cross_entropy(cls_logits, cls_labels))


def test_focal_sigmoid_matches_monai() -> None:
    logits, labels = _seg((2, 6, 5), 3, seed=7)
    onehot = F.one_hot(labels[:, 0], 3).movedim(-1, 1).float()
    w = [0.5, 1.0, 2.0]
    ref = monai_losses.FocalLoss(gamma=1.5, weight=w, use_softmax=False)(logits, onehot)
    _close(create_loss("focal", activation="sigmoid", gamma=1.5, class_weights=w)(logits, labels), ref)


# ---------------------------------------------------------------- refused inputs


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown loss 'dic'.*dice, dice_bce, dice_ce"):
        create_loss("dic")


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("dice", {"gama": 2.0}, r"does not take option\(s\) \['gama'\]; its options: activation"),
        ("dice", {"gamma": 2.0}, r"does not take option\(s\) \['gamma'\]"),
        ("ce", {"include_background": False}, "does not take"),
        (
            "dice",
            {"softmax": True, "sigmoid": True},
            "not MONAI-style softmax=/sigmoid= flags; softmax and sigmoid also contradict",
        ),
        ("dice", {"activation": "relu"}, "activation must be one of"),
        ("ce", {"activation": "sigmoid"}, "use 'bce'"),
        ("bce", {"activation": "softmax"}, "use 'ce'"),
        ("dice_ce", {"activation": "sigmoid"}, "use 'dice_bce'"),
        ("dice_bce", {"activation": "softmax"}, "use 'dice_ce'"),
        (
            "bce",
            {"class_weights": [1.0, 2.0], "num_classes": 3},
            "class_weights has 2 entries but num_classes=3",
        ),
        ("ce", {"class_weights": [1.0, -2.0]}, "must be finite and >= 0"),
        ("ce", {"num_classes": 1}, "softmax needs >= 2 classes"),
        ("focal", {"gamma": -1.0}, "gamma must be >= 0"),
        ("dice", {"smooth": -1.0}, "smooth must be >= 0"),
        ("dice_ce", {"lambda_dice": -1.0}, "must be >= 0 and not both 0"),
        ("dice_bce", {"lambda_dice": 0.0, "lambda_ce": 0.0}, "not both 0"),
    ],
)
def test_contradictory_options_refused_at_construction(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_loss(name, **kwargs)


def test_call_time_errors_are_clear() -> None:
    logits, labels = _seg((2, 6, 5), 3)
    with pytest.raises(ValueError, match="class_weights has 2 entries but logits have 3 channels"):
        create_loss("bce", class_weights=[1.0, 2.0])(logits, labels)
    with pytest.raises(ValueError, match="softmax over channels.*1 channel.*activation='sigmoid'"):
        create_loss("dice_ce")(logits[:, :1], labels.clamp(max=0))
    with pytest.raises(ValueError, match="Dice losses are for segmentation.*use 'ce'"):
        create_loss("dice")(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"label map values must be in 0..2.*found 0..3"):
        create_loss("ce")(logits, labels.clamp(max=2) + (labels == 2).long())
    with pytest.raises(ValueError, match="non-integer"):
        create_loss("ce")(logits, labels.float() + 0.5)
    with pytest.raises(ValueError, match="does not fit logits"):
        create_loss("ce")(logits, labels[:, :, :3])
    with pytest.raises(ValueError, match="target has 2 channels but logits have 3"):
        create_loss("dice")(logits, labels.repeat(1, 2, 1, 1))
    with pytest.raises(ValueError, match="logits have 3 channels but num_classes=4"):
        create_loss("focal", num_classes=4)(logits, labels)
    with pytest.raises(ValueError, match="include_background=False.*only 1 channel"):
        create_loss("dice", activation="sigmoid", include_background=False)(
            logits[:, :1], labels.clamp(max=1)
        )
