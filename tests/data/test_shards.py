"""Tar shards: `mimkit data pack`, the cached member index, map-style reading, labels and bad members."""

import errno
import gzip
import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.data import shards
from mimkit.data.filelist import load_file_list, train_source
from mimkit.data.loader import SeededViews
from mimkit.data.shards import INDEX_NAME, ShardMembers, ShardReader, pack_files, parse_size, shard_files
from mimkit.data.sources import build_source
from mimkit.data.survey import survey
from mimkit.data.transforms import mae_view
from mimkit.errors import MimkitError


def image_folder(root: Path, n: int = 12, classes: tuple[str, ...] = ("cat", "dog", "eel")) -> Path:
    """n JPEGs of varied sizes, spread over class folders (flat when `classes` is empty)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / classes[i % len(classes)] if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (20 + i, 16 + 2 * i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
    return root


def pack(folder: Path, out: Path, size: str = "2KB") -> int:
    return main(["data", "pack", str(folder), "--out", str(out), "--shard-size", size])


def test_parse_size():
    assert parse_size("20KB") == 20_000 and parse_size("1GB") == 10**9 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5 mb") == 1_500_000 and parse_size("4096") == 4096 and parse_size("2KiB") == 2048
    for bad in ("", "-1GB", "1XB", "GB", "0"):
        with pytest.raises(MimkitError, match="size"):
            parse_size(bad)


def test_pack_round_trips_every_image_byte_for_byte(tmp_path):
    folder = image_folder(tmp_path / "images")
    assert pack(folder, tmp_path / "shards") == 0
    assert len(shard_files(tmp_path / "shards")) >= 3  # 2 KB shards: a few images each
    files = build_source(str(folder)).paths
    members = ShardMembers.from_folder(tmp_path / "shards", lambda name: True)
    reader = ShardReader(members)
    assert members.names == [Path(f).relative_to(folder).as_posix() for f in files]  # the folder's order
    for i, file in enumerate(files):
        assert reader(i).read() == Path(file).read_bytes()


def test_shards_read_like_the_folder_they_were_packed_from(tmp_path):
    folder = image_folder(tmp_path / "images")
    pack(folder, tmp_path / "shards")
    from_folder, from_shards = build_source(str(folder)), build_source(f"shards:{tmp_path / 'shards'}")
    assert from_shards.info.classes == from_folder.info.classes == ["cat", "dog", "eel"]
    assert from_shards.labels == from_folder.labels
    assert from_shards.info.channels == 3 and from_shards.info.image_size is None
    for i in range(len(from_folder)):
        image, label = from_shards[i]
        assert torch.equal(image, from_folder[i][0]) and label == from_folder[i][1]
    # a plain folder of .tar files is read as shards too
    assert build_source(str(tmp_path / "shards")).labels == from_folder.labels
    # a view's crop is decoded from the member's bytes as from the file's (`load_crop` on a shard reader)
    view = mae_view(16, (0.5,) * 3, (0.5,) * 3, patch_size=8)
    folder_views, shard_views = SeededViews(from_folder, view), SeededViews(from_shards, view)
    assert shard_views.crop_first
    for item in [(i, 40 + i) for i in range(len(from_folder))]:
        assert torch.equal(shard_views[item]["image"], folder_views[item]["image"])


def test_unlabeled_members_and_splits(tmp_path):
    flat = image_folder(tmp_path / "flat", n=4, classes=())
    pack(flat, tmp_path / "flat-shards")
    source = build_source(f"shards:{tmp_path / 'flat-shards'}")
    assert source.labels == [-1] * 4 and source.info.num_classes == 0

    image_folder(tmp_path / "split" / "train", n=9)
    image_folder(tmp_path / "split" / "val", n=4, classes=("dog", "eel"))  # one class missing
    assert pack(tmp_path / "split", tmp_path / "split-shards") == 0
    assert {p.name for p in (tmp_path / "split-shards").iterdir()} == {"train", "val"}
    train = build_source(f"shards:{tmp_path / 'split-shards'}")
    val = build_source(f"shards:{tmp_path / 'split-shards'}", split="val")
    assert val.info.classes == train.info.classes and val.labels == [1, 1, 2, 2]


def test_index_is_cached_atomically_and_refreshed_when_a_shard_changes(tmp_path, monkeypatch):
    pack(image_folder(tmp_path / "images"), tmp_path / "shards")
    out = tmp_path / "shards"
    index = json.loads((out / INDEX_NAME).read_text())
    assert sorted(index["shards"]) == [p.name for p in shard_files(out)]
    assert not list(out.glob(f".{INDEX_NAME}.*.tmp"))

    scanned = []
    real_scan = shards._scan_shard
    monkeypatch.setattr(shards, "_scan_shard", lambda path, is_image: scanned.append(path.name)
                        or real_scan(path, is_image))
    build_source(f"shards:{out}")
    assert scanned == []  # every entry came from the cache
    first = shard_files(out)[0]
    with tarfile.open(first, "w") as tar:  # rewritten: one member only
        data = (tmp_path / "images" / "cat" / "000.jpg").read_bytes()
        info = tarfile.TarInfo("cat/new.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert "cat/new.jpg" in ShardMembers.from_folder(out, lambda name: True).names
    assert scanned == [first.name]


def test_index_in_a_read_only_folder_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
    pack(image_folder(tmp_path / "images", n=3), tmp_path / "shards")
    (tmp_path / "shards" / INDEX_NAME).unlink()
    def read_only(src, dst):
        raise PermissionError("read-only")

    monkeypatch.setattr(shards.os, "replace", read_only)
    with pytest.warns(UserWarning, match="cannot cache the shard index"):
        assert len(build_source(f"shards:{tmp_path / 'shards'}")) == 3
    assert not list((tmp_path / "shards").glob(".*.tmp"))


def test_pack_refuses_a_non_empty_out_and_bad_sizes(tmp_path, capsys):
    folder = image_folder(tmp_path / "images", n=3)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert pack(folder, tmp_path / "full") == 2
    assert pack(folder, tmp_path / "new", size="lots") == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert "not an empty folder" in errors[0] and "size 'lots'" in errors[1]
    assert (tmp_path / "full" / "x").read_text() == "keep me" and not (tmp_path / "new").exists()
    with pytest.raises(MimkitError, match="no .tar shards"):
        build_source(f"shards:{folder}")


def test_a_full_disk_while_packing_is_one_line(tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards.tarfile, "open", full)
    assert pack(image_folder(tmp_path / "images"), tmp_path / "shards") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot write") and "the disk is full" in err


def test_pack_files_keeps_shards_near_the_size_and_order(tmp_path):
    folder = image_folder(tmp_path / "images", n=6, classes=())
    files = sorted(folder.iterdir())
    written = pack_files(files, folder, tmp_path / "out", shard_size=1)  # too small: one file per shard
    assert [p.name for p in written] == [f"shard-{i:06d}.tar" for i in range(6)]
    with tarfile.open(written[2]) as tar:
        assert tar.getnames() == [files[2].name]


def corrupt_member(out: Path, name: str) -> None:
    """Overwrite a member's bytes inside its shard (same size, so the index still holds)."""
    members = ShardMembers.from_folder(out, lambda n: True)
    i = members.names.index(name)
    with open(out / members.shards[members.shard_of[i]], "r+b") as f:
        f.seek(int(members.offsets[i]))
        f.write(b"\0" * int(members.sizes[i]))


