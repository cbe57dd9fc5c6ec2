"""Hugging Face datasets on disk, read row by row: a `save_to_disk` folder or Parquet files.

`--data hf:PATH[:split]`. The rows are memory-mapped Arrow, so any row is read in any process in
constant time and the seeded global order, DDP sharding and mid-epoch resume of `mimkit.data.loader`
work as for a folder. The image column is read as its encoded bytes and decoded like a folder's files
(`mimkit.data.decode.decode_image`), so bad images are reported and skipped the same way.

Nothing is downloaded. Parquet files are converted once into the `datasets` cache
(`$HF_DATASETS_CACHE`, by default `~/.cache/huggingface/datasets`). `datasets` is an optional
dependency: `pip install 'mimkit[hf]'`.
"""

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mimkit.errors import MimkitError

# mimkit's splits and the dataset split names that serve them, in order of preference
_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid", "test"),
                "test": ("test", "validation", "val", "valid")}
_IMAGE_COLUMNS = ("image", "img", "jpg", "png", "webp")
_LABEL_COLUMNS = ("label", "labels", "cls", "class")


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise MimkitError("--data hf:... needs the Hugging Face datasets package: "
                          "pip install 'mimkit[hf]'") from e
    return datasets


def _parquet_splits(path: Path) -> dict[str, list[str]]:
    """Parquet files by split: a file (or its folder) named `train*`, `validation*`, ... belongs to that
    split; when none is named so, every file is the train split."""
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise MimkitError(f"'{path}' holds no .parquet files and is not a save_to_disk folder")
    splits: dict[str, list[str]] = {}
    for f in files:
        relative = f.relative_to(path) if f != path else Path(f.name)
        names = {n for part in relative.parts for n in _SPLIT_NAMES["val"] + ("train",) if part.startswith(n)}
        split = max(names, key=len) if names else None  # "validation" over "val"
        splits.setdefault(split, []).append(str(f))
    if list(splits) == [None]:
        return {"train": splits[None]}
    return {k: v for k, v in splits.items() if k is not None}


def _open_splits(path: Path):
    """`{split name: datasets.Dataset}` of a save_to_disk folder or of Parquet files."""
    datasets = _datasets()
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(str(path))
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    return {split: datasets.Dataset.from_parquet(files) for split, files in _parquet_splits(path).items()}


def _column(dataset, candidates: Sequence[str], feature_type, what: str, path: Path,
            required: bool) -> str | None:
    columns = [name for name, feature in dataset.features.items() if isinstance(feature, feature_type)]
    columns += [name for name in candidates if name in dataset.column_names and name not in columns]
    if not columns and required:
        raise MimkitError(f"'{path}' has no {what} column (an Image feature or one named "
                          f"{', '.join(candidates)}); its columns: {', '.join(dataset.column_names)}")
    return columns[0] if columns else None


class HFReader:
    """`reader(i)` -> a binary file object holding row i's encoded image."""

    def __init__(self, dataset, column: str):
        datasets = _datasets()
        dataset = dataset.select_columns([column])
        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))  # {"bytes", "path"}
        self.dataset, self.column = dataset, column

    def __call__(self, index: int) -> io.BytesIO:
        cell = self.dataset[index][self.column]
        if isinstance(cell, dict):  # an Image feature: the bytes, or a path to them
            cell = cell["bytes"] if cell.get("bytes") is not None else Path(cell["path"]).read_bytes()
        return io.BytesIO(cell)


@dataclass
class HFImages:
    """The rows of one split, ready for a source.

    Attributes:
        root: the dataset's path.
        split: the dataset's split name that was read.
        names: one name per row for messages, `PATH[split]#row`.
        labels: one int per row, -1 when unlabeled.
        classes: class names (a ClassLabel's, or the label numbers), empty when unlabeled.
        reader: `reader(i)` -> row i's image bytes.
    """

    root: str
    split: str
    names: list[str]
    labels: list[int]
    classes: list[str]
    reader: HFReader


def open_hf_images(path: str | Path, split: str, dataset_split: str | None = None) -> HFImages:
    """Open one split of a Hugging Face dataset on disk.

    Args:
        path: a `save_to_disk` folder (a Dataset or a DatasetDict), a Parquet file, or a folder of them.
        split: mimkit's split: `"train"`, `"val"` or `"test"` (served by the dataset's `validation`,
            `val`, `valid` or `test` split).
        dataset_split: the dataset's split to read for mimkit's train split (`hf:PATH:split`).

    Returns:
        The split's rows; images come from the first Image column (else one named `image`, `img`, ...),
        labels from the first ClassLabel column (else one named `label`, `labels`, ...), if any.
    """
    datasets = _datasets()
    path = Path(path).expanduser()
    if not path.exists():
        raise MimkitError(f"hf data path '{path}' does not exist (hf:PATH[:split] reads a local "
                          "save_to_disk folder or Parquet files; nothing is downloaded)")
    splits = _open_splits(path)
    wanted = (dataset_split,) if dataset_split and split == "train" else _SPLIT_NAMES[split]
    name = next((s for s in wanted if s in splits), None)
    if name is None:
        raise MimkitError(f"'{path}' has no {'/'.join(wanted)} split (it has {', '.join(splits)}); name one "
                          "with hf:PATH:SPLIT, or hold out part of train with a validation fraction")
    dataset = splits[name]
    image_column = _column(dataset, _IMAGE_COLUMNS, datasets.Image, "image", path, required=True)
    label_column = _column(dataset, _LABEL_COLUMNS, datasets.ClassLabel, "label", path, required=False)
    if label_column is None:
        labels, classes = [-1] * len(dataset), []
    else:
        labels = [int(v) for v in dataset[label_column]]
        feature = dataset.features[label_column]
        classes = (list(feature.names) if isinstance(feature, datasets.ClassLabel)
                   else [str(k) for k in range(max(labels, default=-1) + 1)])
    return HFImages(root=str(path), split=name, names=[f"{path}[{name}]#{i}" for i in range(len(dataset))],
                    labels=labels, classes=classes, reader=HFReader(dataset, image_column))
