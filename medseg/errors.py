"""Errors the ``medseg`` command reports as one line and exit code 2 (no traceback)."""

from __future__ import annotations


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run (another model, other classes)."""


class ConfigError(ValueError):
    """Options that cannot work together, found before anything runs."""


class InputError(ValueError):
    """An input file medseg cannot use (another dimensionality, NaN voxels, ...); ``str`` is
    ``"<file>: <reason>"``."""
