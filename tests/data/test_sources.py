import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from mimkit.data import idx, sources
from mimkit.data.decode import decode_image
from mimkit.data.filelist import train_source
from mimkit.data.folders import FlatFolderSource, ImageFolderSource, ListedFolderSource
from mimkit.data.idx import IdxSource, read_idx
from mimkit.data.image_files import is_image_name
from mimkit.data.source_info import GRAY_MEAN, GRAY_STD
from mimkit.data.sources import build_source
from mimkit.data.splits import shuffled_by_class, split_train_val
from mimkit.data.synthetic import SyntheticSource
from mimkit.errors import MimkitError
from tests.conftest import needs_fashion, write_idx

DOWNLOAD_IDX = idx._download_idx  # the real one, before the fixture below replaces it


@pytest.fixture(autouse=True)
def _isolated_lookup(private_data_cache, monkeypatch):
    """No MIMKIT_DATA from the environment, a private cache, and never a network download."""
    def offline(name):
        raise RuntimeError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(idx, "_download_idx", offline)


def write_tiny_idx(folder: Path, prefix: str, n: int = 5, compress: bool = True) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    images = np.arange(n * 4 * 4, dtype=np.uint8).reshape(n, 4, 4)
    ext = ".gz" if compress else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images, compress)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n, dtype=np.uint8) % 10, compress)
    return images


def save(path: Path, mode: str, size=(8, 8), color=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = color if color is not None else (200 if mode == "L" else (200, 100, 50))
    Image.new(mode, size, color).save(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# IDX


@needs_fashion
def test_real_fashion_mnist():
    train = build_source("fashion-mnist")
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and isinstance(label, int)
    assert train.labels.unique().tolist() == list(range(10))
    assert train.info.name == "fashion-mnist" and train.info.classes[0] == "T-shirt/top"
    assert train.info.mean == (0.2860,) and train.info.std == (0.3530,) and train.info.image_size == 28
    test = build_source("fashion-mnist", split="test")
    assert len(test) == 10000 and test.labels.bincount().tolist() == [1000] * 10


@pytest.mark.parametrize("compress", [True, False])
def test_idx_from_root(tmp_path, compress):
    images = write_tiny_idx(tmp_path, "t10k", compress=compress)
    source = IdxSource("mnist", split="test", root=tmp_path)
    assert len(source) == 5 and source.info.mean == (0.1307,)
    image, label = source[3]
    assert torch.equal(image, torch.from_numpy(images[3])[None]) and label == 3
    assert source.info.image_size == 4 and source.info.classes == [str(d) for d in range(10)]


def test_a_runs_train_source_reads_a_named_dataset_from_root(tmp_path):
    """`data.root` reaches the lookup through a run's `train_source` (no file list: its rows never change)."""
    write_tiny_idx(tmp_path / "mine", "train", n=6)
    source, note = train_source("mnist", tmp_path / "run" / "files.txt", root=tmp_path / "mine")
    assert len(source) == 6 and note == ""


def test_idx_from_env_subfolder_and_three_channels(tmp_path, monkeypatch):
    write_tiny_idx(tmp_path / "mnist", "train")
    monkeypatch.setenv("MIMKIT_DATA", str(tmp_path))
    source = build_source("mnist", channels=3)
    image, _ = source[1]
    assert image.shape == (3, 4, 4) and torch.equal(image[0], image[2])
    assert source.info.channels == 3 and source.info.std == (0.3081,) * 3
    assert source.info.mean == (0.1307,) * 3  # one mean per channel


def test_idx_from_env_folder(tmp_path, monkeypatch):
    write_tiny_idx(tmp_path, "train", n=7)
    monkeypatch.setenv("MIMKIT_DATA", str(tmp_path))
    assert len(build_source("mnist")) == 7


def test_idx_not_found_names_places_and_fixes(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "DEBIAN_DATASETS", tmp_path / "nowhere")
    with pytest.raises(MimkitError) as e:
        build_source("fashion-mnist", root=tmp_path / "mine")
    message = str(e.value)
    assert "\n" not in message
    for part in ["mine", "nowhere/fashion-mnist", "cache/mimkit/FashionMNIST/raw",
                 "apt-get install dataset-fashion-mnist", "MIMKIT_DATA", "Name or service not known"]:
        assert part in message
    with pytest.raises(MimkitError, match="MIMKIT_DATA") as e:
        build_source("mnist")
    assert "apt-get" not in str(e.value)  # no Debian package for MNIST


def test_idx_found_nowhere_is_downloaded_and_a_download_without_the_split_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "DEBIAN_DATASETS", tmp_path / "nowhere")
    write_tiny_idx(tmp_path / "fetched", "train", n=3)
    asked = []
    monkeypatch.setattr(idx, "_download_idx", lambda name: asked.append(name) or tmp_path / "fetched")
    assert len(IdxSource("mnist", "train")) == 3 and asked == ["mnist"]
    with pytest.raises(MimkitError, match=r"the mnist download in '.*fetched' lacks the test IDX files"):
        IdxSource("mnist", "test")
    write_tiny_idx(idx.mimkit_cache_dir() / "MNIST" / "raw", "t10k", n=2)  # an earlier download: no new one
    assert len(IdxSource("mnist", "test")) == 2 and asked == ["mnist", "mnist"]


def test_the_download_is_torchvisions_into_mimkits_cache(monkeypatch):
    made = []

    class Downloaded:
        def __init__(self, root, download=False):
            made.append((root, download))
            self.raw_folder = f"{root}/FashionMNIST/raw"

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Downloaded)
    assert DOWNLOAD_IDX("fashion-mnist") == idx.mimkit_cache_dir() / "FashionMNIST" / "raw"
    assert made == [(str(idx.mimkit_cache_dir()), True)]


