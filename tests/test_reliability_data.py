"""Reliability under faults in the data, in saved files and in what a user hands in: each test injects one
fault (an unreadable image in a data worker, a save killed midway, a full or read-only disk, a planted
symlink, a poisoned pickle, a huge image) and checks the run ends with one line, or recovers, and that
nothing earlier is lost."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import save_file, save_model
from torch import nn

from mimkit.cli import main
from mimkit.data.filelist import FileList, save_file_list
from mimkit.data.loader import workers_end_with_errors
from mimkit.data.shards import INDEX_NAME
from mimkit.data.sources import build_source
from mimkit.data.synthetic import SyntheticSource
from mimkit.errors import MimkitError
from mimkit.eval.config import KnnConfig
from mimkit.eval.knn import run_knn
from mimkit.eval.subsets import make_splits
from mimkit.runs import load_encoder
from mimkit.safe_load import load_sharded
from mimkit.train import checkpoint_files as checkpoint
from mimkit.train.checkpoint_files import Checkpoints

TINY = ["--model", "vit_mini", "--batch-size", "8", "--set", "model.kwargs.depth=2",
        "--set", "model.kwargs.decoder_depth=1", "--set", "data.num_workers=0"]
ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def pretrain(out: Path, *extra: str, data: str = "synthetic") -> int:
    return main(["pretrain", "mae", "--data", data, "--out", str(out), *TINY, *extra])


def one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error:"), err
    assert "Traceback" not in "\n".join(err)
    for word in words:
        assert word in err[-1], err[-1]
    return err[-1]


def image_folder(folder: Path, n: int, gray: set[int] = frozenset(), size: int = 32) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        (image.convert("L") if i in gray else image).save(folder / f"{i:03d}.png")
    return folder


def poison(path: Path, marker: Path) -> None:
    """A pickle that would create ``marker`` if it were ever unpickled."""

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"model": Payload(), "step": 1}, path)


@pytest.fixture
def run_with_checkpoints(tmp_path) -> Path:
    """A tiny MAE run holding checkpoints at steps 2 and 3."""
    run = tmp_path / "run"
    assert pretrain(run, "--max-steps", "3", "--set", "train.checkpoint_every=1") == 0
    assert Checkpoints(run).steps() == [2, 3]
    return run


# ---------------------------------------------------------------------------------------------------------
# 2. An unreadable image met in a data worker ends the run at once, in one line


def folder_with_a_bad_file_the_probe_skips(folder: Path) -> Path:
    image_folder(folder, 64)
    (folder / "005.png").write_bytes(b"not an image")  # the start-up probe samples 000, 002, 004, 006, ...
    return folder


def run_args(folder: Path, out: Path, workers: int, skip: bool) -> list[str]:
    args = ["pretrain", "mae", "--data", str(folder), "--out", str(out), *TINY,
            "--set", f"data.num_workers={workers}", "--max-steps", "20"]
    if skip:  # past the cap: the first unreadable file is one too many
        args += ["--skip-bad-images", "--set", "data.max_bad_images=0"]
    return args


def test_bad_image_read_in_the_trainer_ends_the_run(tmp_path, capsys):
    folder = folder_with_a_bad_file_the_probe_skips(tmp_path / "images")
    assert main(run_args(folder, tmp_path / "run", workers=0, skip=False)) == 2
    one_line_error(capsys, "cannot read image", "005.png")


@pytest.mark.slow
@pytest.mark.parametrize("workers, skip", [(1, False), (2, True)])
def test_bad_image_in_a_worker_ends_the_run(tmp_path, workers, skip):
    """In a subprocess: the hang came at the interpreter's exit, waiting for workers that ignore SIGTERM."""
    folder = folder_with_a_bad_file_the_probe_skips(tmp_path / "images")
    command = [sys.executable, "-m", "mimkit.cli", *run_args(folder, tmp_path / "run", workers, skip)]
    job = subprocess.run(command, capture_output=True, text=True, timeout=90, env=ENV,
                         start_new_session=True)
    assert job.returncode == 2, job.stderr
    assert "Traceback" not in job.stderr
    last = job.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "005.png" in last


def test_bad_image_in_an_evaluation_worker_is_one_line(run_with_checkpoints, tmp_path, capsys):
    data = tmp_path / "labelled"
    for split in ("train", "test"):
        for name in ("a", "b"):
            image_folder(data / split / name, 32)
    (data / "train" / "b" / "004.png").write_bytes(b"not an image")  # file 36 of 64: not sampled
    assert main(["knn", str(run_with_checkpoints), "--data", str(data), "--out", str(tmp_path / "knn"),
                 "--num-workers", "1"]) == 2
    one_line_error(capsys, "cannot read image", "004.png")


