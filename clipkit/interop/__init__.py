"""CLIP models in and out of clipkit: OpenAI/open_clip checkpoints imported into clipkit towers
(:mod:`~clipkit.interop.openai_clip`), clipkit models exported as Hugging Face ``CLIPModel`` folders
(:mod:`~clipkit.interop.hf_clip`) or open_clip folders, every export checked to reproduce the model."""
