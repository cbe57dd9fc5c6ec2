"""Views: what a method makes of one uint8 image, built from torchvision.transforms.v2.

A view is a callable `view(image uint8 (C, H, W)) -> dict[str, Tensor]`. It draws from the global torch
RNG; the loader seeds that RNG per sample (`mimkit.data.loader.SeededViews`), so crops, flips and mask
noise are reproducible, resumable and the same under DDP. Views are small classes, not closures, so
DataLoader workers started with spawn/forkserver can pickle them.

Building blocks for new views: `normalize` (uint8 -> normalized float, the last step of every view)
and `ImageView` (wraps one transform as `{"image": ...}`); `CropView` is the random resized crop + flip
that MAE and the dVAE train on (`crop_view`; `mae_view` adds MAE's mask noise), in stages that let the
loader draw the crop before decoding and hand over uint8; `BEiTView` crops once
for two resolutions (the ViT's and the tokenizer's) and adds BEiT's block mask.
"""

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as TF

from mimkit.errors import MimkitError
from mimkit.masking import block_mask

BICUBIC = v2.InterpolationMode.BICUBIC
# Below this side images are small (Fashion-MNIST, CIFAR): evaluation resizes them whole instead of
# taking the ImageNet-style central crop.
CENTER_CROP_MIN_SIZE = 128
IMAGENET_CROP_PCT = 0.875  # 224 of 256


def normalize(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """uint8 `(C, H, W)` -> float32 in [0, 1] -> `(x - mean) / std` per channel."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo `normalize` for pictures.

    Args:
        x: normalized images `(..., C, H, W)`.
        mean, std: the normalization that was applied, length C.

    Returns:
        float images in [0, 1], same shape as `x` (clamped: reconstructions can overshoot).
    """
    shape = (-1, 1, 1)
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x * std + mean).clamp(0, 1)


