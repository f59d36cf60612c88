"""The enhancement task's training side: the ultrasound-like phantoms, the PatchGAN, EnhancementModule and its
shipped configs (prediction and evaluation: tests/test_enhance_predict.py; synthesis: tests/test_synthesize.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation

from medseg.data.checks import check_dataset
from medseg.data.datalist import load_dataset
from medseg.data.synthetic import synthetic_affine
from medseg.data.synthetic_enhance import degrade, make_enhancement
from medseg.errors import ConfigError
from medseg.models.patchgan import PatchDiscriminator
from medseg.tasks.enhancement import EnhancementModule

CONFIGS = Path(__file__).parents[1] / "configs"
TINY_UNET = '{"channels": [8, 16, 32], "norm": "instance", "act": "leakyrelu"}'


def _psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """PSNR in dB, written out: 10 log10(range^2 / MSE)."""
    return float(10.0 * np.log10(data_range**2 / np.mean((np.asarray(a, np.float64) - b) ** 2)))


def _arrays(case: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A case's (image, target, label) as read from its files."""
    image, target, label = (nib.load(path).dataobj for path in (case["image"][0], case["target"], case["label"]))
    return np.asarray(image), np.asarray(target), np.asarray(label)


# -- data ------------------------------------------------------------------------------------------------------


def test_phantoms_have_the_stated_degradations(enh2d_root: Path) -> None:
    spec = load_dataset(enh2d_root)
    assert spec.task == "enhancement" and spec.label_names == ["background", "lesion"]
    assert spec.channel_names == ["US"] and len(spec.test) == 2
    assert [c["patient"] for c in spec.training] == ["p000", "p000", "p001", "p001", "p002", "p002"]
    affine = synthetic_affine((64, 64), (0.8, 0.8))
    for case in spec.training + spec.test:
        image, target, label = _arrays(case)
        for key in ("image", "target", "label"):  # one grid, the phantoms' affine
            path = case[key][0] if key == "image" else case[key]
            np.testing.assert_allclose(nib.load(path).affine, affine)
        assert image.dtype == target.dtype == np.float32 and label.dtype == np.uint8
        assert 0.0 <= target.min() and target.max() <= 1.0 and set(np.unique(label)) == {0, 1}
        assert _psnr(image, target) < 20.0  # speckle, shadow, attenuation, contrast: far from the clean image
        # The label is the lesion: it stands out of the clean target's surroundings (2 to 5 voxels out), less so
        # in the degraded input.
        lesion = label > 0
        ring = binary_dilation(lesion, iterations=5) & ~binary_dilation(lesion, iterations=2)
        target_contrast = target[lesion].mean() - target[ring].mean()
        assert abs(target_contrast) > 0.08
        assert abs(image[lesion].mean() - image[ring].mean()) < abs(target_contrast)
        # Beneath the reflector (the clean image's brightest structure; axis 1 is the depth, written towards lower
        # indices: the transducer at the last row) the input keeps at most 60% of the target (measured: 50% at
        # most over 300 cases; test_degradations isolates the shadow).
        reflector = target > 0.9
        columns = np.flatnonzero(reflector.any(axis=1))[1:-1]
        below = np.argwhere(reflector)[:, 1].min() - 3
        assert image[columns, :below].mean() < 0.6 * target[columns, :below].mean()
    assert check_dataset(enh2d_root, spatial_dims=2) == []


def test_degradations() -> None:
    """Each degradation of the model, alone: the same random draws with and without a reflector, and on uniform
    targets."""
    rng = np.random.default_rng
    uniform, reflector = np.full((64, 64), 0.4), np.zeros((64, 64), bool)
    reflector[24:40, 10:13] = True  # lateral 24-39, depths 10-12
    shadowed, plain = degrade(rng(0), uniform, reflector), degrade(rng(0), uniform, np.zeros_like(reflector))
    assert shadowed[26:38, 20:].mean() < 0.6 * plain[26:38, 20:].mean()  # echo kept: 15-30% before contrast
    assert shadowed[26:38, :8].mean() == pytest.approx(plain[26:38, :8].mean(), rel=0.1)  # above it: no shadow
    assert plain[:, 48:].mean() < 0.85 * plain[:, :16].mean()  # deeper is darker (40-60% kept at the bottom)
    relative_spread = plain.std(axis=0) / plain.mean(axis=0)  # per depth: multiplicative speckle
    assert relative_spread.min() > 0.05
    step = np.full((64, 64), 0.2)
    step[32:] = 0.6  # a 0.4 step across the beam
    degraded = degrade(rng(1), step, np.zeros_like(reflector))
    assert degraded[32:].mean() - degraded[:32].mean() < 0.8 * 0.4  # low contrast


