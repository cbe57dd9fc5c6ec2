"""Deterministic, resumable, shardable batches.

Every sample is addressed by its position in the run: epoch ``e`` visits a permutation of the source
seeded by ``(seed, e)``, and sample ``p`` of that epoch draws its augmentation and mask from a
generator seeded by ``(seed, e, p)``. So a run resumed at any step, or split across processes,
sees exactly the images, crops and masks that one uninterrupted process would.
"""

import contextlib
import ctypes
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from mimkit.errors import MimkitError

_SEED_STRIDE = 1_000_003
# The DataLoader re-raises a worker's exception with the worker's whole traceback as its message; the
# original one-line message is its last line.
_WORKER_MESSAGE = re.compile(r"^mimkit\.errors\.MimkitError: (.+)$", re.MULTILINE)
_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)
# what a view that can be cut has (`mimkit.data.transforms.CropView`): crop decoding and uint8 hand-over
_VIEW_STAGES = ("draw_box", "from_crop", "from_image", "on_device")


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The RNG seed of one sample of one epoch."""
    return (seed * _SEED_STRIDE + epoch) * _SEED_STRIDE + position


class SeededViews(Dataset):
    """Applies a method's view to a source's items, with the torch RNG seeded per sample.

    A source of ``(image, label int)`` gets ``view(image)`` plus ``"label"``; a source of ``(image, mask
    tensor)`` (segmentation) gets a joint view, ``view(image, mask)``, whose dict is the item as it is.
    Items are addressed by ``(index, seed)`` pairs from `EpochBatches`.

    Two shortcuts give the same pixels for less work, when the view is cut into stages
    (`mimkit.data.transforms.CropView`, `mimkit.eval.augment.FinetuneView`):

    - *crop decoding*: from a source of encoded images (`EncodedImageSource`), the crop box is drawn from
      the file's header and only the crop is decoded (`mimkit.data.crop_decode`);
    - *uint8 until the device* (``uint8=True``): items carry the uint8 crop, and the view's ``on_device``
      converts and normalizes the whole batch where it trains (`build_loader` with a device): a quarter of
      the bytes through the workers' queues and the pinned-memory copy. (A view whose ``on_device`` draws,
      the fine-tuning view's random erasing, then draws from the training process's stream instead of the
      sample's.)
    """

    def __init__(self, source: Dataset, view: Callable[..., dict], uint8: bool = False):
        self.source, self.view = source, view
        self.staged = all(hasattr(view, stage) for stage in _VIEW_STAGES)
        self.encoded, self.positions = _encoded_source(source)
        self.crop_first = self.staged and self.encoded is not None
        self.uint8 = uint8 and self.staged

    def handing_over_uint8(self) -> "SeededViews | None":
        """The same items with uint8 images, to be finished by ``view.on_device``; None when the view cannot
        be cut so."""
        return SeededViews(self.source, self.view, uint8=True) if self.staged else None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        rng = torch.default_generator  # seeded directly: fork_rng/manual_seed cost ~60x more per sample
        saved = rng.get_state()
        try:
            if self.crop_first:
                out, target = self._crop_first(index, seed, rng)
            else:
                out, target = self._decoded_first(index, seed, rng)
            if self.staged and not self.uint8:  # under the sample's seed: it may draw
                out = self.view.on_device(out)
        finally:
            rng.set_state(saved)
        if isinstance(target, torch.Tensor):  # a mask: transformed with the image, not attached
            return out
        return out | {"label": torch.tensor(target)}

    def _decoded_first(self, index: int, seed: int, rng: torch.Generator) -> tuple[dict, object]:
        image, target = self.source[index]
        rng.manual_seed(seed)
        if isinstance(target, torch.Tensor):
            return self.view(image, target), target
        return (self.view.from_image(image) if self.staged else self.view(image)), target

    def _crop_first(self, index: int, seed: int, rng: torch.Generator) -> tuple[dict, int]:
        def draw_box(height: int, width: int) -> tuple[int, int, int, int]:
            rng.manual_seed(seed)  # every try (a bad file's stand-in too) draws from the sample's seed
            return self.view.draw_box(height, width)

        crop, label = self.encoded.first_readable(
            self.positions[index], lambda i: self.encoded.load_crop(i, draw_box, self.view.size))
        return self.view.from_crop(crop), label


def _encoded_source(source: Dataset) -> tuple[Dataset | None, Sequence[int]]:
    """The source of encoded images under ``source`` (itself, or a `Subset`'s dataset, as a fine-tuning
    run's label subset is) and the position of each of ``source``'s items in it; ``(None, ...)`` when
    there is none (decoded images, or a joint image-and-mask source). A bad file's stand-in is then
    found as the `Subset` finds it: the next readable image of the dataset under it."""
    if isinstance(source, Subset) and hasattr(source.dataset, "load_crop"):
        return source.dataset, source.indices
    return (source, range(len(source))) if hasattr(source, "load_crop") else (None, range(0))


class EpochBatches:
    """Batch sampler over ``(index, seed)`` pairs that can start mid-epoch and shard across ranks.

    The global micro-batch (``batch_size × world_size`` samples) is the same whatever the number of
    processes; rank ``r`` takes slice ``r`` of it. The last incomplete global batch is dropped.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = num_samples // (batch_size * world_size)
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, batch: int) -> None:
        """Make the next iteration yield epoch ``epoch`` from its micro-batch ``batch`` on."""
        self.epoch, self.start = epoch, batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(
            sample_seed(self.seed, self.epoch, 0)))
        global_batch = self.batch_size * self.world_size
        for b in range(self.start, self.batches_per_epoch):
            first = b * global_batch + self.rank * self.batch_size
            yield [(int(order[p]), sample_seed(self.seed, self.epoch, p + 1))
                   for p in range(first, first + self.batch_size)]


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux's parent-death signal), however the
    parent dies (``kill -9`` included); elsewhere nothing is set. A parent already gone ends it now."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the signal was set: nobody would send it
        os._exit(1)


