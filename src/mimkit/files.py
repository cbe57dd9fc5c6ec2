"""Files written whole or not at all, by every command alike.

Each file is written to a temporary file that ``mkstemp`` creates next to it (``O_EXCL``: a fresh random
name, never an existing file or a symlink planted to redirect the write) and renamed over the target, so a
reader sees the old file or the new one, and a killed writer leaves at most a hidden ``.<name>.*.tmp``. A
full or read-only disk is one line (`mimkit.errors.explain_write_errors`), and the temporary file is removed.
Some writers fail on a full disk without an error number (``torch.save`` raises ``RuntimeError:
basic_ios::clear``): the disk's free space is checked before a large write (`check_free_space`) and after a
failure, while what was written still takes its room.
"""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mimkit.errors import MimkitError, error_number, explain_write_errors

FULL_BELOW = 16 * 2**20  # bytes free after a failed write below which the failure is taken for a full disk
_WHAT_TO_DO = "free space or choose another location (files written before are untouched)"


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def check_free_space(path: str | Path, needed: int) -> None:
    """Refuse to start writing about ``needed`` bytes to ``path`` when its disk has less free."""
    free = shutil.disk_usage(Path(path).parent).free
    if free < needed:
        raise MimkitError(f"cannot write '{path}': the disk is full (checked before writing: "
                          f"{_megabytes(free)} free, about {_megabytes(needed)} needed); {_WHAT_TO_DO}")


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a fresh temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    with explain_write_errors(path):
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        try:
            write(tmp)
            os.replace(tmp, path)
        except Exception as err:  # checked before the temporary file goes: what it holds takes its room
            free = shutil.disk_usage(path.parent).free
            if error_number(err) is None and free < FULL_BELOW:
                raise MimkitError(f"cannot write '{path}': the disk is full (found after the write failed "
                                  f"with {type(err).__name__}: {str(err)[:60]}; {_megabytes(free)} free); "
                                  f"{_WHAT_TO_DO}") from None
            raise
        finally:
            tmp.unlink(missing_ok=True)


def remove_temporaries(folder: str | Path) -> None:
    """Remove the temporary files killed writers left in ``folder``: ours (``.<name>.*.tmp``) and those of
    safetensors (``.tmpXXXXXX``, renamed over its target when done). Only hidden names are touched; symlinks
    are removed, never followed."""
    for path in Path(folder).iterdir():
        name = path.name
        left = name.startswith(".tmp") or (name.startswith(".") and name.endswith(".tmp"))
        if left and (path.is_symlink() or path.is_file()):
            path.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str) -> None:
    """Replace ``path``'s content with ``text`` (UTF-8) whole, through `write_atomically`."""
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
