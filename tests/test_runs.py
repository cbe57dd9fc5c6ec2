"""Run directories: the lock (held by the process that trains, never by the processes it forks, and gone
with a run refused before it wrote anything), and the weights an evaluation reads."""

import errno
import json
import os
import re
import time
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml

import mimkit.runs as runs
from mimkit.cli import main
from mimkit.config import merge, to_dict
from mimkit.errors import MimkitError
from mimkit.eval.config import FinetuneConfig
from mimkit.registry import read_config
from mimkit.runs import (
    DATA_FACTS,
    LOCK,
    OUT_MARK,
    RESUMABLE_CHANGES,
    best_weights,
    claim_out_dir,
    config_path,
    hold_run_dir,
    is_run_dir,
    keep_config,
    latest_weights,
    load_config,
    load_encoder,
    load_run,
    load_trained,
    read_run,
    run_kind,
    save_run_config,
    split_weights_path,
)
from mimkit.train.checkpoint_files import Checkpoints


def test_a_forked_child_does_not_keep_the_run_locked(tmp_path):
    run = tmp_path / "run"
    ready, tell = os.pipe()
    with hold_run_dir(run) as held:
        held.save_data_facts({})  # a run that wrote something keeps its lock file (else a new one is made)
        child = os.fork()
        if child == 0:  # a data worker's place: it outlives its trainer's hold on the run
            # os.fork has returned here: the fork hooks have run, and forgot the closed copies (a later fork
            # of this child must not close whatever file reuses their numbers)
            os.write(tell, b"!" if not runs._HELD_LOCKS else b"?")
            time.sleep(5)
            os._exit(0)
        assert os.read(ready, 1) == b"!"
    try:
        with hold_run_dir(str(run)):  # free, though the child is alive with the file descriptors it inherited
            pass
        assert not runs._HELD_LOCKS  # forgotten once closed: a later fork closes none
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
        os.close(ready)
        os.close(tell)


def test_the_best_weights_are_the_kept_best_not_the_newest(tmp_path):
    """A run that kept its best weights (fine-tuning, segmentation) is evaluated with those, not its newest;
    a run without them, with its newest."""
    model, files = torch.nn.Linear(2, 2), Checkpoints(tmp_path)
    files.save(1, model, {"step": 1})
    files.save_best(1, model, "val_top1", 50.0)
    files.save(2, model, {"step": 2})
    assert best_weights(tmp_path) == files.best_path
    files.best_path.unlink()
    assert best_weights(tmp_path) == files.weights_path(2)


def test_a_run_refused_before_writing_anything_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "new"
    refused = ["pretrain", "mae", "--data", "synthetic:16", "--set", "mae.mask_ratio=2", "--out"]
    assert main([*refused, str(out)]) == 2
    assert "mask_ratio" in capsys.readouterr().err and not out.exists()  # neither the folder nor its lock
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*refused, str(empty)]) == 2
    assert empty.is_dir() and not any(empty.iterdir())  # the user's empty folder stays, empty


def test_the_lock_holds_this_process_pid_alone(tmp_path):
    """A lock file left by a process with a longer PID is rewritten whole: the message naming the holder of
    a busy run reads this PID, not its digits over the old one's."""
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text("123456789\n")
    with hold_run_dir(run):
        assert (run / LOCK).read_text() == f"{os.getpid()}\n"


def test_a_lock_file_that_cannot_be_opened_for_another_reason_says_that_reason(tmp_path, monkeypatch):
    """Only a link (ELOOP) becomes the lock's own message; any other failure to open it is raised as it came,
    not lost into a later error about a file that was never opened."""
    def failing_open(path, flags, mode=0o777):
        raise OSError(errno.EIO, "input/output error", str(path))
    monkeypatch.setattr(runs.os, "open", failing_open)
    with pytest.raises(OSError, match="input/output error"):
        with hold_run_dir(tmp_path / "run"):
            pass


def test_a_lock_file_that_is_a_symbolic_link_is_refused_and_its_target_untouched(tmp_path):
    victim, run = tmp_path / "victim.txt", tmp_path / "run"
    victim.write_text("mine")
    run.mkdir()
    (run / LOCK).symlink_to(victim)
    with pytest.raises(MimkitError, match=r"^'.*run\.lock' is a symbolic link, not the run's lock file; "
                                          "remove it$"), hold_run_dir(run):
        pass
    assert victim.read_text() == "mine"


