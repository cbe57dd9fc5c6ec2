"""Which patches to mask: uniform random (MAE) and block-wise (BEiT).

Every function is a pure function of a `torch.Generator` (or of the global torch RNG when none is
given, which the data loader seeds per sample), so masks are reproducible and resumable.

- MAE, He et al. 2021, arXiv:2111.06377 (random masking, 75%).
- BEiT, Bao et al. 2021, arXiv:2106.08254 (block-wise masking, ~40%, blocks >= 16 of 14x14 patches).
"""

import math

import numpy as np
import torch

from mimkit.errors import MimkitError

# BEiT's reference setting: blocks of at least 16 patches on a 14x14 grid (224 px, patch 16).
_REF_MIN_BLOCK, _REF_NUM_PATCHES = 16, 196
# BEiT gives a block up to 10 tries before it stops placing blocks.
_PATIENCE = 10


def count_for_ratio(num_patches: int, ratio: float) -> int:
    """Number of patches to mask for a masking ratio, rounded half up (40% of 49 -> 20).

    Args:
        num_patches: L, patches in the image.
        ratio: fraction of patches to mask, in [0, 1].

    Returns:
        An int in [0, num_patches].
    """
    if not 0.0 <= ratio <= 1.0:
        raise MimkitError(f"mask ratio {ratio} is outside [0, 1]")
    return int(math.floor(num_patches * ratio + 0.5))


def _check_count(num_patches: int, num_masked: int) -> None:
    if not 0 <= num_masked <= num_patches:
        raise MimkitError(f"cannot mask {num_masked} of {num_patches} patches; use 0..{num_patches}")


