"""Files written whole or not at all, by every command alike.

Each file is written to a temporary file that ``mkstemp`` creates next to it (``O_EXCL``: a fresh random
name, never an existing file or a symlink planted to redirect the write) and renamed over the target, so a
reader sees the old file or the new one, and a killed writer leaves at most a hidden ``.<name>.*.tmp``. A
full or read-only disk is one line (`mimkit.errors.explain_write_errors`), and the temporary file is removed.
"""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from mimkit.errors import explain_write_errors


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
        finally:
            tmp.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str) -> None:
    """Replace ``path``'s content with ``text`` (UTF-8) whole, through `write_atomically`."""
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
