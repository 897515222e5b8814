"""Errors: one package exception family; only ``cli.py`` turns them into exit codes."""

from __future__ import annotations


class ScbdError(Exception):
    """Base of every error scbd-cells raises on purpose.

    The message is one paragraph for a person: what was expected, what was
    found, and what to do about it. ``exit_code`` is what the CLI exits with.
    """

    exit_code = 1


class InputError(ScbdError):
    """The user asked for something impossible (bad option value, bad path)."""

    exit_code = 2


class DataError(ScbdError):
    """Input data (a table, an image, a store, a complexes file) is not usable."""

    exit_code = 1


class DiskFullError(DataError):
    """The output's disk is full, or has too little room for the output."""


class StoreError(DataError):
    """A Zarr store is missing, unfinished, or of another format version."""


class CheckpointError(DataError):
    """A checkpoint is missing or does not fit the store it is used with."""


class TrainingError(ScbdError):
    """Training cannot go on (non-finite loss, ...); the last good checkpoint is kept."""
