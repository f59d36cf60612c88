"""SegmentationModule: random-patch training, whole-volume sliding-window validation, Dice per class."""

from __future__ import annotations

from typing import Any

import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable

from medseg.inference.predictor import labels_from_logits, sliding_window_logits
from medseg.tasks.base import NOT_SAVED, MedSegModule


class SegmentationModule(MedSegModule):
    """The segmentation system: network + loss + metrics + optimiser.

    Args:
        network: registry name (``medseg.models.list_models("segmentation")``).
        network_args: keyword arguments of the network (channels, depth, norm, act, dropout, ...).
        spatial_dims: 2 or 3 (linked from the data in the CLI).
        in_channels: input channels (linked from the data).
        num_classes: output classes including background (linked from the data).
        label_names: class names, index order (linked from the data; saved for prediction).
        loss: loss name (``medseg.losses.list_losses()``).
        loss_args: loss options (activation, class_weights, ...).
        optimizer: optimiser factory, ``class_path``/``init_args`` in YAML.
        scheduler: learning-rate scheduler factory or ``None``.
        scheduler_monitor: metric a ReduceLROnPlateau scheduler watches.
        roi_size: sliding-window roi (linked from ``data.patch_size``).
        sw_batch_size: windows per forward pass at validation/prediction.
        overlap: sliding-window overlap.
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
        loss: str = "dice_ce",
        loss_args: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_monitor: str = "val/loss",
        roi_size: list[int] | None = None,
        sw_batch_size: int = 4,
        overlap: float = 0.25,
        preprocessing_spec: dict[str, Any] | None = None,
        pretrained: str | None = None,
        freeze_encoder: bool = False,
        compile: bool | dict[str, Any] = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=list(NOT_SAVED))
        self._build(
            network, network_args, spatial_dims, in_channels, num_classes, loss, loss_args,
            optimizer, scheduler, pretrained, freeze_encoder,
        )
        self.roi_size = list(roi_size or ([96, 96] if spatial_dims == 2 else [64, 64, 32]))
        self.hparams.roi_size = self.roi_size  # the checkpoint holds the roi prediction will use
        # Per case and class; a class absent from a case's reference is NaN there (MONAI's ignore_empty) and
        # left out of that class's mean, so a prediction in such a case does not count against the model.
        self.dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)

    def on_fit_start(self) -> None:
        """Fail before training, with a readable message, when the patch does not suit the network."""
        probe = torch.zeros(1, self.hparams.in_channels, *self.roi_size, device=self.device)
        was_training = self.net.training
        try:
            with torch.no_grad():
                self.net.eval()(probe)
        except RuntimeError as err:
            raise ValueError(
                f"patch_size {self.roi_size} does not suit network {self.hparams.network!r} "
                f"{self.hparams.network_args or {}}: each side must be divisible by 2**depth ({err})"
            ) from err
        finally:
            self.net.train(was_training)

    def predict_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Whole-image logits ``(B, K, *spatial)`` by sliding window (the shared inference path)."""
        return sliding_window_logits(
            self, image, self.roi_size, sw_batch_size=self.hparams.sw_batch_size, overlap=self.hparams.overlap
        )

    def _evaluate(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        image = torch.as_tensor(batch["image"])
        label = torch.as_tensor(batch["label"]).long()
        logits = self.predict_logits(image)
        loss = self.loss_fn(logits.float(), label)  # in float32 under mixed precision
        self._log_eval_loss(stage, loss, image.shape[0])
        k = self.hparams.num_classes
        self.dice(one_hot(labels_from_logits(logits), k), one_hot(label, k))
        return loss

    def _log_dice(self, stage: str) -> None:
        """Log the Dice of all cases of all processes: each process sums its cases, the sums are added up
        across processes (every case is on exactly one, see medseg.data.sampling), and every process logs
        the same value, so the best checkpoint is the same everywhere."""
        sums, counts = dice_sums(torch.as_tensor(self.dice.aggregate(), device=self.device))
        self.dice.reset()
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        per_class = (sums / counts).float()  # NaN where a class is absent from every case
        # sync_dist averages values that are already equal on every process (Lightning asks for it).
        self.log(f"{stage}/dice", torch.nanmean(per_class), prog_bar=True, sync_dist=True)
        for index, value in enumerate(per_class, start=1):
            self.log(f"{stage}/dice_class{index}", value, sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_dice("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_dice("test")


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
        per_case: ``(N, K-1)`` Dice of each case and foreground class; NaN where the class is absent from
            the case's reference.

    Returns:
        ``(mean, per_class)``: ``per_class`` ``(K-1,)`` averages the cases where the class is present (NaN
        if it is absent from every case); ``mean`` averages the classes that are not NaN.
    """
    per_class = torch.nanmean(per_case.float(), dim=0)
    return torch.nanmean(per_class), per_class