def test_a_weights_file_beside_the_config_belongs_to_that_run(tmp_path):
    """A checkpoint inside ``checkpoints/`` belongs to the folder above; one beside ``config.yaml`` (copied
    there, or an imported file) to the folder it is in."""
    (tmp_path / "config.yaml").write_text("method: mae\n")
    (tmp_path / "checkpoints").mkdir()
    for path in (tmp_path / "chosen.safetensors", tmp_path / "checkpoints" / "step-1.safetensors"):
        path.write_bytes(b"")
        assert split_weights_path(path) == (tmp_path, path)


def test_a_random_encoder_follows_its_seed(mae_run):
    """``--init random`` draws the encoder from ``--seed``: two seeds give two encoders, one seed the same;
    without a seed, seed 0 (``--seed``'s default), for `load_encoder` and `random_encoder` alike."""
    def weights(**seed):
        return load_encoder(mae_run, "random", **seed).model.state_dict()["patch_embed.proj.weight"]
    assert torch.equal(weights(seed=1), weights(seed=1)) and not torch.equal(weights(seed=0), weights(seed=1))
    assert torch.equal(weights(), weights(seed=0))
    drawn = runs.random_encoder(load_encoder(mae_run).spec).state_dict()["patch_embed.proj.weight"]
    assert torch.equal(drawn, weights(seed=0))


def make_run(folder, *parts: str):
    """A folder holding ``parts``: the lock file, ``config.yaml`` (a pretraining run's), ``checkpoints/``."""
    folder.mkdir()
    if "lock" in parts:
        (folder / LOCK).write_text("")
    if "config" in parts:
        config_path(folder).write_text("method: mae\n")
    if "checkpoints" in parts:
        Checkpoints(folder).dir.mkdir()
    return folder


@pytest.mark.parametrize("parts, is_run", [
    ((), False), (("lock",), True), (("config",), False), (("checkpoints",), False),
    (("config", "checkpoints"), True)])
def test_a_run_is_a_lock_file_or_a_configuration_with_checkpoints(tmp_path, parts, is_run):
    assert is_run_dir(make_run(tmp_path / "run", *parts)) is is_run


def test_an_out_folder_is_claimed_once_and_refused_to_others(tmp_path):
    """`claim_out_dir`: a new folder (its parents too) is made and marked as the command's; the command may
    write into it again, another command or someone's files may not, unless forced; a file is no folder."""
    out = tmp_path / "a" / "knn"
    assert claim_out_dir(out, "knn") == out and (out / OUT_MARK).read_text() == "knn\n"
    (out / "results.json").write_text("{}")
    assert claim_out_dir(out, "knn") == out
    with pytest.raises(MimkitError, match="holds the output of mimkit knn; choose a new --out, or --force"):
        claim_out_dir(out, "linprobe")
    assert claim_out_dir(out, "linprobe", force=True) == out
    assert (out / OUT_MARK).read_text() == "knn\n"  # forced in: the folder stays the other command's
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    for name in ("a", "b", "c"):
        (theirs / name).write_text("")
    with pytest.raises(MimkitError, match=r"files mimkit knn did not write \(a, b, c\);"):
        claim_out_dir(theirs, "knn")
    (theirs / "d").write_text("")
    with pytest.raises(MimkitError, match=r"did not write \(a, b, c, \.\.\.\);"):
        claim_out_dir(theirs, "knn")
    assert not (theirs / OUT_MARK).exists()
    with pytest.raises(MimkitError, match="holds a mimkit run;"):
        claim_out_dir(make_run(tmp_path / "run", "lock"), "knn")
    with pytest.raises(MimkitError, match="is a file; give a folder"):
        claim_out_dir(theirs / "a", "knn")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert claim_out_dir(empty, "linprobe") == empty and (empty / OUT_MARK).read_text() == "linprobe\n"


