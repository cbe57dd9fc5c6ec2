"""Pretraining methods and tokenizers: importing this package imports each method's module (every module in
this folder, by name), which registers its `mimkit.registry.Method` record: the model it checkpoints, its
training task and its optional hooks (pictures, import and export, ...). A new method is a new module here.
"""

import importlib
import pkgutil

from mimkit.registry import registered

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")  # registers itself

PRETRAINING = registered("pretraining")  # mimkit pretrain NAME
TOKENIZERS = registered("tokenizer")  # mimkit tokenizer train NAME
METHODS = registered()  # what a run directory can hold (config.method)