def test_idx_unknown_name_and_files_that_do_not_pair_up(tmp_path):
    with pytest.raises(MimkitError, match="unknown IDX dataset 'kmnist'; use one of fashion-mnist, mnist"):
        IdxSource("kmnist")
    write_tiny_idx(tmp_path, "train", n=5)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(MimkitError, match=r"\(5, 4, 4\) and .* \(4,\) do not pair up"):
        IdxSource("mnist", root=tmp_path)


def test_idx_names_its_classes_and_passes_over_a_folder_missing_one_of_the_pair(tmp_path, monkeypatch):
    """Fashion-MNIST's ten class names in label order; a folder holding the images without their labels is
    skipped for the next place (here $MIMKIT_DATA), not paired with nothing."""
    write_tiny_idx(tmp_path / "env", "train", n=6)
    write_tiny_idx(tmp_path / "root", "train", n=3)
    (tmp_path / "root" / "train-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("MIMKIT_DATA", str(tmp_path / "env"))
    source = IdxSource("fashion-mnist", root=tmp_path / "root")
    assert len(source) == 6
    assert source.info.classes == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                   "Sneaker", "Bag", "Ankle boot"]
    assert IdxSource("mnist", root=tmp_path / "env").info.classes == [str(d) for d in range(10)]
    with pytest.raises(MimkitError, match="split"):
        IdxSource("mnist", split="dev", root=tmp_path / "env")
    with pytest.raises(MimkitError, match="channels"):
        IdxSource("mnist", root=tmp_path / "env", channels=2)


def test_downloads_go_to_the_users_cache_folder_without_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert idx.mimkit_cache_dir() == tmp_path / ".cache" / "mimkit"


def test_idx_bad_file(tmp_path):
    (tmp_path / "x").write_bytes(b"not an idx file")
    with pytest.raises(MimkitError, match="not an IDX file"):
        read_idx(tmp_path / "x")
    write_idx(tmp_path / "y", np.zeros((2, 3), np.uint8), compress=False)
    (tmp_path / "y").write_bytes((tmp_path / "y").read_bytes()[:-1])
    with pytest.raises(MimkitError, match="header says"):
        read_idx(tmp_path / "y")
    # an IDX file of int32 (type 0x0C), floats (0x0D) or signed bytes (0x09): its values are no pixels
    for code in (0x09, 0x0C, 0x0D):
        (tmp_path / "z").write_bytes(bytes([0, 0, code, 1]) + (2).to_bytes(4, "big") + bytes(8))
        with pytest.raises(MimkitError, match="not an IDX file of unsigned bytes"):
            read_idx(tmp_path / "z")


# ---------------------------------------------------------------------------------------------------------
# Folders


