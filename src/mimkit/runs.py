"""Run directories: what a finished (or interrupted) run leaves, and how to get its model back. This module
owns the layout: no other module spells the names of the files below.

``<run>/`CONFIG``` is the resolved configuration, headed by the run's kind (``kind: finetune``,
`mimkit.kinds`; runs saved before it said its kind are recognised by `kind_name`, the one place that tells a
kind by its keys); ``<run>/checkpoints/`` the weights (`Checkpoints`: the
newest steps, and the best weights of a run that evaluates); ``<run>/`LOCK``` is locked by the one process
that trains the run and holds its PID meanwhile; ``<run>/`DATA_FACTS``` is a pretraining run's start-up
summary (what it reads and how it runs); ``<run>/`FILE_LIST``` the files of a folder it trains on.
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from mimkit.config import PretrainConfig, differences, from_dict, read_yaml, to_dict
from mimkit.errors import MimkitError, explain_write_errors
from mimkit.files import write_text_atomically
from mimkit.kinds import Kind, kind_of
from mimkit.models.classifier import check_encoder
from mimkit.registry import method_of, read_config
from mimkit.train.checkpoint_files import Checkpoints, load_weights

logger = logging.getLogger(__name__)

CONFIG = "config.yaml"
KIND = "kind"  # the key of config.yaml that names the run's kind (`mimkit.kinds`)
# the sections that told a run's kind before config.yaml said it, first match wins; others were pretraining
# or tokenizer runs, as their method is
OLD_RUN_SECTIONS = (("seg", "segment"), ("encoder_config", "finetune"))
LOCK = "run.lock"
DATA_FACTS = "data.json"
FILE_LIST = "files.txt"
OUT_MARK = ".mimkit-out"  # in an --out folder an evaluation command (linprobe, knn) made: the command's name
INITS = ("pretrained", "random")  # what load_encoder gives: a run's weights, or its architecture afresh
# settings a run may resume with changed values: its length and its upkeep, none of which changes what one
# step computes (a method adds its own: `mimkit.registry.Method.resumable`)
RESUMABLE_CHANGES = frozenset({
    "train.epochs", "train.max_steps", "train.checkpoint_every", "train.keep_last", "train.log_every",
    "train.compile", "data.num_workers", "data.skip_bad_images", "data.max_bad_images", "data.root",
    "eval_batch_size"})


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a mimkit run: one a training command started (its lock file), or a
    configuration with checkpoints (an imported run, or one from before the lock file)."""
    path = Path(path)
    return (path / LOCK).is_file() or (config_path(path).is_file() and Checkpoints(path).dir.is_dir())


def some_names(folder: Path) -> str:
    """The first three names in ``folder``, for messages."""
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def claim_out_dir(out: str | Path, command: str, force: bool = False) -> Path:
    """Make ``out`` the output folder of ``command`` (``linprobe``, ``knn``): a new or empty folder is created
    and marked as its (`OUT_MARK`), and one it marked before is used again (files of the same names are
    replaced). A folder of another command, a run, or anyone's files is refused unless ``force``.

    Returns:
        ``out`` as a `Path`, created.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MimkitError(f"--out '{out}' is a file; give a folder")
    mark = out / OUT_MARK
    owner = mark.read_text().strip() if mark.is_file() else None
    empty = not out.is_dir() or not any(out.iterdir())
    if not empty and owner != command and not force:
        held = (f"the output of mimkit {owner}" if owner else "a mimkit run" if is_run_dir(out)
                else f"files mimkit {command} did not write ({some_names(out)})")
        raise MimkitError(f"--out '{out}' holds {held}; choose a new --out, or --force to write into it "
                          "anyway (files of the same names are replaced)")
    with explain_write_errors(out):
        out.mkdir(parents=True, exist_ok=True)
    if empty:
        write_text_atomically(mark, f"{command}\n")
    return out


def config_path(run_dir: str | Path) -> Path:
    """Where a run keeps its resolved configuration."""
    return Path(run_dir) / CONFIG


def saved_values(run_dir: str | Path) -> dict:
    """The configuration a run saved, as plain values (no type checked, its ``kind:`` left out); ``{}`` when
    it saved none."""
    path = config_path(run_dir)
    values = read_yaml(path) if path.is_file() else {}
    values.pop(KIND, None)
    return values


def kind_name(values: dict) -> str:
    """The kind of a run whose saved configuration (read as it is, ``kind:`` included) is ``values``.

    A run saved before ``config.yaml`` said its kind is recognised by its sections (`OLD_RUN_SECTIONS`): this
    is the one place that tells a run's kind by its keys, for those runs only.
    """
    if KIND in values:
        return values[KIND]
    old = next((kind for section, kind in OLD_RUN_SECTIONS if section in values), None)
    return old or method_of(values.get("method", PretrainConfig.method)).kind


def run_kind(run_dir: str | Path) -> Kind:
    """The kind of the run in ``run_dir`` (`mimkit.kinds.Kind`)."""
    path = config_path(run_dir)
    if not path.is_file():
        raise MimkitError(f"'{run_dir}' is not a mimkit run directory (no {CONFIG})")
    return kind_of(kind_name(read_yaml(path)))


def read_run(run_dir: str | Path) -> tuple[Kind, object]:
    """The kind of the run in ``run_dir`` and its typed configuration."""
    kind = run_kind(run_dir)
    return kind, kind.read_config(saved_values(run_dir))


def save_run_config(run_dir: str | Path, kind: str, config) -> None:
    """Write a run's resolved configuration, headed by its kind."""
    path = config_path(run_dir)
    with explain_write_errors(path):
        path.write_text(yaml.safe_dump({KIND: kind, **to_dict(config)}, sort_keys=False))


