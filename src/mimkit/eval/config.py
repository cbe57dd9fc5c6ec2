"""Typed configuration of a fine-tuning run (``recipes/finetune_*.yaml``), of a segmentation run
(``recipes/segment_*.yaml``) and of the two probes on frozen features (``mimkit linprobe`` / ``knn``: their
flags).

The data, optimizer and training sections reuse the pretraining dataclasses; a fine-tuning run saves
this resolved configuration (`mimkit.runs.CONFIG`), including the configuration that built its encoder
(``encoder_config``), so a fine-tuned run can be rebuilt, evaluated or fine-tuned again on its own.
"""

from dataclasses import dataclass, field

from mimkit.config import DataConfig, OptimConfig, TrainConfig, at_least, check_range
from mimkit.errors import MimkitError


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

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.layer_decay <= 1:
            raise MimkitError(f"config 'optim.layer_decay' must lie in (0, 1], got {self.layer_decay}")


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

    def __post_init__(self):
        at_least(1, "", eval_every=self.eval_every, eval_batch_size=self.eval_batch_size)

@dataclass
class SegConfig:
    head: str = "upernet"  # upernet (feature pyramid, UperNet, auxiliary FCN) | linear (BatchNorm, 1x1 conv)
    init: str = "pretrained"  # pretrained | random (the same architecture from scratch)
    freeze_encoder: bool = False  # train the head alone on fixed features (e.g. a frozen random encoder)
    num_classes: int | None = None  # None: the data's (a generic folder without classes.txt needs it)
    class_names: list[str] = field(default_factory=list)  # by class id; empty: classes.txt, the layout's
    classes: list[str] = field(default_factory=list)  # filled from the data when the run starts
    crop_size: int | None = None  # training crop and model input; None: the encoder's pretraining size
    scale: tuple[int, int] | None = None  # base (long, short) side that random rescale scales; None: the crop
    ratio_range: tuple[float, float] = (0.5, 2.0)  # random rescale of the base scale
    cat_max_ratio: float = 0.75  # redraw a crop while one class covers more than this share of it
    photometric: bool = True  # photometric distortion (brightness, contrast, saturation, hue)
    blocks: list[int] | None = None  # 0-based blocks UperNet reads; None: 3, 5, 7, 11 of 12, scaled to depth
    channels: int | None = None  # UperNet's width; None: the encoder's
    aux_channels: int = 256  # the auxiliary FCN head's width
    aux_weight: float = 0.4  # weight of the auxiliary head's loss
    drop_path: float = 0.1  # stochastic depth of the encoder's last block (rising linearly from 0)
    rel_pos_bias: bool = False  # a ViT encoder gains zero-initialised relative position biases (mmseg's MAE)
    eval_mode: str = "whole"  # whole | slide
    eval_stride: int | None = None  # sliding window stride; None: the crop (no overlap)
    eval_flip: bool = False  # average the logits with those of the flipped image
    eval_scale: tuple[int, int] | None = None  # (long, short) side evaluated images fit in; None: as they are
    eval_scales: list[float] = field(default_factory=list)  # multi-scale test: ratios of eval_scale whose
    # logits are averaged (the papers' _ms: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] with eval_flip); empty: 1.0

    def __post_init__(self):
        at_least(1, "seg", num_classes=self.num_classes, crop_size=self.crop_size, channels=self.channels,
                 aux_channels=self.aux_channels, eval_stride=self.eval_stride)
        for ratio in self.eval_scales:
            check_range("config 'seg.eval_scales'", ratio, 0, 8, low_open=True)
        if self.num_classes is not None and self.class_names and len(self.class_names) != self.num_classes:
            raise MimkitError(f"seg.num_classes={self.num_classes} but seg.class_names names "
                              f"{len(self.class_names)}; give one of them")


@dataclass
class SegLabelsConfig:
    fraction: float = 1.0  # seeded subset of the training images (and their masks), e.g. 0.1
    seed: int = 0  # keep it fixed across compared encoders: the same images at the same fraction


@dataclass
class SegmentOptimConfig(OptimConfig):
    base_lr: float = 6.4e-3  # lr = base_lr x global batch / 256 (4e-4 at batch 16)
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 1.0  # linear warmup, then polynomial decay (power 1.0) to min_lr
    layer_decay: float = 0.65  # block i of n gets lr x layer_decay ** (n - i); the heads get lr


@dataclass
class SegmentConfig:
    encoder: str = ""  # the run directory or checkpoint the encoder comes from
    encoder_config: dict = field(default_factory=dict)  # that encoder's pretraining configuration (resolved)
    data: DataConfig = field(default_factory=lambda: DataConfig(source="fmnist-scenes"))
    seg: SegConfig = field(default_factory=SegConfig)
    labels: SegLabelsConfig = field(default_factory=SegLabelsConfig)
    optim: SegmentOptimConfig = field(default_factory=SegmentOptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, batch_size=16))
    eval_every: int | None = None  # optimizer steps between evaluations (and at the end); None: every epoch
    eval_batch_size: int = 1  # images of different sizes (ADE20K, VOC) are evaluated one at a time
    eval_images: int | None = None  # score the first N validation images only (quick runs); None: all

    def __post_init__(self):
        at_least(1, "", eval_every=self.eval_every, eval_batch_size=self.eval_batch_size,
                 eval_images=self.eval_images)



@dataclass
class ProbeConfig:
    """What the probes on frozen features share (``mimkit linprobe`` and ``mimkit knn``)."""

    encoder: str = ""  # the run directory or checkpoint the encoder comes from
    init: str = "pretrained"  # pretrained | random (the same architecture from scratch)
    data: str = "fashion-mnist"  # labelled data (`mimkit.data.sources.build_source`)
    root: str | None = None  # the data's root folder, where it needs one
    pool: str = "cls"  # cls: the [CLS] token | avg: mean of the patch tokens
    label_fraction: float = 1.0  # stratified, seeded subset of the training labels
    val_fraction: float = 0.0  # hold out this part of the train split for validation
    seed: int = 0  # seed of the label subset, the hold-out, the probe and the random init
    cache_dir: str | None = None  # where features are cached; None: beside the encoder's run
    num_workers: int = 0  # data loader processes for the feature pass
    layer: int | str | None = None  # block N's features (1-based), "all" (one probe per block), None: final

    def __post_init__(self):
        check_range("--num-workers", self.num_workers, 0)


@dataclass
class LinprobeConfig(ProbeConfig):
    epochs: int = 100
    batch_size: int = 256
    base_lr: float = 0.1  # scaled by batch / 256
    optimizer: str = "sgd"  # sgd | lars
    weight_decay: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_range("--epochs", self.epochs, 1)
        check_range("--batch-size", self.batch_size, 1)
        check_range("--lr", self.base_lr, 0, low_open=True)
        check_range("--weight-decay", self.weight_decay, 0)


@dataclass
class KnnConfig(ProbeConfig):
    k: int = 20  # neighbours
    temperature: float = 0.07  # of the neighbours' similarity weights

    def __post_init__(self):
        super().__post_init__()
        check_range("--k", self.k, 1)
        check_range("--temperature", self.temperature, 0, low_open=True)
