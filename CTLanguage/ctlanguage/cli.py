"""`ctlanguage` console command.

Each feature area registers its own subcommand through a ``register(subparsers)`` function in
its module (listed in ``_SUBCOMMAND_MODULES``); the handler it sets with ``set_defaults(func=...)``
receives the parsed ``argparse.Namespace`` and returns an exit status. Modules are imported
lazily so that ``ctlanguage --help`` stays fast and a broken optional area cannot break the rest.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import CTLanguageError

# (module path, required) — modules that provide register(subparsers).
_SUBCOMMAND_MODULES = [
    "ctlanguage.phantom.cli",        # phantom
    "ctlanguage.training.cli",       # train
    "ctlanguage.evaluation_cli",     # evaluate
    "ctlanguage.query_cli",          # encode, query, batch
    "ctlanguage.catalog_cli",        # models list|verify|download
    "ctlanguage.demo_cli",           # demo
    "ctlanguage.web_cli",            # web
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctlanguage",
        description="Grounded CT vision-language engine: prompts -> masks and probabilities.",
    )
    parser.add_argument("--version", action="version", version=f"ctlanguage {__version__}")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or info output")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # area not present in this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else (logging.WARNING if args.quiet else logging.INFO),
        format="%(levelname)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except CTLanguageError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