def test_a_held_run_names_its_holder_and_empties_the_lock_after(tmp_path):
    """While one hold is on, another (here: a second open file of the same process) is refused naming the
    holder's PID; after it the lock file is empty. A hold made in a new nested folder creates it; a file or a
    folder of someone's files is refused; a distributed job's other processes take no lock at all."""
    run = tmp_path / "a" / "run"
    with hold_run_dir(run) as held:
        assert held.dir == run and (run / LOCK).read_text() == f"{os.getpid()}\n"
        with pytest.raises(MimkitError, match=rf"being trained by another process \(PID {os.getpid()}\); "
                                                 "wait for it to end, or choose another --out"):
            with hold_run_dir(run):
                pass
        held.save_data_facts({"images": 3})
    assert (run / LOCK).read_text() == "" and json.loads((run / DATA_FACTS).read_text()) == {"images": 3}
    with hold_run_dir(run):  # released
        pass
    with hold_run_dir(tmp_path / "other", enabled=False) as held:
        assert held.dir == tmp_path / "other" and not held.dir.exists()
    with pytest.raises(MimkitError, match="is a file; give a folder for the run"):
        with hold_run_dir(run / LOCK):
            pass
    with pytest.raises(MimkitError, match=r"not a mimkit run \(it holds config.yaml\); give a new or empty"):
        with hold_run_dir(make_run(tmp_path / "x", "config")):
            pass


def test_a_run_without_weights_or_encoder_says_so(tmp_path):
    """The one-line errors of the readers of a run: no config.yaml, no checkpoint yet, a kind that keeps no
    encoder or no model, a tokenizer whose encoder is no ViT, an unknown ``init``."""
    empty = make_run(tmp_path / "empty")
    for read in (run_kind, load_config, split_weights_path):
        with pytest.raises(MimkitError, match="not a mimkit run directory"):
            read(empty)
    other = tmp_path / "weights.pt"
    other.write_bytes(b"")
    with pytest.raises(MimkitError, match="is not a checkpoint"):
        split_weights_path(other)
    with pytest.raises(MimkitError, match="has no checkpoint yet"):
        latest_weights(make_run(tmp_path / "new", "config"))
    for kind in ("segment", "knn"):
        run = make_run(tmp_path / kind)
        config_path(run).write_text(f"kind: {kind}\n")
        with pytest.raises(MimkitError, match=f"is a {kind} run, which holds no encoder to evaluate; "
                                              "give a pretraining or fine-tuning run"):
            load_encoder(run)
    with pytest.raises(MimkitError, match="is a knn run, which keeps no model to load"):
        load_trained(tmp_path / "knn")
    with pytest.raises(MimkitError, match="init 'fresh' is not one of pretrained, random"):
        load_encoder(tmp_path / "knn", "fresh")
    tokenizer = make_run(tmp_path / "dvae")
    config_path(tokenizer).write_text("kind: tokenizer\nmethod: dvae\ndata: {img_size: 16, channels: 1}\n")
    with pytest.raises(MimkitError, match="^a dvae run has no ViT encoder to evaluate \\(DVAEEncoder is not"):
        load_encoder(tokenizer, "random")


def test_a_saved_configuration_is_headed_by_its_kind_reads_back_and_is_kept(tmp_path):
    """``config.yaml`` starts with the run's kind, then the configuration in its own order; a held run checks
    a trained run's configuration against it and refuses another (`HeldRun.keep_config` forces nothing
    unless asked)."""
    run = make_run(tmp_path / "run", "lock")
    config = read_config({"method": "mae", "train": {"epochs": 3}})
    save_run_config(run, "pretraining", config)
    text = config_path(run).read_text()
    assert text.startswith("kind: pretraining\nmethod: mae\ndata:")  # in the configuration's order
    kind, saved = read_run(run)
    assert kind.name == "pretraining" and saved == config and load_config(run) == config
    other = read_config({"method": "mae", "optim": {"base_lr": 1.0}})
    with hold_run_dir(run) as held:
        for keep in (held.keep_config, partial(keep_config, run)):
            with pytest.raises(MimkitError, match="trained to step 1 with other settings .*base_lr.*; choose "
                                                  "another --out, or resume it with the new settings"):
                keep(other, "pretraining", 1)
            assert config_path(run).read_text() == text
        held.keep_config(other, "pretraining", 1, force=True)
    assert load_config(run) == other
    for untrained in (0, None):  # an imported run's step 0, or no checkpoint: the new configuration is saved
        keep_config(run, config, "pretraining", untrained)
        assert config_path(run).read_text() == text
        save_run_config(run, "pretraining", other)


MAE_VALUES = {"method": "mae", "train": {"epochs": 3}}


def trained_mae_run(tmp_path: Path) -> tuple[Path, str]:
    """A held MAE run folder with its saved configuration (3 epochs), and that file's text."""
    run = make_run(tmp_path / "run", "lock")
    save_run_config(run, "pretraining", read_config(MAE_VALUES))
    return run, config_path(run).read_text()


