"""Joint segmentation and classification: the multitask network, its window-averaged case probabilities, the
synthetic multitask phantoms, MultiTaskModule's training step and validation, and fits from the command line
(prediction and evaluation have their own test files)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg.cli import main
from medseg.data.checks import check_dataset
from medseg.data.datalist import load_dataset
from medseg.data.synthetic_multitask import make_multitask
from medseg.errors import ConfigError, ResumeError
from medseg.models import create_model
from medseg.models.multitask import case_class_probabilities
from medseg.tasks.multitask import MultiTaskModule

CONFIGS = Path(__file__).parents[1] / "configs"
TINY = {"channels": [4, 8, 16]}


@pytest.fixture(scope="module")
def mtl2d_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2D multitask phantoms: 8 training cases of 32x32 (4 patients, classes 0 1 0 1), 2 held-out cases."""
    root = tmp_path_factory.mktemp("mtl2d")
    make_multitask(root, dims=2, cases=8, seed=3, size=(32, 32), test_cases=2)
    return root


def tiny_net(dims: int, image_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("multitask_unet", dims, 2, 4, image_classes=image_classes, **TINY).eval()


# ------------------------------------------------------------------------------------------------------------
# The network and the case probabilities
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_the_three_calls_share_one_encoder(dims: int) -> None:
    net = tiny_net(dims)
    x = torch.randn(2, 2, *([16] * dims))
    with torch.no_grad():
        seg, classes = net.forward_with_class(x)
        assert tuple(seg.shape) == (2, 4, *([16] * dims)) and tuple(classes.shape) == (2, 3)
        assert torch.equal(net(x), seg)
        assert torch.equal(net.classify(x), classes)
        assert isinstance(net.train()(x), torch.Tensor)  # a plain tensor in training mode too
    # the class logits depend on the image (the head reads the encoder, not a constant)
    assert not torch.allclose(classes[0], classes[1])


def test_scripted_network_keeps_both_heads() -> None:
    net = tiny_net(2)
    scripted = torch.jit.script(net)
    x = torch.randn(1, 2, 16, 16)
    assert torch.allclose(scripted(x), net(x)) and torch.allclose(scripted.classify(x), net.classify(x))


def test_one_window_case_probabilities_are_the_softmax() -> None:
    net = tiny_net(2)
    image = torch.randn(1, 2, 32, 32)
    expected = torch.softmax(net.classify(image), dim=1)[0]
    probabilities = case_class_probabilities(net, image, [32, 32], overlap=0.25, sw_batch_size=4)
    assert probabilities.shape == (3,) and torch.allclose(probabilities, expected, atol=1e-6)
    assert probabilities.sum().item() == pytest.approx(1.0)


def test_case_probabilities_average_the_sliding_windows() -> None:
    net = tiny_net(2)
    net.train()  # the function runs the network in eval mode and gives it back as it was
    image = torch.randn(1, 2, 48, 40)
    # roi 32x32, overlap 0.25: steps of 24; axis 0 (48) starts 0 and 16 (the last window ends at the border),
    # axis 1 (40) starts 0 and 8
    windows = [image[:, :, a:a + 32, b:b + 32] for a in (0, 16) for b in (0, 8)]
    with torch.no_grad():
        net.eval()
        expected = torch.stack([torch.softmax(net.classify(w), dim=1)[0] for w in windows]).mean(dim=0)
        net.train()
    for batch in (1, 3, 4):
        got = case_class_probabilities(net, image, [32, 32], overlap=0.25, sw_batch_size=batch)
        assert torch.allclose(got, expected, atol=1e-6)
    assert net.training
    # an image smaller than the roi is padded with zeros on both sides (axis 0: 4 before, 4 after), one window
    small = torch.randn(1, 2, 24, 32)
    with torch.no_grad():
        expected = torch.softmax(net.eval().classify(F.pad(small, [0, 0, 4, 4])), dim=1)[0]
    assert torch.allclose(case_class_probabilities(net, small, [32, 32]), expected, atol=1e-6)
    with pytest.raises(ValueError, match="one image"):
        case_class_probabilities(net, torch.randn(2, 2, 32, 32), [32, 32])


@pytest.mark.parametrize(("shape", "roi", "overlap"), [
    ((33, 17), (16, 16), 0.5), ((10, 50), (16, 16), 0.25), ((7, 9, 20), (8, 8, 8), 0.25), ((31, 63), (32, 16), 0.3)])
def test_the_windows_are_those_of_monai_sliding_window(shape: tuple, roi: tuple, overlap: float) -> None:
    """The class probabilities average the very windows (padding, steps, the last window moved back) that MONAI's
    ``sliding_window_inference`` hands the segmentation network, recorded here for odd, small and 3D shapes."""
    from monai.inferers import sliding_window_inference

    from medseg.models.multitask import pad_to_roi, window_slices

    image = torch.randn(1, 1, *shape)
    seen: list[torch.Tensor] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.extend(x[i:i + 1].clone() for i in range(x.shape[0]))  # MONAI reuses its window buffer
        return x

    sliding_window_inference(image, roi, 3, record, overlap=overlap, mode="gaussian")
    padded = pad_to_roi(image, roi)
    ours = [padded[(slice(None), slice(None), *part)] for part in window_slices(padded.shape[2:], roi, overlap)]
    assert len(ours) == len(seen) > 1
    assert all(torch.equal(a, b) for a, b in zip(ours, seen, strict=True))


# ------------------------------------------------------------------------------------------------------------
# The synthetic phantoms
# ------------------------------------------------------------------------------------------------------------


def _elongation(mask: np.ndarray) -> float:
    """Ratio of the largest to the smallest principal axis of a mask's voxel cloud."""
    coords = np.argwhere(mask).astype(float)
    eigen = np.linalg.eigvalsh(np.cov(coords.T))
    return float(np.sqrt(eigen.max() / eigen.min()))


def test_phantoms_declare_classes_patients_and_pass_the_checks(mtl2d_root: Path) -> None:
    spec = load_dataset(mtl2d_root)
    assert spec.task == "multitask" and spec.class_names == ["benign", "malignant"]
    assert spec.label_names == ["background", "lesion"]
    training = spec.training
    assert [c["patient"] for c in training] == ["p000", "p000", "p001", "p001", "p002", "p002", "p003", "p003"]
    assert [c["class"] for c in training] == [0, 0, 1, 1, 0, 0, 1, 1]  # a patient's cases share its class
    assert all(c["label"] and c["class"] is not None for c in spec.test) and len(spec.test) == 2
    assert not {c["patient"] for c in spec.test} & {c["patient"] for c in training}
    assert check_dataset(mtl2d_root, spatial_dims=2) == []
    for case in training + spec.test:  # the class is in the lesion's appearance
        image = nib.load(case["image"][0]).get_fdata()
        lesion = nib.load(case["label"]).get_fdata() > 0
        assert set(np.unique(nib.load(case["label"]).get_fdata())) == {0.0, 1.0}
        contrast = np.median(image[lesion]) - np.median(image[~lesion])
        if case["class"] == 0:  # round, darker than the tissue
            assert contrast < 0 and _elongation(lesion) < 1.4
        else:  # elongated, brighter
            assert contrast > 0 and _elongation(lesion) > 1.8


def test_3d_phantoms_and_an_undeclared_class_is_reported(tmp_path: Path) -> None:
    path = make_multitask(tmp_path, dims=3, cases=2, size=(32, 32, 16))
    assert nib.load(tmp_path / "imagesTr" / "case_000.nii.gz").shape == (32, 32, 16)
    assert check_dataset(tmp_path, spatial_dims=3) == []
    meta = json.loads(path.read_text())
    meta["training"][1]["class"] = 5
    path.write_text(json.dumps(meta))
    problems = check_dataset(tmp_path, spatial_dims=3)
    assert len(problems) == 1 and "class index 5 is not declared" in problems[0].message
    with pytest.raises(ValueError, match="too small for a lesion"):
        make_multitask(tmp_path / "small", dims=3, cases=1, size=(16, 16, 16))


# ------------------------------------------------------------------------------------------------------------
# MultiTaskModule
# ------------------------------------------------------------------------------------------------------------


def _module(**kwargs: Any) -> MultiTaskModule:
    torch.manual_seed(0)
    return MultiTaskModule(spatial_dims=2, network_args=dict(TINY), class_names=["benign", "malignant"],
                           label_names=["background", "lesion"], roi_size=[16, 16], **kwargs)


def _batch() -> dict[str, torch.Tensor]:
    label = torch.zeros(4, 1, 16, 16)
    label[:, :, 4:10, 5:11] = 1
    return {"image": torch.randn(4, 1, 16, 16) + 2 * label, "label": label, "class": torch.tensor([0, 1, 1, 0])}


def _parameters(module: MultiTaskModule) -> dict[str, dict[str, torch.Tensor]]:
    net = module.net
    parts = {"encoder": net.encoder, "decoder": torch.nn.ModuleList([net.decoder, net.head]),
             "classifier": net.classifier}
    return {name: {k: v.detach().clone() for k, v in part.named_parameters()} for name, part in parts.items()}


@pytest.mark.parametrize(("seg_weight", "cls_weight"), [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0)])
def test_a_training_step_trains_the_weighted_parts(seg_weight: float, cls_weight: float,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    module = _module(segmentation_weight=seg_weight, classification_weight=cls_weight)
    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **_: logged.__setitem__(name, float(value)))
    optimizer = module.configure_optimizers()  # AdamW with weight decay, as in a fit
    before = _parameters(module)
    optimizer.zero_grad(set_to_none=True)
    loss = module.training_step(_batch(), 0)
    loss.backward()
    optimizer.step()
    after = _parameters(module)
    changed = {part: any(not torch.equal(before[part][k], after[part][k]) for k in before[part]) for part in before}
    assert changed == {"encoder": True, "decoder": seg_weight > 0, "classifier": cls_weight > 0}
    parts = {name: logged[name] for name in ("train/loss_seg", "train/loss_cls") if name in logged}
    assert set(parts) == {name for name, w in (("train/loss_seg", seg_weight), ("train/loss_cls", cls_weight)) if w}
    assert all(value > 0 for value in parts.values())
    total = seg_weight * parts.get("train/loss_seg", 0.0) + cls_weight * parts.get("train/loss_cls", 0.0)
    assert logged["train/loss_step"] == pytest.approx(total, rel=1e-5)