def test_cases_depend_on_seed_and_index_only(tmp_path: Path) -> None:
    make_enhancement(tmp_path / "a", cases=2, seed=4, size=(32, 48))
    make_enhancement(tmp_path / "b", cases=3, seed=4, size=(32, 48))  # one more case: the first two unchanged
    make_enhancement(tmp_path / "c", cases=2, seed=5, size=(32, 48))
    a, b, c = (load_dataset(tmp_path / name).training for name in "abc")
    for first, second, other in zip(a, b, c, strict=False):
        for x, y, z in zip(_arrays(first), _arrays(second), _arrays(other), strict=True):
            assert x.shape == (32, 48)
            np.testing.assert_array_equal(x, y)
            assert not np.array_equal(x, z) or not x.any()  # another seed, another case (an empty label aside)
    with pytest.raises(ValueError, match="enhancement phantoms are 2D"):
        make_enhancement(tmp_path / "d", dims=3)


def test_make_synthetic_and_check_data_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medseg.cli import main

    out = tmp_path / "enh"
    assert main(["make-synthetic", "--task", "enhance", "--dims", "2", "--cases", "2", "--test-cases", "1",
                 "--size", "32", "32", "--out", str(out)]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["task"] == "enhancement" and meta["labels"] == {"0": "background", "1": "lesion"}
    assert set(meta["training"][0]) == {"image", "target", "label", "patient"}
    assert set(meta["test"][0]) == {"image", "target", "label"}
    assert main(["check-data", str(out)]) == 0
    assert main(["make-synthetic", "--task", "enhance", "--dims", "3", "--out", str(tmp_path / "x")]) == 2
    assert "enhancement phantoms are 2D" in capsys.readouterr().err


# -- discriminator ---------------------------------------------------------------------------------------------


def test_patch_discriminator_shapes_2d_and_3d() -> None:
    # each side: floor(side / 2**(blocks - 1)) - 2 (two stride-1 4-voxel convolutions with padding 1)
    assert PatchDiscriminator(2, 3)(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 14, 14)
    net3d = PatchDiscriminator(3, 2, channels=(8, 16, 32), norm="batch")
    assert net3d(torch.zeros(1, 2, 24, 24, 12)).shape == (1, 1, 4, 4, 1)
    layers = list(PatchDiscriminator(2, 2, channels=(8, 16, 32, 64)).model)
    assert isinstance(layers[1], torch.nn.LeakyReLU) and layers[1].negative_slope == 0.2  # no norm on the first
    assert sum(isinstance(m, torch.nn.InstanceNorm2d) for m in layers) == 3
    assert layers[-1].out_channels == 1


@pytest.mark.parametrize(("channels", "field"), [((64, 128, 256, 512), 70), ((8, 16, 32), 34)])
def test_patch_discriminator_receptive_field(channels: tuple[int, ...], field: int) -> None:
    """pix2pix's widths give its 70x70 PatchGAN; measured: the input voxels one logit's gradient reaches."""
    net = PatchDiscriminator(2, 1, channels=channels, norm=None)  # a norm would couple every position
    assert net.receptive_field == field
    x = torch.zeros(1, 1, 96, 96, requires_grad=True)
    out = net(x)
    out[0, 0, out.shape[2] // 2, out.shape[3] // 2].backward()
    reached = np.argwhere(x.grad[0, 0].numpy() != 0)
    assert (reached.max(axis=0) - reached.min(axis=0) + 1).tolist() == [field, field]


# -- module ----------------------------------------------------------------------------------------------------


def _cli(config: str, root: Path, tmp_path: Path, *extra: str, run: bool = False) -> Any:
    from medseg.lightning_cli import MedSegCLI

    args = ["--config", str(CONFIGS / config), "--data.root", str(root), "--trainer.default_root_dir",
            str(tmp_path / "runs"), "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--model.init_args.network_args", TINY_UNET, *extra]
    return MedSegCLI(args=["fit", *args] if run else args, run=run)


def test_training_updates_both_networks_and_saves_the_contract(enh2d_root: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg.inference.native import load_model
    from medseg.resume import RUN_FOLDER_ENV

    monkeypatch.setenv(RUN_FOLDER_ENV, "{}")  # the run folder the CLI claims is not left to later tests
    cli = _cli("enh2d_pix2pix.yaml", enh2d_root, tmp_path, "--data.patch_size", "[32, 32]",
               "--trainer.max_steps", "4", "--trainer.limit_val_batches", "1", "--trainer.max_epochs", "2",
               "--trainer.check_val_every_n_epoch", "1", "--trainer.log_every_n_steps", "1")
    model, trainer = cli.model, cli.trainer
    image = torch.rand(1, 1, 32, 32)
    with torch.no_grad():  # an untrained residual generator is the identity
        torch.testing.assert_close(model.eval()(image), image, rtol=0, atol=0)
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.fit(model, datamodule=cli.datamodule)
    assert trainer.global_step == 4  # two batches, one discriminator and one generator step each
    for name, p in model.named_parameters():  # every weight of both networks moved (after two generator steps)
        assert not torch.equal(p, before[name]), name
    metrics = trainer.callback_metrics
    assert {"train/loss_g", "train/loss_d", "train/l1", "train/l1_epoch"} <= set(metrics)
    assert {"val/psnr", "val/ssim", "val/l1", "val/psnr_input", "val/psnr_label"} <= set(metrics)
    # The checkpoint prediction reads: task, hyperparameters, generator under net.
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["medseg_task"] == "enhancement"
    hp = checkpoint["hyper_parameters"]
    assert hp["network_channels"] == [1, 1] and hp["condition"] == "image" and hp["residual"] is True
    assert hp["roi_size"] == [32, 32] and hp["data_range"] == 1.0 and hp["preprocessing_spec"]["intensity"] == "none"
    assert {"network", "network_args", "spatial_dims", "in_channels", "num_classes", "label_names", "sw_batch_size",
            "overlap"} <= set(hp)
    loaded = load_model(path)
    assert loaded.task == "enhancement"
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(image) + image, model.eval()(image))


def test_label_condition_builds_a_one_hot_generator() -> None:
    model = EnhancementModule(condition="label", residual=False, num_classes=2, roi_size=[32, 32],
                              network_args={"channels": [4, 8, 16]}, data_range=2.0)
    assert model.hparams.network_channels == [2, 1] and model.discriminator.model[0].in_channels == 3
    label = torch.zeros(1, 1, 32, 32)
    label[0, 0, 8:16, 8:16] = 1
    condition = model.generator_input({"label": label})
    assert condition.shape == (1, 2, 32, 32) and condition[0, 1].sum() == 64
    with torch.no_grad():  # an untrained label-conditioned generator draws a uniform mid-range image
        torch.testing.assert_close(model.eval()(condition), torch.ones(1, 1, 32, 32))


@pytest.mark.parametrize(("options", "message"), [
    ({"condition": "label", "residual": True}, "set residual: false"),
    ({"condition": "mask"}, "condition must be one of"),
    ({"scheduler": lambda optimizer: None}, "no learning-rate scheduler"),
    ({"channels_last": True}, "channels_last"),
    ({"network": "resnet18"}, "a classification network"),
    ({"network_args": {"deep_supervision": True}, "network": "unetpp"}, "deep_supervision"),
    ({"regions": [[1]]}, "regions"),
    ({"class_names": ["a", "b"]}, "image-level classes"),
])
def test_options_an_enhancement_model_refuses(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EnhancementModule(**options)


def _on_fit_start(model: EnhancementModule, **trainer: Any) -> None:
    """Run ``model.on_fit_start`` under a stand-in trainer (one process, no data module unless given)."""
    model._trainer = SimpleNamespace(**{"world_size": 1, "strategy": None, "datamodule": None, **trainer})
    try:
        model.on_fit_start()
    finally:
        model._trainer = None


def test_fit_start_refuses_a_patch_the_networks_cannot_take_and_plain_ddp() -> None:
    model = EnhancementModule(roi_size=[18, 18], network_args={"channels": [4, 8, 16]})
    with pytest.raises(ConfigError, match=r"patch_size \[18, 18\] does not suit generator 'unet'"):
        _on_fit_start(model)
    model = EnhancementModule(roi_size=[32, 32], network_args={"channels": [4, 8, 16]})
    _on_fit_start(model)
    with pytest.raises(ConfigError, match="ddp_find_unused_parameters_true"):
        _on_fit_start(model, world_size=2, strategy=SimpleNamespace(_ddp_kwargs={}))
    _on_fit_start(model, world_size=2, strategy=SimpleNamespace(_ddp_kwargs={"find_unused_parameters": True}))


def test_label_condition_on_a_dataset_without_labels_is_refused(enh2d_root: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from medseg.cli import main

    spec = load_dataset(enh2d_root)
    root = tmp_path / "unlabelled"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({"task": "enhancement", "channel_names": {"0": "US"}, "training": [
        {"image": c["image"][0], "target": c["target"], "patient": c["patient"]} for c in spec.training]}))
    code = main(["fit", "--config", str(CONFIGS / "enh2d_lesion_synthesis.yaml"), "--data.root", str(root),
                 "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.accelerator", "cpu",
                 "--model.init_args.network_args", TINY_UNET])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("medseg fit: ") and str(root / "dataset.json") in err[-1]
    assert "condition: label needs a label map in every training case" in err[-1]


def _fit(root: Path, tmp_path: Path, *extra: str) -> int:
    """``medseg fit`` of the pix2pix config with a tiny generator on 32x32 patches, one epoch unless told."""
    from medseg.cli import main
    from medseg.resume import RUN_FOLDER_ENV

    with pytest.MonkeyPatch.context() as monkeypatch:  # the run folder the CLI claims is not left to later tests
        monkeypatch.setenv(RUN_FOLDER_ENV, "{}")
        return _main_fit(main, root, tmp_path, *extra)


def _main_fit(main: Any, root: Path, tmp_path: Path, *extra: str) -> int:

    return main(["fit", "--config", str(CONFIGS / "enh2d_pix2pix.yaml"), "--data.root", str(root),
                 "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.accelerator", "cpu",
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                 "--model.init_args.network_args", '{"channels": [4, 8, 16]}', "--data.patch_size", "[32, 32]",
                 "--data.batch_size", "2", "--trainer.check_val_every_n_epoch", "1", "--trainer.max_epochs", "1",
                 *extra])


@pytest.mark.parametrize(("setting", "message"), [
    (("--trainer.gradient_clip_val", "1.0"), "trainer.gradient_clip_val 1.0: Lightning cannot clip"),
    (("--trainer.accumulate_grad_batches", "2"), "trainer.accumulate_grad_batches 2: an enhancement GAN steps"),
    (("--trainer.max_steps", "5"), "trainer.max_steps 5: an enhancement GAN takes two optimiser steps per batch"),
])
def test_trainer_settings_manual_optimisation_cannot_honour(enh2d_root: Path, tmp_path: Path, setting: tuple[str, str],
                                                            message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Lightning's own refusals of clipping and accumulation under manual optimisation are tracebacks; an odd
    max_steps would stop after a discriminator step that its generator step then follows anyway."""
    assert _fit(enh2d_root, tmp_path, *setting) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"medseg fit: {message}")
    assert not list(tmp_path.glob("runs/**/*.ckpt"))


def test_resume_from_last_continues_both_optimisers(enh2d_root: Path, tmp_path: Path) -> None:
    """``--ckpt_path last`` restores both Adam states: after the second epoch each optimiser has stepped once per
    batch of both epochs (a fresh state would count the second epoch's batches only)."""
    def last() -> dict[str, Any]:
        (path,) = tmp_path.glob("runs/*/version_0/checkpoints/last.ckpt")
        return torch.load(path, map_location="cpu", weights_only=False)

    assert _fit(enh2d_root, tmp_path) == 0
    first = last()
    batches = first["global_step"] // 2  # one discriminator and one generator step per batch
    assert batches >= 1 and first["epoch"] == 0
    assert [float(s["state"][0]["step"]) for s in first["optimizer_states"]] == [batches, batches]
    assert _fit(enh2d_root, tmp_path, "--trainer.max_epochs", "2", "--ckpt_path", "last") == 0
    second = last()
    assert second["epoch"] == 1 and second["global_step"] == 4 * batches
    assert [float(s["state"][0]["step"]) for s in second["optimizer_states"]] == [2 * batches, 2 * batches]
    assert not list(tmp_path.glob("runs/*/version_1"))  # the same run went on


def _logged_evaluation(model: EnhancementModule, batch: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The names ``model._evaluate`` logs for one validation batch."""
    logged: set[str] = set()
    monkeypatch.setattr(model, "log", lambda name, *args, **kwargs: logged.add(name))
    model._evaluate(batch, "val")
    return logged


def test_validation_metrics_are_per_case_over_every_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two cases of two channels; the untrained residual generator is the identity, so the generated image is the
    input: val/psnr is the mean over cases of each case's PSNR over both channels, val/ssim the mean of each
    case's channel SSIMs."""
    from monai.metrics import SSIMMetric

    model = EnhancementModule(in_channels=2, roi_size=[32, 32], network_args={"channels": [4, 8, 16]})
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2, 2, 32, 32, generator=generator)
    image = (target + 0.1 * torch.randn(2, 2, 32, 32, generator=generator)).clamp(0, 1)
    image[1, 1] = target[1, 1]  # the second case's second channel is exact: its PSNR is not that of one channel
    logged = _logged_evaluation(model, {"image": image, "target": target}, monkeypatch)
    assert {"val/psnr", "val/ssim", "val/l1", "val/psnr_input"} == logged
    cases = [_psnr(image[i].numpy(), target[i].numpy()) for i in range(2)]
    assert float(model.eval_metrics["val_psnr"].compute()) == pytest.approx(np.mean(cases), abs=1e-3)
    assert float(model.eval_metrics["val_psnr_input"].compute()) == pytest.approx(np.mean(cases), abs=1e-3)
    one = SSIMMetric(spatial_dims=2, data_range=1.0)
    channels = [float(one(image[i:i + 1, c:c + 1], target[i:i + 1, c:c + 1])) for i in range(2) for c in range(2)]
    assert channels[3] == pytest.approx(1.0)
    assert float(model.eval_metrics["val_ssim"].compute()) == pytest.approx(np.mean(channels), abs=1e-4)


def test_psnr_label_is_logged_for_a_batch_without_structures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DDP a metric one process logs must be logged by every process (each takes part in its sync), so a
    batch whose cases have no labelled voxels logs val/psnr_label too, without a value."""
    model = EnhancementModule(roi_size=[32, 32], network_args={"channels": [4, 8, 16]})
    batch = {"image": torch.rand(1, 1, 32, 32), "target": torch.rand(1, 1, 32, 32),
             "label": torch.zeros(1, 1, 32, 32)}
    assert "val/psnr_label" in _logged_evaluation(model, batch, monkeypatch)
    assert int(model.eval_metrics["val_psnr_label"].weight) == 0  # no value: the mean has nothing in it
    batch["label"][0, 0, 4:12, 4:12] = 1
    _logged_evaluation(model, batch, monkeypatch)
    inside = _psnr(batch["image"][0, 0, 4:12, 4:12].numpy(), batch["target"][0, 0, 4:12, 4:12].numpy())
    assert float(model.eval_metrics["val_psnr_label"].compute()) == pytest.approx(inside, abs=1e-3)


# -- learning (slow) -------------------------------------------------------------------------------------------


def _held_out(cli: Any, checkpoint: str, cases: list[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
    """Each held-out case preprocessed as in validation (image, target, label) with the checkpoint's generated
    image, computed here from the loaded generator."""
    from medseg.inference.native import load_model
    from medseg.models.generator import generator_output, one_hot_condition

    loaded = load_model(checkpoint)
    hp = loaded.hparams
    transform = cli.datamodule.transforms(train=False)
    out = []
    for case in cases:
        item = transform(cli.datamodule._item(case))
        label = item["label"][None].long()
        condition = item["image"][None] if hp["condition"] == "image" else one_hot_condition(label, hp["num_classes"])
        with torch.no_grad():  # the 64x64 images are one window
            generated = generator_output(loaded.net, condition.float(), hp["residual"])
        out.append({"image": item["image"][0].numpy(), "target": item["target"][0].numpy(),
                    "label": item["label"][0].numpy(), "generated": generated[0, 0].numpy()})
    return out


def test_pix2pix_config_enhances_held_out_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped config, trained briefly (10 epochs on 18 cases: about 5 s), gains at least 3 dB of PSNR on 8
    held-out cases over their degraded inputs, computed here from the best checkpoint's generator (measured:
    15.6 -> 21.8 dB)."""
    from medseg.resume import RUN_FOLDER_ENV, saved_checkpoint

    monkeypatch.setenv(RUN_FOLDER_ENV, "{}")
    make_enhancement(tmp_path / "data", cases=24, test_cases=8, seed=11)
    cli = _cli("enh2d_pix2pix.yaml", tmp_path / "data", tmp_path, "--trainer.max_epochs", "10",
               "--trainer.check_val_every_n_epoch", "2", "--model.init_args.network_args",
               '{"channels": [16, 32, 64, 128], "norm": "instance", "act": "leakyrelu"}', run=True)
    metrics = cli.trainer.callback_metrics
    assert float(metrics["val/psnr"]) > float(metrics["val/psnr_input"]) + 3.0
    cases = _held_out(cli, saved_checkpoint(cli.trainer, "best"), load_dataset(tmp_path / "data").test)
    enhanced = np.mean([_psnr(c["generated"], c["target"]) for c in cases])
    degraded = np.mean([_psnr(c["image"], c["target"]) for c in cases])
    assert enhanced >= degraded + 3.0, (enhanced, degraded)


@pytest.mark.slow
def test_lesion_synthesis_config_draws_the_lesion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The label-conditioned config, trained briefly (10 epochs on 48 cases: about 13 s), its checkpoint chosen by
    val/psnr_label: on 8 held-out label maps the generated lesion has the real one's contrast against its
    surroundings (dark or bright) in at least 7 cases, and inside the lesions the generated image is at least 3 dB
    closer to the clean image than a constant image of the training targets' mean (measured: 18.3 vs 9.5 dB).
    The whole image is not compared: the label map says nothing of the tissue around the lesion, and a GAN draws
    plausible tissue there, not its mean (measured: 16.8 dB, the constant image 17.3 dB)."""
    from medseg.resume import RUN_FOLDER_ENV, saved_checkpoint

    monkeypatch.setenv(RUN_FOLDER_ENV, "{}")
    make_enhancement(tmp_path / "data", cases=64, test_cases=8, seed=12)
    cli = _cli("enh2d_lesion_synthesis.yaml", tmp_path / "data", tmp_path, "--trainer.max_epochs", "10",
               "--trainer.check_val_every_n_epoch", "1", "--model.init_args.network_args",
               '{"channels": [16, 32, 64, 128], "norm": "instance", "act": "leakyrelu"}', run=True)
    spec = load_dataset(tmp_path / "data")
    mean = float(np.mean([_arrays(case)[1].mean() for case in spec.training]))
    cases = _held_out(cli, saved_checkpoint(cli.trainer, "best"), spec.test)
    right_contrast, inside, inside_constant = 0, [], []
    for case in cases:
        lesion = case["label"] > 0
        ring = binary_dilation(lesion, iterations=4) & ~lesion
        real = case["target"][lesion].mean() - case["target"][ring].mean()
        drawn = case["generated"][lesion].mean() - case["generated"][ring].mean()
        right_contrast += bool(np.sign(real) == np.sign(drawn))
        inside.append(_psnr(case["generated"][lesion], case["target"][lesion]))
        inside_constant.append(_psnr(np.full(lesion.sum(), mean), case["target"][lesion]))
    assert right_contrast >= 7
    assert np.mean(inside) >= np.mean(inside_constant) + 3.0, (inside, inside_constant)
    # medseg synthesize with that checkpoint: new pairs from moved training label maps; each drawn lesion is dark
    # when large and bright when small, as the phantoms' lesions are (semi-axes 11-15% vs 5-7% of the side: the
    # areas do not overlap), in at least 7 of 8 pairs.
    from medseg.cli import main

    best = saved_checkpoint(cli.trainer, "best")
    assert main(["synthesize", "--ckpt", str(best), "--labels", str(tmp_path / "data"), "--count", "8",
                 "--out", str(tmp_path / "synth"), "--seed", "3"]) == 0
    synthetic = load_dataset(tmp_path / "synth")
    assert synthetic.task == "segmentation" and len(synthetic.training) == 8
    right_kind = 0
    for case in synthetic.training:
        image, label = nib.load(case["image"][0]).get_fdata(), nib.load(case["label"]).get_fdata()
        lesion = label > 0
        ring = binary_dilation(lesion, iterations=4) & ~lesion
        contrast = image[lesion].mean() - image[ring].mean()
        right_kind += bool((contrast < 0) == (lesion.sum() > 80))
    assert right_kind >= 7, right_kind