def changed_setting(change: dict) -> str:
    """The dotted name of the one setting ``change`` holds (``train.seed``)."""
    section, values = next(iter(change.items()))
    return f"{section}.{next(iter(values))}"


def changed_mae_values(change: dict) -> dict:
    """`MAE_VALUES` with the settings of ``change`` (one section) put in."""
    section = next(iter(change))
    return MAE_VALUES | {section: MAE_VALUES.get(section, {}) | change[section]}


@pytest.mark.parametrize("change", [{"train": {"epochs": 9}}, {"train": {"max_steps": 9}},
                                    {"train": {"checkpoint_every": 9}}, {"train": {"keep_last": 9}},
                                    {"train": {"log_every": 9}}, {"train": {"compile": True}},
                                    {"data": {"num_workers": 3}}, {"data": {"skip_bad_images": True}},
                                    {"data": {"max_bad_images": 9}}, {"data": {"root": "elsewhere"}}],
                         ids=changed_setting)
def test_a_trained_run_resumes_with_its_length_or_upkeep_changed(tmp_path, change):
    """`RESUMABLE_CHANGES`: more epochs or steps for a finished run, another checkpoint rhythm, more workers,
    a moved data folder; none changes what a step computes, so a trained run resumes with each, its saved
    configuration compared, not rewritten."""
    run, text = trained_mae_run(tmp_path)
    keep_config(run, read_config(changed_mae_values(change)), "pretraining", 1)
    assert config_path(run).read_text() == text


FINETUNE_RUN = FinetuneConfig(encoder="runs/mae", encoder_config=to_dict(read_config({"method": "mae"})))


@pytest.mark.parametrize("kind, saved, resumed", [
    ("finetune", FinetuneConfig(**{**vars(FINETUNE_RUN), "eval_batch_size": 8}), FINETUNE_RUN),
    ("tokenizer", read_config({"method": "vqkd"}),
     read_config({"method": "vqkd", "vqkd": {"eval_images": 7}})),
], ids=["eval_batch_size", "vqkd.eval_images"])
def test_a_trained_run_resumes_with_its_kinds_or_methods_upkeep_changed(tmp_path, kind, saved, resumed):
    """Beside `RESUMABLE_CHANGES`' sections every run has: an evaluation's batch (``eval_batch_size``) and a
    method's own upkeep (`mimkit.registry.Method.resumable`: VQ-KD's held-out image count)."""
    run = make_run(tmp_path / "run", "lock")
    save_run_config(run, kind, saved)
    text = config_path(run).read_text()
    keep_config(run, resumed, kind, 1)
    assert config_path(run).read_text() == text


@pytest.mark.parametrize("change", [{"train": {"seed": 9}}, {"train": {"batch_size": 9}},
                                    {"train": {"accum_steps": 2}}, {"data": {"img_size": 16}},
                                    {"optim": {"weight_decay": 0.1}}, {"model": {"patch_size": 2}}],
                         ids=changed_setting)
def test_a_trained_run_refuses_to_resume_with_what_its_steps_compute_changed(tmp_path, change):
    """Outside `RESUMABLE_CHANGES` a change is refused and named: another seed would change the data order,
    crops and masks mid-run; another batch, image size, optimizer or model would change the step itself."""
    run, text = trained_mae_run(tmp_path)
    with pytest.raises(MimkitError, match=rf"other settings \({re.escape(changed_setting(change))} "):
        keep_config(run, read_config(changed_mae_values(change)), "pretraining", 1)
    assert config_path(run).read_text() == text


def leaves(values: dict, prefix: str = "") -> dict:
    """``{"dotted.key": value}`` for every leaf of nested ``values``."""
    found = {}
    for key, value in values.items():
        found |= leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return found


def another_value(key: str, value):
    """A value other than ``value`` that setting ``key`` of an MAE run takes (a flag flipped, a number or the
    last of a list nudged, a name lengthened, an unset setting given the first that fits)."""
    if isinstance(value, bool):
        candidates = [not value]
    elif isinstance(value, (int, float)):
        candidates = [value + 1, value / 2 + 0.01]
    elif isinstance(value, list):
        candidates = [value[:-1] + [value[-1] / 2]]
    elif isinstance(value, str):
        candidates = [value + "x"]
    else:
        candidates = [16, 0.5, [0.5]]
    for candidate in candidates:
        *parents, leaf = key.split(".")
        change = {leaf: candidate}
        for part in reversed(parents):
            change = {part: change}
        try:
            return read_config(merge(MAE_VALUES, change))
        except MimkitError:
            continue
    raise AssertionError(f"no other value of {key} found")