def test_hparams_rebuild_the_network_with_its_class_head() -> None:
    module = _module(classification_weight=0.5)
    hparams = dict(module.hparams)
    assert hparams["network_args"] == {**TINY, "image_classes": 2}
    assert hparams["class_names"] == ["benign", "malignant"] and hparams["classification_weight"] == 0.5
    net = create_model(hparams["network"], 2, hparams["in_channels"], hparams["num_classes"],
                       **hparams["network_args"])
    net.load_state_dict(module.net.state_dict())  # what medseg.inference.native.load_model does
    x = torch.randn(1, 1, 16, 16)
    assert torch.equal(net.eval().classify(x), module.net.eval().classify(x))


def test_the_module_refuses_what_cannot_train() -> None:
    with pytest.raises(ConfigError, match="'unet' is a segmentation network.*use multitask_unet"):
        MultiTaskModule(network="unet", spatial_dims=2, class_names=["a", "b"])
    with pytest.raises(ConfigError, match="image-level classes"):
        MultiTaskModule(spatial_dims=2)
    with pytest.raises(ConfigError, match="image_classes=3 disagrees"):
        MultiTaskModule(spatial_dims=2, class_names=["a", "b"], network_args={"image_classes": 3})
    with pytest.raises(ConfigError, match="not both 0"):
        MultiTaskModule(spatial_dims=2, class_names=["a", "b"], segmentation_weight=0, classification_weight=0)
    with pytest.raises(ConfigError, match="sigmoid"):
        MultiTaskModule(spatial_dims=2, class_names=["a", "b"], class_loss="bce")
    module = _module()
    saved = {"medseg_task": "multitask", "hyper_parameters": dict(module.hparams)}
    module.on_load_checkpoint(saved)  # its own checkpoint continues it
    with pytest.raises(ResumeError, match=r"class_names: checkpoint \['benign', 'cyst'\]"):
        module.on_load_checkpoint({**saved, "hyper_parameters": {**saved["hyper_parameters"],
                                                                 "class_names": ["benign", "cyst"]}})
    with pytest.raises(ResumeError, match="task: checkpoint segmentation"):
        module.on_load_checkpoint({**saved, "medseg_task": "segmentation"})


