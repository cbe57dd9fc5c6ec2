import math
import time

import numpy as np
import pytest
import torch

from mimkit import masking
from mimkit.errors import MimkitError
from mimkit.masking import (
    block_mask,
    checked_block_count,
    count_for_ratio,
    default_min_block,
    random_mask,
    sample_blocks,
)

GRIDS = [(14, 14, 75), (7, 7, 20), (8, 8, 26), (4, 6, 10)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def replay(grid_h, grid_w, blocks):
    """Patches each block newly masked, and the union of the blocks."""
    covered = np.zeros((grid_h, grid_w), dtype=bool)
    new = []
    for top, left, h, w in blocks:
        window = covered[top:top + h, left:left + w]
        new.append(h * w - int(window.sum()))
        window[...] = True
    return new, covered


@pytest.mark.parametrize("num_patches, ratio, expected", [(196, 0.4, 78), (49, 0.4, 20), (196, 0.75, 147),
                                                          (49, 0.0, 0), (49, 1.0, 49)])
def test_count_for_ratio(num_patches, ratio, expected):
    assert count_for_ratio(num_patches, ratio) == expected


def test_count_for_ratio_rejects_bad_ratio():
    with pytest.raises(MimkitError, match="1.5"):
        count_for_ratio(196, 1.5)


def test_default_min_block_scales_with_grid_area():
    assert default_min_block(14, 14) == 16
    assert default_min_block(7, 7) == 4
    assert default_min_block(2, 2) == 1
    assert default_min_block(6, 6) == 3 and default_min_block(4, 6) == 2  # 2.94 and 1.96 round up
    assert default_min_block(8, 8) == 5  # 5.22 rounds down


@pytest.mark.parametrize("num_masked", [0, 1, 147, 196])
def test_random_mask_exact_count_and_seeded(num_masked):
    mask = random_mask(196, num_masked, generator=gen(0))
    assert mask.dtype == torch.bool and mask.shape == (196,)
    assert int(mask.sum()) == num_masked
    assert torch.equal(mask, random_mask(196, num_masked, generator=gen(0)))


def test_random_mask_differs_across_seeds():
    assert not torch.equal(random_mask(196, 98, generator=gen(0)), random_mask(196, 98, generator=gen(1)))


@pytest.mark.parametrize("grid_h, grid_w, num_masked", GRIDS)
def test_block_mask_exact_count_every_time(grid_h, grid_w, num_masked):
    g = gen(0)
    for _ in range(300):
        mask = block_mask(grid_h, grid_w, num_masked, generator=g)
        assert mask.dtype == torch.bool and mask.shape == (grid_h, grid_w)
        assert int(mask.sum()) == num_masked


@pytest.mark.parametrize("num_masked", [0, 1, 15, 196])
def test_block_mask_edge_counts(num_masked):
    assert int(block_mask(14, 14, num_masked, generator=gen(0)).sum()) == num_masked


def test_block_mask_reproducible_from_seed_and_global_rng():
    first = [block_mask(14, 14, 75, generator=gen(3)) for _ in range(5)]
    again = [block_mask(14, 14, 75, generator=gen(3)) for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], block_mask(14, 14, 75, generator=gen(4)))
    torch.manual_seed(7)
    a = block_mask(7, 7, 20)
    torch.manual_seed(7)
    assert torch.equal(a, block_mask(7, 7, 20))


@pytest.mark.parametrize("grid_h, grid_w, num_masked", GRIDS)
def test_blocks_within_bounds_and_ranges(grid_h, grid_w, num_masked):
    min_block, aspect = default_min_block(grid_h, grid_w), (0.3, 1 / 0.3)
    g = gen(1)
    filled = 0
    for _ in range(300):
        mask, blocks = sample_blocks(grid_h, grid_w, num_masked, generator=g)
        new, covered = replay(grid_h, grid_w, blocks)
        remaining = num_masked
        for (top, left, h, w), n in zip(blocks, new, strict=True):
            assert 0 <= top and top + h <= grid_h and 0 <= left and left + w <= grid_w
            assert aspect[0] <= h / w <= aspect[1]
            assert 1 <= n <= remaining  # only new patches count, never past the target
            if remaining >= min_block:  # not the tail: a real block
                assert min_block <= h * w <= num_masked
            remaining -= n
        assert (mask.numpy() | ~covered).all()  # every block is inside the mask
        filled += int(covered.sum()) < num_masked
    assert filled / 300 < 0.05  # the random fill-in is a rare fallback


