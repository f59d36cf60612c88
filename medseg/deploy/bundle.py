"""A MONAI bundle in the exported folder: MONAI's own runner predicts what ``medseg predict`` predicts.

The folder gains::

    configs/inference.json   MONAI components only (no medseg import): load, reorient, resample, crop, intensity,
                             sliding window, inversion to the input grid, argmax, one ``<case>.nii.gz`` per input
    configs/metadata.json    MONAI's metadata fields, the channels' meaning, and what the bundle leaves out
    models/model.ts          one TorchScript module: every member network under every test-time flip, returning
                             the mean of their activated outputs, so the sliding window blends probabilities

and predicts a folder of NIfTI files (``*.nii``, ``*.nii.gz`` directly in it; a folder with none makes the runner
fail with ``FileNotFoundError`` rather than write nothing) with::

    python -m monai.bundle run --config_file DIR/configs/inference.json --meta_file DIR/configs/metadata.json \\
        --bundle_root DIR --dataset_dir IN --output_dir OUT

(MONAI's command line needs the ``fire`` package; ``monai.bundle.run(...)`` takes the same arguments.)

The steps are medseg's (:mod:`medseg.data.transforms`, :mod:`medseg.inference.pipeline`) written as MONAI
transforms: the intensity presets as the MONAI transforms medseg's in-place versions reproduce, the window's roi,
overlap, batch and Gaussian blending, the probabilities inverted linearly. Where the preprocessed grid does not
cover an input voxel (outside a foreground crop, at a resampled border) medseg counts the members as calling
background; the bundle does the same by inverting ``p - onehot(background)`` (what the crop's zero padding then
adds is background) and adding the one-hot back. Models whose prediction cannot be written this way raise
:class:`BundleUnsupported`, whose message says why (the export records it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.data.io import atomic_path
from medseg.data.transforms import _RAS_LABELS, Preprocessing
from medseg.inference.native import LoadedModel
from medseg.inference.pipeline import may_leave_gaps

TOLERANCE = 1e-5
"""The largest probability difference accepted between ``model.ts`` and medseg's own member windows."""
RUNNER = ("python -m monai.bundle run --config_file {root}/configs/inference.json --meta_file "
          "{root}/configs/metadata.json --bundle_root {root} --dataset_dir IN --output_dir OUT")
LEFT_OUT = [
    "post-processing steps (medseg predict --postprocess, e.g. keeping the largest component)",
    "the calibration temperature (it changes probabilities, never the label map)",
    "vote ensembles (the bundle averages probabilities)",
    "probability, entropy and uncertainty maps; predictions.csv and run.json",
    "medseg's input checks: NaN/Inf voxels, header sizes against --max-voxels, channel counts",
    "multi-file cases (nnU-Net's <case>_0000.nii.gz naming): each input file is one case",
    "subfolders, DICOM series and PNG/JPG inputs: the bundle reads the *.nii/*.nii.gz files directly in dataset_dir "
    "(a 2D model's images too: convert PNG/JPG to NIfTI first); without any, the runner fails",
    "half-precision windows on a GPU: the bundle always runs float32",
]
_MODALITY = {"ct": ("CT", "hounsfield"), "ct_zscore": ("CT", "hounsfield"), "mri": ("MR", "magnitude"),
             "us": ("US", "magnitude"), "xray": ("XR", "magnitude")}


class BundleUnsupported(ValueError):
    """The model cannot be a MONAI bundle that predicts what medseg predicts; the message says why."""


class MeanProbabilities(torch.nn.Module):
    """``(N, C, *roi)`` windows -> ``(N, P, *roi)``: the mean over networks x flips of the activated logits,
    each flipped back (:class:`medseg.inference.members.MemberWindows`' mean, in the same order)."""

    # TorchScript reads the attribute's type here: a real type, as this module's annotations are strings.
    __annotations__ = {"flips": list[list[int]]}

    def __init__(self, nets: Sequence[torch.nn.Module], flips: Sequence[tuple[int, ...]], softmax: bool) -> None:
        super().__init__()
        self.nets = torch.nn.ModuleList(nets)
        self.flips = [[axis + 2 for axis in flip] for flip in flips]
        self.softmax = softmax
        self.members = float(len(nets) * len(flips))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(0)
        count = 0
        for net in self.nets:
            for dims in self.flips:
                logits = net(torch.flip(x, dims) if len(dims) > 0 else x).float()
                p = torch.softmax(logits, dim=1) if self.softmax else torch.sigmoid(logits)
                if len(dims) > 0:
                    p = torch.flip(p, dims)
                total = p if count == 0 else total + p
                count += 1
        return total / self.members if count > 1 else total


