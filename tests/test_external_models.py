"""Networks from other packages: ``network: "package.module:callable"`` through fit, predict and export; the
checkpoint's record of where the network came from and the refusal when that module is gone; entry points of
the ``medseg.models`` group (a fake installed distribution on ``sys.path``); ``medseg models``."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medseg.cli import main
from medseg.models import create_model, external, freeze_encoder, get_model_spec, list_models, registry
from medseg.models.segmentation import build_unet

ROOT = Path(__file__).parents[1]
TINY = "tests.plugins.tiny_net:build"


def _config(tmp_path: Path, network: object, network_args: dict | None = None) -> Path:
    """configs/seg2d_unet.yaml with another network, 32x32 patches (the 48x48 test images take several)."""
    config = yaml.safe_load((ROOT / "configs" / "seg2d_unet.yaml").read_text())
    config["model"]["init_args"]["network"] = network
    config["model"]["init_args"]["network_args"] = network_args or {}
    config["data"]["patch_size"] = [32, 32]
    path = tmp_path / "plugin.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _fit(config: Path, root: Path, out: Path) -> int:
    return main(["fit", "--config", str(config), "--data.root", str(root), "--trainer.default_root_dir", str(out),
                 "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                 "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"])


@pytest.fixture(scope="module")
def tiny_checkpoint(seg2d_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``last.ckpt`` of one step of ``medseg fit`` with ``network: tests.plugins.tiny_net:build``."""
    out = tmp_path_factory.mktemp("plugin_fit")
    assert _fit(_config(out, TINY, {"width": 6}), seg2d_root, out / "runs") == 0
    (checkpoint,) = (out / "runs").rglob("last.ckpt")
    return checkpoint


