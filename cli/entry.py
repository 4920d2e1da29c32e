"""The process entry of `cachekd` and ``python -m cachekd_cli``.

It imports nothing heavy itself: until the commands are imported and ready, Ctrl-C (SIGINT) ends the process
quietly with exit status 130 (what a shell reports for an interrupted command) instead of a KeyboardInterrupt
traceback from the middle of an import. From then on the `cachekd` group handles it (each command says what an
interrupt left behind).
"""

from __future__ import annotations

import os
import signal


def _exit_quietly(signum: int, frame: object) -> None:
    os._exit(128 + signum)  # nothing has been written yet: no clean-up to run


def main() -> None:
    """Run the `cachekd` command line."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:  # (an ignored SIGINT, as in background jobs, stays ignored)
        signal.signal(signal.SIGINT, _exit_quietly)
    from cachekd_cli.main import main as run_cli

    if previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, previous)
    run_cli()
