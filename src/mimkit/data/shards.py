"""Tar shards read with random access: an index of member offsets, then one `pread` per image.

Millions of small files are slow on network file systems; a few hundred large tar files are not. A
streaming reader with a shuffle buffer cannot resume mid-epoch exactly, so these shards are read
map-style instead: the index (member name, byte offset, size) of every shard is built once, cached next
to the shards, and each image is one positioned read. The seeded global order, DDP sharding and
mid-epoch resume of `mimkit.data.loader` then work as they do for a folder.

Layout (what `pack_folder` writes and `mimkit data pack` calls): plain, uncompressed `.tar` files in one
folder; members named by their path in the packed folder, so `n01440764/img.JPEG` is labeled with the
class `n01440764` (the ImageNet layout) and `img.JPEG`, at the top level, is unlabeled. The images are
in shard order, then member order: packing a folder keeps the order of the folder's own source.

`mimkit data pack --max-side N --quality Q` stores every image whose longer side is above N resized to N
(upright, re-encoded as JPEG at quality Q); the index records both (`packed_with`), and a source read from
the shards says so (`SourceInfo.storage_note`). `--mcu-index` re-encodes every sequential JPEG losslessly
(the same pixels) with a restart marker after every MCU, so crop decoding reads only the MCUs around its box
(`mimkit.data._jpeg_region`); the index records it too.

Like timm's in-tar reader (`timm.data.readers.reader_image_in_tar`), without its worker-shared handles:
`os.pread` keeps no file position, so a descriptor inherited by forked workers is safe to share.
"""

import io
import json
import math
import os
import re
import tarfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mimkit.data.crop_decode import read_header
from mimkit.data.decode import GRAY_MODES, to_mode
from mimkit.errors import MimkitError, explain_write_errors
from mimkit.files import write_text_atomically

try:  # the optional C extension (setup.py): built where a compiler and libjpeg's headers were found
    from mimkit.data._jpeg_region import transcode_restart_every_mcu
except ImportError:
    transcode_restart_every_mcu = None

SHARD_SUFFIX = ".tar"
INDEX_NAME = ".mimkit-shard-index.json"  # hidden, so folder scans skip it
_INDEX_VERSION = 1
DEFAULT_PACK_QUALITY = 90  # JPEG quality of the images `--max-side` resizes
_SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
               "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def parse_size(text: str) -> int:
    """Bytes from a size such as `20KB`, `1GB`, `512MiB` or `1000` (KB = 1000 bytes, KiB = 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and match[2].upper()
    if not match or unit not in _SIZE_UNITS or float(match[1]) * _SIZE_UNITS[unit] < 1:
        raise MimkitError(f"size {text!r} is not a positive size like 20KB, 512MB or 1GB")
    return int(float(match[1]) * _SIZE_UNITS[unit])


def shard_files(folder: str | Path) -> list[Path]:
    """The `.tar` files at the top level of `folder`, hidden ones skipped, sorted by name."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.suffix == SHARD_SUFFIX and p.is_file() and not p.name.startswith("."))


# ---------------------------------------------------------------------------------------------------------
# The index


def _scan_shard(path: Path, is_image: Callable[[str], bool]) -> dict:
    """One shard's entry: its size and mtime (to notice a rewrite) and its image members, in tar order.

    A shard must end with tar's end-of-archive marker (a zero block) after its last member: one cut short,
    even at a member boundary, which `tarfile` reads without a word, is refused.
    """
    names, offsets, sizes = [], [], []
    try:
        with tarfile.open(path, "r:") as tar:  # "r:": compressed tars cannot be read at an offset
            for member in tar:
                if member.isfile() and is_image(member.name):
                    names.append(member.name)
                    offsets.append(member.offset_data)
                    sizes.append(member.size)
            end = tar.offset  # just past the last member: where the marker must be
        with open(path, "rb") as f:
            marker = os.pread(f.fileno(), tarfile.BLOCKSIZE, end)
    except (tarfile.TarError, OSError) as e:
        raise MimkitError(f"cannot index shard '{path}' ({e}); shards must be uncompressed .tar files") from e
    if marker != tarfile.NUL * tarfile.BLOCKSIZE:
        raise MimkitError(f"shard '{path}' has no end-of-archive marker after its {len(names)} images: it "
                          "was cut short (an interrupted copy or pack?); copy or pack it again")
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "names": names, "offsets": offsets,
            "sizes": sizes}


