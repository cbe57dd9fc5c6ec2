"""Absolute position tables at another grid: mimkit's resize is timm's bicubic resample, bit for bit, with
the prefix (class / register token) rows kept; MAE's sin-cos table is recomputed instead."""

import math

import pytest
import torch
import torch.nn.functional as F

from mimkit.errors import MimkitError
from mimkit.models.posembed import (
    _geometric_offsets,
    _spline_weights,
    abs_grid,
    rel_grid,
    resize_abs_pos_embed,
    resize_rel_pos_table,
)
from mimkit.models.vit import sincos_pos_embed_2d


def bicubic_by_hand(table: torch.Tensor, grid: int, prefix: int) -> torch.Tensor:
    """The resize written out: the patch rows as a (D, g, g) image, antialiased bicubic, prefix kept."""
    old = int((table.shape[1] - prefix) ** 0.5)
    patches = table[:, prefix:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(table.dtype)
    return torch.cat([table[:, :prefix], patches], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("old, new", [(4, 6), (6, 4), (14, 16), (14, 7), (4, 4)])
def test_learned_table_resize_is_bit_identical_to_bicubic(old, new, prefix, dtype):
    torch.manual_seed(0)
    table = torch.randn(1, prefix + old * old, 32).to(dtype)
    resized, how = resize_abs_pos_embed(table, new, prefix)
    assert how == "bicubic" and resized.dtype == dtype
    assert resized.shape == (1, prefix + new * new, 32)
    assert torch.equal(resized, bicubic_by_hand(table, new, prefix))
    assert torch.equal(resized[:, :prefix], table[:, :prefix])


def test_sincos_table_is_recomputed_not_resampled():
    resized, how = resize_abs_pos_embed(sincos_pos_embed_2d(32, 4, cls_token=True), 6)
    assert how == "sin-cos recomputed"
    assert torch.equal(resized, sincos_pos_embed_2d(32, 6, cls_token=True))


def test_table_that_is_not_a_square_grid_is_refused():
    with pytest.raises(MimkitError, match="^position table of 16 rows is not 1 \\+ a square grid$"):
        resize_abs_pos_embed(torch.zeros(1, 1 + 15, 8), 4)



def test_the_grid_of_a_table_with_many_prefix_rows_over_a_small_grid():
    """[CLS] and 4 register tokens in front of a 3x3 grid: the grid is read off the rows after the prefix
    (with the prefix counted in, 19 rows would round down to a 4x4 grid)."""
    assert abs_grid(torch.zeros(1, 5 + 9, 8), prefix=5) == 3
    torch.manual_seed(0)
    table = torch.randn(1, 5 + 9, 8)
    resized, how = resize_abs_pos_embed(table, 4, prefix=5)
    assert how == "bicubic" and torch.equal(resized, bicubic_by_hand(table, 4, 5))

def test_geometric_offsets_put_the_old_ends_on_the_new_ends_with_gaps_growing_by_q():
    """BEiT's spacing: gaps 1, q, q**2 from the centre out, q chosen so the last offset is the new grid's last
    (1 + q + q**2 = 5 for a 4x4 grid's offsets read at a 6x6 grid's), and q < 1 when shrinking."""
    q = (17 ** 0.5 - 1) / 2
    expected = torch.tensor([-5, -1 - q, -1, 0, 1, 1 + q, 5], dtype=torch.float64)
    torch.testing.assert_close(_geometric_offsets(3, 5), expected)
    shrunk = _geometric_offsets(5, 3)
    gaps = shrunk[6:] - shrunk[5:-1]
    assert shrunk[-1].item() == pytest.approx(3) and torch.equal(shrunk, -shrunk.flip(0))
    assert gaps[0] == 1 and (gaps[1:] < gaps[:-1]).all()


def cubic(y, x):
    return 0.3 * y**3 - y * x + 0.5 * x**2 + 1


def quadratic(y, x):
    return 0.5 * y**2 - y * x + 2 * x + 1


@pytest.mark.parametrize("function, old, grid", [
    (cubic, _geometric_offsets(3, 5), 6),  # a 4x4 grid's offsets -3..3 placed for a 6x6 grid's -5..5
    # a 2x2 grid has offsets -1, 0, 1 only: too few for a cubic spline, so the interpolating parabola is read
    (quadratic, torch.arange(-1, 2, dtype=torch.float64), 3),
], ids=["cubic spline on BEiT's geometric offsets", "2x2 grid's parabola"])
def test_a_relative_table_is_read_exactly_at_the_new_offsets_where_its_interpolant_is(function, old, grid):
    """A table that is a cubic in the (geometrically spaced) old offsets, or a quadratic in a 2x2 grid's, is
    read exactly at the new grid's integer offsets; the three class-token rows are kept."""
    y, x = torch.meshgrid(old, old, indexing="ij")
    extra = torch.tensor([[7.0], [8.0], [9.0]], dtype=torch.float64)
    table = torch.cat([function(y, x).reshape(-1, 1), extra])
    resized = resize_rel_pos_table(table, grid)
    new = torch.arange(1 - grid, grid, dtype=torch.float64)
    y, x = torch.meshgrid(new, new, indexing="ij")
    torch.testing.assert_close(resized[:-3, 0], function(y, x).flatten())
    old_grid = (len(old) + 1) // 2
    assert torch.equal(resized[-3:], extra) and torch.equal(resize_rel_pos_table(table, old_grid), table)


def test_relative_tables_that_cannot_be_resized_are_refused():
    # 10 rows of offsets: not a square
    with pytest.raises(MimkitError, match=r"^relative position table of 13 rows is not \(2g-1\)\*\*2 \+ 3$"):
        rel_grid(torch.zeros(13, 2))
    # 4 rows of offsets = 2**2: an even span
    with pytest.raises(MimkitError, match=r"^relative position table of 7 rows is not \(2g-1\)\*\*2 \+ 3$"):
        resize_rel_pos_table(torch.zeros(7, 2), 3)
    with pytest.raises(MimkitError, match="between grids 1 and 3"):
        resize_rel_pos_table(torch.zeros(4, 2), 3)
    with pytest.raises(MimkitError, match="between grids 3 and 1"):  # to a grid of one patch
        resize_rel_pos_table(torch.zeros(28, 2), 1)
    assert rel_grid(torch.zeros(28, 2)) == 3


def test_a_learned_table_whose_width_no_sincos_table_has_is_resampled():
    torch.manual_seed(0)
    table = torch.randn(1, 1 + 16, 30)
    resized, how = resize_abs_pos_embed(table, 6)
    assert how == "bicubic" and torch.equal(resized, bicubic_by_hand(table, 6, 1))


def test_the_spline_passes_through_its_knots_and_extends_its_end_pieces():
    """Each offset is read on its own interval: at the knots the spline gives the table's values back whatever
    they are (a cubic table cannot tell the intervals apart: every piece is the same cubic), and beyond the
    ends the end pieces go on (exact for a cubic)."""
    knots = _geometric_offsets(3, 5)
    torch.testing.assert_close(_spline_weights(knots, knots), torch.eye(7, dtype=torch.float64))
    outside = torch.tensor([-6.0, 5.5], dtype=torch.float64)
    torch.testing.assert_close(_spline_weights(knots, outside) @ knots**3, outside**3)
    torch.manual_seed(0)
    table = torch.randn(7 * 7 + 3, 2, dtype=torch.float64)
    resized = resize_rel_pos_table(table, 6).T.reshape(2, -1)[:, :121].reshape(2, 11, 11)
    on_knots = [0, 4, 5, 6, 10]  # the new offsets -5, -1, 0, 1, 5 are old ones (old rows 0, 2, 3, 4, 6)
    old = table[:49].T.reshape(2, 7, 7)[:, [0, 2, 3, 4, 6]][:, :, [0, 2, 3, 4, 6]]
    torch.testing.assert_close(resized[:, on_knots][:, :, on_knots], old)


def not_a_knot_spline(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The not-a-knot cubic spline through (x, y) read at t, solved for each piece's 4 coefficients at once:
    both ends of each piece on the data, first and second derivatives continuous at the inner knots, and the
    third continuous at the second and the second-to-last knot."""
    m = len(x) - 1

    def row(piece, at, order):
        out = torch.zeros(4 * m, dtype=torch.float64)
        for j in range(order, 4):
            out[4 * piece + j] = math.perm(j, order) * (at - x[piece]) ** (j - order)
        return out

    rows = [row(p, x[p + e], 0) for p in range(m) for e in (0, 1)]
    values = [y[p + e] for p in range(m) for e in (0, 1)]
    for p in range(m - 1):
        rows += [row(p, x[p + 1], order) - row(p + 1, x[p + 1], order) for order in (1, 2)]
    rows += [row(0, x[1], 3) - row(1, x[1], 3), row(m - 2, x[m - 1], 3) - row(m - 1, x[m - 1], 3)]
    coefficients = torch.linalg.solve(torch.stack(rows), torch.tensor(values + [0.0] * (2 * m)))
    piece = (torch.searchsorted(x, t, right=True) - 1).clamp(0, m - 1)
    return torch.stack([sum(coefficients[4 * p + j] * (s - x[p]) ** j for j in range(4))
                        for p, s in zip(piece, t, strict=True)])


def test_the_spline_between_the_knots_is_the_not_a_knot_spline_of_the_data():
    torch.manual_seed(0)
    knots, y = _geometric_offsets(3, 5), torch.randn(7, dtype=torch.float64)
    t = torch.linspace(-5, 5, 23, dtype=torch.float64)
    torch.testing.assert_close(_spline_weights(knots, t) @ y, not_a_knot_spline(knots, y, t))
