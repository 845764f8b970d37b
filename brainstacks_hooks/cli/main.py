"""The ``brainstacks`` command line: train, router, route, generate, chat, quickstart, configs.

Subcommands are thin: they parse arguments, call the library and print a summary.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import BrainstacksError
from ..utils.logging import enable_console_logging
from . import commands


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="brainstacks", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final summary")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in commands.COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


#: Exit status of a user error (bad config, key, override, mode or run directory), as argparse uses.
USER_ERROR = 2


def error_line(exc: BaseException) -> str:
    """``error: <message>`` on one line (a multi-line message is joined with ``; ``)."""
    if isinstance(exc, FileNotFoundError) and exc.filename is not None:
        message = f"no such file or directory: {exc.filename}"
    else:
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return f"error: {message}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``brainstacks`` console script.

    A user error (:class:`~brainstacks_hooks.errors.BrainstacksError`, or a file that does not exist) prints one
    ``error: ...`` line to stderr and returns 2; ``--debug`` re-raises it with its traceback. Any other exception
    is a bug and keeps its traceback.
    """
    args = build_parser().parse_args(argv)
    enable_console_logging(logging.WARNING if args.quiet else logging.INFO)
    try:
        return int(args._run(args) or 0)
    except (BrainstacksError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(error_line(e), file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
