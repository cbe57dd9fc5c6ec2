"""Every validated setting at its edges: the value at each limit is taken, the one just past it is refused
with a one-line error that names the setting.

The checks' own tests mostly tried a value far outside (a beta of 1.5, a fraction of -1), which a check
with ``<`` where ``<=`` belongs passes as well; the fresh planted sets found such off-by-one edges more
than once (an Adam beta of 1, a ``min_block`` equal to the masked count, a label smoothing of 1). Floats
step to the next representable number past the limit (`math.nextafter`), integers by one.
"""

import math
import re
from types import SimpleNamespace

import pytest
import torch

from mimkit.cli import main
from mimkit.config import DataConfig, OptimConfig, TrainConfig
from mimkit.data.seg_transforms import SegTrainView
from mimkit.errors import MimkitError
from mimkit.eval.augment import MixTargets, timm_train_transform
from mimkit.eval.config import (
    FinetuneConfig,
    FinetuneOptimConfig,
    KnnConfig,
    LinprobeConfig,
    ProbeConfig,
    SegConfig,
    SegmentConfig,
)
from mimkit.eval.knn import knn_scores
from mimkit.eval.linprobe import train_linear_probe
from mimkit.eval.subsets import label_subset, make_splits
from mimkit.masking import block_mask, checked_block_count, count_for_ratio
from mimkit.methods.beit import BEiTConfig
from mimkit.methods.beitv2 import BEiTv2Config
from mimkit.methods.cae import CAEConfig
from mimkit.methods.data2vec import Data2VecConfig
from mimkit.methods.dvae import DVAEConfig
from mimkit.methods.maskdistill import MaskDistillConfig
from mimkit.methods.maskfeat import MaskFeatConfig
from mimkit.methods.simmim import SimMIMConfig
from mimkit.methods.vqkd import VQKDConfig
from mimkit.models.mae import num_kept
from mimkit.models.simmim import num_masked_cells
from mimkit.tokenizers.quantizer import NormEMAQuantizer
from mimkit.train.checkpoint_files import Checkpoints
from mimkit.train.schedule import epoch_steps

TINY = math.nextafter(0.0, 1.0)  # the smallest positive float
BELOW_ZERO = math.nextafter(0.0, -1.0)
BELOW_ONE = math.nextafter(1.0, 0.0)
ABOVE_ONE = math.nextafter(1.0, 2.0)

# (taken, refused) at each kind of limit
AT_LEAST_1 = ((1,), (0,))
AT_LEAST_0 = ((0,), (-1,))
NON_NEGATIVE = ((0.0,), (BELOW_ZERO,))
POSITIVE = ((TINY,), (0.0,))
OPEN_UNIT = ((TINY, BELOW_ONE), (0.0, 1.0))  # (0, 1)
UNIT = ((0.0, 1.0), (BELOW_ZERO, ABOVE_ONE))  # [0, 1]
UNIT_BELOW_ONE = ((0.0, BELOW_ONE), (BELOW_ZERO, 1.0))  # [0, 1)
UNIT_ABOVE_ZERO = ((TINY, 1.0), (0.0, ABOVE_ONE))  # (0, 1]


def setting(cls, name, **others):
    """``value -> cls(name=value, **others)``."""
    return lambda value: cls(**{name: value}, **others)


