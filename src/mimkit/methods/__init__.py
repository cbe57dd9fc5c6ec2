"""Pretraining methods and tokenizers: importing this package imports each method's module, which registers
its `mimkit.registry.Method` record (the model it checkpoints, its training task and optional hooks).
"""

from mimkit.methods import beit, beitv2, dvae, mae, vqkd  # noqa: F401  (each registers itself)
from mimkit.registry import registered

PRETRAINING = registered("pretraining")  # mimkit pretrain NAME
TOKENIZERS = registered("tokenizer")  # mimkit tokenizer train NAME
METHODS = registered()  # what a run directory can hold (config.method)
