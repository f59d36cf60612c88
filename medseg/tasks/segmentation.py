"""SegmentationModule: random-patch training, whole-volume sliding-window validation, Dice per class or region."""

from __future__ import annotations

import copy
from typing import Any

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable

from medseg.errors import ConfigError
from medseg.inference.members import Layout, MemberWindows
from medseg.inference.outputs import OutputSpec
from medseg.inference.window import Window, stitch
from medseg.losses import loss_activation
from medseg.metrics.conventions import mask_dice
from medseg.tasks.base import NOT_SAVED, MedSegModule


class SegmentationModule(MedSegModule):
    """The segmentation system: network + loss + metrics + optimiser.

    Args:
        network: registry name (``medseg.models.list_models("segmentation")``).
        network_args: keyword arguments of the network (channels, depth, norm, act, dropout, ...).
        spatial_dims: 2 or 3 (linked from the data in the CLI).
        in_channels: input channels (linked from the data).
        num_classes: output classes including background (linked from the data).
        label_names: class names, index order (linked from the data; saved for prediction); for a region
            dataset, the region names.
        regions: region-based training (linked from the data's ``regions``): the label values of each region,
            one output channel each, trained with a sigmoid loss on region targets.
        region_order: the label value each region writes when a label map is rebuilt, in order.
        class_names: linked from the data for every model: a multitask dataset's image-level classes, which a
            segmentation model refuses (use :class:`~medseg.tasks.multitask.MultiTaskModule`).
        loss: loss name (``medseg.losses.list_losses()``).
        loss_args: loss options (activation, class_weights, ...).
        optimizer: optimiser factory, ``class_path``/``init_args`` in YAML.
        scheduler: learning-rate scheduler factory or ``None``.
        scheduler_monitor: metric a ReduceLROnPlateau scheduler watches.
        roi_size: sliding-window roi (linked from ``data.patch_size``).
        sw_batch_size: windows per forward pass at validation/prediction.
        overlap: sliding-window overlap.
        dice_both_empty: ``val/dice`` of a structure absent from both a case's reference and its prediction:
            1 (Metrics Reloaded; the rule ``medseg evaluate`` reports with, see
            :mod:`medseg.metrics.conventions`), or NaN to leave such pairs out (YAML ``.nan``; on the command line
            ``--model.init_args.dice_both_empty .nan``). A structure predicted where the reference has none always
            scores 0, so over-segmentation costs Dice when the checkpoint is chosen.
        preprocessing_spec: the effective preprocessing spec (linked from the data; saved for prediction).
        pretrained: local file with a compatible state dict to start from (never downloaded).
        freeze_encoder: freeze the encoder after loading ``pretrained``.
        compile: ``torch.compile`` the network (``True``, or a dict of ``torch.compile`` options such as
            ``{mode: max-autotune}``); the checkpoint's weights keep their plain names.
        channels_last: channels-last memory layout for the network and its inputs (faster convolutions
            with mixed precision on recent GPUs; no gain on CPU).
    """

    def __init__(
        self,
        network: str = "unet",
        network_args: dict[str, Any] | None = None,
        spatial_dims: int = 3,
        in_channels: int = 1,
        num_classes: int = 2,
        label_names: list[str] | None = None,
        regions: list[list[int]] | None = None,
        region_order: list[int] | None = None,
        class_names: list[str] | None = None,
        loss: str = "dice_ce",
        loss_args: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_monitor: str = "val/loss",
        roi_size: list[int] | None = None,
        sw_batch_size: int = 4,
        overlap: float = 0.25,
        dice_both_empty: float = 1.0,
        preprocessing_spec: dict[str, Any] | None = None,
        pretrained: str | None = None,
        freeze_encoder: bool = False,
        compile: bool | dict[str, Any] = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if class_names and self.TASK == "segmentation":
            raise ValueError("this dataset has image-level 'classes': train it with "
                             "medseg.tasks.multitask.MultiTaskModule, or drop 'classes' to segment only")
        self.save_hyperparameters(ignore=list(NOT_SAVED))
        self._build(
            network, network_args, spatial_dims, in_channels, num_classes, loss, loss_args,
            optimizer, scheduler, pretrained, freeze_encoder,
        )
        self.roi_size = list(roi_size or ([96, 96] if spatial_dims == 2 else [64, 64, 32]))
        self.hparams.roi_size = self.roi_size  # the checkpoint holds the roi prediction will use
        _check_regions(num_classes, regions, region_order, loss, loss_args)
        self.outputs = OutputSpec.from_hparams(self.hparams)  # what prediction rebuilds from the checkpoint
        self.window = Window.from_hparams(self.hparams)
        # Dice per case and scored structure under medseg's empty-mask rules (medseg.metrics.conventions),
        # gathered on the CPU over an epoch.
        self._dice_rows: list[torch.Tensor] = []
        self._cpu_loss: torch.nn.Module | None = None

    def on_fit_start(self) -> None:
        """Fail before training, with a readable message, when the patch does not suit the network."""
        probe = torch.zeros(1, self.hparams.in_channels, *self.roi_size, device=self.device)
        was_training = self.net.training
        try:
            with torch.no_grad():
                self.net.eval()(probe)
        except RuntimeError as err:
            raise ConfigError(
                f"patch_size {self.roi_size} does not suit network {self.hparams.network!r} "
                f"{self.hparams.network_args or {}}: each side must be divisible by 2**depth ({err})"
            ) from err
        finally:
            self.net.train(was_training)

    def predict_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Whole-image probabilities ``(B, P, *spatial)`` by sliding window: the path ``medseg predict`` takes
        (same window, blending and activation), on the GPU or, when the stitched maps would not fit, the CPU."""
        layout = Layout(self.outputs.channels)
        predictor = MemberWindows([self], [()], self.outputs, layout)
        was_training = self.net.training
        try:  # eval mode: a deep-supervision network returns its full-resolution output only
            self.net.eval()
            return stitch(predictor, image, self.window, layout.size, window_device=self.device)
        finally:
            self.net.train(was_training)

    def training_targets(self, label: torch.Tensor) -> torch.Tensor:
        """The loss target: the label map ``(B, 1, ...)``, or for regions their masks ``(B, R, ...)``."""
        if not self.outputs.regions:
            return label
        return torch.stack([self.outputs.masks(case[0]) for case in label]).float()

    def _evaluate(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        image = torch.as_tensor(batch["image"])
        label = torch.as_tensor(batch["label"]).long()
        probabilities = self.predict_probabilities(image)
        label = label.to(probabilities.device)
        loss_fn = self.loss_fn if probabilities.device == self.device else self._loss_on_cpu()
        loss = loss_fn(self.outputs.logits_for_loss(probabilities), self.training_targets(label))
        self._log_eval_loss(stage, loss.to(self.device), image.shape[0])
        predicted = torch.stack([self.outputs.masks(self.outputs.decode(p)) for p in probabilities])
        reference = torch.stack([self.outputs.masks(case[0].to(torch.int16)) for case in label])
        self._dice_rows.append(mask_dice(predicted, reference, self.hparams.dice_both_empty).float().cpu())
        return loss

    def _loss_on_cpu(self) -> torch.nn.Module:
        """The loss, on the CPU, for volumes whose stitched probabilities did not fit on the GPU."""
        if self._cpu_loss is None:
            self._cpu_loss = copy.deepcopy(self.loss_fn).cpu()
        return self._cpu_loss

    def _log_dice(self, stage: str) -> None:
        """Log the Dice of all cases of all processes: each process sums its cases, the sums are added up
        across processes (every case is on exactly one, see medseg.data.sampling), and every process logs
        the same value, so the best checkpoint is the same everywhere."""
        width = len(self.outputs.structures)
        rows = torch.cat(self._dice_rows) if self._dice_rows else torch.empty(0, width)
        self._dice_rows = []
        sums, counts = dice_sums(rows.to(self.device))
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        per_structure = (sums / counts).float()  # NaN only where every pair was left out (dice_both_empty=nan)
        # sync_dist averages values that are already equal on every process (Lightning asks for it).
        self.log(f"{stage}/dice", torch.nanmean(per_structure), prog_bar=True, sync_dist=True)
        for suffix, value in zip(self.outputs.metric_suffixes, per_structure, strict=True):
            self.log(f"{stage}/dice_{suffix}", value, sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_dice("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_dice("test")


def _check_regions(
    num_classes: int, regions: list[list[int]] | None, region_order: list[int] | None, loss: str,
    loss_args: dict[str, Any] | None,
) -> None:
    """Refuse region models with a softmax loss, a loss without channel 0, or outputs that do not match."""
    if not regions:
        return
    if len(regions) != num_classes or not region_order or len(region_order) != len(regions):
        raise ConfigError(f"{len(regions)} regions need num_classes={len(regions)} outputs and as many "
                          f"region_order values, got num_classes={num_classes}, region_order={region_order}")
    if loss_activation(loss, loss_args) != "sigmoid":
        raise ConfigError(f"regions overlap, so they need a sigmoid loss: loss {loss!r} is softmax; use dice_bce "
                          "or bce (configs/seg3d_unet_regions.yaml)")
    if (loss_args or {}).get("include_background") is False:
        raise ConfigError("with regions every output channel is a region: loss_args.include_background must be "
                          "true (false would drop the first region from the Dice loss)")


def dice_sums(per_case: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the sum of the defined Dice values of a per-case table ``(N, K-1)`` and their number.

    Sums (float64) and counts add up across processes; ``sums / counts`` is then the per-class mean of
    :func:`dice_summary` over all cases.
    """
    defined = ~torch.isnan(per_case)
    sums = torch.where(defined, per_case, torch.zeros_like(per_case)).double().sum(dim=0)
    return sums, defined.double().sum(dim=0)


def dice_summary(per_case: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean Dice and Dice per class from a per-case table.

    Args:
        per_case: ``(N, K-1)`` Dice of each case and foreground class; NaN where a pair is left out (a class
            absent from both masks, under ``dice_both_empty=nan``).

    Returns:
        ``(mean, per_class)``: ``per_class`` ``(K-1,)`` averages the cases whose value is not NaN (NaN if
        none is); ``mean`` averages the classes that are not NaN.
    """
    per_class = torch.nanmean(per_case.float(), dim=0)
    return torch.nanmean(per_class), per_class