def write_bundle(directory: Path, models: Sequence[LoadedModel], flips: Sequence[tuple[int, ...]], name: str,
                 *, ensemble: str = "mean") -> None:
    """Write ``configs/inference.json``, ``configs/metadata.json`` and ``models/model.ts`` into ``directory``.

    Args:
        directory: the exported model folder.
        models: the ensemble's members (networks on the CPU).
        flips: test-time flips, each a tuple of spatial axes (``()`` = none).
        name: the model's name (the metadata's description).
        ensemble: only ``"mean"`` can be a bundle.

    Raises:
        BundleUnsupported: for a model whose prediction a bundle cannot reproduce (the reason in the message).
    """
    spec = _shared_spec(models, ensemble)
    if not flips:
        raise ValueError("give at least one flip (() = none)")
    directory = Path(directory)
    module, traced = _ensemble_module(models, flips)
    on_cpu = 'value="cpu"' in str(module.inlined_graph)  # a trace that creates tensors on the CPU stays there
    # Everything is built before the first file is written: a refusal leaves no partial bundle.
    config = inference_config(spec, models[0], on_cpu)
    metadata = bundle_metadata(models, flips, name, spec, traced)
    (directory / "models").mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / "models" / "model.ts") as tmp:
        module.save(tmp)
    for file, content in (("inference.json", config), ("metadata.json", metadata)):
        with atomic_path(directory / "configs" / file) as tmp:
            Path(tmp).write_text(json.dumps(content, indent=2) + "\n")


def _shared_spec(models: Sequence[LoadedModel], ensemble: str) -> Preprocessing:
    """The one preprocessing spec every member shares; refuses what a bundle cannot express."""
    if ensemble != "mean":
        raise BundleUnsupported(f"a MONAI bundle averages probabilities; a {ensemble!r} ensemble cannot be one")
    if not models:
        raise BundleUnsupported("no model to put in the bundle")
    first = models[0]
    if first.hparams["in_channels"] != 1:
        raise BundleUnsupported(f"the model takes {first.hparams['in_channels']} input channels, and the bundle "
                                "reads one single-channel file per case (nnU-Net's <case>_0000.nii.gz naming is "
                                "medseg's own)")
    if any(m.task != "segmentation" for m in models):
        raise BundleUnsupported("only segmentation models become MONAI bundles (a classifier has no label map)")
    if first.outputs.regions:
        raise BundleUnsupported("a region model's label map is built region by region (nnU-Net's order), which "
                                "MONAI's AsDiscrete cannot express")
    for model in models[1:]:
        if model.preprocessing_key != first.preprocessing_key or model.window != first.window:
            raise BundleUnsupported("the members do not share one preprocessing spec and sliding window; a bundle "
                                    "has one preprocessing and one window")
        if model.outputs != first.outputs:
            raise BundleUnsupported("the members' output channels differ")
    return Preprocessing.from_dict(first.hparams.get("preprocessing_spec"))


