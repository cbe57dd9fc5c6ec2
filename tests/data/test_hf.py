"""Hugging Face datasets on disk (`--data hf:PATH[:split]`): save_to_disk folders, Parquet, labels, errors."""

import builtins
import io

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data.decode import decode_image
from mimkit.data.filelist import train_source
from mimkit.data.sources import build_source
from mimkit.errors import MimkitError

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path):
    """Parquet conversions go to a temporary cache, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def pictures(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)) for i in range(n)]


def labeled(n: int, seed: int = 0, classes=("ant", "bee", "cow")) -> "datasets.Dataset":
    label = datasets.ClassLabel(names=list(classes))
    features = datasets.Features({"image": datasets.Image(), "label": label})
    labels = [i % len(classes) for i in range(n)]
    return datasets.Dataset.from_dict({"image": pictures(n, seed), "label": labels}, features=features)


def png(image: Image.Image) -> torch.Tensor:
    """What the dataset stores for a PIL image (PNG), decoded back."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return decode_image(io.BytesIO(buffer.getvalue()), "RGB")


def test_save_to_disk_dataset_reads_images_labels_and_classes(tmp_path):
    labeled(7).save_to_disk(str(tmp_path / "ds"))
    source = build_source(f"hf:{tmp_path / 'ds'}")
    assert len(source) == 7 and source.info.classes == ["ant", "bee", "cow"] and source.info.name == "ds"
    assert source.labels == [0, 1, 2, 0, 1, 2, 0] and source.info.channels == 3
    for i, image in enumerate(pictures(7)):
        got, label = source[i]
        assert torch.equal(got, png(image)) and label == i % 3


def test_dataset_dict_splits_and_a_named_split(tmp_path):
    datasets.DatasetDict({"train": labeled(6), "validation": labeled(3, seed=1),
                          "extra": labeled(4, seed=2)}).save_to_disk(str(tmp_path / "dd"))
    assert len(build_source(f"hf:{tmp_path / 'dd'}")) == 6
    val = build_source(f"hf:{tmp_path / 'dd'}", split="val")
    assert len(val) == 3 and torch.equal(val[0][0], png(pictures(3, seed=1)[0]))
    assert len(build_source(f"hf:{tmp_path / 'dd'}:extra")) == 4
    held_out = build_source(f"hf:{tmp_path / 'dd'}:extra", split="val")  # :extra names the train split
    assert len(held_out) == 3 and torch.equal(held_out[0][0], val[0][0])
    with pytest.raises(MimkitError, match="no nope split.*it has train, validation, extra"):
        build_source(f"hf:{tmp_path / 'dd'}:nope")


@pytest.mark.parametrize("held_out", [["validation"], ["val"], ["valid"], ["test"], ["validation", "test"],
                                      ["valid", "test"]])
def test_each_split_reads_its_own_rows_whatever_the_held_out_splits_are_named(tmp_path, held_out):
    """train reads train; val reads the dataset's validation/val/valid split, else its test split; test reads
    the test split, else the held-out one: each split's own images, never another's."""
    sizes = {"train": 5} | {name: 2 + k for k, name in enumerate(held_out)}  # each of its own size and seed
    splits = datasets.DatasetDict({name: labeled(n, seed=n) for name, n in sizes.items()})
    splits.save_to_disk(str(tmp_path / "dd"))
    served = {"train": "train", "val": held_out[0], "test": "test" if "test" in held_out else held_out[0]}
    for split, name in served.items():
        source, n = build_source(f"hf:{tmp_path / 'dd'}", split=split), sizes[name]
        assert len(source) == n and torch.equal(source[n - 1][0], png(pictures(n, seed=n)[n - 1])), split


