"""``LightningCLI`` for ``medseg fit|validate|test``: the data states the classes, channels and patch size once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytorch_lightning.cli import LightningCLI

from medseg.data.datamodule import MedSegDataModule
from medseg.tasks.base import MedSegModule
from medseg.tasks.classification import ClassificationModule

# Values that come from the dataset, linked from the instantiated data module into the model.
DATA_TO_MODEL = {
    "spatial_dims": "spatial_dims",
    "in_channels": "in_channels",
    "num_classes": "num_classes",
    "label_names": "label_names",
    "roi_size": "roi_size",
    "preprocessing_spec": "preprocessing_spec",
}


class MedSegCLI(LightningCLI):
    """LightningCLI with medseg's links and defaults.

    * ``model`` is a ``class_path`` of :class:`~medseg.tasks.segmentation.SegmentationModule` or
      :class:`~medseg.tasks.classification.ClassificationModule`; ``data`` is :class:`MedSegDataModule`.
    * Logs go to CSV and TensorBoard under ``trainer.default_root_dir`` (default ``runs/``), in a folder named
      after the config file; the resolved config is saved there beside ``checkpoints/``.
    """

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(
            model_class=MedSegModule,
            datamodule_class=MedSegDataModule,
            subclass_mode_model=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": False},
            args=args,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: Any) -> None:
        for source, target in DATA_TO_MODEL.items():
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        if trainer.get("logger") in (None, True):
            trainer["logger"] = _default_loggers(trainer.get("default_root_dir") or "runs", _run_name(config))

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        wants_classification = isinstance(self.model, ClassificationModule)
        if wants_classification == self.datamodule.is_segmentation:
            raise ValueError(
                f"{self.datamodule.spec.source}: the dataset is a {self.datamodule.task} dataset but the model is "
                f"{type(self.model).__name__}; use a {self.datamodule.task} config"
            )


def _run_name(config: Any) -> str:
    files = config.get("config") or []
    return Path(str(files[-1])).stem if files else "medseg"


def _default_loggers(save_dir: str, name: str) -> list[dict[str, Any]]:
    """CSV + TensorBoard loggers writing to the same, next free folder ``<save_dir>/<name>/version_N``."""
    taken = [p.name[len("version_") :] for p in (Path(save_dir) / name).glob("version_*")]
    version = 1 + max((int(v) for v in taken if v.isdigit()), default=-1)
    common = {"save_dir": save_dir, "name": name, "version": version}
    return [
        {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": common},
        {
            "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
            "init_args": {**common, "default_hp_metric": False},
        },
    ]
