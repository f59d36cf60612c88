"""One training run: :func:`fit`, which ``medseg fit``, ``medseg cv`` and ``medseg demo`` all call.

It is the one place that starts a run: it frees the run folder an earlier run of this process claimed, sets the
seed, builds the :class:`~medseg.lightning_cli.MedSegCLI` (which claims ``<root>/<config>/version_N`` and writes
there), turns a refusal buried in jsonargparse's wrapping into medseg's own error, and removes the run folder of
a run that stopped before writing anything. ``validate`` and ``test`` go through :func:`run_cli` the same way.

Only the run folder of a DDP run crosses process boundaries, in the ``MEDSEG_RUN_FOLDER`` variable that rank 0
sets for the processes Lightning launches (see :mod:`medseg.resume`); the seed reaches them as Lightning's
``PL_GLOBAL_SEED``.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.resume import RUN_FOLDER_ENV, launched_rank, release_empty_run_folder, saved_checkpoint


@dataclass
class FitResult:
    """What a finished :func:`fit` left behind.

    Attributes:
        best: the best checkpoint (by the monitored metric), else the last; ``""`` when none was written.
        last: the last checkpoint (``last.ckpt``), ``""`` when none was written.
        log_dir: the run folder (``<root>/<config>/version_N``: config.yaml, metrics.csv, checkpoints/).
        parameters: the network's parameter count.
        seconds: wall time of the whole call.
        cli: the LightningCLI, for callers that need the trainer, model or data module.
    """

    best: str
    last: str
    log_dir: str
    parameters: int
    seconds: float
    cli: Any = field(repr=False, default=None)


def fit(args: list[str], *, seed: int | None = None, single_process: bool = False,
        callbacks: Sequence[Any] = ()) -> FitResult:
    """Train as ``medseg fit ARGS`` does; ``args`` are its arguments (``--config``, overrides, ``--ckpt_path``).

    Args:
        seed: ``seed_everything`` and the data's seed (sampling, split, augmentation) of this run; ``None``
            keeps what the arguments say.
        single_process: refuse a trainer that would launch several processes (``cv`` folds run one process
            each; a DDP launcher would re-run the whole calling command in every process).
        callbacks: Lightning callbacks added to the config's for this run only (never saved in its config.yaml).

    Raises:
        ConfigError, ResumeError, DatasetError, DataCheckError, ...: medseg's refusals, before training.
    """
    start = time.perf_counter()
    args = list(args)
    if seed is not None:  # after the config files, before the overrides: an explicit --data.seed still wins
        at = max((i + 2 for i, arg in enumerate(args) if arg == "--config"), default=0)
        args[at:at] = ["--seed_everything", str(seed), "--data.seed", str(seed)]
    cli = run_cli(["fit", *args], single_process=single_process, callbacks=callbacks)
    trainer = cli.trainer
    best = saved_checkpoint(trainer, "best")
    return FitResult(best=best, last=saved_checkpoint(trainer, "last"), log_dir=str(trainer.log_dir),
                     parameters=sum(p.numel() for p in cli.model.net.parameters()),
                     seconds=time.perf_counter() - start, cli=cli)


def run_cli(argv: list[str], *, single_process: bool = False, callbacks: Sequence[Any] = ()) -> Any:
    """Run ``fit``/``validate``/``test`` (``argv[0]``) through :class:`~medseg.lightning_cli.MedSegCLI`; returns it."""
    from medseg.lightning_cli import MedSegCLI

    if launched_rank() == 0:
        os.environ.pop(RUN_FOLDER_ENV, None)  # a folder an earlier run in this process claimed is not ours
    with warnings.catch_warnings():  # `args` are the command line, passed on explicitly
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        try:
            defaults = {"trainer_defaults": {"callbacks": list(callbacks)}} if callbacks else {}
            return MedSegCLI(args=argv, single_process=single_process, **defaults)
        except BaseException as err:
            release_empty_run_folder()
            refusal = medseg_error(err)
            if refusal is None or refusal is err:
                raise
            raise refusal from err


def resolved_data(args: list[str]) -> dict[str, Any]:
    """The data module's arguments that ``medseg fit ARGS`` would use, after every ``--config`` file and override
    is applied (nothing is built or trained; the model is not checked against the data).

    Raises:
        ConfigError: a config that cannot be parsed (an unknown key, a value of the wrong type, a missing or
            broken config file), in the one line ``medseg fit`` prints.
    """
    from medseg.lightning_cli import MedSegCLI

    class _Parsed(Exception):
        pass

    class _ParseOnly(MedSegCLI):
        def check_config(self, config: Any, argv: list[str]) -> None:
            """Only the data's arguments are wanted: the model is not checked against them."""

        def before_instantiate_classes(self) -> None:
            raise _Parsed(self.config[self.subcommand]["data"])

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        try:
            _ParseOnly(args=["fit", *args])
        except _Parsed as parsed:
            data = parsed.args[0]
            return dict(data.as_dict() if hasattr(data, "as_dict") else data)
        except BaseException as err:
            refusal = medseg_error(err)
            if refusal is None or refusal is err:
                raise
            raise refusal from err
    raise RuntimeError("the configuration was not parsed")  # pragma: no cover


def resumable_checkpoint(run_root: Path) -> Path | None:
    """The ``last.ckpt`` of the newest ``run_root/version_N`` run, when it has one (a run killed before its first
    checkpoint has none: it starts again)."""
    from medseg.resume import LAST, versions

    found = versions(run_root)
    path = run_root / f"version_{found[-1]}" / "checkpoints" / LAST if found else None
    return path if path is not None and path.is_file() else None


def medseg_error(err: BaseException) -> BaseException | None:
    """The medseg refusal behind ``err``, if any: jsonargparse wraps an error raised while it builds the model
    (e.g. a region dataset with a softmax loss) into a ValueError that prints the whole config."""
    from medseg.data.datalist import DatasetError
    from medseg.errors import ConfigError, ResumeError

    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (ConfigError, ResumeError, DatasetError)):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None
