"""``medseg fit``, ``validate`` and ``test``: Lightning's ``LightningCLI`` (see :mod:`medseg.training`)."""

from __future__ import annotations


def fit(argv: list[str]) -> int:
    """``medseg fit ARGS`` (``argv[0]`` is ``fit``): train, then print where the run is and how it went."""
    from medseg import console
    from medseg.training import fit as train

    result = train(argv[1:])
    if result.cli is None or result.cli.trainer.is_global_zero:  # once, not once per DDP process
        print(console.fit_summary(result))
    return 0


def run(argv: list[str]) -> int:
    """``medseg validate|test ARGS`` (``argv[0]`` is the command)."""
    from medseg.training import run_cli

    run_cli(argv)
    return 0
