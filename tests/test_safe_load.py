"""Checkpoints are read without running anything in them."""

import argparse
import json
import os
import pickle
import re

import pytest
import torch
from safetensors.torch import save_file

from mimkit.cli import main
from mimkit.errors import MimkitError
from mimkit.safe_load import (
    load_checkpoint,
    load_pickle,
    load_sharded,
    load_tensors,
    read_json,
)


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
    assert list(load_tensors(str(path))) == ["w"]  # a path given as text


def test_files_that_are_not_checkpoints(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(MimkitError, match="is not a safetensors file nor a PyTorch checkpoint"):
        load_tensors(tmp_path / "notes.txt")
    (tmp_path / "w.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(MimkitError, match="not a valid safetensors file"):
        load_tensors(tmp_path / "w.safetensors")
    for nothing in ({"epoch": 3}, {}, {"model": {}}):  # an empty dict holds no weights
        torch.save(nothing, tmp_path / "empty.pth")
        with pytest.raises(MimkitError, match="holds no state dict"):
            load_tensors(tmp_path / "empty.pth")
    with pytest.raises(MimkitError, match="does not exist"):
        load_tensors(tmp_path / "missing.pth")




@pytest.mark.parametrize("key", ["model", "state_dict", "module"])  # the reference codes' keys
def test_a_training_checkpoints_weights_are_found_under_each_usual_key(tmp_path, key):
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, key: {"w": torch.ones(2)}}, path)
    assert list(load_tensors(path)) == ["w"]


def test_the_weights_are_the_first_entry_of_tensors_and_their_arguments_come_beside_them(tmp_path):
    """An entry under a usual key that holds no tensors (an optimizer's step counts) is passed over; the
    arguments the reference code saved are read back as a dict; a file without them gives an empty one."""
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {"step": 3}, "state_dict": {"w": torch.ones(2)}, "module": {"v": torch.ones(1)},
                "args": argparse.Namespace(lr=1.0, model="vit")}, path)
    state, args = load_checkpoint(path)
    assert list(state) == ["w"] and args == {"lr": 1.0, "model": "vit"}
    torch.save({"w": torch.ones(2)}, path)
    assert load_checkpoint(path)[1] == {}


def test_the_ddp_prefix_is_removed_only_when_every_key_has_it(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"module.w": torch.ones(2), "module.b": torch.ones(1)}, path)
    assert list(load_tensors(path)) == ["w", "b"]
    torch.save({"module.w": torch.ones(2), "head.b": torch.ones(1)}, path)
    assert list(load_tensors(path)) == ["module.w", "head.b"]


def test_a_model_folders_first_named_file_is_read_or_every_shard_its_index_names(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    assert torch.equal(load_sharded(tmp_path, WEIGHTS)["w"], torch.ones(2))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"a": torch.ones(1)}, sharded / "one.safetensors")
    save_file({"b": torch.zeros(1)}, sharded / "two.safetensors")
    index = {"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert sorted(load_sharded(str(sharded), WEIGHTS)) == ["a", "b"]  # a folder given as text


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


def test_a_checkpoint_saved_on_a_gpu_loads_on_a_machine_without_one(tmp_path, monkeypatch):
    """Every storage of a pickle is put on the CPU, whatever device saved it: here a file whose storages are
    tagged ``cuda:0`` (as a GPU run writes them), which torch alone refuses where CUDA is absent."""
    tag = torch.serialization.location_tag
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save({"model": {"w": torch.arange(3.0)}}, tmp_path / "gpu.pt")
    monkeypatch.setattr(torch.serialization, "location_tag", tag)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.pt", weights_only=True)
    loaded = load_pickle(tmp_path / "gpu.pt")["model"]["w"]
    assert loaded.device.type == "cpu" and torch.equal(loaded, torch.arange(3.0))


def test_each_refusal_reads_as_its_whole_message(tmp_path):
    """The words of each one-line error, whole: what was refused and why (a word dropped or turned, "not",
    "or", changes what the user is told)."""
    def refused(read, path) -> str:
        with pytest.raises(MimkitError) as err:
            read(path)
        return str(err.value)

    evil = tmp_path / "evil.pth"
    torch.save({"x": Payload(tmp_path / "pwned")}, evil)
    assert refused(load_tensors, evil) == (f"refusing '{evil}': loading it would run posix.system; only "
                                           "tensors and plain containers are read (nothing was executed)")
    damaged = tmp_path / "state.pt"
    damaged.write_bytes(b"PK\x03\x04 damaged")
    assert re.fullmatch(rf"'{re.escape(str(damaged))}' is not a safetensors file nor a PyTorch checkpoint "
                        r"\(\w+\)", refused(load_pickle, damaged))
    missing = tmp_path / "missing.pth"
    assert refused(load_tensors, missing) == f"checkpoint '{missing}' does not exist or is not a file"
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, empty)
    assert refused(load_tensors, empty) == (f"'{empty}' holds no state dict (a dict of tensors, or one under "
                                            "'model', 'state_dict', 'module')")