DATACLASS_SETTINGS = [
    (DataConfig, "img_size", AT_LEAST_1), (DataConfig, "channels", AT_LEAST_1),
    (DataConfig, "num_workers", AT_LEAST_0), (DataConfig, "max_bad_images", AT_LEAST_0),
    (OptimConfig, "base_lr", POSITIVE), (OptimConfig, "min_lr", NON_NEGATIVE),
    (OptimConfig, "weight_decay", NON_NEGATIVE), (OptimConfig, "warmup_epochs", NON_NEGATIVE),
    (OptimConfig, "clip_grad", POSITIVE),
    *[(TrainConfig, name, AT_LEAST_1) for name in
      ("epochs", "max_steps", "batch_size", "accum_steps", "log_every", "checkpoint_every", "keep_last")],
    (FinetuneOptimConfig, "layer_decay", UNIT_ABOVE_ZERO),
    (FinetuneConfig, "eval_every", AT_LEAST_1), (FinetuneConfig, "eval_batch_size", AT_LEAST_1),
    *[(SegConfig, name, AT_LEAST_1) for name in
      ("num_classes", "crop_size", "channels", "aux_channels", "eval_stride")],
    *[(SegmentConfig, name, AT_LEAST_1) for name in ("eval_every", "eval_batch_size", "eval_images")],
    (ProbeConfig, "num_workers", AT_LEAST_0),
    (LinprobeConfig, "epochs", AT_LEAST_1), (LinprobeConfig, "batch_size", AT_LEAST_1),
    (LinprobeConfig, "base_lr", POSITIVE), (LinprobeConfig, "weight_decay", NON_NEGATIVE),
    (KnnConfig, "k", AT_LEAST_1), (KnnConfig, "temperature", POSITIVE),
    (CAEConfig, "mask_ratio", OPEN_UNIT), (CAEConfig, "align_weight", NON_NEGATIVE),
    (CAEConfig, "color_jitter", NON_NEGATIVE), (CAEConfig, "min_block", AT_LEAST_1),
    (CAEConfig, "teacher_dim", AT_LEAST_1),
    (Data2VecConfig, "mask_ratio", OPEN_UNIT), (Data2VecConfig, "min_block", AT_LEAST_1),
    (Data2VecConfig, "top_k", AT_LEAST_1), (Data2VecConfig, "loss_beta", NON_NEGATIVE),
    (Data2VecConfig, "teacher_decay_start", UNIT), (Data2VecConfig, "teacher_decay_end", UNIT),
    (Data2VecConfig, "teacher_anneal_steps", AT_LEAST_0), (Data2VecConfig, "color_jitter", NON_NEGATIVE),
    (MaskDistillConfig, "mask_ratio", OPEN_UNIT), (MaskDistillConfig, "smooth_l1_beta", NON_NEGATIVE),
    (MaskDistillConfig, "min_block", AT_LEAST_1), (MaskDistillConfig, "color_jitter", NON_NEGATIVE),
    (MaskDistillConfig, "teacher_dim", AT_LEAST_1),
    (MaskFeatConfig, "mask_ratio", OPEN_UNIT), (MaskFeatConfig, "hog_bins", AT_LEAST_1),
    (MaskFeatConfig, "hog_cell", AT_LEAST_1), (MaskFeatConfig, "hog_window", AT_LEAST_0),
    (MaskFeatConfig, "min_block", AT_LEAST_1),
    *[(cls, name, edges) for cls in (BEiTConfig, BEiTv2Config) for name, edges in
      (("mask_ratio", OPEN_UNIT), ("min_block", AT_LEAST_1), ("tokenizer_size", AT_LEAST_1),
       ("color_jitter", NON_NEGATIVE))],
    *[(VQKDConfig, name, AT_LEAST_1) for name in
      ("teacher_dim", "vocab_size", "code_dim", "decoder_depth", "dead_after")],
    *[(VQKDConfig, name, NON_NEGATIVE) for name in ("commitment", "kmeans_iters", "eval_images")],
    (VQKDConfig, "decay", UNIT_BELOW_ONE),
    *[(DVAEConfig, name, AT_LEAST_1) for name in ("vocab_size", "hidden", "tokenizer_size")],
    (DVAEConfig, "num_res", AT_LEAST_0), (DVAEConfig, "kl_weight", NON_NEGATIVE),
    (DVAEConfig, "temperature_anneal", UNIT), (DVAEConfig, "kl_warmup", UNIT),
]
# the probes' settings are flags; their messages name the flag
PROBE_FLAGS = {"num_workers": "--num-workers", "epochs": "--epochs", "batch_size": "--batch-size",
               "base_lr": "--lr", "weight_decay": "--weight-decay", "k": "--k",
               "temperature": "--temperature"}


