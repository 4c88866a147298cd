"""``diffmem`` command line: thin subcommands, one library call each.

Every user-fixable problem (a wrong path, a malformed prompt file, a mismatched edit, an out-of-range value)
ends in one line ``diffmem: error: ...`` and exit status 2; anything else is a bug and keeps its traceback (exit
status 1). Cheap checks (files, suffixes, values) run before the model is loaded. ``--steps`` always means sampler
steps; tau (the recorded leading steps) is ``--record-steps`` everywhere.

One module per command family (:mod:`.locate`: record, locate, prune, iou; :mod:`.detect`: detect, audit;
:mod:`.evaluate`: attack, evaluate, reextract; :mod:`.mitigate`; :mod:`.demo`; :mod:`.manifest`); what they share,
the error policy included, is in :mod:`._common`.
"""

from __future__ import annotations

import argparse

from . import demo, detect, evaluate, locate, manifest, mitigate
from ._common import Parser, run_command, setup_logging

__all__ = ["main", "build_parser"]

# the subcommands, in the order ``diffmem --help`` lists them
_COMMANDS = (locate.add_record, locate.add_locate, locate.add_prune, locate.add_iou, detect.add_detect,
             evaluate.add_attack, evaluate.add_evaluate, evaluate.add_reextract, mitigate.add_mitigate, demo.add_demo,
             detect.add_audit, manifest.add_manifest)


def build_parser() -> argparse.ArgumentParser:
    """The ``diffmem`` argument parser, with every subcommand.

    Returns:
        The parser; each subcommand sets ``func``, the function that runs it.
    """
    from diffmem import __version__

    parser = Parser(prog="diffmem", description="Locate and delete memorization in diffusion models.")
    parser.add_argument("--version", action="version", version=f"diffmem {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffmem`` console script.

    A user error (a :class:`~diffmem.errors.DiffmemError`, such as a ``ConfigError`` for an invalid value, or an OS
    error on a named path) ends in one line ``diffmem: error: ...`` and exit status 2; argparse rejects bad flags the
    same way. Any other exception is a bug: it propagates with its traceback (exit status 1).

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or 2 for a user error.
    """
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_command(args)