def random_mask(num_patches: int, num_masked: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask `num_masked` patches chosen uniformly at random (MAE, arXiv:2111.06377).

    Args:
        num_patches: L, patches in the image.
        num_masked: how many to mask, exactly.
        generator: source of randomness; the global torch RNG when None.

    Returns:
        mask: bool (L,), True where a patch is masked.
    """
    _check_count(num_patches, num_masked)
    mask = torch.zeros(num_patches, dtype=torch.bool)
    mask[torch.randperm(num_patches, generator=generator)[:num_masked]] = True
    return mask


def _uniform_tries(generator: torch.Generator | None, chunk: int = 16):
    """Endless (area, aspect, top, left) uniforms, drawn `chunk` tries per torch call.

    Drawing in chunks and looping over Python floats is ~10x faster than a torch call per number.
    """
    while True:
        yield from torch.rand(chunk, 4, generator=generator).tolist()


def default_min_block(grid_h: int, grid_w: int) -> int:
    """BEiT's minimum block size scaled by grid area: 16 at 14x14, 4 at 7x7, 5 at 8x8, at least 1.

    Scaling by area keeps the blocks the same share of the image (a 4x4 block is ~8% of a 14x14
    grid; a 2x2 block is ~8% of 7x7), so small grids such as Fashion-MNIST's are masked alike.
    """
    return max(1, round(_REF_MIN_BLOCK * grid_h * grid_w / _REF_NUM_PATCHES))


def sample_blocks(
    grid_h: int,
    grid_w: int,
    num_masked: int,
    min_block: int | None = None,
    max_block: int | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
    """BEiT's block-wise masking, also returning the rectangles it placed (BEiT, arXiv:2106.08254).

    Blocks are placed one after another until `num_masked` patches are masked. Each try draws a
    target area uniformly in [min(min_block, cap), cap], where cap = min(max_block, patches still to
    mask), and an aspect ratio h/w log-uniformly in `aspect`; h and w are the rounded
    sqrt(area * ratio) and sqrt(area / ratio). A try is kept when the rectangle fits the grid, its
    ratio h/w is in `aspect`, its area h*w is in [min_block, max_block], and it masks at least one
    and at most the remaining number of *new* patches (overlaps count once). Once fewer than
    min_block patches remain (the tail), blocks of any area >= 1 are kept, so the count can be met.

    When a block fails `_PATIENCE` (10) tries in a row, as in BEiT, the remaining patches are drawn
    uniformly among the unmasked ones, so the count is always exact. That happens in ~0.6% of masks
    at 14x14 / 75 and at 7x7 / 20, for a handful of patches (measured over 5000 masks).

    Args:
        grid_h, grid_w: patch grid.
        num_masked: patches to mask, exactly.
        min_block: smallest block in patches; `default_min_block(grid_h, grid_w)` when None.
        max_block: largest block in patches; `max(num_masked, min_block)` when None.
        aspect: (low, high) bounds of the aspect ratio h/w.
        generator: source of randomness; the global torch RNG when None.

    Returns:
        mask: bool (grid_h, grid_w), True where masked, exactly `num_masked` True.
        blocks: the kept rectangles as (top, left, h, w), in placement order.
    """
    num_patches = grid_h * grid_w
    _check_count(num_patches, num_masked)
    min_block = default_min_block(grid_h, grid_w) if min_block is None else min_block
    max_block = max(num_masked, min_block) if max_block is None else max_block
    if min_block < 1 or max_block < min_block:
        raise MimkitError(f"block sizes min_block={min_block}, max_block={max_block} need 1 <= min <= max")
    if not 0 < aspect[0] <= aspect[1]:
        raise MimkitError(f"aspect range {aspect} needs 0 < low <= high")
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])

    mask = np.zeros((grid_h, grid_w), dtype=bool)
    blocks = []
    remaining = num_masked
    tries = _uniform_tries(generator)
    failures = 0
    while remaining and failures < _PATIENCE:
        u_area, u_aspect, u_top, u_left = next(tries)
        cap = min(max_block, remaining)
        lo = min(min_block, cap)
        area = lo + u_area * (cap - lo)
        ratio = math.exp(log_lo + u_aspect * (log_hi - log_lo))
        h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        least = min_block if cap >= min_block else 1  # the tail: any size that adds few enough patches
        failures += 1
        if not (1 <= h <= grid_h and 1 <= w <= grid_w and least <= h * w <= max_block
                and aspect[0] <= h / w <= aspect[1]):
            continue
        top, left = int(u_top * (grid_h - h + 1)), int(u_left * (grid_w - w + 1))
        window = mask[top:top + h, left:left + w]
        new = h * w - int(window.sum())
        if 0 < new <= remaining:
            window[...] = True
            blocks.append((top, left, h, w))
            remaining -= new
            failures = 0

    if remaining:  # stalled: finish with single patches drawn uniformly among the unmasked ones
        free = np.flatnonzero(~mask)
        pick = torch.randperm(len(free), generator=generator)[:remaining].numpy()
        mask.reshape(-1)[free[pick]] = True
    return torch.from_numpy(mask), blocks


def block_mask(
    grid_h: int,
    grid_w: int,
    num_masked: int,
    min_block: int | None = None,
    max_block: int | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """BEiT's block-wise mask of exactly `num_masked` patches (BEiT, arXiv:2106.08254).

    See `sample_blocks` for the procedure and the arguments.

    Returns:
        mask: bool (grid_h, grid_w), True where masked; `.flatten()` gives BEiT's (L,) order.
    """
    return sample_blocks(grid_h, grid_w, num_masked, min_block, max_block, aspect, generator)[0]


def checked_block_count(section: str, grid: int, ratio: float, min_block: int | None) -> int:
    """How many of a ``grid`` x ``grid`` image's patches a run's block-wise masking hides, refused before
    training starts when it would hide none or all, or when its blocks cannot be placed.

    Args:
        section: the method's settings section, named in the errors (``maskfeat``).
        grid: patches per side.
        ratio, min_block: the section's ``mask_ratio`` and ``min_block``.
    """
    num_patches = grid * grid
    num_masked = count_for_ratio(num_patches, ratio)
    if not 0 < num_masked < num_patches:
        raise MimkitError(f"{section}.mask_ratio={ratio} masks {num_masked} of the {num_patches} patches; it "
                          "must mask some and leave some")
    if min_block is not None and min_block > num_masked:
        raise MimkitError(f"{section}.min_block={min_block} is more than the {num_masked} patches masked "
                          f"({section}.mask_ratio={ratio} of {num_patches})")
    block_mask(grid, grid, num_masked, min_block, generator=torch.Generator())  # the global RNG left alone
    return num_masked
