"""VQ-KD tokenizer training (BEiT v2's visual vocabulary), driven by the same loop as pretraining.

The run directory is the tokenizer: its configuration rebuilds the VQ-KD (the teacher's width is
written into it, ``vqkd.teacher_dim``, so the teacher is not needed afterwards) and its newest checkpoint
holds the weights and the codebook; ``--tokenizer runs/vqkd`` reads whatever it reached. The frozen
teacher runs inside the loss. Every step logs the batch's codebook usage and perplexity; every epoch end
(and the last step) tokenizes ``vqkd.eval_images`` held-out images and logs ``val_usage`` (share of the
codes they use), ``val_perplexity`` and ``val_cosine`` (similarity of the decoded features to the
teacher's).

- BEiT v2: Peng et al., 2022, arXiv:2208.06366
"""

from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Subset

import mimkit.interop.vqkd as layouts
from mimkit.config import (
    DataConfig,
    PretrainConfig,
    at_least,
    check_crop_scale,
    check_model_kwargs,
    check_range,
    config_key,
)
from mimkit.data.loader import eval_loader, evaluation_batches
from mimkit.data.sources import build_source
from mimkit.data.transforms import crop_view, eval_view
from mimkit.errors import MimkitError
from mimkit.models.vit import ENCODER_ARCHS, check_patch_grid
from mimkit.registry import Evaluate, Images, Import, LossFn, Method, View, register
from mimkit.runs import config_path, load_config, load_encoder
from mimkit.tokenizers.dvae import codebook_stats
from mimkit.tokenizers.teachers import SPEC_FORMS, Teacher, load_teacher
from mimkit.tokenizers.vqkd import VQKD, create_vqkd
from mimkit.train.checkpoint_files import Checkpoints, load_weights
from mimkit.viz import vqkd_tokens


@dataclass
class VQKDConfig:
    """A VQ-KD tokenizer run's own settings (``config.settings``; ``vqkd:`` in YAML)."""

    teacher: str | None = None  # a mimkit run or checkpoint, timm:NAME:FILE, or hf:DIR (CLIP, DINOv2)
    teacher_dim: int | None = None  # None: the teacher's feature width, filled in when the run starts
    vocab_size: int = 8192
    code_dim: int = 32
    decoder_depth: int = 3  # decoder blocks, as wide as the encoder (model.name)
    decay: float = 0.99  # EMA of the codebook
    commitment: float = 1.0  # beta of beta * mse(l2(z), sg(code)), averaged over dims (released: 1.0)
    kmeans_iters: int = 10  # k-means rounds on the first batch; 0: random unit codes
    dead_after: int | None = 100  # restart codes no patch chose for this many steps; null: never
    crop_scale: tuple[float, float] = (0.08, 1.0)
    eval_images: int = 1000  # held-out images tokenized at each epoch end: usage, perplexity, cosine

    def __post_init__(self):
        at_least(1, "vqkd", teacher_dim=self.teacher_dim, vocab_size=self.vocab_size, code_dim=self.code_dim,
                 decoder_depth=self.decoder_depth, dead_after=self.dead_after)
        at_least(0, "vqkd", commitment=self.commitment, kmeans_iters=self.kmeans_iters,
                 eval_images=self.eval_images)
        check_range(config_key("vqkd", "decay"), self.decay, 0, 1, high_open=True)
        check_crop_scale("vqkd", self.crop_scale)


def run_encoder(path: Path) -> tuple[nn.Module, DataConfig]:
    """A mimkit run's encoder (`mimkit.runs.load_encoder`) and the data it was trained on, as a teacher."""
    encoder = load_encoder(path)
    return encoder.model, encoder.spec.data


@lru_cache(maxsize=1)
def _load_teacher(spec: str, grid: int, mean: tuple, std: tuple) -> Teacher:
    """One teacher per process, shared by `resolve_config`, `build_task` and `build_evaluate`. Building it
    draws nothing from the run's random stream: a run's weights are the same whether its teacher was
    loaded here or came from the cache (a second run in the same process)."""
    with torch.random.fork_rng(devices=[]):
        return load_teacher(spec, grid, mean, std, run_encoder)


def teacher_of(config: PretrainConfig) -> Teacher:
    """The frozen teacher of a configuration whose settings name one in ``teacher`` (a method with
    `mimkit.registry.Method.teacher`: VQ-KD, MaskDistill), on the CPU (loaded once per process)."""
    if not config.settings.teacher:
        raise MimkitError(f"{config.method} training needs a teacher: --teacher {SPEC_FORMS}; e.g. an MAE "
                          "run, which needs no labels (mimkit pretrain mae --data ... --out runs/mae, then "
                          "--teacher runs/mae)")
    grid = check_patch_grid(config.data.img_size, config.model.patch_size)
    return _load_teacher(config.settings.teacher, grid, tuple(config.data.mean), tuple(config.data.std))


def resolve_config(config: PretrainConfig) -> PretrainConfig:
    """Write the teacher's feature width into ``vqkd.teacher_dim``; refuse a resumed run's other teacher."""
    dim = teacher_of(config).dim
    if config.settings.teacher_dim not in (None, dim):
        raise MimkitError(f"teacher '{config.settings.teacher}' gives {dim}-d features; this run was trained "
                          f"on a {config.settings.teacher_dim}-d teacher")
    return replace(config, settings=replace(config.settings, teacher_dim=dim))