def test_bad_member_is_named_and_skipped_like_a_bad_file(tmp_path):
    folder = image_folder(tmp_path / "images", n=6, classes=())
    pack(folder, tmp_path / "shards")
    source = build_source(f"shards:{tmp_path / 'shards'}")
    corrupt_member(tmp_path / "shards", "002.jpg")
    with pytest.raises(MimkitError, match=r"cannot read image '.*shard-\d+\.tar:002\.jpg'"):
        source[2]
    with pytest.warns(UserWarning, match=r"shard-\d+\.tar:002\.jpg"):  # found by the probe at construction
        skipping = build_source(f"shards:{tmp_path / 'shards'}", skip_bad_images=True, max_bad_images=1)
    image, _ = skipping[2]
    assert torch.equal(image, source[3][0]) and skipping.num_bad_images == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(skipping[2][0], image)
    corrupt_member(tmp_path / "shards", "004.jpg")
    with pytest.raises(MimkitError, match="more than max_bad_images=1"):
        skipping[4]


def test_reader_survives_pickling_and_reopens(tmp_path):
    import pickle

    pack(image_folder(tmp_path / "images", n=4), tmp_path / "shards")
    source = build_source(f"shards:{tmp_path / 'shards'}")
    source[0]
    copy = pickle.loads(pickle.dumps(source))  # what a spawned DataLoader worker receives
    assert copy.reader._fds == {} and torch.equal(copy[3][0], source[3][0])


