"""MultiTaskModule: joint segmentation and image-level classification with one network.

Training takes random patches as segmentation does; each patch carries its case's image-level class. The loss is
``segmentation_weight * segmentation loss + classification_weight * class loss`` over one encoder pass
(``net.forward_with_class``); a part whose weight is 0 is not computed, so the head it trains gets no gradient and
its parameters stay as they are (an optimiser skips parameters without a gradient, weight decay included).

Validation is the segmentation's (``val/loss`` is the segmentation loss, ``val/dice`` and ``val/dice_<name>``
from the whole-image sliding window) plus the image-level class of each case: its probabilities are the mean
over the same sliding windows (roi, overlap) of ``softmax(classify(window))``
(:func:`medseg.models.multitask.case_class_probabilities`, which ``medseg predict`` calls too). From them
``val/cls_acc`` (accuracy of their argmax), ``val/cls_auroc`` (:class:`~medseg.metrics.auroc_metric.ExactAUROC`,
``medseg evaluate``'s AUC) and ``val/cls_loss`` (the class loss with the logarithms of the case probabilities
as logits: the cross-entropy of the case probabilities for ``ce``).
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from medseg.errors import ConfigError, ResumeError
from medseg.losses import create_loss, deep_supervision_loss, loss_activation
from medseg.metrics.auroc_metric import ExactAUROC
from medseg.models import get_model_spec, list_models
from medseg.models.multitask import case_class_probabilities
from medseg.tasks.base import channels_last_format, resume_mismatches
from medseg.tasks.segmentation import SegmentationModule


class MultiTaskModule(SegmentationModule):
    """The multitask system: a network with a segmentation decoder and a classification head, both losses, both
    sets of metrics.

    Args:
        network: registry name of a multitask network (``medseg.models.list_models("multitask")``).
        network_args: keyword arguments of the network; ``image_classes`` is set from ``class_names``.
        class_names: the image-level class names, index order (linked from the data's ``classes``; at least 2;
            saved for prediction).
        class_loss: loss of the classification head (``ce``, ``focal``; a softmax loss).
        class_loss_args: its options (``class_weights``, ``gamma``, ...).
        segmentation_weight: weight of the segmentation loss in the total (0 trains the classification only).
        classification_weight: weight of the class loss in the total (0 trains the segmentation only).
        (the other arguments): as :class:`~medseg.tasks.segmentation.SegmentationModule`'s.
    """

    TASK = "multitask"

    def __init__(
        self,
        network: str = "multitask_unet",
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
        class_loss: str = "ce",
        class_loss_args: dict[str, Any] | None = None,
        segmentation_weight: float = 1.0,
        classification_weight: float = 1.0,
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
        _check_network(network)
        network_args = network_args_with_classes(network_args, class_names)
        _check_weights(segmentation_weight, classification_weight)
        if loss_activation(class_loss, class_loss_args) != "softmax":
            raise ConfigError(f"class_loss {class_loss!r} is a sigmoid loss; the image-level classes are exclusive "
                              "and their probabilities a softmax: use ce or focal")
        super().__init__(
            network, network_args, spatial_dims, in_channels, num_classes, label_names, regions, region_order,
            class_names, loss, loss_args, optimizer, scheduler, scheduler_monitor, roi_size, sw_batch_size,
            overlap, dice_both_empty, preprocessing_spec, pretrained, freeze_encoder, compile, channels_last,
        )
        # A checkpoint rebuilds the network with create_model(network, ..., **network_args): the head's size too
        # (the CLI saves the config's arguments as given, without it).
        self.hparams.network_args = network_args
        classes = len(class_names or ())
        self.class_loss_fn = create_loss(class_loss, **{"num_classes": classes, **(class_loss_args or {})})
        metrics = MetricCollection({"cls_acc": MulticlassAccuracy(classes, average="micro"),
                                    "cls_auroc": ExactAUROC(classes)})
        self.class_metrics = torch.nn.ModuleDict({"val": metrics.clone(prefix="val/"),
                                                  "test": metrics.clone(prefix="test/")})
        self.class_losses = torch.nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the memory layout the network runs in (channels-last when asked for)."""
        if self.hparams.get("channels_last"):
            return x.contiguous(memory_format=channels_last_format(self.hparams.spatial_dims))
        return x

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """The weighted loss on a batch: image ``(B, C, *patch)``, label ``(B, 1, *patch)``, class ``(B,)``."""
        image = self._input(torch.as_tensor(batch["image"]))
        label = torch.as_tensor(batch["label"]).long()
        target = torch.as_tensor(batch["class"]).long().reshape(-1).to(image.device)
        seg_weight, cls_weight = self.hparams.segmentation_weight, self.hparams.classification_weight
        seg_logits = class_logits = None
        if seg_weight and cls_weight:
            seg_logits, class_logits = self.net.forward_with_class(image)
        elif seg_weight:
            seg_logits = self.net(image)
        else:
            class_logits = self.net.classify(image)
        loss = torch.zeros((), device=image.device)
        batch_size = image.shape[0]
        if seg_logits is not None:
            seg_loss = deep_supervision_loss(self.loss_fn, seg_logits, self.training_targets(label))
            loss = loss + seg_weight * seg_loss
            self.log("train/loss_seg", seg_loss.detach(), on_step=False, on_epoch=True, batch_size=batch_size,
                     sync_dist=True)
        if class_logits is not None:
            cls_loss = self.class_loss_fn(class_logits.float(), target)  # in float32 under mixed precision
            loss = loss + cls_weight * cls_loss
            self.log("train/loss_cls", cls_loss.detach(), on_step=False, on_epoch=True, batch_size=batch_size,
                     sync_dist=True)
        self.log("train/loss_step", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/loss_epoch", loss.detach(), on_step=False, on_epoch=True, batch_size=batch_size,
                 sync_dist=True)
        return loss

    def case_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Image-level class probabilities ``(B, K)`` of whole images ``(B, C, *S)``, one case at a time
        (:func:`~medseg.models.multitask.case_class_probabilities` on the segmentation's window)."""
        window = self.window
        return torch.stack([case_class_probabilities(self.net, image[i:i + 1], window.roi, window.overlap,
                                                     window.batch_size) for i in range(image.shape[0])])

    def _evaluate(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        loss = super()._evaluate(batch, stage)
        image = torch.as_tensor(batch["image"])
        probabilities = self.case_probabilities(image).to(self.device)
        target = torch.as_tensor(batch["class"]).long().reshape(-1).to(self.device)
        cls_loss = self.class_loss_fn(torch.log(probabilities.clamp_min(1e-7)), target)
        self.class_losses[stage].update(cls_loss.detach(), weight=image.shape[0])
        self.log(f"{stage}/cls_loss", self.class_losses[stage], on_epoch=True, batch_size=image.shape[0])
        metrics = self.class_metrics[stage]
        metrics.update(probabilities, target)
        self.log_dict(metrics, on_epoch=True, prog_bar=True, batch_size=image.shape[0])
        return loss

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model, other segmentation classes or other image-level classes."""
        problems = resume_mismatches(checkpoint, self.TASK, dict(self.hparams))
        saved = checkpoint.get("hyper_parameters", {}).get("class_names")
        if saved is not None and list(saved) != list(self.hparams.class_names):
            problems.append(f"class_names: checkpoint {list(saved)!r}, this run {list(self.hparams.class_names)!r}")
        if problems:  # ResumeError: `medseg fit --ckpt_path` reports it in one line
            raise ResumeError("the checkpoint does not match this model: " + "; ".join(problems))


def network_args_with_classes(network_args: dict[str, Any] | None, class_names: list[str] | None
                              ) -> dict[str, Any]:
    """``network_args`` with ``image_classes = len(class_names)``.

    Raises:
        ConfigError: fewer than two class names (a multitask dataset declares its ``classes``), or an
            ``image_classes`` that disagrees with them.
    """
    if not class_names or len(class_names) < 2:
        raise ConfigError(f"a multitask model needs the dataset's image-level classes (class_names, at least 2), "
                          f"got {class_names!r}; train it on a \"task\": \"multitask\" dataset.json with 'classes'")
    args = dict(network_args or {})
    given = args.get("image_classes")
    if given is not None and given != len(class_names):
        raise ConfigError(f"network_args.image_classes={given} disagrees with the dataset's {len(class_names)} "
                          f"classes {list(class_names)}; leave image_classes out, it is set from the dataset")
    args["image_classes"] = len(class_names)
    return args


def _check_network(network: str) -> None:
    """Refuse, in one line, a network without a classification head (a segmentation or classification one)."""
    task = get_model_spec(network).task
    if task != "multitask":
        raise ConfigError(f"network {network!r} is a {task} network; a multitask model needs a segmentation "
                          f"decoder and a classification head: use {' or '.join(list_models('multitask'))}")


def _check_weights(segmentation_weight: float, classification_weight: float) -> None:
    weights = (segmentation_weight, classification_weight)
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 for w in weights) or not any(weights):
        raise ConfigError(f"segmentation_weight and classification_weight must be >= 0 and not both 0, got "
                          f"{segmentation_weight!r} and {classification_weight!r}")
