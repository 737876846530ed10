"""Errors a user can cause. The CLI prints them as one line and exits non-zero, without a traceback."""

from __future__ import annotations


class SefusionError(Exception):
    """A mistake in the user's input (recipe, paths, checkpoints, parameters). The message names the thing."""


class RecipeError(SefusionError, ValueError):
    """The recipe or a method parameter is invalid."""


class CheckpointError(SefusionError):
    """A checkpoint folder or file cannot be read, or does not match the others."""


class OutputExistsError(SefusionError):
    """The output folder exists and --overwrite was not given."""


class NonFiniteOutputError(SefusionError):
    """A tensor about to be written holds NaN/Inf, and --allow-nonfinite was not given."""
