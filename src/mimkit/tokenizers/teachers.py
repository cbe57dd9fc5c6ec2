"""Frozen teachers for VQ-KD: feature extractors that map images to patch features on a tokenizer's grid, and
their [CLS] feature for the methods that regress it too (CAE v2).

A teacher takes the images the tokenizer sees (normalized with the data's mean and std, the data's
channels and size), converts them to its own input (its normalization, three channels from one by
repetition, its image size), runs its backbone without gradients and resizes the patch feature grid to
the tokenizer's. Teachers are chosen by a spec string:

- ``runs/mae`` — a mimkit run directory (its newest weights; a fine-tuning run: its best), or a
  ``.safetensors`` checkpoint inside a run: the run's encoder, e.g. an MAE encoder — a teacher that
  needed no labels.
- ``timm:NAME:FILE`` — a timm model built with ``timm.create_model(NAME)`` and the weights in FILE
  (safetensors, or a PyTorch file read with ``weights_only=True``); its pretrained config gives the
  input size and normalization, e.g. ``timm:vit_base_patch16_224.dino:dino_vitb16.pth``.
- ``hf:DIR`` (or a folder holding ``config.json``) — a Hugging Face ``save_pretrained`` folder of a CLIP
  (``CLIPModel``, ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``) or a DINOv2 model (with or
  without registers); ``preprocessor_config.json`` gives the input size and normalization when present.

Nothing is downloaded; a missing file is a one-line `MimkitError`. Feature choices follow BEiT v2: CLIP's
patch tokens after its final LayerNorm and, when the folder has it, its projection; DINOv2's final
(normalized) patch tokens; a timm or mimkit ViT's ``forward_features`` patch tokens. The [CLS] feature is the
same output's class token (CLIP's, as CAE v2's CLIP gives it, through the same LayerNorm and projection); a
backbone without one (a CNN, a ViT without a class token) has none.

- BEiT v2: Peng et al., 2022, arXiv:2208.06366
- CLIP: Radford et al., 2021, arXiv:2103.00020; DINOv2: Oquab et al., 2023, arXiv:2304.07193
"""

import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torch import nn

from mimkit.config import DataConfig
from mimkit.errors import MimkitError
from mimkit.safe_load import load_tensors, read_json, refusal

SPEC_FORMS = "a mimkit run directory or checkpoint, timm:NAME:FILE, or hf:DIR (CLIP or DINOv2)"

RunEncoder = Callable[[Path], tuple[nn.Module, DataConfig]]  # a run -> its encoder, the data it expects


def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L, D) patch tokens of a square grid -> (B, D, h, w)."""
    b, n, d = tokens.shape
    side = int(round(n**0.5))
    if side * side != n:
        raise MimkitError(f"teacher gives {n} patch tokens, not a square grid")
    return tokens.transpose(1, 2).reshape(b, d, side, side)


ClassAndGrid = tuple[torch.Tensor | None, torch.Tensor]  # ([CLS] feature (B, D) or None, grid (B, D, h, w))


class TimmFeatures(nn.Module):
    """Patch features of a timm model: `forward_features` tokens after the prefix tokens, or its feature map;
    its class token's feature when it has one (first of the prefix tokens).

    Args:
        model: a timm model (a `VisionTransformer`, a `Beit`, …, or a CNN whose `forward_features`
            returns (B, D, h, w)).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.dim = model.num_features
        self.model_fmt = getattr(model, "output_fmt", "NCHW")
        self.has_class_token = getattr(model, "cls_token", None) is not None

    def forward(self, x: torch.Tensor) -> ClassAndGrid:
        """(B, C, H, W) teacher-normalized images -> ([CLS] (B, D) or None, (B, D, h, w))."""
        features = self.model.forward_features(x)
        if features.ndim == 4:  # a feature map, channels first unless the model says NHWC (Swin)
            return None, features.permute(0, 3, 1, 2) if self.model_fmt == "NHWC" else features
        cls = features[:, 0] if self.has_class_token else None
        return cls, tokens_to_grid(features[:, self.model.num_prefix_tokens:])


class CLIPFeatures(nn.Module):
    """CLIP's tokens after the final LayerNorm, projected when a projection is given: the patches, and [CLS].

    Args:
        vision_model: a transformers CLIP vision transformer (`CLIPModel.vision_model`, or a
            `CLIPVisionModel`): called on `pixel_values`, it has `post_layernorm`.
        projection: `visual_projection` of a `CLIPModel` / `CLIPVisionModelWithProjection`, or
            `nn.Identity()`.
        dim: width of the output.
    """

    def __init__(self, vision_model: nn.Module, projection: nn.Module, dim: int):
        super().__init__()
        self.vision_model, self.projection, self.dim = vision_model, projection, dim

    def forward(self, x: torch.Tensor) -> ClassAndGrid:
        tokens = self.vision_model(pixel_values=x).last_hidden_state  # [B, 1 + L, D]
        tokens = self.projection(self.vision_model.post_layernorm(tokens))
        return tokens[:, 0], tokens_to_grid(tokens[:, 1:])


