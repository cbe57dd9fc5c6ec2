"""Where an evaluated encoder comes from: a pretraining run (its newest weights, or one checkpoint
file), a fine-tuning run (its best weights), or a random initialization of the same architecture —
the baseline every comparison needs."""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mimkit.config import PretrainConfig, from_dict
from mimkit.errors import MimkitError
from mimkit.eval.classifier import FineTuned, build_classifier, check_encoder
from mimkit.eval.config import FinetuneConfig
from mimkit.registry import method_of
from mimkit.runs import best_weights, latest_weights, saved_values, split_weights_path
from mimkit.train.checkpoint import load_weights

INITS = ("pretrained", "random")


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
    spec = from_dict(PretrainConfig, config.encoder_config)
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
    spec = from_dict(PretrainConfig, finetune.encoder_config if finetune else values)
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

