import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

from mimkit.config import save_config
from mimkit.errors import MimkitError
from mimkit.methods import METHODS
from mimkit.methods.vqkd import run_encoder
from mimkit.registry import read_config
from mimkit.tokenizers.teachers import Teacher, TimmFeatures, _preprocessing, load_teacher
from mimkit.train.checkpoint_files import Checkpoints

DATA_MEAN, DATA_STD = [0.286], [0.353]  # Fashion-MNIST's normalization: one channel
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8)


@pytest.fixture
def images():
    return torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def teacher_input(images: torch.Tensor, mean, std, size: int) -> torch.Tensor:
    """What a 3-channel teacher should be given: pixels back from the data's normalization, its own."""
    pixels = (images * DATA_STD[0] + DATA_MEAN[0]).expand(-1, 3, -1, -1)
    x = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


def on_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, L, D) square-grid tokens resized to grid x grid, as (B, grid * grid, D)."""
    b, n, d = tokens.shape
    side = int(n**0.5)
    x = tokens.transpose(1, 2).reshape(b, d, side, side)
    x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False, antialias=True)
    return x.flatten(2).transpose(1, 2)


def assert_frozen(teacher):
    assert not any(m.training for m in teacher.features.modules())  # as loaded, before any train()
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_hf_clip_vision_model(tmp_path, images):
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(**TINY)).eval()
    clip.save_pretrained(tmp_path / "clip")
    teacher = load_teacher(f"hf:{tmp_path / 'clip'}", 7, DATA_MEAN, DATA_STD)
    assert_frozen(teacher)
    assert teacher.dim == 32 and teacher.img_size == 32
    out = teacher(images)
    assert out.shape == (2, 49, 32) and not out.requires_grad
    with torch.no_grad():  # CLIP's patch tokens after its final LayerNorm, 4x4 -> 7x7
        x = teacher_input(images, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 32)
        tokens = clip(pixel_values=x).last_hidden_state
        expected = on_grid(getattr(clip, "vision_model", clip).post_layernorm(tokens[:, 1:]), 7)
    # float32 rounding of another order of operations: 8.3e-7 measured on this CPU
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)


def clip_with_projection(folder, vision_only: bool = False) -> CLIPModel | CLIPVisionModelWithProjection:
    """A tiny CLIPModel (16-d projection) saved in ``folder``; its vision tower and projection alone
    (``CLIPVisionModelWithProjection``) when ``vision_only``."""
    torch.manual_seed(0)
    if vision_only:
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY, projection_dim=16)).eval()
    else:
        config = CLIPConfig(vision_config=TINY, text_config=dict(hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=2), projection_dim=16)
        clip = CLIPModel(config).eval()
    clip.save_pretrained(folder)
    return clip


@pytest.mark.parametrize("vision_only", [False, True], ids=["CLIPModel", "CLIPVisionModelWithProjection"])
def test_hf_clip_model_with_projection_from_a_plain_folder(tmp_path, images, vision_only):
    clip = clip_with_projection(tmp_path / "clip", vision_only)
    teacher = load_teacher(str(tmp_path / "clip"), 4, DATA_MEAN, DATA_STD)  # a folder with config.json
    assert teacher.dim == 16
    with torch.no_grad():
        x = teacher_input(images, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 32)
        tokens = clip.vision_model(pixel_values=x).last_hidden_state[:, 1:]
        expected = clip.visual_projection(clip.vision_model.post_layernorm(tokens))  # 4x4 already
    # float32 rounding of another order of operations: 1.2e-6 measured on this CPU
    torch.testing.assert_close(teacher(images), expected, rtol=0, atol=5e-6)


def test_hf_dinov2_with_its_preprocessor(tmp_path, images):
    torch.manual_seed(0)
    dino = Dinov2Model(Dinov2Config(**{**TINY, "image_size": 518})).eval()  # DINOv2 configs say 518
    dino.save_pretrained(tmp_path / "dino")
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    (tmp_path / "dino" / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 40, "width": 40}, "image_mean": mean, "image_std": std}))
    teacher = load_teacher(f"hf:{tmp_path / 'dino'}", 7, DATA_MEAN, DATA_STD)
    assert teacher.img_size == 40  # the processor's crop, not the config's 518
    with torch.no_grad():
        tokens = dino(pixel_values=teacher_input(images, mean, std, 40)).last_hidden_state[:, 1:]  # 5x5
    # float32 rounding of another order of operations: 7.2e-7 measured on this CPU
    torch.testing.assert_close(teacher(images), on_grid(tokens, 7), rtol=0, atol=2e-6)

    (tmp_path / "dino" / "preprocessor_config.json").unlink()  # then ImageNet's normalization at 224
    teacher = load_teacher(f"hf:{tmp_path / 'dino'}", 7, DATA_MEAN, DATA_STD)
    assert teacher.img_size == 224
    with torch.no_grad():
        x = teacher_input(images, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, 224)
        tokens = dino(pixel_values=x).last_hidden_state[:, 1:]
    # float32 rounding of another order of operations: 2.4e-7 measured on this CPU
    torch.testing.assert_close(teacher(images), on_grid(tokens, 7), rtol=0, atol=5e-7)


def test_hf_dinov2_with_registers_gives_the_patch_tokens_after_its_registers(tmp_path, images):
    torch.manual_seed(0)
    dino = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY, num_register_tokens=2)).eval()
    dino.save_pretrained(tmp_path / "dino")
    teacher = load_teacher(f"hf:{tmp_path / 'dino'}", 4, DATA_MEAN, DATA_STD)
    with torch.no_grad():
        x = teacher_input(images, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, 224)
        tokens = dino(pixel_values=x).last_hidden_state  # [2, 1 + 2 + 28 * 28, 32]
    assert tokens.shape[1] == 3 + 28 * 28
    torch.testing.assert_close(teacher(images), on_grid(tokens[:, 3:], 4), rtol=0, atol=5e-6)


def test_mimkit_run_is_a_label_free_teacher(tmp_path, images):
    config = read_config({"method": "mae", "data": {"img_size": 28, "channels": 1,
                       "mean": DATA_MEAN, "std": DATA_STD}, "model": {"name": "vit_mini", "patch_size": 4,
                       "kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2, "decoder_depth": 1,
                                  "decoder_embed_dim": 16, "decoder_num_heads": 2}}})
    torch.manual_seed(0)
    mae = METHODS["mae"].build_model(config).eval()
    (tmp_path / "mae").mkdir()
    save_config(config, tmp_path / "mae" / "config.yaml")
    Checkpoints(tmp_path / "mae").save(3, mae, {"step": 3})
    with torch.no_grad():
        expected = mae.encoder.forward_features(images)[:, 1:]  # same data: no conversion, no resize
    for spec in (tmp_path / "mae", Checkpoints(tmp_path / "mae").weights_path(3)):
        teacher = load_teacher(str(spec), 7, DATA_MEAN, DATA_STD, run_encoder)
        assert_frozen(teacher)
        torch.testing.assert_close(teacher(images), expected)


def test_timm_model_with_a_local_weights_file(tmp_path, images):
    torch.manual_seed(0)
    shallow = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=2)
    save_file(shallow.state_dict(), tmp_path / "shallow.safetensors")
    # depth=2 is not part of the name: the 12-block timm model refuses the 2-block file
    with pytest.raises(MimkitError, match="do not fit timm vit_tiny_patch16_224: missing"):
        load_teacher(f"timm:vit_tiny_patch16_224:{tmp_path / 'shallow.safetensors'}", 7, DATA_MEAN, DATA_STD)
    full = timm.create_model("vit_tiny_patch16_224", num_classes=0).eval()
    head = {"head.weight": torch.zeros(10, 192), "head.bias": torch.zeros(10)}  # a classifier is dropped
    save_file(full.state_dict() | head, tmp_path / "full.safetensors")
    spec = f"timm:vit_tiny_patch16_224:{tmp_path / 'full.safetensors'}"
    teacher = load_teacher(spec, 7, DATA_MEAN, DATA_STD)
    assert (teacher.dim, teacher.img_size) == (192, 224)
    cfg = full.pretrained_cfg
    with torch.no_grad():
        tokens = full.forward_features(teacher_input(images, cfg["mean"], cfg["std"], 224))[:, 1:]
    # float32 rounding and a resized grid: 6.0e-7 measured on this CPU
    torch.testing.assert_close(teacher(images), on_grid(tokens, 7), rtol=0, atol=2e-6)


def test_a_timm_cnns_classifier_weights_are_left_aside(tmp_path, images):
    """A CNN's weights file holds its classifier ("fc." in timm's ResNets): the teacher, built headless, loads
    the rest."""
    cnn = timm.create_model("resnet10t", num_classes=10)
    save_file(cnn.state_dict(), tmp_path / "resnet.safetensors")
    teacher = load_teacher(f"timm:resnet10t:{tmp_path / 'resnet.safetensors'}", 7, DATA_MEAN, DATA_STD)
    assert teacher.dim == cnn.num_features and teacher(images).shape == (len(images), 49, cnn.num_features)


def test_a_timm_feature_map_is_channels_first_whether_the_model_gives_nhwc_or_nchw():
    """A Swin's `forward_features` is (B, h, w, D) (its ``output_fmt`` NHWC), a CNN's (B, D, h, w): both
    become a (B, D, h, w) grid, without a [CLS] feature."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, img_size=32, window_size=4,
                             embed_dim=16, depths=(1, 1), num_heads=(1, 1)).eval()
    cnn = timm.create_model("resnet10t", num_classes=0).eval()
    with torch.no_grad():
        for model, channels_first in ((swin, swin.forward_features(x).permute(0, 3, 1, 2)),
                                      (cnn, cnn.forward_features(x))):
            cls, grid = TimmFeatures(model)(x)
            assert cls is None and grid.shape[1] == model.num_features
            torch.testing.assert_close(grid, channels_first)


