"""Placeholder: filled in by issue 15."""

MODELS: tuple = ()
