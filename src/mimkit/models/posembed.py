"""Position tables at another image size: absolute tables (ViT, MAE) and relative bias tables (BEiT).

- Absolute tables ``(1, 1 + g*g, D)``: MAE's fixed 2-D sin-cos table is recomputed for the new grid
  (exact: it is a function of the grid); a learned table is resampled bicubically over the grid, the
  class token's row kept (timm's `resample_abs_pos_embed`, the resize timm's own models use).
- Relative position bias tables ``((2g-1)**2 + 3, heads)`` (BEiT): each head's ``(2g-1, 2g-1)`` grid of
  offsets is resampled as in the BEiT reference code: the old offsets are spread along a geometric
  progression so that the small offsets, which matter most, keep their spacing, and a cubic spline
  through them is read at the new integer offsets. The last three rows (class-token relations) are kept.

- ViT: Dosovitskiy et al., 2020, arXiv:2010.11929 (bicubic resizing for fine-tuning at higher resolution)
- BEiT: Bao et al., 2021, arXiv:2106.08254
"""

import math

import torch
from timm.layers import resample_abs_pos_embed

from mimkit.errors import MimkitError
from mimkit.models.vit import sincos_pos_embed_2d

REL_EXTRA_ROWS = 3  # class->patch, patch->class and class->class biases at the end of a BEiT table


def abs_grid(table: torch.Tensor, prefix: int = 1) -> int:
    """Grid side of an absolute table ``(1, prefix + g*g, D)``."""
    side = math.isqrt(table.shape[1] - prefix)
    if side * side != table.shape[1] - prefix:
        raise MimkitError(f"position table of {table.shape[1]} rows is not {prefix} + a square grid")
    return side


def rel_grid(table: torch.Tensor) -> int:
    """Grid side g of a BEiT relative table ``((2g-1)**2 + 3, heads)``."""
    span = math.isqrt(table.shape[0] - REL_EXTRA_ROWS)
    if span * span != table.shape[0] - REL_EXTRA_ROWS or span % 2 == 0:
        raise MimkitError(f"relative position table of {table.shape[0]} rows is not (2g-1)**2 + 3")
    return (span + 1) // 2


def is_sincos(table: torch.Tensor) -> bool:
    """Whether ``table`` (1, 1 + g*g, D) is MAE's fixed sin-cos table with a zero class-token row."""
    dim = table.shape[-1]
    if dim % 4:
        return False
    expected = sincos_pos_embed_2d(dim, abs_grid(table), cls_token=True)
    return torch.allclose(table.float(), expected, atol=1e-5)


def resize_abs_pos_embed(table: torch.Tensor, grid: int, prefix: int = 1) -> tuple[torch.Tensor, str]:
    """An absolute position table for a ``grid x grid`` patch grid.

    Args:
        table: (1, prefix + g*g, D), the first ``prefix`` rows for class tokens.
        grid: the new grid side.
        prefix: rows in front that belong to no patch (kept as they are).

    Returns:
        The table (1, prefix + grid*grid, D) and how it was made ("sin-cos recomputed" or "bicubic").
    """
    old = abs_grid(table, prefix)
    if prefix == 1 and is_sincos(table):
        table = sincos_pos_embed_2d(table.shape[-1], grid, cls_token=True).to(table.dtype)
        return table, "sin-cos recomputed"
    # antialiased as timm does; the MAE reference code is not (same table when enlarging, not shrinking)
    resized = resample_abs_pos_embed(table, [grid, grid], [old, old], num_prefix_tokens=prefix,
                                     interpolation="bicubic", antialias=True)
    return resized, "bicubic"


def _spline_weights(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Weights W (len(t), len(x)) such that ``W @ y`` is the not-a-knot cubic spline through (x, y) read
    at ``t``; fewer than 4 points give the interpolating polynomial. float64, x increasing."""
    n = len(x)
    if n < 4:
        powers = torch.arange(n, dtype=x.dtype)
        return (t[:, None] ** powers) @ torch.linalg.inv(x[:, None] ** powers)
    h = x[1:] - x[:-1]
    A = torch.zeros(n, n, dtype=x.dtype)  # acts on the second derivatives M at the knots
    B = torch.zeros(n, n, dtype=x.dtype)  # acts on the values y
    A[0, :3] = torch.stack([-h[1], h[0] + h[1], -h[0]])  # third derivative continuous at x[1]
    A[-1, -3:] = torch.stack([-h[-1], h[-2] + h[-1], -h[-2]])  # and at x[-2]
    for k in range(1, n - 1):
        A[k, k - 1:k + 2] = torch.stack([h[k - 1], 2 * (h[k - 1] + h[k]), h[k]])
        B[k, k - 1:k + 2] = torch.stack([6 / h[k - 1], -6 / h[k - 1] - 6 / h[k], 6 / h[k]])
    C = torch.linalg.solve(A, B)  # M = C @ y
    k = (torch.searchsorted(x, t) - 1).clamp(0, n - 2)  # interval of each t; outside: the end piece
    hk, right, left = h[k], x[k + 1] - t, t - x[k]
    eye = torch.eye(n, dtype=x.dtype)
    return ((right**3 / (6 * hk) - hk * right / 6)[:, None] * C[k]
            + (left**3 / (6 * hk) - hk * left / 6)[:, None] * C[k + 1]
            + (right / hk)[:, None] * eye[k] + (left / hk)[:, None] * eye[k + 1])


def _geometric_offsets(old_half: int, new_half: int) -> torch.Tensor:
    """The old offsets -old_half..old_half placed so their ends land on ±new_half: gaps 1, q, q², ….

    q solves 1 + q + … + q**(old_half - 1) = new_half (by bisection): q > 1 when enlarging, as in BEiT.
    """
    lo, hi = 1e-3, 2.0
    for _ in range(100):
        q = (lo + hi) / 2
        if sum(q**m for m in range(old_half)) > new_half:
            hi = q
        else:
            lo = q
    right = torch.tensor([q**m for m in range(old_half)], dtype=torch.float64).cumsum(0)
    return torch.cat([-right.flip(0), torch.zeros(1, dtype=torch.float64), right])


def resize_rel_pos_table(table: torch.Tensor, grid: int) -> torch.Tensor:
    """A BEiT relative position bias table for a ``grid x grid`` patch grid.

    Args:
        table: ((2g-1)**2 + 3, heads).
        grid: the new grid side.

    Returns:
        ((2*grid-1)**2 + 3, heads): per head, the offset grid resampled on BEiT's geometric spacing with a
        cubic spline along each axis; the three class-token rows unchanged.
    """
    old = rel_grid(table)
    if old == grid:
        return table
    if min(old, grid) < 2:
        raise MimkitError(f"cannot resize a relative position table between grids {old} and {grid}")
    patches, extra = table[:-REL_EXTRA_ROWS], table[-REL_EXTRA_ROWS:]
    span, heads = 2 * old - 1, table.shape[1]
    z = patches.double().T.reshape(heads, span, span)  # [heads, dy, dx]
    new_half = grid - 1
    W = _spline_weights(_geometric_offsets(old - 1, new_half),
                        torch.arange(-new_half, new_half + 1, dtype=torch.float64))
    z = W @ z @ W.T  # [heads, 2*grid-1, 2*grid-1]: separable, first along dy, then along dx
    return torch.cat([z.reshape(heads, -1).T.to(table.dtype), extra], dim=0)
