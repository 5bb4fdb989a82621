"""Errors the model layer raises for problems a user can fix (the CLI shows str(error))."""

from __future__ import annotations


class ModelError(Exception):
    """Base class: the message is one clear sentence."""


class ModelNotAvailableError(ModelError):
    """The weights are neither local nor downloadable right now."""


class CheckpointError(ModelError):
    """A checkpoint or overlay does not fit the model (bad keys, shapes, tokenizer ids)."""
