"""User-facing errors: each carries one clear sentence; the CLI prints it and exits non-zero."""

from __future__ import annotations


class MalmmError(Exception):
    """An error the user can cause and fix. str(error) is the sentence shown to them."""

    exit_code = 1


class InputError(MalmmError):
    """An input (file, folder, glob, URL, list) cannot be used."""


class VideoError(MalmmError):
    """A video cannot be decoded or sampled as asked."""


class DownloadError(InputError):
    """A URL could not be fetched."""


class UsageError(MalmmError):
    """Options that contradict each other or are out of range."""

    exit_code = 2
