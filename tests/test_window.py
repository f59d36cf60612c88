"""The accelerator everywhere: where windows run and where they are stitched, and large 2D images in windows."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.data.io import write_nifti
from medseg.inference.batch import PredictOptions, resolve_device
from medseg.inference.native import LoadedModel, predict_segmentation
from medseg.inference.window import STITCH_SHARE, stitch_device, stitched_bytes


def test_stitched_bytes_count_every_output_channel_and_the_count_map() -> None:
    assert stitched_bytes((512, 512, 300), channels=4) == 4 * 512 * 512 * 300 * 5
    assert stitched_bytes((10, 10), channels=3, batch=2) == 4 * 100 * 7


def test_stitching_stays_on_the_gpu_while_it_fits_and_moves_to_the_cpu_when_not(caplog) -> None:
    shape, channels = (512, 512, 300), 14  # a many-class abdominal CT: 4.7 GB of stitched maps
    need = stitched_bytes(shape, channels)
    with caplog.at_level(logging.INFO, logger="medseg"):
        assert stitch_device(shape, channels, "cuda:1", free_bytes=int(need / STITCH_SHARE) + 1) == torch.device("cuda:1")
        assert not caplog.records
        assert stitch_device(shape, channels, "cuda:1", free_bytes=need) == torch.device("cpu")
    assert "stitching on the CPU" in caplog.text and "512x512x300" in caplog.text
    assert stitch_device(shape, channels, "cpu") == torch.device("cpu")  # no choice to make on the CPU


def test_predict_takes_cuda_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    assert PredictOptions(output=Path("o")).device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cuda:1") == "cuda:1"


class WidestInput(torch.nn.Module):
    """A threshold network that records the largest input it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.largest: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x[0, 0].numel() > int(np.prod(self.largest or (0,))):
            self.largest = tuple(x.shape[2:])
        return torch.cat([0.5 - x, x - 0.5], dim=1)


def test_a_large_2d_image_is_predicted_in_training_sized_windows(tmp_path: Path) -> None:
    """A 2400x1800 frame: the network never sees more than its 128x128 training patch (the old 2D path sent the
    whole image through the network as one window, which runs out of memory on 4k pathology tiles)."""
    image = np.zeros((2400, 1800), np.float32)
    image[300:900, 1000:1700] = 1.0
    path = write_nifti(image, np.diag([0.5, 0.5, 1.0, 1.0]), tmp_path / "frame.nii.gz")
    net = WidestInput()
    hparams = {"network": "t", "spatial_dims": 2, "in_channels": 1, "num_classes": 2, "roi_size": [128, 128],
               "sw_batch_size": 8, "preprocessing_spec": {"orientation": None}}
    labels = predict_segmentation(LoadedModel(net, hparams, "segmentation"), str(path))
    assert net.largest == (128, 128)
    assert labels.shape == image.shape and np.array_equal(labels, image.astype(labels.dtype))
