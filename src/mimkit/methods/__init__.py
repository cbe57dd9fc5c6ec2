"""Pretraining methods and tokenizers. Each module provides ``build_model(config)`` (the module that is
checkpointed) and ``build_task(config, model)`` → ``(view, loss_fn)`` (what the training loop needs).
Optionally ``resolve_config(config) -> config`` fills fields left to something outside the run (BEiT's
tokenizer decides its vocabulary), and ``schedule_values(config, total_steps) -> {name: per-step list}``
adds scheduled values (a Gumbel temperature) that the loss finds in the batch under their names.
"""

from mimkit.methods import beit, dvae, mae

PRETRAINING = {"mae": mae, "beit": beit}  # mimkit pretrain NAME
TOKENIZERS = {"dvae": dvae}  # mimkit tokenizer train NAME
METHODS = PRETRAINING | TOKENIZERS  # what a run directory can hold (config.method)