# the settings that change no step of a run, written out here rather than read from `RESUMABLE_CHANGES` (a
# setting wrongly added there would otherwise leave the check below as well)
UPKEEP = {"train.epochs", "train.max_steps", "train.checkpoint_every", "train.keep_last", "train.log_every",
          "train.compile", "data.num_workers", "data.skip_bad_images", "data.max_bad_images", "data.root"}


def test_every_setting_outside_the_resumable_ones_is_refused_on_resume(tmp_path):
    """Each setting of a saved MAE run (every section's, the method's own) outside its length and upkeep,
    changed alone, is refused and named, so no setting that changes what a step computes slips through (the
    normalization, the largest image, clipping, betas, the mask ratio ...)."""
    assert UPKEEP == RESUMABLE_CHANGES - {"eval_batch_size"}  # an evaluation's, tested beside the MAE run's
    run, text = trained_mae_run(tmp_path)
    settings = leaves(to_dict(read_config(MAE_VALUES)))
    checked = [key for key in settings if key not in UPKEEP and key != "method"]
    for key in checked:
        with pytest.raises(MimkitError, match=rf"other settings \({re.escape(key)} "):
            keep_config(run, another_value(key, settings[key]), "pretraining", 1)
    assert config_path(run).read_text() == text


def test_settings_an_older_config_yaml_lacks_are_compared_as_their_defaults(tmp_path):
    """A trained run whose ``config.yaml`` lacks settings added since (here ``eval_every``, and
    ``train.seed`` inside the encoder's section) resumes: the missing ones read as their defaults, not as
    changes."""
    run = make_run(tmp_path / "run", "lock")
    config = FinetuneConfig(encoder="runs/mae", encoder_config=to_dict(read_config({"method": "mae"})))
    save_run_config(run, "finetune", config)
    values = yaml.safe_load(config_path(run).read_text())
    del values["eval_every"], values["encoder_config"]["train"]["seed"]
    config_path(run).write_text(yaml.safe_dump(values, sort_keys=False))
    keep_config(run, config, "finetune", 1)
    assert yaml.safe_load(config_path(run).read_text()) == values  # compared, not rewritten


@pytest.mark.parametrize("other", [{"encoder": "runs/simmim"}, {"kind": "segment"}], ids=str)
def test_a_trained_run_refuses_another_encoder_or_kind_as_another_run(tmp_path, other):
    """A fine-tuning run of one encoder is not resumed as a run of another encoder (nor as another kind's
    run), even with --force-config: it is another run."""
    run = make_run(tmp_path / "run", "lock")
    saved = FinetuneConfig(encoder="runs/mae", encoder_config=to_dict(read_config({"method": "mae"})))
    save_run_config(run, "finetune", saved)
    text = config_path(run).read_text()
    new = FinetuneConfig(encoder=other.get("encoder", "runs/mae"), encoder_config=saved.encoder_config)
    with pytest.raises(MimkitError, match=r"holds another run \(a finetune run of runs/mae\); choose"):
        keep_config(run, new, other.get("kind", "finetune"), 1, force=True)
    assert config_path(run).read_text() == text


@pytest.mark.parametrize("values, kind", [
    ({"seg": {}, "encoder_config": {}}, "segment"), ({"encoder_config": {}}, "finetune"),
    ({"method": "dvae"}, "tokenizer"), ({}, "pretraining"), ({"kind": "knn", "seg": {}}, "knn")], ids=str)
def test_a_run_saved_before_config_yaml_said_its_kind_is_told_by_its_sections(values, kind):
    """`runs.kind_name`: ``kind:`` when saved; else an old segmentation run (which also has an
    ``encoder_config``) by its ``seg``, a fine-tuning run by its ``encoder_config``, others by their
    method."""
    assert runs.kind_name(values) == kind


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


def test_a_trained_run_loads_as_its_kind_loads_it_with_its_newest_weights(mae_run):
    model, config = load_trained(mae_run)
    reference, saved = load_run(mae_run)
    assert not model.training and config == saved and same_weights(model, reference)
    encoder = load_encoder(mae_run)
    assert encoder.origin == str(latest_weights(mae_run)) and same_weights(encoder.model, reference.encoder)
    for init in ("pretrained", "random"):  # in eval mode, every module (no drop path, no dropout)
        assert not any(module.training for module in load_encoder(mae_run, init).model.modules())
