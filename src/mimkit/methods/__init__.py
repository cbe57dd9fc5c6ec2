"""Pretraining methods and tokenizers. Each module provides ``build_model(config)`` (the module that is
checkpointed) and ``build_task(config, model)`` → ``(view, loss_fn)`` (what the training loop needs).
Optionally ``resolve_config(config) -> config`` fills fields left to something outside the run (BEiT's
tokenizer decides its vocabulary), and ``schedule_values(config, total_steps) -> {name: per-step list}``
adds scheduled values (a Gumbel temperature) that the loss finds in the batch under their names, and
``build_evaluate(config, model) -> evaluate(model) -> {name: number}`` is run at each epoch end and at the
end, its numbers logged (a VQ-KD tokenizer's codebook usage on held-out images).
"""

from mimkit.methods import beit, beitv2, dvae, mae, vqkd

PRETRAINING = {"mae": mae, "beit": beit, "beitv2": beitv2}  # mimkit pretrain NAME
TOKENIZERS = {"dvae": dvae, "vqkd": vqkd}  # mimkit tokenizer train NAME
METHODS = PRETRAINING | TOKENIZERS  # what a run directory can hold (config.method)
