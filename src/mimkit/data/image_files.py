"""Image files in folders: what counts as an image file (the extensions every folder reader lists, any
case), and listing them under a folder, recursively, hidden entries skipped, each real folder once."""

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def walk_images(folder: Path) -> Iterator[tuple[str, list[str]]]:
    """`(directory, image file names)` for every directory under `folder`, hidden entries skipped.

    Symlinked directories are followed, but each real directory (device and inode) is read once, under the
    first path met in sorted order: a link back up the tree (a loop) or a second way into a folder already
    listed is skipped, and named in one warning at the end.
    """
    seen = {_directory_id(folder)}
    skipped = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(d for d in dirnames if not _is_hidden(d)):
            identity = _directory_id(Path(dirpath, name))
            if identity in seen:
                skipped.append(os.path.join(dirpath, name))
            else:
                seen.add(identity)
                kept.append(name)
        dirnames[:] = kept  # os.walk descends into these only
        yield dirpath, [f for f in filenames if not _is_hidden(f) and f.lower().endswith(IMAGE_EXTENSIONS)]
    if skipped:
        warnings.warn(f"listing '{folder}': skipped {len(skipped)} symlinked folder(s) leading to a folder "
                      f"already listed (a loop, or a second way in): {', '.join(skipped[:3])}"
                      f"{', ...' if len(skipped) > 3 else ''}", stacklevel=2)


def _directory_id(path: Path) -> tuple[int, int]:
    stat = os.stat(path)  # follows the link: the directory it leads to
    return stat.st_dev, stat.st_ino


def listing_bar(folder: Path) -> tqdm:
    """A progress bar (on stderr) that shows once listing `folder` takes more than two seconds, as it does
    for folders of 100k+ files."""
    return tqdm(desc=f"listing {folder}", unit=" images", delay=2.0)


def image_files(folder: Path, bar: tqdm | None = None) -> list[Path]:
    """Every image under `folder`, recursively, hidden entries skipped, sorted by path; counted on `bar`
    (a listing bar of its own when None)."""
    found = []
    with contextlib.nullcontext(bar) if bar is not None else listing_bar(folder) as counter:
        for dirpath, names in walk_images(folder):
            found += [Path(dirpath, f) for f in names]
            counter.update(len(names))
    return sorted(found)


def subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name))


def is_image_name(name: str) -> bool:
    return not any(_is_hidden(part) for part in name.split("/")) and name.lower().endswith(IMAGE_EXTENSIONS)


def has_top_level_images(folder: Path) -> bool:
    return any(p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS) for p in folder.iterdir())

