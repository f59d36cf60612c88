"""The ``medseg`` command: the command table, the usage text and how refusals are reported.

``fit``, ``validate`` and ``test`` go through Lightning's ``LightningCLI`` (YAML configs, ``--print_config``,
``class_path``/``init_args``); the other sub-commands are plain ``argparse`` commands. Each lives in its own module
of :mod:`medseg.commands`, imported only when it runs, so ``medseg --help``, ``medseg COMMAND --help`` and
argument errors answer without importing torch, MONAI or Lightning.

A refusal (bad data, a bad config, a missing file, ...) is one line ``medseg <command>: <message>`` on stderr and
exit code 2; ``--verbose`` (before or after the command) shows its whole traceback instead.
"""

from __future__ import annotations

import sys
from importlib import import_module

from medseg.commands.common import CommandError

LIGHTNING_COMMANDS = ("fit", "validate", "test")
# command -> "module:function" (in medseg.commands), imported when the command runs
COMMANDS = {
    "fit": "lightning:fit", "validate": "lightning:run", "test": "lightning:run",
    "predict": "predict:run", "cv": "cv:run", "benchmark": "benchmark:run", "evaluate": "evaluate:run",
    "demo": "demo:run", "make-synthetic": "data:make_synthetic", "check-data": "data:check_data", "plan": "plan:run",
    "export": "export:run", "serve": "serve:run", "ab-report": "ab_report:run", "models": "models:run",
    "synthesize": "synthesize:run",
}
VERBOSE = "--verbose"
USAGE = """usage: medseg [--verbose] COMMAND [options]

commands:
  fit             train a model from a YAML config   (medseg fit --config configs/seg3d_unet.yaml)
  validate        run validation on a checkpoint      (medseg validate --config C.yaml --ckpt_path X.ckpt)
  test            run the test loop on a checkpoint   (medseg test --config C.yaml --ckpt_path X.ckpt)
  predict         predict a folder or dataset.json with one or more checkpoints, on each input's own grid
  cv              cross-validate a config: folds trained, out-of-fold predictions, pooled evaluation
  benchmark       cross-validate several configs on the same splits; results.csv, report.md/html
  evaluate        score a folder of predictions against references: per_case.csv, summary.csv/json
  demo            make a synthetic 3D dataset, train a small 3D U-Net, report held-out Dice
  make-synthetic  write a synthetic Decathlon-style dataset
  check-data      read every case of a dataset and report every problem
  plan            derive a commented training config from a dataset's fingerprint
  models          list the networks a config can name: source, task, dimensions, parameter counts
  synthesize      new training pairs (image + label map) from a label-conditioned generator
  export          one self-contained model folder: TorchScript/ONNX networks, spec JSON, MONAI bundle
  serve           an HTTP service for exported models: /predict, A/B split, /metrics, a viewer at /
  ab-report       compare the two arms of a served A/B test from its request log

options:
  --verbose       show the whole traceback of a refusal, not just its one line (also after COMMAND)

Run `medseg COMMAND --help` for the options of a command.
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medseg`` console script; returns the exit code."""
    argv, verbose = split_verbose(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"medseg: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    from medseg import console

    console.install()
    module, function = COMMANDS[command].split(":")
    run = getattr(import_module(f"medseg.commands.{module}"), function)
    try:
        return run(argv if command in LIGHTNING_COMMANDS else rest)
    except refusals() as err:
        return _refuse(command, err, str(err), verbose)
    except OSError as err:  # a folder that cannot be created, a disk that is full, a file without permission
        where = f"{err.filename}: " if err.filename else ""
        return _refuse(command, err, f"{where}{err.strerror or err}", verbose)


def split_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without medseg's ``--verbose``, and whether it was there.

    Before the command it is always medseg's. After it, too, except ``validate``/``test`` ``--verbose
    true|false``: that one is Lightning's (print the validation results) and stays.
    """
    kept: list[str] = []
    verbose = False
    for i, arg in enumerate(argv):
        value = argv[i + 1] if i + 1 < len(argv) else "-"
        lightnings = bool(kept) and kept[0] in ("validate", "test") and not value.startswith("-")
        if arg == VERBOSE and not lightnings:
            verbose = True
        else:
            kept.append(arg)
    return kept, verbose


def refusals() -> tuple[type[BaseException], ...]:
    """The errors reported as one line: medseg's own refusals, and missing or existing files.

    The classes of modules not imported yet cannot have been raised, so they are left out instead of imported
    (medseg.data.checks alone imports torch and MONAI).
    """
    from medseg.errors import ConfigError, InputError, ResumeError

    found: list[type[BaseException]] = [CommandError, ResumeError, ConfigError, InputError, FileExistsError,
                                        FileNotFoundError]
    for module, name in (("medseg.data.checks", "DataCheckError"), ("medseg.data.datalist", "DatasetError"),
                         ("medseg.data.io", "ImageReadError")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def _refuse(command: str, err: BaseException, message: str, verbose: bool) -> int:
    """Report a refusal once (not once per DDP process); exit code 2."""
    if command not in LIGHTNING_COMMANDS or _first_process():
        if verbose:
            import traceback

            traceback.print_exception(err, file=sys.stderr)
        else:
            print(f"medseg {command}: {message}", file=sys.stderr)
    return 2


def _first_process() -> bool:
    from medseg.resume import launched_rank

    return launched_rank() == 0
