"""Run directories: what a finished (or interrupted) run leaves, and how to get its model back. This module
owns the layout: no other module spells the names of the files below.

``<run>/`CONFIG``` is the resolved configuration; ``<run>/checkpoints/`` the weights (`Checkpoints`: the
newest steps, and the best weights of a run that evaluates); ``<run>/`LOCK``` is locked by the one process
that trains the run and holds its PID meanwhile; ``<run>/`DATA_FACTS``` is a pretraining run's start-up
summary (what it reads and how it runs); ``<run>/`FILE_LIST``` the files of a folder it trains on.
"""

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mimkit.config import PretrainConfig, differences, from_dict, read_yaml, save_config, to_dict
from mimkit.errors import MimkitError, explain_write_errors
from mimkit.eval.config import FinetuneConfig
from mimkit.models.classifier import FineTuned, build_classifier, check_encoder
from mimkit.registry import method_of, read_config
from mimkit.train.checkpoint import Checkpoints, load_weights

logger = logging.getLogger(__name__)

CONFIG = "config.yaml"
LOCK = "run.lock"
DATA_FACTS = "data.json"
FILE_LIST = "files.txt"
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


def config_path(run_dir: str | Path) -> Path:
    """Where a run keeps its resolved configuration."""
    return Path(run_dir) / CONFIG


def saved_values(run_dir: str | Path) -> dict:
    """The configuration a run saved, as plain values (no type checked); ``{}`` when it saved none."""
    path = config_path(run_dir)
    return read_yaml(path) if path.is_file() else {}


def file_list_path(run_dir: str | Path) -> Path:
    """Where a run keeps the files of a folder it trains on (`mimkit.data.filelist`)."""
    return Path(run_dir) / FILE_LIST


def save_data_facts(run_dir: str | Path, facts: dict) -> None:
    """Write a run's start-up summary (JSON-friendly ``facts``) atomically."""
    path = Path(run_dir) / DATA_FACTS
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(facts, indent=2) + "\n")
    os.replace(tmp, path)


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


@contextlib.contextmanager
def hold_run_dir(run_dir: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold the run directory's exclusive lock while the block runs, creating the directory if needed.

    A folder that is neither empty nor a run is refused (it is someone's files, not ours to write into),
    and so is a run that another process holds: its PID is in the message.

    Args:
        enabled: False on the processes of a distributed job other than the main one (it holds the lock
            for the job).
    """
    if not enabled:
        yield
        return
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise MimkitError(f"--out '{run_dir}' is a file; give a folder for the run")
    if run_dir.is_dir() and not is_run_dir(run_dir) and any(run_dir.iterdir()):
        held = ", ".join(sorted(p.name for p in run_dir.iterdir())[:3])
        raise MimkitError(f"--out '{run_dir}' is a folder that is not a mimkit run (it holds {held}, ...); "
                          "give a new or empty folder")
    with explain_write_errors(run_dir / LOCK):  # a read-only or full disk: one line, not a traceback
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
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
            yield
        finally:
            _HELD_LOCKS.discard(fd)
            os.ftruncate(fd, 0)
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


def keep_config(run_dir: str | Path, config, force: bool = False) -> None:
    """Save a new run's resolved configuration; check a trained run's against it instead of rewriting it.

    A run with a trained checkpoint (step > 0; an imported run's step 0 starts training afresh) resumes
    only under the configuration it was trained with, apart from `RESUMABLE_CHANGES` (its length and
    upkeep) and its method's own (`mimkit.registry.Method.resumable`). Other differences are refused, each
    listed, unless ``force``: then they are said and saved.
    """
    path = config_path(run_dir)
    step = Checkpoints(run_dir).latest()
    if not step or not path.is_file():
        save_config(config, path)
        return
    saved = _comparable(read_yaml(path), type(config))
    method = getattr(config, "method", None)  # a pretraining run's; evaluation runs have none
    resumable = RESUMABLE_CHANGES | set(method_of(method).resumable if method else ())
    changed = {k: v for k, v in differences(saved, _comparable(to_dict(config), type(config))).items()
               if k not in resumable}
    if not changed:
        return
    listing = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
    if not force:
        raise MimkitError(f"'{run_dir}' holds a run trained to step {step} with other settings ({listing}); "
                          "choose another --out, or resume it with the new settings: --force-config")
    logger.warning(f"--force-config: resuming step {step} with {listing}")
    save_config(config, path)


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
    path = config_path(run_dir)
    if not path.is_file():
        raise MimkitError(f"'{run_dir}' is not a mimkit run directory (no {CONFIG})")
    return read_config(read_yaml(path))


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
        finetune: the fine-tuning configuration when it comes from a fine-tuning run, else None.
    """

    model: nn.Module
    spec: PretrainConfig
    origin: str
    run_dir: Path
    finetune: FinetuneConfig | None = None


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


def finetuned_model(config: FinetuneConfig) -> FineTuned:
    """The (randomly initialized) module a fine-tuning run checkpoints, rebuilt from its configuration."""
    spec = read_config(config.encoder_config)
    classifier = build_classifier(random_encoder(spec), config.classifier.num_classes, config.classifier.pool,
                                  config.classifier.drop_path)
    return FineTuned(classifier, config.ema_decay)


def load_encoder(path: str | Path, init: str = "pretrained", seed: int = 0) -> Encoder:
    """The encoder of a run, on CPU in eval mode.

    Args:
        path: a pretraining run directory (newest checkpoint), a fine-tuning run directory (its best
            checkpoint, else its newest; the EMA weights when it kept an EMA), or a ``.safetensors``
            checkpoint inside a run's ``checkpoints/``.
        init: ``pretrained`` loads the weights; ``random`` gives the same architecture freshly initialized.
        seed: seed of the random initialization.
    """
    if init not in INITS:
        raise MimkitError(f"init {init!r} is not one of {', '.join(INITS)}")
    run_dir, weights = split_weights_path(path)
    values = saved_values(run_dir)
    if "encoder_config" in values:  # the training augmentation does not shape the model (and older runs
        values.pop("augment", None)  # name other fields: torchvision's rand_augment_ops, ...)
    finetune = from_dict(FinetuneConfig, values) if "encoder_config" in values else None
    spec = read_config(finetune.encoder_config if finetune else values)
    if init == "random":
        return Encoder(random_encoder(spec, seed), spec, f"random init (seed {seed})", run_dir, finetune)
    if finetune:
        model = finetuned_model(finetune)
        weights = weights or best_weights(run_dir)
        load_weights(model, weights)
        encoder = model.ema.module if finetune.ema_decay else model.classifier  # the weights "best" chose
    else:
        model = method_of(spec.method).build_model(spec)
        weights = weights or latest_weights(run_dir)
        load_weights(model, weights)
        encoder = _encoder_of(model, spec.method)
    return Encoder(encoder.eval(), spec, str(weights), run_dir, finetune)