# ---------------------------------------------------------------------------------------------------------
# 9. Channels come from a sample of the files, and the run says which


def test_rgb_folder_whose_first_file_is_grey_is_rgb(tmp_path, capsys):
    folder = image_folder(tmp_path / "images", 16, gray={0})
    assert build_source(str(folder)).info.channels == 3
    assert build_source(str(image_folder(tmp_path / "grey", 16, gray=set(range(16))))).info.channels == 1
    assert pretrain(tmp_path / "run", "--max-steps", "1", data=str(folder)) == 0
    assert "3 channels (RGB: 15 of 16 sampled files are in colour)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# 10. k-NN records the k that ran; a class left without training images is warned about


def test_knn_records_the_k_that_ran(tmp_path, run_with_checkpoints):
    encoder = load_encoder(run_with_checkpoints)
    with pytest.warns(UserWarning, match="k=1000 is more than the 256 training images"):
        results = run_knn(encoder, KnnConfig(data="synthetic", k=1000, cache_dir=str(tmp_path / "cache")),
                          tmp_path / "knn")
    assert results["k"] == 256
    assert json.loads((tmp_path / "knn" / "results.json").read_text())["k"] == 256


def test_a_class_without_training_images_is_warned_about():
    source = SyntheticSource(n=12, num_classes=10)  # classes 2..9 hold one image each
    with pytest.warns(UserWarning, match="8 of 10 classes have no training image"):
        make_splits(source, label_fraction=0.5, val_fraction=0.6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_splits(SyntheticSource(n=100, num_classes=10), label_fraction=0.1)


# ---------------------------------------------------------------------------------------------------------
# 11. What a save killed midway leaves is removed at start-up and when pruning

KILLED_SAVE = """
import os, signal, sys
from mimkit.cli import main
from mimkit.train import checkpoint_files as checkpoint
save_model, calls = checkpoint.save_model, []
def killed_at_the_third(model, filename):
    calls.append(filename)
    if len(calls) == 3:  # the state file is in place; safetensors is half way through its temp file
        open(os.path.join(os.path.dirname(filename), ".tmpK1LL3D"), "wb").write(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
    save_model(model, filename)
checkpoint.save_model = killed_at_the_third
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_during_a_save_leaves_nothing_behind_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["pretrain", "mae", "--data", "synthetic", "--out", str(run), *TINY, "--max-steps", "5",
            "--set", "train.checkpoint_every=1", "--set", "train.keep_last=5"]
    job = subprocess.run([sys.executable, "-c", KILLED_SAVE, *args], capture_output=True, text=True,
                         timeout=120, env=ENV)
    assert job.returncode == -signal.SIGKILL, job.stderr
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "step-3.pt" in left and "step-3.safetensors" not in left  # an orphan state
    assert ".tmpK1LL3D" in left
    assert Checkpoints(run).steps() == [1, 2]

    assert main(args) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        f"step-{s}.{ext}" for s in range(1, 6) for ext in ("pt", "safetensors")]


def test_pruning_removes_leftovers(tmp_path):
    store = Checkpoints(tmp_path, keep_last=1)
    store.dir.mkdir()
    leftovers = [store.dir / "step-1.pt.tmp", store.dir / ".step-1.safetensors.x1y2.tmp",
                 store.dir / ".tmpAb12Cd", store.dir / "step-7.pt"]  # the last: an orphan state
    for path in leftovers:
        path.write_bytes(b"left by a killed save")
    (store.dir / "notes.txt").write_text("mine")
    model = nn.Linear(2, 2)
    store.save(1, model, {"step": 1})
    store.save(2, model, {"step": 2})
    assert sorted(p.name for p in store.dir.iterdir()) == ["notes.txt", "step-2.pt",
                                                          "step-2.safetensors"]


def test_a_run_saved_with_eight_digit_names_resumes_and_prunes_them(tmp_path):
    store = Checkpoints(tmp_path, keep_last=2)
    store.dir.mkdir()
    model = nn.Linear(2, 2)
    for step in (1, 2):  # as runs saved them before the names lost their zeros
        torch.save({"step": step}, store.dir / f"step-{step:08d}.pt")
        save_model(model, str(store.dir / f"step-{step:08d}.safetensors"))
    assert store.steps() == [1, 2] and store.weights_path(2).name == "step-00000002.safetensors"
    store.save(3, model, {"step": 3})
    assert sorted(p.name for p in store.dir.iterdir()) == ["step-00000002.pt", "step-00000002.safetensors",
                                                          "step-3.pt", "step-3.safetensors"]
    assert store.steps() == [2, 3]


def test_weights_without_their_state_are_no_checkpoint(tmp_path):
    """A checkpoint is its weights and its state: a weights file whose state is gone (deleted by hand, lost
    with a disk) is neither the newest step nor resumed from."""
    store, model = Checkpoints(tmp_path, keep_last=3), nn.Linear(2, 2)
    store.save(1, model, {"step": 1})
    store.save(2, model, {"step": 2})
    store.state_path(2).unlink()
    assert store.steps() == [1] and store.latest() == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipping checkpoint step 2"
        assert store.resume(model)["step"] == 1


def test_a_state_without_a_step_is_skipped_for_an_older_checkpoint(tmp_path):
    """A newest state file that reads but holds no step (another program's pickle) is no training state."""
    store, model = Checkpoints(tmp_path, keep_last=3), nn.Linear(2, 2)
    store.save(1, model, {"step": 1})
    store.save(2, model, {"optimizer": {}})
    skipped = r"skipping checkpoint step 2, it does not load: '.*step-2.pt' is not a mimkit training state"
    with pytest.warns(UserWarning, match=skipped):
        assert store.resume(model)["step"] == 1


def test_an_evaluation_of_a_checkpoint_file_reads_that_file(run_with_checkpoints):
    """`mimkit knn RUN/checkpoints/step-2.safetensors` evaluates step 2, not the run's newest (step 3)."""
    store = Checkpoints(run_with_checkpoints)
    older, newest = load_encoder(store.weights_path(2)), load_encoder(run_with_checkpoints)
    assert older.origin == str(store.weights_path(2)) and newest.origin == str(store.weights_path(3))
    a, b = older.model.state_dict(), newest.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------
# 12 and 17. A damaged or poisoned newest checkpoint: resume falls back; elsewhere one line


@pytest.mark.parametrize("damage", ["truncated weights", "poisoned state"])
def test_resume_falls_back_past_a_bad_newest_checkpoint(run_with_checkpoints, tmp_path, capsys, damage):
    run, marker = run_with_checkpoints, tmp_path / "payload-ran"
    store = Checkpoints(run)
    if damage == "truncated weights":
        weights = store.weights_path(3)
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    else:
        poison(store.state_path(3), marker)
    with pytest.warns(UserWarning, match="skipping checkpoint step 3"):
        assert pretrain(run, "--max-steps", "4", "--set", "train.checkpoint_every=1") == 0
    assert "resuming from step 2" in capsys.readouterr().out
    assert store.steps() == [3, 4] and not marker.exists()


def test_a_poisoned_only_checkpoint_is_refused_and_never_runs(tmp_path, capsys):
    """The training loop's own reading of its state file on resume."""
    run, marker = tmp_path / "run", tmp_path / "payload-ran"
    assert pretrain(run, "--max-steps", "1") == 0
    poison(Checkpoints(run).state_path(1), marker)
    with pytest.warns(UserWarning, match="would run posix.system"):
        assert pretrain(run, "--max-steps", "2") == 2
    one_line_error(capsys, "refusing", "step-1.pt", "nothing was executed")
    assert not marker.exists()


@pytest.mark.parametrize("command", [
    ["visualize", "{run}", "--out", "{tmp}/recon.png"],
    ["finetune", "{run}", "--data", "synthetic", "--out", "{tmp}/ft", "--max-steps", "1"],
    ["export", "{run}", "--to", "hf", "--out", "{tmp}/hf"],
    ["linprobe", "{run}", "--data", "synthetic", "--out", "{tmp}/lp", "--epochs", "1"],
])
def test_commands_on_a_damaged_checkpoint_say_so_in_one_line(run_with_checkpoints, tmp_path, capsys, command):
    weights = Checkpoints(run_with_checkpoints).weights_path(3)
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    args = [a.format(run=run_with_checkpoints, tmp=tmp_path) for a in command]
    assert main(args) == 2
    one_line_error(capsys, "cannot read weights", "step-3.safetensors")


# ---------------------------------------------------------------------------------------------------------
# 13. A full disk or a read-only folder: one line naming the path; earlier checkpoints untouched


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    OSError(errno.EROFS, "Read-only file system"),
])
def test_a_failed_checkpoint_write_is_one_line_and_keeps_earlier_ones(run_with_checkpoints, capsys,
                                                                      monkeypatch, failure):
    run = run_with_checkpoints
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}

    def failing_write(model, filename):
        Path(filename).write_bytes(b"partial")
        raise failure

    monkeypatch.setattr(checkpoint, "save_model", failing_write)
    assert pretrain(run, "--max-steps", "4", "--set", "train.checkpoint_every=1") == 2
    why = "read-only" if failure.args[0] == errno.EROFS else "the disk is full"
    one_line_error(capsys, "step-4.safetensors", why)
    after = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    assert after == before | {"step-4.pt": after["step-4.pt"]}  # no temp file left