def test_flat_folder_channels_follow_data(tmp_path):
    save(tmp_path / "gray" / "a.png", "L")
    save(tmp_path / "gray" / "b.PNG", "L")
    gray = build_source(str(tmp_path / "gray"))
    assert isinstance(gray, FlatFolderSource) and len(gray) == 2
    image, label = gray[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.uint8 and label == -1
    assert gray.info.mean == (0.5,) and gray.info.num_classes == 0 and gray.info.image_size == 8

    save(tmp_path / "rgb" / "a.jpg", "RGB")
    rgb = build_source(str(tmp_path / "rgb"))
    assert rgb[0][0].shape == (3, 8, 8) and rgb.info.mean == (0.485, 0.456, 0.406)
    assert build_source(str(tmp_path / "rgb"), channels=1)[0][0].shape == (1, 8, 8)
    assert build_source(str(tmp_path / "gray"), channels=3)[0][0].shape == (3, 8, 8)


def test_flat_folder_recursive_sorted_filtered(tmp_path):
    for rel in ["b/z.png", "a/deep/y.jpeg", "x.webp", "c.bmp", "d.TIFF"]:
        save(tmp_path / rel, "RGB")
    (tmp_path / "notes.txt").write_text("not an image")
    save(tmp_path / ".hidden" / "h.png", "RGB")
    source = FlatFolderSource(tmp_path)
    names = [Path(p).relative_to(tmp_path).as_posix() for p in source.paths]
    assert names == ["a/deep/y.jpeg", "b/z.png", "c.bmp", "d.TIFF", "x.webp"]
    assert source.labels == [-1] * 5
    found = build_source(str(tmp_path))  # images at the top level: unlabeled, whatever sub-folders it has
    assert isinstance(found, FlatFolderSource) and found.paths == source.paths


@pytest.mark.parametrize("name, image", [("cat/a.JPG", True), ("a.webp", True), ("cat/.thumbs/a.jpg", False),
                                         (".a.jpg", False), ("cat/a.txt", False)])
def test_a_member_name_is_an_image_by_its_extension_in_any_case_outside_hidden_folders(name, image):
    assert is_image_name(name) == image


def test_upper_case_images_at_the_top_make_a_flat_folder_of_its_sub_folders_too(tmp_path):
    save(tmp_path / "A.PNG", "L")
    save(tmp_path / "sub" / "b.png", "L")
    source = build_source(str(tmp_path))
    assert isinstance(source, FlatFolderSource) and len(source) == 2 and source.labels == [-1, -1]


def test_symlink_loops_are_listed_once_and_named(tmp_path):
    for i in range(3):
        save(tmp_path / "data" / f"{i}.png", "RGB")
    save(tmp_path / "data" / "sub" / "s.png", "RGB")
    (tmp_path / "data" / "sub" / "up").symlink_to("..")  # a loop: data/sub/up/sub/up/...
    (tmp_path / "elsewhere").mkdir()
    save(tmp_path / "elsewhere" / "e.png", "RGB")
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "elsewhere")  # followed: a folder not listed yet
    with pytest.warns(UserWarning, match="skipped 1 symlinked folder.*data/sub/up"):
        source = FlatFolderSource(tmp_path / "data")
    names = [Path(p).relative_to(tmp_path / "data").as_posix() for p in source.paths]
    assert names == ["0.png", "1.png", "2.png", "linked/e.png", "sub/s.png"]
    with pytest.warns(UserWarning, match="data/sub/up"):
        assert sources.count_images(str(tmp_path / "data"), stop_after=100) == 5


def test_channels_follow_files_sampled_across_the_whole_folder(tmp_path):
    """32 files spread over the folder are sampled, the last one among them: a colour file at the end of
    40 grey ones makes the folder RGB, and the note says how many of the sampled files were in colour."""
    for i in range(40):
        save(tmp_path / f"{i:02d}.png", "RGB" if i == 39 else "L")
    source = build_source(str(tmp_path))
    assert source.info.channels == 3
    assert source.info.channels_note == "RGB: 1 of 32 sampled files are in colour"
    (tmp_path / "39.png").unlink()
    assert build_source(str(tmp_path)).info.channels_note == "L: all 32 sampled files are grey"


def test_a_folder_with_no_readable_image_is_one_line(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning), pytest.raises(MimkitError, match="none of the sampled images under"):
        build_source(str(tmp_path), skip_bad_images=True)
    for i in range(3):
        save(tmp_path / f"{i}.png", "L")
    source = build_source(str(tmp_path), skip_bad_images=True)
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning), pytest.raises(MimkitError, match="no readable image among the 3 under"):
        source[1]


