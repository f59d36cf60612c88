"""What training and prediction share about an enhancement generator: its input and its output.

The generator is any segmentation network of the registry (a U-Net by default) built with
``network_channels = [in, out]`` (:func:`medseg.inference.native.network_channels`):

* ``condition: image``: the input is the degraded image (``in`` = its channels) and, with ``residual``, the
  network predicts the correction added to it, so an untrained generator starts from the identity;
* ``condition: label``: the input is the one-hot label map (``in`` = the classes, background included) and the
  output a new image (lesion simulation, ``medseg synthesize``).
"""

from __future__ import annotations

import torch
from torch import nn

CONDITIONS = ("image", "label")


def generator_output(net: nn.Module, condition: torch.Tensor, residual: bool) -> torch.Tensor:
    """The generated image ``(B, C, *S)`` for the generator input ``condition``: ``net(condition)``, plus the
    input itself when ``residual`` (image-conditioned generators only)."""
    out = net(condition)
    return out + condition if residual else out


def one_hot_condition(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A label map ``(B, 1, *S)`` of values ``0..num_classes-1`` as a float one-hot ``(B, num_classes, *S)``.

    Raises:
        ValueError: a value outside ``0..num_classes-1`` (one-hot would silently drop it).
    """
    values = label.long()
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
        raise ValueError(f"label values {int(values.min())}..{int(values.max())} outside 0..{num_classes - 1}")
    shape = list(values.shape)
    shape[1] = num_classes
    out = torch.zeros(shape, dtype=torch.float32, device=label.device)
    return out.scatter_(1, values, 1.0)