def test_start_up_survey_reads_sizes_from_the_shards(tmp_path):
    """The start-up summary's sizes come from the shard members' headers, as from the folder's files."""
    folder = image_folder(tmp_path / "images")
    pack(folder, tmp_path / "shards")
    from_folder = survey(build_source(str(folder)), held_out_images=0)
    from_shards = survey(build_source(f"shards:{tmp_path / 'shards'}"), held_out_images=0)
    assert from_shards.sizes_read == from_folder.sizes_read == 12
    assert (from_shards.smallest, from_shards.largest, from_shards.median) == (
        from_folder.smallest, from_folder.largest, from_folder.median) == ((16, 20), (38, 31), (26, 25))


def test_a_shard_cut_at_a_member_boundary_is_refused(tmp_path):
    pack(image_folder(tmp_path / "images"), tmp_path / "shards", size="1MB")
    shard = shard_files(tmp_path / "shards")[0]
    with tarfile.open(shard) as tar:
        fifth = tar.getmembers()[4]
    with open(shard, "r+b") as f:
        f.truncate(fifth.offset)  # 4 whole members are left: tarfile reads them and stops without a word
    (tmp_path / "shards" / INDEX_NAME).unlink()
    with pytest.raises(MimkitError, match=f"shard '{shard}' has no end-of-archive marker after its 4 images"):
        build_source(f"shards:{tmp_path / 'shards'}")


def test_a_shard_cut_after_it_was_indexed_or_compressed_is_one_line(tmp_path):
    pack(image_folder(tmp_path / "images", n=4, classes=()), tmp_path / "shards", size="1MB")
    source = build_source(f"shards:{tmp_path / 'shards'}")
    shard = shard_files(tmp_path / "shards")[0]
    with open(shard, "r+b") as f:  # the source indexed it whole: its last member now ends early
        f.truncate(int(source.reader.members.offsets[3]) + 10)
    with pytest.raises(MimkitError, match=r"cannot read image '.*:003\.jpg': shard ends \d+ bytes early"):
        source[3]
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "a.tar").write_bytes(gzip.compress(b"\0" * 2048))
    with pytest.raises(MimkitError, match="cannot index shard .*a.tar.*shards must be uncompressed"):
        build_source(f"shards:{tmp_path / 'gz'}")


def test_held_out_shards_with_a_class_the_train_shards_lack_are_refused(tmp_path):
    image_folder(tmp_path / "split" / "train", n=4, classes=("cat", "dog"))
    image_folder(tmp_path / "split" / "val", n=2, classes=("cat", "eel"))
    pack(tmp_path / "split", tmp_path / "shards")
    with pytest.raises(MimkitError, match=r"shard member folders \['eel'\] are not among the classes"):
        build_source(f"shards:{tmp_path / 'shards'}", split="val")


def test_a_run_keeps_its_shard_members_and_refuses_fewer(tmp_path):
    pack(image_folder(tmp_path / "images"), tmp_path / "shards")
    spec, list_file = f"shards:{tmp_path / 'shards'}", tmp_path / "run" / "files.txt"
    first, note = train_source(spec, list_file)
    assert f"{len(first)} images listed, kept in" in note
    stored = load_file_list(list_file)
    assert stored.shards and stored.files[0] == (first.labels[0], "shard-000000.tar:cat/000.jpg")

    resumed, _ = train_source(spec, list_file)
    assert [resumed[i][0].tolist() for i in range(len(resumed))] == [first[i][0].tolist()
                                                                     for i in range(len(first))]
    last = shard_files(tmp_path / "shards")[-1]
    lost = sum(member.startswith(f"{last.name}:") for _, member in stored.files)
    last.unlink()
    with pytest.raises(MimkitError, match=f"lack {lost} of the {len(first)} images .*{last.name}: {lost}.*"
                                          "go on with the shards as they are now: --rescan"):
        train_source(spec, list_file)
    rescanned, note = train_source(spec, list_file, rescan=True)  # the run's own list, listed again
    assert len(rescanned) == len(first) - lost == len(load_file_list(list_file).files)
    assert f"{lost} shard members dropped and 0 added" in note and "the data order changes" in note