def _ensemble_module(models: Sequence[LoadedModel],
                     flips: Sequence[tuple[int, ...]]) -> tuple[torch.jit.ScriptModule, list[bool]]:
    """The members as one TorchScript module, checked against medseg's own windows on random inputs, and
    whether each member network was traced (on the roi: exact for the windows, which all have that shape)."""
    from medseg.deploy.networks import example_input, to_torchscript
    from medseg.inference.members import Layout, MemberWindows

    first = models[0]
    outputs, roi = first.outputs, list(first.window.roi)
    channels = first.hparams["in_channels"]
    nets = [m.net.cpu().eval() for m in models]
    members = [to_torchscript(net, example_input(channels, roi)) for net in nets]
    try:
        module = torch.jit.script(MeanProbabilities([m for m, _ in members], flips, outputs.activation == "softmax"))
    except Exception as err:  # any scripting failure: say why there is no bundle
        raise BundleUnsupported(f"the members cannot be joined into one TorchScript module ({err})") from err
    reference = MemberWindows(nets, flips, outputs, Layout(outputs.channels))
    with torch.no_grad():
        for x in (example_input(channels, roi), example_input(channels, roi, batch=3, seed=1)):
            difference = float((module(x) - reference(x)).abs().max())
            if not difference <= TOLERANCE:
                raise BundleUnsupported(f"the TorchScript ensemble differs from medseg's windows by {difference:.3g} "
                                        f"in probability (at most {TOLERANCE:g} is accepted)")
    return module, [how == "trace" for _, how in members]


def inference_config(spec: Preprocessing, model: LoadedModel, on_cpu: bool = False) -> dict[str, Any]:
    """``configs/inference.json``: medseg's prediction of a segmentation model in MONAI components (on a GPU
    when there is one, unless ``on_cpu``)."""
    dims, window, outputs = model.hparams["spatial_dims"], model.window, model.outputs
    background = may_leave_gaps(model)  # medseg's coverage rule
    shift = [_lambda("pred", "lambda x: torch.cat([x[:1] - 1.0, x[1:]])")] if background else []
    unshift = [_lambda("pred", "lambda x: torch.cat([x[:1] + 1.0, x[1:]])")] if background else []
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "dataset_dir": "$os.path.join(@bundle_root, 'input')",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "device": "$torch.device('cpu')" if on_cpu else "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        # no input file is an error (a generator's throw raises inside an expression), not an empty run
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) "
                    "+ glob.glob(os.path.join(@dataset_dir, '*.nii'))) or (_ for _ in ()).throw(FileNotFoundError("
                    "'no *.nii or *.nii.gz file directly in ' + @dataset_dir + ': the bundle reads NIfTI files'))",
        "network": "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), map_location=@device).eval()",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing_transforms(spec, dims)},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @datalist]",
                    "transform": "@preprocessing"},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(window.roi),
                    "sw_batch_size": window.batch_size, "overlap": window.overlap, "mode": window.blend},
        "postprocessing": {"_target_": "Compose", "transforms": [
            *shift,
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            *unshift,
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "",
             "output_ext": ".nii.gz", "output_dtype": f"$numpy.{np.dtype(outputs.label_dtype).name}",
             "resample": False, "separate_folder": False, "print_log": False},
        ]},
        # one case: its label map is written, and only the input's name is kept (not the case's arrays)
        "predict": "$lambda d: @postprocessing(dict(d, pred=@inferer(d['image'][None].to(@device), @network)[0]))"
                   "['pred'].meta['filename_or_obj']",
        "initialize": ["$torch.set_grad_enabled(False)"],
        "run": ["$[@predict(d) for d in @dataset]"],
    }


def preprocessing_transforms(spec: Preprocessing, dims: int) -> list[dict[str, Any]]:
    """:func:`medseg.data.transforms.preprocess_transforms` for ``image`` as MONAI config components."""
    out: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True, "ensure_channel_first": True},
        {"_target_": "EnsureTyped", "keys": "image", "dtype": None, "track_meta": True},
    ]
    if spec.orientation:
        out.append({"_target_": "Orientationd", "keys": "image", "axcodes": spec.orientation[:dims],
                    "labels": [list(pair) for pair in _RAS_LABELS]})
    if spec.spacing:
        out.append({"_target_": "Spacingd", "keys": "image", "pixdim": [float(s) for s in spec.spacing],
                    "mode": "bilinear"})
    if spec.crop_foreground:
        out.append({"_target_": "CropForegroundd", "keys": "image", "source_key": "image",
                    "select_fn": "$lambda x: x != 0", "allow_smaller": True})
    out.extend(_intensity(spec))
    if spec.resize:
        out.append({"_target_": "Resized", "keys": "image", "spatial_size": list(spec.resize), "mode": "area"})
    out.append({"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"})
    return out