def leave_signals_to_the_trainer(worker_id: int, trainer: int) -> None:
    """Data workers ignore Ctrl-C and SIGTERM, and die with the trainer. A terminal, Slurm or ``kill --
    -PGID`` signal every process of the job: a worker killed by it would make the DataLoader raise in the
    trainer before its checkpoint is saved; ignoring it, the trainer finishes its step, saves, and shuts the
    workers down itself. A trainer killed outright (``kill -9``, the OOM killer) takes its workers with it
    (`die_with_parent`): none is left holding memory or the run's lock.

    Args:
        worker_id: the DataLoader's number for the worker.
        trainer: the PID of the process that starts the workers.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(trainer)


def _worker_init() -> Callable[[int], None]:
    """The workers' start-up, bound to this process as their trainer."""
    return partial(leave_signals_to_the_trainer, trainer=os.getpid())


class _DeviceLoader(DataLoader):
    """A DataLoader whose batches are moved to ``device`` and finished there by ``finish`` (the view's
    ``on_device``: float conversion and normalization), in the training process."""

    def __init__(self, dataset: Dataset, device: torch.device, finish: Callable[[dict], dict], **kwargs):
        self.device, self.finish = device, finish
        super().__init__(dataset, **kwargs)

    def __iter__(self) -> Iterator[dict]:
        for batch in super().__iter__():
            yield self.finish({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})


def build_loader(dataset: SeededViews, batches: EpochBatches, num_workers: int = 0,
                 device: torch.device | None = None) -> DataLoader:
    """A DataLoader over `SeededViews` driven by `EpochBatches`.

    With ``device``, a view that can be cut (`SeededViews.handing_over_uint8`) has its workers hand over
    uint8 images, and its batches arrive on ``device`` already normalized.
    """
    # A private generator for the workers' base seed: drawing it from the global RNG at each new epoch
    # would shift the stream that dropout and drop path use, and a resumed run would drift.
    options = dict(batch_sampler=batches, num_workers=num_workers, generator=torch.Generator(),
                   persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                   worker_init_fn=_worker_init())
    uint8 = dataset.handing_over_uint8() if device is not None else None
    if uint8 is None:
        return DataLoader(dataset, **options)
    return _DeviceLoader(uint8, torch.device(device), dataset.view.on_device, **options)


@contextlib.contextmanager
def workers_end_with_errors(loader: DataLoader):
    """Let an error raised while iterating ``loader`` end the run: shut its workers down, and give a
    worker's `MimkitError` (e.g. an unreadable image) back its own one-line message.

    The workers ignore SIGTERM (`leave_signals_to_the_trainer`); left alive to the interpreter's exit,
    they would be sent it in vain and waited for forever.
    """
    try:
        yield
    except BaseException as err:
        _shut_down(loader._iterator)  # persistent workers live in the loader's iterator
        found = _WORKER_MESSAGE.findall(str(err)) if isinstance(err, MimkitError) else []
        if found:
            raise MimkitError(found[-1]) from None
        raise


def _shut_down(batches: Iterator | None) -> None:
    """End a DataLoader iterator's workers now (torch has no public way to end them early)."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown:
        shutdown()


@contextlib.contextmanager
def evaluation_batches(loader: DataLoader) -> Iterator[Iterator]:
    """The batches of an evaluation loader (`eval_loader`), its workers shut down however the loop ends: at
    its end, on an error (a worker's `MimkitError` as its own line, as `workers_end_with_errors`), or on a
    stop request. An iterator left to the garbage collector may outlive the command, and its workers, which
    ignore SIGTERM, would then be waited for forever at the interpreter's exit."""
    batches = iter(loader)
    try:
        with workers_end_with_errors(loader):
            yield batches
    finally:
        _shut_down(batches)


def eval_loader(source: Dataset, view, batch_size: int = 256, num_workers: int = 0) -> DataLoader:
    """Batches ``{"image", "label"}`` of every item of ``source``, in order, through a deterministic view."""
    items = [(i, 0) for i in range(len(source))]  # (index, seed): the view is deterministic
    return DataLoader(SeededViews(source, view), batch_size, sampler=items, num_workers=num_workers,
                      worker_init_fn=_worker_init())
