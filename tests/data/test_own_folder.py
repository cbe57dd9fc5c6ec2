"""A user's own folder: the start-up summary, workers within the CPUs, the stored file list, the size hint,
the recipe chosen by folder size."""

import io
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit import cli, cpus
from mimkit.cli import choose_recipe, main
from mimkit.data.filelist import FileList, load_file_list, save_file_list, train_source
from mimkit.data.folders import ListedFolderSource
from mimkit.data.sources import build_source, count_images
from mimkit.data.survey import DataFacts, fitting_size, held_out_count, size_hint, survey
from mimkit.errors import MimkitError
from mimkit.runs import file_list_path, load_config

TINY = ["--model", "vit_mini", "--set", "model.kwargs.depth=2", "--set", "model.kwargs.decoder_depth=1",
        "--batch-size", "4"]


def write_images(folder, n, size=(32, 32), mode="RGB", start=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    for i in range(start, start + n):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(folder / f"{i:03d}.jpg")


def test_summary_facts_on_a_tiny_folder(tmp_path, capsys):
    data = tmp_path / "shoes"
    write_images(data / "train" / "boot", 6, (32, 32), "L")
    write_images(data / "train" / "sandal", 5, (48, 24), "L", start=10)
    write_images(data / "val" / "boot", 3, (32, 32), "L")
    out = tmp_path / "run"
    assert main(["pretrain", "mae", "--data", str(data), "--out", str(out), "--max-steps", "1", *TINY,
                 "--set", "data.img_size=32", "--set", "model.patch_size=8"]) == 0
    printed = capsys.readouterr().out
    assert "shoes: 11 images for training, 3 held out; 32x32 to 48x24, median 32x32 px (all read)" in printed
    assert "1 channel (L: all 11 sampled files are grey), 2 classes" in printed
    assert "recipe    mae_small: 11 images, fewer than 100,000" in printed
    assert "mae vit_mini, 32 px in 8-px patches (4x4 grid), 75% masked" in printed
    assert "1 steps (0.50 epochs), global batch 4" in printed
    assert f"data workers (asked 8; this process may use {cpus.usable_cpus()} CPUs)" in printed
    facts = json.loads((out / "data.json").read_text())
    counts = (facts["train_images"], facts["held_out_images"], facts["channels"], facts["classes"])
    assert counts == (11, 3, 1, 2)
    assert facts["smallest"] == [32, 32] and facts["largest"] == [48, 24] and facts["median"] == [32, 32]
    assert facts["num_workers"] == min(8, cpus.usable_cpus()) and facts["recipe"].startswith("mae_small")


def test_sizes_of_a_large_folder_come_from_a_spread_sample(tmp_path):
    write_images(tmp_path / "a", 6, (20, 20))
    write_images(tmp_path / "b", 6, (60, 50), start=10)
    source, _ = train_source(str(tmp_path), file_list_path(tmp_path / "run"))
    facts = survey(source, held_out_images=0, samples=4)
    assert facts.sizes_read == 4 and facts.train_images == 12
    assert (facts.smallest, facts.largest) == ((20, 20), (60, 50))  # the sample reaches both halves


def test_workers_capped_by_affinity_and_cgroup_quota(tmp_path, monkeypatch):
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    quota.write_text("max 100000\n")
    assert cpus.usable_cpus(quota) == 4
    quota.write_text("150000 100000\n")  # one and a half CPUs: two may run
    assert cpus.usable_cpus(quota) == 2
    assert cpus.usable_cpus(tmp_path / "absent") == 4

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5}, raising=False)
    monkeypatch.setattr(cpus, "CGROUP_CPU_MAX", tmp_path / "absent")
    assert cpus.data_workers(8) == 1 and cpus.data_workers(0) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)  # one process (no torchrun): all eight
    assert cpus.data_workers(8) == 8 and cpus.data_workers(12) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes share the eight CPUs
    assert cpus.data_workers(8) == 4