def _intensity(spec: Preprocessing) -> list[dict[str, Any]]:
    """The intensity preset as the MONAI transforms medseg's own (in place, in slabs) reproduce."""
    if spec.intensity == "ct":
        low, high = (float(v) for v in spec.ct_window)
        return [{"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": low, "a_max": high, "b_min": 0.0,
                 "b_max": 1.0, "clip": True}]
    if spec.intensity == "ct_zscore":
        (low, high), (mean, std) = (float(v) for v in spec.clip), (float(v) for v in spec.zscore)
        return [{"_target_": "ThresholdIntensityd", "keys": "image", "threshold": low, "above": True, "cval": low},
                {"_target_": "ThresholdIntensityd", "keys": "image", "threshold": high, "above": False, "cval": high},
                {"_target_": "NormalizeIntensityd", "keys": "image", "subtrahend": mean, "divisor": std}]
    if spec.intensity == "mri":
        return [{"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True}]
    if spec.intensity == "zscore":
        return [{"_target_": "NormalizeIntensityd", "keys": "image", "channel_wise": True}]
    if spec.intensity in ("us", "xray"):
        return [{"_target_": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0, "channel_wise": True}]
    if spec.intensity == "none":
        return []
    raise BundleUnsupported(f"the intensity preset {spec.intensity!r} has no MONAI equivalent in the bundle")


def _lambda(key: str, func: str) -> dict[str, Any]:
    return {"_target_": "Lambdad", "keys": key, "func": f"${func}"}


def bundle_metadata(models: Sequence[LoadedModel], flips: Sequence[tuple[int, ...]], name: str,
                    spec: Preprocessing, traced: Sequence[bool] = ()) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI's metadata schema fields plus what the bundle leaves out (``traced``:
    which members' networks were traced rather than scripted)."""
    import monai

    from medseg import __version__

    first = models[0]
    outputs, window = first.outputs, first.window
    channels = first.hparams["in_channels"]
    modality, value_format = _MODALITY.get(spec.intensity, ("unknown", "magnitude"))
    kind = "softmax class probabilities" if outputs.activation == "softmax" else "independent sigmoid probabilities"
    members = f"{len(models)} network(s) x {len(flips)} test-time flip(s)"
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by medseg {__version__}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": _version("nibabel"), "fire": _version("fire")},  # fire: the CLI
        "name": name,
        "task": f"{first.hparams['spatial_dims']}D segmentation",
        "description": f"{name}: medseg model ({members}, mean of {kind}), predicting one label map per input file "
                       "on the input's grid",
        "authors": "exported by medseg",
        "copyright": "not stated: ask whoever trained the model",
        "data_type": "nibabel",
        "input_files": "one NIfTI file per case (*.nii, *.nii.gz directly in dataset_dir; no PNG/JPG, no DICOM), "
                  "single-channel",
        "image_classes": f"{channels} channel(s), preprocessed as {json.dumps(spec.to_dict(), sort_keys=True)}",
        "label_classes": ", ".join(f"{k}: {label}" for k, label in enumerate(outputs.names)),
        "pred_classes": f"{outputs.channels} channels of {kind} (the argmax is written)",
        "intended_use": "research; check the model's validation before any other use",
        "inference": {"runner": RUNNER.format(root="DIR"), "members": len(models),
                      "flips": [list(f) for f in flips], "traced_members": [k for k, t in enumerate(traced) if t],
                      "window": {
                          "roi": list(window.roi), "overlap": window.overlap, "sw_batch_size": window.batch_size,
                          "blend": window.blend}},
        "left_out_compared_to_medseg_predict": LEFT_OUT,
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": value_format, "modality": modality, "num_channels": channels,
                "spatial_shape": list(window.roi), "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": {str(c): f"input channel {c}" for c in range(channels)},
            }},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": outputs.channels,
                "spatial_shape": list(window.roi), "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": True, "channel_def": {str(k): label for k, label in enumerate(outputs.names)},
            }},
        },
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
