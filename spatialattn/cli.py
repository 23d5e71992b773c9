"""The ``spatialattn`` command.

Each sub-command lives in its own module under :mod:`spatialattn.commands` and
exposes ``register(subparsers)``, which adds its parser and sets ``func``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# Sub-command modules, in the order `spatialattn --help` lists them.
COMMAND_MODULES = [
    "spatialattn.commands.dataset",
    "spatialattn.commands.detect",
    "spatialattn.commands.demo",
    "spatialattn.commands.train",
    "spatialattn.commands.eval",
    "spatialattn.commands.compare",
    "spatialattn.commands.attention",
    "spatialattn.commands.kernels",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spatialattn",
        description="Spatial attention (SAM / CBAM) for PyTorch: modules, Darknet [sam] networks, detectors.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
