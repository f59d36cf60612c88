"""From a fingerprint to a configuration: the rules applied in order, and the config written as commented YAML.

The config is a normal medseg config (``medseg fit|cv|benchmark --config FILE.yaml`` run it unchanged); every
derived value carries its reason as a comment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.plan import rules
from medseg.plan.fingerprint import Fingerprint

BYTES_PER_FEATURE_VOXEL = 24
"""Activation memory of one channel of one voxel through a conv block in training (fp32, with what backward
keeps: conv, norm and activation outputs of two convolutions)."""
CPU_BUDGET = 4.0e6
"""Feature-voxels per batch on the CPU: about the compute of the shipped 3D config's step, at 32 features."""
FEATURE_CAP = {2: 512, 3: 320}
AUGMENTATION_3D = {
    "flip": {"prob": 0.5}, "rotate90": {"prob": 0.3}, "zoom": {"prob": 0.2, "min": 0.9, "max": 1.1},
    "scale_intensity": {"prob": 0.2, "factor": 0.1}, "shift_intensity": {"prob": 0.2, "offset": 0.1},
    "gamma": {"prob": 0.2, "min": 0.8, "max": 1.25}, "noise": {"prob": 0.15, "std": 0.05},
}
AUGMENTATION_2D = {  # the shipped 2D configs' augmentation
    "flip": {"prob": 0.5}, "affine": {"prob": 0.3, "min": 0.9, "max": 1.1, "degrees": 15},
    "brightness_contrast": {"prob": 0.2, "limit": 0.2}, "gamma": {"prob": 0.2, "min": 0.8, "max": 1.25},
    "noise": {"prob": 0.15, "std": 0.03}, "blur": {"prob": 0.1, "sigma": 1.0},
}


@dataclass
class Plan:
    """A planned config: ``config`` (plain data), ``comments`` (dotted key -> reason) and the summary rows."""

    config: dict[str, Any]
    comments: dict[str, str] = field(default_factory=dict)
    table: list[tuple[str, str, str]] = field(default_factory=list)


def make_plan(fingerprint: Fingerprint, dims: int, gpu_memory_gb: float | None = None,
              max_time: str | None = None, network: str = "planned_unet") -> Plan:
    """Apply the rules to ``fingerprint`` for a ``dims``-D model (see :mod:`medseg.plan.rules`)."""
    spec = fingerprint.spec
    if dims != fingerprint.spacings.shape[1]:
        found = fingerprint.spacings.shape[1]
        slices = "; planning 2D slices of 3D volumes is not supported yet" if found == 3 else ""
        raise ValueError(f"{spec.source}: --dims {dims}, but the images are {found}D{slices}")
    if network != "planned_unet":
        raise ValueError(f"--network {network!r}: medseg plan plans 'planned_unet' only so far")
    max_time_s = rules.parse_duration(max_time) if max_time else None
    spacing = rules.target_spacing(fingerprint.spacings)
    crop_share = float(np.median(np.prod(fingerprint.shapes, axis=1) /
                                 np.prod([c["shape"] for c in fingerprint.cases], axis=1)))
    stats = fingerprint.intensity_stats(0)
    intensity, crop = rules.intensity(spec.channel_names, stats, crop_share)
    median_shape = np.median(fingerprint.shapes * fingerprint.spacings / np.array(spacing.value), axis=0)
    budget, budget_reason, cost_of = _budget(gpu_memory_gb, dims, spec.in_channels, spec.num_classes)
    cap = FEATURE_CAP[dims]
    n_train = max(1, round(len(spec.training) * 0.8))
    patch, batch, topology = rules.patch_and_batch(median_shape, spacing.value, budget, 32, cap, cost_of, n_train)
    widths = rules.feature_widths(len(topology.value["strides"]), 32, cap)
    schedule = rules.schedule(n_train, batch.value, max_time_s, 10.0 if torch.cuda.is_available() else 2.0)
    device_precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"

    loading = _loading(fingerprint, spacing.value)
    plan = Plan(_config(spec, dims, spacing.value, intensity.value, crop.value, patch.value, batch.value,
                        topology.value, widths, network, schedule, device_precision, loading))
    plan.comments = {
        "data.preprocessing.spacing": spacing.reason,
        "data.preprocessing.intensity": intensity.reason,
        "data.preprocessing.crop_foreground": crop.reason,
        "data.patch_size": patch.reason,
        "data.batch_size": batch.reason,
        "data.samples_per_volume": schedule["samples_per_volume"].reason,
        "data.pos_fraction": schedule["pos_fraction"].reason,
        "model.init_args.network_args": topology.reason + f"; {widths[0]} features doubling to {cap} at most",
        "trainer.max_epochs": schedule["max_epochs"].reason,
        "trainer.check_val_every_n_epoch": schedule["check_val_every_n_epoch"].reason,
        "trainer.precision": "mixed precision on the GPU" if device_precision != "32-true" else "float32 on the CPU",
        "data.budget": budget_reason,
        "data.cache": loading["cache_reason"],
        "model.init_args.overlap": "windows overlap by half on a GPU (nnU-Net); by a quarter on the CPU, where "
                                   "each window is dear",
        "data.num_workers": loading["workers_reason"],
    }
    for limit in ("max_time", "max_steps"):
        if limit in schedule:
            plan.comments[f"trainer.{limit}"] = schedule[limit].reason
    plan.table = [
        ("cases", f"{len(spec.training)} training", "80% train / 20% validation"),
        ("spacing (mm)", _fmt(np.median(fingerprint.spacings, axis=0)), f"target {_fmt(spacing.value)}"),
        ("median shape", _fmt(np.median(fingerprint.shapes, axis=0), 0), f"resampled {_fmt(median_shape, 0)}"),
        ("foreground intensity", f"{stats['p00_5']:.4g} / {stats['p50']:.4g} / {stats['p99_5']:.4g}",
         intensity.value["intensity"]),
        ("patch x batch", "", f"{'x'.join(map(str, patch.value))} x {batch.value}"),
        ("network", "", f"{network}, {len(widths)} levels, {widths[0]}..{widths[-1]} features"),
        ("schedule", "", (f"max_time {schedule['max_time'].value}" if "max_time" in schedule
                          else f"max_steps {schedule['max_steps'].value}")
         + f", validation every {schedule['check_val_every_n_epoch'].value} epoch(s)"),
        ("budget", "", budget_reason),
    ]
    return plan