@pytest.mark.parametrize("found", ["before", "after"])
def test_a_full_disk_that_torch_save_does_not_name_is_one_line(run_with_checkpoints, capsys, monkeypatch,
                                                                found):
    """torch.save on a full disk raises ``RuntimeError: basic_ios::clear``, with no error number: the free
    space is checked before the save (the room the checkpoint needs) and after a failure."""
    run = run_with_checkpoints
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    real_usage, failed = shutil.disk_usage, []

    def usage(path):
        full = found == "before" or failed
        return real_usage(path)._replace(free=1000) if full else real_usage(path)

    def failing_save(state, path):
        Path(path).write_bytes(b"partial")
        failed.append(path)
        raise RuntimeError("basic_ios::clear")

    monkeypatch.setattr(shutil, "disk_usage", usage)
    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    assert pretrain(run, "--max-steps", "4", "--set", "train.checkpoint_every=1") == 2
    said = {"before": "checked before writing: 0.0 MB free", "after": "found after the write failed with "
            "RuntimeError: basic_ios::clear; 0.0 MB free"}[found]
    one_line_error(capsys, "step-4.pt", "the disk is full", said)
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    assert bool(failed) == (found == "after")


def test_a_read_only_run_folder_on_resume_is_one_line(run_with_checkpoints, capsys, monkeypatch):
    """The run's own files (data.json) cannot be written: one line (root ignores permission bits, so the
    failure is injected where a file in the run folder is created)."""
    run = run_with_checkpoints
    real_mkstemp, real_write_text = tempfile.mkstemp, Path.write_text

    def refused(path):
        if Path(path) == run:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, dir=None, **kw: refused(dir) or real_mkstemp(
        *a, dir=dir, **kw))
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **kw: refused(self.parent) or real_write_text(
        self, *a, **kw))
    assert pretrain(run, "--max-steps", "4") == 2
    one_line_error(capsys, "data.json", "read-only")