def test_stored_list_reused_on_resume(tmp_path, capsys):
    data, out = tmp_path / "imgs", tmp_path / "run"
    write_images(data, 12)
    args = ["pretrain", "mae", "--data", str(data), "--out", str(out), *TINY, "--set", "data.img_size=32",
            "--set", "model.patch_size=8", "--set", "data.num_workers=0"]
    assert main([*args, "--max-steps", "2"]) == 0
    first = file_list_path(out).read_text()
    assert "12 images listed, kept in" in capsys.readouterr().out

    write_images(data, 1, start=100)
    (data / "100.jpg").rename(data / "000a_added.jpg")  # sorts second: a fresh list would shift the indices
    assert main([*args, "--max-steps", "4"]) == 0
    printed = capsys.readouterr().out
    assert "12 images from" in printed and "new files are ignored (--rescan takes them in)" in printed
    assert file_list_path(out).read_text() == first
    source, _ = train_source(str(data), file_list_path(out))
    assert isinstance(source, ListedFolderSource) and len(source) == 12
    assert not any("added" in p for p in source.paths)

    assert main([*args, "--max-steps", "6", "--rescan"]) == 0  # the run goes on, on the folder as it is now
    assert ("13 images listed again (--rescan): 0 files dropped and 1 added since" in capsys.readouterr().out
            and len(load_file_list(file_list_path(out)).files) == 13)
    assert json.loads((out / "data.json").read_text())["resumed_from"] == 4


def test_a_file_added_to_any_class_folder_is_noticed_on_resume(tmp_path):
    """The resume's note compares the newest modification time of every listed folder with the stored one:
    a file added to one class folder (the root and the other class untouched) is noticed."""
    for name in ("a", "b"):
        write_images(tmp_path / "data" / name, 3)
    for folder in (tmp_path / "data", tmp_path / "data" / "a", tmp_path / "data" / "b"):
        os.utime(folder, ns=(10**18, 10**18))  # all listed long ago
    list_file = file_list_path(tmp_path / "run")
    train_source(str(tmp_path / "data"), list_file)
    write_images(tmp_path / "data" / "b", 1, start=100)
    _, note = train_source(str(tmp_path / "data"), list_file)
    assert "6 images from" in note and "the folder changed since" in note


def test_a_stored_list_of_other_data_is_not_read(tmp_path):
    """A run's file list belongs to the data it was made for: a run given other data (one started afresh
    before its first checkpoint, or resumed with --force-config) lists that data instead."""
    write_images(tmp_path / "a", 3)
    write_images(tmp_path / "b", 5, start=10)
    list_file = file_list_path(tmp_path / "run")
    train_source(str(tmp_path / "a"), list_file)
    other, note = train_source(str(tmp_path / "b"), list_file)
    assert len(other) == 5 and "5 images listed, kept in" in note
    assert load_file_list(list_file).source == str(tmp_path / "b")


@pytest.mark.parametrize("shards", [False, True])
def test_a_resumed_source_reads_as_the_listed_one(tmp_path, shards):
    """From its file list, a resumed run's source keeps the first one's name (the dataset's, not its
    train/'s), classes, labels, pixels, and the channels and bad-image and decode settings it is given."""
    for k, name in enumerate(("boot", "sandal")):
        write_images(tmp_path / "shoes" / "train" / name, 2, (40, 40), start=10 * k)
    spec = str(tmp_path / "shoes")
    if shards:
        assert main(["data", "pack", spec, "--out", str(tmp_path / "packed")]) == 0
        spec = f"shards:{tmp_path / 'packed'}"
    list_file, options = file_list_path(tmp_path / "run"), dict(channels=1, skip_bad_images=True,
                                                                 max_bad_images=3, decode_min_side=10)
    first, _ = train_source(spec, list_file, **options)
    resumed, note = train_source(spec, list_file, **options)
    assert "4 images from" in note
    assert resumed.info == first.info and resumed.info.name == ("packed" if shards else "shoes")
    assert resumed.info.classes == ["boot", "sandal"] and resumed.labels == first.labels == [0, 0, 1, 1]
    assert resumed.info.channels == 1 and torch.equal(resumed[3][0], first[3][0])
    assert resumed[3][0].shape == (1, 10, 10)  # decoded reduced 4x: a shorter side of 10
    for source in (first, resumed):
        assert (source.skip_bad_images, source.max_bad_images) == (True, 3)