def build_model(config: PretrainConfig) -> VQKD:
    v = config.settings
    if v.teacher_dim is None:
        raise MimkitError("vqkd.teacher_dim is unset: the run's teacher fills it in when training starts")
    check_model_kwargs(VQKD, config.model.kwargs)
    return create_vqkd(config.model.name, img_size=config.data.img_size, patch_size=config.model.patch_size,
                       in_chans=config.data.channels, teacher_dim=v.teacher_dim, vocab_size=v.vocab_size,
                       code_dim=v.code_dim, decoder_depth=v.decoder_depth, decay=v.decay,
                       commitment=v.commitment, kmeans_iters=v.kmeans_iters, dead_after=v.dead_after,
                       **config.model.kwargs)


def build_task(config: PretrainConfig, model: VQKD) -> tuple[View, LossFn]:
    teacher = teacher_of(config).to(next(model.parameters()).device)
    view = crop_view(config.data.img_size, config.data.mean, config.data.std, config.settings.crop_scale)

    def loss_fn(model: VQKD, batch: dict):
        loss, metrics, _ = model(batch["image"], teacher(batch["image"]))
        return loss, metrics

    return view, loss_fn


def build_evaluate(config: PretrainConfig, model: VQKD) -> Evaluate:
    """``evaluate(model) -> {"val_usage", "val_perplexity", "val_cosine"}`` on held-out images: the
    ``val`` split when the data has one (Fashion-MNIST's test images), else the train split; a fixed,
    seeded subset of ``vqkd.eval_images`` of them. No labels are read."""
    data = config.data
    try:
        source = build_source(data.source, split="val", root=data.root, channels=data.channels)
    except MimkitError:  # folders without a held-out split
        source = build_source(data.source, split="train", root=data.root, channels=data.channels)
    shuffled = torch.randperm(len(source), generator=torch.Generator().manual_seed(0))
    picks = shuffled[:config.settings.eval_images]
    loader = eval_loader(Subset(source, picks.tolist()), eval_view(data.img_size, data.mean, data.std),
                         batch_size=config.train.batch_size)
    device = next(model.parameters()).device
    teacher = teacher_of(config).to(device)

    @torch.no_grad()
    def evaluate(model: VQKD) -> dict[str, float]:
        was_training = model.training
        model.eval()  # the codebook stays as it is
        ids, cosine = [], 0.0
        with evaluation_batches(loader) as batches:
            for batch in batches:
                images = batch["image"].to(device)
                _, metrics, batch_ids = model(images, teacher(images))
                ids.append(batch_ids)
                cosine += metrics["cosine"].item() * len(images)
        model.train(was_training)
        stats = codebook_stats(torch.cat(ids), model.vocab_size)
        return {"val_usage": stats["usage"].item(), "val_perplexity": stats["perplexity"].item(),
                "val_cosine": cosine / len(picks)}

    return evaluate


def tokenizer_config(path: str | Path) -> PretrainConfig:
    """The configuration of a VQ-KD tokenizer run (its ``data`` section: the images and normalization it
    expects), without loading its weights.

    Args:
        path: a run directory of ``mimkit tokenizer train vqkd``.
    """
    path = Path(path)
    if not config_path(path).is_file():
        raise MimkitError(f"tokenizer '{path}' is not a run directory; train one with: "
                          f"mimkit tokenizer train vqkd --teacher runs/mae --data ... --out {path}")
    config = load_config(path)
    if config.method != "vqkd":
        raise MimkitError(f"'{path}' holds a {config.method} run, not a VQ-KD tokenizer")
    return config


def load_vqkd_tokenizer(path: str | Path) -> tuple[VQKD, PretrainConfig]:
    """A trained VQ-KD tokenizer, frozen and in eval mode on the CPU, and its run's configuration.

    Args:
        path: a run directory of ``mimkit tokenizer train vqkd``; its newest checkpoint is used.
    """
    config = tokenizer_config(path)
    step = Checkpoints(path).latest()
    if step is None:
        raise MimkitError(f"tokenizer run '{path}' has no checkpoint yet")
    model = build_model(config)
    load_weights(model, Checkpoints(path).weights_path(step))
    return model.eval().requires_grad_(False), config


def pictures(model: VQKD, config: PretrainConfig, images: Images, generator: torch.Generator) -> dict:
    """Images beside their token maps (a VQ-KD decodes to teacher features, not pixels)."""
    data = config.data
    return vqkd_tokens(model, images(data.img_size, data.mean, data.std), data.mean, data.std)


IMPORT = Import(
    arch=layouts.vqkd_arch, model_names=ENCODER_ARCHS, model_kwargs=("embed_dim", "depth", "num_heads"),
    section_fields=("teacher_dim", "vocab_size", "code_dim", "decoder_depth"),
    guesses=layouts.vqkd_head_guesses, optional_parts=layouts.VQKD_OPTIONAL_PARTS,
    reference=layouts.read_official_vqkd,
)

register(Method("vqkd", "tokenizer", build_model, build_task, settings=VQKDConfig, teacher=True,
                resolve_config=resolve_config, build_evaluate=build_evaluate, pictures=pictures,
                importing=IMPORT, resumable=("vqkd.eval_images",)))