def _loading(fingerprint: Fingerprint, spacing: list[float]) -> dict[str, Any]:
    """Cache the preprocessed dataset in memory when it takes at most a quarter of this machine's memory;
    loader workers from the CPU count (none on 2 cores, where they compete with the training threads)."""
    import os

    resampled = fingerprint.shapes * fingerprint.spacings / np.array(spacing)
    gigabytes = float(np.prod(resampled, axis=1).sum()) * 4 * (fingerprint.spec.in_channels + 1) / 1e9
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    fits = gigabytes <= memory / 4
    cpus = os.cpu_count() or 1
    workers = 0 if cpus <= 2 else min(8, cpus // 2)
    return {"cache": "memory" if fits else "none", "num_workers": workers,
            "cache_reason": f"the preprocessed dataset takes about {gigabytes:.2g} GB of this machine's "
                            f"{memory:.0f} GB" + ("" if fits else ": too much to cache"),
            "workers_reason": f"{cpus} CPU(s) here"}


def _budget(gpu_memory_gb: float | None, dims: int, in_channels: int, classes: int) -> tuple[float, str, Any]:
    """The budget of a batch, where the figure comes from, and how a candidate's cost is found: measured on the
    GPU (bytes of one sample's forward and backward pass), estimated from feature-map sizes on the CPU."""
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        budget = gpu_memory_gb * 1e9 if gpu_memory_gb else 0.8 * total
        source = f"--gpu-memory {gpu_memory_gb:g} GB" if gpu_memory_gb else f"80% of {torch.cuda.get_device_name(0)}"
        return budget, f"{source}, measured: a forward and backward pass of each candidate on the GPU", \
            _measured_on_gpu(dims, in_channels, classes)
    if gpu_memory_gb:
        return (gpu_memory_gb * 1e9 / BYTES_PER_FEATURE_VOXEL,
                f"--gpu-memory {gpu_memory_gb:g} GB, estimated from feature-map sizes (no GPU here)", None)
    return CPU_BUDGET, "CPU: a fixed budget near the shipped 3D config's step (estimated from feature-map sizes)", None


def _measured_on_gpu(dims: int, in_channels: int, classes: int) -> Any:
    """``cost_of(patch, topology, widths)``: peak GPU bytes of one sample through a forward and backward pass of
    the planned U-Net in bf16 autocast, half of what a batch of 2 takes."""
    from medseg.models import create_model

    def cost_of(patch: list[int], topology: dict[str, Any], widths: list[int]) -> float:
        net = create_model("planned_unet", dims, in_channels, classes, kernels=topology["kernels"],
                           strides=topology["strides"], features=widths[0], max_features=widths[-1]).cuda()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                net(torch.randn(2, in_channels, *patch, device="cuda")).float().mean().backward()
            used = torch.cuda.max_memory_allocated() - start
        except torch.OutOfMemoryError:
            used = float("inf")
        del net
        torch.cuda.empty_cache()
        return used / 2

    return cost_of


def _config(spec: Any, dims: int, spacing: list[float], intensity: dict[str, Any], crop: bool, patch: list[int],
            batch: int, topology: dict[str, Any], widths: list[int], network: str, schedule: dict[str, Any],
            precision: str, loading: dict[str, Any]) -> dict[str, Any]:
    if network == "planned_unet":
        network_args: dict[str, Any] = {**topology, "features": widths[0], "max_features": widths[-1] if len(
            widths) > 1 else widths[0]}
    else:  # MONAI UNet: one width per level, the planned strides below the first level
        network_args = {"channels": widths, "strides": topology["strides"][1:], "norm": "instance",
                        "act": "leakyrelu"}
    trainer: dict[str, Any] = {
        "max_epochs": schedule["max_epochs"].value, "accelerator": "auto", "devices": 1, "precision": precision,
        "log_every_n_steps": 10, "check_val_every_n_epoch": schedule["check_val_every_n_epoch"].value,
        "default_root_dir": "runs",
        "callbacks": [
            {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
             "init_args": {"monitor": "val/dice", "mode": "max", "filename": "best-epoch{epoch:03d}",
                           "auto_insert_metric_name": False}},
            {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
             "init_args": {"filename": "last", "monitor": None, "save_top_k": 1, "every_n_epochs": 1,
                           "save_on_train_epoch_end": True, "enable_version_counter": False}},
            {"class_path": "pytorch_lightning.callbacks.LearningRateMonitor",
             "init_args": {"logging_interval": "epoch"}},
        ],
    }
    for limit in ("max_time", "max_steps"):
        if limit in schedule:
            trainer[limit] = schedule[limit].value
    preprocessing = {"orientation": "RAS", "spacing": spacing, **intensity, "crop_foreground": crop}
    return {
        "seed_everything": 0,
        "trainer": trainer,
        "model": {"class_path": "medseg.tasks.segmentation.SegmentationModule", "init_args": {
            "network": network, "network_args": network_args, "loss": "dice_ce",
            "loss_args": {"include_background": False},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003, "weight_decay": 1.0e-5}},
            "scheduler": {"class_path": SCHEDULER, "init_args": {"kind": "cosine"}},
            "sw_batch_size": 4, "overlap": 0.5 if precision != "32-true" else 0.25,
        }},
        "data": {
            "root": str(spec.root), "spatial_dims": dims, "patch_size": patch, "batch_size": batch,
            "samples_per_volume": schedule["samples_per_volume"].value,
            "pos_fraction": schedule["pos_fraction"].value, "val_fraction": 0.2, "cache": loading["cache"],
            "num_workers": loading["num_workers"], "preprocessing": preprocessing,
            "augmentation": _augmentation(dims, patch),
        },
    }