def test_a_stored_file_list_keeps_names_with_spaces_and_tabs_at_their_ends(tmp_path):
    """Only the line break is taken off a stored entry: a name that ends in a space or a tab, or starts with
    one, is read back as it was saved (a resume must find the same files)."""
    names = ["ends in a space.png ", " starts with one.png", "ends in a tab.png\t", "\tstarts with one.jpg"]
    listed = FileList(source="folder", root=str(tmp_path), name="odd", classes=[], folder_mtime_ns=0,
                      files=[(-1, name) for name in names])
    assert load_file_list(save_file_list(listed, tmp_path / "files.txt")) == listed


def test_file_list_refusals_and_a_rescan_that_changes_nothing(tmp_path):
    write_images(tmp_path / "data", 3)
    list_file = file_list_path(tmp_path / "run")
    train_source(str(tmp_path / "data"), list_file)
    _, note = train_source(str(tmp_path / "data"), list_file, rescan=True)
    assert note == "file list: 3 images listed again (--rescan), the same files in the same order"
    listed = load_file_list(list_file)
    with pytest.raises(MimkitError, match=r"image file name 'a\\nb.jpg' holds a line break; rename it"):
        save_file_list(replace(listed, files=[(-1, "a\nb.jpg")]), tmp_path / "other.txt")
    header, *files = list_file.read_text().splitlines(keepends=True)  # a list from before shards had one
    old = json.loads(header.removeprefix("# mimkit file list "))
    del old["shards"]
    list_file.write_text("# mimkit file list " + json.dumps(old) + "\n" + "".join(files))
    resumed, note = train_source(str(tmp_path / "data"), list_file)
    assert isinstance(resumed, ListedFolderSource) and "3 images from" in note and len(resumed[2][0]) == 3
    list_file.write_text("0\ta.jpg\n")
    with pytest.raises(MimkitError, match="is not a mimkit file list; delete it to list the folder again"):
        train_source(str(tmp_path / "data"), list_file)


def facts_with_median(side: int) -> DataFacts:
    return DataFacts("x", 10, 0, 10, (side, side), (side, side), (side, side), 3, 0)


def test_size_hint():
    assert size_hint(224, facts_with_median(64)) == {"data.img_size": 64, "model.patch_size": 8}
    assert size_hint(224, facts_with_median(28)) == {"data.img_size": 28, "model.patch_size": 4}
    assert size_hint(224, facts_with_median(150)) is None  # not much smaller: left alone
    assert size_hint(None, facts_with_median(64)) is None  # the native size already
    assert fitting_size(100) == (96, 8) and fitting_size(112) == (112, 16) and fitting_size(10) == (10, 2)


def test_the_survey_orders_sizes_by_area_and_takes_each_sides_median_and_the_hint_the_shorter(tmp_path):
    """Non-square sizes: the smallest and largest by area (not by width), the median of the widths and of the
    heights apart, and the size hint fitted to the median's shorter side."""
    for k, size in enumerate([(30, 10), (20, 20), (40, 40), (70, 12), (12, 60)]):
        write_images(tmp_path / "data", 1, size, start=k)
    facts = survey(build_source(str(tmp_path / "data")), held_out_images=0)
    assert (facts.smallest, facts.largest, facts.median) == ((30, 10), (40, 40), (30, 20))
    assert size_hint(224, facts) == {"data.img_size": 20, "model.patch_size": 2}


def test_images_of_half_the_size_get_a_hint():
    assert size_hint(224, facts_with_median(112)) == {"data.img_size": 112, "model.patch_size": 16}


