"""``LightningCLI`` for ``medseg fit|validate|test``: the data states the classes, channels and patch size once."""

from __future__ import annotations

import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from medseg.config_checks import (
    _check_ckpt_path,
    _raising,
    _refusal_of,
    check_network,
    check_task,
    parse_refusal,
)
from medseg.data.datamodule import MedSegDataModule
from medseg.errors import (
    ConfigError,
    ResumeError,
)
from medseg.resume import (
    AtomicCheckpointIO,
    checkpoint_summary,
    claim_run_folder,
    drop_rows_after,
    launched_rank,
    resolve_resume,
    run_folder_of,
    share_run_folder,
)
from medseg.tasks.base import MedSegModule, resume_mismatches

# Values that come from the dataset, linked from the instantiated data module into the model.
DATA_TO_MODEL = {
    "spatial_dims": "spatial_dims",
    "in_channels": "in_channels",
    "num_classes": "num_classes",
    "label_names": "label_names",
    "regions": "regions",
    "region_order": "region_order",
    "class_names": "class_names",
    "roi_size": "roi_size",
    "preprocessing_spec": "preprocessing_spec",
}


class MedSegCLI(LightningCLI):
    """LightningCLI with medseg's links and defaults.

    * ``model`` is a ``class_path`` of :class:`~medseg.tasks.segmentation.SegmentationModule` or
      :class:`~medseg.tasks.classification.ClassificationModule`; ``data`` is :class:`MedSegDataModule`.
    * Logs go to CSV and TensorBoard under ``trainer.default_root_dir`` (default ``runs/``), in a folder named
      after the (first) config file; the resolved config is saved there beside ``checkpoints/``.
    * ``fit --ckpt_path last|FILE`` resumes (see :mod:`medseg.resume`): into the checkpoint's own run folder,
      with the resumed config saved as ``config_resume.yaml``; a missing checkpoint or one of another model
      stops the command before training.
    * ``data.seed`` defaults to ``seed_everything``; checkpoints are written atomically.
    """

    def __init__(self, args: list[str] | None = None, *, single_process: bool = False,
                 parser_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.single_process = single_process
        super().__init__(
            model_class=MedSegModule,
            datamodule_class=MedSegDataModule,
            subclass_mode_model=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": False},
            parser_kwargs=_raising(parser_kwargs, self.subcommands()),
            args=args,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: Any) -> None:
        for source, target in DATA_TO_MODEL.items():
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, then check what can be checked before anything is built or logged.

        * A parse error (unknown key, wrong type, missing or broken config file) becomes one
          :class:`~medseg.errors.ConfigError` line naming the file or option, not jsonargparse's usage dump.
        * A ``--ckpt_path`` file is checked before Lightning reads it (it loads the checkpoint's hyperparameters
          right after parsing): a truncated or unsafe file is refused naming it.
        * The network's name and arguments, and the model's task against the dataset's.
        """
        given = sys.argv[1:] if args is None else args
        argv = [str(arg) for arg in given] if isinstance(given, (list, tuple)) else []  # not a dict or Namespace
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            subparsers = getattr(self, "_subcommand_parsers", {})
            raise parse_refusal(err, argv, subparsers.get(argv[0]) if argv else None) from err
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        _check_ckpt_path(config.get("ckpt_path"))
        self.check_config(config, argv)

    def check_config(self, config: Any, argv: list[str]) -> None:
        """Refuse, before the seed is set and anything is built or logged, a network name or argument that does
        not exist and a model of the other task than the dataset's (:func:`check_network`, :func:`check_task`)."""
        check_network(config, argv)
        check_task(config, argv)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        run_root = Path(trainer.get("default_root_dir") or "runs") / _run_name(config)
        self.resume_from: Path | None = None
        if self.subcommand == "fit" and config.get("ckpt_path") not in (None, "hpc"):
            self.resume_from = resolve_resume(str(config["ckpt_path"]), run_root)
            config["ckpt_path"] = str(self.resume_from)
            self.save_config_kwargs = {**self.save_config_kwargs, "overwrite": True,
                                       "config_filename": "config_resume.yaml"}
        if trainer.get("logger") in (None, True):
            folder = run_folder_of(self.resume_from) if self.resume_from else None
            if folder:
                share_run_folder(*folder)
            run_root, version = folder or (run_root, claim_run_folder(run_root))
            trainer["logger"] = _default_loggers(str(run_root.parent), run_root.name, version)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:  # jsonargparse wraps what a class refuses into a dump of the whole config
            refusal = _refusal_of(err)
            if refusal is None:
                raise
            raise refusal from err
        if self.single_process and self.trainer.world_size > 1:
            raise ConfigError(
                f"this command trains in one process, but the trainer asks for {self.trainer.world_size} "
                "(devices x num_nodes); run cross-validation folds in parallel instead, one per GPU: "
                "medseg cv ... --fold K with CUDA_VISIBLE_DEVICES=K"
            )
        if self.resume_from is not None:
            self._check_resume(self.resume_from)
        if type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def _check_resume(self, path: Path) -> None:
        """Stop before training when ``path`` holds another model or other classes than this run builds."""
        saved = checkpoint_summary(path)
        problems = resume_mismatches(saved, self.model.TASK, dict(self.model.hparams))
        if problems:
            raise ResumeError(f"{path}: cannot resume this run from it: " + "; ".join(problems))
        folder = run_folder_of(path)
        if folder and launched_rank() == 0:
            drop_rows_after(folder[0] / f"version_{folder[1]}" / "metrics.csv", int(saved["global_step"]))
        rank_zero_info(f"medseg fit: resuming from {path} (epoch {saved['epoch']}, step {saved['global_step']})")


def _run_name(config: Any) -> str:
    """The run folder's name: the first config file's stem (later ones, e.g. configs/trainer/ddp.yaml, add
    options to the experiment the first one names)."""
    files = config.get("config") or []
    return Path(str(files[0])).stem if files else "medseg"


def _default_loggers(save_dir: str, name: str, version: int) -> list[dict[str, Any]]:
    """CSV + TensorBoard loggers writing to the same folder ``<save_dir>/<name>/version_<version>``."""
    common = {"save_dir": save_dir, "name": name, "version": version}
    return [
        {"class_path": "medseg.resume.ResumableCSVLogger", "init_args": common},
        {
            "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
            "init_args": {**common, "default_hp_metric": False},
        },
    ]
