"""The ``leanopt`` command line: ``demo``, ``plan`` and ``bench``.

Every user error ends in one line on stderr (``leanopt <command>: error: ...``) and exit code 2, never a
traceback. Set ``LEANOPT_DEBUG=1`` to see tracebacks of unexpected failures.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from .common import CLIError

EXAMPLES = """\
examples:
  leanopt demo                 # train a small GPT under standard mixed precision and leanopt modes (minutes)
  leanopt demo --quick         # the same in under a minute
  leanopt plan 7B --memory 24GB
  leanopt plan path/to/config.json --optimizer adamw --json
  leanopt bench --quick        # the kernel benchmark: step time vs bandwidth, torch AdamW, leanopt, peers

Run 'leanopt <command> --help' for each command's options and examples.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with its three sub-commands."""
    from . import bench, demo, plan

    parser = _Parser(
        prog="leanopt",
        description="leanopt: mixed-precision optimizers without an fp32 master copy of the weights.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from leanopt import __version__

    parser.add_argument("--version", action="version", version=f"leanopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,plan,bench}", parser_class=_Parser)
    demo.build_parser(sub)
    plan.build_parser(sub)
    bench.build_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version or a usage error (already printed)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    if args.command is None:
        parser.print_help()
        return 2
    args.argv = argv
    try:
        return int(args.func(args) or 0)
    except CLIError as err:
        print(f"leanopt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"leanopt {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("LEANOPT_DEBUG"):
            raise
        print(
            f"leanopt {args.command}: internal error: {type(err).__name__}: {err} "
            "(set LEANOPT_DEBUG=1 for the traceback and please report it)",
            file=sys.stderr,
        )
        return 1


__all__ = ["CLIError", "build_parser", "main"]
