"""``python -m clipkit import ckpt=PATH``: an OpenAI or open_clip CLIP checkpoint (:mod:`clipkit.interop.openai_clip`)
or a transformers ``CLIPModel`` folder (:mod:`clipkit.interop.hf_clip`) as a clipkit model. (``import_``: ``import``
is a Python keyword.)"""

from __future__ import annotations

from pathlib import Path

from clipkit.commands import KeyValueCommand, one_line
from clipkit.errors import UsageError

COMMAND = KeyValueCommand(
    "import", "python -m clipkit import ckpt=ViT-B-32.pt [out=FILE.safetensors] [act=quick_gelu|gelu] "
    "[image_head_width=64] [tokenizer=DIR]",
    "Import an OpenAI or open_clip CLIP checkpoint (ViT and ResNet layouts), or a transformers CLIPModel folder,\n"
    "as a clipkit model: one .safetensors\n"
    "with config, tokenizer and weights, ready for predict, eval, export or fit init=.",
    "python -m clipkit import ckpt=ViT-B-32.pt out=vit_b32.safetensors",
    required=("ckpt",))


def main(args: list[str]) -> int:
    cfg = COMMAND.compose(args)
    if cfg is None:
        return 0
    from clipkit.interop.openai_clip import import_checkpoint

    source = Path(cfg.ckpt)
    stem = source.name if source.is_dir() else source.stem
    out = Path(cfg.out) if cfg.out else source.with_name(stem + ".clipkit.safetensors")
    if out.exists():
        raise UsageError(f"out={out} exists: delete it or choose another out=")
    with one_line(FileNotFoundError, ValueError, OSError):
        if source.is_dir():  # a transformers CLIPModel folder: its config says all the rest
            from clipkit.interop.hf_clip import import_hf

            import_hf(source, out)
        else:
            import_checkpoint(source, out, cfg.act, cfg.tokenizer, cfg.image_head_width, cfg.text_head_width)
    print(f"imported {source} -> {out} (config, tokenizer and weights in one file)\n"
          f"  try: python -m clipkit predict ckpt={out} images=[IMAGE] labels=[cat,dog]", flush=True)
    return 0
