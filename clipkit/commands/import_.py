"""``python -m clipkit import ckpt=PATH``: an OpenAI or open_clip CLIP checkpoint as a clipkit model, with
:mod:`clipkit.interop.openai_clip`. (``import_``: ``import`` is a Python keyword.)"""

from __future__ import annotations

from pathlib import Path

from clipkit.commands import asks_for_help, config_help, overrides_only
from clipkit.errors import UsageError

USAGE = ("python -m clipkit import ckpt=ViT-B-32.pt [out=FILE.safetensors] [act=quick_gelu|gelu] "
         "[image_head_width=64] [tokenizer=DIR]")


def help_text() -> str:
    return config_help(
        "import", USAGE,
        "Import an OpenAI or open_clip CLIP checkpoint (ViT and ResNet layouts) as a clipkit model: one .safetensors\n"
        "with config, tokenizer and weights, ready for predict, eval, export or fit init=.",
        "python -m clipkit import ckpt=ViT-B-32.pt out=vit_b32.safetensors")


def main(args: list[str]) -> int:
    if asks_for_help(args):
        print(help_text())
        return 0
    args = overrides_only("import", args)
    from clipkit.config import compose_config, require
    from clipkit.interop.openai_clip import import_checkpoint

    cfg = compose_config(args, config_name="import")
    require(cfg, ("ckpt",), USAGE)
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
