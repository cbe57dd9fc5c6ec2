"""Checkpoints are read without running anything in them."""

import argparse
import os
import pickle

import pytest
import torch

from mimkit.cli import main
from mimkit.errors import MimkitError
from mimkit.safe_load import load_pickle, load_sharded, load_tensors, read_json


class Payload:
    """Unpickling this writes a file: what a malicious checkpoint would do."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys, writer):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    checkpoint = {"model": {"cls_token": torch.zeros(1, 1, 8)}, "extra": Payload(marker)}
    if writer == "torch.save":
        torch.save(checkpoint, path)
    else:
        path.write_bytes(pickle.dumps(checkpoint, protocol=2))
    with pytest.raises(MimkitError, match="refusing .*evil.pth.*nothing was executed"):
        load_tensors(path)
    assert main(["import", str(path), "--format", "mae", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: refusing") and "\n" not in err
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_named_global_is_reported(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"x": Payload(tmp_path / "pwned")}, path)
    with pytest.raises(MimkitError, match=r"would run posix\.system"):
        load_tensors(path)


def test_training_checkpoints_with_arguments_load(tmp_path):
    """The reference code saves its argparse namespace beside the weights; DDP's module. prefix goes."""
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {"module.w": torch.ones(2)}, "args": argparse.Namespace(lr=1.0), "epoch": 3}, path)
    assert list(load_tensors(path)) == ["w"]


def test_files_that_are_not_checkpoints(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(MimkitError, match="is not a safetensors file nor a PyTorch checkpoint"):
        load_tensors(tmp_path / "notes.txt")
    (tmp_path / "w.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(MimkitError, match="not a valid safetensors file"):
        load_tensors(tmp_path / "w.safetensors")
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(MimkitError, match="holds no state dict"):
        load_tensors(tmp_path / "empty.pth")
    with pytest.raises(MimkitError, match="does not exist"):
        load_tensors(tmp_path / "missing.pth")



WEIGHTS = ("model.safetensors", "pytorch_model.bin")


@pytest.mark.parametrize("name, content, read, message", [
    ("config.json", '{"a": ', read_json, "cannot read '.*config.json': Expecting value"),
    ("config.json", None, read_json, "cannot read '.*config.json': .*No such file"),
    ("state.pt", "a folder", load_pickle, "cannot read '.*state.pt': Is a directory$"),
    ("state.pt", b"PK\x03\x04 damaged", load_pickle, r"nor a PyTorch checkpoint \(\w+\)$"),
    ("model.safetensors.index.json", '{"weights": {}}', lambda path: load_sharded(path.parent, WEIGHTS),
     "is not a shard index .*: KeyError$"),
    ("model.safetensors", None, lambda path: load_sharded(path.parent, WEIGHTS),
     "holds none of model.safetensors, pytorch_model.bin$"),
], ids=["malformed json", "missing json", "unreadable pickle", "damaged zip", "not a shard index",
        "no weights"])
def test_unreadable_files_are_one_line_errors(tmp_path, name, content, read, message):
    path = tmp_path / name
    if content == "a folder":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(MimkitError, match=message) as refused:
        read(path)
    assert "\n" not in str(refused.value)