def file_list_path(run_dir: str | Path) -> Path:
    """Where a run keeps the files of a folder it trains on (`mimkit.data.filelist`)."""
    return Path(run_dir) / FILE_LIST


def split_weights_path(path: str | Path) -> tuple[Path, Path | None]:
    """(run directory, weights file or None) for a run directory or a checkpoint file inside one."""
    path = Path(path)
    if path.is_file():
        if not path.name.endswith(".safetensors"):
            raise MimkitError(f"'{path}' is not a checkpoint (.safetensors) nor a run directory")
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return run_dir, path
    if not config_path(path).is_file():
        raise MimkitError(f"'{path}' is not a mimkit run directory (no {CONFIG}) nor a checkpoint file")
    return path, None


@dataclass(frozen=True)
class HeldRun:
    """A run directory held for training (`hold_run_dir`): what the one who trains it writes there besides its
    checkpoints and records."""

    dir: Path

    @property
    def file_list(self) -> Path:
        """Where the run keeps the files of a folder it trains on (`file_list_path`)."""
        return file_list_path(self.dir)

    def keep_config(self, config, kind: str, step: int | None, force: bool = False) -> None:
        """Save the configuration, or check a trained run's against it (`keep_config`)."""
        keep_config(self.dir, config, kind, step, force)

    def save_data_facts(self, facts: dict) -> None:
        """Write the run's start-up summary (JSON-friendly ``facts``) atomically."""
        write_text_atomically(self.dir / DATA_FACTS, json.dumps(facts, indent=2) + "\n")


