"""The exceptions the command line turns into a message and an exit status.

Library code raises `MimkitError` for bad input (a missing path, an unknown model, an impossible
option); the CLI prints its message on one line and exits with status 2, never a traceback. A run
stopped by a signal raises `Interrupted` after saving: exit status 130.
A failed write (disk full, read-only) becomes a `MimkitError` too, through `explain_write_errors`.
"""

import contextlib
import errno
import re
from pathlib import Path


class MimkitError(Exception):
    """A user-facing error whose message alone says what is wrong and how to fix it."""


class Interrupted(Exception):
    """A run stopped on Ctrl-C or SIGTERM after saving a checkpoint (the loop has said where); the CLI
    exits with status 130 so that scripts and schedulers do not take the run for finished."""


_WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "it is read-only (permission denied)",
    errno.EPERM: "it is read-only (operation not permitted)",
}


def error_number(err: Exception) -> int | None:
    """The ``errno`` of a failed I/O call, or None. safetensors reports its I/O errors as
    ``SafetensorError("... (os error 28)")``, not as ``OSError``: the number is read from that text."""
    code = getattr(err, "errno", None)
    if code is None and (found := re.search(r"os error (\d+)", str(err))):
        code = int(found.group(1))
    return code


@contextlib.contextmanager
def explain_write_errors(path: str | Path):
    """Turn a failed write to ``path`` (disk full, read-only, no permission) into a one-line `MimkitError`;
    any other error passes through."""
    try:
        yield
    except Exception as err:
        code = error_number(err)
        if code not in _WRITE_FAILURES:
            raise
        raise MimkitError(f"cannot write '{path}': {_WRITE_FAILURES[code]}; free space or choose a writable "
                          "location (files written before are untouched)") from None