SCHEDULER = "medseg.tasks.schedule.Annealing"


def _augmentation(dims: int, patch: list[int]) -> dict[str, Any]:
    """The shipped configs' augmentation; ``rotate90`` (3D) only on a patch whose first two axes are equal."""
    if dims == 2:
        return dict(AUGMENTATION_2D)
    return {k: v for k, v in AUGMENTATION_3D.items() if k != "rotate90" or patch[0] == patch[1]}


def write_config(plan: Plan, path: Path, header: list[str]) -> Path:
    """Write ``plan`` as YAML with each reason as a comment beside its value (atomically)."""
    from medseg.data.io import atomic_path

    lines = [f"# {line}" for line in header]
    budget = plan.comments.get("data.budget")
    if budget:
        lines.append(f"# patch budget: {budget}")
    lines += _emit(plan.config, plan.comments, "", 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def _emit(mapping: dict[str, Any], comments: dict[str, str], prefix: str, depth: int) -> list[str]:
    """Block-style YAML for nested dicts, flow style (JSON, which YAML reads) for every other value."""
    lines, indent = [], "  " * depth
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        note = f"  # {comments[dotted]}" if dotted in comments else ""
        commented = any(c.startswith(dotted + ".") for c in comments)
        if isinstance(value, dict) and value and (commented or any(isinstance(v, dict) for v in value.values())):
            lines.append(f"{indent}{key}:{note}")
            lines += _emit(value, comments, dotted + ".", depth + 1)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(f"{indent}{key}:{note}")
            lines += [f"{indent}- {json.dumps(v)}" for v in value]
        else:
            lines.append(f"{indent}{key}: {json.dumps(value)}{note}")
    return lines



def _fmt(values: Any, digits: int = 3) -> str:
    return "x".join(f"{float(v):.{digits}g}" if digits else str(int(round(float(v)))) for v in values)