class DINOv2Features(nn.Module):
    """DINOv2's final patch tokens (already LayerNorm-ed), after [CLS] and any register tokens; and [CLS].

    Args:
        model: a transformers `Dinov2Model` or `Dinov2WithRegistersModel`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.dim = model.config.hidden_size
        self.prefix = 1 + getattr(model.config, "num_register_tokens", 0)

    def forward(self, x: torch.Tensor) -> ClassAndGrid:
        tokens = self.model(pixel_values=x).last_hidden_state
        return tokens[:, 0], tokens_to_grid(tokens[:, self.prefix:])


class Teacher(nn.Module):
    """A frozen backbone behind an input adapter and an output grid resize (BEiT v2, arXiv:2208.06366).

    Args:
        features: maps (B, in_chans, img_size, img_size) teacher-normalized images to ([CLS] feature (B, D) or
            None, patch features (B, D, h, w)); has `dim`.
        img_size: the backbone's input side.
        in_chans: the backbone's input channels.
        mean, std: the backbone's input normalization (length `in_chans`).
        data_mean, data_std: the normalization of the images given to `forward` (length 1 or `in_chans`).
        grid: the tokenizer's grid side; features are resized to it (bilinear, antialiased) when the
            backbone's grid differs.
        name: what the teacher is, for logs.
    """

    def __init__(self, features: nn.Module, img_size: int, in_chans: int, mean: Sequence[float],
                 std: Sequence[float], data_mean: Sequence[float], data_std: Sequence[float], grid: int,
                 name: str):
        super().__init__()
        if len(data_mean) not in (1, in_chans):
            raise MimkitError(f"teacher {name} reads {in_chans}-channel images; the data has "
                              f"{len(data_mean)} channels")
        self.features = features.eval().requires_grad_(False)
        self.dim, self.img_size, self.grid, self.name = features.dim, img_size, grid, name
        mean, std = torch.tensor(mean), torch.tensor(std)
        data_mean = torch.tensor(data_mean).expand(in_chans)
        data_std = torch.tensor(data_std).expand(in_chans)
        # x_data = (p - m_d) / s_d and x_teacher = (p - m_t) / s_t, so x_teacher = x_data * scale + shift.
        self.register_buffer("scale", (data_std / std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((data_mean - mean) / std).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "Teacher":
        """A teacher stays in eval mode (no dropout, frozen norms) whatever its caller does."""
        return super().train(False)

    @torch.no_grad()
    def forward_class_and_patches(self, imgs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The teacher's [CLS] feature (B, dim), None when its backbone has no class token, and its patch
        features (B, grid * grid, dim) of ``imgs`` (as `forward`)."""
        x = imgs * self.scale + self.shift  # [B, in_chans, H, W]; one channel is repeated
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False)
        cls, features = self.features(x)  # [B, D], [B, D, h, w]
        if features.shape[-2:] != (self.grid, self.grid):
            features = F.interpolate(features.float(), size=(self.grid, self.grid), mode="bilinear",
                                     align_corners=False, antialias=True)
        return cls, features.flatten(2).transpose(1, 2)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """Teacher features of the tokenizer's input.

        Args:
            imgs: (B, C, H, W) images normalized with the data's mean and std.

        Returns:
            (B, grid * grid, dim) patch features, row-major like the tokenizer's patches.
        """
        return self.forward_class_and_patches(imgs)[1]

    def forward_with_class(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) data-normalized images -> (B, 1 + grid * grid, dim): the [CLS] feature, then the patch
        features row-major; a teacher without a class token is refused in one line."""
        cls, patches = self.forward_class_and_patches(imgs)
        if cls is None:
            raise MimkitError(f"teacher '{self.name}' has no class token, whose feature this method "
                              "regresses too; give a ViT teacher (a mimkit run, a timm ViT, CLIP or DINOv2)")
        return torch.cat([cls[:, None].to(patches.dtype), patches], dim=1)


def _mimkit_teacher(path: Path, run_encoder: RunEncoder | None) -> tuple[nn.Module, int, int, list, list]:
    if run_encoder is None:
        raise MimkitError(f"teacher '{path}' is a mimkit run; pass run_encoder to load it")
    model, data = run_encoder(path)
    return TimmFeatures(model), data.img_size, data.channels, data.mean, data.std


def _timm_teacher(name: str, weights: Path) -> tuple[nn.Module, int, int, list, list]:
    if not timm.is_model(name):
        raise MimkitError(f"timm has no model {name!r} (teacher spec timm:NAME:FILE)")
    state = load_tensors(weights)  # before building: a missing file fails fast
    model = timm.create_model(name, pretrained=False, num_classes=0)
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith(("head.", "fc.", "classifier."))]  # dropped heads
    if missing or unexpected:
        raise MimkitError(f"weights in '{weights}' do not fit timm {name}: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    cfg = model.pretrained_cfg
    in_chans, size = cfg["input_size"][0], cfg["input_size"][-1]
    return TimmFeatures(model), size, in_chans, list(cfg["mean"]), list(cfg["std"])


def _preprocessing(folder: Path, config: dict, mean, std) -> tuple[int, list, list]:
    """Input size (the processor's crop, else the config's image size), mean and std of an HF folder."""
    processor_file = folder / "preprocessor_config.json"
    processor = read_json(processor_file) if processor_file.is_file() else {}
    crop = processor.get("crop_size") or config.get("image_size", 224)
    size = crop.get("height", crop.get("shortest_edge")) if isinstance(crop, dict) else crop
    return size, list(processor.get("image_mean", mean)), list(processor.get("image_std", std))


def _from_pretrained(model_class, folder: Path) -> nn.Module:
    """``model_class.from_pretrained(folder)`` from local files only; a pickle that would run code is
    refused in one line (transformers reads ``pytorch_model.bin`` with ``weights_only=True``)."""
    try:
        return model_class.from_pretrained(folder, local_files_only=True)
    except pickle.UnpicklingError as err:
        raise refusal(folder / "pytorch_model.bin", err) from None


def _hf_teacher(folder: Path) -> tuple[nn.Module, int, int, list, list]:
    if not (folder / "config.json").is_file():
        raise MimkitError(f"teacher '{folder}' is not a Hugging Face model folder (no config.json there)")
    import transformers  # only for Hugging Face teachers: it takes seconds to import

    config = read_json(folder / "config.json")
    model_type = config.get("model_type")
    architecture = (config.get("architectures") or [""])[0]
    if model_type == "clip":
        clip = _from_pretrained(transformers.CLIPModel, folder)
        vision = clip.vision_model
        features = CLIPFeatures(vision, clip.visual_projection, clip.config.projection_dim)
        vision_config = config["vision_config"]
    elif model_type == "clip_vision_model" and architecture == "CLIPVisionModelWithProjection":
        clip = _from_pretrained(transformers.CLIPVisionModelWithProjection, folder)
        vision = clip.vision_model
        features = CLIPFeatures(vision, clip.visual_projection, clip.config.projection_dim)
        vision_config = config
    elif model_type == "clip_vision_model":
        clip = _from_pretrained(transformers.CLIPVisionModel, folder)
        vision = getattr(clip, "vision_model", clip)  # transformers 4 wraps the transformer, 5 does not
        features = CLIPFeatures(vision, nn.Identity(), clip.config.hidden_size)
        vision_config = config
    elif model_type in ("dinov2", "dinov2_with_registers"):
        cls = transformers.Dinov2Model if model_type == "dinov2" else transformers.Dinov2WithRegistersModel
        features = DINOv2Features(_from_pretrained(cls, folder))
        # 224 px without a processor file: DINOv2's configs say 518 (its last training stage) but its
        # processor crops 224.
        size, mean, std = _preprocessing(folder, {"image_size": 224}, IMAGENET_DEFAULT_MEAN,
                                         IMAGENET_DEFAULT_STD)
        return features, size, config.get("num_channels", 3), mean, std
    else:
        raise MimkitError(f"'{folder}' holds a {model_type or 'model of unknown type'}; Hugging Face "
                          "teachers are CLIP (clip, clip_vision_model) or DINOv2 (dinov2, "
                          "dinov2_with_registers)")
    size, mean, std = _preprocessing(folder, vision_config, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    return features, size, vision_config.get("num_channels", 3), mean, std


def load_teacher(spec: str, grid: int, data_mean: Sequence[float], data_std: Sequence[float],
                 run_encoder: RunEncoder | None = None) -> Teacher:
    """The frozen teacher a spec names, on the CPU in eval mode; nothing is downloaded.

    Args:
        spec: a mimkit run directory or ``.safetensors`` checkpoint, ``timm:NAME:FILE``, or ``hf:DIR`` /
            a Hugging Face folder (see the module docstring).
        grid: the tokenizer's grid side.
        data_mean, data_std: the normalization of the images the teacher will be given.
        run_encoder: path -> (encoder, its data configuration) of a mimkit run or checkpoint, for the first
            spec form (`mimkit.methods.vqkd.run_encoder`).

    Returns:
        `Teacher`: (B, C, H, W) data-normalized images -> (B, grid * grid, teacher.dim).
    """
    if spec.startswith("timm:"):
        _, name, weights = (spec.split(":", 2) + [""])[:3]
        if not name or not weights:
            raise MimkitError(f"teacher spec {spec!r} must be timm:NAME:FILE")
        parts = _timm_teacher(name, Path(weights))
    elif spec.startswith("hf:"):
        parts = _hf_teacher(Path(spec.removeprefix("hf:")))
    else:
        path = Path(spec)
        if not path.exists():
            raise MimkitError(f"teacher '{spec}' does not exist; give {SPEC_FORMS}")
        if path.is_dir() and (path / "config.json").is_file():  # a mimkit run has no config.json
            parts = _hf_teacher(path)
        else:
            parts = _mimkit_teacher(path, run_encoder)
    features, img_size, in_chans, mean, std = parts
    return Teacher(features, img_size, in_chans, mean, std, data_mean, data_std, grid, spec)
