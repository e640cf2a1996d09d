"""How a client process ends: its exit code, and a closed stdout that is not an error."""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing would cost every agent call its import time; only mypy needs it
    from collections.abc import Callable
    from typing import NoReturn


def exit_with(run: Callable[[], int], failed: int) -> NoReturn:
    """Exit with `run()`'s code, flushing stdout first; `failed` if stdout was closed."""
    try:
        code = run()
        sys.stdout.flush()
    except BrokenPipeError:
        # `vmfencectl status | head`, `fence_vmfenced -o metadata | head`: stop quietly,
        # without a traceback at exit (stdout goes to /dev/null so the final flush succeeds).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = failed
    sys.exit(code)