@pytest.mark.slow
def test_a_resume_on_fewer_shards_is_refused_and_rescan_goes_on(tmp_path, capsys):
    pack(image_folder(tmp_path / "images"), tmp_path / "shards")
    args = ["pretrain", "mae", "--data", f"shards:{tmp_path / 'shards'}", "--out", str(tmp_path / "run"),
            "--model", "vit_mini", "--batch-size", "4", "--set", "data.img_size=16", "--set",
            "model.patch_size=4", "--set", "model.kwargs.depth=1", "--set", "model.kwargs.decoder_depth=1",
            "--set", "data.num_workers=0"]
    assert main([*args, "--max-steps", "1"]) == 0
    last = shard_files(tmp_path / "shards")[-1]
    last.unlink()
    capsys.readouterr()
    assert main([*args, "--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"({last.name}: " in err and "Traceback" not in err

    assert main([*args, "--max-steps", "2", "--rescan"]) == 0  # goes on from step 1 on the shards left
    assert "shard members dropped and 0 added" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "data.json").read_text())["resumed_from"] == 1
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-2.pt", weights_only=True)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2}  # the optimizer went on too

def test_pack_max_side_stores_larger_images_resized_upright_and_the_index_says_so(tmp_path, capsys):
    """`--max-side 24`: the larger images are stored upright with their longer side 24, re-encoded at the
    quality asked; the others byte for byte; the index records both, and the survey's summary says so
    (also after the index is rebuilt for a changed shard)."""
    folder = image_folder(tmp_path / "images")  # sides 16..38
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 wide, 30 high; upright 30 wide, 40 high
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(folder / "cat" / "turned.jpg", exif=exif)
    assert main(["data", "pack", str(folder), "--out", str(tmp_path / "shards"), "--max-side", "24",
                 "--quality", "70"]) == 0
    assert "max side 24" in capsys.readouterr().out
    packed = build_source(f"shards:{tmp_path / 'shards'}")
    originals = build_source(str(folder))
    for i, file in enumerate(originals.paths):
        stored = packed.image_file(i).read()
        width, height = Image.open(file).size
        if max(width, height) <= 24:
            assert stored == Path(file).read_bytes()
            continue
        with Image.open(io.BytesIO(stored)) as img:
            upright = (height, width) if file.endswith("turned.jpg") else (width, height)
            assert max(img.size) == 24 and abs(img.width / img.height - upright[0] / upright[1]) < 0.1
            assert not img.getexif().get(0x0112)  # stored upright
    index = json.loads((tmp_path / "shards" / INDEX_NAME).read_text())
    assert index["packed"] == {"max_side": 24, "quality": 70}
    assert "packed at max side 24 px, JPEG quality 70" in survey(packed, held_out_images=0).describe()
    shard = shard_files(tmp_path / "shards")[0]
    shard.write_bytes(shard.read_bytes())  # a newer mtime: the index is rebuilt
    assert "max side 24" in build_source(f"shards:{tmp_path / 'shards'}").info.storage_note


def test_pack_max_side_encodes_at_the_quality_asked(tmp_path):
    """A resized image is stored as a JPEG of the `--quality` asked: its quantization tables are those
    Pillow writes at that quality (not at its default, 75)."""
    big = tmp_path / "images" / "big.png"
    big.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(big)
    for quality in (30, 95):
        out = tmp_path / f"q{quality}"
        pack_files([big], big.parent, out, shard_size=1 << 20, max_side=24, quality=quality)
        stored = build_source(f"shards:{out}").image_file(0).read()
        reference = io.BytesIO()
        Image.new("RGB", (8, 8)).save(reference, "JPEG", quality=quality)
        assert Image.open(io.BytesIO(stored)).quantization == Image.open(reference).quantization


def test_pack_quality_without_max_side_is_refused(tmp_path, capsys):
    folder = image_folder(tmp_path / "images", n=2)
    assert main(["data", "pack", str(folder), "--out", str(tmp_path / "a"), "--quality", "80"]) == 2
    assert main(["data", "pack", str(folder), "--out", str(tmp_path / "b"), "--max-side", "0"]) == 2
    assert "--max-side" in capsys.readouterr().err


@pytest.mark.skipif(shards.transcode_restart_every_mcu is None, reason="the C extension was not built")
def test_pack_mcu_index_stores_sequential_jpegs_with_a_restart_marker_per_mcu_and_the_same_pixels(tmp_path):
    """`--mcu-index`: every sequential JPEG is stored re-encoded with restart interval 1 (the same pixels);
    a PNG, a progressive JPEG and a JPEG cut short (with a warning) are stored as they are; the index
    records it and the storage note says nothing of it (the pixels do not change)."""
    folder = image_folder(tmp_path / "images", n=6)
    pixels = np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "cat" / "plain.png")
    Image.fromarray(pixels).save(folder / "cat" / "progressive.jpg", progressive=True)
    assert main(["data", "pack", str(folder), "--out", str(tmp_path / "shards"), "--mcu-index"]) == 0
    packed, originals = build_source(f"shards:{tmp_path / 'shards'}"), build_source(str(folder))
    for i, file in enumerate(originals.paths):
        stored, original = packed.image_file(i).read(), Path(file).read_bytes()
        as_is = file.endswith(("plain.png", "progressive.jpg"))
        assert (stored == original) == as_is, file
        assert (b"\xff\xdd\x00\x04\x00\x01" in stored) != as_is, file
        if not as_is:
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored))), np.asarray(Image.open(file)))
    assert json.loads((tmp_path / "shards" / INDEX_NAME).read_text())["packed"] == {"mcu_index": True}
    assert packed.info.storage_note is None or "max side" not in packed.info.storage_note
    whole_file = io.BytesIO()
    Image.fromarray(pixels).save(whole_file, "JPEG")
    with pytest.warns(UserWarning, match="as it is"):  # its header whole, its scan cut short
        assert shards._restart_every_mcu(whole_file.getvalue()[:-200], Path("cut.jpg")) is None


