"""Networks by name: ``create_model("unet", spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64))``.

The registry is filled here from the explicit model tables of :mod:`medseg.models.segmentation` and
:mod:`medseg.models.classification`. Add a model by writing a builder and registering a
:class:`~medseg.models.registry.ModelSpec` with :func:`register_model`; the registry-driven tests pick it up.
"""

from __future__ import annotations

from medseg.models import capsules, classification, inception, monai_nets, multitask, segmentation, unet3plus
from medseg.models.planned_unet import planned_unet_min_size
from medseg.models.pretrained import freeze_encoder, load_pretrained, unfreeze
from medseg.models.registry import (
    ModelSpec,
    create_model,
    get_model_spec,
    list_models,
    model_kwargs,
    model_task,
    register_model,
)

for _spec in (*segmentation.MODELS, *classification.MODELS, *unet3plus.MODELS, *inception.MODELS, *monai_nets.MODELS,
              *capsules.MODELS, *multitask.MODELS):
    register_model(_spec)
del _spec

__all__ = [
    "ModelSpec",
    "create_model",
    "freeze_encoder",
    "get_model_spec",
    "list_models",
    "load_pretrained",
    "model_kwargs",
    "model_task",
    "planned_unet_min_size",
    "register_model",
    "unfreeze",
]
