"""Per-iteration schedules: linear warmup, then cosine or polynomial decay.

Computed once as an array indexed by the optimizer step, so a resumed run reads the same value at the
same step without replaying anything.
"""

import math


def cosine_schedule(base_value: float, final_value: float, total_steps: int, warmup_steps: int = 0,
                    start_warmup_value: float = 0.0) -> list[float]:
    """Values for steps ``0 … total_steps-1``.

    Args:
        base_value: value reached at the end of warmup.
        final_value: value at the last step.
        total_steps: length of the schedule (optimizer steps, not micro-batches).
        warmup_steps: steps of linear ramp from ``start_warmup_value`` to ``base_value``.
        start_warmup_value: value at step 0 when there is a warmup.

    Returns:
        A list of ``total_steps`` floats.
    """
    return _warmup_then_decay(base_value, final_value, total_steps, warmup_steps, start_warmup_value,
                              lambda t: 0.5 * (1 + math.cos(math.pi * t)))


def poly_schedule(base_value: float, final_value: float, total_steps: int, warmup_steps: int = 0,
                  start_warmup_value: float = 0.0, power: float = 1.0) -> list[float]:
    """Values for steps ``0 … total_steps-1``: linear warmup, then
    ``final + (base - final) * (1 - t) ** power`` with ``t`` going from 0 to 1 over the remaining steps (the
    "poly" schedule of the segmentation recipes; power 1.0 is a linear decay).

    Args: as `cosine_schedule`, and
        power: exponent of the decay.

    Returns:
        A list of ``total_steps`` floats.
    """
    return _warmup_then_decay(base_value, final_value, total_steps, warmup_steps, start_warmup_value,
                              lambda t: (1 - t) ** power)


def _warmup_then_decay(base_value: float, final_value: float, total_steps: int, warmup_steps: int,
                       start_warmup_value: float, shape) -> list[float]:
    """Linear warmup, then ``final + (base - final) * shape(t)`` with ``t`` from 0 to 1 over the rest."""
    warmup_steps = min(warmup_steps, total_steps)
    warmup = [start_warmup_value + (base_value - start_warmup_value) * i / warmup_steps
              for i in range(warmup_steps)]
    decay_steps = total_steps - warmup_steps
    span = max(decay_steps - 1, 1)  # the last step lands on final_value
    return warmup + [final_value + (base_value - final_value) * shape(i / span) for i in range(decay_steps)]
