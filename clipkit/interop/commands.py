"""``python -m clipkit import`` and ``python -m clipkit export``."""

from __future__ import annotations

from pathlib import Path

FORMATS = ("hf", "open_clip")


def import_main(args: list[str]) -> int:
    from clipkit.config import compose_config, require
    from clipkit.errors import UsageError
    from clipkit.interop.openai_clip import import_checkpoint

    cfg = compose_config(args, config_name="import")
    require(cfg, ("ckpt",), "python -m clipkit import ckpt=ViT-B-32.pt [out=FILE.safetensors] [act=quick_gelu|gelu] "
                            "[image_head_width=64] [tokenizer=DIR]")
    source = Path(cfg.ckpt)
    out = Path(cfg.out) if cfg.out else source.with_name(source.stem + ".clipkit.safetensors")
    if out.exists():
        raise UsageError(f"out={out} exists: delete it or choose another out=")
    try:
        import_checkpoint(source, out, cfg.act, cfg.tokenizer, cfg.image_head_width, cfg.text_head_width)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    print(f"imported {source} -> {out} (config, tokenizer and weights in one file)\n"
          f"  try: python -m clipkit predict ckpt={out} images=[IMAGE] labels=[cat,dog]", flush=True)
    return 0


def export_main(args: list[str]) -> int:
    from clipkit.api import checkpoint_tokenizer
    from clipkit.config import compose_config, require
    from clipkit.errors import UsageError
    from clipkit.evaluate import build, load_checkpoint
    from clipkit.interop.hf_clip import export_hf
    from clipkit.interop.openai_clip import export_open_clip
    from clipkit.interop.towers import NotExportable
    from clipkit.objectives import Contrastive

    cfg = compose_config(args, config_name="export")
    require(cfg, ("ckpt", "format", "out"), "python -m clipkit export ckpt=PATH format=hf|open_clip out=DIR")
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
