"""Run several ``diffmem`` commands, one after another, in each process of one launched process group.

Test helper for ``tests/test_distributed.py``: starting ``accelerate launch`` costs far more than the tiny
commands themselves, so the test launches this script once, and every process runs the same list of command
lines through :func:`diffmem.cli.main`, exactly as ``accelerate launch -m diffmem <command>`` would.

Usage: ``[accelerate launch ...] tests/_dist_worker.py [--delay SECONDS] commands.json``, where
``commands.json`` holds a list of argument lists. ``--delay`` makes every recorded chunk of prompts wait that
long first, so that a test can kill a run between its checkpoints without racing it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def slow_down_recording(delay: float) -> None:
    """Make :func:`diffmem.hooks.record` sleep ``delay`` seconds before each call.

    Args:
        delay: Seconds to wait per call.
    """
    import diffmem.hooks

    record = diffmem.hooks.record

    def slow_record(*args, **kwargs):
        time.sleep(delay)
        return record(*args, **kwargs)

    diffmem.hooks.record = slow_record


def run(commands_file: str) -> int:
    """Run every command line of ``commands_file``; stop at the first that fails.

    Args:
        commands_file: JSON list of argument lists for :func:`diffmem.cli.main`.

    Returns:
        0, or the exit status of the first failing command.
    """
    from diffmem.cli import main

    for argv in json.loads(Path(commands_file).read_text(encoding="utf-8")):
        status = main(argv)
        if status:
            return status
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--delay"]:
        slow_down_recording(float(args[1]))
        args = args[2:]
    sys.exit(run(args[0]))