@pytest.fixture(scope="module")
def two_images(seg2d_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("plugin_images")
    for path in sorted((seg2d_root / "imagesTr").glob("*.nii.gz"))[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def test_an_import_path_network_trains_predicts_and_exports(tiny_checkpoint: Path, two_images: Path,
                                                            tmp_path: Path) -> None:
    saved = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["network"] == TINY
    assert saved["hyper_parameters"]["network_args"] == {"width": 6}
    assert tuple(saved["state_dict"]["net.0.weight"].shape) == (6, 1, 3, 3)  # the plugin's net, at its width
    source = saved["medseg_network_source"]
    assert (source["module"], source["callable"], source["distribution"]) == ("tests.plugins.tiny_net", "build", None)

    assert main(["predict", "--ckpt", str(tiny_checkpoint), "--input", str(two_images),
                 "--output", str(tmp_path / "from_ckpt")]) == 0
    # export checks each file against the eager network (at most 1e-4 in logits) and refuses it otherwise
    assert main(["export", "--ckpt", str(tiny_checkpoint), "--out", str(tmp_path / "model"), "--format", "both"]) == 0
    assert {p.name for p in (tmp_path / "model" / "networks").iterdir()} == {"member_0.ts", "member_0.onnx"}
    assert main(["predict", "--model", str(tmp_path / "model"), "--input", str(two_images),
                 "--output", str(tmp_path / "from_model")]) == 0
    for image in sorted(two_images.glob("*.nii.gz")):
        source_image = nib.load(image)
        labels = [nib.load(tmp_path / folder / image.name) for folder in ("from_ckpt", "from_model")]
        assert labels[0].shape == source_image.shape[:2]
        np.testing.assert_allclose(labels[0].affine, source_image.affine, atol=1e-6)
        assert set(np.unique(np.asarray(labels[0].dataobj))) <= {0, 1, 2}
        # the exported TorchScript network predicts what the checkpoint's network predicts
        np.testing.assert_array_equal(np.asarray(labels[0].dataobj), np.asarray(labels[1].dataobj))


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_a_checkpoint_whose_network_module_is_gone_is_refused(tiny_checkpoint: Path, two_images: Path,
                                                              tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    saved = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    gone = "medseg_gone_plugin.nets:build"
    saved["hyper_parameters"]["network"] = gone
    saved["medseg_network_source"] = {"network": gone, "module": "medseg_gone_plugin.nets", "callable": "build",
                                      "distribution": "gone-nets", "version": "0.3"}
    bad = tmp_path / "gone.ckpt"
    torch.save(saved, bad)
    capsys.readouterr()
    assert main(["predict", "--ckpt", str(bad), "--input", str(two_images), "--output", str(tmp_path / "p")]) == 2
    err = _one_line(capsys)
    assert err.startswith(f"medseg predict: {bad}: network '{gone}'"), err
    assert "module 'medseg_gone_plugin.nets' is not importable" in err
    assert "pip install 'gone-nets==0.3'" in err
    assert not (tmp_path / "p").exists() or not list((tmp_path / "p").glob("*.nii.gz"))
    assert main(["export", "--ckpt", str(bad), "--out", str(tmp_path / "model")]) == 2
    err = _one_line(capsys)
    assert str(bad) in err and "medseg_gone_plugin.nets" in err and "pip install" in err
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(("network", "args", "reason"), [
    ("medseg_no_such_plugin:build", {}, "module 'medseg_no_such_plugin' is not importable"),
    ("tests.plugins.tiny_net:buld", {}, "has no 'buld'; did you mean 'tests.plugins.tiny_net:build'?"),
    ("tests.plugins.tiny_net:NOT_CALLABLE", {}, "is a int, not a callable"),
    ("tests.plugins.tiny_net:no_dimensions", {}, "does not take spatial_dims, in_channels, out_channels"),
    ("os:system", {}, "'os' is a standard-library module"),
    (TINY, {"widht": 4}, "has no argument 'widht'; did you mean 'width'?"),
    ("tests.plugins.tiny_net:not_a_network", {}, "returned a str, not a torch.nn.Module"),
])
def test_a_bad_import_path_is_refused_before_training(network: str, args: dict, reason: str, seg2d_root: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, network, args)
    assert _fit(config, seg2d_root, tmp_path / "runs") == 2
    err = _one_line(capsys)
    built = reason.startswith("returned")  # found when the network is built: no line of the config to name
    assert err.startswith(f"medseg fit: network '{network}'" if built else f"medseg fit: {config}: line "), err
    assert reason in err, err
    assert not list((tmp_path / "runs").rglob("*.ckpt")) and not list((tmp_path / "runs").rglob("version_*"))


def test_a_bare_factory_declares_no_encoder() -> None:
    net = create_model(TINY, 3, 2, 3, width=5)
    assert tuple(net(torch.zeros(1, 2, 8, 8, 8)).shape) == (1, 3, 8, 8, 8)
    assert get_model_spec(TINY).kwargs == ("width",)
    with pytest.raises(ValueError, match="declares no encoder"):
        freeze_encoder(TINY, net)


PLUGIN = '''
from torch import nn
from medseg.models import ModelSpec


def build(spatial_dims, in_channels, out_channels, *, width=3):
    """positional dimensions, keyword options: medseg's builder convention"""
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return nn.Sequential(conv(in_channels, width, 3, padding=1), conv(width, out_channels, 1))


def factory(spatial_dims, in_channels, out_channels, width=2):
    """A bare factory."""
    return build(spatial_dims, in_channels, out_channels, width=width)


SPEC = ModelSpec(name="ignored", task="segmentation", builder=build, encoder=lambda net: [net[0]],
                 unsupported={"depth": "two layers"}, description="Tiny plugin network.")
'''


@pytest.fixture
def plugin_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An installed distribution ``tinynets 1.2`` with four ``medseg.models`` entry points (one good spec, one
    factory, one broken, one taking a built-in name), on ``sys.path``; the registry is restored afterwards."""
    (tmp_path / "tinynets_mod.py").write_text(PLUGIN)
    info = tmp_path / "tinynets-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tinynets\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [medseg.models]
        TinySeg = tinynets_mod:SPEC
        tinyfactory = tinynets_mod:factory
        broken = tinynets_mod:missing
        unet = tinynets_mod:factory
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(external, "_LOADED", None)
    yield tmp_path
    sys.modules.pop("tinynets_mod", None)


def test_entry_points_register_names(plugin_distribution: Path) -> None:
    assert {"tinyseg", "tinyfactory"} <= set(list_models("segmentation"))
    assert "broken" not in list_models()
    assert get_model_spec("unet").builder is build_unet  # a plugin cannot take a built-in name
    net = create_model("TinySeg", 2, 1, 3, width=5)
    assert tuple(net(torch.zeros(2, 1, 16, 16)).shape) == (2, 3, 16, 16)
    assert freeze_encoder("tinyseg", net) == 5 * 1 * 3 * 3 + 5  # the spec's encoder: the first conv
    with pytest.raises(ValueError, match="does not support option 'depth': two layers"):
        create_model("tinyseg", 2, 1, 3, depth=2)
    assert create_model("tinyfactory", 3, 1, 2)[0].out_channels == 2  # the factory's default width
    assert external.network_source("tinyseg") == {
        "network": "tinyseg", "entry_point": "TinySeg", "module": "tinynets_mod", "callable": "SPEC",
        "distribution": "tinynets", "version": "1.2"}
    with pytest.raises(ValueError, match=r"Unknown model 'broken' \(entry point 'broken = tinynets_mod:missing' "
                                         r"of tinynets 1.2 was not loaded"):
        create_model("broken", 2, 1, 2)


def _count(cell: str) -> int:
    return int(cell.replace(",", ""))


def test_medseg_models_lists_every_name_with_its_source_and_size(plugin_distribution: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    table = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line and not line.startswith(" ")}
    for name in ("unet", "unetpp", "resnet18", "cnn3d", "tinyseg", "tinyfactory"):
        assert name in table, name
    unet = table["unet"]
    assert unet[1:4] == ["medseg", "segmentation", "2D/3D"]
    for dims, cell in ((2, unet[4]), (3, unet[5])):
        assert _count(cell) == sum(p.numel() for p in create_model("unet", dims, 1, 2).parameters())
    assert table["resnet18"][2] == "classification"
    tiny = table["tinyseg"]
    assert tiny[1:5] == ["tinynets", "1.2", "segmentation", "2D/3D"]
    assert _count(tiny[5]) == (1 * 3 * 9 + 3) + (3 * 2 + 2)  # conv 3x3 to width 3, conv 1x1 to 2 outputs
    assert _count(tiny[6]) == (1 * 3 * 27 + 3) + (3 * 2 + 2)
    left_out = out[out.index("left out"):]
    assert re.search(r"broken: entry point .* of tinynets 1.2 was not loaded", left_out)
    assert "unet: entry point 'unet = tinynets_mod:factory' of tinynets 1.2 was not loaded" in left_out
    assert "taken by medseg" in left_out


def test_medseg_models_help_imports_no_torch() -> None:
    code = ("import sys\nfrom medseg.cli import main\ntry:\n    main(['models', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('IMPORTED', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'monai'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "usage: medseg models" in done.stdout
    assert "IMPORTED []" in done.stdout, done.stdout + done.stderr


def test_models_task_choices_are_the_registry_s() -> None:
    from medseg.commands import models as command

    assert command.TASKS == registry.TASKS
