"""Pretraining methods. Each module provides ``build_model(config)`` (the module that is checkpointed)
and ``build_task(config, model)`` → ``(view, loss_fn)`` (what the training loop needs)."""

from mimkit.methods import mae

METHODS = {"mae": mae}
