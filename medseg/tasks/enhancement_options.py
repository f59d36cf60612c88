"""The options an :class:`~medseg.tasks.enhancement.EnhancementModule` refuses, each in one line: model options
when it is built, trainer settings when ``fit`` starts."""

from __future__ import annotations

from typing import Any

from medseg.errors import ConfigError
from medseg.models import get_model_spec
from medseg.models.generator import CONDITIONS


def check_trainer(trainer: Any) -> None:
    """Refuse, in one line, trainer settings an enhancement GAN (two optimisers stepped by hand) cannot honour."""
    if trainer.gradient_clip_val:
        raise ConfigError(f"trainer.gradient_clip_val {trainer.gradient_clip_val}: Lightning cannot clip the "
                          "gradients of an enhancement GAN (manual optimisation); remove it")
    if trainer.accumulate_grad_batches != 1:
        raise ConfigError(f"trainer.accumulate_grad_batches {trainer.accumulate_grad_batches}: an enhancement GAN "
                          "steps its optimisers at every batch (manual optimisation); remove it, or raise "
                          "data.batch_size")
    # (fast_dev_run sets max_steps to its number of batches: a debugging run of a few batches, not a budget)
    if trainer.max_steps > 0 and trainer.max_steps % 2 and not trainer.fast_dev_run:
        raise ConfigError(f"trainer.max_steps {trainer.max_steps}: an enhancement GAN takes two optimiser steps "
                          "per batch (discriminator, generator) and Lightning counts both; give an even number, "
                          "twice the batches to train")


def check_options(network: str, network_args: dict[str, Any] | None, condition: str, residual: bool,
                   segmentation_only: Any, scheduler: Any, channels_last: bool, data_range: float, l1_weight: float,
                   adversarial_weight: float) -> None:
    """Refuse, in one line, options an enhancement model cannot honour."""
    if condition not in CONDITIONS:
        raise ConfigError(f"condition must be one of {list(CONDITIONS)}, got {condition!r}")
    if condition == "label" and residual:
        raise ConfigError("condition: label generates an image from a label map, with nothing to add the output to: "
                          "set residual: false (residual is for condition: image)")
    if segmentation_only:
        raise ConfigError("regions and image-level classes are for segmentation and multitask datasets; an "
                          "enhancement dataset cannot declare them")
    if scheduler is not None:
        raise ConfigError("EnhancementModule takes no learning-rate scheduler (its two optimisers keep the "
                          "optimizer's rate); remove model.init_args.scheduler")
    if channels_last:
        raise ConfigError("EnhancementModule does not support channels_last; set it to false")
    if not data_range > 0 or l1_weight < 0 or adversarial_weight < 0:
        raise ConfigError(f"need data_range > 0 and non-negative loss weights, got data_range {data_range}, "
                          f"l1_weight {l1_weight}, adversarial_weight {adversarial_weight}")
    if (network_args or {}).get("deep_supervision"):
        raise ConfigError("an enhancement generator gives one image: deep_supervision is for segmentation")
    spec = get_model_spec(network)
    if spec.task != "segmentation":
        raise ConfigError(f"network {network!r} is a {spec.task} network; an enhancement generator maps an image "
                          "to an image: use a segmentation network such as unet")