def _cache_index(path: Path, text: str) -> None:
    try:
        write_text_atomically(path, text)  # readers see the old index or the new one, never half of one
    except (OSError, MimkitError) as e:
        warnings.warn(f"cannot cache the shard index in '{path}' ({e}); it is rebuilt at every start",
                      stacklevel=3)


def load_index(folder: str | Path, is_image: Callable[[str], bool]) -> dict[str, dict]:
    """The member index of every shard in `folder`, `{shard file name: entry}` in shard order.

    Read from `folder/.mimkit-shard-index.json` where its entry still matches the shard's size and
    modification time; shards that are new or changed are scanned and the file rewritten (atomically).

    Args:
        folder: the folder of `.tar` shards.
        is_image: which member names are images (the others are ignored).
    """
    folder = Path(folder)
    cache = folder / INDEX_NAME
    whole = _read_index(cache)
    cached = whole["shards"] if whole.get("version") == _INDEX_VERSION else {}
    index, changed = {}, False
    for path in shard_files(folder):
        stat = path.stat()
        entry = cached.get(path.name)
        if entry is None or (entry["size"], entry["mtime_ns"]) != (stat.st_size, stat.st_mtime_ns):
            entry, changed = _scan_shard(path, is_image), True
        index[path.name] = entry
    if changed or index.keys() != cached.keys():
        packed = {"packed": whole["packed"]} if "packed" in whole else {}
        _cache_index(cache, json.dumps({"version": _INDEX_VERSION, "shards": index} | packed))
    return index


def _read_index(cache: Path) -> dict:
    try:
        whole = json.loads(cache.read_text())
        return whole if isinstance(whole, dict) and isinstance(whole.get("shards", {}), dict) else {}
    except (OSError, ValueError):
        return {}


def packed_with(folder: str | Path) -> dict | None:
    """`{"max_side": N, "quality": Q}` when `mimkit data pack --max-side` wrote the shards in `folder`."""
    return _read_index(Path(folder) / INDEX_NAME).get("packed")


# ---------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class ShardMembers:
    """Every image member of a folder of shards, addressable by position.

    Attributes:
        folder: the shards' folder.
        shards: shard file names, in order.
        shard_of: `(N,)` int array, the shard holding member i.
        offsets, sizes: `(N,)` int64 arrays, where member i's bytes are in its shard.
        names: member names (paths inside the shard), length N.
    """

    folder: Path
    shards: list[str]
    shard_of: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    names: list[str]

    @classmethod
    def from_folder(cls, folder: str | Path, is_image: Callable[[str], bool]) -> "ShardMembers":
        index = load_index(folder, is_image)
        shards = list(index)
        entries = index.values()
        return cls(
            folder=Path(folder), shards=shards,
            shard_of=np.concatenate([np.full(len(e["names"]), k, np.int32) for k, e in enumerate(entries)]
                                    or [np.zeros(0, np.int32)]),
            offsets=np.asarray([o for e in entries for o in e["offsets"]], np.int64),
            sizes=np.asarray([s for e in entries for s in e["sizes"]], np.int64),
            names=[n for e in entries for n in e["names"]],
        )

    def __len__(self) -> int:
        return len(self.names)

    def key(self, index: int) -> str:
        """`shard.tar:member/name.jpg`, the member's name in a run's file list (`mimkit.data.filelist`)."""
        return f"{self.shards[self.shard_of[index]]}:{self.names[index]}"

    def select(self, indices: Sequence[int]) -> "ShardMembers":
        """The members at ``indices``, in that order."""
        picked = np.asarray(indices, np.int64)
        return ShardMembers(self.folder, self.shards, self.shard_of[picked], self.offsets[picked],
                            self.sizes[picked], [self.names[i] for i in indices])

    def describe(self, index: int) -> str:
        """`shard.tar:member/name.jpg`, for messages."""
        return f"{self.folder / self.shards[self.shard_of[index]]}:{self.names[index]}"