@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_checkpoint_folder_is_one_line(run_with_checkpoints, capsys):
    folder = run_with_checkpoints / "checkpoints"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    folder.chmod(0o555)
    try:
        assert pretrain(run_with_checkpoints, "--max-steps", "4", "--set", "train.checkpoint_every=1") == 2
    finally:
        folder.chmod(0o755)
    one_line_error(capsys, "step-4", "read-only")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# ---------------------------------------------------------------------------------------------------------
# 14. A symlink planted at a checkpoint's temporary name is never followed


def test_planted_symlinks_at_temp_names_are_never_followed(run_with_checkpoints, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("victim")
    folder = run_with_checkpoints / "checkpoints"
    for step in (4, 5):
        for suffix in ("pt.tmp", "safetensors.tmp"):
            (folder / f"step-{step}.{suffix}").symlink_to(victim)
    assert pretrain(run_with_checkpoints, "--max-steps", "5", "--set", "train.checkpoint_every=1") == 0
    assert victim.read_text() == "victim"
    assert Checkpoints(run_with_checkpoints).steps() == [4, 5]
    assert not any(p.is_symlink() for p in folder.iterdir())


def test_no_temp_file_of_a_run_follows_a_planted_symlink(run_with_checkpoints, tmp_path):
    """The run's other files (data.json, files.txt, a shard index, cached features) were written through
    fixed temporary names; a symlink planted there redirected the write outside the run."""
    victim = tmp_path / "victim.txt"
    victim.write_text("victim")
    run = run_with_checkpoints
    (run / "data.json.tmp").symlink_to(victim)
    (run / ".files.txt.tmp").symlink_to(victim)
    image_folder(tmp_path / "images" / "a", 4)
    shards = tmp_path / "shards"
    assert main(["data", "pack", str(tmp_path / "images"), "--out", str(shards)]) == 0
    (shards / INDEX_NAME).unlink()
    (shards / f"{INDEX_NAME}.tmp-{os.getpid()}").symlink_to(victim)
    cache = tmp_path / "cache"
    knn = ["knn", str(run), "--data", "synthetic", "--features-cache", str(cache), "--num-workers", "0"]
    assert main([*knn, "--out", str(tmp_path / "knn1")]) == 0
    for path in list(cache.iterdir()):
        path.unlink()
        path.with_name(path.name + ".tmp").symlink_to(victim)

    assert pretrain(run, "--max-steps", "4") == 0
    save_file_list(FileList("x", str(tmp_path), "x", [], [(-1, "a.png")], 0), run / "files.txt")
    assert len(build_source(f"shards:{shards}")) == 4
    assert main([*knn, "--out", str(tmp_path / "knn2")]) == 0
    assert victim.read_text() == "victim"
    assert json.loads((run / "data.json").read_text())["resumed_from"] == 3

def test_temp_files_are_created_exclusively(tmp_path, monkeypatch):
    """Even a symlink planted at the very name mkstemp picks is not written through: O_EXCL refuses it."""
    victim = tmp_path / "victim.txt"
    victim.write_text("victim")
    store = Checkpoints(tmp_path)
    store.dir.mkdir()
    names = iter(["planted"] * 3 + ["fresh"] * 100)
    monkeypatch.setattr("tempfile._RandomNameSequence.__next__", lambda self: next(names))
    (store.dir / ".step-1.pt.planted.tmp").symlink_to(victim)
    store.save(1, nn.Linear(2, 2), {"step": 1})
    assert victim.read_text() == "victim" and store.steps() == [1]


# ---------------------------------------------------------------------------------------------------------
# 15. A shard index may not point outside its folder


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "a/../../x.bin"])
def test_shard_paths_outside_the_folder_are_refused(tmp_path, shard):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, tmp_path / "outside.safetensors")
    index = {"weight_map": {"w": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MimkitError, match="not a file inside its folder"):
        load_sharded(folder, ("model.safetensors",))


def test_shard_paths_inside_the_folder_load(tmp_path):
    (tmp_path / "part").mkdir()
    save_file({"w": torch.ones(2)}, tmp_path / "part" / "one.safetensors")
    index = {"weight_map": {"w": "part/one.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert torch.equal(load_sharded(tmp_path, ("model.safetensors",))["w"], torch.ones(2))


# ---------------------------------------------------------------------------------------------------------
# 16. export never overwrites a folder's files unless told to


def test_export_refuses_a_non_empty_out_unless_forced(run_with_checkpoints, tmp_path, capsys):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "config.json").write_text("mine")
    args = ["export", str(run_with_checkpoints), "--to", "timm", "--out", str(out)]
    assert main(args) == 2
    one_line_error(capsys, str(out), "not empty", "--force")
    assert (out / "config.json").read_text() == "mine"
    assert main([*args, "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["num_classes"] == 0


def test_a_forced_export_removes_what_a_killed_export_left(run_with_checkpoints, tmp_path):
    out = tmp_path / "exported"
    out.mkdir()
    (out / ".tmpX7b2Qz").write_bytes(b"half of a weights file")  # safetensors' own temporary name
    (out / ".config.json.k3j2h1.tmp").write_text("{")  # ours
    (out / "notes.tmp").write_text("mine")
    assert main(["export", str(run_with_checkpoints), "--to", "timm", "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.tmp"]


# ---------------------------------------------------------------------------------------------------------
# 17. A malicious pickle handed in as a tokenizer or inside a Hugging Face teacher: one line, never run


def test_a_pickled_tokenizer_file_is_refused_in_one_line(tmp_path, capsys):
    evil, marker = tmp_path / "dvae.pth", tmp_path / "payload-ran"
    poison(evil, marker)
    assert main(["pretrain", "beit", "--tokenizer", str(evil), "--data", "synthetic",
                 "--out", str(tmp_path / "beit"), "--batch-size", "8", "--max-steps", "1"]) == 2
    one_line_error(capsys, "dvae.pth", "not a dVAE")
    assert not marker.exists()


def test_a_poisoned_hf_teacher_is_refused_in_one_line(tmp_path, capsys):
    folder, marker = tmp_path / "dino", tmp_path / "payload-ran"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "dinov2", "architectures": ["Dinov2Model"], "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64, "patch_size": 4, "image_size": 32}))
    poison(folder / "pytorch_model.bin", marker)
    assert main(["tokenizer", "train", "vqkd", "--teacher", f"hf:{folder}", "--data", "synthetic",
                 "--out", str(tmp_path / "vqkd"), "--batch-size", "8", "--max-steps", "1",
                 "--set", "data.num_workers=0"]) == 2
    one_line_error(capsys, "pytorch_model.bin", "would run posix.system", "nothing was executed")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# 19. Huge images: decoded at the size the view needs, and a pixel cap with a one-line error


@pytest.mark.parametrize("suffix, side", [(".jpg", 192), (".png", 110)])
def test_large_images_are_decoded_at_a_reduced_size(tmp_path, suffix, side):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((768, 1024, 3), 128, np.uint8)).save(folder / f"big{suffix}")
    full = build_source(str(folder))[0][0]
    reduced = build_source(str(folder), decode_min_side=100)[0][0]
    assert full.shape == (3, 768, 1024)
    # JPEG: the DCT's 1/4 scale (1/8 would leave 96 < 100 rows); PNG: an integer reduce by 7, rounding up
    assert reduced.shape[1] == side and min(reduced.shape[1:]) >= 100
    assert abs(reduced.float().mean() - 128) < 2


def test_a_pixel_cap_refuses_huge_images_in_one_line(tmp_path, capsys):
    folder = image_folder(tmp_path / "images", 8)
    Image.new("RGB", (400, 300)).save(folder / "003.png")
    with pytest.raises(MimkitError, match=r"003\.png.*400x300 pixels is above data.max_image_pixels=10000"):
        build_source(str(folder), max_image_pixels=10_000)[3]
    assert pretrain(tmp_path / "run", "--max-steps", "2", "--set", "data.max_image_pixels=10000",
                    "--set", "data.img_size=32", data=str(folder)) == 2
    one_line_error(capsys, "003.png", "max_image_pixels")


def test_a_full_disk_while_logging_is_one_line(tmp_path, capsys, monkeypatch):
    real_open = Path.open

    def full(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and mode == "a":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full)
    assert pretrain(tmp_path / "run", "--max-steps", "2", "--set", "train.log_every=1") == 2
    one_line_error(capsys, "metrics.jsonl", "the disk is full")


def test_a_torn_last_metrics_line_does_not_block_the_resume(run_with_checkpoints):
    path = run_with_checkpoints / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 70, "epo')  # a crash while the line was written
    with pytest.warns(UserWarning, match="last line was cut short"):
        assert pretrain(run_with_checkpoints, "--max-steps", "4", "--set", "train.log_every=1") == 0
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()][-1] == 4

def test_a_read_only_place_for_a_new_run_is_one_line(tmp_path, capsys, monkeypatch):
    """--out inside a read-only folder: creating the run directory fails in one line (root ignores
    permission bits, so the failure is injected)."""
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert pretrain(tmp_path / "ro" / "run", "--max-steps", "1") == 2
    one_line_error(capsys, "run.lock", "read-only")


def test_a_full_disk_while_exporting_is_one_line(run_with_checkpoints, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mimkit.interop.export.save_file", full)
    out = tmp_path / "exported"
    assert main(["export", str(run_with_checkpoints), "--to", "timm", "--out", str(out)]) == 2
    one_line_error(capsys, str(out), "the disk is full")


def test_a_workers_error_ends_the_run_with_its_own_last_line():
    """A DataLoader re-raises a worker's error with the worker's traceback as its message; an error raised
    while handling another (a stand-in image that fails too) shows both, the one that ended the worker
    last. That one is the run's one-line message."""
    traceback = ("Caught MimkitError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                 "last):\nmimkit.errors.MimkitError: cannot read 'a.jpg'\n\nDuring handling of the above "
                 "exception, another exception occurred:\n\nmimkit.errors.MimkitError: 101 bad images, "
                 "more than data.max_bad_images=100\n")
    with pytest.raises(MimkitError) as err, workers_end_with_errors(SimpleNamespace(_iterator=None)):
        raise MimkitError(traceback)
    assert str(err.value) == "101 bad images, more than data.max_bad_images=100"