# ------------------------------------------------------------------------------------------------------------
# From the command line
# ------------------------------------------------------------------------------------------------------------


def _fit_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(CONFIGS / "mtl2d_unet.yaml"), "--data.root", str(root),
            "--trainer.default_root_dir", str(out), "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", *extra]


def test_fit_from_the_command_line_logs_both_tasks(mtl2d_root: Path, tmp_path: Path) -> None:
    """One step, then validation on 16x16 windows of the 32x32 cases (9 windows each): the logged class
    metrics are those of the saved network's window-averaged probabilities."""
    from medseg.data.datamodule import MedSegDataModule
    from medseg.inference.native import load_model

    val_cases = ["case_000", "case_001", "case_002", "case_003"]  # patients p000 (benign) and p001 (malignant)
    code = main(_fit_args(mtl2d_root, tmp_path, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                          "--trainer.check_val_every_n_epoch", "1", "--trainer.log_every_n_steps", "1",
                          "--data.patch_size", "[16, 16]", "--data.val_cases", json.dumps(val_cases),
                          "--model.init_args.network_args", json.dumps(TINY)))
    assert code == 0
    run = tmp_path / "mtl2d_unet" / "version_0"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    logged = {key: float(value) for row in rows for key, value in row.items() if value}
    assert {"train/loss_seg", "train/loss_cls", "val/dice", "val/cls_acc", "val/cls_auroc", "val/cls_loss"} <= set(logged)
    model = load_model(run / "checkpoints" / "last.ckpt")  # the weights validation ran with
    assert model.task == "multitask" and model.hparams["class_names"] == ["benign", "malignant"]
    assert model.hparams["network_args"]["image_classes"] == 2
    data = MedSegDataModule(str(mtl2d_root), spatial_dims=2, patch_size=[16, 16], val_cases=val_cases,
                            preprocessing=model.hparams["preprocessing_spec"])
    data.setup("validate")
    probabilities, classes = [], []
    for batch in data.val_dataloader():
        probabilities.append(case_class_probabilities(model.net, batch["image"], model.window.roi,
                                                      model.window.overlap, model.window.batch_size))
        classes.append(int(batch["class"][0]))
    p = torch.stack(probabilities)
    assert classes == [0, 0, 1, 1]
    assert logged["val/cls_acc"] == pytest.approx(float((p.argmax(1) == torch.tensor(classes)).float().mean()))
    nll = -torch.log(p[torch.arange(4), classes]).mean().item()  # the class loss (ce) of the case probabilities
    assert logged["val/cls_loss"] == pytest.approx(nll, rel=1e-4)


