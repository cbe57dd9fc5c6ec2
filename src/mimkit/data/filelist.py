"""The file list is part of a run: a folder is listed once, when the run starts, and the list is kept in
the run directory (`mimkit.runs.FILE_LIST`), so a resumed run reads the same files in the same order, and
starts without walking a folder of a million files again. Tar shards keep the same promise: the list names
their members, and a resume on shards that lost some of them is refused, naming the shards. ``--rescan``
lists the folder or the shards again: a new run, or a resumed one that is to train on what is there now (the
note says how many files were dropped and added; the data order changes from the resumed step on).

The list file: a header line ``# mimkit file list {json}`` (data spec, root, name, classes, whether the
entries are shard members, and the newest modification time of the listed directories), then one
``<label>\\t<path relative to root>`` (``<label>\\t<shard.tar>:<member>`` for shards) per image.
"""

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from torch.utils.data import Dataset

from mimkit.data.folders import ListedFolderSource
from mimkit.data.shards import ShardReader
from mimkit.data.sources import build_source, listed_shard_source
from mimkit.errors import MimkitError
from mimkit.files import write_atomically

_HEADER = "# mimkit file list "


@dataclass(frozen=True)
class FileList:
    """The images a run reads from a folder, as listed when it started.

    Attributes:
        source: the data spec the run was given (`data.source`).
        root: the folder the paths are relative to.
        name: the source's name.
        classes: class names, index = label; empty when unlabeled.
        files: `(label, relative path)` per image, in the source's order; for shards `(label,
            "shard.tar:member/name")` (`mimkit.data.shards.ShardMembers.key`).
        folder_mtime_ns: the newest modification time among the listed directories, when listed; a file
            added to or removed from one of them since makes it newer.
        shards: whether the files are members of tar shards in `root`.
    """

    source: str
    root: str
    name: str
    classes: list[str]
    files: list[tuple[int, str]]
    folder_mtime_ns: int
    shards: bool = False  # lists from before shards had one hold folders only


def _directories(root: str, files: list[tuple[int, str]]) -> set[str]:
    return {root} | {os.path.join(root, path.rpartition("/")[0]) for _, path in files if "/" in path}


def newest_mtime_ns(root: str, files: list[tuple[int, str]]) -> int:
    """The newest modification time among `root` and the directories holding `files` (0 if none exist)."""
    times = [os.stat(d).st_mtime_ns for d in _directories(root, files) if os.path.isdir(d)]
    return max(times, default=0)


def file_list_of(source: Dataset, spec: str) -> FileList | None:
    """The file list of a source read from a folder or from tar shards; None for the others (IDX files,
    synthetic, and Hugging Face datasets, whose rows do not change)."""
    shards = isinstance(getattr(source, "reader", None), ShardReader)
    if not hasattr(source, "paths") or (source.reader is not None and not shards):
        return None
    root = os.path.abspath(source.root)
    prefix = str(Path(source.root)) + os.sep  # the paths' own start: cutting it is 10x faster than relpath

    def relative(path: str) -> str:
        inside = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)
        return inside.replace(os.sep, "/")

    files = [(label, relative(path)) for label, path in zip(source.labels, source.paths, strict=True)]
    return FileList(spec, root, source.info.name, list(source.info.classes), files,
                    newest_mtime_ns(root, files), shards)


def save_file_list(file_list: FileList, path: str | Path) -> Path:
    """Write the list to ``path`` atomically (a temporary file, then a rename)."""
    if bad := next((path for _, path in file_list.files if "\n" in path), None):
        raise MimkitError(f"image file name {bad!r} holds a line break; rename it")
    header = {k: v for k, v in asdict(file_list).items() if k != "files"}

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(_HEADER + json.dumps(header) + "\n")
            f.writelines(f"{label}\t{p}\n" for label, p in file_list.files)

    write_atomically(path, write)
    return Path(path)


def load_file_list(path: str | Path) -> FileList | None:
    """The file list stored at ``path``, or None when there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        first = f.readline()
        if not first.startswith(_HEADER):
            raise MimkitError(f"'{path}' is not a mimkit file list; delete it to list the folder again")
        header = json.loads(first[len(_HEADER):])
        files = []
        for line in f:
            label, _, relative = line.rstrip("\n").partition("\t")
            files.append((int(label), relative))
    return FileList(files=files, **header)


def train_source(spec: str, list_file: str | Path, *, root: str | None = None, channels: int | None = None,
                 skip_bad_images: bool = False, max_bad_images: int = 100, rescan: bool = False,
                 store: bool = True, **decode) -> tuple[Dataset, str]:
    """A run's train split: from its file list (``list_file``, `mimkit.runs.HeldRun.file_list`) when that
    holds one for `spec`, else listed afresh (and stored there when `store`).

    Args:
        spec, root, channels, skip_bad_images, max_bad_images: as in `build_source`.
        rescan: list the folder again even when a file list is stored (the data order changes).
        decode: `build_source`'s ``max_image_pixels`` and ``decode_min_side``.
        store: write the list to `list_file` (the main process of a run; the others only read).

    Returns:
        `(source, note)`: the note is one line on where the list came from, for the start-up summary.
    """
    stored = load_file_list(list_file) if store or not rescan else None
    if stored is not None and stored.source != spec:
        stored = None
    if stored is not None and not rescan:
        listed = listed_shard_source if stored.shards else ListedFolderSource
        source = listed(stored.root, stored.name, stored.files, stored.classes, channels, skip_bad_images,
                        max_bad_images, **decode)
        note = (f"file list: {len(source)} images from {list_file}, the order this run "
                "started with")
        if newest_mtime_ns(stored.root, stored.files) != stored.folder_mtime_ns:
            note += ("; the folder changed since (files added or removed): this list is kept, new files are "
                     "ignored (--rescan takes them in)")
        return source, note
    source = build_source(spec, split="train", root=root, channels=channels, skip_bad_images=skip_bad_images,
                          max_bad_images=max_bad_images, **decode)
    file_list = file_list_of(source, spec)
    if file_list is None:
        return source, ""
    if store:
        Path(list_file).parent.mkdir(parents=True, exist_ok=True)
        save_file_list(file_list, list_file)
    if stored is not None:
        return source, _rescan_note(stored, file_list, list_file)
    return source, f"file list: {len(source)} images listed, kept in {list_file} for resuming"


def _rescan_note(stored: FileList, listed: FileList, list_file: str | Path) -> str:
    """One line on what ``--rescan`` changed in a run's list: the files (shard members) dropped and added."""
    before, now = {path for _, path in stored.files}, {path for _, path in listed.files}
    what = "shard members" if listed.shards else "files"
    if stored.files == listed.files:
        return f"file list: {len(now)} images listed again (--rescan), the same {what} in the same order"
    return (f"file list: {len(now)} images listed again (--rescan): {len(before - now)} {what} dropped and "
            f"{len(now - before)} added since {list_file} was stored, now replaced; the data order changes "
            "from here on")
