"""Multitask prediction of one case: a second pass of the class head over the windows (``case_class_probabilities``
after ``segment``, the way predict first did it) against the class head read in the segmentation's own window
pass (``segment(image_classes=...)``, what predict does). A 3D ``multitask_unet`` (default widths, random
weights), a 160x160x96 image, roi 64x64x32, overlap 0.25, 2 threads; median of 3 runs each, then the ratio and the
largest difference of the class probabilities.

    python scripts/bench_multitask.py
"""

import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medseg.data.io import write_nifti
from medseg.inference.members import ImageClasses
from medseg.inference.native import load_model
from medseg.inference.pipeline import group_models, prepare_case, segment
from medseg.models import create_model
from medseg.models.multitask import case_class_probabilities

torch.set_num_threads(2)
tmp = Path(tempfile.mkdtemp())
net = create_model("multitask_unet", 3, 1, 2, image_classes=2)
hp = {"network": "multitask_unet", "spatial_dims": 3, "in_channels": 1, "num_classes": 2,
      "label_names": ["b", "l"], "class_names": ["x", "y"], "network_args": {"image_classes": 2},
      "roi_size": [64, 64, 32], "overlap": 0.25, "sw_batch_size": 2, "loss": "dice_ce",
      "preprocessing_spec": {"orientation": "RAS", "intensity": "none"}}
torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "hyper_parameters": hp,
            "medseg_task": "multitask"}, tmp / "m.ckpt")
write_nifti(np.random.default_rng(0).normal(size=(160, 160, 96)).astype(np.float32), np.eye(4), tmp / "a.nii.gz")
model = load_model(tmp / "m.ckpt")
groups = group_models([model])
case = {"id": "a", "image": [str(tmp / "a.nii.gz")]}
before, after = [], []
for _ in range(3):
    prepared = prepare_case(case, groups)
    t = time.perf_counter()
    x = prepared.inputs[groups[0].key].as_tensor()[None]
    with torch.no_grad():
        p_old = case_class_probabilities(model.net, x, (64, 64, 32), 0.25, 2)
    segment(prepared, groups)
    before.append(time.perf_counter() - t)
    prepared = prepare_case(case, groups)
    t = time.perf_counter()
    classes = ImageClasses()
    segment(prepared, groups, image_classes=classes)
    after.append(time.perf_counter() - t)
    p_new = classes.probabilities()[0]
print(f"machine: {platform.node()} | torch {torch.__version__} | 2 threads")
print(f"two passes {statistics.median(before):.2f} s, one pass {statistics.median(after):.2f} s, "
      f"ratio {statistics.median(after) / statistics.median(before):.2f}; max |p diff| "
      f"{float(np.abs(p_old.numpy() - p_new).max()):.2e}")
