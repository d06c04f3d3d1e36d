"""`ctlanguage` console command.

One module per subcommand in this package, each with a ``register(subparsers)`` function; the
handler it sets with ``set_defaults(func=...)`` receives the parsed ``argparse.Namespace`` and
returns an exit status. Handlers import their heavy dependencies lazily so that
``ctlanguage --help`` stays fast. Packages beside the engine add subcommands through the
``ctlanguage.cli`` entry-point group (the browser demo registers ``web`` that way), so the engine's
CLI never imports them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading

from .. import __version__
from ..errors import CTLanguageError

# modules of this package that provide register(subparsers), in --help order
_SUBCOMMAND_MODULES = [
    "ctlanguage.cli.phantom",        # phantom
    "ctlanguage.cli.train",          # train
    "ctlanguage.cli.calibrate",      # calibrate
    "ctlanguage.cli.evaluate",       # evaluate
    "ctlanguage.cli.query",          # encode, query
    "ctlanguage.cli.batch",          # batch, batch merge
    "ctlanguage.cli.models",         # models list|verify|download
    "ctlanguage.cli.demo",           # demo
]
ENTRY_POINT_GROUP = "ctlanguage.cli"


def _plugin_registrars():
    """register() functions of installed packages that extend the CLI (entry points)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            yield ep.load()
        except ImportError as exc:  # a broken optional package must not break the engine's CLI
            logging.getLogger(__name__).debug("CLI plugin %s not loaded: %s", ep.name, exc)


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
        importlib.import_module(name).register(sub)
    for register in _plugin_registrars():
        register(sub)
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
        with _sigterm_as_interrupt():
            return int(args.func(args) or 0)
    except CTLanguageError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("error: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl+C so that every cleanup path (staging folders, temp files) runs."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


