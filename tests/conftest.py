"""Shared fixtures: small synthetic datasets, made once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from medseg.data.synthetic import make_synthetic


@pytest.fixture(autouse=True, scope="session")
def single_thread() -> Iterator[None]:
    """One intra-op thread: the tests' tiny models gain nothing from two, and OpenMP spin-waits make a
    2-thread step ~100x slower when another process holds one of the 2 cores (measured: 0.6 s vs 6 ms)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def seg3d_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3D segmentation, 6 cases of 24x24x12 (non-identity affine, anisotropic spacing), 2 held-out cases."""
    root = tmp_path_factory.mktemp("seg3d")
    make_synthetic(root, dims=3, cases=6, classes=2, task="seg", size=(24, 24, 12), seed=1, test_cases=2)
    return root


@pytest.fixture(scope="session")
def seg2d_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2D segmentation, 12 cases of 48x48 with 3 classes."""
    root = tmp_path_factory.mktemp("seg2d")
    make_synthetic(root, dims=2, cases=12, classes=3, task="seg", size=(48, 48), seed=2)
    return root


@pytest.fixture(scope="session")
def seg2d_regions_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2D nested structures (labels 1 > 2 > 3) with overlapping regions whole/core/inner, 12 cases of 48x48."""
    root = tmp_path_factory.mktemp("seg2d_regions")
    make_synthetic(root, dims=2, cases=12, task="seg", size=(48, 48), seed=5, regions=True, test_cases=2)
    return root


@pytest.fixture(scope="session")
def seg3d_regions_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3D nested structures with overlapping regions, 6 cases of 24x24x12."""
    root = tmp_path_factory.mktemp("seg3d_regions")
    make_synthetic(root, dims=3, cases=6, task="seg", size=(24, 24, 12), seed=6, regions=True)
    return root


@pytest.fixture(scope="session")
def cls3d_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3D classification, 8 cases of 24^3, 2 classes."""
    root = tmp_path_factory.mktemp("cls3d")
    make_synthetic(root, dims=3, cases=8, classes=2, task="cls", size=(24, 24, 24), seed=3)
    return root


@pytest.fixture(scope="session")
def cls2d_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2D classification, 24 cases of 48x48, 2 classes."""
    root = tmp_path_factory.mktemp("cls2d")
    make_synthetic(root, dims=2, cases=24, classes=2, task="cls", size=(48, 48), seed=4)
    return root


@pytest.fixture(scope="session")
def mtl2d_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2D multitask (a lesion label map and a benign/malignant class per case), 8 cases of 48x48."""
    from medseg.data.synthetic_multitask import make_multitask

    root = tmp_path_factory.mktemp("mtl2d")
    make_multitask(root, dims=2, cases=8, seed=7, size=(48, 48))
    return root


@pytest.fixture(scope="session")
def enh2d_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2D ultrasound enhancement pairs (degraded image, clean target, lesion label map), 6 cases of 64x64."""
    from medseg.data.synthetic_enhance import make_enhancement

    root = tmp_path_factory.mktemp("enh2d")
    make_enhancement(root, dims=2, cases=6, seed=8, test_cases=2)
    return root


@pytest.fixture(scope="session")
def roots(seg3d_root: Path, seg2d_root: Path, cls3d_root: Path, cls2d_root: Path,
          seg3d_regions_root: Path, mtl2d_root: Path, enh2d_root: Path) -> dict[str, Path]:
    """Dataset root by config prefix (seg2d, seg3d, cls2d, cls3d, mtl2d, enh2d; seg3d_regions for region
    configs)."""
    return {"seg3d": seg3d_root, "seg2d": seg2d_root, "cls3d": cls3d_root, "cls2d": cls2d_root,
            "seg3d_regions": seg3d_regions_root, "mtl2d": mtl2d_root, "enh2d": enh2d_root}


def _one_epoch_checkpoint(config: str, root: Path, out: Path, *extra: str) -> Path:
    """Train one step and return ``last.ckpt`` (a real checkpoint for the prediction tests)."""
    from medseg.lightning_cli import MedSegCLI
    from medseg.resume import saved_checkpoint

    cli = MedSegCLI(args=[
        "fit", "--config", str(Path(__file__).parents[1] / "configs" / config), "--data.root", str(root),
        "--trainer.default_root_dir", str(out), "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1", *extra,
    ])
    return Path(saved_checkpoint(cli.trainer))


@pytest.fixture(scope="session")
def seg3d_checkpoint(seg3d_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _one_epoch_checkpoint("seg3d_unet.yaml", seg3d_root, tmp_path_factory.mktemp("ckpt3d"),
                                 "--model.init_args.network_args", '{"channels": [4, 8, 16]}')


@pytest.fixture(scope="session")
def cls2d_checkpoint(cls2d_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _one_epoch_checkpoint("cls2d_resnet18.yaml", cls2d_root, tmp_path_factory.mktemp("ckptcls"),
                                 "--model.init_args.network", "cnn3d", "--data.patch_size", "[32, 32]",
                                 "--model.init_args.network_args", '{"channels": [4, 8]}')


@pytest.fixture(scope="session")
def seg2d_checkpoint(seg2d_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2D U-Net (3 classes) after one step, on 32x32 windows (the 48x48 images take several)."""
    return _one_epoch_checkpoint("seg2d_unet.yaml", seg2d_root, tmp_path_factory.mktemp("ckpt2d"),
                                 "--data.patch_size", "[32, 32]",
                                 "--model.init_args.network_args", '{"channels": [4, 8, 16]}')


def perturbed_checkpoint(checkpoint: Path, out: Path, scale: float = 0.05, seed: int = 0) -> Path:
    """A copy of ``checkpoint`` whose network weights carry seeded noise: a second, different ensemble member."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(seed)
    for key, value in state["state_dict"].items():
        if key.startswith("net.") and value.is_floating_point():
            value.add_(scale * torch.randn(value.shape, generator=generator))
    torch.save(state, out)
    return out


SEG2D_CV_OVERRIDES = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.accelerator", "cpu",
    "--trainer.enable_progress_bar", "false", "--data.patch_size", "[32, 32]",
    "--model.init_args.network_args", '{"channels": [4, 8, 16]}',
]


def seg2d_cv_args(root: Path, output: Path, *extra: str) -> list[str]:
    """``medseg cv`` of a tiny 2D U-Net, 2 folds of one 2-step epoch: the arguments of ``seg2d_cv``'s run, so a
    rerun on a copy of it finds its folds done."""
    config = Path(__file__).parents[1] / "configs" / "seg2d_unet.yaml"
    return ["cv", "--config", str(config), "--folds", "2", "--data.root", str(root), *SEG2D_CV_OVERRIDES,
            "--output", str(output), *extra]


@pytest.fixture(scope="session")
def seg2d_cv(seg2d_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished ``medseg cv`` (``seg2d_cv_args``) on ``seg2d_root``, shared: read it, or change a copy
    (``shutil.copytree``; its fold records keep pointing at these checkpoints)."""
    from medseg.cli import main

    out = tmp_path_factory.mktemp("seg2d_cv") / "cv"
    assert main(seg2d_cv_args(seg2d_root, out)) == 0
    return out