@pytest.mark.parametrize("processor, size", [
    ({"crop_size": {"height": 40, "width": 40}}, 40), ({"crop_size": {"shortest_edge": 24}}, 24),
    ({"crop_size": 36}, 36), ({}, 32),  # no processor file: the config's image size
])
def test_the_input_size_is_the_processors_crop_else_the_configs_image_size(tmp_path, processor, size):
    if processor:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    assert _preprocessing(tmp_path, {"image_size": 32}, [0.5], [0.5]) == (size, [0.5], [0.5])


@pytest.mark.parametrize("spec, match", [
    ("{tmp}/nothing", "does not exist"),
    ("timm:vit_tiny_patch16_224:{tmp}/missing.safetensors", "does not exist"),
    ("timm:not_a_model:{tmp}/w.safetensors", "timm has no model 'not_a_model'"),
    ("timm:vit_tiny_patch16_224", "must be timm:NAME:FILE"),
    ("hf:{tmp}", "not a Hugging Face model folder"),
    ("hf:{tmp}/vit", "holds a vit; Hugging Face teachers are CLIP"),
])
def test_bad_specs_are_one_line_errors(tmp_path, spec, match):
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(MimkitError, match=match) as err:
        load_teacher(spec.format(tmp=tmp_path), 7, DATA_MEAN, DATA_STD)
    assert "\n" not in str(err.value)