def member_labels(names: Sequence[str], classes: Sequence[str] | None = None) -> tuple[list[int], list[str]]:
    """Labels from member names: the first folder of each name is its class, as in an image folder.

    Members all inside folders are labeled (classes: the sorted folder names, unless `classes` is given);
    a member at the top level makes the whole set unlabeled (labels -1, no classes), as for a folder
    with images at its top level.

    Returns:
        `(labels, classes)`.
    """
    tops = [name.split("/", 1)[0] if "/" in name else None for name in names]
    if not tops or None in tops:
        return [-1] * len(names), []
    found = sorted(set(tops))
    classes = list(classes) if classes is not None else found
    if unknown := sorted(set(found) - set(classes)):
        raise MimkitError(f"shard member folders {unknown} are not among the classes {classes}")
    label_of = {name: k for k, name in enumerate(classes)}
    return [label_of[top] for top in tops], classes


class ShardReader:
    """`reader(i)` -> a binary file object holding member i's bytes, read with one `os.pread`.

    Shards are opened on first use in each process; the descriptors are dropped when pickled (workers
    started with spawn open their own).
    """

    def __init__(self, members: ShardMembers):
        self.members = members
        self._fds: dict[int, int] = {}

    def __getstate__(self) -> dict:
        return {"members": self.members, "_fds": {}}

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def __call__(self, index: int) -> io.BytesIO:
        members = self.members
        shard = int(members.shard_of[index])
        if shard not in self._fds:
            self._fds[shard] = os.open(members.folder / members.shards[shard], os.O_RDONLY)
        size = int(members.sizes[index])
        data = os.pread(self._fds[shard], size, int(members.offsets[index]))
        if len(data) != size:
            raise OSError(f"shard ends {size - len(data)} bytes early (was it rewritten? delete "
                          f"{members.folder / INDEX_NAME} to re-index)")
        return io.BytesIO(data)


# ---------------------------------------------------------------------------------------------------------
# Writing


