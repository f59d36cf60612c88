"""One network out of Python and back: TorchScript and ONNX files, checked against the network they came from.

A segmentation network only ever sees windows of its training patch (``roi``): the sliding window pads smaller
images up to it. So the exported network takes ``(N, C, *roi)`` with a free batch size, and everything around it
(preprocessing, the sliding window, test-time flips, inversion to the input grid) runs on the host, in medseg's
own pipeline, whichever runtime computes the windows. A classifier takes the whole preprocessed image.

TorchScript is scripted where the network allows it and traced on the roi otherwise (a trace is exact for one
input shape, and the windows have one shape). Every export is run once against the eager network on random
inputs, and refused when the largest logit difference exceeds :data:`TOLERANCE`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("medseg")

TOLERANCE = 1e-4
"""The largest absolute logit difference accepted between an exported network and the eager one."""
ONNX_OPSET = 17


def example_input(in_channels: int, shape: Sequence[int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A reproducible random input ``(batch, in_channels, *shape)`` in the range of normalised images."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, in_channels, *shape), generator=generator)


def to_torchscript(net: torch.nn.Module, example: torch.Tensor) -> tuple[torch.jit.ScriptModule, str]:
    """The network as TorchScript: ``(module, "script")``, or ``(module, "trace")`` when scripting fails."""
    net = net.eval()
    with _quiet():
        try:
            return torch.jit.script(net), "script"
        except Exception as err:  # MONAI networks with Python-only constructs: trace on the window shape
            logger.debug("scripting %s failed (%s: %s); tracing it", type(net).__name__, type(err).__name__, err)
        with torch.no_grad():
            return torch.jit.trace(net, example, check_trace=False), "trace"


def to_onnx(net: torch.nn.Module, example: torch.Tensor, path: Path, spatial_free: bool = False) -> None:
    """Write the network as ONNX with a free batch axis (and free spatial axes when ``spatial_free``)."""
    axes = {0: "batch"}
    if spatial_free:
        axes.update({i: f"d{i}" for i in range(2, example.ndim)})
    with _quiet(), torch.no_grad():
        torch.onnx.export(net.eval(), (example,), str(path), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": axes, "logits": axes if spatial_free else {0: "batch"}},
                          opset_version=ONNX_OPSET, dynamo=False)


def largest_difference(reference: torch.nn.Module, exported: object, inputs: Sequence[torch.Tensor]) -> float:
    """The largest absolute logit difference between ``reference`` and ``exported`` over ``inputs``."""
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            expected = logits_of(reference(x))
            got = logits_of(exported(x))
            if got.shape != expected.shape:
                return float("inf")
            worst = max(worst, float((got.float() - expected.float()).abs().max()))
    return worst


def logits_of(output: object) -> torch.Tensor:
    """The full-resolution logits of a network's output (a deep-supervision list gives its first entry)."""
    if isinstance(output, (list, tuple)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"a network returned {type(output).__name__}, not a tensor of logits")
    return output


class OnnxNetwork:
    """An ONNX file run by onnxruntime, called like the torch network it came from: a ``(N, C, ...)`` tensor in,
    float32 logits out on the input's device. The session runs on the CPU."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        try:
            import onnxruntime
        except ImportError as err:
            raise ImportError('ONNX models need onnxruntime: pip install "medseg[deploy]"') from err
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.path = str(path)
        self.session = onnxruntime.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().float().cpu().numpy())
        logits = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(logits).to(x.device)

    def to(self, device: str | torch.device) -> OnnxNetwork:
        """The session stays on the CPU; windows from any device are copied to it and back."""
        return self

    def eval(self) -> OnnxNetwork:
        return self


@contextlib.contextmanager
def _quiet():
    """Hide the exporters' tracer warnings (shape checks frozen into the trace: the windows have one shape)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield
