"""Every table of paper constants written out: the ImageNet recipes, the encoder sizes, MAE's decoders and the
import tables of the authors' released model names. Each value is a literal here (from the paper or the
authors' code, as the recipe or table's comment cites), never read back from the constant it checks, so a
changed digit, a dropped entry or a swapped pair fails."""

import dataclasses

import pytest
import torch

from mimkit.config import load_recipe
from mimkit.interop.cae import OFFICIAL_CAE_MODELS, REFERENCE_DECODER_HEADS
from mimkit.interop.mae import OFFICIAL_MAE_MODELS
from mimkit.interop.vqkd import OFFICIAL_VQKD_MODELS
from mimkit.methods.data2vec import REFERENCE_DEFAULTS as DATA2VEC_DEFAULTS
from mimkit.methods.simmim import REFERENCE_DEFAULTS as SIMMIM_DEFAULTS
from mimkit.models.mae import create_mae
from mimkit.models.segmentation import PAPER_BLOCKS, POOL_SCALES
from mimkit.models.vit import ENCODER_ARCHS
from mimkit.registry import method_of

HOUSEKEEPING = {"data.num_workers", "train.checkpoint_every", "train.log_every"}  # the machine's

# Each paper recipe's every value (housekeeping aside), flattened to dotted names.
PAPER_RECIPES = {
    "beit_in1k": {"method": "beit", "data.img_size": 224, "model.name": "vit_base", "model.patch_size": 16,
        "model.kwargs.layer_scale_init": 0.1, "model.kwargs.drop_path_rate": 0.1,
        "model.kwargs.shared_rel_pos_bias": True, "optim.base_lr": 0.0001875, "optim.min_lr": 1e-05,
        "optim.weight_decay": 0.05, "optim.betas": [0.9, 0.999], "optim.warmup_epochs": 10,
        "optim.clip_grad": 3.0, "train.epochs": 800, "train.batch_size": 128, "train.accum_steps": 1,
        "beit.tokenizer": None, "beit.tokenizer_size": 112, "beit.mask_ratio": 0.383, "beit.min_block": 16,
        "beit.crop_scale": [0.08, 1.0], "beit.color_jitter": 0.4},
    "beitv2_in1k": {"method": "beitv2", "data.img_size": 224, "model.name": "vit_base",
        "model.patch_size": 16, "model.kwargs.layer_scale_init": 0.1, "model.kwargs.drop_path_rate": 0.1,
        "model.kwargs.shared_rel_pos_bias": True, "model.kwargs.agg_layer": 9, "model.kwargs.agg_depth": 2,
        "optim.base_lr": 0.0001875, "optim.min_lr": 1e-05, "optim.weight_decay": 0.05,
        "optim.betas": [0.9, 0.999], "optim.warmup_epochs": 10, "optim.clip_grad": 3.0, "train.epochs": 1600,
        "train.batch_size": 128, "train.accum_steps": 1, "beitv2.tokenizer": None, "beitv2.mask_ratio": 0.383,
        "beitv2.min_block": 16, "beitv2.crop_scale": [0.2, 1.0], "beitv2.color_jitter": 0.4},
    "cae_in1k": {"method": "cae", "data.img_size": 224, "data.mean": [0.485, 0.456, 0.406],
        "data.std": [0.229, 0.224, 0.225], "model.name": "vit_base", "model.patch_size": 16,
        "model.kwargs.layer_scale_init": 0.1, "model.kwargs.drop_path_rate": 0.1,
        "model.kwargs.regressor_depth": 4, "model.kwargs.decoder_depth": 4,
        "model.kwargs.decoder_layer_scale_init": 0.1, "optim.base_lr": 0.0001875, "optim.min_lr": 1e-05,
        "optim.weight_decay": 0.05, "optim.betas": [0.9, 0.999], "optim.warmup_epochs": 10,
        "optim.clip_grad": 3.0, "train.epochs": 300, "train.batch_size": 64, "train.accum_steps": 1,
        "cae.tokenizer": None, "cae.mask_ratio": 0.5, "cae.min_block": None, "cae.crop_scale": [0.08, 1.0],
        "cae.color_jitter": 0.0, "cae.align_weight": 2.0},
    "caev2_in1k": {"method": "cae", "data.img_size": 224, "data.mean": [0.485, 0.456, 0.406],
        "data.std": [0.229, 0.224, 0.225], "model.name": "vit_base", "model.patch_size": 16,
        "model.kwargs.layer_scale_init": 0.1, "model.kwargs.drop_path_rate": 0.1,
        "model.kwargs.regressor_depth": 4, "model.kwargs.decoder_layer_scale_init": 0.1,
        "optim.base_lr": 0.0001875, "optim.min_lr": 1e-05, "optim.weight_decay": 0.05,
        "optim.betas": [0.9, 0.999], "optim.warmup_epochs": 10, "optim.clip_grad": 3.0, "train.epochs": 300,
        "train.batch_size": 256, "train.accum_steps": 1, "cae.target": "teacher", "cae.teacher": None,
        "cae.tokenizer": None, "cae.mask_ratio": 0.5, "cae.min_block": None, "cae.crop_scale": [0.4, 1.0],
        "cae.color_jitter": 0.4, "cae.align_weight": 0.0},
    "data2vec_in1k": {"method": "data2vec", "data.img_size": 224, "data.mean": [0.485, 0.456, 0.406],
        "data.std": [0.229, 0.224, 0.225], "model.name": "vit_base", "model.patch_size": 16,
        "model.kwargs.layer_scale_init": 0.0001, "model.kwargs.shared_rel_pos_bias": True,
        "model.kwargs.drop_path_rate": 0.25, "model.kwargs.attn_drop_rate": 0.05, "optim.base_lr": 0.00025,
        "optim.min_lr": 1e-05, "optim.weight_decay": 0.05, "optim.betas": [0.9, 0.999],
        "optim.warmup_epochs": 10, "optim.clip_grad": 3.0, "train.epochs": 800, "train.batch_size": 128,
        "train.accum_steps": 1, "data2vec.mask_ratio": 0.6123, "data2vec.min_block": 16, "data2vec.top_k": 6,
        "data2vec.block_norm": "layer", "data2vec.target_norm": "layer", "data2vec.loss_beta": 2.0,
        "data2vec.teacher_decay_start": 0.999, "data2vec.teacher_decay_end": 0.9998,
        "data2vec.teacher_anneal_steps": 0, "data2vec.crop_scale": [0.08, 1.0], "data2vec.color_jitter": 0.4},
    "dvae_in1k": {"method": "dvae", "data.img_size": 224, "model.name": "dvae", "model.patch_size": 16,
        "optim.base_lr": 0.0001, "optim.min_lr": 1e-06, "optim.weight_decay": 0.0001,
        "optim.betas": [0.9, 0.999], "optim.warmup_epochs": 1, "train.epochs": 100, "train.batch_size": 128,
        "dvae.vocab_size": 8192, "dvae.hidden": 64, "dvae.num_res": 2, "dvae.recon_loss": "mse",
        "dvae.tokenizer_size": 112, "dvae.temperature": [1.0, 0.0625], "dvae.temperature_anneal": 0.05,
        "dvae.kl_weight": 0.05, "dvae.kl_warmup": 0.01, "dvae.crop_scale": [0.08, 1.0]},
    "finetune_in1k": {"classifier.pool": "avg", "classifier.drop_path": 0.1,
        "augment.crop_scale": [0.08, 1.0], "augment.auto_augment": "rand-m9-mstd0.5-inc1",
        "augment.reprob": 0.25, "augment.remode": "pixel", "augment.mixup": 0.8, "augment.cutmix": 1.0,
        "augment.mixup_switch_prob": 0.5, "augment.mixup_prob": 1.0, "augment.label_smoothing": 0.1,
        "optim.base_lr": 0.0005, "optim.min_lr": 1e-06, "optim.weight_decay": 0.05,
        "optim.betas": [0.9, 0.999], "optim.warmup_epochs": 5, "optim.layer_decay": 0.65, "train.epochs": 100,
        "train.batch_size": 128, "train.accum_steps": 1, "eval_every": 1},
    "mae_in1k": {"method": "mae", "data.img_size": 224, "model.name": "vit_base", "model.patch_size": 16,
        "optim.base_lr": 0.00015, "optim.min_lr": 0.0, "optim.weight_decay": 0.05, "optim.betas": [0.9, 0.95],
        "optim.warmup_epochs": 40, "train.epochs": 800, "train.batch_size": 64, "train.accum_steps": 1,
        "mae.mask_ratio": 0.75, "mae.norm_pix_loss": True},
    "maskdistill_in1k": {"method": "maskdistill", "data.img_size": 224, "model.name": "vit_base",
        "model.patch_size": 16, "model.kwargs.layer_scale_init": 0.1, "model.kwargs.drop_path_rate": 0.0,
        "model.kwargs.shared_rel_pos_bias": True, "optim.base_lr": 0.0001875, "optim.min_lr": 1e-05,
        "optim.weight_decay": 0.05, "optim.betas": [0.9, 0.98], "optim.warmup_epochs": 10,
        "optim.clip_grad": 3.0, "train.epochs": 300, "train.batch_size": 128, "train.accum_steps": 1,
        "maskdistill.teacher": None, "maskdistill.loss": "smooth_l1", "maskdistill.smooth_l1_beta": 1.0,
        "maskdistill.target_norm": True, "maskdistill.mask_ratio": 0.4, "maskdistill.min_block": 16,
        "maskdistill.crop_scale": [0.2, 1.0], "maskdistill.color_jitter": 0.4},
    "maskfeat_in1k": {"method": "maskfeat", "data.img_size": 224, "model.name": "vit_base",
        "model.patch_size": 16, "optim.base_lr": 0.0002, "optim.min_lr": 1e-06, "optim.weight_decay": 0.05,
        "optim.betas": [0.9, 0.999], "optim.warmup_epochs": 30, "optim.clip_grad": 0.02, "train.epochs": 300,
        "train.batch_size": 256, "train.accum_steps": 1, "maskfeat.mask_ratio": 0.4, "maskfeat.min_block": 15,
        "maskfeat.hog_bins": 9, "maskfeat.hog_cell": 8, "maskfeat.hog_window": 16,
        "maskfeat.crop_scale": [0.5, 1.0]},
    "simmim_in1k": {"method": "simmim", "data.img_size": 224, "model.name": "vit_base",
        "model.patch_size": 16, "model.kwargs.layer_scale_init": 0.1,
        "model.kwargs.shared_rel_pos_bias": True, "model.kwargs.drop_path_rate": 0.1, "optim.base_lr": 5e-05,
        "optim.min_lr": 4e-05, "optim.weight_decay": 0.05, "optim.betas": [0.9, 0.999],
        "optim.warmup_epochs": 10, "optim.clip_grad": 5.0, "train.epochs": 800, "train.batch_size": 128,
        "train.accum_steps": 1, "simmim.mask_ratio": 0.6, "simmim.mask_patch_size": 32,
        "simmim.crop_scale": [0.67, 1.0]},
    "vqkd_in1k": {"method": "vqkd", "data.img_size": 224, "model.name": "vit_base", "model.patch_size": 16,
        "optim.base_lr": 0.0001, "optim.min_lr": 1e-05, "optim.weight_decay": 0.0001,
        "optim.betas": [0.9, 0.99], "optim.warmup_epochs": 10, "train.epochs": 100, "train.batch_size": 64,
        "train.accum_steps": 1, "vqkd.teacher": None, "vqkd.vocab_size": 8192, "vqkd.code_dim": 32,
        "vqkd.decoder_depth": 3, "vqkd.decay": 0.99, "vqkd.commitment": 1.0, "vqkd.kmeans_iters": 10,
        "vqkd.dead_after": 100, "vqkd.crop_scale": [0.08, 1.0], "vqkd.eval_images": 1000},
    "segment_ade20k": {"seg.head": "upernet", "seg.crop_size": 512, "seg.scale": [2048, 512],
        "seg.ratio_range": [0.5, 2.0], "seg.cat_max_ratio": 0.75, "seg.photometric": True,
        "seg.aux_weight": 0.4, "seg.drop_path": 0.1, "seg.eval_mode": "slide", "seg.eval_stride": 341,
        "seg.eval_scale": [2048, 512], "optim.base_lr": 0.0112, "optim.min_lr": 0.0,
        "optim.weight_decay": 0.05, "optim.betas": [0.9, 0.999], "optim.warmup_epochs": 1.19,
        "optim.layer_decay": 0.65, "train.max_steps": 160000, "train.batch_size": 16, "eval_every": 16000,
        "eval_batch_size": 1, "per_method.mae.optim.base_lr": 0.0016,
        "per_method.mae.optim.layer_decay": 0.65, "per_method.mae.seg.drop_path": 0.1,
        "per_method.mae.seg.rel_pos_bias": True, "per_method.beit.optim.base_lr": 0.0112,
        "per_method.beit.optim.layer_decay": 0.65, "per_method.beit.seg.drop_path": 0.1,
        "per_method.beitv2.optim.base_lr": 0.0008, "per_method.beitv2.optim.layer_decay": 0.75,
        "per_method.beitv2.seg.drop_path": 0.15},
}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        elif f"{prefix}{key}" not in HOUSEKEEPING:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_each_paper_recipe_holds_the_papers_values(name):
    assert _flat(load_recipe(name)) == PAPER_RECIPES[name]


def test_the_encoder_sizes_are_the_vit_papers():
    paper = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12),
             "vit_large": (1024, 24, 16), "vit_huge": (1280, 32, 16)}
    for name, (width, depth, heads) in paper.items():
        assert ENCODER_ARCHS[name] == dict(embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4.0), name


@pytest.mark.parametrize("name, decoder", [("vit_small", (256, 4, 8)), ("vit_base", (512, 8, 16)),
                                           ("vit_large", (512, 8, 16)), ("vit_huge", (512, 8, 16))])
def test_maes_decoder_is_the_papers_512_wide_8_blocks_from_vit_b_up(name, decoder):
    with torch.device("meta"):
        mae = create_mae(name)
    width, depth, heads = decoder
    assert (mae.decoder_embed.out_features, len(mae.decoder_blocks)) == (width, depth)
    assert mae.decoder_blocks[0].attn.num_heads == heads


def test_the_released_model_names_fix_the_papers_architectures():
    base, large, huge = (16, 768, 12, 12), (16, 1024, 24, 16), (14, 1280, 32, 16)
    fields = ("patch_size", "embed_dim", "depth", "num_heads")
    decoder = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
    mae = {}
    for size, dims in (("base_patch16", base), ("large_patch16", large), ("huge_patch14", huge)):
        encoder = dict(zip(fields, dims, strict=True))
        mae |= {f"mae_vit_{size}": encoder | decoder, f"mae_vit_{size}_dec512d8b": encoder | decoder,
                f"vit_{size}": encoder}
    assert OFFICIAL_MAE_MODELS == mae
    assert OFFICIAL_CAE_MODELS == {
        "cae_tiny_patch16_224_8k_vocab": dict(zip(fields, (16, 192, 12, 12), strict=True)),
        "cae_small_patch16_224_8k_vocab": dict(zip(fields, (16, 384, 12, 12), strict=True)),
        "cae_base_patch16_224_8k_vocab": dict(zip(fields, (16, 768, 12, 12), strict=True)),
        "cae_large_patch16_224_8k_vocab": dict(zip(fields, (16, 1024, 24, 16), strict=True))}
    assert REFERENCE_DECODER_HEADS == 12
    vqkd = dict(zip(fields, base, strict=True))
    assert OFFICIAL_VQKD_MODELS == {
        "vqkd_encoder_base_decoder_1x768x12_clip": vqkd | dict(decoder_depth=1),
        "vqkd_encoder_base_decoder_3x768x12_clip": vqkd | dict(decoder_depth=3),
        "vqkd_encoder_base_decoder_1x768x12_dino": vqkd | dict(decoder_depth=1)}