def test_pack_mcu_index_without_the_c_extension_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "transcode_restart_every_mcu", None)
    with pytest.raises(MimkitError, match="C extension"):
        pack_files([], tmp_path, tmp_path / "out", 2**20, mcu_index=True)


def test_hidden_tar_files_beside_the_shards_are_no_shards(tmp_path):
    """`._shard-000000.tar` (macOS's resource fork copies) and other hidden .tar files are left out."""
    pack(image_folder(tmp_path / "images", n=4), tmp_path / "shards")
    packed = shard_files(tmp_path / "shards")
    (tmp_path / "shards" / f"._{packed[0].name}").write_bytes(packed[0].read_bytes())
    assert shard_files(tmp_path / "shards") == packed
    assert len(build_source(f"shards:{tmp_path / 'shards'}")) == 4


def test_a_shard_is_closed_before_the_member_that_would_take_it_past_the_size(tmp_path):
    folder = image_folder(tmp_path / "images", n=8, classes=())
    files = sorted(folder.iterdir())
    shard_size = 3 * (tarfile.BLOCKSIZE + max(f.stat().st_size for f in files))  # at least three members fit
    written = pack_files(files, folder, tmp_path / "out", shard_size=shard_size)
    entries = shards.load_index(tmp_path / "out", lambda name: True).values()
    block = tarfile.BLOCKSIZE
    member_bytes = [sum(block + -(-s // block) * block for s in e["sizes"]) for e in entries]
    assert 1 < len(written) < 8 and all(b <= shard_size for b in member_bytes), member_bytes


@pytest.mark.parametrize("shape, size", [((40, 30), (15, 20)), ((3, 200), (20, 1))])
def test_pack_max_side_keeps_a_grey_image_grey_and_a_sliver_one_pixel_thick(tmp_path, shape, size):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.full(shape, 128, np.uint8)).save(tmp_path / "images" / "grey.jpg")
    pack_files([tmp_path / "images" / "grey.jpg"], tmp_path / "images", tmp_path / "out", 10**6, max_side=20)
    reader = ShardReader(ShardMembers.from_folder(tmp_path / "out", lambda name: True))
    with Image.open(reader(0)) as stored:
        assert (stored.format, stored.mode, stored.size) == ("JPEG", "L", size)


def test_pack_max_side_stores_an_unreadable_file_as_it_is_with_a_warning(tmp_path):
    """The training reports a bad file when it meets it (``data.skip_bad_images``); packing keeps it."""
    (tmp_path / "images").mkdir()
    bad = tmp_path / "images" / "bad.jpg"
    bad.write_bytes(b"not a JPEG at all")
    with pytest.warns(UserWarning, match="packing '.*bad.jpg' as it is: it cannot be read"):
        [shard] = pack_files([bad], tmp_path / "images", tmp_path / "shards", 1 << 20, max_side=8)
    with tarfile.open(shard) as tar:
        assert tar.extractfile("bad.jpg").read() == b"not a JPEG at all"
