"""Evaluation of the runs of every registered method (importing `mimkit.methods` registers them)."""

import mimkit.methods  # noqa: F401