def test_size_hint_printed_and_auto_size_applied(tmp_path, capsys):
    data = tmp_path / "imgs"
    write_images(data, 8)
    base = ["pretrain", "mae", "--data", str(data), *TINY, "--max-steps", "1", "--set", "data.num_workers=0"]
    assert main([*base, "--out", str(tmp_path / "hint"), "--set", "data.img_size=96"]) == 0
    printed = capsys.readouterr().out
    assert "much smaller than 96 px: --set data.img_size=32 --set model.patch_size=4 fits them" in printed
    assert load_config(tmp_path / "hint").data.img_size == 96  # a hint, never a silent change

    assert main([*base, "--out", str(tmp_path / "auto"), "--set", "data.img_size=96", "--auto-size"]) == 0
    assert "auto-size data.img_size=32 model.patch_size=4" in capsys.readouterr().out
    config = load_config(tmp_path / "auto")
    assert (config.data.img_size, config.model.patch_size) == (32, 4)
    # a run that started at 96 px keeps its model
    assert main([*base, "--out", str(tmp_path / "hint"), "--auto-size", "--max-steps", "2"]) == 2
    assert "--auto-size would change" in capsys.readouterr().err


def test_recipe_chosen_by_folder_size(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "SMALL_DATA_IMAGES", 10)
    write_images(tmp_path / "few", 6)
    write_images(tmp_path / "many" / "train" / "a", 12)
    assert choose_recipe("mae", str(tmp_path / "few"))[0] == "mae_small"
    assert "6 images, fewer than 10" in choose_recipe("mae", str(tmp_path / "few"))[1]
    assert choose_recipe("mae", str(tmp_path / "many"))[0] == "mae_in1k"
    assert choose_recipe("beit", str(tmp_path / "few"))[0] == "beit_in1k"  # no small-data BEiT recipe
    assert choose_recipe("mae", "fashion-mnist")[0] == "mae_fmnist"
    assert count_images(str(tmp_path / "many"), stop_after=3) == 12  # stops after the directory that passes 3
    assert count_images(str(tmp_path / "few"), stop_after=100) == 6


def test_the_survey_of_a_generated_source_reads_one_size_for_every_image_and_counts_no_held_out_split(
        tmp_path, tiny_mnist):
    """A source without image files (generated, in memory) has one size for all its images, each counted
    read (at most `samples`); a spec without a val or test split holds 0 images out, a folder with one
    holds its count, MNIST under a root its test files."""
    synthetic = build_source("synthetic:12")
    side = synthetic.info.image_size
    facts = survey(synthetic, held_out_images=0)
    assert (facts.train_images, facts.sizes_read) == (12, 12) and "(all read)" in facts.describe()
    assert facts.smallest == facts.largest == facts.median == (side, side)
    assert survey(synthetic, held_out_images=0, samples=5).sizes_read == 5
    write_images(tmp_path / "flat", 3)
    write_images(tmp_path / "split" / "train", 2)
    write_images(tmp_path / "split" / "val", 4)
    assert held_out_count(str(tmp_path / "flat")) == 0 and held_out_count(str(tmp_path / "split")) == 4
    assert held_out_count("mnist", root=str(tiny_mnist)) == 4


def test_a_folder_whose_sampled_headers_are_all_unreadable_reports_a_size_of_zero_and_no_hint():
    """Every header unreadable (the loader reports the files when it meets them): sizes 0 x 0, no hint;
    images of 1 px get the smallest patch, 2 px, and a 2-px image."""

    class Unreadable:
        info = build_source("synthetic:4").info

        def __len__(self):
            return 4

        def image_file(self, index):
            return io.BytesIO(b"not an image")

    facts = survey(Unreadable(), held_out_images=0)
    assert (facts.sizes_read, facts.smallest, facts.largest, facts.median) == (1, (0, 0), (0, 0), (0, 0))
    assert size_hint(224, facts) is None and size_hint(224, facts_with_median(0)) is None
    assert size_hint(224, facts_with_median(1)) == {"data.img_size": 2, "model.patch_size": 2}
    assert fitting_size(1) == (2, 2)