def test_max_block_is_respected():
    for _ in range(100):
        _, blocks = sample_blocks(14, 14, 75, max_block=20, generator=gen(_))
        assert all(h * w <= 20 for _, _, h, w in blocks)


def test_block_shape_statistics():
    # The first block of a mask sees the full ranges: area ~ U[16, 75], log(h/w) ~ U[log .3, log 1/.3].
    g = gen(2)
    firsts = [sample_blocks(14, 14, 75, generator=g)[1][0] for _ in range(2000)]
    h = np.array([b[2] for b in firsts], dtype=float)
    w = np.array([b[3] for b in firsts], dtype=float)
    log_aspect = np.log(h / w)
    assert abs(log_aspect.mean()) < 0.05  # symmetric: as many tall as wide blocks
    assert log_aspect.min() < math.log(0.4) and log_aspect.max() > math.log(1 / 0.4)  # the range is used
    area = h * w
    assert 16 <= area.min() and area.max() <= 75
    assert 40 < area.mean() < 50  # ~ (16 + 75) / 2 = 45.5, up to rounding and the aspect/fit checks


def test_block_mask_is_fast():
    g = gen(0)
    start = time.perf_counter()
    for _ in range(1000):
        block_mask(14, 14, 75, generator=g)
    assert (time.perf_counter() - start) / 1000 < 1e-3  # ~0.035 ms on an idle core; 1 ms leaves room


@pytest.mark.parametrize("kwargs, needle", [(dict(num_masked=200), "200"), (dict(min_block=0), "min_block=0"),
                                            (dict(min_block=30, max_block=20), "max_block=20"),
                                            (dict(aspect=(2.0, 1.0)), "aspect")])
def test_block_mask_rejects_bad_arguments(kwargs, needle):
    with pytest.raises(MimkitError, match=needle):
        block_mask(**{"grid_h": 14, "grid_w": 14, "num_masked": 75, **kwargs})


def test_checked_block_count_takes_a_min_block_as_large_as_the_masked_count():
    """One block may hold every masked patch: 4 of a 4x4 grid in blocks of at least 4 is a valid setting,
    5 is refused."""
    assert checked_block_count("maskfeat", 4, 0.25, 4) == 4
    with pytest.raises(MimkitError, match="maskfeat.min_block=5 is more than the 4 patches masked"):
        checked_block_count("maskfeat", 4, 0.25, 5)
    with pytest.raises(MimkitError, match="min_block=0, max_block=4 need 1 <= min <= max"):  # a trial mask
        checked_block_count("maskfeat", 4, 0.25, 0)


@pytest.mark.parametrize("ratio, masked", [(0.01, 0), (1.0, 16)])
def test_checked_block_count_refuses_a_ratio_that_masks_none_or_all(ratio, masked):
    with pytest.raises(MimkitError, match=f"maskfeat.mask_ratio={ratio} masks {masked} of the 16 patches; it "
                                          "must mask some and leave some"):
        checked_block_count("maskfeat", 4, ratio, None)


def test_block_masks_take_beits_aspect_range_by_default():
    """BEiT's blocks have an aspect ratio h/w between 0.3 and 1/0.3 (`block_mask` is what methods call)."""
    for seed in range(5):
        expected = sample_blocks(14, 14, 75, aspect=(0.3, 1 / 0.3), generator=gen(seed))[0]
        assert torch.equal(block_mask(14, 14, 75, generator=gen(seed)), expected)
        assert torch.equal(sample_blocks(14, 14, 75, generator=gen(seed))[0], expected)


def test_a_stalled_mask_is_finished_from_its_own_generator():
    """No block of 7 patches fits a 4x4 grid (7 is prime): every patch comes from the patch-by-patch
    fallback, which draws from the mask's generator (reproducible, the global RNG left alone)."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    masks = [sample_blocks(4, 4, 7, min_block=7, generator=gen(seed)) for seed in (1, 1, 2)]
    assert torch.equal(torch.get_rng_state(), before)
    assert masks[0][1] == [] and int(masks[0][0].sum()) == 7
    assert torch.equal(masks[0][0], masks[1][0]) and not torch.equal(masks[0][0], masks[2][0])


def test_checked_block_count_leaves_the_global_rng_alone():
    """The start-up check places a trial mask with its own generator: a run's random stream (its model's
    init, drawn after the check) is the same with or without it."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    checked_block_count("data2vec", 8, 0.4, None)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("grid_h, grid_w", [(2, 4), (4, 2)])
