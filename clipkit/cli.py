"""Command line: ``python -m clipkit COMMAND ...`` dispatches to the command's module in :mod:`clipkit.commands`.

Only dispatch lives here. A command's module is imported when it runs, so ``--help`` and a mistyped command answer
without loading Lightning or MLflow, and no command depends on this module (config composition is
:mod:`clipkit.config`, usage errors :mod:`clipkit.errors`).
"""

from __future__ import annotations

import importlib
import os
import sys

from clipkit.errors import DataError, UsageError

USAGE = """usage: python -m clipkit COMMAND [hydra overrides]

commands:
  fit   train a model: python -m clipkit fit experiments=contrastive_vit [key=value ...]
        Hydra's own flags work: --cfg job (print the config), -m (multirun grid), --help
  eval  evaluate a checkpoint: zero-shot, retrieval, linear and few-shot probes; JSON report + MLflow:
          python -m clipkit eval ckpt=PATH [tasks=[zeroshot,retrieval,linear_probe,fewshot]] [data=NAME]
  data  write the embedded dataset to disk, or look at a dataset:
          python -m clipkit data synth --out DIR --format wds|csv --samples N
          python -m clipkit data inspect PATH   (shards, CSV/TSV or image folder; writes a contact sheet)
  compare  zero-shot accuracy against images processed, one curve per objective, from MLflow runs:
          python -m clipkit compare [--experiment ablation_fig2 | --sweep ID|NAME] [--out FILE.md] [--levels 0.3,0.5]
  ui    start the MLflow UI on 127.0.0.1 for the run store, on the experiment of the newest run:
          python -m clipkit ui [port=5000] [experiments=PRESET | experiment_name=NAME] [sweep=ID|NAME]
  robustness  accuracy under distribution shift and effective robustness against a supervised baseline:
          python -m clipkit robustness ckpts=[contrastive/last.ckpt,supervised_run/checkpoints] [out=DIR]
  wiseft   interpolate a zero-shot model with its fine-tuned version (WiSE-FT), scored in and out of distribution:
          python -m clipkit wiseft zeroshot=PATH finetuned=PATH [alphas=[0,0.1,...,1]] [out=DIR]
  predict  rank labels for images: python -m clipkit predict ckpt=PATH images=[a.png,b.jpg] labels=[cat,dog]
  import   an OpenAI/open_clip CLIP checkpoint as a clipkit model (ViT and ResNet layouts):
          python -m clipkit import ckpt=ViT-B-32.pt [out=FILE.safetensors] [act=quick_gelu|gelu]
  export   a clipkit model for transformers or open_clip: python -m clipkit export ckpt=PATH format=hf|open_clip out=DIR

python -m clipkit COMMAND --help prints a command's usage, options and an example.
"""

# command -> its module in clipkit.commands (``import`` is a Python keyword)
COMMANDS = {"fit": "fit", "eval": "eval", "data": "data", "compare": "compare", "ui": "ui", "predict": "predict",
            "import": "import_", "export": "export", "robustness": "robustness",
            "wiseft": "wiseft"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] not in COMMANDS and os.environ.get("LOCAL_RANK") and not os.environ.get("TORCHELASTIC_RUN_ID"):
        # Lightning's DDP launcher restarts `python -m clipkit` with Hydra's argv (the overrides, without the
        # sub-command) for each further local rank
        argv = ["fit", *argv]
    command, rest = argv[0], argv[1:]
    try:
        if command not in COMMANDS:
            from clipkit.config import suggest

            raise UsageError(f"unknown command {command!r}{suggest(command, list(COMMANDS))}")
        return importlib.import_module(f"clipkit.commands.{COMMANDS[command]}").main(rest)
    except UsageError as err:
        print(f"clipkit: error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"clipkit: error: {err}", file=sys.stderr)
        return 1
