"""The ``brainstacks`` command line: train, router, route, generate, chat, quickstart.

Subcommands are thin: they parse arguments, call the library and print a summary.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..utils.logging import enable_console_logging
from . import commands


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="brainstacks", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final summary")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in commands.COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``brainstacks`` console script."""
    args = build_parser().parse_args(argv)
    enable_console_logging(logging.WARNING if args.quiet else logging.INFO)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