def test_the_reference_defaults_of_a_checkpoint_without_arguments_are_the_authors():
    assert DATA2VEC_DEFAULTS == {"mask_ratio": 120 / 196, "top_k": 6, "block_norm": "layer",
                                 "target_norm": "layer", "loss_beta": 2.0, "teacher_decay_start": 0.999,
                                 "teacher_decay_end": 0.9998, "teacher_anneal_steps": 0}
    assert SIMMIM_DEFAULTS == {"mask_ratio": 0.6, "mask_patch_size": 32}


# Each method's own settings when a configuration leaves them out (a user's own YAML, an import): the
# papers' and authors' values (mimkit's own choices where no paper fixes one: None, sizes of the tokenizers)
METHOD_DEFAULTS = {
    "mae": {"mask_ratio": 0.75, "norm_pix_loss": True},
    "beit": {"tokenizer": None, "tokenizer_size": None, "mask_ratio": 0.4, "min_block": None,
             "crop_scale": (0.08, 1.0), "color_jitter": 0.4},
    "beitv2": {"tokenizer": None, "tokenizer_size": None, "mask_ratio": 0.4, "min_block": None,
               "crop_scale": (0.2, 1.0), "color_jitter": 0.4},
    "simmim": {"mask_ratio": 0.6, "mask_patch_size": 32, "crop_scale": (0.67, 1.0)},
    "maskfeat": {"mask_ratio": 0.4, "min_block": None, "hog_bins": 9, "hog_cell": 8, "hog_window": None,
                 "crop_scale": (0.5, 1.0)},
    "cae": {"tokenizer": None, "tokenizer_size": None, "mask_ratio": 0.5, "min_block": None,
            "crop_scale": (0.08, 1.0), "color_jitter": 0.0, "align_weight": 2.0, "target": "tokens",
            "teacher": None, "teacher_dim": None},
    "maskdistill": {"teacher": None, "teacher_dim": None, "loss": "smooth_l1", "smooth_l1_beta": 1.0,
                    "target_norm": True, "mask_ratio": 0.4, "min_block": None, "crop_scale": (0.2, 1.0),
                    "color_jitter": 0.4},
    "data2vec": {"mask_ratio": 0.6, "min_block": None, "top_k": 6, "block_norm": "layer",
                 "target_norm": "layer", "loss_beta": 2.0, "teacher_decay_start": 0.999,
                 "teacher_decay_end": 0.9998, "teacher_anneal_steps": 0, "crop_scale": (0.08, 1.0),
                 "color_jitter": 0.4},
    "vqkd": {"teacher": None, "teacher_dim": None, "vocab_size": 8192, "code_dim": 32, "decoder_depth": 3,
             "decay": 0.99, "commitment": 1.0, "kmeans_iters": 10, "dead_after": 100,
             "crop_scale": (0.08, 1.0), "eval_images": 1000},
    "dvae": {"vocab_size": 8192, "hidden": 64, "num_res": 1, "recon_loss": "mse", "tokenizer_size": None,
             "temperature": (1.0, 1 / 16), "temperature_anneal": 0.5, "kl_weight": 0.05, "kl_warmup": 0.1,
             "crop_scale": (0.08, 1.0)},
}


@pytest.mark.parametrize("name", METHOD_DEFAULTS)
def test_each_methods_own_settings_default_to_the_papers_values(name):
    settings = method_of(name).settings()
    assert {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)} == METHOD_DEFAULTS[name]


def test_segmentation_taps_the_papers_blocks_and_pools_the_papers_scales():
    assert (PAPER_BLOCKS, POOL_SCALES) == ((3, 5, 7, 11), (1, 2, 3, 6))