@contextlib.contextmanager
def hold_run_dir(run_dir: str | Path, enabled: bool = True) -> Iterator[HeldRun]:
    """Hold the run directory's exclusive lock while the block runs, creating the directory if needed.

    A folder that is neither empty nor a run is refused (it is someone's files, not ours to write into),
    and so is a run that another process holds: its PID is in the message. A run that ends before writing
    anything (a setting refused at start-up) leaves no lock file behind, nor the folder when it made it.

    Args:
        enabled: False on the processes of a distributed job other than the main one (it holds the lock
            for the job).
    """
    run_dir = Path(run_dir)
    if not enabled:
        yield HeldRun(run_dir)
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise MimkitError(f"--out '{run_dir}' is a file; give a folder for the run")
    if run_dir.is_dir() and not is_run_dir(run_dir) and any(run_dir.iterdir()):
        raise MimkitError(f"--out '{run_dir}' is a folder that is not a mimkit run (it holds "
                          f"{some_names(run_dir)}); give a new or empty folder")
    made = not run_dir.exists()
    try:
        with explain_write_errors(run_dir / LOCK):  # a read-only or full disk: one line, not a traceback
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:  # O_NOFOLLOW: a link is never followed, the PID would overwrite its target
        if err.errno != errno.ELOOP:
            raise
        raise MimkitError(f"'{run_dir / LOCK}' is a symbolic link, not the run's lock file; "
                          "remove it") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise MimkitError(f"'{run_dir}' is being trained by another process (PID {holder}); wait for it "
                              "to end, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD_LOCKS.add(fd)
        try:
            yield HeldRun(run_dir)
        finally:
            _HELD_LOCKS.discard(fd)
            os.ftruncate(fd, 0)
            if [p.name for p in run_dir.iterdir()] == [LOCK]:  # nothing written: nothing to keep
                (run_dir / LOCK).unlink()
                if made:
                    run_dir.rmdir()
    finally:
        os.close(fd)  # releases the lock


def _close_inherited_locks() -> None:
    """In a forked child (a data loader worker): close the copies of the run locks its parent holds. A flock
    belongs to the open file, so a worker orphaned by a killed trainer would otherwise keep the run locked;
    closing a copy leaves the parent's lock in place."""
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


_HELD_LOCKS: set[int] = set()  # lock file descriptors held by this process (`hold_run_dir`)
os.register_at_fork(after_in_child=_close_inherited_locks)


def keep_config(run_dir: str | Path, config, kind: str, step: int | None, force: bool = False) -> None:
    """Save a new run's resolved configuration; check a trained run's against it instead of rewriting it.

    A run with a trained checkpoint (step > 0; an imported run's step 0 starts training afresh) resumes
    only as a run of the same ``kind`` (of the same encoder, for a run that evaluates one), and only under
    the configuration it was trained with, apart from `RESUMABLE_CHANGES` (its length and upkeep) and its
    method's own (`mimkit.registry.Method.resumable`). Other differences are refused, each listed, unless
    ``force``: then they are said and saved, headed by ``kind``.

    Args:
        step: the run's newest checkpoint (`mimkit.train.checkpoint_files.Checkpoints.latest`), None if none.
    """
    path = config_path(run_dir)
    if not step or not path.is_file():
        save_run_config(run_dir, kind, config)
        return
    values = saved_values(run_dir)
    then = kind_name(read_yaml(path))
    if then != kind or values.get("encoder") != getattr(config, "encoder", None):  # not this run at all
        origin = values.get("encoder") or values.get("method")
        raise MimkitError(f"'{run_dir}' holds another run (a {then} run of {origin}); choose another --out")
    saved = _comparable(values, type(config))
    method = getattr(config, "method", None)  # a pretraining run's; evaluation runs have none
    resumable = RESUMABLE_CHANGES | set(method_of(method).resumable if method else ())
    changed = {k: v for k, v in differences(saved, _comparable(to_dict(config), type(config))).items()
               if k not in resumable}
    if not changed:  # (a run saved before config.yaml said its kind is left as it is: `kind_name` knows it)
        return
    listing = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
    if not force:
        raise MimkitError(f"'{run_dir}' holds a run trained to step {step} with other settings ({listing}); "
                          "choose another --out, or resume it with the new settings: --force-config")
    logger.warning(f"--force-config: resuming step {step} with {listing}")
    save_run_config(run_dir, kind, config)


def _comparable(values: dict, kind: type) -> dict:
    """A configuration's values (saved, or `to_dict` of a new one) of dataclass ``kind`` in the form two can
    be compared in: read and written back, so defaults are filled in and other methods' sections dropped
    (runs saved them before each kept only its own), also in an evaluation run's ``encoder_config``."""
    if kind is PretrainConfig:
        return to_dict(read_config(values))
    values = to_dict(from_dict(kind, values))
    if isinstance(values.get("encoder_config"), dict):
        values["encoder_config"] = to_dict(read_config(values["encoder_config"]))
    return values


def load_config(run_dir: str | Path) -> PretrainConfig:
    """The resolved configuration a run saved."""
    if not config_path(run_dir).is_file():
        raise MimkitError(f"'{run_dir}' is not a mimkit run directory (no {CONFIG})")
    return read_config(saved_values(run_dir))


def latest_weights(run_dir: str | Path) -> Path:
    """The newest weights file of a run."""
    step = Checkpoints(run_dir).latest()
    if step is None:
        raise MimkitError(f"run '{run_dir}' has no checkpoint yet")
    return Checkpoints(run_dir).weights_path(step)


def best_weights(run_dir: str | Path) -> Path:
    """The best weights of a run that kept them (`Checkpoints.save_best`), else its newest."""
    best = Checkpoints(run_dir).best_path
    return best if best.exists() else latest_weights(run_dir)


def load_run(run_dir: str | Path) -> tuple[nn.Module, PretrainConfig]:
    """Rebuild a run's model from its configuration and load its newest weights (eval mode, CPU)."""
    config = load_config(run_dir)
    model = method_of(config.method).build_model(config)
    load_weights(model, latest_weights(run_dir))
    return model.eval(), config


def load_trained(run_dir: str | Path) -> tuple[nn.Module, object]:
    """A run's trained model (as its kind loads it: `mimkit.kinds.Kind.load`) in eval mode on CPU, and its
    configuration."""
    kind, config = read_run(run_dir)
    if kind.load is None:
        raise MimkitError(f"'{run_dir}' is a {kind.name} run, which keeps no model to load")
    return kind.load(config, Path(run_dir)), config


@dataclass
class Encoder:
    """An encoder to evaluate.

    Attributes:
        model: a timm `VisionTransformer` or `Beit` in eval mode (a fine-tuned one keeps its head, which
            the protocols replace or ignore).
        spec: the pretraining configuration that defines its architecture and its input (``data.img_size``,
            ``channels``, ``mean``, ``std``).
        origin: what was loaded: a weights file, or ``random init (seed S)``.
        run_dir: the run it comes from.
        kind: that run's kind (`mimkit.kinds`): ``pretraining``, ``finetune``, ...
        config: that run's configuration (a `PretrainConfig` for a pretraining run).
    """

    model: nn.Module
    spec: PretrainConfig
    origin: str
    run_dir: Path
    kind: str
    config: object


def _encoder_of(model: nn.Module, method: str) -> nn.Module:
    encoder = getattr(model, "encoder", None)
    try:
        check_encoder(encoder)
    except MimkitError as err:
        raise MimkitError(f"a {method} run has no ViT encoder to evaluate ({err})") from None
    return encoder.eval()


def random_encoder(spec: PretrainConfig, seed: int = 0) -> nn.Module:
    """The encoder of ``spec``'s method, freshly initialized as that method initializes it.

    The global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _encoder_of(method_of(spec.method).build_model(spec), spec.method)


def pretrained_encoder(config: PretrainConfig, run_dir: Path, weights: Path | None) -> tuple[nn.Module, Path]:
    """The encoder of a pretraining (or tokenizer) run and the weights it loaded: ``weights``, else the
    run's newest (`mimkit.kinds.Kind.encoder` of those kinds)."""
    model = method_of(config.method).build_model(config)
    weights = weights or latest_weights(run_dir)
    load_weights(model, weights)
    return _encoder_of(model, config.method), weights


def load_encoder(path: str | Path, init: str = "pretrained", seed: int = 0) -> Encoder:
    """The encoder of a run, on CPU in eval mode.

    Args:
        path: a run directory whose kind gives an encoder (`mimkit.kinds.Kind.encoder`: a pretraining run's
            newest checkpoint; a fine-tuning run's best checkpoint, else its newest, the EMA weights when it
            kept an EMA), or a ``.safetensors`` checkpoint inside a run's ``checkpoints/``.
        init: ``pretrained`` loads the weights; ``random`` gives the same architecture freshly initialized.
        seed: seed of the random initialization.
    """
    if init not in INITS:
        raise MimkitError(f"init {init!r} is not one of {', '.join(INITS)}")
    run_dir, weights = split_weights_path(path)
    kind, config = read_run(run_dir)
    if kind.encoder is None or kind.spec is None:
        raise MimkitError(f"'{run_dir}' is a {kind.name} run, which holds no encoder to evaluate; give a "
                          "pretraining or fine-tuning run")
    spec = kind.spec(config)
    if init == "random":
        return Encoder(random_encoder(spec, seed), spec, f"random init (seed {seed})", run_dir, kind.name,
                       config)
    encoder, weights = kind.encoder(config, run_dir, weights)
    return Encoder(encoder.eval(), spec, str(weights), run_dir, kind.name, config)