@pytest.mark.parametrize("column", ["label", "labels", "cls", "class"])
def test_a_label_column_of_each_known_name_is_read(tmp_path, column):
    features = datasets.Features({"image": datasets.Image(), column: datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": pictures(3), column: [1, 0, 1]}, features=features).save_to_disk(
        str(tmp_path / "ds"))
    assert build_source(f"hf:{tmp_path / 'ds'}").labels == [1, 0, 1]


def test_a_colon_in_the_path_or_a_relative_path_is_not_taken_for_a_split(tmp_path, monkeypatch):
    labeled(4).save_to_disk(str(tmp_path / "a:b" / "ds"))
    assert len(build_source(f"hf:{tmp_path / 'a:b' / 'ds'}")) == 4  # "b/ds" is no split name
    monkeypatch.chdir(tmp_path / "a:b")
    assert len(build_source("hf:ds")) == 4 and len(build_source("hf:ds:train")) == 4


def test_a_dataset_whose_rows_do_not_change_gets_no_file_list(tmp_path):
    """A run lists folders and shards only: hf rows and named datasets are read as they are."""
    labeled(3).save_to_disk(str(tmp_path / "ds"))
    for spec in (f"hf:{tmp_path / 'ds'}", "synthetic:4"):
        source, note = train_source(spec, tmp_path / "run" / "files.txt")
        assert note == "" and not (tmp_path / "run" / "files.txt").exists() and len(source) in (3, 4)


def test_parquet_files_unlabeled_and_split_by_name(tmp_path):
    unlabeled = datasets.Dataset.from_dict({"img": pictures(5)}).cast_column("img", datasets.Image())
    (tmp_path / "pq").mkdir()
    unlabeled.to_parquet(str(tmp_path / "pq" / "train-00000-of-00001.parquet"))
    unlabeled.select(range(2)).to_parquet(str(tmp_path / "pq" / "validation-00000-of-00001.parquet"))
    train = build_source(f"hf:{tmp_path / 'pq'}")
    assert len(train) == 5 and train.labels == [-1] * 5 and train.info.num_classes == 0
    assert torch.equal(train[4][0], png(pictures(5)[4]))
    assert len(build_source(f"hf:{tmp_path / 'pq'}", split="val")) == 2
    assert len(build_source(f"hf:{tmp_path / 'pq' / 'train-00000-of-00001.parquet'}")) == 5


def test_parquet_files_named_by_no_split_are_all_train_and_a_folder_without_any_is_one_line(tmp_path):
    unlabeled = datasets.Dataset.from_dict({"img": pictures(5)}).cast_column("img", datasets.Image())
    (tmp_path / "pq" / "part").mkdir(parents=True)
    unlabeled.to_parquet(str(tmp_path / "pq" / "part" / "data-0.parquet"))
    unlabeled.select(range(2)).to_parquet(str(tmp_path / "pq" / "part" / "data-1.parquet"))
    assert len(build_source(f"hf:{tmp_path / 'pq'}")) == 7
    with pytest.raises(MimkitError, match="no validation/val/valid/test split"):
        build_source(f"hf:{tmp_path / 'pq'}", split="val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MimkitError, match="'.*empty' holds no .parquet files and is not a save_to_disk"):
        build_source(f"hf:{tmp_path / 'empty'}")


def test_plain_integer_labels_are_their_classes_and_an_image_cell_may_hold_a_path(tmp_path):
    """A label column of plain ints (no ClassLabel) names classes 0..max; a Parquet file written from images
    on disk keeps their paths instead of their bytes."""
    for i, image in enumerate(pictures(3)):
        image.save(tmp_path / f"{i}.png")
    rows = [{"bytes": None, "path": str(tmp_path / f"{i}.png")} for i in range(3)]
    features = datasets.Features({"image": datasets.Image(), "cls": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": rows, "cls": [0, 2, 1]}, features=features)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    source = build_source(f"hf:{tmp_path / 'train.parquet'}")
    assert source.info.classes == ["0", "1", "2"] and source.labels == [0, 2, 1]
    assert torch.equal(source[1][0], png(pictures(3)[1]))


def test_bad_row_is_named_and_skipped(tmp_path):
    rows = [{"bytes": png_bytes, "path": None} for png_bytes in
            [image_bytes(p) for p in pictures(4)]]
    rows[2] = {"bytes": b"\x89PNG\r\n\x1a\n garbage", "path": None}
    ds = datasets.Dataset.from_dict({"image": rows}, features=datasets.Features({"image": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(MimkitError, match=r"cannot read image '.*bad\[train\]#2'"):
        build_source(f"hf:{tmp_path / 'bad'}")
    with pytest.warns(UserWarning, match=r"bad\[train\]#2"):
        source = build_source(f"hf:{tmp_path / 'bad'}", skip_bad_images=True)
    assert torch.equal(source[2][0], source[3][0]) and source.num_bad_images == 1


def image_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(MimkitError, match="does not exist.*nothing is downloaded"):
        build_source(f"hf:{tmp_path / 'missing'}")
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "text"))
    with pytest.raises(MimkitError, match="no image column.*its columns: text"):
        build_source(f"hf:{tmp_path / 'text'}")
    with pytest.raises(MimkitError, match="no validation/val/valid/test split"):
        build_source(f"hf:{tmp_path / 'text'}", split="val")

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(
        ImportError(name)) if name == "datasets" else real_import(name, *a, **k))
    with pytest.raises(MimkitError, match=r"pip install 'mimkit\[hf\]'"):
        build_source(f"hf:{tmp_path / 'text'}")
