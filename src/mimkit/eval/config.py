"""Typed configuration of a fine-tuning run (``recipes/finetune_*.yaml``).

The data, optimizer and training sections reuse the pretraining dataclasses; a fine-tuning run saves
this resolved configuration as ``config.yaml``, including the configuration that built its encoder
(``encoder_config``), so a fine-tuned run can be rebuilt, evaluated or fine-tuned again on its own.
"""

from dataclasses import dataclass, field

from mimkit.config import DataConfig, OptimConfig, TrainConfig


@dataclass
class ClassifierConfig:
    pool: str = "avg"  # avg: mean of the patch tokens + norm (MAE, BEiT) | cls: the [CLS] token
    drop_path: float = 0.1  # stochastic depth, rising linearly to this rate at the last block
    init: str = "pretrained"  # pretrained | random (the same architecture from scratch)
    num_classes: int | None = None  # None: the data's


@dataclass
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm's RandAugment policy (MAE, BEiT); null: off
    reprob: float = 0.25  # random erasing probability
    remode: str = "pixel"  # what erasing paints: pixel (per-pixel noise, the papers') | rand | const (zeros)
    mixup: float = 0.8  # Beta(alpha, alpha) of mixup; 0 turns it off
    cutmix: float = 1.0  # Beta(alpha, alpha) of cutmix; 0 turns it off
    mixup_switch_prob: float = 0.5  # both on: the chance of cutmix rather than mixup for a batch
    mixup_prob: float = 1.0  # the chance a batch is mixed at all
    label_smoothing: float = 0.1


@dataclass
class LabelsConfig:
    fraction: float = 1.0  # stratified subset of the training labels, e.g. 0.01
    val_fraction: float = 0.0  # hold out this part of the train split for validation (0: the data's own)
    seed: int = 0  # seed of the subset and the hold-out; keep it fixed across compared methods


@dataclass
class FinetuneOptimConfig(OptimConfig):
    base_lr: float = 5e-4  # lr = base_lr x global batch / 256
    min_lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 5.0
    layer_decay: float = 0.75  # block i of n gets lr x layer_decay ** (n + 1 - (i + 1)); 1.0 turns it off


@dataclass
class FinetuneConfig:
    encoder: str = ""  # the run directory or checkpoint the encoder comes from
    encoder_config: dict = field(default_factory=dict)  # that encoder's pretraining configuration (resolved)
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=100))
    ema_decay: float | None = None  # model EMA of the weights, evaluated beside them; None turns it off
    eval_every: int = 1  # epochs between evaluations on the validation split (and at the end)
    eval_batch_size: int = 256
