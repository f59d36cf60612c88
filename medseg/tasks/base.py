"""What the segmentation and classification systems share: the network by name, the loss, the optimiser."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric

from medseg.data.sampling import mixed_seed, reseed_globals, run_seed
from medseg.losses import create_loss, deep_supervision_loss
from medseg.models import create_model, freeze_encoder, load_pretrained
from medseg.tasks.schedule import Annealing, FitProgress, follow_max_epochs, require_a_limit

logger = logging.getLogger("medseg")

# Arguments kept out of the checkpoint's hyperparameters: callables are not plain data, and a checkpoint
# must load with ``torch.load(weights_only=True)``. Prediction never needs them.
# ``pretrained`` too: the weights are in the checkpoint, and the file may be gone when it is reloaded.
NOT_SAVED = ("optimizer", "scheduler", "pretrained")


class MedSegModule(pl.LightningModule):
    """Base LightningModule: builds ``self.net`` from the registry and ``self.loss`` by name.

    Subclasses set ``TASK`` and call :meth:`_build` from ``__init__`` after ``save_hyperparameters``.
    """

    TASK = "segmentation"

    def _build(
        self,
        network: str,
        network_args: dict[str, Any] | None,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        loss: str,
        loss_args: dict[str, Any] | None,
        optimizer: OptimizerCallable,
        scheduler: LRSchedulerCallable | None,
        pretrained: str | None,
        freeze: bool,
    ) -> None:
        self.net = create_model(network, spatial_dims, in_channels, num_classes, **(network_args or {}))
        self.loss_fn = create_loss(loss, **{"num_classes": num_classes, **(loss_args or {})})
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.pretrained_report: dict[str, list[str]] | None = None
        if pretrained:
            self.pretrained_report = load_pretrained(self.net, pretrained)
        if freeze:
            freeze_encoder(network, self.net)
        # Validation/test loss as torchmetrics means: exact across DDP processes holding different numbers of
        # cases (Lightning's own sync_dist mean floors the averaged integer batch count, e.g. 3 cases on 2
        # processes are counted as 1 per process).
        self.eval_losses = torch.nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The epoch's randomness (dropout, ...) depends on (seed, epoch, rank) only, as the data order and the
        # augmentation do (medseg.data.sampling): a run resumed at an epoch boundary continues exactly. At the
        # first batch, not at epoch start: creating the loader iterator draws from torch's generator, and a
        # resumed run creates it earlier than an uninterrupted one.
        if batch_idx == 0:
            reseed_globals(mixed_seed(run_seed(), self.current_epoch, self.global_rank))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to resume (or load) a checkpoint of another model or another set of classes."""
        problems = resume_mismatches(checkpoint, self.TASK, dict(self.hparams))
        if problems:
            raise ValueError("the checkpoint does not match this model: " + "; ".join(problems))

    def configure_model(self) -> None:
        """Speed options, applied once before training or evaluation starts (Lightning hook)."""
        if self.hparams.get("channels_last"):
            self.net.to(memory_format=channels_last_format(self.hparams.spatial_dims))
        options = self.hparams.get("compile")
        if options and not getattr(self, "_compiled", False):
            # Module.compile compiles in place: state_dict names stay free of torch.compile's "_orig_mod."
            self.net.compile(**({} if options is True else dict(options)))
            self._compiled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K, ...)`` of the network for ``x`` ``(B, C, ...)``."""
        if self.hparams.get("channels_last"):
            x = x.contiguous(memory_format=channels_last_format(self.hparams.spatial_dims))
        return self.net(x)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Loss on a batch: image ``(B, C, ...)``, label ``(B, 1, ...)`` label map or ``(B,)`` class index."""
        image, label = torch.as_tensor(batch["image"]), torch.as_tensor(batch["label"]).long()
        # in float32 under mixed precision; a deep-supervision list of outputs is weighted over its scales
        loss = deep_supervision_loss(self.loss_fn, self(image), self.training_targets(label))
        # The step value is this process's (for the progress bar and the step log); only the epoch mean is
        # synced across DDP processes, once an epoch, so the training step carries no extra all-reduce.
        self.log("train/loss_step", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/loss_epoch", loss.detach(), on_step=False, on_epoch=True, batch_size=image.shape[0],
                 sync_dist=True)
        return loss

    def training_targets(self, label: torch.Tensor) -> torch.Tensor:
        """What the loss compares the logits with: the labels as loaded (subclasses may derive targets)."""
        return label

    def _log_eval_loss(self, stage: str, loss: torch.Tensor, batch_size: int) -> None:
        """Log ``stage/loss``, the mean over all cases of all processes, weighted by batch size."""
        metric = self.eval_losses[stage]
        metric.update(loss.detach(), weight=batch_size)
        self.log(f"{stage}/loss", metric, prog_bar=True, on_epoch=True, batch_size=batch_size)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["medseg_task"] = self.TASK  # read by medseg.inference.native.load_model
        from medseg.models.external import network_source

        source = network_source(self.hparams.network)  # a network from another package: its module, version
        if source is not None:
            checkpoint["medseg_network_source"] = source
        if self._trainer is not None:  # `medseg predict --precision auto` predicts at the precision trained at
            checkpoint["medseg_precision"] = str(self.trainer.precision)

    def configure_optimizers(self) -> Any:
        """The optimizer and, if configured, its scheduler: an :class:`~medseg.tasks.schedule.Annealing`
        stepped every optimizer step over the fit's limits, any other scheduler once an epoch.

        Raises:
            ConfigError: an ``Annealing`` schedule for a fit without ``max_epochs``, ``max_steps`` or ``max_time``.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, Annealing):
            require_a_limit(self.trainer)
            config["interval"] = "step"
        elif isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.hparams.scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}

    def on_train_start(self) -> None:
        """Give the schedule the length of this fit (after a resume has restored the loops and schedulers).

        An ``Annealing`` schedule reads the fit's limits; a per-epoch ``CosineAnnealingLR``/``PolynomialLR``
        takes this fit's ``max_epochs``, not the length in the config or the checkpoint. Subclasses overriding
        this hook call ``super().on_train_start()``.
        """
        for config in self.trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, Annealing):
                self._fit_progress = FitProgress(self.trainer)
                self._log_once(f"learning rate: {config.scheduler.describe()} over "
                               f"{self._fit_progress.limits.describe()}")
            change = follow_max_epochs(config.scheduler, self.trainer.max_epochs)
            if change:
                self._log_once(f"learning rate: {change}")

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """Step ``scheduler``; an ``Annealing`` one first learns how far through the fit training is."""
        if isinstance(scheduler, Annealing):
            scheduler.progress = self._progress_now()
        super().lr_scheduler_step(scheduler, metric)

    def _progress_now(self) -> float:
        """Fraction of the fit done after this optimizer step (see :class:`~medseg.tasks.schedule.FitProgress`)."""
        progress = self._fit_progress(self.global_step)
        if self._fit_progress.timer is not None and self.trainer.world_size > 1:
            # Each process has its own clock: all take the first process's, so their learning rates stay equal.
            progress = float(self.trainer.strategy.broadcast(progress, src=0))
        return progress

    def _log_once(self, message: str) -> None:
        """``message`` on the ``medseg`` logger, from the first process only."""
        if self.trainer.is_global_zero:
            logger.info(message)


def channels_last_format(spatial_dims: int) -> torch.memory_format:
    """``torch.channels_last`` for 2D networks, ``torch.channels_last_3d`` for 3D ones."""
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


# What must be equal for a checkpoint to continue this model: the network and what its shape depends on.
MUST_MATCH = ("network", "network_args", "spatial_dims", "in_channels", "num_classes", "label_names", "regions",
              "region_order", "class_names", "condition", "network_channels")


def resume_mismatches(checkpoint: dict[str, Any], task: str, hparams: dict[str, Any]) -> list[str]:
    """Why ``checkpoint`` (a loaded Lightning checkpoint) cannot continue a ``task`` model with ``hparams``.

    Returns:
        One ``"<name>: checkpoint <a>, this run <b>"`` line per difference; empty when they match.
    """
    saved_task = checkpoint.get("medseg_task", task)
    if saved_task != task:
        return [f"task: checkpoint {saved_task}, this run {task}"]
    saved = checkpoint.get("hyper_parameters", {})
    return [
        f"{name}: checkpoint {saved.get(name)!r}, this run {hparams.get(name)!r}"
        for name in MUST_MATCH
        if name in saved and _plain(saved.get(name)) != _plain(hparams.get(name))
    ]


def _plain(value: Any) -> Any:
    """Containers as plain lists/dicts, so a tuple from YAML equals the list a checkpoint holds."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
