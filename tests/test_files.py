"""Files written whole or not at all (`mimkit.files`): the target holds the old content or the new, never a
part; what a failed write leaves is removed; a full disk is one line, before or after the write."""

import errno
import os
import shutil
from collections import namedtuple

import pytest

from mimkit import files
from mimkit.errors import MimkitError
from mimkit.files import check_free_space, remove_temporaries, write_atomically, write_text_atomically

Usage = namedtuple("Usage", "total used free")


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary_nor_descriptor(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("old")
    descriptors = len(os.listdir("/proc/self/fd"))
    write_text_atomically(str(path), "nouveau é")  # a path given as text
    assert path.read_bytes() == "nouveau é".encode() and os.listdir(tmp_path) == ["notes.txt"]
    assert len(os.listdir("/proc/self/fd")) == descriptors


def test_the_temporary_a_killed_writer_leaves_is_one_remove_temporaries_removes(tmp_path):
    """What a writer killed mid-write leaves is a hidden ``.<name>.*.tmp`` beside the target."""
    names = []
    write_atomically(tmp_path / "notes.txt", lambda tmp: names.append(tmp.name) or tmp.write_text("x"))
    left = tmp_path / names[0]
    left.write_text("half")
    remove_temporaries(tmp_path)
    assert names[0].startswith(".notes.txt.") and not left.exists()


def failing(err: Exception):
    def write(tmp):
        tmp.write_text("half")
        raise err
    return write


@pytest.mark.parametrize("err, free, message", [
    (OSError(errno.ENOSPC, "No space left on device"), 10**12,
     "cannot write '.*notes.txt': the disk is full"),
    (RuntimeError("basic_ios::clear"), files.FULL_BELOW - 1,
     r"cannot write '.*notes.txt': the disk is full \(found after the write failed with RuntimeError: "
     r"basic_ios::clear; 16.8 MB free\)"),
])
def test_a_failed_write_keeps_the_old_file_removes_its_temporary_and_is_one_line(tmp_path, monkeypatch, err,
                                                                                  free, message):
    path = tmp_path / "notes.txt"
    path.write_text("old")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: Usage(10**13, 0, free))
    with pytest.raises(MimkitError, match=message):
        write_atomically(path, failing(err))
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["notes.txt"]


def test_an_error_without_a_number_on_a_disk_with_room_is_not_taken_for_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: Usage(10**13, 0, files.FULL_BELOW))
    with pytest.raises(RuntimeError, match="a bug"):
        write_atomically(tmp_path / "notes.txt", failing(RuntimeError("a bug")))
    assert os.listdir(tmp_path) == []


def test_a_large_write_is_refused_before_it_starts_on_a_disk_without_room(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: Usage(10**13, 0, 2_000_000))
    check_free_space(tmp_path / "model.safetensors", 2_000_000)
    with pytest.raises(MimkitError, match=r"cannot write '.*model.safetensors': the disk is full \(checked "
                                          r"before writing: 2.0 MB free, about 2.0 MB needed\)"):
        check_free_space(tmp_path / "model.safetensors", 2_000_001)


def test_only_the_hidden_temporaries_of_killed_writers_are_removed(tmp_path):
    kept = ["notes.tmp", "model.safetensors", ".hidden", "tmp.txt"]
    removed = [".model.safetensors.k3j2.tmp", ".tmpX7b2Qz", ".link.tmp", ".dangling.tmp"]
    for name in kept + removed[:2]:
        (tmp_path / name).write_text("x")
    (tmp_path / ".tmpdir").mkdir()  # a folder is never removed
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (tmp_path / ".link.tmp").symlink_to(victim)
    (tmp_path / ".dangling.tmp").symlink_to(tmp_path / "gone")  # a link to nothing is not a file
    remove_temporaries(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([*kept, ".tmpdir", "victim.txt"])
    assert victim.read_text() == "mine"