def test_a_block_may_span_the_whole_grid_side(grid_h, grid_w):
    """The only block of 4 within the default aspect range on a 2-patch-wide grid is 2x2, as tall (or as
    wide) as the grid: it is placed as a block, not left to the single-patch fill of a stalled draw."""
    mask, blocks = sample_blocks(grid_h, grid_w, 4, min_block=4, generator=torch.Generator().manual_seed(0))
    assert len(blocks) == 1 and blocks[0][2:] == (2, 2)
    top, left, h, w = blocks[0]
    assert mask[top:top + h, left:left + w].all() and mask.sum() == 4


def test_blocks_reach_every_edge_of_the_grid():
    """A block's top-left corner is drawn over every place it fits: some of 200 drawn blocks touch the last
    row and the last column, as some touch the first."""
    blocks = [block for seed in range(200) for block in
              sample_blocks(6, 6, 6, min_block=4, generator=torch.Generator().manual_seed(seed))[1]]
    assert min(top for top, *_ in blocks) == 0 and min(left for _, left, *_ in blocks) == 0
    assert max(top + h for top, _, h, _ in blocks) == 6 and max(left + w for _, left, _, w in blocks) == 6


# Scripted draws of `sample_blocks` on an 8x8 grid, blocks of exactly 4 patches: (u_area, u_aspect, u_top,
# u_left). Area 4 at aspect 1 is a 2x2 block; aspect 0.3 gives 1x4, whose h/w of 0.25 is refused.
TOP_LEFT, BOTTOM_RIGHT, TOO_FLAT = (0.0, 0.5, 0.0, 0.0), (0.0, 0.5, 0.99, 0.99), (0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("tries, blocks", [
    ([TOO_FLAT] * 9 + [TOP_LEFT] + [TOP_LEFT] * 9 + [BOTTOM_RIGHT], [(0, 0, 2, 2), (6, 6, 2, 2)]),
    ([TOO_FLAT] * 10 + [TOP_LEFT, BOTTOM_RIGHT], []),
    ([TOP_LEFT] * 11 + [BOTTOM_RIGHT], [(0, 0, 2, 2)]),
], ids=["nine-failures-then-a-block", "ten-failures-at-the-start", "ten-failures-after-a-block"])
def test_a_block_gets_ten_tries_counted_afresh_after_each_kept_block(monkeypatch, tries, blocks):
    """BEiT's patience: a block is placed if one of its 10 tries succeeds (a refused shape, or a block that
    adds no new patch, is a failed try); 10 failures in a row stop the placing, and the rest of the count
    comes from single patches. The count starts afresh at the first block and after every kept block."""
    monkeypatch.setattr(masking, "_uniform_tries", lambda generator: iter(tries))
    mask, placed = sample_blocks(8, 8, 8, min_block=4, max_block=4, generator=gen(0))
    assert placed == blocks and int(mask.sum()) == 8
    for top, left, h, w in blocks:
        assert mask[top:top + h, left:left + w].all()


@pytest.mark.parametrize("u_aspect, shape", [(0.0, (3, 10)), (1.0, (10, 3))], ids=["0.3", "1/0.3"])
def test_a_block_at_either_end_of_the_aspect_range_is_kept(monkeypatch, u_aspect, shape):
    """The aspect range is closed: 30 patches drawn at aspect 0.3 (or 1/0.3) make a 3x10 (10x3) block, whose
    h/w is exactly the bound, and it is placed, not refused for the fill of single patches."""
    monkeypatch.setattr(masking, "_uniform_tries", lambda generator: iter([(0.0, u_aspect, 0.0, 0.0)]))
    mask, placed = sample_blocks(10, 10, 30, min_block=30, generator=gen(0))
    assert placed == [(0, 0, *shape)]
    assert mask[:shape[0], :shape[1]].all() and int(mask.sum()) == 30


@pytest.mark.parametrize("num_masked", [-1, 17])
def test_random_mask_refuses_a_count_outside_the_patches(num_masked):
    """Unchecked, -1 would mask all but one patch (`randperm[:-1]`) and 17 all 16, without a word."""
    with pytest.raises(MimkitError, match=f"cannot mask {num_masked} of 16 patches; use 0..16"):
        random_mask(16, num_masked, generator=gen(0))
