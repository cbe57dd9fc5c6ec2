"""mimkit: masked image modeling for Vision Transformers (MAE, BEiT, BEiT v2)."""

__version__ = "0.1.0"