def _one_line_refusal(build, value, words: str) -> None:
    with pytest.raises(MimkitError, match=re.escape(words)) as err:
        build(value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("cls, name, edges", DATACLASS_SETTINGS,
                         ids=[f"{cls.__name__}.{name}" for cls, name, _ in DATACLASS_SETTINGS])
def test_each_config_setting_is_taken_at_its_limit_and_refused_just_past_it(cls, name, edges):
    taken, refused = edges
    for value in taken:
        cls(**{name: value})
    words = PROBE_FLAGS[name] if issubclass(cls, ProbeConfig) else f"{getattr(cls, 'SECTION', '')}.{name}"
    for value in refused:
        _one_line_refusal(setting(cls, name), value, words.removeprefix("."))


# settings whose values are checked as a pair, or whose limit depends on another setting
PAIRS_AND_DEPENDENT = [
    ("data.std", setting(DataConfig, "std"), ([TINY],), ([0.0],), "data.std"),
    ("data.mean per channel", setting(DataConfig, "mean", channels=3), ([0.5], [0.5] * 3), ([0.5] * 2,),
     "data.mean"),
    ("optim.betas", lambda b: OptimConfig(betas=b), ((0.0, 0.0), (BELOW_ONE, BELOW_ONE)),
     ((BELOW_ZERO, 0.9), (0.9, 1.0)), "optim.betas"),
    ("seg.eval_scales", lambda r: SegConfig(eval_scales=[r]), (TINY, 8.0), (0.0, math.nextafter(8.0, 9.0)),
     "seg.eval_scales"),
    ("seg.class_names", lambda n: SegConfig(num_classes=2, class_names=["a"] * n), (2,), (1, 3),
     "seg.num_classes"),
    *[(f"{cls.__name__}.crop_scale", setting(cls, "crop_scale"),
       ((TINY, 1.0), (1.0, 1.0), (0.5, 0.5)), ((0.0, 1.0), (0.5, ABOVE_ONE), (0.5, math.nextafter(0.5, 0))),
       "crop_scale")
      for cls in (Data2VecConfig, MaskDistillConfig, MaskFeatConfig, SimMIMConfig, BEiTConfig,
                  BEiTv2Config, CAEConfig, VQKDConfig, DVAEConfig)],
    ("dvae.temperature", lambda t: DVAEConfig(temperature=(1.0, t)), *POSITIVE, "dvae.temperature"),
]


@pytest.mark.parametrize("build, taken, refused, words", [case[1:] for case in PAIRS_AND_DEPENDENT],
                         ids=[case[0] for case in PAIRS_AND_DEPENDENT])
def test_settings_checked_together_are_taken_at_their_limits_and_refused_just_past(build, taken, refused,
                                                                                  words):
    for value in taken:
        build(value)
    for value in refused:
        _one_line_refusal(build, value, words)


def _mix(name):
    return lambda value: MixTargets(4, **{name: value})


def _view(name):
    return lambda value: SegTrainView(8, (8, 8), [0.5], [0.5], **{name: value})


FEATURES, LABELS = torch.eye(4), torch.arange(4)


class Labelled(torch.utils.data.Dataset):
    """Four images of two classes, as `make_splits` reads a split."""

    labels = [0, 0, 1, 1]
    info = SimpleNamespace(name="four", num_classes=2)

    def __len__(self):
        return 4


# checks inside the code that a setting reaches: masking, augmentation, the quantizer, schedules
FUNCTIONS = [
    ("count_for_ratio", lambda r: count_for_ratio(16, r), (0.0, 1.0), (BELOW_ZERO, ABOVE_ONE), "mask ratio"),
    ("block_mask count", lambda n: block_mask(4, 4, n, min_block=1), (0, 16), (-1, 17), "cannot mask"),
    ("block_mask min_block", lambda m: block_mask(4, 4, 4, min_block=m), (1,), (0,), "min_block"),
    ("block_mask max_block", lambda m: block_mask(4, 4, 4, min_block=2, max_block=m), (2,), (1,),
     "max_block"),
    ("block_mask aspect", lambda a: block_mask(4, 4, 4, min_block=1, aspect=a), ((1.0, 1.0),),
     ((0.0, 1.0), (1.0, BELOW_ONE)), "aspect range"),
    # 16 patches: one masked and fifteen masked are the edges
    ("checked_block_count ratio", lambda r: checked_block_count("beit", 4, r, 1), (1 / 16, 15 / 16),
     (1 / 32 - 1e-9, 1 - 1 / 32), "beit.mask_ratio"),
    ("checked_block_count min_block", lambda m: checked_block_count("beit", 4, 0.5, m), (8,), (9,),
     "beit.min_block"),
    ("MAE num_kept", lambda r: num_kept(16, r), (1 / 16, 15 / 16), (0.0, TINY, 1 - 1 / 16 + 1e-9),
     "mask_ratio"),
    ("SimMIM num_masked_cells", lambda r: num_masked_cells(16, r), OPEN_UNIT[0], OPEN_UNIT[1],
     "simmim.mask_ratio"),
    ("mix label_smoothing", _mix("label_smoothing"), *UNIT_BELOW_ONE, "label_smoothing"),
    ("mix mixup", _mix("mixup"), *NON_NEGATIVE, "mixup"),
    ("mix cutmix", _mix("cutmix"), *NON_NEGATIVE, "cutmix"),
    ("mix switch_prob", _mix("switch_prob"), *UNIT, "switch_prob"),
    ("mix prob", _mix("prob"), *UNIT, "prob"),
    ("finetune crop_scale", lambda s: timm_train_transform(8, [0.5], [0.5], crop_scale=s),
     ((TINY, 1.0), (1.0, 1.0)), ((0.0, 1.0), (1.0, ABOVE_ONE), (0.5, 0.25)), "crop_scale"),
    ("quantizer decay", lambda d: NormEMAQuantizer(4, 2, decay=d), *UNIT_BELOW_ONE, "decay"),
    ("quantizer dead_after", lambda n: NormEMAQuantizer(4, 2, dead_after=n), *AT_LEAST_1, "dead_after"),
    ("knn k", lambda k: knn_scores(FEATURES, LABELS, FEATURES, 4, k=k), *AT_LEAST_1, "k=0"),
    ("knn temperature", lambda t: knn_scores(FEATURES, LABELS, FEATURES, 4, temperature=t), *POSITIVE, "T=0"),
    ("linear probe images", lambda n: train_linear_probe(torch.zeros(n, 2), torch.arange(n) % 2, 2, epochs=1,
                                                         warmup_epochs=0), (2,), (1,), "2 training images"),
    ("linear probe epochs", lambda e: train_linear_probe(torch.zeros(2, 2), torch.arange(2), 2, epochs=e,
                                                         warmup_epochs=0), *AT_LEAST_1, "and 1 epoch"),
    ("label fraction", lambda f: label_subset(LABELS, f), *UNIT_ABOVE_ZERO, "label fraction"),
    ("val fraction", lambda f: make_splits(Labelled(), val_fraction=f),
     (0.0,), (BELOW_ZERO, 1.0), "val fraction"),
    ("seg ratio_range", lambda r: _view("ratio_range")(r), ((TINY, TINY), (1.0, 1.0)),
     ((0.0, 1.0), (1.0, BELOW_ONE)), "ratio_range"),
    ("seg crop_tries", _view("crop_tries"), *AT_LEAST_1, "crop_tries"),
    ("checkpoints keep_last", lambda n: Checkpoints("unused", keep_last=n), *AT_LEAST_1, "keep_last"),
    ("epoch_steps batch", lambda b: epoch_steps(4, b, 1), (1, 4), (0, 5), "batch"),
    ("epoch_steps accum", lambda a: epoch_steps(4, 1, a), (1, 4), (0, 5), "batch"),
]


@pytest.mark.parametrize("build, taken, refused, words", [case[1:] for case in FUNCTIONS],
                         ids=[case[0] for case in FUNCTIONS])
def test_each_check_in_the_code_takes_its_limit_and_refuses_just_past_it(build, taken, refused, words):
    for value in taken:
        build(value)
    for value in refused:
        _one_line_refusal(build, value, words)


# (arguments, flag, its limit, the value just past it); TMP: the test's folder. What the command does at
# the limit fails later (a missing run, a folder that is not new): only the flag's check is asked here.
FLAGS = [
    (["predict", "TMP/missing", "--images", "TMP", "--out", "TMP/out"], "--batch-size", 1, 0),
    (["evaluate", "TMP/missing", "--out", "TMP/out"], "--batch-size", 1, 0),
    (["data", "pack", "TMP", "--out", "TMP"], "--max-side", 1, 0),
    (["data", "pack", "TMP", "--out", "TMP", "--max-side", "8"], "--quality", 1, 0),
    (["data", "pack", "TMP", "--out", "TMP", "--max-side", "8"], "--quality", 100, 101),
    (["import", "TMP/missing.pth", "--format", "mae", "--out", "TMP/run"], "--img-size", 1, 0),
]


@pytest.mark.parametrize("arguments, flag, limit, past", FLAGS,
                         ids=[f"{args[0]} {flag} {past}" for args, flag, _, past in FLAGS])
def test_each_flag_takes_its_limit_and_refuses_just_past_it(tmp_path, capsys, arguments, flag, limit, past):
    arguments = [a.replace("TMP", str(tmp_path)) for a in arguments]
    main([*arguments, flag, str(limit)])
    assert flag not in capsys.readouterr().err
    assert main([*arguments, flag, str(past)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {flag} must be") and "\n" not in err