def test_class_folders_outside_the_given_classes_are_refused(tmp_path):
    save(tmp_path / "cat" / "1.png", "L")
    save(tmp_path / "eel" / "1.png", "L")
    with pytest.raises(MimkitError, match=r"class folders \['eel'\] under .* are not among the classes"):
        ImageFolderSource(tmp_path, classes=["cat", "dog"])
    assert ImageFolderSource(str(tmp_path), classes=["cat", "dog", "eel"]).labels == [0, 2]  # a str root too


def test_mixed_sizes_have_no_image_size(tmp_path):
    save(tmp_path / "a.png", "RGB", size=(8, 8))
    save(tmp_path / "b.png", "RGB", size=(12, 8))
    source = build_source(str(tmp_path))
    assert source.info.image_size is None and source[1][0].shape == (3, 8, 12)


@pytest.mark.parametrize("name, dtype", [("a.png", "<u2"), ("a.tif", ">u2")], ids=["I;16", "I;16B"])
def test_sixteen_bit_gray_is_rescaled(tmp_path, name, dtype):
    """Either byte order (PNG's I;16, a big-endian TIFF's I;16B) keeps its top 8 bits, not clipped to 255."""
    Image.fromarray(np.full((4, 4), 40000, dtype)).save(tmp_path / name)
    image, _ = build_source(str(tmp_path))[0]
    assert image.shape == (1, 4, 4) and int(image[0, 0, 0]) == 40000 >> 8


def test_image_folder_classes(tmp_path):
    save(tmp_path / "dog" / "1.png", "RGB")
    save(tmp_path / "cat" / "nested" / "1.jpg", "RGB")
    save(tmp_path / "cat" / "2.jpg", "RGB")
    source = build_source(str(tmp_path))
    assert isinstance(source, ImageFolderSource)
    assert source.info.classes == ["cat", "dog"] and source.info.num_classes == 2
    assert source.labels == [0, 0, 1] and [source[i][1] for i in range(3)] == [0, 0, 1]


@pytest.mark.parametrize("sizes, side", [([(8, 8)], 8), ([(12, 8)], None), ([(8, 12)], None),
                                         ([(8, 8), (12, 12)], None)])
def test_a_folder_has_a_native_side_only_when_its_images_share_one_square_size(tmp_path, sizes, side):
    for i in range(4):
        save(tmp_path / f"{i}.png", "RGB", size=sizes[i % len(sizes)])
    assert build_source(str(tmp_path)).info.image_size == side


def test_with_val_and_test_each_split_reads_its_own_folder(tmp_path):
    for split in ("train", "val", "test"):
        save(tmp_path / split / "a" / f"{split}.png", "L")
    for split in ("val", "test"):
        assert [Path(p).name for p in build_source(str(tmp_path), split=split).paths] == [f"{split}.png"]


def test_split_subfolders(tmp_path):
    save(tmp_path / "train" / "a" / "1.png", "L")
    save(tmp_path / "train" / "b" / "1.png", "L")
    save(tmp_path / "val" / "b" / "1.png", "RGB")  # val lacks class a and is RGB: train decides both
    train = build_source(str(tmp_path))
    val = build_source(str(tmp_path), split="val")
    assert train.info.name == val.info.name == tmp_path.name
    image, label = val[0]
    assert val.info.classes == ["a", "b"] and label == 1 and image.shape == (1, 8, 8)
    assert build_source(str(tmp_path), split="test").paths == val.paths  # test falls back to val


