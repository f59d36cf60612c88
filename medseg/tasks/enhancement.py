"""EnhancementModule: a pix2pix conditional GAN (Isola et al., 2017) that maps a degraded image, or a label map, to
a clean image.

The generator is a segmentation network of the registry (a U-Net by default) built with ``network_channels = [in,
out]`` and run through :func:`medseg.models.generator.generator_output`; the discriminator is a
:class:`~medseg.models.patchgan.PatchDiscriminator` that sees the generator's input (the condition) beside a real
or a generated image.

* ``condition: image``: image-to-image enhancement; with ``residual`` the generator predicts the correction
  added to the (preprocessed) input. Its last convolution starts at zero, so an untrained generator is the identity.
* ``condition: label``: the one-hot label map (background included) is the input and the output a new image
  (lesion simulation, ``medseg synthesize``); there is nothing to add the output to, so ``residual`` is refused.
  Its last convolution starts at zero weights and a bias of ``data_range / 2``: a uniform mid-range image.

Training uses manual optimisation, one discriminator step and one generator step per batch, with the vanilla GAN
loss (binary cross-entropy on logits, pix2pix's ``gan_mode: vanilla``): the discriminator minimises
``(BCE(D(c, y), 1) + BCE(D(c, G(c)), 0)) / 2`` and the generator ``adversarial_weight * BCE(D(c, G(c)), 1) +
l1_weight * |G(c) - y|``. Both optimisers come from ``optimizer`` (pix2pix: Adam, lr 2e-4, betas (0.5, 0.999); the
shipped configs take lr 1e-3, which converges faster on their small images). Lightning's ``global_step`` counts
both steps, so it grows by 2 per batch (an odd ``max_steps`` is refused). No learning-rate scheduler, and, as
Lightning cannot do them for manual optimisation, no ``gradient_clip_val`` nor ``accumulate_grad_batches`` (each
refused in one line). Under DDP the strategy must find unused parameters (``ddp_find_unused_parameters_true``):
each step leaves one network unused.

Validation generates whole images with the sliding window prediction uses (:mod:`medseg.inference.window`: the
training patch as roi, Gaussian blending) and logs ``val/psnr``, ``val/ssim`` (MONAI, ``data_range``) and ``val/l1``
against the target, for ``condition: image`` with ``intensity: none`` the degraded input's own ``val/psnr_input``
(with another intensity step the input is in other units than the target, so there is no such baseline), and, when
the cases have label maps, ``val/psnr_label``: the PSNR over the labelled structures only (a label-conditioned generator can draw
them, not the unlabelled tissue around them, so this is the metric to choose its checkpoint by). Each is a mean
over every case of every process. The generated image is in the target's units; the target is never normalised (the
preprocessing's intensity step acts on the image only), so an image-conditioned generator is simplest with
``intensity: none`` when the input and target share their units.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.metrics import PSNRMetric, SSIMMetric
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.trainer.states import TrainerFn
from torchmetrics import MeanMetric

from medseg.errors import ConfigError
from medseg.inference.window import Window, stitch
from medseg.models import create_model
from medseg.models.generator import generator_output, one_hot_condition
from medseg.models.patchgan import PatchDiscriminator
from medseg.tasks.base import NOT_SAVED, MedSegModule
from medseg.tasks.enhancement_options import check_options, check_trainer

METRICS = ("psnr", "ssim", "l1", "psnr_input", "psnr_label")


class EnhancementModule(MedSegModule):
    """The enhancement system: generator + PatchGAN discriminator + L1 and adversarial losses + PSNR/SSIM.

    Args:
        network: registry name of the generator (a segmentation network: ``(B, in, *S) -> (B, out, *S)``).
        network_args: the generator's options (channels, norm, act, dropout, ...).
        spatial_dims, in_channels, num_classes, label_names: linked from the data; ``num_classes`` is the one-hot
            width of a label-conditioned generator's input.
        regions, region_order, class_names: linked from the data for every model; an enhancement dataset has
            none, and anything but ``None`` is refused.
        condition: ``"image"`` (enhancement) or ``"label"`` (an image generated from a label map).
        residual: ``condition: image`` only: the generator's output is added to its input.
        l1_weight: weight of the L1 distance to the target in the generator's loss (pix2pix: 100).
        adversarial_weight: weight of the adversarial term (0 trains a plain L1 regression; the discriminator
            still trains and is logged).
        discriminator_args: :class:`~medseg.models.patchgan.PatchDiscriminator` options (``channels``, ``norm``).
        optimizer: optimiser factory, used for the generator and for the discriminator.
        scheduler: not supported: must be ``None``.
        roi_size: training patch and sliding-window roi (linked from ``data.patch_size``).
        sw_batch_size: windows per forward pass at validation and prediction.
        overlap: sliding-window overlap.
        data_range: the target's intensity range, for PSNR and SSIM (1.0 for targets in [0, 1]).
        preprocessing_spec: the effective preprocessing spec (linked from the data; saved for prediction).
        compile: ``torch.compile`` the generator (``True`` or a dict of options).
        channels_last: not supported: must be ``False``.
    """

    TASK = "enhancement"

    def __init__(
        self,
        network: str = "unet",
        network_args: dict[str, Any] | None = None,
        spatial_dims: int = 2,
        in_channels: int = 1,
        num_classes: int = 1,
        label_names: list[str] | None = None,
        regions: list[list[int]] | None = None,
        region_order: list[int] | None = None,
        class_names: list[str] | None = None,
        condition: str = "image",
        residual: bool = True,
        l1_weight: float = 100.0,
        adversarial_weight: float = 1.0,
        discriminator_args: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        roi_size: list[int] | None = None,
        sw_batch_size: int = 4,
        overlap: float = 0.25,
        data_range: float = 1.0,
        preprocessing_spec: dict[str, Any] | None = None,
        compile: bool | dict[str, Any] = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        check_options(network, network_args, condition, residual, regions or region_order or class_names,
                      scheduler, channels_last, data_range, l1_weight, adversarial_weight)
        self.save_hyperparameters(ignore=list(NOT_SAVED + ("regions", "region_order", "class_names",
                                                            "channels_last")))
        gen_in = num_classes if condition == "label" else in_channels
        self.net = create_model(network, spatial_dims, gen_in, in_channels, **(network_args or {}))
        # A residual generator starts as the identity, a label-conditioned one as a uniform mid-range image.
        _start_constant(self.net, 0.0 if residual else data_range / 2)
        self.discriminator = PatchDiscriminator(spatial_dims, gen_in + in_channels, **(discriminator_args or {}))
        self.hparams["network_channels"] = [gen_in, in_channels]  # medseg.inference.native.network_channels
        self.roi_size = list(roi_size or ([64, 64] if spatial_dims == 2 else [64, 64, 32]))
        self.hparams.roi_size = self.roi_size  # the checkpoint holds the roi prediction will use
        self.window = Window.from_hparams(self.hparams)
        self.optimizer_factory = optimizer
        self.automatic_optimization = False
        self.psnr = PSNRMetric(max_val=data_range)
        self.ssim = SSIMMetric(spatial_dims=spatial_dims, data_range=data_range)
        # Means over every case of every process (exact under DDP, as MedSegModule's eval losses).
        self.eval_metrics = torch.nn.ModuleDict(
            {f"{stage}_{name}": MeanMetric() for stage in ("val", "test") for name in METRICS})

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        """The generated image ``(B, in_channels, *S)`` for the generator input ``condition``."""
        return generator_output(self.net, condition, self.hparams.residual)

    def generator_input(self, batch: dict[str, Any]) -> torch.Tensor:
        """The condition of a batch: its image, or its label map one-hot encoded."""
        if self.hparams.condition == "image":
            return torch.as_tensor(batch["image"]).float()
        if batch.get("label") is None:
            raise ConfigError("condition: label needs a label map in every case; this batch has none")
        return one_hot_condition(torch.as_tensor(batch["label"]), self.hparams.num_classes)

    def generate(self, condition: torch.Tensor) -> torch.Tensor:
        """Whole images ``(B, in_channels, *S)`` by sliding window (the path ``medseg predict`` takes: same roi,
        overlap, window batch and Gaussian blending), in eval mode."""
        was_training = self.net.training
        try:
            self.net.eval()
            return stitch(lambda window: self(window).float(), condition, self.window, self.hparams.in_channels,
                          window_device=self.device)
        finally:
            self.net.train(was_training)

    def configure_callbacks(self) -> list[Any]:
        """No callbacks: Lightning calls this hook before it checks its trainer settings, so here :meth:`fit`
        refuses in one line the settings manual optimisation cannot honour (Lightning's own refusal is a traceback)."""
        if self.trainer.state.fn == TrainerFn.FITTING:
            check_trainer(self.trainer)
        return []

    def on_fit_start(self) -> None:
        """Fail before training, in one line, on a dataset without label maps for ``condition: label``, a patch
        the generator or the discriminator cannot take, or DDP that cannot train two networks in turn."""
        data = getattr(self.trainer, "datamodule", None)
        if self.hparams.condition == "label" and data is not None and not data.has_labels:
            raise ConfigError(f"{data.spec.source}: condition: label needs a label map in every training case; "
                              "this dataset has cases without one (use condition: image)")
        if self.trainer.world_size > 1 and not getattr(self.trainer.strategy, "_ddp_kwargs", {}).get(
                "find_unused_parameters"):
            raise ConfigError("an enhancement GAN trains its two networks in turn, each step leaving the other's "
                              "parameters unused: under DDP set trainer.strategy: ddp_find_unused_parameters_true")
        channels = self.hparams.network_channels[0]
        probe = torch.zeros(1, channels, *self.roi_size, device=self.device)
        was_training = self.net.training, self.discriminator.training
        try:
            with torch.no_grad():
                fake = self.net.eval()(probe)
                self.discriminator.eval()(torch.cat([probe, fake], dim=1))
        except (RuntimeError, ValueError) as err:
            raise ConfigError(
                f"patch_size {self.roi_size} does not suit generator {self.hparams.network!r} "
                f"{self.hparams.network_args or {}} and the discriminator (sides of at least "
                f"{self.discriminator.min_size()}): each side must be divisible by 2**depth ({err})") from err
        finally:
            self.net.train(was_training[0])
            self.discriminator.train(was_training[1])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One discriminator step, then one generator step (module docstring)."""
        opt_g, opt_d = self.optimizers()
        condition = self.generator_input(batch)
        real = torch.as_tensor(batch["target"]).float()
        fake = self(condition)
        with self.toggled_optimizer(opt_d):
            loss_d = 0.5 * (_bce(self._judge(condition, real), True)
                            + _bce(self._judge(condition, fake.detach()), False))
            opt_d.zero_grad()
            self.manual_backward(loss_d)
            opt_d.step()
        with self.toggled_optimizer(opt_g):
            l1 = F.l1_loss(fake.float(), real)
            loss_g = self.hparams.l1_weight * l1
            if self.hparams.adversarial_weight:
                loss_g = loss_g + self.hparams.adversarial_weight * _bce(self._judge(condition, fake), True)
            opt_g.zero_grad()
            self.manual_backward(loss_g)
            opt_g.step()
        # Step values of this process (progress bar, step log); the epoch mean of the L1 distance is synced
        # across processes once an epoch.
        self.log("train/loss_g", loss_g.detach(), prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/loss_d", loss_d.detach(), prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/l1", l1.detach(), on_step=True, on_epoch=False)
        self.log("train/l1_epoch", l1.detach(), on_step=False, on_epoch=True, batch_size=real.shape[0],
                 sync_dist=True)

    def _judge(self, condition: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The discriminator's real/fake logits for ``image`` beside its ``condition``."""
        return self.discriminator(torch.cat([condition, image.to(condition.dtype)], dim=1))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """The generator's optimiser, then the discriminator's (both from ``optimizer``)."""
        return [self.optimizer_factory(self.net.parameters()),
                self.optimizer_factory(self.discriminator.parameters())]

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        condition = self.generator_input(batch)
        fake = self.generate(condition)
        target = torch.as_tensor(batch["target"]).float().to(fake.device)
        values = {"psnr": self.psnr(fake, target), "ssim": self.ssim(fake, target),
                  "l1": (fake - target).abs().flatten(1).mean(dim=1)}
        if self.hparams.condition == "image" and self._input_in_target_units():
            values["psnr_input"] = self.psnr(torch.as_tensor(batch["image"]).float().to(fake.device), target)
        if batch.get("label") is not None:
            inside = torch.as_tensor(batch["label"]).to(fake.device) > 0
            values["psnr_label"] = self._psnr_inside(fake, target, inside)
        self.psnr.reset()
        self.ssim.reset()
        for name, value in values.items():
            value = value.reshape(-1)
            value = value[~torch.isnan(value)]  # psnr_label of a case without structures
            metric = self.eval_metrics[f"{stage}_{name}"]
            for case_value in value:
                metric.update(case_value.to(self.device))
            # Logged even without a value (a batch of cases without structures): under DDP every process must
            # take part in the epoch-end sync of each metric one of them logs.
            self.log(f"{stage}/{name}", metric, prog_bar=name == "psnr", on_epoch=True, batch_size=target.shape[0])

    def _input_in_target_units(self) -> bool:
        """Whether the network's input is the image file as it is (``intensity: none``): only then is the degraded
        input's own PSNR against the target a baseline (a normalised input is in other units than the target)."""
        return (self.hparams.preprocessing_spec or {}).get("intensity", "none") == "none"

    def _psnr_inside(self, fake: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per case, the PSNR over the voxels of ``mask`` ``(B, 1, *S)`` (every channel); NaN where it is empty."""
        mask = mask.expand_as(target).flatten(1)
        squared = ((fake - target) ** 2).flatten(1)
        mse = (squared * mask).sum(dim=1) / mask.sum(dim=1)  # NaN for an empty mask
        return 10.0 * torch.log10(self.hparams.data_range**2 / mse)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")


def _bce(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Binary cross-entropy of the discriminator's logits against all-real (1) or all-fake (0), in float32."""
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 1.0 if real else 0.0))


def _start_constant(net: torch.nn.Module, value: float) -> None:
    """Make the network's output start as ``value`` everywhere: its last convolution in module order (the output
    layer of every registry segmentation network) gets zero weights and ``value`` as bias."""
    convolutions = [m for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    if convolutions:
        with torch.no_grad():
            convolutions[-1].weight.zero_()
            if convolutions[-1].bias is not None:
                convolutions[-1].bias.fill_(value)
