"""``python -m clipkit export ckpt=PATH format=hf|open_clip out=DIR``: a clipkit model for transformers or open_clip,
with :mod:`clipkit.interop.hf_clip` and :mod:`clipkit.interop.openai_clip`."""

from __future__ import annotations

from clipkit.commands import KeyValueCommand, one_line
from clipkit.errors import UsageError

FORMATS = ("hf", "open_clip")
COMMAND = KeyValueCommand(
    "export", "python -m clipkit export ckpt=PATH format=hf|open_clip out=DIR",
    "Export a contrastive clipkit model as a Hugging Face CLIPModel folder (pipeline-ready) or an open_clip\n"
    "folder; the export is reloaded and checked to give the same embeddings.",
    "python -m clipkit export ckpt=outputs/.../model.safetensors format=hf out=exported/clip_hf",
    required=("ckpt", "format", "out"))


def main(args: list[str]) -> int:
    cfg = COMMAND.compose(args)
    if cfg is None:
        return 0
    if cfg.format not in FORMATS:
        raise UsageError(f"format={cfg.format}: choose hf or open_clip")
    from clipkit.api import checkpoint_tokenizer
    from clipkit.evaluate import build, load_checkpoint
    from clipkit.interop.hf_clip import export_hf
    from clipkit.interop.openai_clip import export_open_clip
    from clipkit.interop.towers import NotExportable
    from clipkit.objectives import Contrastive

    with one_line(FileNotFoundError, FileExistsError, ValueError):
        ckpt, stored = load_checkpoint(cfg.ckpt)
        module = build(ckpt, stored)
        if not isinstance(module.objective, Contrastive):
            raise NotExportable(f"{type(module.objective).__name__} has no CLIP equivalent: only a contrastive model "
                                f"has CLIP's two towers in one embedding space")
        tokenizer = checkpoint_tokenizer(ckpt, stored)
        out, error = (export_hf if cfg.format == "hf" else export_open_clip)(module, stored, tokenizer, cfg.out)
    how = ('transformers.CLIPModel.from_pretrained(DIR), pipeline("zero-shot-image-classification", model=DIR)'
           if cfg.format == "hf" else 'open_clip.create_model_and_transforms("local-dir:DIR")')
    print(f"exported {cfg.ckpt} -> {out} ({cfg.format}; reloaded, largest embedding difference {error:.1e})\n"
          f"  load it with {how}", flush=True)
    return 0