class ImageView:
    """`image -> {"image": transform(image)}`."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.transform = transform

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image": self.transform(image)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


class StagedView:
    """A view cut into the stages a loader runs in different places (`mimkit.data.loader.SeededViews`):
    ``draw_box(height, width)``, the crop box from the image's size alone; ``from_crop(crop)``, the uint8
    item a worker hands over; ``on_device(batch)``, the float conversion and what follows it. A subclass
    gives those three; the whole image's path is theirs in order, with the same draws (so the same pixels)."""

    def from_image(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 `(C, H, W)` decoded whole -> the uint8 item of `from_crop`, its box drawn from the image."""
        top, left, height, width = self.draw_box(*image.shape[-2:])
        return self.from_crop(image[..., top:top + height, left:left + width])

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.on_device(self.from_image(image))


class CropView(StagedView):
    """Random resized crop (bicubic), horizontal flip, normalize, and optionally MAE's mask noise.

    Called on a uint8 image it returns the normalized view, like any view. It is also cut into the three
    stages a loader runs in different places, with the same random draws in the same order (so the same
    pixels):

    - `draw_box(height, width)`: the crop box, drawn from the image's size alone, so it can be drawn from
      a JPEG's header before decoding (`mimkit.data.crop_decode`);
    - `from_crop(crop)`: uint8 crop -> `{"image": uint8 (C, size, size), ...}`, what a data worker hands
      over: resized, flipped, and the mask noise drawn;
    - `on_device(batch)`: the float conversion and normalization, on the training device.

    Drawing the mask noise here rather than in the model ties the mask to the sample's seed.

    Args:
        size: output side.
        mean, std: per-channel normalization.
        scale: area range of the crop, as a fraction of the image.
        num_patches: L, the number of mask-noise values (MAE: their argsort is the random mask); 0 for none.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float],
                 scale: tuple[float, float] = (0.2, 1.0), num_patches: int = 0):
        self.size, self.num_patches = size, num_patches
        self.crop = v2.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC, antialias=True)
        self.flip = v2.RandomHorizontalFlip()
        self.normalize = normalize(mean, std)

    def draw_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """`(top, left, height, width)` of the crop of an image of this size; draws from the torch RNG."""
        shape_only = torch.empty(()).expand(1, height, width)  # no memory: the draw reads the size only
        box = self.crop.make_params([shape_only])
        return box["top"], box["left"], box["height"], box["width"]

    def from_crop(self, crop: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 `(C, h, w)` crop -> `{"image": uint8 (C, size, size)}` (+ `"noise"` float `(L,)`).

        The image comes out contiguous whatever the crop's memory layout: a crop decode's pixels lie
        channel-last (`[h, w, C]` in memory), which the resize reads ~1.5x faster, but normalizing that
        layout costs ~5x a contiguous image's (measured in `benchmarks/RESULTS.md`)."""
        resized = TF.resize(crop, [self.size, self.size], interpolation=BICUBIC, antialias=True)
        image = self.flip(resized.contiguous())
        return {"image": image} | ({"noise": torch.rand(self.num_patches)} if self.num_patches else {})

    def on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Normalize the uint8 `"image"` of an item or a batch `(..., C, H, W)`, wherever it lies."""
        return batch | {"image": self.normalize(batch["image"])}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, crop={self.crop}, flip={self.flip}, "
                f"normalize={self.normalize}, num_patches={self.num_patches})")


def crop_view(img_size: int, mean: Sequence[float], std: Sequence[float],
              scale: tuple[float, float] = (0.2, 1.0)) -> CropView:
    """Random resized crop (bicubic), horizontal flip, normalize.

    Args:
        img_size: output side.
        mean, std: per-channel normalization.
        scale: area range of the crop, as a fraction of the image.

    Returns:
        view: uint8 `(C, H, W)` -> `{"image": float (C, img_size, img_size)}`.
    """
    return CropView(img_size, mean, std, scale)


def mae_view(img_size: int, mean: Sequence[float], std: Sequence[float], patch_size: int,
             scale: tuple[float, float] = (0.2, 1.0)) -> CropView:
    """MAE pretraining view: random resized crop (bicubic), horizontal flip, normalize, mask noise.

    - He et al., Masked Autoencoders Are Scalable Vision Learners, 2021, arXiv:2111.06377
      (appendix A.1: RandomResizedCrop with scale (0.2, 1.0) and flips only)

    Args:
        img_size: output side.
        mean, std: per-channel normalization.
        patch_size: the encoder's patch side; sets L = (img_size // patch_size) ** 2.
        scale: area range of the crop, as a fraction of the image.

    Returns:
        view: uint8 `(C, H, W)` -> `{"image": float (C, img_size, img_size), "noise": float (L,)}`.
    """
    if img_size % patch_size:
        raise MimkitError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
    return CropView(img_size, mean, std, scale, (img_size // patch_size) ** 2)


class BEiTView:
    """BEiT's pretraining view: one random crop seen at two resolutions, and a block mask.

    Color jitter and the flip act on the image first, so both views show the same content; the crop
    is resized to `img_size` for the ViT and to `tokenizer_size` for the tokenizer (BEiT: 224 and
    112 px). The mask is drawn here rather than in the model so that it follows the sample's seed.

    - BEiT: Bao et al., 2021, arXiv:2106.08254 (section 2.5: crop, flip, color jitter; block masking)

    Args:
        img_size: side of the ViT's view.
        tokenizer_size: side of the tokenizer's view.
        mean, std: normalization of the ViT's view.
        tokenizer_mean, tokenizer_std: normalization the tokenizer was trained with.
        grid: the ViT's patch grid side.
        num_masked: patches to mask, exactly (`mimkit.masking.count_for_ratio`).
        min_block: smallest block in patches; None scales BEiT's 16 of 14x14 to the grid.
        scale: area range of the crop, as a fraction of the image.
        color_jitter: brightness, contrast and saturation jitter strength; 0 turns it off.

    Returns (when called on uint8 `(C, H, W)`):
        `{"image": float (C, img_size, img_size), "tokenizer_image": float (C, tokenizer_size,
        tokenizer_size), "mask": bool (grid * grid,)}`, the mask True where a patch is hidden.
    """

    ratio = (3 / 4, 4 / 3)  # aspect range of the crop

    def __init__(self, img_size: int, tokenizer_size: int, mean: Sequence[float], std: Sequence[float],
                 tokenizer_mean: Sequence[float], tokenizer_std: Sequence[float], grid: int, num_masked: int,
                 min_block: int | None = None, scale: tuple[float, float] = (0.08, 1.0),
                 color_jitter: float = 0.4):
        self.img_size, self.tokenizer_size, self.scale = img_size, tokenizer_size, scale
        self.grid, self.num_masked, self.min_block = grid, num_masked, min_block
        jitter = v2.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter else v2.Identity()
        self.augment = v2.Compose([jitter, v2.RandomHorizontalFlip()])
        self.normalize = normalize(mean, std)
        self.tokenizer_normalize = normalize(tokenizer_mean, tokenizer_std)

    def _resize(self, crop: tuple[int, int, int, int], image: torch.Tensor, size: int) -> torch.Tensor:
        return TF.resized_crop(image, *crop, [size, size], interpolation=BICUBIC, antialias=True)

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        image = self.augment(image)
        crop = RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))  # top, left, h, w
        mask = block_mask(self.grid, self.grid, self.num_masked, self.min_block)
        return {"image": self.normalize(self._resize(crop, image, self.img_size)),
                "tokenizer_image": self.tokenizer_normalize(self._resize(crop, image, self.tokenizer_size)),
                "mask": mask.flatten()}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(img_size={self.img_size}, tokenizer_size={self.tokenizer_size}, "
                f"grid={self.grid}, num_masked={self.num_masked}, scale={self.scale}, "
                f"augment={self.augment})")


def eval_view(img_size: int, mean: Sequence[float], std: Sequence[float],
              crop_pct: float | None = None) -> ImageView:
    """Deterministic evaluation view: resize the short side to `img_size / crop_pct`, center crop, normalize.

    `crop_pct` defaults to 0.875 (256 -> 224, the ImageNet convention) from `img_size` 128 up, and to
    1.0 below, where images are small and a crop would cut away content: they are resized whole.

    Args:
        img_size: output side.
        mean, std: per-channel normalization.
        crop_pct: fraction of the resized short side kept by the center crop, in (0, 1].

    Returns:
        view: uint8 `(C, H, W)` -> `{"image": float (C, img_size, img_size)}`.
    """
    if crop_pct is None:
        crop_pct = IMAGENET_CROP_PCT if img_size >= CENTER_CROP_MIN_SIZE else 1.0
    if not 0 < crop_pct <= 1:
        raise MimkitError(f"crop_pct={crop_pct} must be in (0, 1]")
    return ImageView(v2.Compose([
        v2.Resize(int(img_size / crop_pct), interpolation=BICUBIC, antialias=True),
        v2.CenterCrop(img_size),
        normalize(mean, std),
    ]))
