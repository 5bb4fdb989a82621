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


def os_error_sentence(err: OSError) -> str:
    """One sentence for an OSError about a path: the path, and what is wrong with it in words."""
    import errno

    name = err.filename if err.filename is not None else "a file"
    if err.errno == errno.ENAMETOOLONG:
        return f"{name} cannot be used: each name in a path may be at most 255 bytes, and one here is longer."
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{name} cannot be written: no space left on the device."
    return f"{name} cannot be used ({(err.strerror or type(err).__name__).lower()})."


def write_failure(err: BaseException, folder) -> str:
    """Why a write into `folder` failed, in a few words: a full device is named as such (torch
    reports a short write as a RuntimeError that names no cause)."""
    import shutil
    from contextlib import suppress

    with suppress(OSError):
        if shutil.disk_usage(folder).free < 64 * 2**20:
            return "no space left on the device"
    if isinstance(err, OSError):
        return (err.strerror or type(err).__name__).lower()
    return str(err).splitlines()[0] if str(err) else type(err).__name__