def check_new_folder(out: Path) -> None:
    """Refuse to write shards into a folder that holds anything already."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MimkitError(f"--out '{out}' exists and is not an empty folder; choose a new one")


def pack_files(files: Sequence[Path], root: Path, out: str | Path, shard_size: int,
               progress: Callable[[int], None] | None = None, max_side: int | None = None,
               quality: int = DEFAULT_PACK_QUALITY, mcu_index: bool = False) -> list[Path]:
    """Write `files` into `.tar` shards of about `shard_size` bytes each, in order.

    A shard is closed before the member that would take it past `shard_size` (a member larger than
    that gets a shard of its own). Members are named by their path relative to `root`. With `max_side`,
    an image whose longer side is above it is stored upright, resized to that side (bicubic) and re-encoded
    as JPEG at `quality`, under its own name; the others, and files that cannot be read (the training
    reports them as it meets them), are stored as they are; the index records both settings. With
    `mcu_index`, every sequential JPEG is stored re-encoded losslessly with a restart marker after every MCU
    (the same pixels; crop decoding then reads only the MCUs around its box); the index records that too.

    Args:
        files: the files, in the order the reader will see them.
        root: the folder the member names are relative to.
        out: a new or empty folder.
        shard_size: bytes of members per shard (tar headers included; the end of archive adds a few KB).
        progress: called with the byte count of each file written.
        max_side: the longest side stored; None stores every file as it is.
        quality: the JPEG quality of the resized images.
        mcu_index: store sequential JPEGs with a restart marker after every MCU (needs the C extension).

    Returns:
        The shards written, named `shard-000000.tar`, `shard-000001.tar`, ...
    """
    out = Path(out)
    if mcu_index and transcode_restart_every_mcu is None:
        raise MimkitError("--mcu-index needs mimkit's C extension, not built here (setup.py needs a C "
                          "compiler and libjpeg's headers)")
    check_new_folder(out)
    with explain_write_errors(out):  # a full or read-only disk: one line
        shards = _pack(files, root, out, shard_size, progress, max_side, quality, mcu_index)
        packed = ({"max_side": max_side, "quality": quality} if max_side else {}) | (
            {"mcu_index": True} if mcu_index else {})
        if packed:  # read back by load_index, which fills in the shards and keeps this
            _cache_index(out / INDEX_NAME,
                          json.dumps({"version": _INDEX_VERSION, "shards": {}, "packed": packed}))
        return shards


def _within_side(path: Path, max_side: int, quality: int) -> bytes | None:
    """The image upright, resized so that its longer side is `max_side`, as a JPEG; None when it is no
    larger than that already, or cannot be read."""
    try:
        with Image.open(path) as img:
            if max(img.size) <= max_side:
                return None
            scale = max_side / max(img.size)
            img.draft(None, (math.ceil(img.width * scale), math.ceil(img.height * scale)))  # JPEG: DCT scale
            img = to_mode(ImageOps.exif_transpose(img), "L" if img.mode in GRAY_MODES else "RGB")
            scale = max_side / max(img.size)  # of the drafted size
            img = img.resize((max(round(img.width * scale), 1), max(round(img.height * scale), 1)),
                             Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=quality)
            return buf.getvalue()
    except Exception as e:  # PIL raises many types on bad files
        warnings.warn(f"packing '{path}' as it is: it cannot be read ({e})", stacklevel=2)
        return None


def _restart_every_mcu(data: bytes, path: Path) -> bytes | None:
    """The sequential JPEG `data` re-encoded losslessly with a restart marker after every MCU; None for
    other files (PNG, progressive or CMYK JPEGs) and for those libjpeg cannot read (stored as they are)."""
    if not any((header := read_header(data, mode)) and header.crop_decodable for mode in ("RGB", "L")):
        return None
    try:
        return transcode_restart_every_mcu(data)
    except ValueError as e:
        warnings.warn(f"packing '{path}' as it is: {e}", stacklevel=2)
        return None


def _pack(files: Sequence[Path], root: Path, out: Path, shard_size: int,
          progress: Callable[[int], None] | None, max_side: int | None, quality: int,
          mcu_index: bool) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    tar, written = None, 0
    try:
        for path in files:
            stored = _within_side(path, max_side, quality) if max_side else None  # None: the file as is
            if mcu_index:  # the bytes read here are stored as they are when they take no index
                data = path.read_bytes() if stored is None else stored
                stored = _restart_every_mcu(data, path) or data
            size = len(stored) if stored is not None else path.stat().st_size
            member_bytes = tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if tar is None or (written and written + member_bytes > shard_size):
                if tar is not None:
                    tar.close()
                shards.append(out / f"shard-{len(shards):06d}{SHARD_SUFFIX}")
                tar, written = tarfile.open(shards[-1], "w"), 0
            # a deterministic header (no owner, time or mode of the source) so packs are reproducible
            info = tarfile.TarInfo(path.relative_to(root).as_posix())
            info.size, info.mode = size, 0o644
            with io.BytesIO(stored) if stored is not None else path.open("rb") as f:
                tar.addfile(info, f)
            written += member_bytes
            if progress:
                progress(path.stat().st_size)
    finally:
        if tar is not None:
            tar.close()
    return shards