def test_folder_errors(tmp_path):
    with pytest.raises(MimkitError, match="data path 'nope' does not exist"):
        build_source("nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MimkitError, match="no images"):
        build_source(str(tmp_path / "empty"))
    save(tmp_path / "flat" / "a.png", "L")
    with pytest.raises(MimkitError, match="no val split.*split_train_val"):
        build_source(str(tmp_path / "flat"), split="val")
    with pytest.raises(MimkitError, match="^split 'dev' is not one of train, val, test$"):
        build_source(str(tmp_path / "flat"), split="dev")
    for spec in (str(tmp_path / "flat"), "mnist", "nope"):  # refused before any file is looked for
        with pytest.raises(MimkitError, match=r"^channels=2 is not supported; use 1, 3 or leave it unset$"):
            build_source(spec, channels=2)
    with pytest.raises(MimkitError, match="channels=2"):  # a library user's source too
        FlatFolderSource(tmp_path / "flat", channels=2)


def test_count_images_counts_the_train_split_and_stops_past_the_limit(tmp_path):
    """The size hint's count: only a dataset's train/ (or a segmentation folder's train split), and it stops
    at the first folder that takes it past `stop_after`."""
    for folder in "abc":
        save(tmp_path / "flat" / folder / f"{folder}.png", "L")
    assert sources.count_images(str(tmp_path / "flat"), stop_after=10) == 3
    assert sources.count_images(str(tmp_path / "flat"), stop_after=1) == 2  # a: 1, b: 2 > 1, c never read
    save(tmp_path / "split" / "train" / "a" / "1.png", "L")
    for i in range(3):
        save(tmp_path / "split" / "val" / "a" / f"{i}.png", "L")
    assert sources.count_images(str(tmp_path / "split"), stop_after=10) == 1
    for split, n in (("train", 2), ("val", 3)):
        for i in range(n):
            save(tmp_path / "seg" / "images" / split / f"{i}.png", "L")
            save(tmp_path / "seg" / "masks" / split / f"{i}.png", "L")
    assert sources.count_images(str(tmp_path / "seg"), stop_after=10) == 2


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_a_segmentation_folder_gives_its_splits_images_without_masks(tmp_path, split):
    """A test split of a folder that has train and val splits only is its val split."""
    for part, n in (("train", 2), ("val", 3)):
        for i in range(n):
            save(tmp_path / "seg" / "images" / part / f"{part}{i}.png", "RGB")
            save(tmp_path / "seg" / "masks" / part / f"{part}{i}.png", "L")
    source = build_source(str(tmp_path / "seg"), split=split, channels=1)
    part = "train" if split == "train" else "val"
    assert [Path(p).name for p in source.paths] == [f"{part}{i}.png" for i in range((2, 3)[part == "val"])]
    assert all(f"images/{part}/" in p for p in source.paths) and source.labels == [-1] * len(source)
    assert source.info.name == "seg" and source[0][0].shape == (1, 8, 8)
    assert source.info.layout_note.startswith(f"a generic segmentation folder: its {split} split")


def test_a_held_out_split_decodes_as_the_train_split_was_asked_to(tmp_path):
    """skip_bad_images, max_bad_images, max_image_pixels and decode_min_side reach val/ as train/."""
    for split in ("train", "val"):
        for i in range(3):
            save(tmp_path / split / "a" / f"{i}.png", "L", size=(40, 40), color=10 * i)
    (tmp_path / "val" / "a" / "1.png").write_bytes(b"truncated")
    with pytest.raises(MimkitError, match=r"1\.png"):
        build_source(str(tmp_path), split="val")
    with pytest.warns(UserWarning, match=r"1\.png"):
        val = build_source(str(tmp_path), split="val", skip_bad_images=True, max_bad_images=1,
                           decode_min_side=10)
    assert val.skip_bad_images and val.max_bad_images == 1 and val.decode_min_side == 10
    assert int(val[1][0][0, 0, 0]) == 20 and val[0][0].shape == (1, 10, 10)  # reduced 4x: a side of 10
    with pytest.raises(MimkitError, match="cannot read image"):
        build_source(str(tmp_path), split="val", max_image_pixels=1000)[0]


def test_folder_layout_errors(tmp_path):
    save(tmp_path / "file.png", "L")
    with pytest.raises(MimkitError, match="data path '.*file.png' is not a folder"):
        build_source(str(tmp_path / "file.png"))
    save(tmp_path / "only_train" / "train" / "a" / "1.png", "L")
    assert len(build_source(str(tmp_path / "only_train"))) == 1
    with pytest.raises(MimkitError, match="has train/ but no val/ or test/ sub-folder for 'val'"):
        build_source(str(tmp_path / "only_train"), split="val")
    save(tmp_path / "mixed" / "train" / "a" / "1.png", "L")
    save(tmp_path / "mixed" / "val" / "1.png", "L")
    with pytest.raises(MimkitError, match="mixed/val' is unlabeled but '.*mixed/train' is not"):
        build_source(str(tmp_path / "mixed"), split="val")
    with pytest.raises(MimkitError, match="no .tar shards"):
        build_source(f"shards:{tmp_path / 'mixed'}")


def corrupt_folder(tmp_path: Path, bad: list[int], n: int = 6) -> Path:
    for i in range(n):
        save(tmp_path / f"{i}.png", "L", color=10 * i)
    for i in bad:
        (tmp_path / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return tmp_path


def test_corrupt_image_names_the_file(tmp_path):
    source = build_source(str(corrupt_folder(tmp_path, bad=[])))
    (tmp_path / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(MimkitError, match=r"cannot read image '.*2\.png'"):
        source[2]


def test_corrupt_first_image_fails_at_construction(tmp_path):
    with pytest.raises(MimkitError, match=r"0\.png"):
        build_source(str(corrupt_folder(tmp_path, bad=[0])))


def test_skip_bad_images_warns_counts_and_substitutes(tmp_path):
    folder = corrupt_folder(tmp_path, bad=[2, 3])
    with pytest.warns(UserWarning) as record:
        source = build_source(str(folder), skip_bad_images=True, max_bad_images=2)
    assert [Path(str(w.message).split("'")[1]).name for w in record] == ["2.png", "3.png"]
    assert source.num_bad_images == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad files are not read or warned about again
        image, _ = source[2]
    assert int(image[0, 0, 0]) == 40  # the next good file, 4.png
    assert torch.equal(source[3][0], image)


def test_skip_bad_images_gives_up_past_the_cap(tmp_path):
    folder = corrupt_folder(tmp_path, bad=[1, 2, 3])
    with pytest.warns(UserWarning), pytest.raises(MimkitError, match="more than max_bad_images=2") as refused:
        build_source(str(folder), skip_bad_images=True, max_bad_images=2)
    assert str(refused.value).endswith(
        "3.png'); remove or fix them, or raise max_bad_images")  # the third, past the cap, and what to do


def test_skip_bad_images_found_while_reading(tmp_path):
    folder = corrupt_folder(tmp_path, bad=[])
    source = build_source(str(folder), skip_bad_images=True)
    (folder / "1.png").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match=r"1\.png"):
        assert int(source[1][0][0, 0, 0]) == 20
    assert source.num_bad_images == 1
    assert torch.equal(source[-6][0], source[0][0])  # Python's negative indices, down to -len
    with pytest.raises(IndexError):
        source[6]
    with pytest.raises(IndexError):
        source[-7]


@pytest.mark.parametrize("make", [
    lambda root: FlatFolderSource(root),
    lambda root: ImageFolderSource(root.parent),
    lambda root: ListedFolderSource(root, "x", [(-1, f"{i}.png") for i in range(6)], []),
])
def test_a_bad_image_stops_a_folder_source_unless_asked_to_skip_it(tmp_path, make):
    """Skipping is asked for (`--skip-bad-images`), never the default: `mimkit predict` reads its images
    through a `ListedFolderSource` with the defaults."""
    with pytest.raises(MimkitError, match=r"cannot read image '.*2\.png'"):
        make(corrupt_folder(tmp_path / "a", bad=[2]))


def test_a_bad_files_stand_in_brings_its_own_label_and_the_last_ones_is_the_first_image(tmp_path):
    for name in ("a", "b"):
        corrupt_folder(tmp_path / name, bad=[2], n=3)  # pixel values 0, 10 and a bad file
    with pytest.warns(UserWarning):
        source = build_source(str(tmp_path), skip_bad_images=True)
    items = [(int(source[i][0][0, 0, 0]), source[i][1]) for i in range(len(source))]
    assert items == [(0, 0), (10, 0), (0, 1), (0, 1), (10, 1), (0, 0)]


def test_hidden_folders_are_no_classes(tmp_path):
    save(tmp_path / "cat" / "a.png", "L")
    save(tmp_path / ".thumbnails" / "a.png", "L")
    source = build_source(str(tmp_path))
    assert source.info.classes == ["cat"] and len(source) == 1


# ---------------------------------------------------------------------------------------------------------
# Synthetic and splits


def test_synthetic_deterministic_and_class_structured():
    a, b = SyntheticSource(n=40, seed=3), SyntheticSource(n=40, seed=3)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(40))
    assert not torch.equal(a[0][0], SyntheticSource(n=40, seed=4)[0][0])
    image, label = a[13]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label == 3
    # a nearest-class-mean classifier on mean brightness separates unseen images
    train, test = SyntheticSource(n=200, seed=0), SyntheticSource(n=100, seed=1)
    brightness = lambda source: torch.stack([source[i][0].float().mean() for i in range(len(source))])
    means = torch.stack([brightness(train)[torch.tensor(train.labels) == k].mean() for k in range(10)])
    predicted = (brightness(test)[:, None] - means).abs().argmin(1)
    assert (predicted == torch.tensor(test.labels)).float().mean() > 0.9


@pytest.mark.parametrize("num_classes", [1, 10])
def test_synthetic_seeds_share_no_image(num_classes):
    """Two seeds (the train split's 0 and the held-out ones' 1) give different images, none of one found at
    any position of the other, even of one class: seeds that only shifted the images would score a model
    on what it trained on."""
    train, held_out = (SyntheticSource(12, num_classes=num_classes, seed=seed) for seed in (0, 1))
    seen = {train[i][0].numpy().tobytes() for i in range(len(train))}
    assert not any(held_out[i][0].numpy().tobytes() in seen for i in range(len(held_out)))


def test_build_synthetic_specs():
    train, val = build_source("synthetic:12", channels=1), build_source("synthetic:12", split="val")
    assert len(train) == 12 and train[0][0].shape == (1, 32, 32) and val.info.channels == 3
    assert not torch.equal(train[0][0], val[0][0][:1])
    for split, seed in (("train", 0), ("val", 1), ("test", 1)):  # the documented seeds
        assert torch.equal(build_source("synthetic:3", split)[2][0], SyntheticSource(3, seed=seed)[2][0])
    assert len(build_source("synthetic")) == 256 and len(build_source("synthetic:1")) == 1
    for spec in ("synthetic:x", "synthetic:0", "synthetic:-3"):
        with pytest.raises(MimkitError, match="positive integer"):
            build_source(spec)


def test_synthetic_refuses_indices_outside_it_and_its_channels_differ_in_contrast():
    source = SyntheticSource(n=20, channels=3)
    for index in (-1, 20):
        with pytest.raises(IndexError, match=f"index {index} out of range for 20 images"):
            source[index]
    # each channel's grating has its own contrast: the channels' spreads differ (one shared contrast: < 1.05)
    spread = torch.stack([source[i][0].float().flatten(1).std(1) for i in range(20)])  # [20, 3]
    assert (spread.max(1).values / spread.min(1).values).mean() > 1.15


def test_split_train_val_stratified():
    source = SyntheticSource(n=100, num_classes=4)
    train, val = split_train_val(source, 0.2, seed=1)
    assert len(train) == 80 and len(val) == 20 and not set(train.indices) & set(val.indices)
    assert torch.tensor(val.labels).bincount().tolist() == [5, 5, 5, 5]
    assert val.info is source.info and val[0][1] == val.labels[0]
    assert split_train_val(source, 0.2, seed=1)[1].indices == val.indices
    assert split_train_val(source, 0.2, seed=2)[1].indices != val.indices
    with pytest.raises(MimkitError, match=r"val_fraction=1.0 must be between 0 and 1 \(exclusive\)"):
        split_train_val(source, 1.0)


def test_a_hold_out_without_a_seed_takes_seed_0():
    """`split_train_val`'s documented default: seed 0's stratified shuffle, the first 20% of each class."""
    source = SyntheticSource(n=100, num_classes=4)
    val = split_train_val(source, 0.2)[1]
    by_class = shuffled_by_class(torch.tensor(source.labels), 0)
    assert val.indices == sorted(i for members in by_class.values() for i in members[:5].tolist())
    assert val.indices == split_train_val(source, 0.2, seed=0)[1].indices
    assert val.indices != split_train_val(source, 0.2, seed=1)[1].indices


@pytest.mark.parametrize("fraction, empty", [(0.01, "val"), (0.99, "train")])
def test_a_hold_out_that_leaves_a_part_empty_names_it(fraction, empty):
    """4 images a class: 1% rounds to none held out, 99% to all of them."""
    with pytest.raises(MimkitError, match=f"of 8 images leaves an empty {empty} part"):
        split_train_val(SyntheticSource(n=8, num_classes=2), fraction)


def test_both_parts_keep_the_sources_order():
    """Each part lists its images in the source's order, not class by class: what reads the held-out part
    in order (an evaluation's first images, a feature cache) sees the same images whatever the classes."""
    train, val = split_train_val(SyntheticSource(n=100, num_classes=4), 0.2, seed=1)
    assert train.indices == sorted(train.indices) and val.indices == sorted(val.indices)


@pytest.mark.parametrize("n, num_classes, fraction", [(100, 4, 0.2), (7, 3, 0.5), (10, 1, 0.3), (9, 2, 0.7)])
def test_each_part_of_a_hold_out_is_its_own_images_with_their_labels(n, num_classes, fraction):
    """The two parts share no image and together are the whole source; each part's ``labels`` are its own
    images' labels, position by position (not the source's, nor another part's), as its items say."""
    source = SyntheticSource(n=n, num_classes=num_classes, image_size=4)
    parts = split_train_val(source, fraction, seed=3)
    assert sorted(parts[0].indices + parts[1].indices) == list(range(n))
    for part in parts:
        assert part.labels == [source.labels[i] for i in part.indices] == [label for _, label in part]
        assert torch.equal(part[len(part) - 1][0], source[part.indices[-1]][0])


def test_split_train_val_unlabeled(tmp_path):
    for i in range(10):
        save(tmp_path / f"{i}.png", "L")
    train, val = split_train_val(build_source(str(tmp_path)), 0.3)
    assert len(val) == 3 and val.labels == [-1] * 3 and len(train) == 7


def test_idx_files_come_from_root_first_and_val_reads_the_test_files(tmp_path, monkeypatch):
    for folder, train, test in (("root", 5, 3), ("env", 7, 2)):
        write_tiny_idx(tmp_path / folder, "train", train)
        write_tiny_idx(tmp_path / folder, "t10k", test)
    monkeypatch.setenv("MIMKIT_DATA", str(tmp_path / "env"))
    lengths = {split: len(IdxSource("fashion-mnist", split, root=tmp_path / "root"))
               for split in ("train", "val", "test")}
    assert lengths == {"train": 5, "val": 3, "test": 3}


# ---------------------------------------------------------------------------------------------------------
# Decoding (s8b: the narrow cases: a non-square image, a grey one with alpha)


@pytest.mark.parametrize("size, reduced", [((40, 20), (10, 20)), ((20, 40), (20, 10)), ((30, 30), (10, 10))])
def test_a_reduced_decode_keeps_the_shorter_side_at_least_min_side(tmp_path, size, reduced):
    """The reduction follows the shorter side: 40x20 at min_side 10 halves, to 20x10, not to a quarter."""
    save(tmp_path / "a.png", "L", size=size)
    assert tuple(decode_image(tmp_path / "a.png", "L", min_side=10).shape[1:]) == reduced


@pytest.mark.parametrize("size", [(64, 16), (16, 64)])
def test_a_large_jpeg_is_decoded_at_its_reduced_dct_scale_whichever_side_is_longer(tmp_path, size):
    """A wide or tall JPEG at min_side 8 is decoded by the JPEG decoder at half scale (``draft``), the fast
    path, not decoded whole and reduced after (other pixels): the size asked of the decoder is the image's
    own halved, each side its own."""
    noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "a.jpg", quality=90)
    with Image.open(tmp_path / "a.jpg") as img:
        img.draft("L", (size[0] // 2, size[1] // 2))
        at_half_scale = torch.from_numpy(np.array(img))
    assert torch.equal(decode_image(tmp_path / "a.jpg", "L", min_side=8)[0], at_half_scale)


@pytest.mark.parametrize("size", [(10, 40), (40, 10)])
def test_the_pixel_limit_counts_width_times_height(tmp_path, size):
    save(tmp_path / "a.png", "L", size=size)
    assert decode_image(tmp_path / "a.png", "L", max_pixels=400).shape[1:] == size[::-1]
    with pytest.raises(ValueError, match=r"\d+x\d+ pixels is above data.max_image_pixels=399"):
        decode_image(tmp_path / "a.png", "L", max_pixels=399)


def test_grey_images_with_alpha_are_grey(tmp_path):
    save(tmp_path / "a.png", "LA", color=(90, 255))
    source = build_source(str(tmp_path))
    assert source.info.channels == 1 and source[0][0].shape == (1, 8, 8) and int(source[0][0][0, 0, 0]) == 90


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_folders_normalization_is_imagenets_for_colour_and_the_grey_one_for_grey(tmp_path, mode):
    """Mean and std each come from their own table: ImageNet's for colour images, the grey pair for grey."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new(mode, (8, 8), 90).save(tmp_path / name / "x.png")
    info = build_source(str(tmp_path)).info
    mean, std = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if mode == "RGB" else (GRAY_MEAN, GRAY_STD)
    assert (tuple(info.mean), tuple(info.std)) == (tuple(mean), tuple(std))