def test_wrong_network_or_task_is_refused_in_one_line(mtl2d_root: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    assert main(_fit_args(mtl2d_root, tmp_path, "--model.init_args.network", "unet")) == 2
    err = capsys.readouterr().err.strip()
    assert "'unet' is a segmentation network" in err and "use multitask_unet" in err and "\n" not in err
    code = main(["fit", "--config", str(CONFIGS / "seg2d_unet.yaml"), "--data.root", str(mtl2d_root),
                 "--trainer.default_root_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "a multitask dataset, but the model is SegmentationModule" in err and "mtl2d_unet.yaml" in err


@pytest.mark.slow
def test_a_short_fit_segments_and_classifies_held_out_cases(tmp_path: Path) -> None:
    """The shipped config, 12 epochs (84 steps) on 14 cases: Dice and class accuracy of the best checkpoint,
    computed here from the network's outputs on the 6 validation and 4 test cases. Measured (4 data/run seeds):
    mean Dice 0.925-0.977, accuracy 1.0; the thresholds (0.8, 0.8: two of ten cases) leave room for other CPUs."""
    from medseg.data.datamodule import MedSegDataModule
    from medseg.inference.native import load_model

    root = tmp_path / "data"
    make_multitask(root, dims=2, cases=20, seed=11, test_cases=4)
    val_cases = [f"case_{i:03d}" for i in range(6)]  # patients p000-p002: classes 0, 1, 0
    code = main(_fit_args(root, tmp_path / "runs", "--trainer.max_epochs", "12",
                          "--data.val_cases", json.dumps(val_cases)))
    assert code == 0
    best = sorted((tmp_path / "runs" / "mtl2d_unet" / "version_0" / "checkpoints").glob("best-*.ckpt"))[-1]
    model = load_model(best)
    data = MedSegDataModule(str(root), spatial_dims=2, patch_size=[64, 64], val_cases=val_cases,
                            preprocessing=model.hparams["preprocessing_spec"])
    data.setup("validate")
    data.setup("test")
    dice, correct = [], []
    with torch.no_grad():
        for batch in [*data.val_dataloader(), *data.test_dataloader()]:
            image, label = batch["image"], batch["label"][0, 0] > 0
            predicted = model.net(image)[0].argmax(0) > 0  # 64x64: one window
            dice.append(2 * (predicted & label).sum().item() / (predicted.sum() + label.sum()).item())
            probabilities = case_class_probabilities(model.net, image, model.window.roi, model.window.overlap)
            correct.append(int(probabilities.argmax()) == int(batch["class"][0]))
    assert len(dice) == 10
    print(f"multitask fit: mean Dice {np.mean(dice):.3f} (min {min(dice):.3f}), class accuracy {np.mean(correct):.2f}")
    assert np.mean(dice) >= 0.8 and np.mean(correct) >= 0.8


def test_three_classes_fit_resume_and_predict(tmp_path: Path) -> None:
    """A real one-step fit on a three-class dataset saves a checkpoint whose network has three class logits,
    `--ckpt_path last` resumes the run in its folder, and `medseg predict` writes the three classes' columns:
    the window-averaged probabilities of the saved network."""
    from medseg.inference.native import load_model, preprocess_for

    root = tmp_path / "data"
    dataset = make_multitask(root, dims=2, cases=4, seed=2, size=(32, 32), test_cases=2)
    meta = json.loads(dataset.read_text())
    meta["classes"] = {"0": "a", "1": "b", "2": "c"}
    for i, case in enumerate(meta["training"] + meta["test"]):
        case.update({"class": i % 3, "patient": f"q{i}"})
    dataset.write_text(json.dumps(meta))
    runs = tmp_path / "runs"
    tiny = ["--trainer.limit_train_batches", "1", "--trainer.log_every_n_steps", "1", "--data.patch_size", "[16, 16]", "--data.val_cases",
            '["case_000", "case_001"]', "--model.init_args.network_args", json.dumps({"channels": [4, 8]})]
    assert main(_fit_args(root, runs, "--trainer.max_epochs", "1", *tiny)) == 0
    run = runs / "mtl2d_unet" / "version_0"
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["hyper_parameters"]["network_args"]["image_classes"] == 3
    assert saved["state_dict"]["net.classifier.3.weight"].shape == (3, 8)
    assert main(_fit_args(root, runs, "--trainer.max_epochs", "2", "--ckpt_path", "last", *tiny)) == 0
    assert not (runs / "mtl2d_unet" / "version_1").exists()
    resumed = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["epoch"] == 1 and resumed["global_step"] == 2

    out = tmp_path / "pred"
    assert main(["predict", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--input", str(dataset),
                 "--output", str(out)]) == 0
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["case"] for r in rows] == ["case_004", "case_005"] and list(rows[0])[1:5] == ["prediction", "p_a",
                                                                                               "p_b", "p_c"]
    model = load_model(run / "checkpoints" / "last.ckpt")
    for row in rows:
        x = preprocess_for(model)({"image": str(root / "imagesTs" / f"{row['case']}.nii.gz")})["image"]
        expected = case_class_probabilities(model.net, x.as_tensor()[None], (16, 16), model.window.overlap,
                                            model.window.batch_size)
        assert [float(row[f"p_{n}"]) for n in "abc"] == pytest.approx(expected.tolist(), abs=1e-6)
        assert row["prediction"] == "abc"[int(expected.argmax())]
        assert (out / f"{row['case']}.nii.gz").is_file()
