"""``python -m clipkit export ckpt=PATH format=hf|open_clip out=DIR``: a clipkit model for transformers or open_clip,
with :mod:`clipkit.interop.hf_clip` and :mod:`clipkit.interop.openai_clip`."""

from __future__ import annotations

from clipkit.commands import asks_for_help, config_help, overrides_only
from clipkit.errors import UsageError

FORMATS = ("hf", "open_clip")
USAGE = "python -m clipkit export ckpt=PATH format=hf|open_clip out=DIR"


def help_text() -> str:
    return config_help(
        "export", USAGE,
        "Export a contrastive clipkit model as a Hugging Face CLIPModel folder (pipeline-ready) or an open_clip\n"
        "folder; the export is reloaded and checked to give the same embeddings.",
        "python -m clipkit export ckpt=outputs/.../model.safetensors format=hf out=exported/clip_hf")


def main(args: list[str]) -> int:
    if asks_for_help(args):
        print(help_text())
        return 0
    args = overrides_only("export", args)
    from clipkit.api import checkpoint_tokenizer
    from clipkit.config import compose_config, require
    from clipkit.evaluate import build, load_checkpoint
    from clipkit.interop.hf_clip import export_hf
    from clipkit.interop.openai_clip import export_open_clip
    from clipkit.interop.towers import NotExportable
    from clipkit.objectives import Contrastive

    cfg = compose_config(args, config_name="export")
    require(cfg, ("ckpt", "format", "out"), USAGE)
    if cfg.format not in FORMATS:
        raise UsageError(f"format={cfg.format}: choose hf or open_clip")
    try:
        ckpt, stored = load_checkpoint(cfg.ckpt)
        module = build(ckpt, stored)
        if not isinstance(module.objective, Contrastive):
            raise NotExportable(f"{type(module.objective).__name__} has no CLIP equivalent: only a contrastive model "
                                f"has CLIP's two towers in one embedding space")
        tokenizer = checkpoint_tokenizer(ckpt, stored)
        out, error = (export_hf if cfg.format == "hf" else export_open_clip)(module, stored, tokenizer, cfg.out)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        raise UsageError(str(err)) from None
    how = ('transformers.CLIPModel.from_pretrained(DIR), pipeline("zero-shot-image-classification", model=DIR)'
           if cfg.format == "hf" else 'open_clip.create_model_and_transforms("local-dir:DIR")')
    print(f"exported {cfg.ckpt} -> {out} ({cfg.format}; reloaded, largest embedding difference {error:.1e})\n"
          f"  load it with {how}", flush=True)
    return 0
