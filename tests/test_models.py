"""Registry-driven tests for medseg.models: every registered model is checked the day it is registered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from medseg.models import (
    create_model,
    freeze_encoder,
    get_model_spec,
    list_models,
    load_pretrained,
    model_kwargs,
    model_task,
    unfreeze,
)

MODELS = list_models()
SHARED_OPTIONS = ("channels", "depth", "base_channels", "norm", "act", "dropout")
WIDTH_OPTIONS = ("base_channels", "features")  # top-level width, by the names models take it
SIZE = 32  # divisible by 2**4 (unetpp) with > 1 voxel at its bottleneck (instance norm)


def tiny(name: str, **overrides: Any) -> dict[str, Any]:
    """Smallest sensible options for ``name``: base width 4 and depth 2 where the model takes them."""
    accepted = model_kwargs(name)
    kwargs: dict[str, Any] = {}
    for width in WIDTH_OPTIONS:
        if width in accepted:
            kwargs[width] = 4
    if "depth" in accepted:
        kwargs["depth"] = 2
    kwargs.update(overrides)
    return kwargs


def build(
    name: str, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2, **kw: Any
) -> nn.Module:
    return create_model(name, spatial_dims, in_channels, out_channels, **tiny(name, **kw))


def sample(spatial_dims: int = 2, in_channels: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, in_channels, *([SIZE] * spatial_dims))


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def expected_shape(name: str, x: torch.Tensor, out_channels: int) -> tuple[int, ...]:
    if model_task(name) in ("segmentation", "multitask"):  # a multitask network's forward segments
        return (x.shape[0], out_channels, *x.shape[2:])
    return (x.shape[0], out_channels)


def test_registry_lists_models_by_task() -> None:
    seg, cls, mtl = list_models("segmentation"), list_models("classification"), list_models("multitask")
    assert {"unet", "unetpp", "attention_unet", "planned_unet"} <= set(seg)
    assert {"cnn3d", "resnet18", "resnet34", "resnet50"} <= set(cls)
    assert "multitask_unet" in mtl
    assert sorted(seg + cls + mtl) == MODELS
    assert all(model_task(n) == "segmentation" for n in seg)
    with pytest.raises(ValueError, match="Valid tasks"):
        list_models("detection")


@pytest.mark.parametrize("name", MODELS)
def test_shared_options_are_accepted_or_explained(name: str) -> None:
    spec = get_model_spec(name)
    for option in SHARED_OPTIONS:
        assert option in spec.kwargs or spec.unsupported.get(option), (
            f"{name}: '{option}' neither taken nor explained"
        )


@pytest.mark.parametrize("in_channels", [1, 2])
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name: str, spatial_dims: int, in_channels: int) -> None:
    torch.manual_seed(0)
    if spatial_dims not in get_model_spec(name).dims:
        with pytest.raises(ValueError, match=f"spatial_dims={spatial_dims} is not supported"):
            build(name, spatial_dims, in_channels, out_channels=3)
        return
    net = build(name, spatial_dims, in_channels, out_channels=3)
    x = sample(spatial_dims, in_channels)
    y = net(x)
    assert isinstance(y, torch.Tensor)
    assert tuple(y.shape) == expected_shape(name, x, 3)
    assert torch.isfinite(y).all()
    if model_task(name) == "multitask":  # the class head is not on forward's path: train both outputs
        y, classes = net.forward_with_class(x)
        assert tuple(classes.shape) == (x.shape[0], 2) and torch.isfinite(classes).all()
        y = torch.cat([y.flatten(), classes.flatten()])
    y.float().pow(2).mean().backward()
    for pname, param in net.named_parameters():
        assert param.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient for {pname}"


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="Unknown model 'vnet-xl'") as info:
        create_model("vnet-xl", 3, 1, 2)
    for name in MODELS:
        assert name in str(info.value)


def test_name_is_case_insensitive() -> None:
    assert isinstance(create_model("UNet", 2, 1, 2, **tiny("unet")), nn.Module)


@pytest.mark.parametrize("name", MODELS)
def test_unknown_option_names_model_and_options(name: str) -> None:
    with pytest.raises(ValueError, match=f"Model '{name}' got unknown option") as info:
        build(name, chanels=(4, 8))
    for option in model_kwargs(name):
        assert option in str(info.value)


@pytest.mark.parametrize("name", [n for n in MODELS if get_model_spec(n).unsupported])
def test_unsupported_options_raise_with_reason(name: str) -> None:
    for option, reason in get_model_spec(name).unsupported.items():
        with pytest.raises(ValueError, match=f"'{name}' does not support option '{option}'") as info:
            create_model(name, 2, 1, 2, **{option: 1})
        assert reason in str(info.value)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="spatial_dims"):
        create_model("unet", 4, 1, 2)
    with pytest.raises(ValueError, match="out_channels"):
        create_model("unet", 2, 1, 0)
    with pytest.raises(ValueError, match="disagrees"):
        create_model("unet", 2, 1, 2, channels=(4, 8, 16), depth=3)
    with pytest.raises(ValueError, match="not both"):
        create_model("cnn3d", 2, 1, 2, channels=(4, 8), base_channels=4)
    with pytest.raises(ValueError, match="5 or 6 widths"):
        create_model("unetpp", 2, 1, 2, channels=(4, 8, 16))
    with pytest.raises(ValueError, match="4 stage widths"):
        create_model("resnet18", 2, 1, 2, channels=(4, 8))
    with pytest.raises(ValueError, match="num_groups=3"):
        create_model("unet", 2, 1, 2, channels=(4, 8), norm=("group", {"num_groups": 3}))


@pytest.mark.parametrize("name", [n for n in MODELS if "act" in model_kwargs(n)])
def test_act_option_changes_modules(name: str) -> None:
    for act, layer in (("leakyrelu", nn.LeakyReLU), ("ELU", nn.ELU), ("PReLU", nn.PReLU)):
        net = build(name, act=act)
        assert any(isinstance(m, layer) for m in net.modules()), f"{name}: no {layer.__name__} for act={act}"
    net = build(name, act="leakyrelu")
    assert not any(type(m) is nn.ReLU for m in net.modules()), f"{name}: ReLU left after act='leakyrelu'"
    with pytest.raises(ValueError, match="Valid: relu, leakyrelu"):
        build(name, act="sparkle")


@pytest.mark.parametrize("name", [n for n in MODELS if "norm" in model_kwargs(n)])
def test_norm_option_changes_modules(name: str) -> None:
    batch_norms = nn.modules.batchnorm._BatchNorm
    for norm, layer in (("batch", batch_norms), ("instance", nn.modules.instancenorm._InstanceNorm)):
        net = build(name, norm=norm)
        assert any(isinstance(m, layer) for m in net.modules()), (
            f"{name}: no {layer.__name__} for norm={norm}"
        )
    net = build(name, norm="Group")
    assert any(isinstance(m, nn.GroupNorm) for m in net.modules())
    assert not any(isinstance(m, batch_norms) for m in net.modules()), (
        f"{name}: batch norm left with norm=group"
    )
    assert tuple(net(sample()).shape) == expected_shape(name, sample(), 2)
    with pytest.raises(ValueError, match="Valid: batch, instance, group"):
        build(name, norm="weight")


@pytest.mark.parametrize("name", [n for n in MODELS if "dropout" in model_kwargs(n)])
def test_dropout_option_adds_dropout(name: str) -> None:
    def rates(net: nn.Module) -> set[float]:
        return {m.p for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd)}

    assert 0.3 not in rates(build(name))
    assert 0.3 in rates(build(name, dropout=0.3))
    with pytest.raises(ValueError, match="dropout"):
        build(name, dropout=1.5)


@pytest.mark.parametrize("name", MODELS)
def test_depth_and_width_change_parameter_count(name: str) -> None:
    accepted = model_kwargs(name)
    assert "channels" in accepted or get_model_spec(name).unsupported.get("channels")
    widths = [option for option in ("channels", *WIDTH_OPTIONS) if option in accepted]
    assert widths, f"{name}: no option sets its widths"
    if "depth" in accepted:
        assert n_params(build(name, depth=1)) < n_params(build(name, depth=2))
    for width in set(widths) & set(WIDTH_OPTIONS):
        assert n_params(build(name, **{width: 4})) < n_params(build(name, **{width: 8}))


@pytest.mark.parametrize(
    ("name", "depth", "channels"),
    [
        ("unet", 2, (4, 8, 16)),
        ("attention_unet", 3, (4, 8, 16, 32)),
        ("cnn3d", 1, (4, 8)),
        ("unetpp", None, (4, 8, 16, 32, 64)),
        ("resnet18", None, (4, 8, 16, 32)),
    ],
)
def test_base_channels_scheme_matches_explicit_channels(
    name: str, depth: int | None, channels: tuple[int, ...]
) -> None:
    scheme = {"base_channels": 4} if depth is None else {"base_channels": 4, "depth": depth}
    assert n_params(create_model(name, 2, 1, 2, **scheme)) == n_params(
        create_model(name, 2, 1, 2, channels=channels)
    )
    assert n_params(create_model(name, 2, 1, 2, channels=channels)) != n_params(
        create_model(name, 2, 1, 2, channels=tuple(2 * c for c in channels))
    )


# ------------------------------------------------------------------------------------------------------------
# load_pretrained
# ------------------------------------------------------------------------------------------------------------


def outputs_equal(a: nn.Module, b: nn.Module) -> bool:
    x = sample()
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.mark.parametrize("name", MODELS)
def test_load_pretrained_round_trip(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build(name)
    with torch.no_grad():
        source.train()(sample())  # move running statistics away from their initial values
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    target = build(name)
    assert not outputs_equal(source, target)
    report = load_pretrained(target, path, strict=True)
    assert report["skipped"] == [] and report["missing"] == []
    assert sorted(report["loaded"]) == sorted(source.state_dict())
    assert outputs_equal(source, target)


@pytest.mark.parametrize("name", MODELS)
def test_load_pretrained_lightning_checkpoint(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build(name)
    state = {f"net.{k}": v for k, v in source.state_dict().items()}
    state["loss.class_weight"] = torch.ones(2)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 30}, path)
    torch.manual_seed(1)
    target = build(name)
    report = load_pretrained(target, path)
    assert report["skipped"] == ["loss.class_weight"] and report["missing"] == []
    assert outputs_equal(source, target)


@pytest.mark.parametrize("name", MODELS)
def test_load_pretrained_skips_mismatched_head(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build(name, out_channels=5)
    path = tmp_path / "other_task.pt"
    torch.save(source.state_dict(), path)
    target = build(name, out_channels=2)
    report = load_pretrained(target, path)
    assert report["skipped"], f"{name}: head with 5 outputs was not skipped"
    assert sorted(report["skipped"]) == sorted(report["missing"])
    assert all("shape" in report["reasons"][k] for k in report["skipped"])
    assert len(report["loaded"]) > len(report["skipped"])
    target_state, source_state = target.state_dict(), source.state_dict()
    for key in report["loaded"]:
        assert torch.equal(target_state[key], source_state[key])
    with pytest.raises(ValueError, match="strict=True"):
        load_pretrained(build(name, out_channels=2), path, strict=True)


def test_load_pretrained_errors_name_the_file(tmp_path: Path) -> None:
    net = build("unet")
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_pretrained(net, missing)
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, unrelated)
    with pytest.raises(ValueError, match="unrelated.pt"):
        load_pretrained(net, unrelated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_pretrained(net, garbage)


# ------------------------------------------------------------------------------------------------------------
# freeze_encoder
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_freeze_encoder_freezes_encoder_only(name: str) -> None:
    torch.manual_seed(0)
    in_channels = 5  # unique width: the only convolution reading 5 channels is the input layer
    net = build(name, in_channels=in_channels, out_channels=2)
    total = n_params(net)
    frozen = freeze_encoder(name, net)
    assert 0 < frozen < total
    assert frozen == sum(p.numel() for p in net.parameters() if not p.requires_grad)
    first = [
        m for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd) and m.in_channels == in_channels
    ]
    assert first and all(not m.weight.requires_grad for m in first), f"{name}: input layer not frozen"
    frozen_modules = get_model_spec(name).encoder(net)
    assert not any(
        isinstance(m, nn.modules.conv._ConvTransposeNd) for e in frozen_modules for m in e.modules()
    )

    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    net(sample(in_channels=in_channels)).pow(2).mean().backward()
    optimizer.step()
    after = dict(net.named_parameters())
    for key, param in after.items():
        if not param.requires_grad:
            assert torch.equal(param, before[key]), f"{name}: frozen {key} changed"
    changed = [k for k, p in after.items() if p.requires_grad and not torch.equal(p, before[k])]
    assert changed, f"{name}: no trainable parameter changed"
    if model_task(name) == "classification":
        assert "fc.weight" in changed
    assert unfreeze(net) == frozen and all(p.requires_grad for p in net.parameters())


def test_cnn_accepts_any_input_size() -> None:
    net = create_model("cnn3d", 3, 1, 4, base_channels=4, depth=3)
    for shape in ((2, 1, 7, 5, 3), (2, 1, 1, 1, 1), (2, 1, 33, 20, 9)):
        assert tuple(net(torch.randn(shape)).shape) == (2, 4)
