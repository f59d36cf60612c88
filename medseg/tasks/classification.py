"""ClassificationModule: image -> class, with accuracy, macro F1 and ROC-AUC (torchmetrics, synced across ranks).

The logged ROC-AUC (``val/auroc``, ``test/auroc``) is :class:`~medseg.metrics.auroc_metric.ExactAUROC`, the same
computation as ``medseg evaluate``'s ``auc`` (:func:`medseg.metrics.classification.roc_auc`).
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from medseg.errors import ConfigError
from medseg.metrics.auroc_metric import ExactAUROC
from medseg.tasks.base import NOT_SAVED, MedSegModule


class ClassificationModule(MedSegModule):
    """The classification system: network + loss + metrics + optimiser.

    Args:
        network: registry name (``medseg.models.list_models("classification")``).
        network_args: keyword arguments of the network.
        spatial_dims: 2 or 3 (linked from the data in the CLI).
        in_channels: input channels (linked from the data).
        num_classes: number of classes (linked from the data).
        label_names: class names, index order (linked from the data; saved for prediction).
        regions, region_order, class_names: linked from the data for every model; regions are for segmentation
            and image-level classes beside label maps for multitask models, so anything but ``None`` is refused.
        loss: loss name (``ce``, ``focal``, ``bce``).
        loss_args: loss options (class_weights, gamma, ...).
        optimizer: optimiser factory, ``class_path``/``init_args`` in YAML.
        scheduler: learning-rate scheduler factory or ``None``.
        scheduler_monitor: metric a ReduceLROnPlateau scheduler watches.
        roi_size: input size images are resized to (linked from ``data.patch_size``; saved for prediction).
        preprocessing_spec: the effective preprocessing spec (linked from the data; saved for prediction).
        pretrained: local file with a compatible state dict to start from (never downloaded).
        freeze_encoder: train only the classification head.
        compile: ``torch.compile`` the network (``True``, or a dict of ``torch.compile`` options such as
            ``{mode: max-autotune}``); the checkpoint's weights keep their plain names.
        channels_last: channels-last memory layout for the network and its inputs (faster convolutions
            with mixed precision on recent GPUs; no gain on CPU).
    """

    TASK = "classification"

    def __init__(
        self,
        network: str = "resnet18",
        network_args: dict[str, Any] | None = None,
        spatial_dims: int = 3,
        in_channels: int = 1,
        num_classes: int = 2,
        label_names: list[str] | None = None,
        regions: list[list[int]] | None = None,
        region_order: list[int] | None = None,
        class_names: list[str] | None = None,
        loss: str = "ce",
        loss_args: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_monitor: str = "val/loss",
        roi_size: list[int] | None = None,
        preprocessing_spec: dict[str, Any] | None = None,
        pretrained: str | None = None,
        freeze_encoder: bool = False,
        compile: bool | dict[str, Any] = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if regions or region_order:
            raise ValueError("regions are for segmentation; a classification dataset cannot declare them")
        if class_names:
            raise ValueError("image-level 'classes' beside label maps are for multitask models "
                             "(medseg.tasks.multitask.MultiTaskModule)")
        self.save_hyperparameters(ignore=list(NOT_SAVED + ("regions", "region_order", "class_names")))
        self._build(
            network, network_args, spatial_dims, in_channels, num_classes, loss, loss_args,
            optimizer, scheduler, pretrained, freeze_encoder,
        )
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
                "auroc": ExactAUROC(num_classes),  # exactly `medseg evaluate`'s AUC
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def on_fit_start(self) -> None:
        """Fail before training, in one line, when the input size is too small for the network's down-sampling
        (densenet121 needs every side at least 32, for one)."""
        size = (self.hparams.preprocessing_spec or {}).get("resize") or self.hparams.roi_size
        if not size:
            return
        probe = torch.zeros(1, self.hparams.in_channels, *size, device=self.device)
        was_training = self.net.training
        try:
            with torch.no_grad():
                self.net.eval()(probe)
        except RuntimeError as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"input size {list(size)} is too small for network "
                             f"{self.hparams.network!r} {self.hparams.network_args or {}}; use larger images "
                             f"({reason})") from err
        finally:
            self.net.train(was_training)

    def _evaluate(self, batch: dict[str, Any], stage: str, metrics: MetricCollection) -> torch.Tensor:
        image, label = torch.as_tensor(batch["image"]), torch.as_tensor(batch["label"]).long()
        logits = self(image)
        loss = self.loss_fn(logits.float(), label)  # in float32 under mixed precision
        self._log_eval_loss(stage, loss, image.shape[0])
        metrics.update(torch.softmax(logits.float(), dim=1), label)
        self.log_dict(metrics, on_epoch=True, prog_bar=True, batch_size=image.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test", self.test_metrics)