def test_data_with_more_channels_than_the_teacher_is_refused(tmp_path):
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TINY, num_channels=1)).save_pretrained(tmp_path / "gray")
    with pytest.raises(MimkitError, match="reads 1-channel images; the data has 3 channels"):
        load_teacher(f"hf:{tmp_path / 'gray'}", 7, [0.5] * 3, [0.5] * 3)


def test_clip_class_feature_goes_through_the_final_norm_and_projection_like_the_patches(tmp_path, images):
    clip = clip_with_projection(tmp_path / "clip")
    teacher = load_teacher(str(tmp_path / "clip"), 4, DATA_MEAN, DATA_STD)
    tokens = teacher.forward_with_class(images)
    with torch.no_grad():  # CAE v2's CLIP: every token through ln_post, then the projection
        x = teacher_input(images, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 32)
        hidden = clip.vision_model(pixel_values=x).last_hidden_state
        expected = clip.visual_projection(clip.vision_model.post_layernorm(hidden))
    assert tokens.shape == (2, 17, 16) and not tokens.requires_grad
    torch.testing.assert_close(tokens, expected, rtol=0, atol=5e-6)
    torch.testing.assert_close(tokens[:, 1:], teacher(images))  # the patches are forward's


def test_a_run_teachers_class_feature_is_its_first_token_and_a_teacher_without_one_is_refused(images):
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=1, img_size=28, patch_size=4,
                            in_chans=1).eval()
    teacher = Teacher(TimmFeatures(vit), 28, 1, DATA_MEAN, DATA_STD, DATA_MEAN, DATA_STD, 7, "a ViT")
    with torch.no_grad():
        torch.testing.assert_close(teacher.forward_with_class(images), vit.forward_features(images))
    pooled = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=1, img_size=28, patch_size=4,
                               in_chans=1, class_token=False, global_pool="avg").eval()
    teacher = Teacher(TimmFeatures(pooled), 28, 1, DATA_MEAN, DATA_STD, DATA_MEAN, DATA_STD, 7, "no class")
    assert teacher(images).shape == (2, 49, 192)
    with pytest.raises(MimkitError, match="teacher 'no class' has no class token") as err:
        teacher.forward_with_class(images)
    assert "\n" not in str(err.value)
