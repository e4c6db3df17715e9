"""clipkit: a Lightning + Hydra + MLflow kit for CLIP-style image–text pretraining."""

__version__ = "0.1.0"
