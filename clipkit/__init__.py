"""clipkit: a Lightning + Hydra + MLflow kit for CLIP-style image–text pretraining."""

__version__ = "0.1.0"


def load(path, device: str = "cpu", batch_size: int = 64):
    """A trained or imported model for inference (:class:`clipkit.api.ClipModel`): ``classify``, ``encode_image``,
    ``encode_text``. Imported on first use, so ``import clipkit`` stays light."""
    from clipkit.api import load as load_model

    return load_model(path, device, batch_size)
